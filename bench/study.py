"""`make study`: does STDET reach plain Adam's rate-distortion in fewer steps? The demo's comparison over
several seeds and two lambdas, the same step budget S for both methods.

For each (lambda, seed): both runs' eval RD-loss curves (real entropy coding on the bundled eval
photos, every S/20 steps); the steps STDET needs to reach the baseline's final eval RD loss, over S;
per seed, BD-rate and BD-PSNR over the lambdas of STDET stopped at 0.6 S against the baseline at S
(and, for scale, of the baseline itself stopped at 0.6 S, and of STDET at S). Results:
runs/study/summary.json, runs/study/study.md (also copied to bench/results/study.md) and
runs/study/curves.png. `--sweep` instead varies one STDET knob at a time on one seed and one lambda
(bench/results/sweep.md).

    python bench/study.py [--steps 2000] [--seeds 0 1 2] [--lambdas 0.004 0.016]
    python bench/study.py --sweep
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from stdet.demo import demo_configs, steps_to_reach
from stdet.evaluate import bd_psnr, bd_rate
from stdet.train import TrainConfig

RESULTS = Path(__file__).parent / "results"
EARLY = 0.6  # the paper's claim: equal RD at about 60% of the baseline's training


def run(config: TrainConfig, threads: int | None = None) -> dict:
    """Train `config` in its own process (unless a finished run of the same configuration is there);
    its summary and evals."""
    out = Path(config.out)
    summary_file, config_file = out / "summary.json", out / "run.toml"
    same = config_file.exists() and config_file.read_text() == config.to_toml()
    if not (same and summary_file.exists()):
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.toml").write_text(config.to_toml())
        command = [sys.executable, "-m", "stdet", "train", "--config", str(out / "run.toml"), "--no-progress"]
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        finished = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if finished.returncode != 0:
            raise RuntimeError(f"study: run {out} failed:\n{finished.stderr[-2000:]}")
    summary = json.loads(summary_file.read_text())
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line]
    summary["evals"] = {r["step"]: r for r in records if r["type"] == "eval"}
    summary["history_embedded"] = [
        (r["step"], 1.0 - r["trainable_fraction"]) for r in records if r["type"] == "train"
    ]
    return summary


def run_all(configs: dict[str, TrainConfig], jobs: int) -> dict[str, dict]:
    """Run several configurations, `jobs` at a time (each with 2 / jobs threads on this 2-core machine)."""
    threads = max(1, (os.cpu_count() or 2) // jobs) if jobs > 1 else None
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {name: pool.submit(run, config, threads) for name, config in configs.items()}
        return {name: future.result() for name, future in futures.items()}


def ratio(stdet: dict, baseline: dict, steps: int) -> float:
    """Steps STDET needs to reach the baseline's final eval RD loss, over S (inf: never)."""
    reached = steps_to_reach(stdet["curve"], baseline["final_eval"]["rd_loss"])
    return math.inf if reached is None else reached / steps


def point(summary: dict, step: int) -> tuple[float, float]:
    record = summary["evals"][step]
    return record["bpp"], record["psnr"]


def bd(anchor: list[tuple[float, float]], test: list[tuple[float, float]]) -> tuple[float, float]:
    curve = lambda points: ([p[0] for p in points], [p[1] for p in points])  # noqa: E731
    return bd_rate(curve(anchor), curve(test)), bd_psnr(curve(anchor), curve(test))


