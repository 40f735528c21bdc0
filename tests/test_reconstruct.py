"""Every backend against the reference: forward, both gradients and the fused SMA update, over odd
sizes, code mixes, numbers of modes and dtypes. 16-bit results are judged FlashAttention's way: at most
twice as far from the float64 result as plain PyTorch at that dtype, plus a small slack."""

import math

import pytest
import torch
from helpers import (
    MIXES,
    Inputs,
    Target,
    assert_verbose_close,
    flash_tolerance,
    make_inputs,
    reference_forward,
    refs_grad_tolerance,
    upcast,
)

import stdet_kernels
from stdet_kernels import FREE, reference

PRIME = 100_003  # a prime above 10^5
SIZES = (1, 2, 1023, 4097, PRIME)
LAYER_SHAPES = ((192, 192, 5, 5), (192, 3, 5, 5))


def _cases() -> list[tuple[tuple[int, ...], str, int, torch.dtype]]:
    cases = [((n,), mix, 10, torch.float32) for n in SIZES for mix in MIXES]
    cases += [((n,), "mixed", modes, torch.float32) for modes in (1, 254) for n in (2, 1023, PRIME)]
    cases += [((4097,), "all_embedded", 254, torch.float32)]
    cases += [
        ((n,), "mixed", 10, dtype) for dtype in (torch.bfloat16, torch.float16) for n in (1, 1023, PRIME)
    ]
    cases += [((4097,), "all_embedded", 254, dtype) for dtype in (torch.bfloat16, torch.float16)]
    cases += [(shape, "mixed", 10, torch.float32) for shape in LAYER_SHAPES]
    return cases


CASES = _cases()


def _case_id(case) -> str:
    shape, mix, modes, dtype = case
    return f"{'x'.join(map(str, shape))}-{mix}-{modes}modes-{str(dtype).removeprefix('torch.')}"


def _inputs(case) -> Inputs:
    shape, mix, modes, dtype = case
    flat = make_inputs(math.prod(shape), modes, mix, dtype, seed=hash(case) % 1000)
    return Inputs(*(t.reshape(shape) for t in flat.as_tuple()[:4]), flat.refs)


def _atol(dtype: torch.dtype) -> float:
    return 1e-6 if dtype == torch.float32 else 1e-3


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_matches_reference(target: Target, case) -> None:
    inputs = _inputs(case)
    low, high = reference_forward(inputs)
    with stdet_kernels.use_backend(target.backend):
        w = stdet_kernels.reconstruct(*target.put(*inputs.as_tuple())).cpu()
        assert stdet_kernels.last_backend() == target.backend
    assert w.dtype == inputs.value.dtype and w.shape == inputs.value.shape
    assert_verbose_close("w", w, high, flash_tolerance(low, high, _atol(w.dtype)))


