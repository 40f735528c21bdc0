"""The reconstruction ops on the compact layout, which makes training state smaller, not larger.

The dense layout keeps a full-size trainable ``value`` plus full-size ``a``, ``b`` next to each
weight. The compact one keeps, per tensor:

- ``code`` (uint8, the weight's shape): as in the dense layout;
- ``free_values`` (1-D): the FREE elements' values, in element order: the only trainable storage;
- ``a``, ``b`` (1-D): the other elements' coefficients, in element order, in any float dtype
  (16-bit halves their cost);
- ``offsets`` (int32, one per block of COMPACT_BLOCK elements, plus the total): FREE elements before
  each block. A kernel finds an element's slot from its block's offset plus a count inside the block,
  so no index is stored per element. `pack` builds all of it from the dense tensors.

Same contract as `stdet_kernels.reconstruct`: float32 arithmetic, gradients to ``free_values`` and
``refs``, the same four backends.

The backward can also update STDET's sensitivity estimate in the same pass over memory: given a
``sensitivity`` (float32, one entry per FREE element, in free_values' order), the forward saves it and
its backward runs `reconstruct_compact_backward_sensitivity_` instead of the plain backward.

`reconstruct_compact_pieces` returns the same weight as views of pieces of given sizes (a model's
layers, laid end to end), and its backward reads the pieces' gradients where autograd left them:
one pass over memory, where a flat gradient would first be a concatenation of them.
"""

import math
import numbers

import torch
from torch import Tensor

from .backends import select
from .ops import (
    FLOAT_DTYPES,
    MAX_MODES,
    CheckCache,
    RefitSnapshot,
    _check_alpha,
    _check_dtype,
    _check_tensor,
    check_code_modes,
    check_refit,
    check_tensor_lists,
    run_grouped,
    run_kernel,
    written_in_place,
)
from .reference import COMPACT_BLOCK, compact_offsets, pack, unpack

__all__ = [
    "COMPACT_BLOCK",
    "compact_offsets",
    "pack",
    "reconstruct_compact",
    "reconstruct_compact_backward_sensitivity_",
    "reconstruct_compact_pieces",
    "reconstruct_compact_sma_",
    "unpack",
]

MEASURES = ("taylor", "fisher")
# The sensitivity's defaults, those of STDETConfig: |g * v| with a running mean of decay 0.9 per step.
DEFAULT_MEASURE = "taylor"
DEFAULT_DECAY = 0.9

_checked_layouts = CheckCache()


