"""bench/bench_step.py's report on synthetic rows: the focused A/B (a subset of models and states) names
itself in its command and leaves out the embedding-period means, whose rows it did not measure. No model."""

import pytest
from helpers import load_bench_script

bench = load_bench_script("bench_step")


def row(total: float) -> dict:
    phases = dict(forward=total * 0.3, backward=total * 0.6, optimizer=total * 0.1, stdet=0.0)
    return dict(
        phases, total=total, ratio_se=0.001, page_faults=0, embedded=0.0, trainable=1, launches=2,
        layers=3, sensitivity_window=44,
    )  # fmt: skip


def rows(arch: str, states) -> dict:
    return {(arch, state): row(100.0 + k) for k, state in enumerate(states)}


def test_a_full_run_reports_the_period_means():
    results = {}
    for arch in bench.MODELS:
        results |= rows(arch, bench.STATES)
    text = bench.report(results, bench.Run(steps=200, interval=50))
    assert "`python bench/bench_step.py --steps 200`" in text
    assert "Over an embedding period" in text
    assert sum(line.startswith(f"- {arch}:") for arch in bench.MODELS for line in text.splitlines()) == 2


def test_a_focused_run_names_its_subset_and_has_no_period_means():
    states = ["80% embedded", "80% embedded, not tracking"]
    results = rows("mbt2018-mean", ["plain", *states])
    text = bench.report(results, bench.Run(steps=400, interval=50, models=["mbt2018-mean"], states=states))
    command = '--steps 400 --models mbt2018-mean --states "80% embedded" "80% embedded, not tracking"`'
    assert command in text
    assert "Over an embedding period" not in text
    table = [line for line in text.splitlines() if line.startswith("| mbt2018-mean")]
    assert [line.split(" | ")[1] for line in table] == ["plain", *states]
    assert "1.020x" in table[-1]  # 102 / 100: the ratio to this run's own plain row


def test_the_command_line_rejects_an_unknown_state(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["bench_step.py", "--states", "95% embedded"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--states" in capsys.readouterr().err
