"""The study's pure helpers (bench/study.py): the plan, the lr calibration rule, steps to reach from
complete runs, and the tables read from synthetic results. No training runs here."""

import math
from dataclasses import replace

import pytest
from helpers import load_bench_script

study = load_bench_script("study")


def test_calibrated_lr_is_the_largest_that_still_improves_steadily():
    def curve(*losses):  # evals at S/4, S/2, 3S/4, S with S = 400
        return dict(zip((100, 200, 300, 400), losses, strict=True))

    curves = {
        1e-4: curve(4.0, 3.0, 2.8, 2.7),
        3e-4: curve(3.5, 2.8, 2.7, 2.6),
        5e-4: curve(3.2, 2.7, 2.69, 2.68),  # 0.7% from S/2 to S: not 2%
        1e-3: curve(3.0, 2.5, 3.2, 2.3),  # falls by S, but jumps back up on the way: a noise plateau
    }
    assert study.calibrated_lr(curves, 400, margin=0.02) == 3e-4
    assert study.calibrated_lr({1e-3: curves[1e-3]}, 400) is None
    assert study.steady(curve(9, 9, 8.9, 8.0), 400) and not study.steady(curve(9, 9, 9.5, 8.0), 400)


def test_reach_fraction_interpolates_between_complete_runs():
    points = [(0.4, 3.0), (0.6, 2.5), (0.8, 2.1), (1.0, 2.0)]
    fraction, how = study.reach_fraction(points, 2.3)
    assert how == "interpolated"
    assert fraction == pytest.approx(0.7)  # halfway from 2.5 (0.6 S) to 2.1 (0.8 S)
    assert study.reach_fraction(points, 3.5) == (0.4, "at most")
    assert study.reach_fraction(points, 1.5) == (math.inf, "not reached")
    assert study.reach_fraction(list(reversed(points)), 2.0) == (pytest.approx(1.0), "interpolated")


def test_budgets_and_stdet_knobs_scale_with_the_run():
    plan = study.PLANS["full"]
    assert study.budgets_at(plan, plan.extra_lambda) == (0.4, 0.6, 0.8, 1.0)
    assert study.budgets_at(plan, 0.0483) == (0.6, 1.0)
    assert study.budget_steps(1200, 0.6) == 720
    knobs = study.stdet_knobs(720)
    assert knobs == {"warmup_steps": 144, "snapshots": 20, "embed_every": 14}
    assert study.stdet_knobs(8) == {"warmup_steps": 2, "snapshots": 2, "embed_every": 1}


def test_full_plan_runs_every_method_on_its_own_complete_schedule(tmp_path):
    plan = study.PLANS["full"]
    runs = study.study_runs(plan, tmp_path, tmp_path / "photos", "pretrained.pth")
    # 2 tracks x 3 seeds x (3 lambdas x 2 budgets + 1 lambda x 4 budgets) x 2 runs (adam, stdet).
    assert len(runs) == 2 * 3 * (3 * 2 + 4) * 2
    assert len(plan.seeds) >= 3 and len(plan.lambdas) >= 4
    for meta, config in runs.values():
        assert config.steps == study.budget_steps(plan.steps, meta["budget"])
        assert (config.lr, config.lr_schedule, config.lr_milestones) == (study.LR, "step", [study.DROP_AT])
        assert config.sma_every == plan.sma_every and config.sma_alpha == study.SMA_ALPHA
        assert config.init == ("pretrained.pth" if meta["track"] == "finetune" else None)
        assert config.method == meta["kind"]
        assert config.eval_data == str(tmp_path / "photos")
        if meta["kind"] == "stdet":
            assert config.warmup_steps == config.steps // 5
    pretrain = study.pretrain_config(plan, tmp_path, tmp_path / "photos")
    assert (pretrain.lmbda, pretrain.seed, pretrain.method) == (study.PRETRAIN_LMBDA, 0, "adam")
    assert pretrain.lmbda < min(plan.lambdas)
    assert pretrain.steps == plan.pretrain_steps
    calibration = study.calibration_runs(plan, tmp_path, tmp_path)
    assert sorted(calibration) == sorted(study.CALIBRATION_LRS)
    for lr, config in calibration.items():
        assert (config.lr, config.lr_schedule, config.steps) == (lr, "constant", plan.steps)


