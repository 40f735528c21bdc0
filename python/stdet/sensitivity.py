"""STDET's sensitivity before the model is attached: hooks on the layers' own tensors.

From the end of the warm-up to the first round every element is FREE, so STDET leaves the model as
it is (its layers' own tensors, each trained by the user's optimizer as in plain training) and attaches
the flat layout only when the first round embeds something. The sensitivity of the window before
that round is kept here: a gradient hook per tensor adds each backward's score to a running mean, with
the element's value at backward time and that backward's own gradient, as the fused backward does once
attached (so under DDP, too, each rank sees its own share of the batch until the round averages them).
"""

from functools import partial

import torch
from torch import Tensor, nn


class HookedSensitivity:
    """A running mean of each element's score (``|g * w|``, "taylor", or ``g * g``, "fisher"), over
    every element of `tensors` laid end to end, updated by their gradient hooks while
    `track_sensitivity` is (decay, measure); the same two attributes as `stdet.layout.FlatLayout`'s."""

    def __init__(self, tensors: list[nn.Parameter]) -> None:
        device = tensors[0].device
        self.sensitivity = torch.zeros(sum(t.numel() for t in tensors), dtype=torch.float32, device=device)
        self.track_sensitivity: tuple[float, str] | None = None
        pieces = self.sensitivity.split_with_sizes([t.numel() for t in tensors])
        self._handles = [
            tensor.register_hook(partial(self._update, tensor, piece.view(tensor.shape)))
            for tensor, piece in zip(tensors, pieces, strict=True)
        ]

    def _update(self, tensor: Tensor, running: Tensor, grad: Tensor) -> None:
        if self.track_sensitivity is None:
            return
        decay, measure = self.track_sensitivity
        with torch.no_grad():
            g = grad.float()
            score = g.square() if measure == "fisher" else g.mul(tensor.detach().float()).abs_()
            running.mul_(decay).add_(score, alpha=1.0 - decay)

    def remove(self) -> None:
        """Take the hooks off the tensors (the layout's backward tracks the sensitivity from here)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
