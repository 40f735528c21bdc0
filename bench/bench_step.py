"""What one training step costs: plain training against STDET waiting for a plateau (the default
``start="plateau"`` before the loss flattens), all FREE (modes fitted, before the first round: the
model not attached yet, the sensitivity tracked by gradient hooks), at 50%, 80% and 90% embedded, and
released after the lr drop (attached, every element FREE again), on two model sizes, timed phase by
phase with the cases interleaved (in a shuffled order each round, so that no case always follows the
same one), with the standard error of each case's ratio to plain from the paired per-round
differences.

A step is what `stdet train` does: zero the gradients, forward and RD loss, backward, Adam on the
network and the aux loss with its Adam, then `STDET.step(loss)`. On this shared machine timings drift
by 10-30% over minutes, so the cases run in one process, one step of each in turn (A B C A B C ...),
and each case's mean is over whole periods of the schedule's refit (every `REFIT_INTERVAL` steps, as
with the defaults, the only periodic work in `STDET.step` between rounds; no embedding round runs
while timing). Also
counted: the stdet op launches of a step, the most of any step of a whole refit period
(`stdet_kernels.record_calls`; the refit's own step included, whose snapshot the backward takes).

    python bench/bench_step.py            # bench/results/step.md and step.json
    python bench/bench_step.py --quick    # a few steps, to check the script
    # a focused A/B: fewer cases make shorter rounds, so each pair of steps is closer in time and the
    # paired SE smaller on a noisy machine (bench/results/step_focus.md unless --name is given)
    python bench/bench_step.py --models mbt2018-mean --states plain "80% embedded" --steps 400
"""

import argparse
import json
import math
import platform
import random
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
# model -> ((N, M), batch): the small factorized model and mbt2018-mean at its zoo size
MODELS = {"bmshj2018-factorized": ((64, 96), 4), "mbt2018-mean": ((128, 192), 2)}
SIZE = 128
# state -> (embedded fraction, sensitivity tracked in the backward). STDET tracks it in the steps of
# the window before each round (44 of every 100 with the defaults) until max_embedded, then never.
STATES = {
    "plain": (None, False),
    # The library's default before a plateau: not attached (the plain model), a snapshot of the
    # weights and a probe forward (as `stdet train` gives) every refit interval.
    "waiting for a plateau": ("waiting", False),
    # Modes fitted, before the first round: every element FREE, the model not attached yet (the
    # layers' own tensors; gradient hooks track the sensitivity, the refit reads the layers).
    "all FREE": (0.0, True),
    "all FREE, not tracking": (0.0, False),
    "50% embedded": (0.5, True),
    "80% embedded": (0.8, True),
    "80% embedded, not tracking": (0.8, False),
    "90% embedded": (0.9, True),
    # max_embedded with the defaults: from there on (all but the first few thousand steps of a long
    # run) STDET never tracks the sensitivity again.
    "90% embedded, not tracking": (0.9, False),
    # With release=True (not the default), after the lr drop (the LIC schedule's last 10-15%): 80%
    # embedded, then everything released to FREE; no refit, no tracking, the weights are views of
    # free_values.
    "released after the lr drop": ("released", False),
}
# The snapshot interval of the default schedule (warmup_steps // snapshots: 1000 // 20), which the
# refit and, waiting for a plateau, the probe follow.
REFIT_INTERVAL = 50
QUICK_INTERVAL = 5
PHASES = ("forward", "backward", "optimizer", "stdet")