def test_policy_screens_judge_against_the_quick_plans_own_adam_runs(tmp_path):
    """A screen's Adam runs must be the quick plan's (same folder, same configuration), so that they come
    from its cache and every variant is judged against the same baseline; variants change only their
    knobs."""
    plan = study.PLANS["quick"]
    quick = study.study_runs(plan, tmp_path, tmp_path, "init")
    for name, (_, variants) in study.SCREENS.items():
        runs = study.screen_runs(plan, tmp_path, tmp_path, "init", name)
        settings = study.SCREEN_SETTINGS.get(name, {})
        steps, tracks = settings.get("steps", plan.steps), settings.get("tracks", study.TRACKS)
        adam = {run: config for run, (meta, config) in runs.items() if meta["variant"] == "Adam"}
        assert len(adam) == len(tracks)
        for run, config in adam.items():
            if settings:  # a screen of its own S, tracks or horizon: Adam runs of its own too
                assert run.startswith(f"screens/{name}/") and config.method == "adam"
                assert config.steps == steps and config.sma_alpha == settings.get("alpha", config.sma_alpha)
            else:
                assert config.to_toml() == quick[run][1].to_toml()
        stdet = [(meta, config) for meta, config in runs.values() if meta["variant"] != "Adam"]
        assert len(stdet) == len(variants) * len(tracks)
        for meta, config in stdet:
            assert config.method == "stdet" and config.steps == steps
            assert config.init == ("init" if meta["track"] == "finetune" else None)
            knobs = variants[meta["variant"]]
            if "warmup" in knobs:
                assert config.warmup_steps == study.budget_steps(steps, knobs["warmup"])
            else:
                assert config.warmup_steps == steps // 5
            for knob, value in knobs.items():
                if knob != "warmup":
                    assert getattr(config, knob) == value
    # Over several seeds, each seed's Adam run is the full study's run of that seed.
    screens_alpha = replace(study.PLANS["full"], sma_alphas=(study.SCREEN_SMA_ALPHA,))
    full = study.study_runs(screens_alpha, tmp_path, tmp_path, "init")
    runs = study.screen_runs(plan, tmp_path, tmp_path, "init", "best", seeds=(0, 1, 2))
    adam = {run: config for run, (meta, config) in runs.items() if meta["variant"] == "Adam"}
    assert len(adam) == 3 * len(study.TRACKS)
    for run, config in adam.items():
        assert config.to_toml() == full[run][1].to_toml()
    assert len({config.out for config in (c for _, c in runs.values())}) == len(runs)


def test_quick_screen_runs_the_adam_cell_at_each_ema_horizon(tmp_path):
    plan = study.PLANS["quick"]
    assert plan.sma_alphas[0] == study.SMA_ALPHA
    assert sorted(plan.sma_alphas) == sorted(study.SMA_ALPHAS)
    runs = study.study_runs(plan, tmp_path, tmp_path, "init")
    kinds = {(meta["kind"], meta["alpha"]) for meta, _ in runs.values()}
    assert kinds == {("adam", a) for a in study.SMA_ALPHAS} | {("stdet", study.SMA_ALPHA)}
    assert {meta["budget"] for meta, _ in runs.values()} == {0.6, 1.0}


def test_time_estimate_counts_steps_evals_and_processes():
    plan = study.PLANS["full"]
    work = study.planned_work(plan)
    per_track = 2 * 3 * (3 * 1.6 + 2.8) * plan.steps
    assert work["steps"] == pytest.approx(2 * per_track + plan.pretrain_steps, abs=100)
    assert work["processes"] == 121
    study_s, calibration_s = study.estimate_seconds(work, 0.1, 2.0, 3.0, jobs=2)
    expected = (work["steps"] * 0.1 + work["evals"] * 2.0 + work["processes"] * 3.0) / 2
    assert study_s == pytest.approx(expected)
    assert calibration_s > 0


