"""The compact layout's ops against the dense reference, every backend: forward, gradients, fused
SMA, over odd sizes (block boundaries included), code mixes, numbers of modes, value and
coefficient dtypes."""

import pytest
import torch
from helpers import MIXES, Target, assert_verbose_close, compact_case_id, flash_tolerance, make_inputs

import stdet_kernels
from stdet_kernels import COMPACT_BLOCK, FREE, reference

NEARLY_ONE_KIND = ("mostly_free", "mostly_embedded")
SIZES = (1, 2, 1023, COMPACT_BLOCK, COMPACT_BLOCK + 1, 4097, 100_003)
CASES = (
    [(n, mix, 10, torch.float32, torch.float32) for n in SIZES for mix in MIXES]
    # 16 and 17 modes: the C++ forward's last table in two registers, and its first gathered one.
    + [(n, "mixed", modes, torch.float32, torch.float32) for modes in (1, 16, 17, 254) for n in (2, 4097)]
    + [(4097, "mixed", 10, torch.float32, coef) for coef in (torch.bfloat16, torch.float16)]
    + [(4097, "mixed", 10, dtype, dtype) for dtype in (torch.bfloat16, torch.float16)]
    + [(100_003, "all_embedded", 254, torch.bfloat16, torch.bfloat16)]
    # Blocks nearly all of one kind (the C++ forward takes a branch per element there).
    + [(n, mix, 10, torch.float32, torch.float32) for n in (4097, 100_003) for mix in NEARLY_ONE_KIND]
    + [(4097, mix, 10, torch.bfloat16, torch.float16) for mix in NEARLY_ONE_KIND]
)


def _layout(case):
    n, mix, modes, dtype, coef = case
    x = make_inputs(n, modes, mix, dtype, seed=n + modes)
    free_values, offsets, a, b = stdet_kernels.pack(x.value, x.code, x.a, x.b, coef)
    return x, (free_values, x.code, offsets, a, b, x.refs)


def _expected(compact, upcast: bool):
    free_values, code, offsets, a, b, refs = compact
    cast = (lambda t: t.double()) if upcast else (lambda t: t)
    return reference.reconstruct_compact(
        cast(free_values), code, offsets, cast(a), cast(b), cast(refs), upcast=False
    )


@pytest.mark.parametrize("case", CASES, ids=compact_case_id)
def test_forward_matches_reference(target: Target, case) -> None:
    x, compact = _layout(case)
    low, high = _expected(compact, upcast=False), _expected(compact, upcast=True)
    with stdet_kernels.use_backend(target.backend):
        w = stdet_kernels.reconstruct_compact(*target.put(*compact)).cpu()
        assert stdet_kernels.last_backend() == target.backend
    assert w.shape == x.code.shape and w.dtype == x.value.dtype
    atol = 1e-6 if w.dtype == torch.float32 else 1e-3
    assert_verbose_close("w", w, high, flash_tolerance(low, high, atol))
    if case[3] == case[4]:
        # Coefficients stored at the value dtype: the dense op on the unpacked tensors, same bits.
        value, dense_a, dense_b = stdet_kernels.unpack(compact[0], x.code, compact[3], compact[4])
        assert torch.equal(w, reference.reconstruct(value, x.code, dense_a, dense_b, x.refs))


