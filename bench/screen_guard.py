"""Screen `guard`: can a better probe make the SMA guard's choice right, so that STDET + SMA does no harm?

Written before it ran. The study's harm check (bench/results/study_harm.md) found the guard, which
hands out the shadow average only where the 8-crop probe batch's loss is not higher with it, wrong
in 11 of 24 runs against the held-out photos (9 averages kept that were 0.06-0.92% worse, 2 live
choices where the average was better). **Hypothesis**: the errors are the probe's sampling noise,
not a difference between the training photos and the held-out ones. Then a larger probe (64 or 256
crops from the training photos, a generator no training batch uses), judged by a paired test (hand
out the average only if its mean per-crop loss is lower by more than two standard errors of the
per-crop differences), makes no choice that costs more than 0.1% on the held-out photos, and its
median over seeds, then over lambdas, of (handed-out RD loss / live RD loss - 1) is <= 0 in both
tracks. **Falsified** if the 64- and 256-crop probes still keep averages that are worse by more than
0.1%: then the probe measures the wrong photos, and no training-photo probe can guard.

It trains nothing: it reads the harm check's finished STDET runs (``runs/study``; ``python
bench/study.py --harm`` makes them), restores each from its ``last.ckpt``, codes the held-out photos
for real with the live weights and with the average (both must match the run's own records), and
computes every probe's per-crop losses for both. Table: bench/results/screen_guard.md.

    python bench/screen_guard.py [--out runs/study]
"""

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import tomllib
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import stdet.sma
from stdet.data import RandomCrops
from stdet.train import PROBE_SEED_OFFSET, TrainConfig, Trainer, load_checkpoint

PROBE_SIZES = (8, 64, 256)
# The probe crops of the larger probes: a generator apart from the training batches and the 8-crop probe.
LARGE_PROBE_OFFSET = 7_919
SIGMAS = 2.0


def run_config(run: Path) -> TrainConfig:
    return TrainConfig.from_dict(tomllib.loads((run / "config.toml").read_text()))


def restore(run: Path) -> tuple[Trainer, dict, dict]:
    """The finished run restored from its ``last.ckpt``, with the held-out photos coded for real with
    its live weights and with its average; raises if either figure differs from the run's own record."""
    trainer = Trainer(run_config(run), resume=load_checkpoint(run / "last.ckpt"))
    live = trainer.evaluate_live()
    average = trainer.evaluate()
    recorded = json.loads((run / "live_eval.json").read_text())["rd_loss"]
    summary = json.loads((run / "summary.json").read_text())
    checks = [(live["mean"]["rd_loss"], recorded)]
    if summary["final_weights"] == "average":
        checks.append((average["mean"]["rd_loss"], summary["final_eval"]["rd_loss"]))
    for measured, logged in checks:
        if abs(measured / logged - 1) > 1e-6:
            raise RuntimeError(f"{run}: held-out RD loss {measured} here, {logged} in the run's records")
    return trainer, live, average


def measure(run: Path) -> dict:
    """Held-out RD loss of the live weights and of the average, and every probe's per-crop losses."""
    trainer, held_live, held_average = restore(run)
    config = trainer.config
    # The trainer's own training photos (bundled or --data), in its order.
    train_images = {str(i): image for i, image in enumerate(trainer.crops.images)}
    large = RandomCrops(train_images, config.patch_size, config.seed + PROBE_SEED_OFFSET + LARGE_PROBE_OFFSET)
    probes = {8: trainer.probe_batch, **{size: large.batch(0, size) for size in PROBE_SIZES[1:]}}
    live = {size: trainer.probe_losses(batch) for size, batch in probes.items()}
    with trainer.sma.swap():
        average = {size: trainer.probe_losses(batch) for size, batch in probes.items()}
    return {
        "lmbda": config.lmbda,
        "seed": config.seed,
        "held_live": held_live["mean"]["rd_loss"],
        "held_average": held_average["mean"]["rd_loss"],
        "probes": {size: {"live": live[size].tolist(), "average": average[size].tolist()} for size in probes},
    }


def paired_difference(probe: dict) -> tuple[float, float]:
    """(mean, standard error) of the per-crop differences, average minus live; SE 0 for one crop."""
    return stdet.sma.paired_difference(torch.tensor(probe["live"]), torch.tensor(probe["average"]))


def choose_average(probe: dict, paired: bool) -> bool:
    """The guard's choice (the library's own rule, `stdet.sma.average_is_better`): the mean per-crop
    loss lower with the average (and, `paired`, by more than `SIGMAS` standard errors of the
    per-crop differences)."""
    live, average = torch.tensor(probe["live"]), torch.tensor(probe["average"])
    return stdet.sma.average_is_better(live, average, SIGMAS if paired else 0.0)


RULES = [(f"{size} crops, mean", size, False) for size in PROBE_SIZES] + [
    (f"{size} crops, paired {SIGMAS:g} SE", size, True) for size in PROBE_SIZES
]


def rule_stats(runs: list[dict], choose) -> dict:
    """How a rule fares on `runs`: `choose(run)` is True where it hands out the average."""
    changes, wrong, wrong_big, worst, kept = {}, 0, 0, 0.0, 0
    for r in runs:
        use_average = choose(r)
        kept += use_average
        chosen = r["held_average"] if use_average else r["held_live"]
        cost = chosen / min(r["held_average"], r["held_live"]) - 1
        wrong += cost > 0
        wrong_big += cost > 1e-3
        worst = max(worst, cost)
        changes.setdefault(r["lmbda"], []).append(chosen / r["held_live"] - 1)
    median_change = statistics.median([statistics.median(v) for v in changes.values()])
    return {"kept": kept, "wrong": wrong, "wrong_big": wrong_big, "worst": worst, "median": median_change}


