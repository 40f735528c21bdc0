"""`make demo` / `stdet demo`: plain Adam against STDET on the bundled photos, same everything else.

Both runs start from the same initialisation (same seed) and see the same batches (`RandomCrops`),
train for the same number of steps and are evaluated on the bundled eval photos with real entropy
coding at the same steps. Each runs as its own process (`stdet train`), so its wall time and peak
memory are its own. Results: ``summary.json`` (schema below), ``report.md``, ``curves.png`` (eval RD
loss against step) and ``rd_points.png`` (bpp and PSNR at each evaluation).

summary.json: ``{"baseline": run, "stdet": run, "steps_to_baseline_final": int | None, "setting": {...}}``
with ``run = {"final_eval": {"bpp", "psnr", "rd_loss"}, "curve": [[step, eval_rd_loss], ...],
"trainable_fraction_end", "wall_s", "peak_rss_mb"}``.
"""

import json
import subprocess
import sys
from pathlib import Path

from .train import TrainConfig

# The demo's setting: a small factorized-prior model on 64-pixel crops, sized so that both runs and
# their evaluations fit in the 15 minutes `make demo` has on 2 CPU cores.
DEMO = {
    "arch": "bmshj2018-factorized",
    "N": 48,
    "M": 64,
    "lmbda": 0.01,
    "batch_size": 8,
    "patch_size": 64,
    "lr": 1e-3,
    "lr_schedule": "cosine",
    "steps": 2000,
}


def demo_configs(out: Path, steps: int | None = None, quick: bool = False) -> dict[str, TrainConfig]:
    """The two runs' configurations; STDET's schedule scales with the step budget."""
    setting = dict(DEMO)
    if quick:
        setting.update(N=16, M=24, batch_size=4, steps=40)
    if steps is not None:
        setting["steps"] = steps
    total = setting["steps"]
    common = {
        **setting,
        "eval_every": max(1, total // 20),
        "log_every": max(1, total // 100),
        "checkpoint_every": max(1, total // 4),
        "seed": 0,
    }
    stdet_knobs = {
        "warmup_steps": max(2, total // 5),
        "snapshots": min(20, max(2, total // 5)),
        "embed_every": max(1, total // 50),
        "embed_rate": 0.1,
    }
    return {
        "baseline": TrainConfig(**common, method="adam", out=str(out / "baseline")),
        "stdet": TrainConfig(**common, **stdet_knobs, method="stdet", out=str(out / "stdet")),
    }


def steps_to_reach(curve: list[list[float]], target: float) -> int | None:
    """First evaluated step whose eval RD loss is at most `target` (None: never)."""
    for step, loss in curve:
        if loss <= target:
            return int(step)
    return None


def _eval_points(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line]
    return [r for r in records if r.get("type") == "eval"]


def _plots(out: Path, runs: dict[str, dict], points: dict[str, list[dict]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, run in runs.items():
        steps, losses = zip(*run["curve"], strict=True)
        axes.plot(steps, losses, marker=".", label=f"{name} ({run['method']})")
    target = runs["baseline"]["final_eval"]["rd_loss"]
    axes.axhline(target, color="gray", linestyle="--", linewidth=1, label="baseline final")
    axes.set_xlabel("training step")
    axes.set_ylabel("eval RD loss (coded, lower is better)")
    axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    curves = out / "curves.png"
    figure.savefig(curves, dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, records in points.items():
        axes.plot(
            [r["bpp"] for r in records], [r["psnr"] for r in records], marker="o", alpha=0.7, label=name
        )
        axes.annotate("end", (records[-1]["bpp"], records[-1]["psnr"]))
    axes.set_xlabel("bits per pixel (actual, entropy coded)")
    axes.set_ylabel("PSNR (dB)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    rd = out / "rd_points.png"
    figure.savefig(rd, dpi=120)
    plt.close(figure)
    return [curves, rd]


def table(summary: dict) -> str:
    """The demo's results as a markdown table."""
    lines = [
        "| run | final bpp | final PSNR (dB) | final RD loss | trainable at end | wall (s) | peak RSS (MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("baseline", "stdet"):
        run = summary[name]
        final = run["final_eval"]
        lines.append(
            f"| {name} | {final['bpp']:.4f} | {final['psnr']:.2f} | {final['rd_loss']:.4f} | "
            f"{run['trainable_fraction_end']:.0%} | {run['wall_s']:.0f} | {run['peak_rss_mb']:.0f} |"
        )
    reached = summary["steps_to_baseline_final"]
    steps = summary["setting"]["steps"]
    lines.append("")
    lines.append(
        "Steps STDET needed to reach the baseline's final eval RD loss: "
        + (
            f"{reached} of {steps} ({reached / steps:.0%})"
            if reached is not None
            else f"not reached in {steps}"
        )
    )
    return "\n".join(lines)


def run_demo(out: Path, steps: int | None = None, quick: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    configs = demo_configs(out, steps, quick)
    runs = {}
    for name, config in configs.items():
        print(f"== {name}: --method {config.method}, {config.steps} steps", flush=True)
        config_file = out / f"{name}.toml"
        config_file.write_text(config.to_toml())
        command = [sys.executable, "-m", "stdet", "train", "--config", str(config_file)]
        finished = subprocess.run(command, check=False)
        if finished.returncode != 0:
            raise RuntimeError(
                f"demo: the {name} run failed (exit {finished.returncode}); see its output above"
            )
        runs[name] = json.loads((Path(config.out) / "summary.json").read_text())

    keys = ("final_eval", "curve", "trainable_fraction_end", "wall_s", "peak_rss_mb", "method")
    summary = {name: {key: run[key] for key in keys} for name, run in runs.items()}
    summary["steps_to_baseline_final"] = steps_to_reach(
        runs["stdet"]["curve"], runs["baseline"]["final_eval"]["rd_loss"]
    )
    summary["setting"] = {
        key: getattr(configs["stdet"], key)
        for key in (*DEMO, "eval_every", "warmup_steps", "embed_every", "embed_rate")
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    points = {name: _eval_points(Path(config.out)) for name, config in configs.items()}
    plots = _plots(out, {name: summary[name] for name in configs}, points)
    text = table(summary)
    setting = ", ".join(f"{k}={v}" for k, v in summary["setting"].items())
    report = (
        "# stdet demo: plain Adam against STDET\n\n"
        f"Setting: {setting}. Evaluated on the bundled eval photos with real entropy coding.\n\n"
        f"{text}\n\n" + "".join(f"![{p.stem}]({p.name})\n" for p in plots)
    )
    (out / "report.md").write_text(report)
    print(text)
    print(
        f"\nsummary: {out / 'summary.json'}, report: {out / 'report.md'}, "
        f"plots: {', '.join(str(p) for p in plots)}"
    )
    return summary