def page_faults() -> int:
    """Minor page faults of this process so far: memory the allocator took fresh from the OS."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def rd_loss(out: dict, x: torch.Tensor) -> torch.Tensor:
    """The step's RD loss at lambda 0.01: 0.01 * 255^2 * MSE + bpp (the likelihoods' estimate)."""
    bpp = sum(torch.log(p).sum() for p in out["likelihoods"].values()) / (-math.log(2) * x.numel() / 3)
    return 0.01 * 255**2 * torch.nn.functional.mse_loss(out["x_hat"], x) + bpp


class Case:
    """One model in one state, with its optimizers and (but for plain) its STDET."""

    def __init__(
        self, arch: str, state: str, device: str = "cpu", batch_scale: int = 1, interval: int = REFIT_INTERVAL
    ) -> None:
        import stdet
        from stdet.data import RandomCrops, bundled_images
        from stdet.train import build_model

        (n, m), batch = MODELS[arch]
        batch *= batch_scale
        torch.manual_seed(0)
        self.model = build_model(arch, n, m).to(device)
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        net = [p for name, p in self.model.named_parameters() if not name.endswith(".quantiles")]
        aux = [p for name, p in self.model.named_parameters() if name.endswith(".quantiles")]
        self.optimizer = torch.optim.Adam(net, lr=1e-4)
        self.aux_optimizer = torch.optim.Adam(aux, lr=1e-3)
        self.x = RandomCrops(bundled_images("train"), SIZE, seed=0).batch(0, batch).to(device)
        self.st = None
        target, tracking = STATES[state]
        released = target == "released"
        target = 0.8 if released else target
        if target == "waiting":
            config = stdet.STDETConfig(warmup_steps=2, snapshots=2, start="plateau", plateau_tolerance=0.0)
            self.st = stdet.STDET(self.model, self.optimizer, config, probe=self.probe)
        elif target is not None:
            config = stdet.STDETConfig(
                warmup_steps=2, snapshots=2, embed_every=1 if target > 0 else 10**9, embed_rate=1.0,
                max_embedded=max(target, 1e-9), protect=0.0, min_r2=0.0, max_drift=1e9, safety_window=1,
                start="warmup", release=released,
            )  # fmt: skip
            self.st = stdet.STDET(self.model, self.optimizer, config)
        for _ in range(4):  # warm-up, fit, attach and (50% and up) the round that embeds the target
            self.step({})
        if target == "waiting":  # warm-up over, no plateau (tolerance 0): a snapshot and a probe per refit
            assert self.st.phase == "waiting", self.st.phase
        elif released:  # a 10x lr drop: the next STDET.step releases
            for group in self.optimizer.param_groups:
                group["lr"] *= 0.1
            self.step({})
            assert self.st.phase == "released" and self.st.embedded_fraction() == 0.0, self.st.phase
        if self.st is not None:
            self.st.config.embed_every = 10**9
            self.st.snapshot_interval = interval
            self.st.step_count = 0  # refits at every interval-th timed step
            self.st._track_sensitivity = lambda: None  # this case's setting, every step
            config = self.st.config
            tracker = self.st._tracker()  # the hooks before the first round, then the layout
            tracker.track_sensitivity = (config.sensitivity_decay, config.sensitivity) if tracking else None
        self.embedded = 0.0 if self.st is None or not self.st.layout.attached else self.st.embedded_fraction()
        self.trainable = sum(p.numel() for group in self.optimizer.param_groups for p in group["params"])
        self.times = {phase: [] for phase in PHASES}

    def probe(self) -> float:
        """A fixed batch's RD loss in eval mode, as `stdet train`'s probe."""
        self.model.eval()
        with torch.no_grad():
            out = self.model(self.x)
        self.model.train()
        return float(rd_loss(out, self.x))

    def step(self, times: dict) -> None:
        model, x, sync = self.model, self.x, self.sync
        sync()
        faults = page_faults()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.aux_optimizer.zero_grad(set_to_none=True)
        loss = rd_loss(model(x), x)
        sync()
        forward = time.perf_counter()
        loss.backward()
        sync()
        backward = time.perf_counter()
        self.optimizer.step()
        model.aux_loss().backward()
        self.aux_optimizer.step()
        sync()
        optimizer = time.perf_counter()
        if self.st is not None:
            self.st.step(loss)
        sync()
        end = time.perf_counter()
        for phase, seconds in zip(
            PHASES, (forward - start, backward - forward, optimizer - backward, end - optimizer), strict=True
        ):
            times.setdefault(phase, []).append(seconds)
        times.setdefault("faults", []).append(page_faults() - faults)


def step_totals(case: Case) -> list[float]:
    """Each timed step's total of `case`, in ms, in the order of the rounds."""
    return [sum(phases) * 1e3 for phases in zip(*(case.times[phase] for phase in PHASES), strict=True)]


