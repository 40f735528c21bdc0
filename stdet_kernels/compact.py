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
"""

import torch
from torch import Tensor

from .ops import (
    FLOAT_DTYPES,
    MAX_MODES,
    CheckCache,
    _check_alpha,
    _check_dtype,
    _check_tensor,
    check_code_modes,
    run_kernel,
)
from .reference import COMPACT_BLOCK, compact_offsets, pack, unpack

__all__ = [
    "COMPACT_BLOCK",
    "compact_offsets",
    "pack",
    "reconstruct_compact",
    "reconstruct_compact_sma_",
    "unpack",
]

_checked_layouts = CheckCache()


def _check_args(
    free_values: Tensor, code: Tensor, offsets: Tensor, a: Tensor, b: Tensor, refs: Tensor
) -> None:
    for name, t in (
        ("free_values", free_values),
        ("code", code),
        ("offsets", offsets),
        ("a", a),
        ("b", b),
        ("refs", refs),
    ):
        _check_tensor(name, t)
    _check_dtype("free_values", free_values, FLOAT_DTYPES)
    _check_dtype("code", code, (torch.uint8,))
    _check_dtype("offsets", offsets, (torch.int32,))
    _check_dtype("a", a, FLOAT_DTYPES)
    _check_dtype("refs", refs, FLOAT_DTYPES)
    if b.dtype != a.dtype:
        raise TypeError(f"b: expected dtype {a.dtype} (the dtype of a), got {b.dtype}")
    for name, t in (("free_values", free_values), ("offsets", offsets), ("a", a), ("b", b), ("refs", refs)):
        if t.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor, got {t.dim()}-D")
        if t.device != code.device:
            raise ValueError(f"{name}: expected device {code.device} (the device of code), got {t.device}")
    blocks = -(-code.numel() // COMPACT_BLOCK)
    if offsets.numel() != blocks + 1:
        raise ValueError(
            f"offsets: expected {blocks + 1} entries for {code.numel()} elements, got {offsets.numel()}"
        )
    if free_values.numel() + a.numel() != code.numel() or b.numel() != a.numel():
        raise ValueError(
            f"free_values, a, b: expected {code.numel()} elements between free_values and a "
            f"(and b as many as a), got {free_values.numel()}, {a.numel()}, {b.numel()}"
        )
    if refs.numel() > MAX_MODES:
        raise ValueError(f"refs: at most {MAX_MODES} modes (codes 0..253), got {refs.numel()}")


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


@torch.library.custom_op("stdet::reconstruct_compact", mutates_args=())
def _reconstruct_compact_op(
    free_values: Tensor, code: Tensor, offsets: Tensor, a: Tensor, b: Tensor, refs: Tensor
) -> Tensor:
    check_code_modes(code, refs.numel())
    _check_layout(code, offsets, free_values.numel())
    return run_kernel("reconstruct_compact", code.device, (free_values, code, offsets, a, b, refs))


@_reconstruct_compact_op.register_fake
def _(free_values, code, offsets, a, b, refs):
    return free_values.new_empty(code.shape)


@torch.library.custom_op("stdet::reconstruct_compact_backward", mutates_args=())
def _reconstruct_compact_backward_op(
    grad: Tensor, code: Tensor, offsets: Tensor, a: Tensor, refs: Tensor
) -> tuple[Tensor, Tensor]:
    return run_kernel("reconstruct_compact_backward", grad.device, (grad, code, offsets, a, refs))


@_reconstruct_compact_backward_op.register_fake
def _(grad, code, offsets, a, refs):
    return grad.new_empty(code.numel() - a.numel()), refs.new_empty(refs.shape)


def _setup_context(ctx, inputs, output) -> None:
    _, code, offsets, a, _, refs = inputs
    ctx.save_for_backward(code, offsets, a, refs)


def _backward(ctx, grad: Tensor):
    code, offsets, a, refs = ctx.saved_tensors
    grad_free, grad_refs = _reconstruct_compact_backward_op(grad, code, offsets, a, refs)
    return grad_free, None, None, None, None, grad_refs


_reconstruct_compact_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("stdet::reconstruct_compact_sma_", mutates_args=("sma",))
def _reconstruct_compact_sma_op(
    free_values: Tensor,
    code: Tensor,
    offsets: Tensor,
    a: Tensor,
    b: Tensor,
    refs: Tensor,
    sma: Tensor,
    alpha: float,
) -> Tensor:
    check_code_modes(code, refs.numel())
    _check_layout(code, offsets, free_values.numel())
    tensors = (free_values, code, offsets, a, b, refs)
    return run_kernel("reconstruct_compact_sma_", code.device, tensors, sma, alpha)


@_reconstruct_compact_sma_op.register_fake
def _(free_values, code, offsets, a, b, refs, sma, alpha):
    return free_values.new_empty(code.shape)


class _ReconstructCompactSMA(torch.autograd.Function):
    """Autograd of the fused op (torch.library registers autograd only for functional ops)."""

    @staticmethod
    def forward(ctx, free_values, code, offsets, a, b, refs, sma, alpha):
        ctx.save_for_backward(code, offsets, a, refs)
        return _reconstruct_compact_sma_op(free_values, code, offsets, a, b, refs, sma, alpha)

    @staticmethod
    def backward(ctx, grad):
        code, offsets, a, refs = ctx.saved_tensors
        grad_free, grad_refs = _reconstruct_compact_backward_op(grad, code, offsets, a, refs)
        return grad_free, None, None, None, None, grad_refs, None, None


def reconstruct_compact(
    free_values: Tensor, code: Tensor, offsets: Tensor, a: Tensor, b: Tensor, refs: Tensor
) -> Tensor:
    """The weight (code's shape, free_values' dtype) from the compact layout; differentiable with
    respect to ``free_values`` and ``refs``."""
    _check_args(free_values, code, offsets, a, b, refs)
    return _reconstruct_compact_op(free_values, code, offsets, a, b, refs)


def reconstruct_compact_sma_(
    free_values: Tensor,
    code: Tensor,
    offsets: Tensor,
    a: Tensor,
    b: Tensor,
    refs: Tensor,
    sma: Tensor,
    alpha: float,
) -> Tensor:
    """`reconstruct_compact`, and ``sma += alpha * (w - sma)`` in the same pass; ``sma`` is dense
    (code's shape, free_values' dtype)."""
    _check_args(free_values, code, offsets, a, b, refs)
    _check_tensor("sma", sma)
    if sma.shape != code.shape or sma.dtype != free_values.dtype or sma.device != code.device:
        raise ValueError(
            f"sma: expected shape {tuple(code.shape)}, dtype {free_values.dtype} and device {code.device}, "
            f"got {tuple(sma.shape)}, {sma.dtype}, {sma.device}"
        )
    alpha = _check_alpha(alpha)
    if torch.is_grad_enabled() and (free_values.requires_grad or refs.requires_grad):
        return _ReconstructCompactSMA.apply(free_values, code, offsets, a, b, refs, sma, alpha)
    return _reconstruct_compact_sma_op(free_values, code, offsets, a, b, refs, sma, alpha)
