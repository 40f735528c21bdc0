"""Screen `heldout`: is STDET + SMA's +0.1% in fine-tuning a harm, or the noise of the comparison?

Not written before it ran: an exploratory look at the same runs came first (the screen guard had left
it open why no probe from the training photos predicts the held-out photos). **Hypothesis**: on the
held-out photos the study's average and its live weights differ by noise that no choice between them
can see: weight jitter that moves each photo's distortion its own way. Then, over the 12 runs at S of
each track, the mean change of the held-out RD loss (average against live) is within two standard
errors of zero; within a run the photos disagree in sign; the rate changes the same way in every run
(the average lags the drift of training), while the distortion decides the RD loss; and neither the
real entropy coding (against the likelihoods' estimate) nor the entropy bottleneck's `quantiles`
(the aux optimizer's medians, averaged too) makes the difference. **Falsified** if the fine-tuning
track's mean change is more than two standard errors above zero: then the average does harm there
and the guard must learn to see it.

It trains nothing: like bench/screen_guard.py it restores the study's finished STDET runs at S
(``runs/study``; ``python bench/study.py`` makes them) and codes the held-out photos for real with
the live weights, with the average, and with the average but the live `quantiles`.
Table: bench/results/screen_heldout.md.

    python bench/screen_heldout.py [--out runs/study]
"""

import math
import statistics
from pathlib import Path

import torch

# bench/ is on sys.path: this runs as `python bench/screen_heldout.py`.
from screen_guard import restore, run_screen

from stdet.evaluate import evaluate, rd_loss

SIGMAS = 2.0


def measure(run: Path) -> dict:
    """Per held-out photo: RD loss, MSE, bpp (real and estimated) of the live weights, the average,
    and the average with the live weights' entropy-bottleneck `quantiles`."""
    trainer, live, average = restore(run)
    model = trainer.model
    quantiles = {name: p for name, p in model.named_parameters() if name.endswith("quantiles")}
    live_quantiles = {name: p.detach().clone() for name, p in quantiles.items()}
    with trainer.sma.swap(update_entropy_models=True):
        averaged = {name: p.detach().clone() for name, p in quantiles.items()}
        try:
            with torch.no_grad():
                for name, p in quantiles.items():
                    p.copy_(live_quantiles[name])
            live_q = evaluate(model, trainer.eval_images, trainer.config.metric, trainer.lmbda)
        finally:
            with torch.no_grad():
                for name, p in quantiles.items():
                    p.copy_(averaged[name])
    keys = ("rd_loss", "mse", "bpp", "estimated_bpp")

    def records(result: dict) -> dict:
        return {Path(name).stem: {k: r[k] for k in keys} for name, r in result["images"].items()}

    return {
        "lmbda": trainer.lmbda,
        "seed": trainer.config.seed,
        "live": records(live),
        "average": records(average),
        "average_live_quantiles": records(live_q),
    }


def mean_of(records: dict, key: str) -> float:
    return statistics.fmean(r[key] for r in records.values())


def rd_change(run: dict, weights: str, bpp: str = "bpp") -> float:
    """Held-out RD loss (mean over photos; the study's MSE objective) of `weights` against the live
    weights', with real or estimated bpp."""

    def rd(records: dict) -> float:
        return statistics.fmean(rd_loss("mse", run["lmbda"], r["mse"], 0.0, r[bpp]) for r in records.values())

    return rd(run[weights]) / rd(run["live"]) - 1


def rate_change(run: dict) -> float:
    """The average's mean bpp over the photos against the live weights'."""
    return mean_of(run["average"], "bpp") / mean_of(run["live"], "bpp") - 1


def photo_changes(run: dict, key: str = "mse") -> dict[str, float]:
    """Each photo's change of `key`, average against live."""
    return {name: run["average"][name][key] / r[key] - 1 for name, r in run["live"].items()}


