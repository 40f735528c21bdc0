"""The public ops: argument checks, `torch.library` registration, autograd.

Each op is one `torch.library.custom_op` in namespace ``stdet`` with a fake kernel (so it traces under
`torch.compile(fullgraph=True)`) and a real kernel that hands contiguous tensors to the backend chosen
by `backends.select`. Checks that need only shapes and dtypes run in the public functions (also while
tracing); the check of the codes' values runs in the real kernel, once per version of a `code` tensor.
"""

import contextlib
import dataclasses
import math
import numbers
import weakref

import torch
from torch import Tensor

from .backends import select
from .reference import DUMMY, FREE

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LERP_DTYPES = (*FLOAT_DTYPES, torch.float64)
MAX_MODES = DUMMY  # codes 0..253 name modes


# ---------------------------------------------------------------------------------------------
# Argument checks


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _check_dtype(name: str, t: Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name}: expected dtype {names}, got {str(t.dtype).removeprefix('torch.')}")


def _check_like(name: str, t: Tensor, like_name: str, like: Tensor, dtype: bool = True) -> None:
    """t must have the shape, device (and dtype) of `like`."""
    if t.shape != like.shape:
        raise ValueError(
            f"{name}: expected shape {tuple(like.shape)} (the shape of {like_name}), got {tuple(t.shape)}"
        )
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (the device of {like_name}), got {t.device}")
    if dtype and t.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype} (the dtype of {like_name}), got {t.dtype}")


def _check_reconstruct_args(value: Tensor, code: Tensor, a: Tensor, b: Tensor, refs: Tensor) -> None:
    for name, t in (("value", value), ("code", code), ("a", a), ("b", b), ("refs", refs)):
        _check_tensor(name, t)
    _check_dtype("value", value, FLOAT_DTYPES)
    _check_dtype("code", code, (torch.uint8,))
    _check_dtype("refs", refs, FLOAT_DTYPES)
    _check_like("code", code, "value", value, dtype=False)
    _check_like("a", a, "value", value)
    _check_like("b", b, "value", value)
    if refs.dim() != 1:
        raise ValueError(f"refs: expected a 1-D tensor (one scalar per mode), got {refs.dim()}-D")
    if refs.numel() > MAX_MODES:
        raise ValueError(f"refs: at most {MAX_MODES} modes (codes 0..253), got {refs.numel()}")
    if refs.device != value.device:
        raise ValueError(f"refs: expected device {value.device} (the device of value), got {refs.device}")


def _check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha: expected a real number, got {type(alpha).__name__}")
    alpha = float(alpha)
    if not math.isfinite(alpha) or not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha: expected a finite number in (0, 1], got {alpha}")
    return alpha


