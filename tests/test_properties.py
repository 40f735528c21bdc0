"""Property-based tests (hypothesis): random sizes, code mixes and numbers of modes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import stdet_kernels
from stdet_kernels import DUMMY, FREE, reference


@st.composite
def op_inputs(draw):
    n = draw(st.integers(min_value=0, max_value=3000))
    num_modes = draw(st.integers(min_value=0, max_value=254))
    special = [FREE, DUMMY]
    choices = special + list(range(num_modes))
    weights = draw(st.sampled_from(["free-heavy", "embedded-heavy", "uniform"]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if weights == "uniform" or num_modes == 0:
        index = torch.randint(0, len(choices), (n,), generator=generator)
    else:
        draw_special = torch.rand(n, generator=generator) < (0.8 if weights == "free-heavy" else 0.1)
        index = torch.where(
            draw_special,
            torch.randint(0, 2, (n,), generator=generator),
            torch.randint(2, len(choices), (n,), generator=generator),
        )
    code = torch.tensor(choices, dtype=torch.uint8)[index]
    value, a, b = (torch.randn(n, generator=generator) * 10 for _ in range(3))
    refs = torch.randn(num_modes, generator=generator)
    return value, code, a, b, refs


@pytest.fixture(scope="module", params=("cpp", "triton"))
def backend(request) -> str:
    """Module-scoped: hypothesis reruns a test body many times within one fixture instance."""
    if request.param not in stdet_kernels.available_backends():
        pytest.skip(f"backend {request.param!r} unavailable here")
    return request.param


@settings(max_examples=40, deadline=None)
@given(inputs=op_inputs())
def test_float32_forward_is_bitwise_the_reference(backend: str, inputs) -> None:
    """No fused multiply-add and float32 arithmetic throughout: the same bits as the reference."""
    with stdet_kernels.use_backend(backend):
        w = stdet_kernels.reconstruct(*inputs)
        sma = torch.zeros_like(inputs[0])
        w_fused = stdet_kernels.reconstruct_sma_(*inputs, sma, 1.0)
    expected = reference.reconstruct(*inputs)
    assert torch.equal(w, expected)
    assert torch.equal(w_fused, expected)
    assert torch.equal(sma, expected)  # alpha = 1: the average is the sample


@settings(max_examples=40, deadline=None)
@given(inputs=op_inputs())
def test_gradients_match_the_reference(backend: str, inputs) -> None:
    value, code, a, _, refs = inputs
    grad = torch.randn_like(value)
    with stdet_kernels.use_backend(backend):
        grad_value, grad_refs = torch.ops.stdet.reconstruct_backward(grad, code, a, refs)
    expected_value, expected_refs = reference.reconstruct_backward(
        grad.double(), code, a.double(), refs.double()
    )
    assert torch.equal(grad_value, expected_value.float())
    magnitude = reference.reconstruct_backward(grad.double().abs(), code, a.double().abs(), refs.double())[1]
    assert torch.all((grad_refs.double() - expected_refs).abs() <= 1e-5 * magnitude + 1e-6)


@settings(max_examples=30, deadline=None)
@given(inputs=op_inputs())
def test_compact_layout_is_bitwise_the_dense_op(backend: str, inputs) -> None:
    """Packing changes where numbers are stored, not what is computed: same weights, same value
    gradients, as the dense op on the same numbers."""
    value, code, a, b, refs = inputs
    free_values, offsets, packed_a, packed_b = stdet_kernels.pack(value, code, a, b)
    grad = torch.randn_like(value)
    with stdet_kernels.use_backend(backend):
        w = stdet_kernels.reconstruct_compact(free_values, code, offsets, packed_a, packed_b, refs)
        grad_free, grad_refs = torch.ops.stdet.reconstruct_compact_backward(
            grad, code, offsets, packed_a, refs
        )
    _, dense_a, dense_b = stdet_kernels.unpack(free_values, code, packed_a, packed_b)
    assert torch.equal(w, reference.reconstruct(value, code, dense_a, dense_b, refs))
    assert torch.equal(grad_free, grad[code == FREE])
    magnitude = reference.reconstruct_backward(
        grad.double().abs(), code, dense_a.double().abs(), refs.double()
    )[1]
    expected_refs = reference.reconstruct_backward(grad.double(), code, dense_a.double(), refs.double())[1]
    assert torch.all((grad_refs.double() - expected_refs).abs() <= 1e-5 * magnitude + 1e-6)


def test_compact_refs_gradient_is_deterministic(backend: str) -> None:
    generator = torch.Generator().manual_seed(4)
    n = 100_003
    code = torch.randint(0, 256, (n,), generator=generator).to(torch.uint8)
    code[(code >= 20) & (code < DUMMY)] = FREE
    value, a, b, grad = (torch.randn(n, generator=generator) for _ in range(4))
    refs = torch.randn(20, generator=generator)
    _, offsets, packed_a, _ = stdet_kernels.pack(value, code, a, b)
    results = []
    threads = torch.get_num_threads()
    try:
        for num_threads in (1, 2):
            torch.set_num_threads(num_threads)
            with stdet_kernels.use_backend(backend):
                results.append(
                    torch.ops.stdet.reconstruct_compact_backward(grad, code, offsets, packed_a, refs)[1]
                )
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])
