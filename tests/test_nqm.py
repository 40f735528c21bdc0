"""The NQM closed forms against Monte-Carlo simulation."""

import itertools
import subprocess
import sys

import numpy as np
import pytest

from stdet import nqm

# lr * h from 0.1 to 1.5 (rho positive and negative), alpha 0.1 and 0.5, sampling every 1 and 4 steps.
GRID = [*itertools.product((0.1, 0.5, 1.5), (1.0,), (0.1, 0.5), (1, 4)), (0.5, 0.3, 0.2, 3)]


@pytest.mark.parametrize("mode", ["shadow", "feedback"])
@pytest.mark.parametrize(("lr", "h", "alpha", "every"), GRID)
def test_closed_form_matches_simulation(mode: str, lr: float, h: float, alpha: float, every: int) -> None:
    """20000 independent chains: a variance estimate with about 1% standard error, so 5% is a real test."""
    simulated = nqm.simulate(mode, lr, h, 1.0, alpha, every, replicas=20_000, seed=7)
    closed = nqm.variance(mode, lr, h, 1.0, alpha, every)
    assert simulated.average[0] == pytest.approx(float(closed), rel=0.05)
    if mode == "shadow":  # the live iterate is plain SGD's
        sgd = nqm.variance("sgd", lr, h, 1.0)
        assert simulated.iterate[0] == pytest.approx(float(sgd), rel=0.05)
        if closed < sgd:
            assert simulated.average[0] < simulated.iterate[0]


def test_spectrum_sums_dimensions() -> None:
    h, c = nqm.spectrum(6, 0.3, 1.0)
    simulated = nqm.simulate("shadow", 0.5, h, c, 0.2, 2, replicas=20_000, seed=3)
    closed = nqm.variance("shadow", 0.5, h, c, 0.2, 2)
    assert simulated.average.sum() == pytest.approx(closed.sum(), rel=0.05)
    np.testing.assert_allclose(simulated.average, closed, rtol=0.08)


def test_limits() -> None:
    """alpha = 1 is no averaging: both modes give SGD's variance; shadow with independent samples is
    the EMA of i.i.d. values, alpha / (2 - alpha) of it."""
    sgd = nqm.variance("sgd", 0.3, 0.7, 2.0)
    assert nqm.variance("shadow", 0.3, 0.7, 2.0, 1.0, 5) == pytest.approx(sgd)
    assert nqm.variance("feedback", 0.3, 0.7, 2.0, 1.0, 5) == pytest.approx(sgd)
    independent = nqm.variance("sgd", 1.0, 1.0, 2.0)  # lr * h = 1: rho = 0, samples are independent
    assert nqm.variance("shadow", 1.0, 1.0, 2.0, 0.2, 3) == pytest.approx(independent * 0.2 / 1.8)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="^lr \\* h: "):
        nqm.variance("sgd", 1.0, 2.5, 1.0)
    with pytest.raises(ValueError, match="^alpha: "):
        nqm.variance("shadow", 0.1, 1.0, 1.0, alpha=0.0)
    with pytest.raises(ValueError, match="^every: "):
        nqm.variance("shadow", 0.1, 1.0, 1.0, every=0)
    with pytest.raises(ValueError, match="^mode: "):
        nqm.variance("adam", 0.1, 1.0, 1.0)


def test_cli_prints_the_table_and_saves_the_plot(tmp_path) -> None:
    out = tmp_path / "nqm.png"
    command = [sys.executable, "-m", "stdet", "nqm", "--replicas", "1000", "--dims", "5", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "SMA shadow average" in result.stdout and "SMA feedback average" in result.stdout
    assert out.stat().st_size > 10_000
    bad = subprocess.run([*command[:4], "--lr", "5"], capture_output=True, text=True, timeout=300)
    assert (
        bad.returncode == 2
        and bad.stderr.startswith("stdet nqm: error: lr * h")
        and "Traceback" not in bad.stderr
    )