def _version(t: Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


class CheckCache:
    """Remembers which tensors passed a value check, at which version and with which companions, so
    a check costs a pass over memory when a tensor (or a new version of it) is first seen and nothing
    after: codes change only at embedding rounds while the ops run every step. Holds weak references
    only."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple] = {}

    @staticmethod
    def _key(tensor: Tensor, companions: tuple[Tensor, ...], token: object) -> tuple | None:
        versions = [_version(t) for t in (tensor, *companions)]
        if any(v is None for v in versions):
            return None
        return (tuple(versions), token)

    def passed(self, tensor: Tensor, companions: tuple[Tensor, ...] = (), token: object = None) -> bool:
        entry = self._entries.get(id(tensor))
        if entry is None:
            return False
        refs, key = entry
        same_objects = all(r() is t for r, t in zip(refs, (tensor, *companions), strict=False))
        return (
            same_objects and len(refs) == 1 + len(companions) and key == self._key(tensor, companions, token)
        )

    def remember(self, tensor: Tensor, companions: tuple[Tensor, ...] = (), token: object = None) -> None:
        key = self._key(tensor, companions, token)
        if key is None:
            return
        if len(self._entries) > 4096:
            self._entries.clear()
        self._entries[id(tensor)] = (tuple(weakref.ref(t) for t in (tensor, *companions)), key)


_checked_codes = CheckCache()
_checked_modes = CheckCache()


def check_code_modes(code: Tensor, num_modes: int) -> None:
    """Every embedded code must name a mode that refs has (cached per version of `code`)."""
    if _checked_codes.passed(code, token=num_modes):
        return
    invalid = (code >= num_modes) & (code < DUMMY)
    if bool(invalid.any()):
        bad = int(code[invalid][0])
        raise ValueError(
            f"code: value {bad} names mode {bad}, but refs has {num_modes} modes "
            f"(valid codes: 0..{num_modes - 1}, {DUMMY} = DUMMY, {FREE} = FREE)"
        )
    _checked_codes.remember(code, token=num_modes)


def _check_modes(mode: Tensor, num_modes: int) -> None:
    """Every element's mode must be one of the `num_modes` (cached per version of `mode`)."""
    if _checked_modes.passed(mode, token=num_modes):
        return
    if mode.numel() and int(mode.max()) >= num_modes:
        raise ValueError(f"mode: expected modes below {num_modes}, got {int(mode.max())}")
    _checked_modes.remember(mode, token=num_modes)


@contextlib.contextmanager
def written_in_place(*tensors: Tensor):
    """Contiguous stand-ins for tensors a kernel writes in place (each tensor itself where it is
    contiguous); on leaving the block, a stand-in that is a copy is written back to its tensor."""
    contiguous = tuple(t.contiguous() for t in tensors)
    yield contiguous
    for given, written in zip(tensors, contiguous, strict=True):
        if written is not given:
            given.copy_(written)


def run_kernel(
    op: str,
    device: torch.device,
    tensors: tuple[Tensor, ...],
    updated: Tensor | None = None,
    *scalars,
    leading: tuple = (),
):
    """Run backend kernel `op` on contiguous `tensors`, then (for an op that writes a tensor in
    place: the SMA average, the sensitivity) ``updated`` and the op's `scalars`; an `updated` that had
    to be copied to be contiguous is written back. `leading` arguments go first, as given (the
    pieces backward's list of gradients and their sizes)."""
    kernel = select(device, op)
    contiguous = tuple(t.contiguous() for t in tensors)
    if updated is None:
        return kernel(*leading, *contiguous, *scalars)
    with written_in_place(updated) as (updated_contiguous,):
        return kernel(*leading, *contiguous, updated_contiguous, *scalars)


# ---------------------------------------------------------------------------------------------
# Operators


@torch.library.custom_op("stdet::reconstruct", mutates_args=())
def _reconstruct_op(value: Tensor, code: Tensor, a: Tensor, b: Tensor, refs: Tensor) -> Tensor:
    check_code_modes(code, refs.numel())
    return run_kernel("reconstruct", value.device, (value, code, a, b, refs))


@_reconstruct_op.register_fake
def _(value: Tensor, code: Tensor, a: Tensor, b: Tensor, refs: Tensor) -> Tensor:
    return value.new_empty(value.shape)


@torch.library.custom_op("stdet::reconstruct_backward", mutates_args=())
def _reconstruct_backward_op(grad: Tensor, code: Tensor, a: Tensor, refs: Tensor) -> tuple[Tensor, Tensor]:
    return run_kernel("reconstruct_backward", grad.device, (grad, code, a, refs))


@_reconstruct_backward_op.register_fake
def _(grad: Tensor, code: Tensor, a: Tensor, refs: Tensor) -> tuple[Tensor, Tensor]:
    return grad.new_empty(grad.shape), refs.new_empty(refs.shape)


def _reconstruct_setup_context(ctx, inputs, output) -> None:
    _, code, a, _, refs = inputs
    ctx.save_for_backward(code, a, refs)


def _reconstruct_backward(ctx, grad: Tensor):
    code, a, refs = ctx.saved_tensors
    grad_value, grad_refs = _reconstruct_backward_op(grad, code, a, refs)
    return grad_value, None, None, None, grad_refs


_reconstruct_op.register_autograd(_reconstruct_backward, setup_context=_reconstruct_setup_context)


@torch.library.custom_op("stdet::reconstruct_sma_", mutates_args=("sma",))
def _reconstruct_sma_op(
    value: Tensor, code: Tensor, a: Tensor, b: Tensor, refs: Tensor, sma: Tensor, alpha: float
) -> Tensor:
    check_code_modes(code, refs.numel())
    return run_kernel("reconstruct_sma_", value.device, (value, code, a, b, refs), sma, alpha)


@_reconstruct_sma_op.register_fake
def _(value: Tensor, code: Tensor, a: Tensor, b: Tensor, refs: Tensor, sma: Tensor, alpha: float):
    return value.new_empty(value.shape)


class _ReconstructSMA(torch.autograd.Function):
    """Autograd for the fused op: `torch.library` registers autograd only for functional ops, and this
    one writes `sma`. The gradient is the reconstruction's; `sma` gets none."""

    @staticmethod
    def forward(ctx, value, code, a, b, refs, sma, alpha):
        ctx.save_for_backward(code, a, refs)
        return _reconstruct_sma_op(value, code, a, b, refs, sma, alpha)

    @staticmethod
    def backward(ctx, grad):
        code, a, refs = ctx.saved_tensors
        grad_value, grad_refs = _reconstruct_backward_op(grad, code, a, refs)
        return grad_value, None, None, None, grad_refs, None, None


def run_grouped(op: str, lists: tuple[list[Tensor], ...], updated: int, *scalars) -> None:
    """Run multi-tensor backend kernel `op` once per (device, dtype) group of the first list's
    tensors, on contiguous tensors (the lists in the kernel's order, then `scalars`); the list at
    position `updated` is written in place, copied back where it had to be made contiguous."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for k, tensor in enumerate(lists[0]):
        groups.setdefault((tensor.device, tensor.dtype), []).append(k)
    for (device, _), members in groups.items():
        arguments = [[seq[k].contiguous() for k in members] for seq in lists]
        select(device, op)(*arguments, *scalars)
        for k, written in zip(members, arguments[updated], strict=True):
            if written is not lists[updated][k]:
                lists[updated][k].copy_(written)


def check_tensor_lists(*named: tuple[str, object]) -> None:
    """Each (name, argument) must be a list (or tuple) of tensors' container."""
    for name, seq in named:
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name}: expected a list of tensors, got {type(seq).__name__}")