@pytest.mark.parametrize("case", CASES, ids=compact_case_id)
def test_backward_matches_reference(target: Target, case) -> None:
    _, compact = _layout(case)
    free_values, code, offsets, a, b, refs = compact
    grad = torch.randn(code.shape, generator=torch.Generator().manual_seed(1)).to(free_values.dtype)
    with stdet_kernels.use_backend(target.backend):
        fv, r = (t.clone().requires_grad_() for t in target.put(free_values, refs))
        w = stdet_kernels.reconstruct_compact(fv, *target.put(code, offsets, a, b), r)
        w.backward(grad.to(target.device))
    expected_free = grad[code == FREE]
    assert torch.equal(fv.grad.cpu(), expected_free)
    _, high_refs = reference.reconstruct_compact_backward(
        grad.double(), code, offsets, a.double(), refs.double()
    )
    magnitude = reference.reconstruct_compact_backward(
        grad.double().abs(), code, offsets, a.double().abs(), refs.double()
    )[1]
    rounding = 2.0**-8 if refs.dtype != torch.float32 else 0.0  # one rounding to a 16-bit refs dtype
    assert_verbose_close(
        "dL/drefs", r.grad.cpu(), high_refs, 1e-5 * magnitude + rounding * high_refs.abs() + 1e-6
    )


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in (1025, 4097)], ids=compact_case_id)
def test_fused_sma_matches_reference(target: Target, case) -> None:
    x, compact = _layout(case)
    sma = torch.randn(x.code.shape, generator=torch.Generator().manual_seed(2)).to(x.value.dtype)
    expected_sma = sma.clone()
    expected_w = reference.reconstruct_compact_sma_(*compact, expected_sma, 0.25)
    (sma_kernel,) = target.put(sma.clone())
    with stdet_kernels.use_backend(target.backend):
        w = stdet_kernels.reconstruct_compact_sma_(*target.put(*compact), sma_kernel, 0.25).cpu()
    atol = 1e-6 if w.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(w, expected_w, rtol=0, atol=atol)
    torch.testing.assert_close(sma_kernel.cpu(), expected_sma, rtol=0, atol=atol)


def test_pack_unpack_round_trip() -> None:
    x = make_inputs(3000, 5, "mixed")
    free_values, offsets, a, b = stdet_kernels.pack(x.value, x.code, x.a, x.b)
    value, dense_a, dense_b = stdet_kernels.unpack(free_values, x.code, a, b)
    free = x.code == FREE
    assert torch.equal(value[free], x.value[free]) and torch.equal(dense_a[~free], x.a[~free])
    assert torch.equal(dense_b[~free], x.b[~free]) and torch.all(value[~free] == 0)
    assert offsets.dtype == torch.int32 and offsets.numel() == 4 and int(offsets[-1]) == int(free.sum())


