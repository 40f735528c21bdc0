"""The fused compact backward that also updates STDET's sensitivity (issue 11, point 2), every backend
against the reference: dL/dfree_values, dL/drefs and the running mean, over odd sizes, code mixes,
numbers of modes, dtypes, both measures and two decays; the autograd path through
`reconstruct_compact(..., sensitivity=...)`; opcheck, torch.compile; bad inputs."""

import math

import pytest
import torch
from helpers import MIXES, Target, assert_verbose_close, compact_refs_bound, make_inputs, require
from hypothesis import given, settings
from hypothesis import strategies as st

import stdet_kernels
from stdet_kernels import FREE, reference

SIZES = (1, 2, 1023, 4097, 100_003)  # 100_003 is prime
F32 = torch.float32
CASES = (
    # (n, mix, modes, value dtype, coefficient dtype, measure, decay)
    [(n, mix, 10, F32, F32, "taylor", 0.9) for n in SIZES for mix in MIXES]
    + [
        (n, "mixed", 10, F32, F32, m, d)
        for n in (4097, 100_003)
        for m in ("taylor", "fisher")
        for d in (0, 0.9)
    ]
    + [(n, "mixed", modes, F32, F32, "fisher", 0.9) for modes in (1, 254) for n in (2, 4097)]
    + [
        (4097, "mixed", 10, dtype, dtype, m, 0.9)
        for dtype in (torch.bfloat16, torch.float16)
        for m in ("taylor", "fisher")
    ]
    + [(4097, "mixed", 10, torch.bfloat16, F32, "taylor", 0.0)]
    + [(100_003, "all_free", 254, torch.float16, torch.bfloat16, "taylor", 0.9)]
)


def _id(case) -> str:
    n, mix, modes, dtype, coef, measure, decay = case
    name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    return f"{n}-{mix}-{modes}modes-{name(dtype)}-coef_{name(coef)}-{measure}-decay{decay}"


def _problem(n: int, mix: str, modes: int, dtype: torch.dtype, coef: torch.dtype, seed: int = 0):
    """(grad, free_values, code, offsets, a, b, refs, sensitivity): a packed layout, an upstream
    gradient and a non-negative running mean."""
    x = make_inputs(n, modes, mix, dtype, seed=seed + n + modes)
    free_values, offsets, a, b = stdet_kernels.pack(x.value, x.code, x.a, x.b, coef)
    generator = torch.Generator().manual_seed(seed + 1)
    grad = torch.randn(n, generator=generator).to(dtype)
    sensitivity = torch.rand(free_values.numel(), generator=generator)
    return grad, free_values, x.code, offsets, a, b, x.refs, sensitivity


def _exact_sensitivity(grad, free_values, code, sensitivity, decay: float, measure: str):
    """(float64 result, bound on a float32 evaluation): a few float32 roundings of its terms."""
    g = grad[code == FREE].double()
    score = g * g if measure == "fisher" else (g * free_values.double()).abs()
    kept, added = decay * sensitivity.double(), (1.0 - decay) * score
    return kept + added, 4 * torch.finfo(torch.float32).eps * (kept.abs() + added.abs()) + 1e-30


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_fused_backward_matches_reference(target: Target, case) -> None:
    n, mix, modes, dtype, coef, measure, decay = case
    grad, free_values, code, offsets, a, _, refs, sensitivity = _problem(n, mix, modes, dtype, coef)
    expected_sensitivity = sensitivity.clone()
    expected_free, expected_refs = reference.reconstruct_compact_backward_sensitivity_(
        grad, free_values, code, offsets, a, refs, expected_sensitivity, decay, measure == "fisher"
    )
    (updated,) = target.put(sensitivity.clone())
    with stdet_kernels.use_backend(target.backend):
        grad_free, grad_refs = stdet_kernels.reconstruct_compact_backward_sensitivity_(
            *target.put(grad, free_values, code, offsets, a, refs), updated, decay, measure
        )
        assert stdet_kernels.last_backend() == target.backend
    grad_free, grad_refs, updated = grad_free.cpu(), grad_refs.cpu(), updated.cpu()

    assert grad_free.dtype == dtype and torch.equal(grad_free, grad[code == FREE])
    assert torch.equal(expected_free, grad_free)
    exact_refs, refs_bound = compact_refs_bound(grad, code, offsets, a, refs)
    assert grad_refs.dtype == refs.dtype
    assert_verbose_close("dL/drefs", grad_refs, exact_refs, refs_bound)
    assert_verbose_close("dL/drefs (reference)", expected_refs, exact_refs, refs_bound)

    exact, bound = _exact_sensitivity(grad, free_values, code, sensitivity, decay, measure)
    assert updated.dtype == torch.float32 and updated.shape == sensitivity.shape
    assert_verbose_close("sensitivity", updated, exact, bound)
    assert_verbose_close("sensitivity (reference)", expected_sensitivity, exact, bound)
    if target.device == "cpu":  # float32 as written, no fused multiply-add: the reference's bits
        assert torch.equal(updated, expected_sensitivity)


