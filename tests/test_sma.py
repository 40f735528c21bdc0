"""SMA: the average against PyTorch's own EMA/SWA, the fused one-pass sampling of parametrized
tensors, swap, feedback, export and checkpoints."""

import copy
import math

import pytest
import torch
from compressai.models import FactorizedPrior
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import stdet
import stdet_kernels
from stdet.parametrize import attach, parametrized_tensors


def _batch(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(500 + step)
    coarse = torch.rand(2, 3, 8, 8, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False)


def _loss(model, x):
    out = model(x)
    bpp = sum(torch.log(p).sum() for p in out["likelihoods"].values()) / (-math.log(2) * x.numel() / 3)
    return 0.01 * 255**2 * torch.nn.functional.mse_loss(out["x_hat"], x) + bpp


def _train_step(model, optimizer, step):
    optimizer.zero_grad()
    _loss(model, _batch(step)).backward()
    optimizer.step()


@pytest.mark.parametrize("alpha", [0.1, "uniform"])
def test_every_step_shadow_average_is_pytorchs_ema_or_swa(alpha) -> None:
    torch.manual_seed(0)
    model = FactorizedPrior(N=8, M=12)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sma = stdet.SMA(model, every=1, alpha=alpha)
    if alpha == "uniform":
        reference = AveragedModel(model)  # SWA: the plain mean
    else:
        reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(1 - alpha))
    for step in range(12):
        _train_step(model, optimizer, step)
        sma.step()
        reference.update_parameters(model)
    for name, averaged in reference.module.named_parameters():
        torch.testing.assert_close(sma.averages[name], averaged.detach(), rtol=1e-6, atol=1e-7)


def _attached_model():
    torch.manual_seed(0)
    model = FactorizedPrior(N=8, M=12)
    layout = attach(model, num_modes=2)
    with torch.no_grad():
        layout.refs.copy_(torch.tensor([0.3, -0.2]))
        value, a, b = layout.dense()
        code = layout.code.clone()  # embed a quarter of the elements
        code[torch.rand(code.shape, generator=torch.Generator().manual_seed(1)) < 0.25] = 1
        layout.repack(value, code, torch.ones_like(a) * 0.5, b)
    return model


def test_parametrized_tensors_are_sampled_by_one_fused_kernel_call_in_one_pass() -> None:
    model = _attached_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sma = stdet.SMA(model, every=2, alpha=0.25)
    expected: dict[str, torch.Tensor] = {}
    names = list(parametrized_tensors(model))
    for step in range(8):
        _train_step(model, optimizer, step)
        sampling = (step + 1) % 2 == 0
        # The weights the sample must see, computed by the reference (not through the model, which
        # would take the sample itself).
        state = stdet.embedding_state(model)
        weights = {n: stdet_kernels.reference.reconstruct(**state[n], refs=state["refs"]) for n in names}
        with stdet_kernels.record_calls() as calls:
            sma.step()
            _loss(model, _batch(100 + step))  # the next forward takes the sample
        fused = [c for c in calls if c[0] == "reconstruct_compact_sma_"]
        plain = [c for c in calls if c[0] == "reconstruct_compact"]
        if sampling:
            # One fused pass over the whole flat layout; no separate read of the weights for the sample.
            assert len(fused) == 1, calls
            assert len(plain) == 0, calls
            assert [c[0] for c in calls].count("lerp_") <= 1  # the other tensors, in one call
            for name in names:
                previous = expected.get(name)
                expected[name] = (
                    weights[name] if previous is None else previous + 0.25 * (weights[name] - previous)
                )
        else:
            assert not fused and len(plain) == 1, calls
    for name in names:
        torch.testing.assert_close(sma.averages[name], expected[name], rtol=1e-6, atol=1e-6)


def test_swap_holds_the_averages_and_restores_exactly() -> None:
    model = _attached_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sma = stdet.SMA(model, every=1, alpha=0.5)
    for step in range(3):
        _train_step(model, optimizer, step)
        sma.step()
    live = copy.deepcopy(stdet.export_state_dict(model, raw=True))
    with sma.swap():
        inside = {k: v.clone() for k, v in stdet.export_state_dict(model).items()}
    for name, average in sma.averages.items():
        if name in inside:
            assert torch.equal(inside[name], average), name
    assert not torch.equal(inside["g_a.0.weight"], live["g_a.0.weight"])
    with pytest.raises(RuntimeError, match="boom"), sma.swap():
        raise RuntimeError("boom")
    after = stdet.export_state_dict(model, raw=True)
    assert all(torch.equal(after[k], live[k]) for k in live)
    exported = stdet.export_state_dict(model, sma=sma)
    assert torch.equal(exported["g_a.0.weight"], sma.averages["g_a.0.weight"])
    assert not any(k.endswith(("_quantized_cdf", "_offset", "_cdf_length")) for k in sma.averages)


