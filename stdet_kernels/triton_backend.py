"""Triton kernels of every op, with their launchers.

Imported only when Triton is importable. On a GPU they compile for it; on the CPU they run under
Triton's interpreter (TRITON_INTERPRET=1, set before Triton is first imported), which is how the tests
exercise them. All arithmetic is float32 whatever the storage dtype. The refs gradient is a segmented
reduction by mode: each program writes one partial sum per mode, and the partials are added up
afterwards in a fixed order (deterministic, no float atomics).
"""

import os

import torch
import triton
import triton.language as tl

from .reference import COMPACT_BLOCK, DUMMY, FREE, concatenated

# Compiled kernels may read a module global only when it is a tl.constexpr (the interpreter reads any).
_FREE = tl.constexpr(FREE)
_DUMMY = tl.constexpr(DUMMY)

# Every launch passes enable_fp_fusion=False: the contract is the reference's float32 arithmetic, and a
# compiled kernel would otherwise contract a * ref + b into one FMA (the CUDA backend builds with
# --fmad=false for the same reason; an H100 run found the compact forward off by one ulp).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter costs about 1 ms per program: give each program more work there.
BLOCK = 1 << 16 if INTERPRETED else 1024
# Elements per step of the backward's one-hot reduction, times the padded number of modes.
REDUCE_TILE = 1 << 16 if INTERPRETED else 4096