@pytest.mark.parametrize("backend", ("torch", "cpp", "triton"))
def test_strided_sensitivity_is_written_back(backend: str) -> None:
    require(Target(backend, "cpu"))
    grad, free_values, code, offsets, a, _, refs, sensitivity = _problem(3000, "mixed", 5, F32, F32)
    storage = torch.zeros(2 * sensitivity.numel())
    strided = storage[::2]
    strided.copy_(sensitivity)
    with stdet_kernels.use_backend(backend):
        stdet_kernels.reconstruct_compact_backward_sensitivity_(
            grad, free_values, code, offsets, a, refs, strided, 0.5, "taylor"
        )
    reference.reconstruct_compact_backward_sensitivity_(
        grad, free_values, code, offsets, a, refs, sensitivity, 0.5, False
    )
    assert torch.equal(strided, sensitivity) and torch.all(storage[1::2] == 0)


@pytest.mark.parametrize("backend", ("cpp", "triton"))
def test_refs_gradient_is_deterministic_across_thread_counts(backend: str) -> None:
    require(Target(backend, "cpu"))
    grad, free_values, code, offsets, a, _, refs, sensitivity = _problem(100_003, "mixed", 20, F32, F32)
    results = []
    threads = torch.get_num_threads()
    try:
        for num_threads in (1, 2):
            torch.set_num_threads(num_threads)
            updated = sensitivity.clone()
            with stdet_kernels.use_backend(backend):
                grad_free, grad_refs = stdet_kernels.reconstruct_compact_backward_sensitivity_(
                    grad, free_values, code, offsets, a, refs, updated, 0.9, "taylor"
                )
            results.append((grad_free, grad_refs, updated))
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*results, strict=True):
        assert torch.equal(first, second)


# ---------------------------------------------------------------------------------------------
# The autograd path: reconstruct_compact(..., sensitivity=...) runs the fused op as its backward.