def test_feedback_sets_live_weights_to_the_average_without_touching_optimizer_state() -> None:
    torch.manual_seed(0)
    model = FactorizedPrior(N=8, M=12)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sma = stdet.SMA(model, every=2, alpha=0.5, mode="feedback")
    for step in range(4):
        _train_step(model, optimizer, step)
        state_before = {k: v.clone() for k, v in optimizer.state[model.g_a[0].weight].items()}
        sma.step()
    assert torch.equal(model.g_a[0].weight, sma.averages["g_a.0.weight"])
    assert all(torch.equal(optimizer.state[model.g_a[0].weight][k], v) for k, v in state_before.items())


def test_state_dict_round_trip_and_bad_arguments() -> None:
    model = FactorizedPrior(N=8, M=12)
    sma = stdet.SMA(model, every=1, alpha=0.5)
    sma.step()
    other = stdet.SMA(model, every=1, alpha=0.5)
    other.load_state_dict(sma.state_dict())
    assert other.samples == 1 and set(other.averages) == set(sma.averages)
    with pytest.raises(ValueError, match="^state: saved with every=1"):
        stdet.SMA(model, every=2, alpha=0.5).load_state_dict(sma.state_dict())
    with pytest.raises(ValueError, match="^every: "):
        stdet.SMA(model, every=0)
    with pytest.raises(ValueError, match="^alpha: "):
        stdet.SMA(model, alpha=1.5)
    with pytest.raises(TypeError, match="^alpha: "):
        stdet.SMA(model, alpha="mean")
    with pytest.raises(ValueError, match="^mode: "):
        stdet.SMA(model, mode="lookahead")
    with pytest.raises(TypeError, match="^model: "):
        stdet.SMA(object())


STDET_CONFIG = dict(
    warmup_steps=20,
    snapshots=10,
    modes=4,
    samples=200,
    embed_every=5,
    embed_rate=0.3,
    safety_window=5,
    start="warmup",  # embedding from the warm-up's end, not when the loss is flat
)


def _stdet_run(mode: str, steps: int):
    torch.manual_seed(0)
    model = FactorizedPrior(N=8, M=12)
    optimizer = torch.optim.Adam(
        [p for n, p in model.named_parameters() if not n.endswith(".quantiles")], lr=1e-3
    )
    config = stdet.STDETConfig(**STDET_CONFIG, sma_every=2, sma_alpha=0.5, sma_mode=mode)
    st = stdet.STDET(model, optimizer, config)
    for step in range(steps):
        optimizer.zero_grad()
        loss = _loss(model, _batch(step))
        loss.backward()
        optimizer.step()
        st.step(loss)
    return model, optimizer, st


def test_averages_survive_attaching_and_embedding_rounds() -> None:
    model, _, st = _stdet_run("shadow", 19)
    before_attach = st.sma.averages["g_a.0.weight"].clone()
    samples_before = st.sma.samples
    model, _, st = _stdet_run("shadow", 31)  # same run, on through attach and two rounds
    assert [h["event"] for h in st.history][:3] == ["fit", "attach", "round"]
    assert st.sma.samples == samples_before + 6
    average = st.sma.averages["g_a.0.weight"]
    assert average.shape == before_attach.shape and not torch.equal(average, before_attach)
    # The average went on from the plain weight's: no restart at attach time (first sample = copy).
    assert not torch.equal(average, stdet.export_state_dict(model, raw=True)["g_a.0.weight"])
    exported = stdet.export_state_dict(model, sma=st.sma)
    assert torch.equal(exported["g_a.0.weight"], average)


def test_feedback_through_stdet_writes_free_values_and_references() -> None:
    model, _, st = _stdet_run("feedback", 30)  # step 30 is a sampling step, after two rounds
    live = stdet.export_state_dict(model, raw=True)
    flat_live = torch.cat([live[name].reshape(-1) for name in st.names])
    average = torch.cat([st.sma.averages[name].reshape(-1) for name in st.names])
    free = st.layout.code == stdet_kernels.FREE
    assert torch.equal(flat_live[free], average[free])
    for mode, index in enumerate(st.references.tolist()):
        assert float(flat_live[index]) == pytest.approx(float(average[index]), abs=1e-6)
        assert float(st.refs[mode].detach()) == pytest.approx(float(average[index]), abs=1e-6)


