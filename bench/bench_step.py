"""What one training step costs: plain training against STDET right after attaching (all FREE), at 50%
and at 80% embedded, each without and with SMA, for bmshj2018-factorized and mbt2018-mean.

A step is what `stdet train` does: zero the gradients, forward, the RD loss, backward, Adam on the
network, the aux loss and its Adam, then `STDET.step()` (or `SMA.step()`). Times come from
pytest-benchmark (median of the rounds); SMA samples every step here (an upper bound: at its default
of every 10 steps its cost is a tenth). Embedding rounds are not in the timed steps (one every
`embed_every` steps; the schedule's least-squares refit runs every 50 steps as with the default
warm-up, and is in them in proportion). Peak memory is each case's process-wide peak RSS, measured
in a process of its own.

    python -m pytest bench/bench_step.py --benchmark-json=bench/results/step.json
    python bench/bench_step.py --report     # bench/results/step.md (also measures peak RSS per case)
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).parent / "results"
MODELS = {"bmshj2018-factorized": (128, 192), "mbt2018-mean": (128, 192)}
BATCH, SIZE = 2, 128
STATES = {"plain": None, "all FREE": 0.0, "50% embedded": 0.5, "80% embedded": 0.8}
REFIT_INTERVAL = 50  # the default warm-up's snapshot interval (1000 / 20)


def build(arch: str, state: str, sma: bool):
    """(one training step as a function, facts about the trained state)."""
    import stdet
    from stdet.data import RandomCrops, bundled_images
    from stdet.train import build_model

    torch.manual_seed(0)
    model = build_model(arch, *MODELS[arch])
    net = [p for n, p in model.named_parameters() if not n.endswith(".quantiles")]
    aux = [p for n, p in model.named_parameters() if n.endswith(".quantiles")]
    optimizer = torch.optim.Adam(net, lr=1e-4)
    aux_optimizer = torch.optim.Adam(aux, lr=1e-3)
    x = RandomCrops(bundled_images("train"), SIZE, seed=0).batch(0, BATCH)
    target = STATES[state]
    st = averager = None
    if target is not None:
        config = stdet.STDETConfig(
            warmup_steps=2, snapshots=2, embed_every=1 if target > 0 else 10**9, embed_rate=1.0,
            max_embedded=max(target, 1e-9), protect=0.0, min_r2=0.0, max_drift=1e9, safety_window=1,
            sma_every=1 if sma else 0,
        )  # fmt: skip
        st = stdet.STDET(model, optimizer, config)
    elif sma:
        averager = stdet.SMA(model, every=1)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        aux_optimizer.zero_grad(set_to_none=True)
        out = model(x)
        bpp = sum(torch.log(p).sum() for p in out["likelihoods"].values()) / (
            -math.log(2) * BATCH * SIZE * SIZE
        )
        loss = 0.01 * 255**2 * torch.nn.functional.mse_loss(out["x_hat"], x) + bpp
        loss.backward()
        optimizer.step()
        model.aux_loss().backward()
        aux_optimizer.step()
        if st is not None:
            st.step()
        elif averager is not None:
            averager.step()

    for _ in range(4):  # warm-up, fit, attach and (for 50/80%) the one round that embeds the target
        step()
    if st is not None:
        st.config.embed_every = 10**9
        st.snapshot_interval = REFIT_INTERVAL
    state_bytes = sum(
        t.nbytes for entry in optimizer.state.values() for t in entry.values() if isinstance(t, torch.Tensor)
    )
    facts = {
        "embedded_fraction": 0.0 if st is None else st.embedded_fraction(),
        "optimizer_state_bytes": state_bytes,
        "trainable_elements": sum(p.numel() for group in optimizer.param_groups for p in group["params"]),
    }
    return step, facts


CASES = [(arch, state, sma) for arch in MODELS for state in STATES for sma in (False, True)]


@pytest.mark.parametrize(
    ("arch", "state", "sma"), CASES, ids=[f"{a}-{s}-{'sma' if m else 'no_sma'}" for a, s, m in CASES]
)
def test_step(benchmark, arch: str, state: str, sma: bool) -> None:
    torch.set_num_threads(2)
    step, facts = build(arch, state, sma)
    benchmark.extra_info.update(facts, arch=arch, state=state, sma=sma)
    benchmark.pedantic(step, rounds=12, warmup_rounds=2)
    if STATES[state]:
        assert facts["embedded_fraction"] == pytest.approx(STATES[state], abs=0.01)


def peak_rss(arch: str, state: str, sma: bool) -> float:
    """Peak RSS (MB) of a process that builds the case and runs 6 steps."""
    code = (
        "import sys, resource; sys.path.insert(0, 'bench'); from bench_step import build\n"
        f"step, _ = build({arch!r}, {state!r}, {sma!r})\n"
        "for _ in range(6): step()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(finished.stdout.strip().splitlines()[-1])


def report(json_path: Path) -> str:
    data = json.loads(json_path.read_text())
    rows = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        rows[(info["arch"], info["state"], info["sma"])] = (bench["stats"]["median"], info)
    cpu = data["machine_info"].get("cpu", {}).get("brand_raw", "CPU")
    lines = [
        f"Training step, batch {BATCH} x 3 x {SIZE} x {SIZE}, Adam, {cpu}, 2 threads; median of 12 steps "
        "(pytest-benchmark). SMA: a sample every step (upper bound). Peak RSS: the case alone in a process.",
        "",
        "| model | state | SMA | ms / step | vs plain | optimizer state (MB) | trainable elements "
        "| peak RSS (MB) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for arch, state, sma in CASES:
        median, info = rows[(arch, state, sma)]
        plain = rows[(arch, "plain", sma)][0]
        lines.append(
            f"| {arch} | {state} | {'every step' if sma else '-'} | {median * 1e3:.1f} | "
            f"{median / plain - 1:+.1%} | "
            f"{info['optimizer_state_bytes'] / 2**20:.2f} | {info['trainable_elements']:,} | "
            f"{peak_rss(arch, state, sma):.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--report", action="store_true", help="write bench/results/step.md from step.json")
    parser.add_argument("--json", default=str(RESULTS / "step.json"))
    args = parser.parse_args()
    if args.report:
        text = report(Path(args.json))
        (RESULTS / "step.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
