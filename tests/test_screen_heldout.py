"""bench/screen_heldout.py's summaries and verdict, on synthetic per-photo records. No model."""

import sys

import pytest
from helpers import BENCH, load_bench_script


@pytest.fixture(scope="module")
def screen():
    sys.path.insert(0, str(BENCH))  # it imports screen_guard as the scripts do
    try:
        yield load_bench_script("screen_heldout")
    finally:
        sys.path.remove(str(BENCH))


def photo(mse, bpp):
    return {"rd_loss": 0.0, "mse": mse, "bpp": bpp, "estimated_bpp": bpp}


def run(seed, average_mse, lmbda=0.01):
    """Two photos; the live weights at MSE 0.01 and bpp 0.5 on both, the average at `average_mse`
    and 1% fewer bits."""
    live = {"a": photo(0.01, 0.5), "b": photo(0.01, 0.5)}
    average = {name: photo(mse, 0.495) for name, mse in zip(live, average_mse, strict=True)}
    return {"lmbda": lmbda, "seed": seed, "live": live, "average": average, "average_live_quantiles": average}


def test_noise_around_zero_holds_and_a_consistent_harm_falsifies(screen):
    noisy = [run(0, (0.0102, 0.0099)), run(1, (0.0099, 0.0101)), run(2, (0.0101, 0.0100))]
    summary = screen.track_summary(noisy)
    assert summary["runs"] == 3 and summary["mixed_runs"] == 2 and summary["rate_lower"] == 3
    assert summary["photos_lower"] == 2 and summary["photos"] == 6
    assert abs(summary["rate"] + 0.01) < 1e-12 and summary["coding"] == 0.0 and summary["quantiles"] == 0.0
    assert abs(summary["mean"]) < 2 * summary["se"]
    assert "Hypothesis holds" in "\n".join(screen.verdict({"finetune": noisy}))

    harmful = [run(0, (0.0102, 0.0103)), run(1, (0.0103, 0.0102)), run(2, (0.0102, 0.0102))]
    assert screen.track_summary(harmful)["mixed_runs"] == 0
    assert "Hypothesis falsified" in "\n".join(screen.verdict({"finetune": harmful}))


def test_rd_change_weighs_distortion_by_lambda_and_reads_the_chosen_bpp(screen):
    r = run(0, (0.0110, 0.0110), lmbda=0.02)
    live_rd = 0.02 * 255.0**2 * 0.01 + 0.5
    average_rd = 0.02 * 255.0**2 * 0.011 + 0.495
    assert abs(screen.rd_change(r, "average") - (average_rd / live_rd - 1)) < 1e-12
    r["average"]["a"]["estimated_bpp"] = r["average"]["b"]["estimated_bpp"] = 1.495
    assert screen.rd_change(r, "average", "estimated_bpp") > screen.rd_change(r, "average")
    report = screen.report({"finetune": [r, run(1, (0.0099, 0.0101))]})
    assert "| finetune | 0.02 | 0 |" in report and "## Verdict" in report