def _synthetic_records(plan, gain: dict[str, float]) -> list[dict]:
    """Records whose RD loss falls with the budget; `gain` scales it per method (< 1: better)."""
    records = []
    for track in study.TRACKS:
        for lmbda in plan.lambdas:
            for seed in plan.seeds:
                for budget in study.budgets_at(plan, lmbda):
                    for method, factor in gain.items():
                        loss = (1.0 + 0.5 * (1.0 - budget)) * factor * (1 + 10 * lmbda)
                        bpp = 0.1 + 5 * lmbda
                        psnr = 25 + 100 * lmbda + 2 * (budget - 1) + 5 * (1 - factor)
                        records.append(
                            {
                                "track": track,
                                "lmbda": lmbda,
                                "seed": seed,
                                "budget": budget,
                                "alpha": plan.sma_alphas[0],
                                "method": method,
                                "rd_loss": loss,
                                "bpp": bpp,
                                "psnr": psnr,
                            }
                        )
    return records


def test_summarize_reads_reach_bd_rate_and_harm_from_the_records():
    plan = study.PLANS["full"]
    gain = {"Adam": 1.0, "Adam + EMA": 0.95, "STDET": 1.0, "STDET + SMA": 0.9}
    tables = study.summarize(_synthetic_records(plan, gain), plan)
    cell = next(
        c
        for c in tables["cells"]
        if (c["track"], c["method"], c["lmbda"], c["budget"]) == ("finetune", "STDET + SMA", 0.013, 1.0)
    )
    assert cell["vs_adam_at_S"] == pytest.approx(-0.1)
    assert cell["rd_loss_std"] == 0.0 and cell["seeds"] == 3
    reach = {
        (r["track"], r["method"]): r["median"] for r in tables["reach"] if r["lmbda"] == plan.extra_lambda
    }
    assert reach[("finetune", "Adam")] == pytest.approx(1.0)
    # 0.9 * (1 + 0.5 (1 - b)) is 1.08 at 0.6 S and 0.99 at 0.8 S: it crosses 1 in between.
    assert reach[("finetune", "STDET + SMA")] == pytest.approx(0.6 + 0.2 * (1.08 - 1.0) / (1.08 - 0.99))
    bd = {(r["track"], r["method"], r["budget"]): r for r in tables["bd"]}
    assert bd[("scratch", "Adam", 1.0)]["bd_rate"] == pytest.approx(0.0, abs=1e-6)
    assert bd[("scratch", "STDET + SMA", 1.0)]["bd_rate"] < 0  # better PSNR at the same rate
    assert bd[("scratch", "Adam", 0.6)]["bd_psnr"] == pytest.approx(-0.8)
    rows = study.headline({**tables, "pretrain": {}}, plan)
    row = next(r for r in rows if (r["track"], r["method"]) == ("finetune", "STDET + SMA"))
    assert row["vs_adam_at_S"] == pytest.approx(-0.1)


def test_report_renders_every_table():
    plan = study.PLANS["full"]
    gain = {"Adam": 1.0, "Adam + EMA": 0.95, "STDET": 1.02, "STDET + SMA": 0.97}
    records = _synthetic_records(plan, gain)
    summary = {
        **study.summarize(records, plan),
        "pretrain": {"live": {"rd_loss": 1.0}},
        "eval_photos": [name for name, _, _ in study.EVAL_PHOTOS],
        "run_wall_s": 3600.0,
        "wall_s": 1800.0,
        # One STDET run that embedded 40% at its peak and whose SMA guard handed out the live
        # weights, one that never embedded and ended with its average.
        "runs": {
            f"scratch/lambda{plan.lambdas[0]}/seed0/stdet_sma{plan.sma_alphas[0]}_b1.0": {
                "peak_embedded": 0.4,
                "track": "scratch",
                "kind": "stdet",
                "final_weights": "live",
            },
            f"finetune/lambda{plan.lambdas[0]}/seed0/stdet_sma{plan.sma_alphas[0]}_b1.0": {
                "peak_embedded": 0.0,
                "track": "finetune",
                "kind": "stdet",
                "final_weights": "average",
            },
        },
    }
    text = study.report(summary, plan, ["study_budget.png"])
    assert "## Headline" in text and "## finetune: final eval RD loss" in text
    assert "**Partial**" not in text
    partial = study.report({**summary, "missing": ["scratch/x", "finetune/y"]}, plan, ["study_budget.png"])
    assert "**Partial**: 2 of the plan's runs had not finished" in partial and "finetune/y" in partial
    assert f"| scratch | {plan.lambdas[0]:g} | 1 S | 40% | - | - |" in text
    assert f"| finetune | {plan.lambdas[0]:g} | 1 S | 0% | - | - |" in text
    assert "| scratch | 1 | 1 | 0 |" in text and "| finetune | 1 | 0 | 1 |" in text  # the guard's choices
    assert "not reached" in text  # STDET never reaches Adam's final RD loss
    assert "![study_budget.png](study_budget.png)" in text


