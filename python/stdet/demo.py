"""`make demo` / `stdet demo`: lambda fine-tuning with plain Adam and with STDET, same everything else.

The regime the method is meant for: a model trained at one rate-distortion trade-off is fine-tuned to
another. The demo starts from one small pretrained model that ships with the package
(``assets/demo_pretrained.pth``: bmshj2018-factorized N=48 M=64, plain Adam at lambda
`PRETRAIN_LMBDA`, CompressAI's quality 2) and fine-tunes it to lambda `LMBDA` (quality 4) twice, with
the study's calibrated schedule (bench/study.py: Adam at `LR`, 10x lower from `DROP_AT` of the run):

- ``adam``: plain Adam with a shadow EMA of the weights (`SMA_EVERY`, `SMA_ALPHA`): its live weights
  are **Adam**, its average **Adam + EMA**;
- ``stdet``: STDET with the library's defaults (only its step counts scaled with the budget, as the
  study's ``stdet_knobs``), with the same shadow SMA: **STDET** and **STDET + SMA**.

Both start from the same weights with the same seed and see the same batches; each is its own
``stdet train`` process with one thread, the two side by side. Every `STEPS` / `EVALS` steps each
run codes the bundled eval photos (coffee, flower, grace_hopper; none is trained on) for real with
its live weights and with its average (``--eval-live``); the last evaluation gives the four results.
It is one seed at one lambda: a demonstration, not a result (the study, ``make study``, writes
bench/results/).

The starting model is made by ``stdet demo --make-pretrained`` (`make_pretrained`: plain Adam at
`PRETRAIN_LMBDA`, seed 0, `PRETRAIN_STEPS` steps, one thread, the bundled train photos; about 4
minutes on one core); its record ``assets/demo_pretrained.json`` names the recipe and the sha256 of
the weights (`weights_sha256`), and the demo checks both before it starts (`check_pretrained`).

Files in ``--out``: ``adam/`` and ``stdet/`` (each run's folder), ``summary.json``, ``report.md``,
``curves.png`` (eval RD loss against the step, of each run's live weights and of its average) and
``rd_points.png`` (bpp and PSNR of the live weights at each evaluation). summary.json::

    {"setting": {name: value},               # the runs' shared settings and STDET's step counts
     "pretrained": {"file", "weights_sha256", "recipe": {...}},
     "start": result,                        # the pretrained model at lambda LMBDA, before fine-tuning
     "results": {"Adam" | "Adam + EMA" | "STDET" | "STDET + SMA":
                 {**result, "change_vs_adam"}},   # RD loss relative to Adam's: -0.01 is 1% lower
     "stdet_config": {knob: value},          # every STDETConfig knob the STDET run used
     "runs": {"adam" | "stdet": {"method", "curve", "average_curve", "trainable_fraction_min",
                                 "trainable_fraction_end", "wall_s", "peak_rss_mb",
                                 "final_weights"}},  # "average", or "live" where the SMA guard said so
     "wall_s": float}                         # the whole demo, pretrained check to report

with ``result = {"bpp", "psnr", "rd_loss"}`` (means over the eval photos, real entropy coding),
``curve`` the live weights' ``[[step, eval RD loss], ...]``, ``average_curve`` the train loop's
(the shadow average's once it has a sample; for STDET, whose SMA guard is on, the live weights' at an
evaluation where the average did not win the guard's paired test on the probe crops) and
``trainable_fraction_min`` the least trainable fraction the run's log records (1.0: STDET embedded
nothing).

Steps to reach Adam's final RD loss are not reported: a point on a curve before its run's end has not
had the lr's drop, so it is not what a run of that many steps would end at; the study reads them from
complete runs of each budget.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .config import STDETConfig
from .train import TrainConfig, TrainingError

# The demo's setting mirrors bench/study.py (the package does not import bench/): its LR and DROP_AT,
# the FULL plan's model (ARCH, N, M), batch (BATCH_SIZE, PATCH_SIZE), S (STEPS) and pretraining
# (PRETRAIN_LMBDA, PRETRAIN_STEPS), its SMA_EVERY and SMA_ALPHA, and its stdet_knobs. Change both.
ARCH = "bmshj2018-factorized"
N, M = 48, 64
BATCH_SIZE = 8
PATCH_SIZE = 64
LR = 5e-4
DROP_AT = 0.85  # the 10x drop, as a fraction of the run
STEPS = 1600
LMBDA = 0.013  # CompressAI's quality 4: the fine-tuning target
PRETRAIN_LMBDA = 0.0035  # CompressAI's quality 2: the starting model's
PRETRAIN_STEPS = 3200
SMA_EVERY = 10
SMA_ALPHA = 0.5  # the study's EMA horizon (20 steps), chosen by its horizon screen
SEED = 0
EVALS = 10  # evaluations per run, every STEPS // EVALS steps: the curves
THREADS = 1  # per run: the two runs side by side on two cores
QUICK = {"steps": 40, "evals": 2}  # `--quick`: checks the pipeline in seconds

ASSETS = Path(__file__).parent / "assets"
PRETRAINED = ASSETS / "demo_pretrained.pth"
PRETRAINED_RECORD = ASSETS / "demo_pretrained.json"
MAKE_PRETRAINED = "stdet demo --make-pretrained"
# What makes an Adam run's weights what they are: the pretrained model's recipe, checked by the demo.
RECIPE_KEYS = (
    "arch",
    "N",
    "M",
    "quality",
    "lmbda",
    "metric",
    "method",
    "steps",
    "batch_size",
    "patch_size",
    "lr",
    "lr_schedule",
    "lr_milestones",
    "lr_gamma",
    "aux_lr",
    "clip",
    "init",
    "data",
    "seed",
    "sma_every",
)
# Each run's two results: its live weights and its shadow average.
LABELS = {"adam": ("Adam", "Adam + EMA"), "stdet": ("STDET", "STDET + SMA")}
COLORS = {"adam": "C0", "stdet": "C1"}
WIDTHS = {"adam": 3.0, "stdet": 1.2}  # Adam's wide lines stay visible under STDET's where they coincide


def run_config(out: Path, steps: int, lmbda: float, **changes) -> TrainConfig:
    """A run of the demo's model with the study's schedule: plain Adam at `LR`, 10x lower from
    `DROP_AT` of its `steps`, evaluated at its end only; `changes` override."""
    values = {
        "arch": ARCH,
        "N": N,
        "M": M,
        "lmbda": lmbda,
        "method": "adam",
        "steps": steps,
        "batch_size": BATCH_SIZE,
        "patch_size": PATCH_SIZE,
        "lr": LR,
        "lr_schedule": "step",
        "lr_milestones": [DROP_AT],
        "eval_every": 0,
        "log_every": max(1, steps // 100),
        "checkpoint_every": steps,
        "out": str(out),
        "seed": SEED,
        "progress": False,
        **changes,
    }
    return TrainConfig(**values)


def pretrain_config(out: Path) -> TrainConfig:
    """The starting model's run: plain Adam at `PRETRAIN_LMBDA` for `PRETRAIN_STEPS` steps."""
    return run_config(out, PRETRAIN_STEPS, PRETRAIN_LMBDA)