@torch.library.custom_op("stdet::lerp_", mutates_args=("averages",))
def _lerp_op(averages: list[Tensor], samples: list[Tensor], alpha: float) -> None:
    run_grouped("lerp_", (averages, samples), 0, alpha)


@_lerp_op.register_fake
def _(averages: list[Tensor], samples: list[Tensor], alpha: float) -> None:
    return None


# ---------------------------------------------------------------------------------------------
# Public functional API


def reconstruct(value: Tensor, code: Tensor, a: Tensor, b: Tensor, refs: Tensor) -> Tensor:
    """The weight of METHOD.md: ``value`` where FREE, ``b`` where DUMMY, ``a * refs[code] + b`` where
    embedded.

    value, code, a, b share one shape (any); value, a, b share one float dtype (float32, float16 or
    bfloat16), code is uint8, refs is 1-D with one scalar per mode. Arithmetic is float32; the result
    has value's dtype. Differentiable with respect to ``value`` and ``refs``.
    """
    _check_reconstruct_args(value, code, a, b, refs)
    return _reconstruct_op(value, code, a, b, refs)


def reconstruct_sma_(
    value: Tensor, code: Tensor, a: Tensor, b: Tensor, refs: Tensor, sma: Tensor, alpha: float
) -> Tensor:
    """`reconstruct`, and in the same pass over memory the SMA update ``sma += alpha * (w - sma)``.

    ``sma`` has value's shape, dtype and device and is updated in place; alpha is in (0, 1].
    Differentiable with respect to ``value`` and ``refs`` like `reconstruct`.
    """
    _check_reconstruct_args(value, code, a, b, refs)
    _check_tensor("sma", sma)
    _check_like("sma", sma, "value", value)
    alpha = _check_alpha(alpha)
    if torch.is_grad_enabled() and (value.requires_grad or refs.requires_grad):
        return _ReconstructSMA.apply(value, code, a, b, refs, sma, alpha)
    return _reconstruct_sma_op(value, code, a, b, refs, sma, alpha)


def lerp_(averages: list[Tensor], samples: list[Tensor], alpha: float) -> None:
    """``averages[k] += alpha * (samples[k] - averages[k])`` for every k, in place.

    For the tensors that are not parametrized (entropy models, GDN, ...). One kernel launch per
    (device, dtype) group, not per tensor. Each sample has its average's shape, dtype and device.
    """
    check_tensor_lists(("averages", averages), ("samples", samples))
    if len(averages) != len(samples):
        raise ValueError(f"samples: expected {len(averages)} tensors (one per average), got {len(samples)}")
    for k, (average, sample) in enumerate(zip(averages, samples, strict=True)):
        _check_tensor(f"averages[{k}]", average)
        _check_tensor(f"samples[{k}]", sample)
        _check_dtype(f"averages[{k}]", average, LERP_DTYPES)
        _check_like(f"samples[{k}]", sample, f"averages[{k}]", average)
    alpha = _check_alpha(alpha)
    if averages:
        _lerp_op(list(averages), list(samples), alpha)


