"""STDET's sensitivity before the model is attached: hooks on the layers' own tensors.

From the end of the warm-up to the first round every element is FREE, so STDET leaves the model as
it is (its layers' own tensors, each trained by the user's optimizer as in plain training) and attaches
the flat layout only when the first round embeds something. The sensitivity of the window before
that round is kept here: a gradient hook adds each backward's scores to a running mean (one fused
update for all the tensors, once their gradients are computed), with the element's value at backward
time and that backward's own gradient, as the fused backward does once attached (so under DDP, too,
each rank sees its own share of the batch until the round averages them).
"""

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn

from stdet_kernels.compact import check_sensitivity_update, sensitivity_update_unchecked_


class HookedSensitivity:
    """A running mean of each element's score (``|g * w|``, "taylor", or ``g * g``, "fisher"), over
    every element of `tensors` laid end to end, updated in each backward by gradient hooks while
    `track_sensitivity` is (decay, measure); the same two attributes as `stdet.layout.FlatLayout`'s.

    One launch per backward, whatever the number of layers: one hook over all the tensors, once the
    backward has computed their gradients. A hook per tensor (`per_tensor`) updates each while its
    gradient is still in cache, but measured no cheaper on a CPU (2 threads, 200 steps interleaved:
    mbt2018-mean +0.7 ms per step for the one launch, SE 0.6; the small factorized model -1.1 ms,
    SE 0.5), and on a GPU it is a launch per layer. The one hook holds each gradient until the last
    arrives, so autograd copies them into ``.grad`` rather than handing them over: it is registered
    only while `track_sensitivity` is set (the window before a round), and outside it a backward is
    plain training's.
    """

    def __init__(self, tensors: list[nn.Parameter], per_tensor: bool = False) -> None:
        device = tensors[0].device
        self.sensitivity = torch.zeros(sum(t.numel() for t in tensors), dtype=torch.float32, device=device)
        self._tensors = list(tensors)
        pieces = self.sensitivity.split_with_sizes([t.numel() for t in tensors])
        self._pieces = [piece.view(t.shape) for piece, t in zip(pieces, tensors, strict=True)]
        self.per_tensor = per_tensor
        # Checked once here (a gradient has its tensor's shape, dtype and device): the hooks then call
        # the kernel without the checks and the op's dispatch, which cost about as much as the kernel
        # in every backward (mbt2018-mean's 28 layers, 2 CPU threads).
        values = [t.detach() for t in self._tensors]
        check_sensitivity_update(self._pieces, values, values)
        self._trained = [k for k, tensor in enumerate(self._tensors) if tensor.requires_grad]
        self._handles: list = []
        self._tracking: tuple[float, str] | None = None
        if self.per_tensor:  # (a frozen tensor gets no gradient: its sensitivity stays 0)
            self._handles = [
                self._tensors[k].register_hook(partial(self._update_one, self._tensors[k], self._pieces[k]))
                for k in self._trained
            ]

    @property
    def track_sensitivity(self) -> tuple[float, str] | None:
        """(decay, measure) while the backward updates the sensitivity, else None."""
        return self._tracking

    @track_sensitivity.setter
    def track_sensitivity(self, tracking: tuple[float, str] | None) -> None:
        self._tracking = tracking
        if self.per_tensor:
            return
        if tracking is not None and not self._handles and self._trained:
            trained = [self._tensors[k] for k in self._trained]
            self._handles = [
                torch.autograd.graph.register_multi_grad_hook(trained, self._update_all, mode="all")
            ]
        elif tracking is None:
            self._remove_handles()

    def _update_one(self, tensor: Tensor, running: Tensor, grad: Tensor) -> None:
        """One tensor's gradient hook: its scores into the running means, one fused pass."""
        if self.track_sensitivity is None:
            return
        decay, measure = self.track_sensitivity
        with torch.no_grad():
            sensitivity_update_unchecked_([running], [grad], [tensor.detach()], decay, measure == "fisher")

    def _update_all(self, grads: Sequence[Tensor | None]) -> None:
        """Once all the tensors' gradients of a backward are computed (values still those the
        backward saw): every score into the running means, one launch."""
        if self.track_sensitivity is None:
            return
        decay, measure = self.track_sensitivity
        present = [(k, grad) for k, grad in zip(self._trained, grads, strict=True) if grad is not None]
        with torch.no_grad():
            sensitivity_update_unchecked_(
                [self._pieces[k] for k, _ in present],
                [grad for _, grad in present],
                [self._tensors[k].detach() for k, _ in present],
                decay,
                measure == "fisher",
            )

    def remove(self) -> None:
        """Take the hooks off the tensors (the layout's backward tracks the sensitivity from here)."""
        self._trained = []  # (no hook comes back when tracking is set again)
        self._remove_handles()

    def _remove_handles(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