def launches(case: Case, interval: int) -> int:
    """The most stdet op calls in one training step of `case`, over the steps of a refit period."""
    import stdet_kernels

    counts = []
    for _ in range(interval):
        with stdet_kernels.record_calls() as calls:
            case.step({})
        counts.append(len(calls))
    return max(counts)


@dataclass(frozen=True)
class Run:
    """What one invocation measures: `steps` timed steps per case, a refit every `interval`, the
    cases `models` x `states` (all by default; plain always, the ratios' reference)."""

    steps: int
    device: str = "cpu"
    batch_scale: int = 1
    interval: int = REFIT_INTERVAL
    models: list[str] | None = None
    states: list[str] | None = None

    def command(self) -> str:
        """The command line that makes this run."""
        command = "python bench/bench_step.py"
        if self.device != "cpu":
            command += f" --device {self.device} --batch-scale {self.batch_scale}"
        if self.steps != 2 * self.interval:
            command += f" --steps {self.steps}"
        if self.models:
            command += " --models " + " ".join(self.models)
        if self.states:
            command += " --states " + " ".join(f'"{s}"' if " " in s else s for s in self.states)
        return command


def measure(run: Run) -> dict:
    """Each case of `run`, interleaved."""
    steps, device, interval = run.steps, run.device, run.interval
    if device == "cpu":
        torch.set_num_threads(2)
    results = {}
    order = random.Random(0)
    states = ["plain", *(s for s in run.states or STATES if s != "plain")]
    for arch in run.models or MODELS:
        cases = {state: Case(arch, state, device, run.batch_scale, interval) for state in states}
        rounds = list(cases.values())
        for _ in range(steps):  # interleaved: one step of each case per round, in a shuffled order
            order.shuffle(rounds)
            for case in rounds:
                case.step(case.times)
        plain = step_totals(cases["plain"])
        for state, case in cases.items():
            means = {phase: sum(case.times[phase]) / len(case.times[phase]) * 1e3 for phase in PHASES}
            differences = [t - p for t, p in zip(step_totals(case), plain, strict=True)]
            results[(arch, state)] = {
                **means,
                "total": sum(means.values()),
                # The ratio's standard error: the paired per-round differences' over plain's mean.
                "ratio_se": statistics.stdev(differences) / math.sqrt(steps) / statistics.fmean(plain),
                "page_faults": sum(case.times["faults"]) / len(case.times["faults"]),
                "embedded": case.embedded,
                "trainable": case.trainable,
                "launches": launches(case, interval),
                "layers": 0 if case.st is None else len(case.st.names),
                # The default schedule's window (the bench tracks every step or none itself).
                "sensitivity_window": None if case.st is None else case.st.sensitivity_window,
            }
    return results