def recipe(config: TrainConfig) -> dict:
    """The settings of `config` that decide its trained weights (not where it writes or evaluates)."""
    values = asdict(config)
    return {key: values[key] for key in RECIPE_KEYS}


def stdet_knobs(steps: int) -> dict:
    """STDET's step counts scaled with the run's budget, as the study's; every other knob is the
    library's default."""
    warmup = max(2, steps // 5)
    return {"warmup_steps": warmup, "snapshots": min(20, warmup), "embed_every": max(1, steps // 50)}


def demo_configs(out: Path, init: Path, steps: int = STEPS, evals: int = EVALS) -> dict[str, TrainConfig]:
    """The two fine-tuning runs from `init`, each with a shadow SMA and the live weights evaluated
    beside it every `steps` // `evals` steps."""
    common = {
        "init": str(init),
        "sma_every": SMA_EVERY,
        "sma_alpha": SMA_ALPHA,
        "eval_every": max(1, steps // evals),
        "eval_live": True,
    }
    return {
        "adam": run_config(out / "adam", steps, LMBDA, method="adam", **common),
        "stdet": run_config(out / "stdet", steps, LMBDA, method="stdet", **common, **stdet_knobs(steps)),
    }


# ----------------------------------------------------------------------------------------------
# The pretrained model: made once, shipped, checked


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A hash of the weights themselves (names, dtypes, shapes, bytes), not of the file, whose bytes
    also depend on how torch.save lays it out."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_pretrained(model: Path = PRETRAINED, record_file: Path = PRETRAINED_RECORD) -> dict:
    """The shipped starting model's record, once the file is known to be there, to hold the weights
    the record names and to have been made by the recipe the demo asks for."""
    remake = f"make it with `{MAKE_PRETRAINED}` (about 4 min on one core)"
    if not model.is_file() or not record_file.is_file():
        missing = model if not model.is_file() else record_file
        raise TrainingError(f"demo: the pretrained model's {missing} is missing; {remake}")
    record = json.loads(record_file.read_text())
    wanted = recipe(pretrain_config(Path("unused")))
    made = record.get("recipe", {})
    if made != wanted:
        changed = sorted(key for key in {*wanted, *made} if wanted.get(key) != made.get(key))
        raise TrainingError(
            f"demo: {model} was made with {', '.join(f'{k}={made.get(k)!r}' for k in changed)}, but the "
            f"demo's pretraining has {', '.join(f'{k}={wanted.get(k)!r}' for k in changed)}; {remake}"
        )
    found = weights_sha256(torch.load(model, map_location="cpu", weights_only=True))
    if found != record.get("weights_sha256"):
        raise TrainingError(
            f"demo: {model} holds weights with sha256 {found[:16]}..., its record names "
            f"{str(record.get('weights_sha256'))[:16]}...; {remake}"
        )
    return record


def make_pretrained(out: Path) -> dict:
    """Train the starting model (`pretrain_config`, in its own one-thread process under ``out``) and
    write it and its record into the package's assets; the record."""
    config = pretrain_config(out / "pretrain")
    print(
        f"pretraining: plain Adam at lambda {PRETRAIN_LMBDA:g}, {PRETRAIN_STEPS} steps, one thread",
        flush=True,
    )
    summary = train_in_processes({"pretrain": config}, out)["pretrain"]
    trained = Path(config.out) / "model.pth"
    ASSETS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(trained, PRETRAINED)
    record = {
        "made_by": MAKE_PRETRAINED,
        "recipe": recipe(config),
        "weights_sha256": weights_sha256(torch.load(PRETRAINED, map_location="cpu", weights_only=True)),
        "final_eval": summary["final_eval"],  # at PRETRAIN_LMBDA on the bundled eval photos
        "wall_s": summary["wall_s"],
        "torch": torch.__version__,
    }
    PRETRAINED_RECORD.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"pretrained model: {PRETRAINED} ({PRETRAINED.stat().st_size / 1e6:.1f} MB), "
        f"record: {PRETRAINED_RECORD}"
    )
    return record


# ----------------------------------------------------------------------------------------------
# The runs


def train_in_processes(configs: dict[str, TrainConfig], out: Path) -> dict[str, dict]:
    """Each configuration trained by its own ``stdet train`` process with `THREADS` threads, all at
    once (their output in ``out/NAME.out``); name -> the run's summary.json."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    started = {}
    for name, config in configs.items():
        config_file = out / f"{name}.toml"
        config_file.write_text(config.to_toml())
        output = out / f"{name}.out"
        with output.open("w") as handle:
            command = [sys.executable, "-m", "stdet", "train", "--config", str(config_file)]
            started[name] = (
                subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env),
                output,
            )
    failures = []
    for name, (process, output) in started.items():
        code = process.wait()
        if code != 0:
            tail = output.read_text()[-2000:]
            failures.append(f"demo: the {name} run failed (exit {code}); {output} ends:\n{tail}")
        else:
            print(f"{name}: done ({output.read_text().strip().splitlines()[-1]})", flush=True)
    if failures:
        raise TrainingError("\n".join(failures))
    return {
        name: json.loads((Path(config.out) / "summary.json").read_text()) for name, config in configs.items()
    }


def start_result(init: Path) -> dict:
    """The pretrained model at lambda `LMBDA` on the eval photos, before any fine-tuning."""
    from .data import bundled_images
    from .evaluate import evaluate
    from .export import read_plain_state_dict
    from .train import load_model

    plain, _ = read_plain_state_dict(init)
    mean = evaluate(load_model(ARCH, plain), bundled_images("eval"), "mse", LMBDA)["mean"]
    return {key: mean[key] for key in ("bpp", "psnr", "rd_loss")}


def results_of(runs: dict[str, dict]) -> dict[str, dict]:
    """The four results (live weights and average of each run), each with its change against Adam's."""
    pick = ("bpp", "psnr", "rd_loss")
    results = {}
    for name, (live, average) in LABELS.items():
        results[live] = runs[name]["live_final_eval"]
        results[average] = runs[name]["final_eval"]
    adam = results["Adam"]["rd_loss"]
    return {
        label: {**{key: result[key] for key in pick}, "change_vs_adam": result["rd_loss"] / adam - 1}
        for label, result in results.items()
    }


def _log_records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, filter(None, lines)) if record["type"] == kind]


# ----------------------------------------------------------------------------------------------
# Report and plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def plot_curves(summary: dict, out: Path) -> Path:
    """Eval RD loss against the step from the pretrained model's at step 0: each run's live weights
    (solid) and its average (dashed, its final point starred); Adam's final value and the lr's drop
    as grey lines. Both curves of a run, since the live weights at a high lr are noisy and the average
    is what a reader would compare mid-run."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    start = [0, summary["start"]["rd_loss"]]
    for name, (live, average) in LABELS.items():
        run, color = summary["runs"][name], COLORS[name]
        steps, losses = zip(*[start, *run["curve"]], strict=True)
        width = WIDTHS[name]
        axes.plot(steps, losses, marker=".", linewidth=width, color=color, label=f"{live} (live weights)")
        steps, losses = zip(*[start, *run["average_curve"]], strict=True)
        axes.plot(
            steps,
            losses,
            linestyle="--",
            linewidth=width * 0.7,
            color=color,
            label=f"{average} (its average"
            + (", guarded)" if run.get("final_weights") and name == "stdet" else ")"),
        )
        axes.plot(steps[-1], losses[-1], marker="*", markersize=11, color=color, linestyle="none")
    axes.axhline(
        summary["results"]["Adam"]["rd_loss"], color="gray", linestyle="--", linewidth=1, label="Adam's final"
    )
    drop = round(DROP_AT * summary["setting"]["steps"])
    axes.axvline(drop, color="gray", linestyle=":", linewidth=1, label="lr / 10")
    axes.set_xlabel("fine-tuning step")
    axes.set_ylabel(f"eval RD loss at lambda {LMBDA:g} (coded)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = out / "curves.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_rd_points(points: dict[str, list[dict]], start: dict, out: Path) -> Path:
    """bpp and PSNR of each run's live weights at each evaluation (`points`: run name -> its eval
    records' live results), from the pretrained model's."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    axes.plot(start["bpp"], start["psnr"], marker="s", color="black", linestyle="none", label="pretrained")
    for name, records in points.items():
        axes.plot(
            [r["bpp"] for r in records],
            [r["psnr"] for r in records],
            marker="o",
            alpha=0.7,
            color=COLORS[name],
            label=f"{LABELS[name][0]} (live weights)",
        )
        axes.annotate("end", (records[-1]["bpp"], records[-1]["psnr"]))
    axes.set_xlabel("bits per pixel (actual, entropy coded)")
    axes.set_ylabel("PSNR (dB)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = out / "rd_points.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _percent(change: float) -> str:
    return f"{change * 100:+.1f}%"


def tables(summary: dict) -> str:
    """The four results, and what each run cost."""
    lines = [
        "| method | final RD loss | bpp | PSNR (dB) | RD loss vs Adam |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label in (label for labels in LABELS.values() for label in labels):
        result = summary["results"][label]
        lines.append(
            f"| {label} | {result['rd_loss']:.4f} | {result['bpp']:.4f} | {result['psnr']:.2f} | "
            f"{_percent(result['change_vs_adam'])} |"
        )
    start = summary["start"]
    lines.append(
        f"| (pretrained, before fine-tuning) | {start['rd_loss']:.4f} | {start['bpp']:.4f} | "
        f"{start['psnr']:.2f} | {_percent(start['rd_loss'] / summary['results']['Adam']['rd_loss'] - 1)} |"
    )
    lines += [
        "",
        "| run | trainable: least | at end | wall (s) | peak RSS (MB) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, run in summary["runs"].items():
        trainable = f"{run['trainable_fraction_min']:.0%} | {run['trainable_fraction_end']:.0%}"
        lines.append(f"| {name} | {trainable} | {run['wall_s']:.0f} | {run['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def embedding_note(summary: dict) -> str:
    """What STDET did in this run, in words: whether it embedded anything, and how much."""
    run, results = summary["runs"]["stdet"], summary["results"]
    start = summary["stdet_config"]["start"]
    if run["trainable_fraction_min"] < 1.0:
        return (
            f"STDET embedded up to {1 - run['trainable_fraction_min']:.0%} of the elements "
            f"({run['trainable_fraction_end']:.0%} trainable at the end; start={start!r})."
        )
    same = all(results["STDET"][key] == results["Adam"][key] for key in ("bpp", "psnr", "rd_loss"))
    return (
        f"STDET embedded nothing in this run: every element stayed trainable (start={start!r}; see "
        "`stdet.STDETConfig`), so it trained what Adam trains"
        + (
            ", and it ends bit for bit at Adam's results."
            if same
            else f"; its RD loss differs from Adam's by {_percent(results['STDET']['change_vs_adam'])}."
        )
    )


def guard_note(summary: dict) -> str:
    """Which weights STDET + SMA's result is of: the SMA guard hands out the average only where the
    probe crops' losses are lower with it by more than `sma_guard_sigmas` standard errors."""
    handed_out = summary["runs"]["stdet"].get("final_weights")
    if handed_out is None:
        return ""
    which = (
        "the average (its probe crops' losses were lower by more than that)"
        if handed_out == "average"
        else "the live weights (the average did not win by that much), so it equals STDET's row"
    )
    return (
        "STDET's SMA guard (`sma_guard`, on by default) compared a fixed probe batch's per-crop losses "
        "with the live weights and with the average at each evaluation, handing out the average only "
        f"where it was lower by more than {STDETConfig().sma_guard_sigmas:g} standard errors of the "
        f"paired differences; at the last one it handed out {which}. Adam + EMA is the plain average. "
    )


def report(summary: dict, plots: list[Path]) -> str:
    setting = summary["setting"]
    steps = setting["steps"]
    return (
        "# stdet demo: lambda fine-tuning, plain Adam against STDET\n\n"
        f"A {ARCH} model (N={N}, M={M}) trained with plain Adam at lambda {PRETRAIN_LMBDA:g} "
        f"(CompressAI's quality 2; `{MAKE_PRETRAINED}`, weights sha256 "
        f"{summary['pretrained']['weights_sha256'][:16]}...) is fine-tuned to lambda {LMBDA:g} (quality 4) "
        f"for {steps} steps: Adam at lr {LR:g}, 10x lower from step {round(DROP_AT * steps)} (the "
        f"study's calibrated schedule), {BATCH_SIZE} random {PATCH_SIZE}x{PATCH_SIZE} crops of the bundled "
        f"train photos per step, seed {SEED}, the same batches for both runs. STDET runs with the library's "
        f"defaults, its step counts scaled with the run (warm-up {setting['warmup_steps']} steps, "
        f"{setting['snapshots']} snapshots, a round every {setting['embed_every']} steps). Each run keeps a "
        f"shadow EMA of its weights (a sample every {SMA_EVERY} steps, alpha {SMA_ALPHA:g}); its live "
        "weights and that average are each coded for real (RD loss lambda * 255^2 * MSE + bpp) on the "
        "bundled eval photos coffee, flower and grace_hopper, none of them trained on.\n\n"
        f"{tables(summary)}\n\n"
        f"{embedding_note(summary)} {guard_note(summary)}"
        "One seed at one lambda: this shows the method in the regime it is meant for and what the "
        "pipeline measures; it is a demonstration, not a result. Another seed moves such differences by "
        "a few percent; the study (`make study`, bench/study.py) repeats the comparison over seeds, "
        "lambdas and budgets, and its tables are in bench/results/. Steps to reach Adam's final RD loss "
        "are left out: a point of a curve before its run's end has not had the lr's drop, so it is not "
        "what a run of that many steps would end at (the study reads them from complete runs).\n\n"
        + "".join(f"![{path.stem}]({path.name})\n" for path in plots)
    )


def run_demo(out: Path, steps: int | None = None, quick: bool = False) -> dict:
    """Check the pretrained model, run both fine-tunings side by side, write the summary, the report
    and the plots; the summary."""
    begun = time.perf_counter()
    pretrained = check_pretrained()
    steps = steps or (QUICK["steps"] if quick else STEPS)
    evals = QUICK["evals"] if quick else EVALS
    configs = demo_configs(out, PRETRAINED, steps, evals)
    print(
        f"demo: fine-tuning {PRETRAINED.name} from lambda {PRETRAIN_LMBDA:g} to {LMBDA:g}, {steps} steps, "
        f"Adam and STDET side by side (one thread each; output in {out}/adam.out, {out}/stdet.out)",
        flush=True,
    )
    runs = train_in_processes(configs, out)
    stdet = configs["stdet"]
    summary = {
        "setting": {
            **{key: getattr(stdet, key) for key in ("arch", "N", "M", "lmbda", "batch_size", "patch_size")},
            **{key: getattr(stdet, key) for key in ("lr", "lr_schedule", "lr_milestones", "steps", "seed")},
            **{key: getattr(stdet, key) for key in ("sma_every", "sma_alpha", "eval_every")},
            **stdet_knobs(steps),
            "pretrain_lmbda": PRETRAIN_LMBDA,
        },
        "pretrained": {
            "file": str(PRETRAINED.relative_to(PRETRAINED.parents[2])),
            "weights_sha256": pretrained["weights_sha256"],
            "recipe": pretrained["recipe"],
        },
        "start": start_result(PRETRAINED),
        "stdet_config": asdict(stdet.stdet_config()),
        "results": results_of(runs),
        "runs": {
            name: {
                "method": run["method"],
                "curve": run["live_curve"],
                "average_curve": run["curve"],
                "trainable_fraction_min": min(
                    record["trainable_fraction"] for record in _log_records(Path(configs[name].out), "train")
                ),
                **{key: run[key] for key in ("trainable_fraction_end", "wall_s", "peak_rss_mb")},
                "final_weights": run.get("final_weights"),
            }
            for name, run in runs.items()
        },
    }
    points = {
        name: [record["live"] for record in _log_records(Path(configs[name].out), "eval")] for name in LABELS
    }
    plots = [plot_curves(summary, out), plot_rd_points(points, summary["start"], out)]
    summary["wall_s"] = time.perf_counter() - begun
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(report(summary, plots))
    print(tables(summary))
    print(f"\n{embedding_note(summary)}")
    print(
        f"\nthe demo took {summary['wall_s']:.0f} s; summary: {out / 'summary.json'}, report: "
        f"{out / 'report.md'}, plots: {', '.join(str(path) for path in plots)}"
    )
    return summary