def test_compact_state_is_smaller() -> None:
    """At 80% embedded with 16-bit coefficients, what training keeps per element is below 60% of a
    plain float32 weight with Adam (value, gradient, two moments: 16 bytes)."""
    n = 100_000
    x = make_inputs(n, 10, "all_embedded")
    x.code[torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n // 5]] = FREE
    free_values, offsets, a, b = stdet_kernels.pack(x.value, x.code, x.a, x.b, torch.bfloat16)
    trainable = free_values.numel() * 4 * 4  # value, gradient, exp_avg, exp_avg_sq
    stored = x.code.numel() + offsets.numel() * 4 + (a.numel() + b.numel()) * 2
    assert (trainable + stored) / (16 * n) < 0.6


def test_mismatched_layout_is_rejected() -> None:
    x = make_inputs(3000, 5, "mixed")
    free_values, offsets, a, b = stdet_kernels.pack(x.value, x.code, x.a, x.b)
    code = x.code.clone()
    stale = offsets.clone()
    flipped = int((code != FREE).nonzero()[0])
    code[flipped] = FREE  # one more FREE element, offsets now stale
    with pytest.raises(ValueError, match="^free_values, a, b: expected"):
        stdet_kernels.reconstruct_compact(free_values, code, stale, a[1:], b[1:], x.refs)
    with pytest.raises(ValueError, match="^offsets: do not match code"):
        stdet_kernels.reconstruct_compact(
            torch.cat([free_values, free_values[:1]]), code, stale, a[1:], b[1:], x.refs
        )
    with pytest.raises(ValueError, match="^offsets: expected 4 entries"):
        stdet_kernels.reconstruct_compact(free_values, x.code, offsets[:-1], a, b, x.refs)
    with pytest.raises(TypeError, match="^offsets: expected dtype int32"):
        stdet_kernels.reconstruct_compact(free_values, x.code, offsets.long(), a, b, x.refs)
    with pytest.raises(TypeError, match="^b: expected dtype"):
        stdet_kernels.reconstruct_compact(free_values, x.code, offsets, a, b.half(), x.refs)


def test_opcheck_and_compile() -> None:
    x = make_inputs(2500, 4, "mixed")
    free_values, offsets, a, b = stdet_kernels.pack(x.value, x.code, x.a, x.b)
    args = (free_values.requires_grad_(), x.code, offsets, a, b, x.refs.requires_grad_())
    torch.library.opcheck(torch.ops.stdet.reconstruct_compact.default, args)
    torch.library.opcheck(
        torch.ops.stdet.reconstruct_compact_sma_.default,
        (free_values.detach(), x.code, offsets, a, b, x.refs.detach(), torch.zeros(2500), 0.5),
    )
    compiled = torch.compile(lambda *t: stdet_kernels.reconstruct_compact(*t).square().sum(), fullgraph=True)
    loss = compiled(*args)
    loss.backward()
    expected = reference.reconstruct_compact(*(t.detach() for t in args)).square().sum()
    torch.testing.assert_close(loss.detach(), expected)
    assert args[0].grad is not None and args[5].grad is not None


def _cpp_extension():
    try:
        from stdet_kernels import _C
    except ImportError:
        pytest.skip("the C++ extension is not built")
    return _C


# Blocks of every kind and near the end of the axis (where the AVX2 path hands over to the element
# by element one); float32 values with float32 or bfloat16 (the default) coefficients are the AVX2
# path's dtypes, the others must not take it.
SIMD_CASES = (
    [c for c in CASES if c[3] == c[4] == torch.float32 and c[0] > 1]
    + [(n, mix, 10, torch.float32, torch.bfloat16) for n in SIZES[1:] for mix in MIXES + NEARLY_ONE_KIND]
    + [(4097, "mixed", 10, torch.bfloat16, torch.bfloat16), (4097, "mixed", 10, torch.float32, torch.float16)]
)


@pytest.mark.parametrize("case", SIMD_CASES, ids=compact_case_id)
def test_cpp_avx2_path_gives_the_scalar_paths_bits(case) -> None:
    """Forward, fused SMA, backward and the sensitivity's backward: the same bits with the AVX2 path
    on and off (refs gradient included: both add each mode's terms in the same order)."""
    cpp = _cpp_extension()
    previous = cpp.set_simd(True)
    try:
        if not cpp.simd_enabled():
            pytest.skip("this CPU has no AVX2")
        _, compact = _layout(case)
        free_values, code, offsets, a, _, refs = compact
        generator = torch.Generator().manual_seed(3)
        grad = torch.randn(code.shape, generator=generator).to(free_values.dtype)
        sma = torch.randn(code.shape, generator=generator).to(free_values.dtype)
        sensitivity = torch.rand(free_values.shape, generator=generator)
        results, groups = {}, {}
        for simd in (True, False):
            cpp.set_simd(simd)
            before = cpp.avx2_groups()
            average, tracked = sma.clone(), sensitivity.clone()
            results[simd] = (
                cpp.reconstruct_compact(*compact),
                cpp.reconstruct_compact_sma_(*compact, average, 0.3),
                average,
                *cpp.reconstruct_compact_backward(grad, code, offsets, a, refs),
                *cpp.reconstruct_compact_backward_sensitivity_(
                    grad, free_values, code, offsets, a, refs, tracked, 0.9, False
                ),
                tracked,
            )
            groups[simd] = cpp.avx2_groups() - before
        # The path under test ran where it should (float32 values, float32 or bfloat16 coefficients,
        # some element embedded), and only there.
        takes_avx2 = (
            free_values.dtype == torch.float32
            and a.dtype in (torch.float32, torch.bfloat16)
            and bool((code != FREE).any())
            and code.numel() >= 8
        )
        assert (groups[True] > 0) == takes_avx2 and groups[False] == 0, groups
        for name, on, off in zip(
            (
                "w",
                "w (SMA)",
                "average",
                "dL/dfree",
                "dL/drefs",
                "dL/dfree (tracked)",
                "dL/drefs (tracked)",
                "sensitivity",
            ),
            results[True],
            results[False],
            strict=True,
        ):
            assert torch.equal(on, off), name
    finally:
        cpp.set_simd(previous)
