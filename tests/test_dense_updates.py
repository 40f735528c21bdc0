"""The element-wise updates STDET makes outside the reconstruction: the online refit's moments
(`stdet_kernels.refit_update_`) and the sensitivity of a dense tensor (`sensitivity_update_`, the
gradient hooks before the model is laid out). C++ against the reference, bit for bit; against float64
Welford and against the fused backward's own sensitivity; bad arguments."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import stdet_kernels

SIZES = (1, 2, 1023, 4097, 100_003)


def _case(n: int, modes: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=generator).to(dtype)
    moments = [torch.randn(n, generator=generator) for _ in range(3)]
    moments[1] = moments[1].abs()  # a second moment is not negative
    mode = torch.randint(0, max(modes, 1), (n,), generator=generator, dtype=torch.uint8)
    deviation = torch.randn(modes, generator=generator)
    return values, moments, mode, deviation


def _run(backend: str, values, moments, mode, deviation, count: int) -> list[torch.Tensor]:
    mean, moment2, comoment = (m.clone() for m in moments)
    with stdet_kernels.use_backend(backend):
        stdet_kernels.refit_update_(values, mean, moment2, comoment, mode, deviation, count)
        assert stdet_kernels.last_backend() == backend
    return [mean, moment2, comoment]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("modes", (0, 1, 254))
@pytest.mark.parametrize("n", SIZES)
def test_cpp_matches_the_reference_bit_for_bit(n: int, modes: int, dtype: torch.dtype) -> None:
    if "cpp" not in stdet_kernels.available_backends():
        pytest.skip("the C++ extension is not built")
    case = _case(n, modes, dtype)
    for count in (1, 2, 7):
        expected = _run("torch", *case, count)
        got = _run("cpp", *case, count)
        for name, g, e in zip(("mean", "moment2", "comoment"), got, expected, strict=True):
            assert torch.equal(g, e), (name, (g - e).abs().max())
    if modes == 0:  # no references: the co-moments stay as they were
        assert torch.equal(got[2], case[1][2])


def test_the_result_does_not_depend_on_the_thread_count() -> None:
    case = _case(100_003, 10, torch.float32)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_run("cpp", *case, 5))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for other in results[1:] for a, b in zip(results[0], other, strict=True))


@settings(max_examples=30, deadline=None)
@given(
    snapshots=st.lists(st.floats(-4, 4, width=32), min_size=2, max_size=12),
    refs=st.lists(st.floats(-4, 4, width=32), min_size=12, max_size=12),
)
def test_welford_steps_give_the_exact_moments(snapshots: list[float], refs: list[float]) -> None:
    """Fed one snapshot at a time (the reference's own moments updated as `OnlineRefit` does), the
    moments are the float64 mean, sum of squared deviations and co-moment, to float32 accuracy."""
    w_all = torch.tensor(snapshots, dtype=torch.float64)
    r_all = torch.tensor(refs[: len(snapshots)], dtype=torch.float64)
    mean, moment2, comoment = (torch.zeros(1) for _ in range(3))
    ref_mean = torch.zeros(1)
    for k, (w, r) in enumerate(zip(w_all.float(), r_all.float(), strict=True), start=1):
        delta_r = r - ref_mean
        ref_mean += delta_r / k
        stdet_kernels.refit_update_(
            w.reshape(1), mean, moment2, comoment, torch.zeros(1, dtype=torch.uint8), r - ref_mean, k
        )
    w_all, r_all = w_all.float().double(), r_all.float().double()
    scale = 1.0 + float((w_all.abs().max() + r_all.abs().max()) ** 2) * len(snapshots)
    assert float(mean) == pytest.approx(float(w_all.mean()), abs=1e-5 * scale)
    assert float(moment2) == pytest.approx(float(((w_all - w_all.mean()) ** 2).sum()), abs=1e-5 * scale)
    expected = float(((w_all - w_all.mean()) * (r_all - r_all.mean())).sum())
    assert float(comoment) == pytest.approx(expected, abs=1e-5 * scale)


def test_bad_arguments_name_the_argument() -> None:
    values, (mean, moment2, comoment), mode, deviation = _case(10, 3, torch.float32)
    good = dict(
        values=values, mean=mean, moment2=moment2, comoment=comoment, mode=mode, ref_deviation=deviation
    )
    for name, bad, error in [
        ("values", values.long(), TypeError),
        ("values", [1.0], TypeError),
        ("mean", mean.double(), TypeError),
        ("moment2", moment2[:5], ValueError),
        ("comoment", comoment.half(), TypeError),
        ("mode", mode.long(), TypeError),
        ("mode", mode[:3], ValueError),
        ("mode", torch.full_like(mode, 3), ValueError),  # only 3 modes: 0, 1, 2
        ("ref_deviation", deviation.double(), TypeError),
        ("ref_deviation", deviation.reshape(3, 1), ValueError),
    ]:
        with pytest.raises(error, match=f"^{name}: "):
            stdet_kernels.refit_update_(**{**good, name: bad}, count=1)
    for count in (0, 1.5, True):
        with pytest.raises(ValueError, match="^count: "):
            stdet_kernels.refit_update_(**good, count=count)


# ---------------------------------------------------------------------------------------------
# sensitivity_update_


def _sensitivity_case(n: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(n, generator=generator).to(dtype)
    value = torch.randn(n, generator=generator).to(dtype)
    running = torch.rand(n, generator=generator)
    return grad, value, running


@pytest.mark.parametrize("measure", ("taylor", "fisher"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_sensitivity_cpp_matches_the_reference_and_the_fused_backward(dtype, measure) -> None:
    """Bit for bit, over tensors of every size at once (one launch): the C++ kernel, the reference,
    and the fused backward's update on an all-FREE compact layout of the same values (what the
    layout's backward does after the first round)."""
    if "cpp" not in stdet_kernels.available_backends():
        pytest.skip("the C++ extension is not built")
    cases = [_sensitivity_case(n, dtype, seed=n) for n in SIZES]
    grads, values, runnings = (list(t) for t in zip(*cases, strict=True))
    results = {}
    for backend in ("torch", "cpp"):
        got = [r.clone() for r in runnings]
        with stdet_kernels.use_backend(backend), stdet_kernels.record_calls() as calls:
            stdet_kernels.sensitivity_update_(got, grads, values, 0.9, measure)
        assert calls == [("sensitivity_update_", backend)]
        results[backend] = got
    for k, (grad, value, running) in enumerate(cases):
        n = grad.numel()
        code = torch.full((n,), stdet_kernels.FREE, dtype=torch.uint8)
        zeros = torch.zeros(n, dtype=dtype)
        packed, offsets, a, _ = stdet_kernels.pack(value, code, zeros, zeros, dtype)
        fused = running.clone()
        stdet_kernels.reconstruct_compact_backward_sensitivity_(
            grad, packed, code, offsets, a, torch.zeros(1, dtype=dtype), fused, 0.9, measure
        )
        assert torch.equal(results["cpp"][k], results["torch"][k]), SIZES[k]
        assert torch.equal(results["cpp"][k], fused), SIZES[k]


def test_sensitivity_update_of_shaped_mixed_tensors() -> None:
    """Shaped and non-contiguous tensors, mixed dtypes (one launch per dtype), an empty list."""
    grad, value, running = (t.reshape(7, 3, 5) for t in _sensitivity_case(105, torch.float32))
    small = _sensitivity_case(9, torch.bfloat16)
    targets = [running.clone(), small[2].clone()]
    strided = grad.transpose(0, 2).contiguous().transpose(0, 2)  # same values, other strides
    with stdet_kernels.record_calls() as calls:
        stdet_kernels.sensitivity_update_(targets, [strided, small[0]], [value, small[1]], 0.5, "fisher")
    assert len(calls) == 2
    assert torch.equal(targets[0], 0.5 * running + 0.5 * grad * grad)
    stdet_kernels.sensitivity_update_([], [], [], 0.5)


def test_sensitivity_update_bad_arguments_name_the_argument() -> None:
    grad, value, running = _sensitivity_case(10, torch.float32)
    good = dict(sensitivities=[running], grads=[grad], values=[value], decay=0.9)
    for name, bad, error, match in [
        ("grads", [grad.long()], TypeError, "grads[0]"),
        ("grads", grad, TypeError, "grads"),
        ("grads", [None], TypeError, "grads[0]"),
        ("values", [value.double()], TypeError, "values[0]"),
        ("values", [value[:4]], ValueError, "values[0]"),
        ("values", [value, value], ValueError, "grads, values"),
        ("sensitivities", [running.double()], TypeError, "sensitivities[0]"),
        ("sensitivities", [running.reshape(2, 5)], ValueError, "sensitivities[0]"),
        ("sensitivities", [running.clone().requires_grad_()], ValueError, "sensitivities[0]"),
        ("decay", 1.0, ValueError, "decay"),
        ("decay", -0.1, ValueError, "decay"),
    ]:
        with pytest.raises(error, match="^" + match.replace("[", r"\[").replace("]", r"\]") + ": "):
            stdet_kernels.sensitivity_update_(**{**good, name: bad})
    with pytest.raises(ValueError, match="^measure: "):
        stdet_kernels.sensitivity_update_(**good, measure="magnitude")