@torch.library.custom_op("stdet::refit_update_", mutates_args=("mean", "moment2", "comoment"))
def _refit_update_op(
    values: Tensor,
    mean: Tensor,
    moment2: Tensor,
    comoment: Tensor,
    element_mode: Tensor,  # (not "mode": torch's fake-mode dispatch takes that keyword)
    ref_deviation: Tensor,
    count: int,
) -> None:
    with written_in_place(mean, moment2, comoment) as moments:
        select(values.device, "refit_update_")(
            values.contiguous(), *moments, element_mode.contiguous(), ref_deviation.contiguous(), count
        )


@_refit_update_op.register_fake
def _(values, mean, moment2, comoment, element_mode, ref_deviation, count) -> None:
    return None


def refit_update_(
    values: Tensor,
    mean: Tensor,
    moment2: Tensor,
    comoment: Tensor,
    mode: Tensor,
    ref_deviation: Tensor,
    count: int,
) -> None:
    """One snapshot into the online refit's running moments (Welford), in place, in one pass:
    ``delta = values - mean``; ``mean += delta * (1 / count)``; ``moment2 += delta * (values - mean)``;
    ``comoment += delta * ref_deviation[mode]`` where there are modes (``ref_deviation`` not empty).

    `values`: the tracked elements' values (float32, bfloat16 or float16; arithmetic is float32);
    `mean`, `moment2`, `comoment`: float32 of values' shape; `mode`: uint8 of values' shape, each
    element's mode (< the number of modes); `ref_deviation`: float32, each reference's value minus
    its updated mean; `count`: the number of snapshots, this one included. The C++ backend makes one
    pass over memory where the torch reference (every other device) makes one per operation.
    """
    count = check_refit(values, mean, moment2, comoment, mode, ref_deviation, count)
    _refit_update_op(values, mean, moment2, comoment, mode, ref_deviation, count)


@dataclasses.dataclass
class RefitSnapshot:
    """An online refit's snapshot to take in the next training backward (`reconstruct_compact_pieces`'s
    `refit`): the arguments of `refit_update_` but the values, which are the layout's FREE values as
    that backward reads them. `taken` is set by the forward that hands it to its backward, `done` by
    that backward once the moments are updated: a snapshot taken but not done (no backward ran) is
    left to its owner to add another way."""

    mean: Tensor
    moment2: Tensor
    comoment: Tensor
    mode: Tensor
    ref_deviation: Tensor
    count: int
    taken: bool = False
    done: bool = False

    def arguments(self) -> tuple:
        """(mean, moment2, comoment, mode, ref_deviation, count), `refit_update_`'s order."""
        return self.mean, self.moment2, self.comoment, self.mode, self.ref_deviation, self.count


def check_refit(
    values: Tensor,
    mean: Tensor,
    moment2: Tensor,
    comoment: Tensor,
    mode: Tensor,
    ref_deviation: Tensor,
    count: int,
) -> int:
    """`refit_update_`'s checks (the modes' range only outside torch.compile); returns count."""
    for name, t in (("values", values), ("mean", mean), ("moment2", moment2), ("comoment", comoment),
                    ("mode", mode), ("ref_deviation", ref_deviation)):  # fmt: skip
        _check_tensor(name, t)
    _check_dtype("values", values, FLOAT_DTYPES)
    for name, t in (("mean", mean), ("moment2", moment2), ("comoment", comoment)):
        _check_dtype(name, t, (torch.float32,))
        _check_like(name, t, "values", values, dtype=False)
    _check_dtype("mode", mode, (torch.uint8,))
    _check_like("mode", mode, "values", values, dtype=False)
    _check_dtype("ref_deviation", ref_deviation, (torch.float32,))
    if ref_deviation.dim() != 1 or ref_deviation.device != values.device:
        raise ValueError(
            f"ref_deviation: expected a 1-D tensor on {values.device} (one entry per mode), got shape "
            f"{tuple(ref_deviation.shape)} on {ref_deviation.device}"
        )
    if ref_deviation.numel() > MAX_MODES:
        raise ValueError(f"ref_deviation: expected at most {MAX_MODES} modes, got {ref_deviation.numel()}")
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
        raise ValueError(f"count: expected an integer of at least 1, got {count!r}")
    if ref_deviation.numel() and not torch.compiler.is_compiling():
        _check_modes(mode, ref_deviation.numel())
    return int(count)