def test_compressing_with_the_averages_updates_the_cdf_tables_and_puts_them_back() -> None:
    torch.manual_seed(0)
    model = FactorizedPrior(N=8, M=12)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sma = stdet.SMA(model, every=1, alpha=0.5)
    for step in range(4):
        _train_step(model, optimizer, step)
        sma.step()
    model.update(force=True)
    live_cdf = model.entropy_bottleneck._quantized_cdf.clone()
    x = _batch(0)[:1]
    model.eval()
    with sma.swap(update_entropy_models=True), torch.no_grad():
        averaged_cdf = model.entropy_bottleneck._quantized_cdf.clone()
        coded = model.compress(x)
        decoded = model.decompress(coded["strings"], coded["shape"])
    assert decoded["x_hat"].shape == x.shape
    assert not torch.equal(averaged_cdf, live_cdf) or averaged_cdf.shape != live_cdf.shape
    assert torch.equal(model.entropy_bottleneck._quantized_cdf, live_cdf)
    with pytest.raises(TypeError, match="^model: has no update"), stdet.SMA(torch.nn.Linear(2, 2)).swap(True):
        pass


# ----------------------------------------------------------------------------------------------
# The SMA guard's rule


def test_the_guard_hands_out_the_average_only_on_a_paired_win_by_more_than_sigmas_standard_errors() -> None:
    from stdet.sma import average_is_better, paired_difference

    live = torch.tensor([1.0, 2.0, 3.0, 4.0])
    clear = live - torch.tensor([0.10, 0.11, 0.09, 0.10])  # lower on every crop, little spread
    noisy = live - torch.tensor([0.40, -0.30, 0.35, -0.25])  # lower on average, by less than its spread
    mean, se = paired_difference(live, noisy)
    assert mean == pytest.approx(-0.05) and se == pytest.approx(float((noisy - live).std()) / 2)
    assert average_is_better(live, clear, 2.0)
    assert not average_is_better(live, noisy, 2.0)
    assert average_is_better(live, noisy, 0.0)  # 0: the plain comparison of the means
    assert average_is_better(live, live.clone(), 0.0) and not average_is_better(live, live.clone(), 2.0)
    assert not average_is_better(live, live + 0.01, 0.0)
    one = torch.tensor([2.0])
    assert paired_difference(one, one - 1) == (-1.0, 0.0)  # one crop: no spread to measure
    assert average_is_better(one, one - 1, 0.0) and not average_is_better(one, one + 1, 0.0)
    assert not average_is_better(one, one - 1, 2.0)  # one crop proves nothing: the live weights stay


def test_the_guard_hands_out_the_finite_side_where_a_probe_loss_is_not_finite() -> None:
    from stdet.sma import average_is_better

    good, bad = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, math.nan, 3.0])
    for sigmas in (0.0, 2.0):
        assert average_is_better(bad, good, sigmas)  # the live weights diverged
        assert not average_is_better(good, bad, sigmas)
        assert not average_is_better(bad, torch.tensor([1.0, 2.0, math.inf]), sigmas)


@pytest.mark.parametrize(
    ("live", "average", "sigmas", "error", "name"),
    [
        (torch.ones(3), torch.ones(4), 2.0, ValueError, "live, average"),
        (torch.ones(2, 2), torch.ones(2, 2), 2.0, ValueError, "live, average"),
        (torch.ones(0), torch.ones(0), 2.0, ValueError, "live, average"),
        ([1.0, 2.0], torch.ones(2), 2.0, TypeError, "live"),
        (torch.ones(2), (1.0, 2.0), 2.0, TypeError, "average"),
        (torch.ones(2), torch.ones(2), -1.0, ValueError, "sigmas"),
        (torch.ones(2), torch.ones(2), math.inf, ValueError, "sigmas"),
        (torch.ones(2), torch.ones(2), True, ValueError, "sigmas"),
    ],
)
def test_the_guard_rule_names_a_bad_argument(live, average, sigmas, error, name) -> None:
    from stdet.sma import average_is_better

    with pytest.raises(error, match=f"^{name}"):
        average_is_better(live, average, sigmas)


def test_the_guard_rule_is_paired_and_asks_more_with_more_sigmas() -> None:
    """Adding the same loss to both weights' crops (the crops' own difficulty) changes nothing; a win
    at some sigmas is a win at any fewer."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    # Eighths of integers: every sum and difference below is exact, so "changes nothing" is exact.
    value = st.integers(-800, 800).map(lambda n: n / 8)

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.tuples(value, value, value), min_size=1, max_size=16),
        st.floats(0, 5),
        st.floats(0, 5),
    )
    def check(rows, low, high) -> None:
        from stdet.sma import average_is_better

        low, high = sorted((low, high))
        live = torch.tensor([r[0] for r in rows], dtype=torch.float64)
        average = torch.tensor([r[1] for r in rows], dtype=torch.float64)
        offset = torch.tensor([r[2] for r in rows], dtype=torch.float64)
        if average_is_better(live, average, high):
            assert average_is_better(live, average, low)
        for sigmas in (low, high):
            assert average_is_better(live + offset, average + offset, sigmas) == average_is_better(
                live, average, sigmas
            )

    check()