def report(results: dict, run: Run) -> str:
    steps, device, batch_scale, interval = run.steps, run.device, run.batch_scale, run.interval
    if device == "cpu":
        cpu = platform.processor() or platform.machine()
        try:
            import cpuinfo  # py-cpuinfo, installed with pytest-benchmark

            cpu = cpuinfo.get_cpu_info().get("brand_raw", cpu)
        except ImportError:
            pass
        where = f"{cpu}, 2 threads"
    else:
        where = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    command = run.command()
    lines = [
        f"Training step, Adam, {where}, `{command}`. Cases interleaved step by step in one process, "
        f"in a shuffled order each round; means over {steps} steps ({steps // interval} whole "
        f"refit periods of {interval} steps, the default schedule's). Times in ms; launches: stdet op "
        "calls in a step, the most over a refit period; page faults: minor faults per step (memory "
        "taken fresh from the OS); SE: the standard error of the ratio to plain, from the paired "
        "per-round differences.",
        "",
        "| model (batch) | state | forward | backward | optimizer | `STDET.step` | total | vs plain "
        "| SE | trainable elements | launches | page faults |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (arch, state), row in results.items():
        (n, m), batch = MODELS[arch]
        batch *= batch_scale
        plain = results[(arch, "plain")]["total"]
        label = f"{arch} N={n} M={m} ({batch}x3x{SIZE}x{SIZE})"
        stdet_ms = "-" if state == "plain" else f"{row['stdet']:.1f}"
        se = "-" if state == "plain" else f"{row['ratio_se']:.3f}"
        lines.append(
            f"| {label} | {state} | {row['forward']:.1f} | {row['backward']:.1f} | {row['optimizer']:.1f} | "
            f"{stdet_ms} | {row['total']:.1f} | {row['total'] / plain:.3f}x | {se} | "
            f"{row['trainable']:,} | "
            f"{row['launches']} | {row['page_faults']:.0f} |"
        )
    periods = period_means(results)
    if periods:
        lines += ["", *periods]
    return "\n".join(lines) + "\n"


def period_means(results: dict) -> list[str]:
    """What a step costs on average over an embedding period with the default schedule: the
    sensitivity is tracked in the window before each round (`STDET.sensitivity_window` steps of
    every `embed_every`) until `max_embedded`, from the tracking and not-tracking rows above; and
    from `max_embedded` on, where it is never tracked again."""
    import stdet

    needed = ("all FREE", "all FREE, not tracking", "80% embedded", "80% embedded, not tracking")
    needed += ("90% embedded, not tracking",)
    archs = list(dict.fromkeys(arch for arch, _ in results))
    if any((arch, state) not in results for arch in archs for state in needed):
        return []  # a focused run: not every row these means weigh was measured
    embed_every = stdet.STDETConfig().embed_every  # the cases' own is off while timing
    window = next(row["sensitivity_window"] for row in results.values() if row["sensitivity_window"])
    share = window / embed_every
    lines = [
        f"Over an embedding period with the defaults (the sensitivity tracked in {window} of every "
        f"{embed_every} steps), from the rows above:",
        "",
    ]
    for arch in archs:
        plain = results[(arch, "plain")]["total"]
        parts = []
        for tracked, untracked in (
            ("all FREE", "all FREE, not tracking"),
            ("80% embedded", "80% embedded, not tracking"),
        ):
            ratio = (
                share * results[(arch, tracked)]["total"] + (1 - share) * results[(arch, untracked)]["total"]
            ) / plain
            parts.append(f"{tracked} {ratio:.3f}x")
        steady = results[(arch, "90% embedded, not tracking")]["total"] / plain
        parts.append(f"and from `max_embedded` on (90%, never tracked again) {steady:.3f}x")
        lines.append(f"- {arch}: " + ", ".join(parts))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2 * REFIT_INTERVAL, help="timed steps per case")
    parser.add_argument(
        "--quick", action="store_true", help=f"refits every {QUICK_INTERVAL} steps, results not written"
    )
    parser.add_argument("--device", default="cpu", help="cpu (the README's table) or cuda")
    parser.add_argument("--batch-scale", type=int, default=1, help="multiply each model's batch")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="a subset of the models")
    parser.add_argument(
        "--states", nargs="+", choices=list(STATES), help="a subset of the states (plain is always run)"
    )
    parser.add_argument("--name", help="results file name without suffix (default: step, or step_focus)")
    args = parser.parse_args()
    interval = QUICK_INTERVAL if args.quick else REFIT_INTERVAL
    steps = 2 * QUICK_INTERVAL if args.quick else args.steps
    if steps % interval:
        parser.error(f"--steps: expected a multiple of the refit interval, {interval}")
    run = Run(steps, args.device, args.batch_scale, interval, args.models, args.states)
    results = measure(run)
    text = report(results, run)
    print(text)
    if not args.quick:
        name = "step" if args.device == "cpu" else f"step_gpu_b{args.batch_scale}"
        if args.models or args.states:
            name += "_focus"
        name = args.name or name
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{name}.md").write_text(text)
        rows = [{"arch": arch, "state": state, **row} for (arch, state), row in results.items()]
        (args.out / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
