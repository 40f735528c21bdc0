"""The pure-PyTorch reference of every op: the spec in code, written for clarity, not speed.

It is also the `torch` backend, the fallback wherever no compiled or Triton backend applies.
Notation (METHOD.md): `code[i]` is a mode 0..253, DUMMY (254) or FREE (255);
w = value (FREE), b (DUMMY), a * refs[code] + b (embedded). Arithmetic is float32 unless
`upcast=False`, which computes in the inputs' own dtype the way plain PyTorch code would (tests use it
to judge 16-bit results).
"""

import torch

FREE = 255
DUMMY = 254


def _masks(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    free = code == FREE
    dummy = code == DUMMY
    embedded = ~(free | dummy)
    return free, dummy, embedded


def reconstruct(
    value: torch.Tensor,
    code: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    refs: torch.Tensor,
    upcast: bool = True,
) -> torch.Tensor:
    """w = value where FREE, b where DUMMY, a * refs[code] + b where embedded."""
    return _reconstruct_in(torch.float32 if upcast else value.dtype, value, code, a, b, refs).to(value.dtype)


def _reconstruct_in(
    compute_dtype: torch.dtype,
    value: torch.Tensor,
    code: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    refs: torch.Tensor,
) -> torch.Tensor:
    free, dummy, embedded = _masks(code)
    mode = torch.where(embedded, code, 0).long()
    refs_c = refs.to(compute_dtype)
    ref = refs_c[mode] if refs.numel() > 0 else torch.zeros_like(value, dtype=compute_dtype)
    value_c, a_c, b_c = (t.to(compute_dtype) for t in (value, a, b))
    return torch.where(free, value_c, torch.where(dummy, b_c, a_c * ref + b_c))


def reconstruct_sma_(
    value: torch.Tensor,
    code: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    refs: torch.Tensor,
    sma: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """reconstruct(), and the SMA update sma += alpha * (w - sma) in place.

    All in float32: the average takes the float32 w, before w is rounded to the output dtype.
    """
    w = _reconstruct_in(torch.float32, value, code, a, b, refs)
    average = sma.float()
    sma.copy_(average + alpha * (w - average))
    return w.to(value.dtype)


def reconstruct_backward(
    grad: torch.Tensor, code: torch.Tensor, a: torch.Tensor, refs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dvalue, dL/drefs): grad where FREE (0 elsewhere); per mode m, sum of a * grad over code == m.

    Arithmetic in float32 (float64 for float64 inputs, which the tests use as the exact result).
    """
    compute_dtype = torch.promote_types(grad.dtype, torch.float32)
    free, _, embedded = _masks(code)
    grad_c = grad.to(compute_dtype)
    grad_value = torch.where(free, grad_c, 0.0).to(grad.dtype)
    contribution = torch.where(embedded, a.to(compute_dtype) * grad_c, 0.0).flatten()
    mode = torch.where(embedded, code, 0).long().flatten()
    grad_refs = torch.zeros(refs.numel(), dtype=compute_dtype, device=grad.device)
    if refs.numel() > 0:
        grad_refs.index_add_(0, mode, contribution)
    return grad_value, grad_refs.to(refs.dtype)


def refit_update_(
    values: torch.Tensor,
    mean: torch.Tensor,
    moment2: torch.Tensor,
    comoment: torch.Tensor,
    mode: torch.Tensor,
    ref_deviation: torch.Tensor,
    count: int,
) -> None:
    """One snapshot into the online refit's running moments (Welford), in place, float32:
    ``delta = values - mean``, ``mean += delta * (1 / count)``, ``moment2 += delta * (values - mean)``
    and, with modes (``ref_deviation`` not empty), ``comoment += delta * ref_deviation[mode]``, where
    ``ref_deviation`` is each reference's value minus its own updated mean. Each product and each sum
    rounded once, in this order."""
    w = values.float()
    delta = w - mean
    mean.add_(delta * (1.0 / count))
    moment2.add_(delta * (w - mean))
    if ref_deviation.numel():
        comoment.add_(delta * ref_deviation[mode.long()])


def lerp_(averages: list[torch.Tensor], samples: list[torch.Tensor], alpha: float) -> None:
    """averages[k] += alpha * (samples[k] - averages[k]) for every k (float32 arithmetic)."""
    for average, sample in zip(averages, samples, strict=True):
        average_f32 = average.float()
        average.copy_(average_f32 + alpha * (sample.float() - average_f32))


# ---------------------------------------------------------------------------------------------
# Compact layout: only FREE elements store a trainable value, only embedded (non-FREE) elements
# store coefficients. Element i's slot is its rank among the FREE (or the non-FREE) elements. Kernels
# find it from `offsets`, the number of FREE elements before each block of COMPACT_BLOCK elements,
# plus a prefix count inside the block: no stored index per element.

COMPACT_BLOCK = 1024


def compact_offsets(code: torch.Tensor) -> torch.Tensor:
    """int32 ``(blocks + 1,)``: FREE elements before each block of COMPACT_BLOCK; the last entry is
    the total number of FREE elements."""
    free = (code.reshape(-1) == FREE).int()
    blocks = -(-free.numel() // COMPACT_BLOCK)
    padded = torch.zeros(blocks * COMPACT_BLOCK, dtype=torch.int32, device=code.device)
    padded[: free.numel()] = free
    counts = padded.view(blocks, COMPACT_BLOCK).sum(dim=1)
    return torch.cat([torch.zeros(1, dtype=torch.int64, device=code.device), counts.cumsum(0)]).int()


def pack(
    value: torch.Tensor, code: torch.Tensor, a: torch.Tensor, b: torch.Tensor, coefficient_dtype=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense (value, a, b) -> compact (free_values, offsets, a, b); coefficients optionally cast."""
    free = code.reshape(-1) == FREE
    dtype = coefficient_dtype or a.dtype
    return (
        value.reshape(-1)[free].clone(),
        compact_offsets(code),
        a.reshape(-1)[~free].to(dtype),
        b.reshape(-1)[~free].to(dtype),
    )


def unpack(
    free_values: torch.Tensor, code: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compact -> dense (value, a, b) of code's shape; 0 where a tensor holds nothing."""
    free = code.reshape(-1) == FREE
    dense = []
    for stored, where in ((free_values, free), (a, ~free), (b, ~free)):
        full = torch.zeros(code.numel(), dtype=stored.dtype, device=stored.device)
        full[where] = stored
        dense.append(full.view(code.shape))
    return dense[0], dense[1], dense[2]


def reconstruct_compact(
    free_values: torch.Tensor,
    code: torch.Tensor,
    offsets: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    refs: torch.Tensor,
    upcast: bool = True,
) -> torch.Tensor:
    """`reconstruct` of the compact layout: the weight, shaped like `code`, in free_values' dtype.

    The reference finds slots by a global prefix count and ignores `offsets` (a kernel's shortcut).
    """
    value, dense_a, dense_b = unpack(free_values, code, a, b)
    compute_dtype = torch.float32 if upcast else free_values.dtype
    w = _reconstruct_in(compute_dtype, value, code, dense_a, dense_b, refs)
    return w.to(free_values.dtype)


def reconstruct_compact_sma_(free_values, code, offsets, a, b, refs, sma, alpha: float) -> torch.Tensor:
    """`reconstruct_compact`, and sma (dense, code's shape) += alpha * (w - sma), float32."""
    value, dense_a, dense_b = unpack(free_values, code, a, b)
    w = _reconstruct_in(torch.float32, value, code, dense_a, dense_b, refs)
    average = sma.float()
    sma.copy_(average + alpha * (w - average))
    return w.to(free_values.dtype)


def reconstruct_compact_backward(
    grad: torch.Tensor, code: torch.Tensor, offsets: torch.Tensor, a: torch.Tensor, refs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dfree_values, dL/drefs): grad at the FREE elements in order; per mode, sum of a * grad."""
    free = code.reshape(-1) == FREE
    dense_a = torch.zeros(code.numel(), dtype=a.dtype, device=a.device)
    dense_a[~free] = a
    grad_value, grad_refs = reconstruct_backward(grad, code, dense_a.view(code.shape), refs)
    return grad_value.reshape(-1)[free], grad_refs


def reconstruct_compact_backward_sensitivity_(
    grad: torch.Tensor,
    free_values: torch.Tensor,
    code: torch.Tensor,
    offsets: torch.Tensor,
    a: torch.Tensor,
    refs: torch.Tensor,
    sensitivity: torch.Tensor,
    decay: float,
    fisher: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`reconstruct_compact_backward`, and the sensitivity's running mean at the FREE elements, in
    place: ``sensitivity = decay * sensitivity + (1 - decay) * score`` with score ``|g * v|`` (or
    ``g * g`` when `fisher`), g the upstream gradient and v the value of each FREE element.

    float32 arithmetic, each operation rounded as written (no fused multiply-add), from decay and
    1 - decay each rounded once to float32 (1 - decay computed in double).
    """
    grad_free, grad_refs = reconstruct_compact_backward(grad, code, offsets, a, refs)
    _running_mean_(sensitivity, grad.reshape(-1)[code.reshape(-1) == FREE], free_values, decay, fisher)
    return grad_free, grad_refs


def _running_mean_(
    sensitivity: torch.Tensor, grad: torch.Tensor, value: torch.Tensor, decay: float, fisher: bool
) -> None:
    """``sensitivity = decay * sensitivity + (1 - decay) * score`` in place (score ``|g * v|``, or
    ``g * g`` when `fisher`), float32, with decay and 1 - decay each rounded once to float32."""
    g = grad.reshape(-1).float()
    score = g * g if fisher else (g * value.reshape(-1).float()).abs()
    keep = torch.tensor(decay, dtype=torch.float32, device=sensitivity.device)
    complement = torch.tensor(1.0 - decay, dtype=torch.float32, device=sensitivity.device)
    sensitivity.copy_((keep * sensitivity.reshape(-1) + complement * score).view_as(sensitivity))


def sensitivity_update_(
    grads: list[torch.Tensor],
    values: list[torch.Tensor],
    sensitivities: list[torch.Tensor],
    decay: float,
    fisher: bool,
) -> None:
    """The sensitivity's running mean at every element of dense tensors, in place, with the
    arithmetic of `reconstruct_compact_backward_sensitivity_` at its FREE elements (score ``|g * v|``,
    or ``g * g`` when `fisher`)."""
    for grad, value, sensitivity in zip(grads, values, sensitivities, strict=True):
        _running_mean_(sensitivity, grad, value, decay, fisher)


def reconstruct_compact_backward_pieces_refit_(
    pieces,
    sizes,
    free_values,
    code,
    offsets,
    a,
    refs,
    sensitivity,
    decay: float,
    fisher: bool,
    mean,
    moment2,
    comoment,
    mode,
    ref_deviation,
    count: int,
):
    """`reconstruct_compact_backward_pieces` (`..._sensitivity_` when `sensitivity` is not None), and
    in the same pass the online refit's snapshot of the FREE elements' values: `refit_update_` of
    free_values into (mean, moment2, comoment), one entry per FREE element, in free_values' order."""
    if sensitivity is None:
        result = reconstruct_compact_backward_pieces(pieces, sizes, code, offsets, a, refs)
    else:
        result = reconstruct_compact_backward_pieces_sensitivity_(
            pieces, sizes, free_values, code, offsets, a, refs, sensitivity, decay, fisher
        )
    refit_update_(free_values, mean, moment2, comoment, mode, ref_deviation, count)
    return result


def concatenated(pieces: list[torch.Tensor], sizes: list[int], shape) -> torch.Tensor:
    """The pieces' gradients laid end to end in `shape` (an empty piece of nonzero size: zeros)."""
    like = next(p for p in pieces if p.numel())
    parts = [p if p.numel() == size else like.new_zeros(size) for p, size in zip(pieces, sizes, strict=True)]
    return torch.cat(parts).view(shape)


def reconstruct_compact_backward_pieces(pieces, sizes, code, offsets, a, refs):
    """`reconstruct_compact_backward` of the pieces' gradients laid end to end."""
    return reconstruct_compact_backward(concatenated(pieces, sizes, code.shape), code, offsets, a, refs)


def reconstruct_compact_backward_pieces_sensitivity_(
    pieces, sizes, free_values, code, offsets, a, refs, sensitivity, decay: float, fisher: bool
):
    """`reconstruct_compact_backward_sensitivity_` of the pieces' gradients laid end to end."""
    grad = concatenated(pieces, sizes, code.shape)
    return reconstruct_compact_backward_sensitivity_(
        grad, free_values, code, offsets, a, refs, sensitivity, decay, fisher
    )
