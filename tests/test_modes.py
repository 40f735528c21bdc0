"""Trajectory recording and mode discovery on trajectories with planted modes."""

import pytest
import torch

from stdet.modes import OnlineRefit, fit_modes, sample_balanced
from stdet.trajectory import TrajectoryRecorder, layout


def planted(snapshots: int = 20, per_mode: int = 400, modes: int = 4, noise: float = 0.0, seed: int = 0):
    """Trajectories in which element i follows a_i * ref_{m(i)}(t) + b_i (+ noise): known modes."""
    generator = torch.Generator().manual_seed(seed)
    # Random walks, made uncorrelated (orthogonal centred columns): the planted modes are distinct.
    walks = torch.randn(snapshots, modes, generator=generator).cumsum(0)
    refs = torch.linalg.qr(walks - walks.mean(0)).Q * snapshots**0.5 + walks.mean(0)
    mode = torch.arange(modes).repeat_interleave(per_mode)
    a = torch.randn(modes * per_mode, generator=generator) + 2.0 * torch.sign(
        torch.randn(modes * per_mode, generator=generator)
    )
    b = torch.randn(modes * per_mode, generator=generator)
    x = refs[:, mode] * a + b + noise * torch.randn(snapshots, modes * per_mode, generator=generator)
    return x, mode, a, b


def test_recorder_keeps_the_snapshots_of_every_tensor() -> None:
    weight, bias = torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))
    recorder = TrajectoryRecorder({"weight": weight, "bias": bias}, snapshots=3, dtype=torch.float16)
    for step in range(3):
        with torch.no_grad():
            weight.fill_(step)
            bias.fill_(-step)
        recorder.record()
    rows = recorder.trajectories()
    assert rows.shape == (3, 10) and rows.dtype == torch.float16 and recorder.nbytes() == 3 * 10 * 2
    assert torch.equal(rows[:, :6].float(), torch.arange(3.0)[:, None].expand(3, 6))
    assert torch.equal(rows[:, 6:].float(), -torch.arange(3.0)[:, None].expand(3, 4))
    with pytest.raises(RuntimeError, match="all 3 snapshots"):
        recorder.record()


def test_recorder_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="^tensors: "):
        TrajectoryRecorder({}, snapshots=3)
    with pytest.raises(ValueError, match="^snapshots: "):
        TrajectoryRecorder({"w": torch.zeros(2)}, snapshots=1)
    with pytest.raises(TypeError, match="^dtype: "):
        TrajectoryRecorder({"w": torch.zeros(2)}, snapshots=3, dtype=torch.int32)


def test_balanced_sampling_spreads_over_tensors() -> None:
    slices = layout({"big": torch.zeros(10_000), "small": torch.zeros(5), "medium": torch.zeros(300)})
    chosen = sample_balanced(slices, 300, torch.Generator().manual_seed(0))
    assert chosen.numel() == 300 and chosen.unique().numel() == 300
    per_tensor = [int(((chosen >= s.start) & (chosen < s.stop)).sum()) for s in slices]
    assert per_tensor[1] == 5  # the small tensor gives all it has
    assert abs(per_tensor[0] - per_tensor[2]) <= 1  # the rest is split evenly
    assert sample_balanced(slices, 10**6, torch.Generator()).numel() == 10_305


def test_planted_modes_are_recovered() -> None:
    x, mode, _, _ = planted()
    fit = fit_modes(x, layout({"w": torch.zeros(x.shape[1])}), samples=200, modes=4)
    assert fit.num_modes == 4
    # The discovered modes are the planted ones up to relabelling.
    relabel = {int(mode[r]): m for m, r in enumerate(fit.references.tolist())}
    assert sorted(relabel) == [0, 1, 2, 3]
    expected_mode = torch.tensor([relabel[int(m)] for m in mode], dtype=torch.uint8)
    assert torch.equal(fit.mode, expected_mode)
    assert fit.r2.min() > 0.9999
    # Reconstructing from the fitted line and the reference trajectories gives back the trajectories.
    ref_traj = x[:, fit.references]
    rebuilt = fit.a * ref_traj[:, fit.mode.long()] + fit.b
    torch.testing.assert_close(rebuilt, x, rtol=1e-4, atol=1e-3)
    assert torch.equal(fit.a[fit.references], torch.ones(4)) and torch.equal(
        fit.b[fit.references], torch.zeros(4)
    )


