"""STDET's sensitivity before the model is attached: hooks on the layers' own tensors.

From the end of the warm-up to the first round every element is FREE, so STDET leaves the model as
it is (its layers' own tensors, each trained by the user's optimizer as in plain training) and attaches
the flat layout only when the first round embeds something. The sensitivity of the window before
that round is kept here: one gradient hook over the tensors adds each backward's scores to a running
mean (one fused kernel for all of them), with the element's value at backward time and that
backward's own gradient, as the fused backward does once attached (so under DDP, too, each rank sees
its own share of the batch until the round averages them).
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

import stdet_kernels


class HookedSensitivity:
    """A running mean of each element's score (``|g * w|``, "taylor", or ``g * g``, "fisher"), over
    every element of `tensors` laid end to end, updated once per backward (one gradient hook over all
    the tensors, one fused kernel launch) while `track_sensitivity` is (decay, measure); the same two
    attributes as `stdet.layout.FlatLayout`'s."""

    def __init__(self, tensors: list[nn.Parameter]) -> None:
        device = tensors[0].device
        self.sensitivity = torch.zeros(sum(t.numel() for t in tensors), dtype=torch.float32, device=device)
        self.track_sensitivity: tuple[float, str] | None = None
        self._tensors = list(tensors)
        pieces = self.sensitivity.split_with_sizes([t.numel() for t in tensors])
        self._pieces = [piece.view(t.shape) for piece, t in zip(pieces, tensors, strict=True)]
        self._handle = torch.autograd.graph.register_multi_grad_hook(self._tensors, self._update, mode="all")

    def _update(self, grads: Sequence[Tensor | None]) -> None:
        """Once all the tensors' gradients of a backward are computed (values still those the
        backward saw): every score into the running means, one launch."""
        if self.track_sensitivity is None:
            return
        decay, measure = self.track_sensitivity
        present = [k for k, grad in enumerate(grads) if grad is not None]
        with torch.no_grad():
            stdet_kernels.sensitivity_update_(
                [self._pieces[k] for k in present],
                [grads[k] for k in present],
                [self._tensors[k].detach() for k in present],
                decay,
                measure,
            )

    def remove(self) -> None:
        """Take the hook off the tensors (the layout's backward tracks the sensitivity from here)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