def rule_row(track: str, runs: list[dict], name: str, choose) -> str:
    """One rule's table row."""
    stats = rule_stats(runs, choose)
    return (
        f"| {track} | {name} | {stats['kept']} of {len(runs)} | {stats['wrong_big']} | {stats['wrong']} | "
        f"{100 * stats['worst']:.2f}% | {100 * stats['median']:+.2f}% |"
    )


def verdict(results: dict[str, list[dict]]) -> list[str]:
    """The hypothesis judged from the table, and what the largest probe says against the photos."""
    large = [(size, paired) for _, size, paired in RULES if size > PROBE_SIZES[0]]
    holds = all(
        stats["wrong_big"] == 0 and stats["median"] <= 0
        for runs in results.values()
        for size, paired in large
        for stats in [rule_stats(runs, lambda r, s=size, p=paired: choose_average(r["probes"][str(s)], p))]
    )
    lines = [
        "",
        "## Verdict",
        "",
        f"Hypothesis {'holds' if holds else 'falsified'}: "
        + (
            "every probe of 64 crops or more guards."
            if holds
            else "a probe of 64 or more crops still makes choices that cost more than 0.1%, or a "
            "track's median "
            "is above the live weights'."
        ),
    ]
    size = PROBE_SIZES[-1]
    for track, runs in results.items():
        confident = [r for r in runs if choose_average(r["probes"][str(size)], paired=True)]
        right = sum(r["held_average"] <= r["held_live"] for r in confident)
        lines.append(
            f"- {track}: the {size}-crop probe finds the average better by more than {SIGMAS:g} standard "
            f"errors in {len(confident)} of {len(runs)} runs; on the held-out photos it is better in {right} "
            "of those."
        )
    return lines


def report(results: dict[str, list[dict]]) -> str:
    lines = [
        "# Screen guard: the SMA guard's choice against the held-out photos",
        "",
        (__doc__ or "").split("\n\n")[1].replace("\n", " "),
        "",
        "Per rule and track: how often it hands out the average; wrong choices (the other weights were "
        "better on the held-out photos by more than 0.1%, and in all); the worst cost of a choice; the "
        "median over seeds, then over lambdas, of the handed-out weights' held-out RD loss against the "
        "live weights' (= Adam's: nothing was embedded); and the same for the best choice in hindsight "
        "and for always the average (plain EMA).",
        "",
        "| track | rule | average handed out | wrong > 0.1% | wrong | worst cost | median vs live |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for track, runs in results.items():
        for name, size, paired in RULES:
            lines.append(
                rule_row(
                    track, runs, name, lambda r, s=size, p=paired: choose_average(r["probes"][str(s)], p)
                )
            )
        lines.append(rule_row(track, runs, "always the average (plain EMA)", lambda r: True))
        lines.append(
            rule_row(track, runs, "best in hindsight", lambda r: r["held_average"] <= r["held_live"])
        )
    lines += [
        "",
        "Per run: held-out RD loss change of the average against the live weights, and each probe's "
        "mean per-crop change (with its standard error).",
        "",
        "| track | lambda | seed | held-out | " + " | ".join(f"probe {s}" for s in PROBE_SIZES) + " |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in PROBE_SIZES) + " |",
    ]
    for track, runs in results.items():
        for r in sorted(runs, key=lambda r: (r["lmbda"], r["seed"])):
            cells = []
            for size in PROBE_SIZES:
                probe = r["probes"][str(size)]
                mean, se = paired_difference(probe)
                base = sum(probe["live"]) / len(probe["live"])
                cells.append(f"{100 * mean / base:+.2f}% ± {100 * se / base:.2f}")
            held = 100 * (r["held_average"] / r["held_live"] - 1)
            lines.append(
                f"| {track} | {r['lmbda']:g} | {r['seed']} | {held:+.2f}% | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines + verdict(results)) + "\n"


def measured_runs(
    out: Path, cache: Path, measure: Callable[[Path], dict], hint: str
) -> dict[str, list[dict]]:
    """Track -> `measure` of each finished STDET run at S under `out` (the study's runs), kept in the
    JSON `cache` as it goes: a rerun measures only the runs the cache lacks. `hint` says how to make
    the runs when there are none."""
    results: dict[str, list[dict]] = json.loads(cache.read_text()) if cache.exists() else {}
    for track in ("scratch", "finetune"):
        done = {(r["lmbda"], r["seed"]) for r in results.get(track, [])}
        for run in sorted((out / track).glob("lambda*/seed*/stdet_*_b1.0")):
            if not (run / "summary.json").exists():
                continue
            config = run_config(run)
            if (config.lmbda, config.seed) in done:
                continue
            measured = json.loads(json.dumps(measure(run)))  # keys as strings, as in the cache
            results.setdefault(track, []).append(measured)
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(results))
            print(track, run.parent.parent.name, run.parent.name, "done", flush=True)
    if not results:
        raise SystemExit(f"no finished STDET runs under {out}: {hint}")
    return results


def run_screen(name: str, doc: str, measure: Callable[[Path], dict], report, hint: str) -> None:
    """A screen's command line: measure the study's runs (cached in runs/study/screens/<name>.json),
    write `report(results)` to bench/results/screen_<name>.md and print it."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/study"))
    parser.add_argument("--results", type=Path, default=Path(f"bench/results/screen_{name}.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = measured_runs(args.out, args.out / "screens" / f"{name}.json", measure, hint)
    text = report(results)
    args.results.write_text(text)
    print(text)


def main() -> None:
    run_screen("guard", __doc__ or "", measure, report, "run python bench/study.py --harm first")


if __name__ == "__main__":
    main()