def test_noise_lowers_r2_but_keeps_the_modes() -> None:
    """With noise, each element still follows a reference of its own planted mode."""
    x, mode, _, _ = planted(noise=0.5, seed=1)
    fit = fit_modes(x, layout({"w": torch.zeros(x.shape[1])}), samples=300, modes=4)
    planted_of_reference = mode[fit.references]
    assert planted_of_reference.unique().numel() == 4
    agree = planted_of_reference[fit.mode.long()] == mode
    assert agree.float().mean() > 0.95
    assert 0.3 < fit.r2.median() < 0.9999


def test_constant_trajectories_give_finite_coefficients() -> None:
    x, _, _, _ = planted(per_mode=50)
    x = torch.cat([x, torch.full((x.shape[0], 30), 3.5), torch.zeros(x.shape[0], 10)], dim=1)
    fit = fit_modes(x, layout({"w": torch.zeros(x.shape[1])}), samples=1000, modes=4)
    assert all(bool(torch.isfinite(t).all()) for t in (fit.a, fit.b, fit.r2))
    assert torch.equal(fit.a[-40:], torch.zeros(40))
    assert torch.equal(fit.b[-40:-10], torch.full((30,), 3.5)) and torch.equal(fit.r2[-40:], torch.zeros(40))
    assert not bool(torch.isin(fit.references, torch.arange(x.shape[1] - 40, x.shape[1])).any())


def test_all_constant_gives_no_modes() -> None:
    x = torch.ones(5, 20)
    fit = fit_modes(x, layout({"w": torch.zeros(20)}), samples=10, modes=3)
    assert fit.num_modes == 0 and torch.equal(fit.b, torch.ones(20)) and torch.equal(fit.a, torch.zeros(20))


def test_chunking_does_not_change_the_fit() -> None:
    x, _, _, _ = planted(per_mode=100, noise=0.1)
    slices = layout({"w": torch.zeros(x.shape[1])})
    whole = fit_modes(x, slices, samples=100, modes=4, generator=torch.Generator().manual_seed(3))
    pieces = fit_modes(x, slices, samples=100, modes=4, generator=torch.Generator().manual_seed(3), chunk=37)
    for name in ("references", "mode", "a", "b", "r2"):
        torch.testing.assert_close(getattr(pieces, name), getattr(whole, name), rtol=1e-6, atol=1e-6)


def test_fit_modes_rejects_bad_input() -> None:
    x = torch.randn(5, 20)
    slices = layout({"w": torch.zeros(20)})
    with pytest.raises(ValueError, match="^modes: "):
        fit_modes(x, slices, modes=0)
    with pytest.raises(ValueError, match="^modes: "):
        fit_modes(x, slices, modes=255)
    with pytest.raises(ValueError, match="^trajectories: expected at least 2"):
        fit_modes(x[:1], slices)
    with pytest.raises(ValueError, match="^slices: "):
        fit_modes(x, layout({"w": torch.zeros(19)}))
    bad = x.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="^trajectories: contain NaN"):
        fit_modes(bad, slices)


def test_online_refit_equals_least_squares_over_all_snapshots() -> None:
    """Warm-up fit, then snapshots one at a time: the coefficients are those of a batch least-squares
    fit over the warm-up and later snapshots together, with the same references and modes."""
    x, _, _, _ = planted(snapshots=40, per_mode=100, noise=0.3, seed=4)
    slices = layout({"w": torch.zeros(x.shape[1])})
    fit = fit_modes(x[:20], slices, samples=200, modes=4)
    refit = OnlineRefit(fit)
    for row in x[20:]:
        refit.update(row)
    a, b, r2 = refit.coefficients()
    xd = x.double()
    ref = xd[:, fit.references][:, fit.mode.long()]
    ref_c, w_c = ref - ref.mean(0), xd - xd.mean(0)
    a_batch = (ref_c * w_c).sum(0) / ref_c.square().sum(0)
    b_batch = xd.mean(0) - a_batch * ref.mean(0)
    r2_batch = (ref_c * w_c).sum(0).square() / (ref_c.square().sum(0) * w_c.square().sum(0))
    torch.testing.assert_close(a, a_batch.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b, b_batch.float(), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(r2, r2_batch.float(), rtol=1e-4, atol=1e-4)