def _leaves(free_values: torch.Tensor, refs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return free_values.clone().requires_grad_(), refs.clone().requires_grad_()


@pytest.mark.parametrize(
    "with_average", (False, True), ids=("reconstruct_compact", "reconstruct_compact_sma_")
)
@pytest.mark.parametrize("measure", ("taylor", "fisher"))
def test_autograd_runs_the_fused_backward(with_average: bool, measure: str) -> None:
    grad, free_values, code, offsets, a, b, refs, sensitivity = _problem(5000, "mixed", 7, F32, F32)
    plain_free, plain_refs = _leaves(free_values, refs)
    stdet_kernels.reconstruct_compact(plain_free, code, offsets, a, b, plain_refs).backward(grad)

    fused_free, fused_refs = _leaves(free_values, refs)
    updated = sensitivity.clone()
    options = dict(sensitivity=updated, decay=0.75, measure=measure)
    with stdet_kernels.record_calls() as calls:
        if with_average:
            sma = torch.zeros(code.shape)
            w = stdet_kernels.reconstruct_compact_sma_(
                fused_free, code, offsets, a, b, fused_refs, sma, 0.5, **options
            )
        else:
            w = stdet_kernels.reconstruct_compact(fused_free, code, offsets, a, b, fused_refs, **options)
        w.backward(grad)
    forward_op = "reconstruct_compact_sma_" if with_average else "reconstruct_compact"
    assert [op for op, _ in calls] == [forward_op, "reconstruct_compact_backward_sensitivity_"]
    assert torch.equal(fused_free.grad, plain_free.grad)
    assert torch.equal(fused_refs.grad, plain_refs.grad)
    expected = sensitivity.clone()
    reference.reconstruct_compact_backward_sensitivity_(
        grad, free_values, code, offsets, a, refs, expected, 0.75, measure == "fisher"
    )
    assert torch.equal(updated, expected)


def test_without_sensitivity_the_plain_backward_runs() -> None:
    grad, free_values, code, offsets, a, b, refs, _ = _problem(3000, "mixed", 4, F32, F32)
    leaf_free, leaf_refs = _leaves(free_values, refs)
    with stdet_kernels.record_calls() as calls:
        stdet_kernels.reconstruct_compact(leaf_free, code, offsets, a, b, leaf_refs).backward(grad)
    assert [op for op, _ in calls] == ["reconstruct_compact", "reconstruct_compact_backward"]


def test_two_forwards_before_one_backward_update_twice() -> None:
    """Gradient accumulation over two micro-batches: the sensitivity is running state, not a saved
    tensor, so the first backward's update does not trip autograd's check on the second."""
    grad, free_values, code, offsets, a, b, refs, sensitivity = _problem(3000, "mixed", 4, F32, F32)
    leaf_free, leaf_refs = _leaves(free_values, refs)
    updated = sensitivity.clone()
    first = stdet_kernels.reconstruct_compact(leaf_free, code, offsets, a, b, leaf_refs, sensitivity=updated)
    second = stdet_kernels.reconstruct_compact(leaf_free, code, offsets, a, b, leaf_refs, sensitivity=updated)
    (first * grad + second * grad.flip(0)).sum().backward()
    orders = []
    for order in ((grad, grad.flip(0)), (grad.flip(0), grad)):
        expected = sensitivity.clone()
        for g in order:
            reference.reconstruct_compact_backward_sensitivity_(
                g, free_values, code, offsets, a, refs, expected, 0.9, False
            )
        orders.append(expected)
    assert any(torch.equal(updated, expected) for expected in orders)
    assert not torch.equal(updated, sensitivity)


def test_no_backward_no_update() -> None:
    _, free_values, code, offsets, a, b, refs, sensitivity = _problem(3000, "mixed", 4, F32, F32)
    updated = sensitivity.clone()
    with torch.no_grad():
        stdet_kernels.reconstruct_compact(free_values, code, offsets, a, b, refs, sensitivity=updated)
    stdet_kernels.reconstruct_compact(free_values, code, offsets, a, b, refs, sensitivity=updated)
    assert torch.equal(updated, sensitivity)


@pytest.fixture(params=("torch", "cpp"))
def library_backend(request) -> str:
    if request.param not in stdet_kernels.available_backends():
        pytest.skip(f"backend {request.param!r} unavailable here")
    return request.param


def test_opcheck(library_backend: str) -> None:
    grad, free_values, code, offsets, a, b, refs, sensitivity = _problem(2500, "mixed", 4, F32, F32)
    with stdet_kernels.use_backend(library_backend):
        for measure in ("taylor", "fisher"):
            torch.library.opcheck(
                torch.ops.stdet.reconstruct_compact_backward_sensitivity_.default,
                (grad, free_values, code, offsets, a, refs, sensitivity.clone(), 0.9, measure),
            )
        leaf_free, leaf_refs = _leaves(free_values, refs)
        torch.library.opcheck(
            torch.ops.stdet.reconstruct_compact.default,
            (leaf_free, code, offsets, a, b, leaf_refs, sensitivity.clone(), 0.5, "fisher"),
        )


class _CompactLinear(torch.nn.Module):
    """A linear layer whose weight is a compact-layout reconstruction that feeds the sensitivity."""

    def __init__(self, with_average: bool) -> None:
        super().__init__()
        _, free_values, code, offsets, a, b, refs, sensitivity = _problem(6 * 50, "mixed", 3, F32, F32)
        self.free_values = torch.nn.Parameter(free_values)
        self.refs = torch.nn.Parameter(refs)
        for name, t in (("code", code.view(6, 50)), ("offsets", offsets), ("a", a), ("b", b)):
            self.register_buffer(name, t)
        self.register_buffer("sensitivity", sensitivity)
        self.register_buffer("sma", torch.zeros(6, 50))
        self.with_average = with_average

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = (self.free_values, self.code, self.offsets, self.a, self.b, self.refs)
        options = dict(sensitivity=self.sensitivity, decay=0.8, measure="taylor")
        if self.with_average:
            weight = stdet_kernels.reconstruct_compact_sma_(*layout, self.sma, 0.5, **options)
        else:
            weight = stdet_kernels.reconstruct_compact(*layout, **options)
        return torch.nn.functional.linear(x, weight).square().sum()


@pytest.mark.parametrize(
    "with_average", (False, True), ids=("reconstruct_compact", "reconstruct_compact_sma_")
)
def test_compiles_with_fullgraph(with_average: bool) -> None:
    eager = _CompactLinear(with_average)
    compiled_model = _CompactLinear(with_average)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(5))
    for _ in range(2):  # twice: the sensitivity (and the average) move on each step
        for model in (eager, compiled):
            model.zero_grad()
            model(x).backward()
        for name in ("free_values", "refs"):
            assert getattr(eager, name).grad is not None
            torch.testing.assert_close(getattr(compiled_model, name).grad, getattr(eager, name).grad)
        torch.testing.assert_close(compiled_model.sensitivity, eager.sensitivity)
        torch.testing.assert_close(compiled_model.sma, eager.sma)
    assert not torch.equal(eager.sensitivity, _CompactLinear(with_average).sensitivity)


