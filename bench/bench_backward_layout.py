"""The attached step's fused backward alone, on `bench_step.py`'s own layouts (a model at a given
embedded fraction), without and with the sensitivity's update, against a ``copy_`` of the same
gradient: how far the kernel is from the time of its bytes, and what the sensitivity adds. The three
calls run interleaved (A B C A B C ...) and each figure is a median, so drift touches them alike.

    python bench/bench_backward_layout.py                               # mbt2018-mean, 80% embedded
    python bench/bench_backward_layout.py --model bmshj2018-factorized --state "90% embedded"
"""

import argparse
import statistics
import time

import bench_step
import torch

import stdet
import stdet_kernels


def measure(model: str, state: str, calls: int) -> dict[str, float]:
    """Median ms of each call on `model`'s layout in `state`."""
    torch.set_num_threads(2)
    st = bench_step.Case(model, state).st
    layout = None if st is None else st.layout
    if layout is None or not layout.attached:
        raise SystemExit(f"--state: {state!r} leaves the model unattached (no layout to time)")
    grad = torch.randn(layout.numel)
    out = torch.empty_like(grad)
    sensitivity = layout.sensitivity.clone()
    values = layout.free_values.detach()
    args = (layout.code, layout.offsets, layout.a, layout.refs.detach())
    config = stdet.STDETConfig()  # the defaults' decay and measure
    calls_by_name = {
        "copy_ of the gradient": lambda: out.copy_(grad),
        "backward": lambda: torch.ops.stdet.reconstruct_compact_backward(grad, *args),
        "backward + sensitivity": lambda: stdet_kernels.reconstruct_compact_backward_sensitivity_(
            grad, values, *args, sensitivity, config.sensitivity_decay, config.sensitivity
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in calls_by_name}
    for _ in range(5):  # warm
        for call in calls_by_name.values():
            call()
    for _ in range(calls):
        for name, call in calls_by_name.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="mbt2018-mean", choices=list(bench_step.MODELS))
    parser.add_argument("--state", default="80% embedded", choices=list(bench_step.STATES))
    parser.add_argument("--calls", type=int, default=60, help="timed calls of each")
    args = parser.parse_args()
    for name, ms in measure(args.model, args.state, args.calls).items():
        print(f"{name}: {ms:.2f} ms")


if __name__ == "__main__":
    main()