def _check_args(
    free_values: Tensor, code: Tensor, offsets: Tensor, a: Tensor, b: Tensor | None, refs: Tensor
) -> None:
    """The layout's checks; ``b=None`` for the backward, which has no b."""
    named = [("free_values", free_values), ("code", code), ("offsets", offsets), ("a", a), ("refs", refs)]
    if b is not None:
        named.insert(4, ("b", b))
    for name, t in named:
        _check_tensor(name, t)
    _check_dtype("free_values", free_values, FLOAT_DTYPES)
    _check_dtype("code", code, (torch.uint8,))
    _check_dtype("offsets", offsets, (torch.int32,))
    _check_dtype("a", a, FLOAT_DTYPES)
    _check_dtype("refs", refs, FLOAT_DTYPES)
    if b is not None and b.dtype != a.dtype:
        raise TypeError(f"b: expected dtype {a.dtype} (the dtype of a), got {b.dtype}")
    for name, t in named:
        if name == "code":
            continue
        if t.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor, got {t.dim()}-D")
        if t.device != code.device:
            raise ValueError(f"{name}: expected device {code.device} (the device of code), got {t.device}")
    blocks = -(-code.numel() // COMPACT_BLOCK)
    if offsets.numel() != blocks + 1:
        raise ValueError(
            f"offsets: expected {blocks + 1} entries for {code.numel()} elements, got {offsets.numel()}"
        )
    if b is None and free_values.numel() + a.numel() != code.numel():
        raise ValueError(
            f"free_values, a: expected {code.numel()} elements between them, "
            f"got {free_values.numel()}, {a.numel()}"
        )
    if b is not None and (free_values.numel() + a.numel() != code.numel() or b.numel() != a.numel()):
        raise ValueError(
            f"free_values, a, b: expected {code.numel()} elements between free_values and a "
            f"(and b as many as a), got {free_values.numel()}, {a.numel()}, {b.numel()}"
        )
    if refs.numel() > MAX_MODES:
        raise ValueError(f"refs: at most {MAX_MODES} modes (codes 0..253), got {refs.numel()}")


def _eager(code: Tensor) -> bool:
    """Whether the pieces path calls its kernels' bodies directly rather than through their custom
    ops: in eager mode with plain tensors (not under torch.compile, which traces the ops, nor on
    fake tensors, nor under a dispatch mode such as make_fx's). The dispatcher's round trip costs
    25-55 us per call on a CPU, and in a training step, caches cold, 0.1 ms in the forward and
    0.25 ms in the backward of the small factorized model: about what its kernels take."""
    if torch.compiler.is_compiling():
        return False
    return type(code) is Tensor and torch._C._len_torch_dispatch_stack() == 0  # (no dispatch mode)


def _check_layout(code: Tensor, offsets: Tensor, free_count: int) -> None:
    """offsets must be those of code, and free_values hold one value per FREE code: kernels trust
    offsets for their memory accesses (cached per version of code and offsets)."""
    if _checked_layouts.passed(code, (offsets,), token=free_count):
        return
    expected = compact_offsets(code)
    if not torch.equal(offsets, expected):
        raise ValueError(
            "offsets: do not match code (rebuild them with compact_offsets(code) after changing code)"
        )
    if int(expected[-1]) != free_count:
        raise ValueError(
            f"free_values: expected {int(expected[-1])} values (one per FREE code), got {free_count}"
        )
    _checked_layouts.remember(code, (offsets,), token=free_count)


def _check_decay(decay: object) -> float:
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(f"decay: expected a real number, got {type(decay).__name__}")
    decay = float(decay)
    if not math.isfinite(decay) or not 0.0 <= decay < 1.0:
        raise ValueError(f"decay: expected a number in [0, 1), got {decay}")
    return decay


def _check_sensitivity(sensitivity: object, free_values: Tensor, decay: object, measure: object) -> float:
    """The sensitivity target: float32, one entry per FREE element, on free_values' device, not a
    tensor autograd tracks (the backward writes it). Returns decay as a float."""
    _check_tensor("sensitivity", sensitivity)
    _check_dtype("sensitivity", sensitivity, (torch.float32,))
    if sensitivity.dim() != 1 or sensitivity.numel() != free_values.numel():
        raise ValueError(
            f"sensitivity: expected a 1-D tensor of {free_values.numel()} elements (one per FREE "
            f"element, like free_values), got shape {tuple(sensitivity.shape)}"
        )
    if sensitivity.device != free_values.device:
        raise ValueError(
            f"sensitivity: expected device {free_values.device} (the device of free_values), "
            f"got {sensitivity.device}"
        )
    if sensitivity.requires_grad:
        raise ValueError("sensitivity: expected a tensor that does not require grad (a buffer)")
    if not isinstance(measure, str):
        raise TypeError(f"measure: expected a str, got {type(measure).__name__}")
    if measure not in MEASURES:
        raise ValueError(f"measure: expected one of {MEASURES}, got {measure!r}")
    return _check_decay(decay)


def _check_average(sma: object, alpha: object, free_values: Tensor, code: Tensor) -> float:
    """The SMA average (dense: code's shape, free_values' dtype, code's device); returns alpha."""
    _check_tensor("sma", sma)
    if sma.shape != code.shape or sma.dtype != free_values.dtype or sma.device != code.device:
        raise ValueError(
            f"sma: expected shape {tuple(code.shape)}, dtype {free_values.dtype} and device {code.device}, "
            f"got {tuple(sma.shape)}, {sma.dtype}, {sma.device}"
        )
    return _check_alpha(alpha)


@torch.library.custom_op("stdet::reconstruct_compact", mutates_args=())
def _reconstruct_compact_op(
    free_values: Tensor,
    code: Tensor,
    offsets: Tensor,
    a: Tensor,
    b: Tensor,
    refs: Tensor,
    sensitivity: Tensor | None = None,
    decay: float = DEFAULT_DECAY,
    measure: str = DEFAULT_MEASURE,
) -> Tensor:
    """The forward ignores ``sensitivity, decay, measure``: they are for its backward."""
    return _reconstruct_compact_kernel(free_values, code, offsets, a, b, refs)


def _reconstruct_compact_kernel(
    free_values: Tensor, code: Tensor, offsets: Tensor, a: Tensor, b: Tensor, refs: Tensor
) -> Tensor:
    """stdet::reconstruct_compact's body (its checks cached per version of code and offsets)."""
    check_code_modes(code, refs.numel())
    _check_layout(code, offsets, free_values.numel())
    return run_kernel("reconstruct_compact", code.device, (free_values, code, offsets, a, b, refs))


@_reconstruct_compact_op.register_fake
def _(free_values, code, offsets, a, b, refs, sensitivity=None, decay=DEFAULT_DECAY, measure=DEFAULT_MEASURE):
    return free_values.new_empty(code.shape)


@torch.library.custom_op("stdet::reconstruct_compact_backward", mutates_args=())
def _reconstruct_compact_backward_op(
    grad: Tensor, code: Tensor, offsets: Tensor, a: Tensor, refs: Tensor
) -> tuple[Tensor, Tensor]:
    return run_kernel("reconstruct_compact_backward", grad.device, (grad, code, offsets, a, refs))


@_reconstruct_compact_backward_op.register_fake
def _(grad, code, offsets, a, refs):
    return grad.new_empty(code.numel() - a.numel()), refs.new_empty(refs.shape)


@torch.library.custom_op("stdet::reconstruct_compact_backward_sensitivity_", mutates_args=("sensitivity",))
def _reconstruct_compact_backward_sensitivity_op(
    grad: Tensor,
    free_values: Tensor,
    code: Tensor,
    offsets: Tensor,
    a: Tensor,
    refs: Tensor,
    sensitivity: Tensor,
    decay: float,
    measure: str,
) -> tuple[Tensor, Tensor]:
    check_code_modes(code, refs.numel())
    _check_layout(code, offsets, free_values.numel())
    tensors = (grad, free_values, code, offsets, a, refs)
    fisher = measure == "fisher"
    op = "reconstruct_compact_backward_sensitivity_"
    return run_kernel(op, grad.device, tensors, sensitivity, decay, fisher)


@_reconstruct_compact_backward_sensitivity_op.register_fake
def _(grad, free_values, code, offsets, a, refs, sensitivity, decay, measure):
    return grad.new_empty(code.numel() - a.numel()), refs.new_empty(refs.shape)


@torch.library.custom_op(
    "stdet::reconstruct_compact_backward_pieces_refit_",
    mutates_args=("sensitivity", "mean", "moment2", "comoment"),
)
def _reconstruct_compact_backward_pieces_refit_op(
    pieces: list[Tensor],
    sizes: list[int],
    free_values: Tensor,
    code: Tensor,
    offsets: Tensor,
    a: Tensor,
    refs: Tensor,
    sensitivity: Tensor | None,
    decay: float,
    measure: str,
    mean: Tensor,
    moment2: Tensor,
    comoment: Tensor,
    element_mode: Tensor,  # (not "mode": torch's fake-mode dispatch takes that keyword)
    ref_deviation: Tensor,
    count: int,
) -> tuple[Tensor, Tensor]:
    """The pieces backward (the sensitivity's when given) and, in the same pass, the online refit's
    snapshot of free_values: `refit_update_`'s arithmetic on the FREE elements."""
    refit = (mean, moment2, comoment, element_mode, ref_deviation, count)
    return _pieces_backward_kernel(pieces, sizes, free_values, code, offsets, a, refs, sensitivity, decay,
                                   measure, refit)  # fmt: skip


@_reconstruct_compact_backward_pieces_refit_op.register_fake
def _(pieces, sizes, free_values, code, offsets, a, refs, sensitivity, decay, measure, mean, moment2,
      comoment, element_mode, ref_deviation, count):  # fmt: skip
    return free_values.new_empty(free_values.shape), refs.new_empty(refs.shape)


def _compact_backward(
    grad,
    free_values: Tensor | None,
    layout,
    sensitivity,
    decay,
    measure,
    sizes: list[int] | None = None,
    refit: RefitSnapshot | None = None,
):
    """(dL/dfree_values, dL/drefs), by the fused op when a sensitivity target was given; `grad` is
    dL/dw, or with `sizes` the list of its pieces (the pieces ops read them in place). With `refit`
    (pieces only), the refit's snapshot in the same pass, and the snapshot marked done."""
    code, offsets, a, refs = layout
    if sizes is None and refit is None:
        if sensitivity is None:
            return _reconstruct_compact_backward_op(grad, code, offsets, a, refs)
        return _reconstruct_compact_backward_sensitivity_op(
            grad, free_values, code, offsets, a, refs, sensitivity, decay, measure
        )
    refit_arguments = None if refit is None else refit.arguments()
    if sizes is not None and _eager(code):
        result = _pieces_backward_kernel(
            grad, sizes, free_values, *layout, sensitivity, decay, measure, refit_arguments
        )
        written = () if refit is None else refit_arguments[:3]
        for tensor in written if sensitivity is None else (*written, sensitivity):
            torch.autograd.graph.increment_version(tensor)  # (what the ops' dispatch does for a mutation)
    elif refit is not None:
        result = _reconstruct_compact_backward_pieces_refit_op(
            grad, sizes, free_values, *layout, sensitivity, decay, measure, *refit_arguments
        )
    elif sensitivity is None:
        result = _reconstruct_compact_backward_pieces_op(grad, sizes, *layout)
    else:
        result = _reconstruct_compact_backward_pieces_sensitivity_op(
            grad, sizes, free_values, *layout, sensitivity, decay, measure
        )
    if refit is not None:
        refit.done = True
    return result


def _save_for_backward(
    ctx, free_values, code, offsets, a, refs, sensitivity, decay, measure, refit=None
) -> None:
    """free_values is saved only for the sensitivity's score and the refit's snapshot. The sensitivity
    and the refit's moments are kept on ctx, not saved: they are running state that each backward
    writes, so autograd's check that a saved tensor is unchanged would refuse two forwards before one
    backward."""
    if sensitivity is None and refit is None:
        ctx.save_for_backward(code, offsets, a, refs)
    else:
        ctx.save_for_backward(code, offsets, a, refs, free_values)
    ctx.sensitivity, ctx.decay, ctx.measure, ctx.refit = sensitivity, decay, measure, refit


def _saved_backward(ctx, grad, sizes: list[int] | None = None):
    code, offsets, a, refs, *free_values = ctx.saved_tensors
    layout = (code, offsets, a, refs)
    free_values = free_values[0] if free_values else None
    refit, ctx.refit = ctx.refit, None  # one snapshot, even if the graph is run backward again
    return _compact_backward(grad, free_values, layout, ctx.sensitivity, ctx.decay, ctx.measure, sizes, refit)


def _setup_context(ctx, inputs, output) -> None:
    free_values, code, offsets, a, _, refs, sensitivity, decay, measure = inputs
    _save_for_backward(ctx, free_values, code, offsets, a, refs, sensitivity, decay, measure)


def _backward(ctx, grad: Tensor):
    grad_free, grad_refs = _saved_backward(ctx, grad)
    return grad_free, None, None, None, None, grad_refs, None, None, None


_reconstruct_compact_op.register_autograd(_backward, setup_context=_setup_context)


def _pieces(pieces: list[Tensor], sizes: list[int]) -> tuple[list[Tensor], list[int]]:
    """`run_kernel`'s leading arguments of a pieces backward: the gradients, contiguous (an empty
    piece of nonzero size reads as zeros), and their sizes."""
    return [p.contiguous() for p in pieces], list(sizes)


def _pieces_backward_kernel(
    pieces: list[Tensor],
    sizes: list[int],
    free_values: Tensor | None,
    code: Tensor,
    offsets: Tensor,
    a: Tensor,
    refs: Tensor,
    sensitivity: Tensor | None = None,
    decay: float = DEFAULT_DECAY,
    measure: str = DEFAULT_MEASURE,
    refit: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """The body of the three pieces backward ops: plain, with the sensitivity's update (`sensitivity`
    given), with the refit's snapshot (`refit`: its moments, modes, deviations and count)."""
    if refit is None and sensitivity is None:
        op = "reconstruct_compact_backward_pieces"
        return run_kernel(op, code.device, (code, offsets, a, refs), leading=_pieces(pieces, sizes))
    check_code_modes(code, refs.numel())
    _check_layout(code, offsets, free_values.numel())
    fisher = measure == "fisher"
    if refit is None:
        op = "reconstruct_compact_backward_pieces_sensitivity_"
        tensors = (free_values, code, offsets, a, refs)
        leading = _pieces(pieces, sizes)
        return run_kernel(op, code.device, tensors, sensitivity, decay, fisher, leading=leading)
    mean, moment2, comoment, element_mode, ref_deviation, count = refit
    kernel = select(code.device, "reconstruct_compact_backward_pieces_refit_")
    pieces, sizes = _pieces(pieces, sizes)
    written = (mean, moment2, comoment) if sensitivity is None else (sensitivity, mean, moment2, comoment)
    with written_in_place(*written) as (*running, mean, moment2, comoment):
        return kernel(
            pieces, sizes, free_values.contiguous(), code.contiguous(), offsets.contiguous(),
            a.contiguous(), refs.contiguous(), running[0] if running else None, decay, fisher, mean,
            moment2, comoment, element_mode.contiguous(), ref_deviation.contiguous(), count,
        )  # fmt: skip


@torch.library.custom_op("stdet::reconstruct_compact_backward_pieces", mutates_args=())
def _reconstruct_compact_backward_pieces_op(
    pieces: list[Tensor], sizes: list[int], code: Tensor, offsets: Tensor, a: Tensor, refs: Tensor
) -> tuple[Tensor, Tensor]:
    return _pieces_backward_kernel(pieces, sizes, None, code, offsets, a, refs)


@_reconstruct_compact_backward_pieces_op.register_fake
def _(pieces, sizes, code, offsets, a, refs):
    dtype = next(p.dtype for p in pieces if p.numel())
    return code.new_empty(code.numel() - a.numel(), dtype=dtype), refs.new_empty(refs.shape)


@torch.library.custom_op(
    "stdet::reconstruct_compact_backward_pieces_sensitivity_", mutates_args=("sensitivity",)
)
def _reconstruct_compact_backward_pieces_sensitivity_op(
    pieces: list[Tensor],
    sizes: list[int],
    free_values: Tensor,
    code: Tensor,
    offsets: Tensor,
    a: Tensor,
    refs: Tensor,
    sensitivity: Tensor,
    decay: float,
    measure: str,
) -> tuple[Tensor, Tensor]:
    layout = (code, offsets, a, refs)
    return _pieces_backward_kernel(pieces, sizes, free_values, *layout, sensitivity, decay, measure)


@_reconstruct_compact_backward_pieces_sensitivity_op.register_fake
def _(pieces, sizes, free_values, code, offsets, a, refs, sensitivity, decay, measure):
    return free_values.new_empty(free_values.shape), refs.new_empty(refs.shape)


def _pieces_forward(free_values, code, offsets, a, b, refs, sizes, shapes, sma, alpha) -> tuple[Tensor, ...]:
    """The pieces of the weight, each viewed as its shape. With every element FREE and no SMA
    update due (a layout after STDET released it), the weight is free_values itself: views of it, no
    pass over memory."""
    if sma is None and free_values.numel() == code.numel():
        flat = free_values
    elif sma is None:
        run = _reconstruct_compact_kernel if _eager(code) else _reconstruct_compact_op
        flat = run(free_values, code, offsets, a, b, refs)
    elif _eager(code):
        flat = _reconstruct_compact_sma_kernel(free_values, code, offsets, a, b, refs, sma, alpha)
        torch.autograd.graph.increment_version(sma)  # (what the op's dispatch does for a mutation)
    else:
        flat = _reconstruct_compact_sma_op(free_values, code, offsets, a, b, refs, sma, alpha)
    pieces = flat.split_with_sizes(sizes)
    if shapes is None:
        return tuple(pieces)
    return tuple(piece.view(shape) for piece, shape in zip(pieces, shapes, strict=True))


class _ReconstructCompactPieces(torch.autograd.Function):
    """The fused forward (with the SMA update when an average is given) split into views, and the
    backward from the views' gradients in place."""

    @staticmethod
    def forward(ctx, free_values, code, offsets, a, b, refs, sizes, shapes, sma, alpha, sensitivity,
                decay, measure, reference_index, refit):  # fmt: skip
        ctx.set_materialize_grads(False)  # a view with no gradient reads as zeros, not a zero tensor
        _save_for_backward(ctx, free_values, code, offsets, a, refs, sensitivity, decay, measure, refit)
        ctx.sizes, ctx.reference_index, ctx.refs_dtype = sizes, reference_index, refs.dtype
        ctx.dtype = free_values.dtype
        return _pieces_forward(free_values, code, offsets, a, b, refs, sizes, shapes, sma, alpha)

    @staticmethod
    def backward(ctx, *grads):
        sizes = ctx.sizes
        given = next((g for g in grads if g is not None and g.numel()), None)
        if given is None:  # only views of no elements got gradients: the flat gradient is zeros
            code = ctx.saved_tensors[0]
            pieces, sizes = [code.new_zeros(code.numel(), dtype=ctx.dtype)], [code.numel()]
        else:
            empty = given.new_empty(0)
            pieces = [empty if g is None else g.reshape(-1) for g in grads]
        grad_free, grad_refs = _saved_backward(ctx, pieces, sizes)
        if ctx.reference_index is not None:
            grad_refs = _elements_of(grads, ctx.sizes, ctx.reference_index).to(ctx.refs_dtype)
        return grad_free, None, None, None, None, grad_refs, *(None,) * 9


def _elements_of(grads: tuple[Tensor | None, ...], sizes: list[int], index: Tensor) -> Tensor:
    """The flat gradient at elements `index` (each in range), read from the pieces' gradients (0
    where a piece got none): per piece, a gather of the indices inside it; no host sync."""
    like = next((g for g in grads if g is not None), None)
    if like is None:
        return index.new_zeros(index.shape, dtype=torch.float32)
    result = like.new_zeros(index.shape, dtype=torch.float32)
    start = 0
    for g, size in zip(grads, sizes, strict=True):
        if g is not None and size > 0:
            local = index - start
            inside = (local >= 0) & (local < size)
            values = g.reshape(-1)[local.clamp(0, size - 1)].float()
            result = torch.where(inside, values, result)
        start += size
    return result


def _reconstruct_compact_sma_kernel(
    free_values: Tensor,
    code: Tensor,
    offsets: Tensor,
    a: Tensor,
    b: Tensor,
    refs: Tensor,
    sma: Tensor,
    alpha: float,
) -> Tensor:
    """stdet::reconstruct_compact_sma_'s body (called directly by the eager pieces path)."""
    check_code_modes(code, refs.numel())
    _check_layout(code, offsets, free_values.numel())
    tensors = (free_values, code, offsets, a, b, refs)
    return run_kernel("reconstruct_compact_sma_", code.device, tensors, sma, alpha)


_reconstruct_compact_sma_op = torch.library.custom_op(
    "stdet::reconstruct_compact_sma_", _reconstruct_compact_sma_kernel, mutates_args=("sma",)
)


@_reconstruct_compact_sma_op.register_fake
def _(free_values, code, offsets, a, b, refs, sma, alpha):
    return free_values.new_empty(code.shape)


class _ReconstructCompactSMA(torch.autograd.Function):
    """Autograd of the fused op (torch.library registers autograd only for functional ops)."""

    @staticmethod
    def forward(ctx, free_values, code, offsets, a, b, refs, sma, alpha, sensitivity, decay, measure):
        _save_for_backward(ctx, free_values, code, offsets, a, refs, sensitivity, decay, measure)
        return _reconstruct_compact_sma_op(free_values, code, offsets, a, b, refs, sma, alpha)

    @staticmethod
    def backward(ctx, grad):
        grad_free, grad_refs = _saved_backward(ctx, grad)
        return grad_free, None, None, None, None, grad_refs, None, None, None, None, None


def reconstruct_compact(
    free_values: Tensor,
    code: Tensor,
    offsets: Tensor,
    a: Tensor,
    b: Tensor,
    refs: Tensor,
    *,
    sensitivity: Tensor | None = None,
    decay: float = DEFAULT_DECAY,
    measure: str = DEFAULT_MEASURE,
) -> Tensor:
    """The weight (code's shape, free_values' dtype) from the compact layout; differentiable with
    respect to ``free_values`` and ``refs``.

    With ``sensitivity`` (float32, one entry per FREE element), the backward also updates it in place,
    in the same pass: ``sensitivity = decay * sensitivity + (1 - decay) * score``, score ``|g * v|``
    (measure "taylor") or ``g * g`` ("fisher"); see `reconstruct_compact_backward_sensitivity_`.
    """
    _check_args(free_values, code, offsets, a, b, refs)
    if sensitivity is None:
        return _reconstruct_compact_op(free_values, code, offsets, a, b, refs)
    decay = _check_sensitivity(sensitivity, free_values, decay, measure)
    return _reconstruct_compact_op(free_values, code, offsets, a, b, refs, sensitivity, decay, measure)


def reconstruct_compact_sma_(
    free_values: Tensor,
    code: Tensor,
    offsets: Tensor,
    a: Tensor,
    b: Tensor,
    refs: Tensor,
    sma: Tensor,
    alpha: float,
    *,
    sensitivity: Tensor | None = None,
    decay: float = DEFAULT_DECAY,
    measure: str = DEFAULT_MEASURE,
) -> Tensor:
    """`reconstruct_compact`, and ``sma += alpha * (w - sma)`` in the same pass; ``sma`` is dense
    (code's shape, free_values' dtype). ``sensitivity, decay, measure`` as in `reconstruct_compact`."""
    _check_args(free_values, code, offsets, a, b, refs)
    alpha = _check_average(sma, alpha, free_values, code)
    if sensitivity is not None:
        decay = _check_sensitivity(sensitivity, free_values, decay, measure)
    if torch.is_grad_enabled() and (free_values.requires_grad or refs.requires_grad):
        return _ReconstructCompactSMA.apply(
            free_values, code, offsets, a, b, refs, sma, alpha, sensitivity, decay, measure
        )
    return _reconstruct_compact_sma_op(free_values, code, offsets, a, b, refs, sma, alpha)


def reconstruct_compact_pieces(
    free_values: Tensor,
    code: Tensor,
    offsets: Tensor,
    a: Tensor,
    b: Tensor,
    refs: Tensor,
    sizes: list[int],
    *,
    shapes: list[tuple[int, ...]] | None = None,
    sma: Tensor | None = None,
    alpha: float = 1.0,
    sensitivity: Tensor | None = None,
    decay: float = DEFAULT_DECAY,
    measure: str = DEFAULT_MEASURE,
    reference_index: Tensor | None = None,
    refit: RefitSnapshot | None = None,
) -> tuple[Tensor, ...]:
    """`reconstruct_compact` (`reconstruct_compact_sma_` when `sma` is given) as the views of
    consecutive pieces of `sizes` elements: a model's layers laid end to end; 1-D, or each viewed as
    its entry of `shapes` (made inside the op: no view node per layer in the backward).

    The backward reads the views' gradients in place (C++; the other backends concatenate them
    first), so a model's layers cost one pass over their gradients, not a concatenation and then a
    pass. With `reference_index` (flat element per mode: METHOD.md's ``ref_grad="own"``) each mode's
    reference gets that element's gradient instead of its mode's whole gradient. `sensitivity`,
    `decay`, `measure` as in `reconstruct_compact`. With `refit` (its arrays one entry per FREE
    element), the backward also adds the online refit's snapshot of free_values as it reads them
    (`refit_update_`'s arithmetic), in the same pass, and marks the snapshot taken, then done; without
    a backward (gradients off) the snapshot is left as it is.
    """
    _check_args(free_values, code, offsets, a, b, refs)
    sizes = [int(size) for size in sizes]
    if any(size < 0 for size in sizes) or sum(sizes) != code.numel():
        raise ValueError(f"sizes: expected sizes of no less than 0 adding up to {code.numel()}, got {sizes}")
    if shapes is not None:
        shapes = [tuple(shape) for shape in shapes]
        if len(shapes) != len(sizes) or any(math.prod(s) != n for s, n in zip(shapes, sizes, strict=False)):
            raise ValueError(f"shapes: expected one shape of each piece's size {sizes}, got {shapes}")
    if sma is not None:
        alpha = _check_average(sma, alpha, free_values, code)
    if sensitivity is not None:
        decay = _check_sensitivity(sensitivity, free_values, decay, measure)
    if reference_index is not None:
        _check_tensor("reference_index", reference_index)
        if reference_index.dtype != torch.int64 or reference_index.shape != (refs.numel(),):
            raise ValueError(
                f"reference_index: expected {refs.numel()} int64 flat indices (one per mode), got "
                f"shape {tuple(reference_index.shape)} of {reference_index.dtype}"
            )
        if not torch.compiler.is_compiling() and reference_index.numel():
            low, high = int(reference_index.min()), int(reference_index.max())
            if low < 0 or high >= code.numel():
                raise ValueError(
                    f"reference_index: expected indices in [0, {code.numel()}), got {low}..{high}"
                )
    if not torch.compiler.is_compiling():  # (the ops check again, where they run; cached: no cost)
        check_code_modes(code, refs.numel())
        _check_layout(code, offsets, free_values.numel())
    if refit is not None:
        if not isinstance(refit, RefitSnapshot):
            raise TypeError(f"refit: expected a stdet_kernels.RefitSnapshot, got {type(refit).__name__}")
        if refit.taken:
            raise ValueError("refit: this snapshot was already taken by another forward")
        check_refit(free_values.detach(), *refit.arguments())
        if refit.mean.device != code.device:
            raise ValueError(f"refit: expected its tensors on {code.device}, got {refit.mean.device}")
    if not (torch.is_grad_enabled() and (free_values.requires_grad or refs.requires_grad)):
        return _pieces_forward(free_values, code, offsets, a, b, refs, sizes, shapes, sma, alpha)
    if refit is not None:
        refit.taken = True
    return _ReconstructCompactPieces.apply(
        free_values, code, offsets, a, b, refs, sizes, shapes, sma, alpha, sensitivity, decay, measure,
        reference_index, refit,
    )  # fmt: skip


def reconstruct_compact_backward_sensitivity_(
    grad: Tensor,
    free_values: Tensor,
    code: Tensor,
    offsets: Tensor,
    a: Tensor,
    refs: Tensor,
    sensitivity: Tensor,
    decay: float,
    measure: str = DEFAULT_MEASURE,
) -> tuple[Tensor, Tensor]:
    """The backward of `reconstruct_compact`, ``(dL/dfree_values, dL/drefs)`` from ``grad = dL/dw``, and
    in the same pass over memory STDET's sensitivity at each FREE element, in place:
    ``sensitivity = decay * sensitivity + (1 - decay) * score``, where score is ``|g * v|`` (measure
    "taylor", first-order saliency) or ``g * g`` ("fisher"), g the element's gradient and v its value.

    grad has code's shape and free_values' dtype; sensitivity is float32 with one entry per FREE
    element (free_values' order); decay is in [0, 1). Arithmetic is float32.
    """
    _check_args(free_values, code, offsets, a, None, refs)
    _check_tensor("grad", grad)
    if grad.dtype != free_values.dtype:
        raise TypeError(
            f"grad: expected dtype {free_values.dtype} (the dtype of free_values), got {grad.dtype}"
        )
    if grad.shape != code.shape or grad.device != code.device:
        raise ValueError(
            f"grad: expected shape {tuple(code.shape)} and device {code.device} (those of code), "
            f"got {tuple(grad.shape)}, {grad.device}"
        )
    decay = _check_sensitivity(sensitivity, free_values, decay, measure)
    return _reconstruct_compact_backward_sensitivity_op(
        grad, free_values, code, offsets, a, refs, sensitivity, decay, measure
    )


@torch.library.custom_op("stdet::sensitivity_update_", mutates_args=("sensitivities",))
def _sensitivity_update_op(
    grads: list[Tensor], values: list[Tensor], sensitivities: list[Tensor], decay: float, fisher: bool
) -> None:
    run_grouped("sensitivity_update_", (grads, values, sensitivities), 2, decay, fisher)


@_sensitivity_update_op.register_fake
def _(grads, values, sensitivities, decay, fisher) -> None:
    return None


def check_sensitivity_update(
    sensitivities: list[Tensor], grads: list[Tensor], values: list[Tensor], measure: str = DEFAULT_MEASURE
) -> None:
    """The checks of `sensitivity_update_` but for decay's: also what gradient hooks run once when
    registered (a gradient has its tensor's shape, dtype and device, so the tensors stand in for it)."""
    check_tensor_lists(("sensitivities", sensitivities), ("grads", grads), ("values", values))
    if not len(sensitivities) == len(grads) == len(values):
        raise ValueError(
            f"grads, values: expected {len(sensitivities)} tensors each (one per sensitivity), got "
            f"{len(grads)} and {len(values)}"
        )
    for k, (sensitivity, grad, value) in enumerate(zip(sensitivities, grads, values, strict=True)):
        _check_tensor(f"grads[{k}]", grad)
        _check_tensor(f"values[{k}]", value)
        _check_tensor(f"sensitivities[{k}]", sensitivity)
        _check_dtype(f"grads[{k}]", grad, FLOAT_DTYPES)
        _check_dtype(f"sensitivities[{k}]", sensitivity, (torch.float32,))
        for name, t in ((f"values[{k}]", value), (f"sensitivities[{k}]", sensitivity)):
            if t.shape != grad.shape or t.device != grad.device:
                raise ValueError(
                    f"{name}: expected shape {tuple(grad.shape)} on {grad.device} (those of grads[{k}]), "
                    f"got {tuple(t.shape)} on {t.device}"
                )
        if value.dtype != grad.dtype:
            raise TypeError(
                f"values[{k}]: expected dtype {grad.dtype} (that of grads[{k}]), got {value.dtype}"
            )
        if sensitivity.requires_grad:
            raise ValueError(f"sensitivities[{k}]: expected a tensor that does not require grad (a buffer)")
    if not isinstance(measure, str):
        raise TypeError(f"measure: expected a str, got {type(measure).__name__}")
    if measure not in MEASURES:
        raise ValueError(f"measure: expected one of {MEASURES}, got {measure!r}")


def sensitivity_update_(
    sensitivities: list[Tensor],
    grads: list[Tensor],
    values: list[Tensor],
    decay: float,
    measure: str = DEFAULT_MEASURE,
) -> None:
    """STDET's sensitivity at every element of dense tensors, in place, one launch for all of them:
    ``sensitivities[k] = decay * sensitivities[k] + (1 - decay) * score`` with score ``|g * v|``
    ("taylor") or ``g * g`` ("fisher") of ``grads[k]`` and ``values[k]``, the arithmetic of
    `reconstruct_compact_backward_sensitivity_` at its FREE elements. For a model's layers before it
    is laid out (`stdet.sensitivity`: one gradient hook over all of them).

    ``grads[k]`` and ``values[k]`` share shape, dtype and device; ``sensitivities[k]`` is float32 of
    their shape and device, and not a tensor autograd tracks.
    """
    check_sensitivity_update(sensitivities, grads, values, measure)
    decay = _check_decay(decay)
    if grads:
        values = [value.detach() for value in values]
        _sensitivity_update_op(list(grads), values, list(sensitivities), decay, measure == "fisher")


def sensitivity_update_unchecked_(
    sensitivities: list[Tensor], grads: list[Tensor], values: list[Tensor], decay: float, fisher: bool
) -> None:
    """`sensitivity_update_` without the checks and, in eager mode, the custom op's dispatch: for
    gradient hooks whose tensors were checked once when they were registered
    (`check_sensitivity_update`). Called in every backward, the checks of mbt2018-mean's 28 layers
    cost about as much as the kernel (2 CPU threads). Under torch.compile (compiled autograd traces
    the hooks) it is the custom op, which the tracer can take."""
    if torch.compiler.is_compiling():
        _sensitivity_update_op(list(grads), list(values), list(sensitivities), decay, fisher)
        return
    run_grouped("sensitivity_update_", (grads, values, sensitivities), 2, decay, fisher)