# ---------------------------------------------------------------------------------------------
# Bad inputs


def _arguments() -> dict:
    grad, free_values, code, offsets, a, _, refs, sensitivity = _problem(3000, "mixed", 4, F32, F32)
    return dict(
        grad=grad,
        free_values=free_values,
        code=code,
        offsets=offsets,
        a=a,
        refs=refs,
        sensitivity=sensitivity,
        decay=0.9,
        measure="taylor",
    )


FREE_COUNT = _arguments()["free_values"].numel()
BAD = [
    ("sensitivity", torch.zeros(FREE_COUNT + 1), ValueError),
    ("sensitivity", torch.zeros(FREE_COUNT, 1), ValueError),
    ("sensitivity", torch.zeros(FREE_COUNT, dtype=torch.float64), TypeError),
    ("sensitivity", torch.zeros(FREE_COUNT, dtype=torch.bfloat16), TypeError),
    ("sensitivity", torch.zeros(FREE_COUNT, device="meta"), ValueError),
    ("sensitivity", torch.zeros(FREE_COUNT, requires_grad=True), ValueError),
    ("sensitivity", [0.0] * FREE_COUNT, TypeError),
    ("measure", "l1", ValueError),
    ("measure", 1, TypeError),
    ("decay", 1.0, ValueError),
    ("decay", -0.1, ValueError),
    ("decay", math.nan, ValueError),
    ("decay", True, TypeError),
    ("decay", "0.9", TypeError),
]


@pytest.mark.parametrize(("argument", "replacement", "error"), BAD, ids=lambda v: str(v)[:20])
def test_fused_backward_rejects_bad_argument(argument: str, replacement, error: type) -> None:
    arguments = _arguments()
    arguments[argument] = replacement
    with pytest.raises(error, match=f"^{argument}: "):
        stdet_kernels.reconstruct_compact_backward_sensitivity_(**arguments)