def configs_for(
    out: Path,
    steps: int,
    lmbda: float,
    seed: int,
    early: bool = True,
    quick: bool = False,
    tuned: bool = True,
) -> dict[str, TrainConfig]:
    """The demo's pair at this lambda and seed, plus (with `early`) both methods trained for 0.6 S
    (their learning-rate schedule ends at 0.6 S: a run given 60% of the budget, not one cut short).
    `tuned`: STDET's warm-up is 40% of S instead of the demo's 20%, the one change the defaults sweep
    (`--sweep`, around the demo's setting) found to help."""
    pair = demo_configs(out, steps, quick)
    if tuned:
        warmup = max(2, 2 * steps // 5)
        pair["stdet"] = replace(pair["stdet"], warmup_steps=warmup, snapshots=min(20, warmup))
    folder = out / f"lambda{lmbda}" / f"seed{seed}"
    configs = {
        name: replace(config, lmbda=lmbda, seed=seed, out=str(folder / name)) for name, config in pair.items()
    }
    if early:
        short = round(EARLY * steps)
        for name in ("baseline", "stdet"):
            config = configs[name]
            configs[f"{name}_0.6S"] = replace(
                config, steps=short, checkpoint_every=short, out=str(folder / f"{name}_0.6S")
            )
    return configs


def plot_curves(results: dict, lambdas: list[float], seeds: list[int], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, len(lambdas), figsize=(5.5 * len(lambdas), 4), squeeze=False)
    for axis, lmbda in zip(axes[0], lambdas, strict=True):
        for name, color in (("baseline", "tab:blue"), ("stdet", "tab:orange")):
            curves = [results[lmbda][seed][name]["curve"] for seed in seeds]
            steps = [step for step, _ in curves[0]]
            values = [[loss for _, loss in curve] for curve in curves]
            median = [statistics.median(column) for column in zip(*values, strict=True)]
            low = [min(column) for column in zip(*values, strict=True)]
            high = [max(column) for column in zip(*values, strict=True)]
            axis.plot(steps, median, color=color, label=f"{name} (median of {len(seeds)} seeds)")
            axis.fill_between(steps, low, high, color=color, alpha=0.2)
        axis.set_title(f"lambda = {lmbda}")
        axis.set_xlabel("training step")
        axis.set_ylabel("eval RD loss (coded)")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    path = out / "curves.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_gap(results: dict, lambdas: list[float], seeds: list[int], out: Path) -> Path:
    """Where STDET loses: its eval RD loss over the baseline's at the same step (median over seeds),
    with the embedded fraction on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    twin = axis.twinx()
    for lmbda, color in zip(lambdas, ("tab:red", "tab:purple", "tab:green"), strict=False):
        gaps = []
        for seed in seeds:
            pair = results[lmbda][seed]
            base = dict((int(s), v) for s, v in pair["baseline"]["curve"])
            gaps.append([(int(s), v / base[int(s)] - 1) for s, v in pair["stdet"]["curve"] if int(s) in base])
        steps = [s for s, _ in gaps[0]]
        median = [statistics.median(g[i][1] for g in gaps) for i in range(len(steps))]
        axis.plot(
            steps, [100 * m for m in median], color=color, marker=".", label=f"RD loss gap, lambda {lmbda}"
        )
        embedded = results[lmbda][seeds[0]]["stdet"]["history_embedded"]
        twin.plot(
            [s for s, _ in embedded], [100 * f for _, f in embedded], color=color, linestyle=":", alpha=0.7
        )
    axis.axhline(0, color="gray", linewidth=1)
    axis.set_xlabel("training step")
    axis.set_ylabel("STDET eval RD loss over baseline's (%)")
    twin.set_ylabel("embedded fraction (%, dotted)")
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left")
    figure.tight_layout()
    path = out / "gap.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def study(args: argparse.Namespace) -> None:
    out = Path(args.out)
    started = time.perf_counter()
    results: dict = {}
    for lmbda in args.lambdas:
        results[lmbda] = {}
        for seed in args.seeds:
            configs = configs_for(out, args.steps, lmbda, seed, quick=args.quick)
            results[lmbda][seed] = run_all(configs, args.jobs)
            pair = results[lmbda][seed]
            print(
                f"lambda {lmbda} seed {seed}: final eval RD loss baseline "
                f"{pair['baseline']['final_eval']['rd_loss']:.4f}, "
                f"stdet {pair['stdet']['final_eval']['rd_loss']:.4f}; "
                f"ratio {ratio(pair['stdet'], pair['baseline'], args.steps):.2f}",
                flush=True,
            )
    steps = args.steps
    ratios = {
        lmbda: [ratio(results[lmbda][s]["stdet"], results[lmbda][s]["baseline"], steps) for s in args.seeds]
        for lmbda in args.lambdas
    }
    bd_rows = []
    for seed in args.seeds:
        anchor = [point(results[lmbda][seed]["baseline"], steps) for lmbda in args.lambdas]
        row = {"seed": seed}
        for label in ("stdet_0.6S", "baseline_0.6S", "stdet"):
            runs = [results[lmbda][seed][label] for lmbda in args.lambdas]
            rate, quality = bd(anchor, [point(run, run["steps"]) for run in runs])
            row[label] = {"bd_rate_percent": rate, "bd_psnr_db": quality}
        bd_rows.append(row)
    all_ratios = [r for values in ratios.values() for r in values]
    summary = {
        "setting": {
            "steps": steps,
            "seeds": args.seeds,
            "lambdas": args.lambdas,
            **{
                k: v
                for k, v in vars(
                    configs_for(out, steps, args.lambdas[0], args.seeds[0], quick=args.quick)["stdet"]
                ).items()
                if k not in ("out", "seed", "lmbda", "progress")
            },
        },
        "median_ratio": statistics.median(all_ratios),
        "median_ratio_per_lambda": {str(k): statistics.median(v) for k, v in ratios.items()},
        "ratios": {str(k): v for k, v in ratios.items()},
        "bd": bd_rows,
        "runs": {
            str(lmbda): {
                str(seed): {
                    name: {
                        key: summary[key]
                        for key in ("final_eval", "curve", "trainable_fraction_end", "wall_s", "peak_rss_mb")
                    }
                    for name, summary in results[lmbda][seed].items()
                }
                for seed in args.seeds
            }
            for lmbda in args.lambdas
        },
        "wall_s": time.perf_counter() - started,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plot = plot_curves(results, args.lambdas, args.seeds, out)
    gap = plot_gap(results, args.lambdas, args.seeds, out)
    text = report(summary, results, args)
    (out / "study.md").write_text(text)
    if not args.no_copy:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "study.md").write_text(text)
        (RESULTS / "study_curves.png").write_bytes(plot.read_bytes())
        (RESULTS / "study_gap.png").write_bytes(gap.read_bytes())
    print(text)


def _fmt_ratio(value: float) -> str:
    return "not reached" if math.isinf(value) else f"{value:.2f}"


def _fmt_bd_rate(value: float) -> str:
    # bjontegaard gives NaN when the two curves' quality ranges do not overlap enough to integrate.
    return "n/a" if math.isnan(value) else f"{value:+.1f}%"


def report(summary: dict, results: dict, args: argparse.Namespace) -> str:
    steps = args.steps
    setting = summary["setting"]
    lines = [
        f"Study: {len(args.seeds)} seeds x {len(args.lambdas)} lambdas, S = {steps} steps per run, "
        f"bmshj2018-factorized N={setting['N']} M={setting['M']}, "
        f"{setting['batch_size']} crops of {setting['patch_size']} px, Adam lr "
        f"{setting['lr']} ({setting['lr_schedule']}); STDET warm-up "
        f"{setting['warmup_steps']}, a round every {setting['embed_every']} steps, rate "
        f"{setting['embed_rate']} up to {setting['max_embedded']:.0%}. "
        f"Eval: bundled eval photos, real entropy coding.",
        "",
        "| lambda | seed | baseline final RD loss | STDET final RD loss | STDET trainable at end | "
        "steps to baseline final / S | wall s (baseline / STDET) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for lmbda in args.lambdas:
        for seed in args.seeds:
            pair = results[lmbda][seed]
            lines.append(
                f"| {lmbda} | {seed} | {pair['baseline']['final_eval']['rd_loss']:.4f} | "
                f"{pair['stdet']['final_eval']['rd_loss']:.4f} | "
                f"{pair['stdet']['trainable_fraction_end']:.0%} | "
                f"{_fmt_ratio(ratio(pair['stdet'], pair['baseline'], steps))} | "
                f"{pair['baseline']['wall_s']:.0f} / {pair['stdet']['wall_s']:.0f} |"
            )
    lines += [
        "",
        f"Median over seeds and lambdas of (steps to reach the baseline's final eval RD loss) / S: "
        f"**{_fmt_ratio(summary['median_ratio'])}** (target <= 0.6; per lambda: "
        + ", ".join(f"{k}: {_fmt_ratio(v)}" for k, v in summary["median_ratio_per_lambda"].items())
        + ").",
        "",
        "BD-rate / BD-PSNR over the lambdas against the baseline at S (negative BD-rate = fewer bits; n/a: "
        "the PSNR ranges of the two 2-point curves do not overlap: no rate difference to average):",
        "",
        "| seed | STDET trained for 0.6 S | plain Adam trained for 0.6 S | STDET trained for S |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in summary["bd"]:
        cells = [
            f"{_fmt_bd_rate(row[key]['bd_rate_percent'])} / {row[key]['bd_psnr_db']:+.2f} dB"
            for key in ("stdet_0.6S", "baseline_0.6S", "stdet")
        ]
        lines.append(f"| {row['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The sweep: one knob at a time


SWEEP = {
    "reference (the defaults)": {},
    "embed_rate 0.05": {"embed_rate": 0.05},
    "embed_rate 0.2": {"embed_rate": 0.2},
    "embed_every x2": {"embed_every": 2.0},
    "warmup x0.5": {"warmup_steps": 0.5},
    "warmup x2": {"warmup_steps": 2.0},
    "modes 3": {"modes": 3},
    "modes 30": {"modes": 30},
    "max_embedded 0.5": {"max_embedded": 0.5},
    "SMA shadow, every 10, alpha 0.1": {"sma_every": 10, "sma_alpha": 0.1},
    "SMA feedback, every 10, alpha 0.1": {"sma_every": 10, "sma_alpha": 0.1, "sma_mode": "feedback"},
}


def sweep(args: argparse.Namespace) -> None:
    out = Path(args.out) / "sweep"
    lmbda, seed = args.lambdas[0], args.seeds[0]
    configs = configs_for(out, args.steps, lmbda, seed, early=False, quick=args.quick, tuned=False)
    stdet = configs["stdet"]
    planned = {"baseline": configs["baseline"]}
    for label, changes in SWEEP.items():
        values = {}
        for key, value in changes.items():
            if key in ("embed_every", "warmup_steps") and isinstance(value, float):
                value = max(2, round(getattr(stdet, key) * value))
            values[key] = value
        slug = label.split(" (")[0].replace(" ", "_").replace(",", "").replace(".", "p")
        planned[label] = replace(stdet, **values, out=str(out / slug))
    done = run_all(planned, args.jobs)
    baseline = done.pop("baseline")
    target = baseline["final_eval"]["rd_loss"]
    rows = list(done.items())
    lines = [
        f"Sweep: one knob at a time from the demo's STDET setting (warm-up {stdet.warmup_steps}, a round "
        f"every {stdet.embed_every} steps at rate {stdet.embed_rate}, {stdet.modes} modes, up to "
        f"{stdet.max_embedded:.0%} embedded, no SMA); lambda {lmbda}, seed {seed}, S = {args.steps}. "
        f"Baseline (plain Adam) final eval RD loss {target:.4f}.",
        "",
        "| setting | final eval RD loss | vs baseline | trainable at end | steps to baseline final / S |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, summary in rows:
        final = summary["final_eval"]["rd_loss"]
        lines.append(
            f"| {label} | {final:.4f} | {final / target - 1:+.1%} | "
            f"{summary['trainable_fraction_end']:.0%} | "
            f"{_fmt_ratio(ratio(summary, baseline, args.steps))} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "sweep.md").write_text(text)
    if not args.no_copy:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "sweep.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2000, help="S, steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.004, 0.016])
    parser.add_argument("--out", default="runs/study")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each with 2 / jobs threads)")
    parser.add_argument("--sweep", action="store_true", help="the defaults sweep instead of the study")
    parser.add_argument("--quick", action="store_true", help="the demo's tiny model (checks the pipeline)")
    parser.add_argument("--no-copy", action="store_true", help="do not copy the tables into bench/results")
    args = parser.parse_args()
    (sweep if args.sweep else study)(args)


if __name__ == "__main__":
    main()