def track_summary(runs: list[dict]) -> dict:
    changes = [rd_change(r, "average") for r in runs]
    spread = statistics.stdev(changes) / math.sqrt(len(changes)) if len(changes) > 1 else 0.0
    photos = [photo_changes(r) for r in runs]
    lower = sum(change < 0 for p in photos for change in p.values())
    return {
        "runs": len(runs),
        "mean": statistics.fmean(changes),
        "se": spread,
        "median": statistics.median(changes),
        "rate": statistics.fmean(rate_change(r) for r in runs),
        "rate_lower": sum(rate_change(r) < 0 for r in runs),
        "photos_lower": lower,
        "photos": sum(len(p) for p in photos),
        "mixed_runs": sum(min(p.values()) < 0 < max(p.values()) for p in photos),
        "photo_spread": statistics.fmean(statistics.stdev(p.values()) for p in photos),
        "coding": max(abs(rd_change(r, "average") - rd_change(r, "average", "estimated_bpp")) for r in runs),
        "quantiles": statistics.fmean(
            abs(rd_change(r, "average") - rd_change(r, "average_live_quantiles")) for r in runs
        ),
    }


def verdict(results: dict[str, list[dict]]) -> list[str]:
    lines = ["", "## Verdict", ""]
    finetune = track_summary(results["finetune"]) if results.get("finetune") else None
    if finetune is None:
        return [*lines, "No fine-tuning runs: nothing to judge."]
    harm = finetune["mean"] > SIGMAS * finetune["se"]
    lines.append(
        f"Hypothesis {'falsified' if harm else 'holds'}: in fine-tuning the average's held-out RD loss "
        f"changes by {100 * finetune['mean']:+.2f}% on the mean over {finetune['runs']} runs, "
        f"{'more' if harm else 'less'} than {SIGMAS:g} standard errors ({100 * finetune['se']:.2f}%) "
        "from zero."
    )
    for track, runs in results.items():
        s = track_summary(runs)
        lines.append(
            f"- {track}: the photos disagree in sign in {s['mixed_runs']} of {s['runs']} runs (per-photo "
            f"MSE changes spread {100 * s['photo_spread']:.2f}% within a run); the average's rate is lower "
            f"in {s['rate_lower']} of {s['runs']} runs ({100 * s['rate']:+.2f}% on the mean); real coding "
            f"against the estimate moves the change by at most {100 * s['coding']:.3f}%, the live "
            f"quantiles by {100 * s['quantiles']:.2f}% on the mean."
        )
    return lines


def report(results: dict[str, list[dict]]) -> str:
    lines = [
        "# Screen heldout: the average against the live weights, photo by photo",
        "",
        (__doc__ or "").split("\n\n")[1].replace("\n", " "),
        "",
        "Per track, over the STDET runs at S (nothing embedded: the live weights are Adam's): the mean "
        "change of the held-out RD loss, average against live, with its standard error over runs, and "
        "the median; the rate change; photos (of all runs' photos) where the average's MSE is lower; "
        "runs whose photos disagree in sign; the spread (std) of the per-photo MSE changes within a run, "
        "averaged over runs; how far the estimate's bpp moves the change at most; how far the live "
        "quantiles move it on the mean.",
        "",
        "| track | runs | mean change | SE | median | rate change | photos: average's MSE lower | "
        "runs with mixed signs | per-photo spread | coding | quantiles |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for track, runs in results.items():
        s = track_summary(runs)
        lines.append(
            f"| {track} | {s['runs']} | {100 * s['mean']:+.2f}% | {100 * s['se']:.2f}% | "
            f"{100 * s['median']:+.2f}% | {100 * s['rate']:+.2f}% | {s['photos_lower']} of {s['photos']} | "
            f"{s['mixed_runs']} of {s['runs']} | {100 * s['photo_spread']:.2f}% | {100 * s['coding']:.3f}% | "
            f"{100 * s['quantiles']:.2f}% |"
        )
    names = sorted(next(iter(results.values()))[0]["live"])
    lines += [
        "",
        "Per run: the held-out RD loss change (average against live), the bpp change, and each photo's "
        "MSE change.",
        "",
        "| track | lambda | seed | RD loss | bpp | " + " | ".join(names) + " |",
        "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in names) + " |",
    ]
    for track, runs in results.items():
        for r in sorted(runs, key=lambda r: (r["lmbda"], r["seed"])):
            photos = photo_changes(r)
            lines.append(
                f"| {track} | {r['lmbda']:g} | {r['seed']} | {100 * rd_change(r, 'average'):+.2f}% | "
                f"{100 * rate_change(r):+.2f}% | "
                + " | ".join(f"{100 * photos[n]:+.2f}%" for n in names)
                + " |"
            )
    return "\n".join(lines + verdict(results)) + "\n"


def main() -> None:
    run_screen("heldout", __doc__ or "", measure, report, "run python bench/study.py first")


if __name__ == "__main__":
    main()