def test_records_of_run_splits_live_and_average():
    meta = {"track": "scratch", "lmbda": 0.013, "seed": 1, "budget": 0.6, "kind": "stdet", "alpha": 0.1}
    summary = {"final_eval": {"rd_loss": 1.0, "bpp": 0.2, "psnr": 28.0}}
    live = {"rd_loss": 1.1, "bpp": 0.21, "psnr": 27.5, "eval_s": 1.0}
    live_record, average_record = study.records_of_run(meta, summary, live)
    assert (live_record["method"], live_record["rd_loss"]) == ("STDET", 1.1)
    assert (average_record["method"], average_record["rd_loss"]) == ("STDET + SMA", 1.0)


def test_peak_embedded_reads_the_train_log():
    log = [
        {"type": "train", "trainable_fraction": 1.0},
        {"type": "eval", "rd_loss": 3.0},
        {"type": "train", "trainable_fraction": 0.25},
        {"type": "train", "trainable_fraction": 1.0},  # released at the lr's drop
    ]
    assert study.peak_embedded(log) == 0.75
    assert study.peak_embedded([{"type": "eval"}]) == 0.0


def test_eval_photos_are_held_out_from_training():
    from stdet.data import TRAIN_PHOTOS

    names = {name for name, _, _ in study.EVAL_PHOTOS}
    assert not names & set(TRAIN_PHOTOS)
    assert {"coffee", "flower", "grace_hopper"} <= names


def test_bd_is_nan_where_bjontegaard_cannot_integrate():
    anchor = ([0.1, 0.2, 0.4, 0.8], [26.0, 28.0, 30.0, 32.0])
    assert study.bd(anchor, anchor) == (pytest.approx(0.0, abs=1e-6), pytest.approx(0.0, abs=1e-6))
    falling = ([0.1, 0.2, 0.4, 0.8], [32.0, 30.0, 28.0, 26.0])
    assert all(math.isnan(v) for v in study.bd(anchor, falling))


def test_finished_needs_the_same_configuration_and_both_results(tmp_path):
    """`--cached` reports only runs that `finished` accepts: the same run.toml (and note), a summary
    and the live eval."""
    config = study.train_config(study.PLANS["smoke"], tmp_path / "run", tmp_path, 20, 0.013, 0)
    assert not study.finished(config)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.toml").write_text(config.to_toml() + "# note\n")
    for name in ("summary.json", "live_eval.json"):
        (tmp_path / "run" / name).write_text("{}")
    assert study.finished(config, "note") and not study.finished(config, "other note")
    (tmp_path / "run" / "live_eval.json").unlink()
    assert not study.finished(config, "note")


def test_the_demo_mirrors_the_full_studys_setting() -> None:
    """stdet.demo copies the study's setting (the package does not import bench/): a change to one
    that is not made to the other fails here."""
    from stdet import demo

    full = study.PLANS["full"]
    ours = (demo.N, demo.M, demo.BATCH_SIZE, demo.PATCH_SIZE, demo.STEPS, demo.PRETRAIN_STEPS)
    assert ours == (full.N, full.M, full.batch_size, full.patch_size, full.steps, full.pretrain_steps)
    ours = (demo.LR, demo.DROP_AT, demo.SMA_EVERY, demo.SMA_ALPHA, demo.PRETRAIN_LMBDA)
    assert ours == (study.LR, study.DROP_AT, study.SMA_EVERY, study.SMA_ALPHA, study.PRETRAIN_LMBDA)