def _autograd_reference(inputs: Inputs, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the reference forward by PyTorch's autograd, computed at the inputs' dtype."""
    value = inputs.value.clone().requires_grad_()
    refs = inputs.refs.clone().requires_grad_()
    w = reference.reconstruct(value, inputs.code, inputs.a, inputs.b, refs, upcast=False)
    w.backward(grad)
    return value.grad, refs.grad


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_backward_matches_reference(target: Target, case) -> None:
    inputs = _inputs(case)
    generator = torch.Generator().manual_seed(1)
    grad = torch.randn(inputs.value.shape, generator=generator).to(inputs.value.dtype)
    low_value, low_refs = _autograd_reference(inputs, grad)
    high_value, high_refs = _autograd_reference(upcast(inputs), grad.double())

    value, refs = (t.clone().requires_grad_() for t in target.put(inputs.value, inputs.refs))
    with stdet_kernels.use_backend(target.backend):
        w = stdet_kernels.reconstruct(value, *target.put(inputs.code, inputs.a, inputs.b), refs)
        w.backward(grad.to(target.device))
        assert stdet_kernels.last_backend() == target.backend
    assert value.grad.dtype == value.dtype and refs.grad.dtype == refs.dtype
    value_grad, refs_grad = value.grad.cpu(), refs.grad.cpu()
    assert torch.equal(value_grad, torch.where(inputs.code == FREE, grad, 0).to(grad.dtype))
    assert_verbose_close("dL/dvalue", value_grad, high_value, flash_tolerance(low_value, high_value, 0.0))
    tolerance = flash_tolerance(low_refs, high_refs, 0.0) + refs_grad_tolerance(inputs, grad)
    assert_verbose_close("dL/drefs", refs_grad, high_refs, tolerance)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("alpha", (0.1, 1.0))
def test_fused_sma_matches_reference(target: Target, case, alpha: float) -> None:
    inputs = _inputs(case)
    generator = torch.Generator().manual_seed(2)
    sma = torch.randn(inputs.value.shape, generator=generator).to(inputs.value.dtype)
    low_w, high_w = reference_forward(inputs)
    high_sma = sma.double() + alpha * (high_w - sma.double())
    low_sma = sma + alpha * (low_w - sma)

    (sma_kernel,) = target.put(sma.clone())
    with stdet_kernels.use_backend(target.backend):
        w = stdet_kernels.reconstruct_sma_(*target.put(*inputs.as_tuple()), sma_kernel, alpha).cpu()
        assert stdet_kernels.last_backend() == target.backend
    sma_kernel = sma_kernel.cpu()
    atol = _atol(w.dtype)
    assert_verbose_close("w", w, high_w, flash_tolerance(low_w, high_w, atol))
    assert_verbose_close("sma", sma_kernel, high_sma, flash_tolerance(low_sma, high_sma, atol))


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == (1023,)], ids=_case_id)
def test_fused_sma_gradients_match_plain_reconstruct(target: Target, case) -> None:
    """reconstruct_sma_ is differentiable exactly like reconstruct."""
    inputs = _inputs(case)
    grad = torch.randn(inputs.value.shape, generator=torch.Generator().manual_seed(3)).to(inputs.value.dtype)
    grads = []
    with stdet_kernels.use_backend(target.backend):
        for fused in (False, True):
            value, refs = (t.clone().requires_grad_() for t in target.put(inputs.value, inputs.refs))
            args = (value, *target.put(inputs.code, inputs.a, inputs.b), refs)
            w = (
                stdet_kernels.reconstruct_sma_(*args, torch.zeros_like(value), 0.5)
                if fused
                else stdet_kernels.reconstruct(*args)
            )
            w.backward(grad.to(target.device))
            grads.append((value.grad, refs.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])


def test_reference_backward_is_the_autograd_of_the_reference_forward() -> None:
    """The hand-written reference backward agrees with autograd on the reference forward (float64)."""
    inputs = upcast(make_inputs(PRIME, 254, "mixed", seed=5))
    grad = torch.randn(PRIME, dtype=torch.float64)
    value_grad, refs_grad = _autograd_reference(inputs, grad)
    got_value, got_refs = reference.reconstruct_backward(grad, inputs.code, inputs.a, inputs.refs)
    assert torch.equal(got_value, value_grad)
    torch.testing.assert_close(got_refs, refs_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mix", MIXES)
def test_refs_gradient_is_deterministic(target: Target, mix: str) -> None:
    """Same inputs, same bits: the per-mode reduction has no atomics and a fixed order, also when the
    number of threads changes."""
    inputs = make_inputs(PRIME, 254, mix, seed=7)
    value, code, a, b, refs_start = target.put(*inputs.as_tuple())
    (grad,) = target.put(torch.randn(PRIME, generator=torch.Generator().manual_seed(8)))
    results = []
    threads = torch.get_num_threads()
    try:
        for num_threads in (1, 2, 1):
            torch.set_num_threads(num_threads)
            refs = refs_start.clone().requires_grad_()
            with stdet_kernels.use_backend(target.backend):
                stdet_kernels.reconstruct(value, code, a, b, refs).backward(grad)
            results.append(refs.grad)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_noncontiguous_inputs(target: Target) -> None:
    """Transposed views (including sma) give the same results as their contiguous copies."""
    inputs = make_inputs(64 * 33, 10, "mixed", seed=9)
    views = [t.reshape(33, 64).t() for t in target.put(*inputs.as_tuple()[:4])]
    assert not views[0].is_contiguous()
    (sma,) = target.put(torch.randn(33, 64))
    sma = sma.t()
    expected_sma = sma.cpu().contiguous()
    value = views[0].clone().t().contiguous().t().requires_grad_()  # non-contiguous leaf
    (refs,) = target.put(inputs.refs.clone())
    refs.requires_grad_()
    with stdet_kernels.use_backend(target.backend):
        w = stdet_kernels.reconstruct_sma_(value, views[1], views[2], views[3], refs, sma, 0.25)
        w.backward(torch.ones_like(w))
    assert not sma.is_contiguous()
    views, w, sma, value_grad = [v.cpu() for v in views], w.cpu(), sma.cpu(), value.grad.cpu()
    expected_w = reference.reconstruct(*(v.contiguous() for v in views), inputs.refs)
    torch.testing.assert_close(w, expected_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(sma, expected_sma + 0.25 * (expected_w - expected_sma), rtol=0, atol=1e-6)
    assert torch.equal(value_grad, torch.where(views[1] == FREE, 1.0, 0.0))


def test_empty_tensor(target: Target) -> None:
    inputs = make_inputs(0, 3, "mixed")
    value, code, a, b, refs = target.put(*inputs.as_tuple())
    value.requires_grad_()
    refs.requires_grad_()
    with stdet_kernels.use_backend(target.backend):
        w = stdet_kernels.reconstruct(value, code, a, b, refs)
        w.sum().backward()
    assert w.shape == (0,) and torch.equal(refs.grad.cpu(), torch.zeros(3))