@pytest.mark.parametrize(("argument", "replacement", "error"), BAD, ids=lambda v: str(v)[:20])
def test_reconstruct_compact_rejects_bad_sensitivity_argument(argument: str, replacement, error) -> None:
    arguments = _arguments()
    arguments[argument] = replacement
    del arguments["grad"]
    layout = [arguments.pop(name) for name in ("free_values", "code", "offsets", "a")]
    layout += [layout[-1], arguments.pop("refs")]  # b: a's twin
    with pytest.raises(error, match=f"^{argument}: "):
        stdet_kernels.reconstruct_compact(*layout, **arguments)
    sma = torch.zeros(layout[1].shape)
    with pytest.raises(error, match=f"^{argument}: "):
        stdet_kernels.reconstruct_compact_sma_(*layout, sma, 0.5, **arguments)


@pytest.mark.parametrize(
    ("argument", "replacement", "error"),
    [
        ("grad", torch.zeros(3000, dtype=torch.bfloat16), TypeError),
        ("grad", torch.zeros(2999), ValueError),
        ("grad", None, TypeError),
        ("offsets", torch.zeros(4, dtype=torch.int32), ValueError),
        ("a", torch.zeros(5), ValueError),
        ("refs", torch.zeros(255), ValueError),
    ],
    ids=lambda v: str(v)[:20],
)
def test_fused_backward_rejects_bad_layout(argument: str, replacement, error: type) -> None:
    arguments = _arguments()
    arguments[argument] = replacement
    match = "^(free_values, a|offsets|refs|grad): " if argument != "a" else "^free_values, a: "
    with pytest.raises(error, match=match):
        stdet_kernels.reconstruct_compact_backward_sensitivity_(**arguments)


# ---------------------------------------------------------------------------------------------
# Property test


@st.composite
def problems(draw):
    n = draw(st.integers(min_value=0, max_value=3000))
    modes = draw(st.integers(min_value=1, max_value=254))
    mix = draw(st.sampled_from(MIXES))
    dtype = draw(st.sampled_from((torch.float32, torch.bfloat16, torch.float16)))
    measure = draw(st.sampled_from(("taylor", "fisher")))
    decay = draw(st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=0.999)))
    seed = draw(st.integers(0, 2**20))
    return _problem(n, mix, modes, dtype, dtype, seed=seed), measure, decay


@pytest.fixture(scope="module", params=("cpp", "triton"))
def property_backend(request) -> str:
    """Module-scoped: hypothesis reruns a test body many times within one fixture instance."""
    if request.param not in stdet_kernels.available_backends():
        pytest.skip(f"backend {request.param!r} unavailable here")
    return request.param


@settings(max_examples=40, deadline=None)
@given(drawn=problems())
def test_fused_backward_is_bitwise_the_reference(property_backend: str, drawn) -> None:
    """Same value gradients and the same sensitivity bits as the reference; the refs gradient within
    float32 summation error (its order of summation is the backend's)."""
    (grad, free_values, code, offsets, a, _, refs, sensitivity), measure, decay = drawn
    expected = sensitivity.clone()
    expected_free, _ = reference.reconstruct_compact_backward_sensitivity_(
        grad, free_values, code, offsets, a, refs, expected, decay, measure == "fisher"
    )
    with stdet_kernels.use_backend(property_backend):
        grad_free, grad_refs = stdet_kernels.reconstruct_compact_backward_sensitivity_(
            grad, free_values, code, offsets, a, refs, sensitivity, decay, measure
        )
    assert torch.equal(grad_free, expected_free)
    assert torch.equal(sensitivity, expected)
    exact_refs, refs_bound = compact_refs_bound(grad, code, offsets, a, refs)
    assert_verbose_close("dL/drefs", grad_refs, exact_refs, refs_bound)