@triton.jit
def _to_storage(x, dtype: tl.constexpr):
    """float32 -> storage dtype, rounding to nearest even.

    Rounds bfloat16 by hand: Triton's interpreter truncates on that cast. On a GPU the result is the
    same as the hardware conversion's.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _store_weight(w, offsets, mask, out_ptr, sma_ptr, alpha, WITH_AVERAGE: tl.constexpr):
    """Store the reconstructed weight w and, for the fused op, update the average with it."""
    tl.store(out_ptr + offsets, _to_storage(w, out_ptr.dtype.element_ty), mask=mask)
    if WITH_AVERAGE:
        average = tl.load(sma_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        average = average + alpha * (w - average)
        tl.store(sma_ptr + offsets, _to_storage(average, sma_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reconstruct_fwd_kernel(
    value_ptr,
    code_ptr,
    a_ptr,
    b_ptr,
    refs_ptr,
    out_ptr,
    sma_ptr,
    alpha,
    n,
    num_modes,
    WITH_AVERAGE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    code = tl.load(code_ptr + offsets, mask=mask, other=_FREE).to(tl.int32)
    value = tl.load(value_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    ref = tl.load(refs_ptr + code, mask=mask & (code < num_modes), other=0.0)
    w = tl.where(code == _FREE, value, tl.where(code == _DUMMY, b, a * ref + b))
    _store_weight(w, offsets, mask, out_ptr, sma_ptr, alpha, WITH_AVERAGE)


@triton.jit
def _reconstruct_bwd_kernel(
    grad_ptr,
    code_ptr,
    a_ptr,
    grad_value_ptr,
    partials_ptr,
    n,
    num_modes,
    BLOCK: tl.constexpr,
    SUB_BLOCK: tl.constexpr,
    MODES_PAD: tl.constexpr,
):
    block_start = tl.program_id(0).to(tl.int64) * BLOCK
    modes = tl.arange(0, MODES_PAD)
    by_mode = tl.zeros([MODES_PAD], dtype=tl.float32)
    for sub_start in range(0, BLOCK, SUB_BLOCK):
        offsets = block_start + sub_start + tl.arange(0, SUB_BLOCK)
        mask = offsets < n
        code = tl.load(code_ptr + offsets, mask=mask, other=_FREE).to(tl.int32)
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        grad_value = tl.where(code == _FREE, grad, 0.0)
        tl.store(
            grad_value_ptr + offsets, _to_storage(grad_value, grad_value_ptr.dtype.element_ty), mask=mask
        )
        contribution = tl.where(code < _DUMMY, a * grad, 0.0)
        one_hot = code[:, None] == modes[None, :]
        by_mode += tl.sum(tl.where(one_hot, contribution[:, None], 0.0), axis=0)
    tl.store(
        partials_ptr + tl.program_id(0).to(tl.int64) * num_modes + modes,
        by_mode,
        mask=modes < num_modes,
    )


@triton.jit
def _lerp_kernel(
    average_addresses_ptr,
    sample_addresses_ptr,
    sizes_ptr,
    chunk_tensor_ptr,
    chunk_offset_ptr,
    alpha,
    DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Program k updates one chunk of one tensor; tensors are reached through tables of addresses."""
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_tensor_ptr + chunk)
    offsets = tl.load(chunk_offset_ptr + chunk) + tl.arange(0, CHUNK)
    mask = offsets < tl.load(sizes_ptr + tensor)
    average_ptr = tl.load(average_addresses_ptr + tensor).to(tl.pointer_type(DTYPE))
    sample_ptr = tl.load(sample_addresses_ptr + tensor).to(tl.pointer_type(DTYPE))
    average = tl.load(average_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sample = tl.load(sample_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    average = average + alpha * (sample - average)
    tl.store(average_ptr + offsets, _to_storage(average, DTYPE), mask=mask)


def _refs_f32(refs: torch.Tensor) -> torch.Tensor:
    # A kernel needs a valid pointer even when there are no modes.
    return refs.float() if refs.numel() > 0 else torch.zeros(1, device=refs.device)


def _launch_forward(value, code, a, b, refs, sma, alpha, with_average: bool) -> torch.Tensor:
    out = torch.empty_like(value)
    n = value.numel()
    if n == 0:
        return out
    grid = (triton.cdiv(n, BLOCK),)
    _reconstruct_fwd_kernel[grid](
        value,
        code,
        a,
        b,
        _refs_f32(refs),
        out,
        sma if with_average else out,
        float(alpha),
        n,
        refs.numel(),
        WITH_AVERAGE=with_average,
        BLOCK=BLOCK,
        enable_fp_fusion=False,
    )
    return out


def reconstruct(value, code, a, b, refs) -> torch.Tensor:
    return _launch_forward(value, code, a, b, refs, None, 0.0, with_average=False)


def reconstruct_sma_(value, code, a, b, refs, sma, alpha) -> torch.Tensor:
    return _launch_forward(value, code, a, b, refs, sma, alpha, with_average=True)


def reconstruct_backward(grad, code, a, refs) -> tuple[torch.Tensor, torch.Tensor]:
    n = grad.numel()
    num_modes = refs.numel()
    grad_value = torch.empty_like(grad)
    num_programs = triton.cdiv(n, BLOCK)
    partials = torch.zeros((num_programs, max(num_modes, 1)), dtype=torch.float32, device=grad.device)
    if n > 0:
        modes_pad = triton.next_power_of_2(max(num_modes, 1))
        sub_block = max(16, min(BLOCK, REDUCE_TILE // modes_pad))
        _reconstruct_bwd_kernel[(num_programs,)](
            grad,
            code,
            a,
            grad_value,
            partials,
            n,
            num_modes,
            BLOCK=BLOCK,
            SUB_BLOCK=sub_block,
            enable_fp_fusion=False,
            MODES_PAD=modes_pad,
        )
    grad_refs = partials[:, :num_modes].sum(dim=0)
    return grad_value, grad_refs.to(refs.dtype)


_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}
LERP_CHUNK = 1 << 16 if INTERPRETED else 4096


def lerp_(averages: list[torch.Tensor], samples: list[torch.Tensor], alpha: float) -> None:
    """One launch for a list of same-device, same-dtype tensors."""
    if not averages:
        return
    device = averages[0].device
    sizes = [t.numel() for t in averages]
    chunk_tensor, chunk_offset = [], []
    for k, size in enumerate(sizes):
        for start in range(0, size, LERP_CHUNK):
            chunk_tensor.append(k)
            chunk_offset.append(start)
    if not chunk_tensor:
        return
    table = torch.tensor(
        [t.data_ptr() for t in averages]
        + [t.data_ptr() for t in samples]
        + sizes
        + chunk_tensor
        + chunk_offset,
        dtype=torch.int64,
    ).to(device)
    k = len(averages)
    c = len(chunk_tensor)
    _lerp_kernel[(c,)](
        table[:k],
        table[k : 2 * k],
        table[2 * k : 3 * k],
        table[3 * k : 3 * k + c],
        table[3 * k + c :],
        float(alpha),
        DTYPE=_TL_DTYPES[averages[0].dtype],
        CHUNK=LERP_CHUNK,
        enable_fp_fusion=False,
    )


# ---------------------------------------------------------------------------------------------
# Compact layout (see reference.COMPACT_BLOCK): one program per block; slots by an in-block prefix
# count on top of the block's offset.


@triton.jit
def _compact_slots(code, local, block, offsets_ptr, BLOCK: tl.constexpr):
    """(is_free, slot in free_values, slot in a/b) of each element of a block."""
    is_free = code == _FREE
    free_rank = tl.cumsum(is_free.to(tl.int32), axis=0) - is_free.to(tl.int32)
    free_before = tl.load(offsets_ptr + block).to(tl.int64)
    free_slot = free_before + free_rank
    embedded_slot = block.to(tl.int64) * BLOCK - free_before + (local - free_rank)
    return is_free, free_slot, embedded_slot


@triton.jit
def _reconstruct_compact_fwd_kernel(
    free_ptr,
    code_ptr,
    offsets_ptr,
    a_ptr,
    b_ptr,
    refs_ptr,
    out_ptr,
    sma_ptr,
    alpha,
    n,
    num_modes,
    WITH_AVERAGE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    block = tl.program_id(0)
    local = tl.arange(0, BLOCK)
    offsets = block.to(tl.int64) * BLOCK + local
    mask = offsets < n
    code = tl.load(code_ptr + offsets, mask=mask, other=_DUMMY).to(tl.int32)
    is_free, free_slot, embedded_slot = _compact_slots(code, local, block, offsets_ptr, BLOCK)
    embedded = mask & (code != _FREE)
    value = tl.load(free_ptr + free_slot, mask=mask & is_free, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + embedded_slot, mask=embedded, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + embedded_slot, mask=embedded, other=0.0).to(tl.float32)
    ref = tl.load(refs_ptr + code, mask=mask & (code < num_modes), other=0.0)
    w = tl.where(is_free, value, tl.where(code == _DUMMY, b, a * ref + b))
    _store_weight(w, offsets, mask, out_ptr, sma_ptr, alpha, WITH_AVERAGE)


@triton.jit
def _reconstruct_compact_bwd_kernel(
    grad_ptr,
    code_ptr,
    offsets_ptr,
    a_ptr,
    grad_free_ptr,
    partials_ptr,
    free_ptr,
    sensitivity_ptr,
    decay,
    complement,
    mean_ptr,
    moment2_ptr,
    comoment_ptr,
    mode_ptr,
    deviation_ptr,
    num_deviations,
    inv_count,
    n,
    num_modes,
    BLOCK: tl.constexpr,
    MODES_PAD: tl.constexpr,
    WITH_SENSITIVITY: tl.constexpr,
    FISHER: tl.constexpr,
    WITH_REFIT: tl.constexpr,
):
    """The compact backward; with WITH_SENSITIVITY, also the sensitivity's running mean at the FREE
    elements: decay * s + (1 - decay) * score, score = g^2 (FISHER) or |g * v|; ``complement`` is
    1 - decay, computed by the launcher in double and rounded once, as every backend does. With
    WITH_REFIT, also the online refit's snapshot of the FREE values (`reference.refit_update_`:
    ``inv_count`` is 1 / count rounded once, ``num_deviations`` 0 when there are no modes)."""
    block = tl.program_id(0)
    local = tl.arange(0, BLOCK)
    offsets = block.to(tl.int64) * BLOCK + local
    mask = offsets < n
    code = tl.load(code_ptr + offsets, mask=mask, other=_DUMMY).to(tl.int32)
    is_free, free_slot, embedded_slot = _compact_slots(code, local, block, offsets_ptr, BLOCK)
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        grad_free_ptr + free_slot, _to_storage(grad, grad_free_ptr.dtype.element_ty), mask=mask & is_free
    )
    if WITH_SENSITIVITY:
        if FISHER:
            score = grad * grad
        else:
            value = tl.load(free_ptr + free_slot, mask=mask & is_free, other=0.0).to(tl.float32)
            score = tl.abs(grad * value)
        mean = tl.load(sensitivity_ptr + free_slot, mask=mask & is_free, other=0.0)
        mean = decay * mean + complement * score
        tl.store(sensitivity_ptr + free_slot, mean, mask=mask & is_free)
    if WITH_REFIT:
        free = mask & is_free
        w = tl.load(free_ptr + free_slot, mask=free, other=0.0).to(tl.float32)
        old_mean = tl.load(mean_ptr + free_slot, mask=free, other=0.0)
        delta = w - old_mean
        updated = old_mean + delta * inv_count
        tl.store(mean_ptr + free_slot, updated, mask=free)
        moment2 = tl.load(moment2_ptr + free_slot, mask=free, other=0.0)
        tl.store(moment2_ptr + free_slot, moment2 + delta * (w - updated), mask=free)
        if num_deviations > 0:
            mode = tl.load(mode_ptr + free_slot, mask=free, other=0).to(tl.int32)
            deviation = tl.load(deviation_ptr + mode, mask=free & (mode < num_deviations), other=0.0)
            comoment = tl.load(comoment_ptr + free_slot, mask=free, other=0.0)
            tl.store(comoment_ptr + free_slot, comoment + delta * deviation, mask=free)
    a = tl.load(a_ptr + embedded_slot, mask=mask & (code != _FREE), other=0.0).to(tl.float32)
    contribution = tl.where(mask & (code < _DUMMY), a * grad, 0.0)
    modes = tl.arange(0, MODES_PAD)
    one_hot = code[:, None] == modes[None, :]
    by_mode = tl.sum(tl.where(one_hot, contribution[:, None], 0.0), axis=0)
    tl.store(partials_ptr + block.to(tl.int64) * num_modes + modes, by_mode, mask=modes < num_modes)


def _launch_compact_forward(free_values, code, offsets, a, b, refs, sma, alpha, with_average) -> torch.Tensor:
    out = torch.empty(code.shape, dtype=free_values.dtype, device=code.device)
    n = code.numel()
    if n == 0:
        return out
    # Tensors with no element (all FREE, or none FREE) still need a valid pointer.
    free_values = (
        free_values if free_values.numel() else torch.zeros(1, dtype=free_values.dtype, device=code.device)
    )
    a = a if a.numel() else torch.zeros(1, dtype=a.dtype, device=code.device)
    b = b if b.numel() else torch.zeros(1, dtype=b.dtype, device=code.device)
    _reconstruct_compact_fwd_kernel[(offsets.numel() - 1,)](
        free_values,
        code,
        offsets,
        a,
        b,
        _refs_f32(refs),
        out,
        sma if with_average else out,
        float(alpha),
        n,
        refs.numel(),
        WITH_AVERAGE=with_average,
        BLOCK=COMPACT_BLOCK,
        enable_fp_fusion=False,
    )
    return out


def reconstruct_compact(free_values, code, offsets, a, b, refs) -> torch.Tensor:
    return _launch_compact_forward(free_values, code, offsets, a, b, refs, None, 0.0, with_average=False)


def reconstruct_compact_sma_(free_values, code, offsets, a, b, refs, sma, alpha) -> torch.Tensor:
    return _launch_compact_forward(free_values, code, offsets, a, b, refs, sma, alpha, with_average=True)


def _launch_compact_backward(
    grad, code, offsets, a, refs, free_values, sensitivity, decay, fisher, with_sensitivity, refit=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The compact backward's launch; `refit` = (mean, moment2, comoment, mode, ref_deviation, count)
    adds the online refit's snapshot of free_values."""
    n = code.numel()
    num_modes = refs.numel()
    grad_free = torch.empty(n - a.numel(), dtype=grad.dtype, device=grad.device)
    blocks = offsets.numel() - 1
    partials = torch.zeros((blocks, max(num_modes, 1)), dtype=torch.float32, device=grad.device)
    if n > 0:
        # Tensors with no element still need a valid pointer.
        placeholder = torch.zeros(1, dtype=grad.dtype, device=grad.device)
        grad_free_or_placeholder = grad_free if grad_free.numel() else placeholder
        with_refit = refit is not None and free_values.numel() > 0
        if with_refit:
            mean, moment2, comoment, mode, ref_deviation, count = refit
            deviations = ref_deviation if ref_deviation.numel() else partials
            inv_count = float(torch.tensor(1.0 / count, dtype=torch.float32))
        else:
            mean = moment2 = comoment = deviations = partials
            mode, ref_deviation, inv_count = code, partials[:0], 1.0
        uses_values = (with_sensitivity or with_refit) and free_values.numel()
        _reconstruct_compact_bwd_kernel[(blocks,)](
            grad,
            code,
            offsets,
            a if a.numel() else torch.zeros(1, dtype=a.dtype, device=grad.device),
            grad_free_or_placeholder,
            partials,
            free_values if uses_values else grad_free_or_placeholder,
            sensitivity if with_sensitivity and sensitivity.numel() else partials,
            float(decay),
            1.0 - float(decay),
            mean,
            moment2,
            comoment,
            mode,
            deviations,
            ref_deviation.numel(),
            inv_count,
            n,
            num_modes,
            BLOCK=COMPACT_BLOCK,
            enable_fp_fusion=False,
            MODES_PAD=triton.next_power_of_2(max(num_modes, 1)),
            WITH_SENSITIVITY=with_sensitivity,
            FISHER=bool(fisher),
            WITH_REFIT=with_refit,
        )
    return grad_free, partials[:, :num_modes].sum(dim=0).to(refs.dtype)


def reconstruct_compact_backward(grad, code, offsets, a, refs) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_compact_backward(
        grad, code, offsets, a, refs, None, None, 0.0, False, with_sensitivity=False
    )


def reconstruct_compact_backward_sensitivity_(
    grad, free_values, code, offsets, a, refs, sensitivity, decay, fisher
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_compact_backward(
        grad, code, offsets, a, refs, free_values, sensitivity, decay, fisher, with_sensitivity=True
    )


# From the layers' gradients: concatenated first (on a GPU a small share of the backward's time).
def reconstruct_compact_backward_pieces(pieces, sizes, code, offsets, a, refs):
    return reconstruct_compact_backward(concatenated(pieces, sizes, code.shape), code, offsets, a, refs)


def reconstruct_compact_backward_pieces_sensitivity_(
    pieces, sizes, free_values, code, offsets, a, refs, sensitivity, decay, fisher
):
    grad = concatenated(pieces, sizes, code.shape)
    return reconstruct_compact_backward_sensitivity_(
        grad, free_values, code, offsets, a, refs, sensitivity, decay, fisher
    )


def reconstruct_compact_backward_pieces_refit_(
    pieces, sizes, free_values, code, offsets, a, refs, sensitivity, decay, fisher,
    mean, moment2, comoment, mode, ref_deviation, count,
):  # fmt: skip
    """The pieces backward (the sensitivity's when `sensitivity` is not None), and the online
    refit's snapshot of free_values in the same launch."""
    grad = concatenated(pieces, sizes, code.shape)
    refit = (mean, moment2, comoment, mode, ref_deviation, count)
    return _launch_compact_backward(
        grad, code, offsets, a, refs, free_values, sensitivity, decay, fisher,
        with_sensitivity=sensitivity is not None, refit=refit,
    )  # fmt: skip
