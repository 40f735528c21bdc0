"""STDET's sensitivity before the model is attached: hooks on the layers' own tensors.

From the end of the warm-up to the first round every element is FREE, so STDET leaves the model as
it is (its layers' own tensors, each trained by the user's optimizer as in plain training) and attaches
the flat layout only when the first round embeds something. The sensitivity of the window before
that round is kept here: gradient hooks add each backward's scores to a running mean (one fused
update for all the tensors, at the backward's end), with the element's value at backward time and
that backward's own gradient, as the fused backward does once attached (so under DDP, too, each rank
sees its own share of the batch until the round averages them).
"""

from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.graph import _get_grad_fn_or_grad_acc

from stdet_kernels.compact import check_sensitivity_update, sensitivity_update_unchecked_


class HookedSensitivity:
    """A running mean of each element's score (``|g * w|``, "taylor", or ``g * g``, "fisher"), over
    every element of `tensors` laid end to end, updated in each backward by gradient hooks while
    `track_sensitivity` is (decay, measure); the same two attributes as `stdet.layout.FlatLayout`'s.

    One launch per backward, whatever the number of layers: a hook per tensor notes that its
    gradient arrived, and the update runs once, when the backward ends, reading the gradients from
    ``.grad``. Holding the gradients until then instead would make autograd copy each into ``.grad``
    rather than hand it over: on mbt2018-mean (2 CPU threads) that copy cost 4.7 ms per backward, more
    than the update itself. A gradient is held only where ``.grad`` will not be this backward's own:
    an earlier gradient is in it (accumulation), the backward writes none (``torch.autograd.grad``),
    or DDP may average it in place (torch.distributed). Under compiled autograd, which traces the
    hooks, each updates its tensor at once.

    A hook per tensor that updates at once (`per_tensor`) keeps each gradient in cache, but on a GPU
    it is a launch per layer. The hooks are registered only while `track_sensitivity` is set (the
    window before a round); outside it a backward is plain training's.
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
        # This backward's (graph task's) arrivals: (tensor index, its gradient if held, else None).
        self._task: int | None = None
        self._arrived: list[tuple[int, Tensor | None]] = []
        self._hold = False
        if self.per_tensor:  # (a frozen tensor gets no gradient: its sensitivity stays 0)
            self._register(self._update_one)

    @property
    def track_sensitivity(self) -> tuple[float, str] | None:
        """(decay, measure) while the backward updates the sensitivity, else None."""
        return self._tracking

    @track_sensitivity.setter
    def track_sensitivity(self, tracking: tuple[float, str] | None) -> None:
        self._tracking = tracking
        if self.per_tensor:
            return
        if tracking is not None and not self._handles:
            self._register(self._arrive)
        elif tracking is None:
            self._remove_handles()

    def _register(self, hook: Callable[[int, Tensor], None]) -> None:
        self._handles = [self._tensors[k].register_hook(partial(hook, k)) for k in self._trained]

    def _update_one(self, k: int, grad: Tensor) -> None:
        """One tensor's gradient hook (`per_tensor`, and under compiled autograd): its scores into
        the running means, one pass."""
        if self.track_sensitivity is None:
            return
        decay, measure = self.track_sensitivity
        with torch.no_grad():
            tensor = self._tensors[k].detach()
            sensitivity_update_unchecked_([self._pieces[k]], [grad], [tensor], decay, measure == "fisher")

    def _arrive(self, k: int, grad: Tensor) -> None:
        """Tensor `k`'s gradient has arrived: note it (and hold it where ``.grad`` will not be it),
        and on a backward's first arrival have the engine call `_backward_done` at its end."""
        if torch.compiler.is_compiling():  # compiled autograd traces the hooks: no engine callback
            self._update_one(k, grad)
            return
        task = torch._C._current_graph_task_id()
        if task != self._task:  # (an arrival of a backward that failed is dropped here)
            self._task, self._arrived = task, []
            self._hold = _writes_no_own_grad(self._tensors[k])
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
        held = self._hold or self._tensors[k].grad is not None
        self._arrived.append((k, grad if held else None))

    def _backward_done(self) -> None:
        """The backward has ended (values still those it saw): every score into the running means,
        one launch."""
        arrived, self._arrived, self._task = self._arrived, [], None
        if self.track_sensitivity is None or not arrived:
            return
        grads = [self._tensors[k].grad if grad is None else grad for k, grad in arrived]
        missing = [
            tuple(self._tensors[k].shape) for (k, _), grad in zip(arrived, grads, strict=True) if grad is None
        ]
        if missing:  # a hook of the user's took .grad away (an optimizer step in the backward)
            raise RuntimeError(
                "stdet: the sensitivity reads the gradients from .grad at the backward's end, but "
                f"{len(missing)} tensor(s) have none there (the first of shape {missing[0]}); a hook "
                "that steps the optimizer in the backward and clears .grad is not supported before "
                "the first embedding round"
            )
        decay, measure = self.track_sensitivity
        with torch.no_grad():
            sensitivity_update_unchecked_(
                [self._pieces[k] for k, _ in arrived],
                grads,
                [self._tensors[k].detach() for k, _ in arrived],
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


def _writes_no_own_grad(tensor: Tensor) -> bool:
    """Whether, at the end of the running backward, a tensor's ``.grad`` may not hold the gradient
    that backward computed (beyond an earlier one in it, which the caller checks per tensor)."""
    if dist.is_available() and dist.is_initialized():
        return True  # DDP may average .grad in place
    try:  # raises under torch.autograd.grad, which writes no .grad
        torch._C._will_engine_execute_node(_get_grad_fn_or_grad_acc(tensor))
    except RuntimeError:
        return True
    return False
