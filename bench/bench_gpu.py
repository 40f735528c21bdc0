"""The ops on a GPU: each backend that runs there (cuda, triton) against eager PyTorch, torch.compile of
the reference and a `copy_` of the same number of bytes, timed with CUDA events in one process.

The training machines of our users are GPUs; this machine's CI has none, so this script is run by hand
where one is lent (`python bench/bench_gpu.py`, writes bench/results/gpu_ops.{md,json}). Inputs are
bench_ops.py's: float32, 10 modes, half the elements FREE, the rest embedded; bytes are each op's minimum
traffic (every input read once, every output written once). Time: median of `--repeats` timed calls
after warm-up, each call timed alone between two events.
"""

import argparse
import json
import statistics
from pathlib import Path

import bench_ops  # bench/ is on sys.path: this script runs as `python bench/bench_gpu.py`
import torch

import stdet_kernels
from stdet_kernels import reference

RESULTS = Path(__file__).parent / "results"
SIZES = (10**5, 10**6, 10**7, 10**8)
PROVIDERS = ("cuda", "triton", "torch", "torch_compile", "copy")
_compiled: dict[str, object] = {}
# float32 is 4 bytes, code 1; compact ops read a, b and free values for their half of the elements.
BYTES_PER_ELEMENT = {
    "reconstruct": 4 * 3 + 1 + 4,
    "reconstruct_backward": 4 + 1 + 4 + 4,
    "reconstruct_sma_": 4 * 4 + 1 + 4 * 2,
    "reconstruct_compact": 1 + 4 + 4 * 3 / 2,  # code, w; free values or a/b for each half
    "reconstruct_compact_sma_": 1 + 4 + 4 * 2 + 4 * 3 / 2,
    "compact_backward_sensitivity_": 4 + 1 + (4 + 4 + 4 + 4 + 4) / 2,
}


def inputs(n: int, device: str) -> dict[str, torch.Tensor]:
    """bench_ops' inputs on `device`, with their compact layout and a sensitivity."""
    x = {k: v.to(device) for k, v in bench_ops._inputs(n).items()}
    free_values, offsets, a, b = stdet_kernels.pack(x["value"], x["code"], x["a"], x["b"])
    x.update(free_values=free_values, offsets=offsets, ca=a, cb=b)
    x["sensitivity"] = torch.rand(free_values.numel(), device=device)
    return x


def operation(op: str, provider: str, x: dict[str, torch.Tensor]):
    """A no-argument callable running `op` on `provider`, or None where the provider lacks the op."""
    dense = (x["value"], x["code"], x["a"], x["b"], x["refs"])
    compact = (x["free_values"], x["code"], x["offsets"], x["ca"], x["cb"], x["refs"])
    backward = (x["grad"], x["free_values"], x["code"], x["offsets"], x["ca"], x["refs"], x["sensitivity"])
    if provider == "copy":
        source = torch.empty(int(x["value"].numel() * BYTES_PER_ELEMENT[op] / 2), dtype=torch.uint8)
        source = source.to(x["value"].device)
        target = torch.empty_like(source)
        return lambda: target.copy_(source)
    if provider in ("torch", "torch_compile"):
        args = {
            "reconstruct": dense,
            "reconstruct_backward": (x["grad"], x["code"], x["a"], x["refs"]),
            "reconstruct_sma_": (*dense, x["sma"], 0.1),
            "reconstruct_compact": compact,
            "reconstruct_compact_sma_": (*compact, x["sma"], 0.1),
            "compact_backward_sensitivity_": (*backward, 0.9, False),
        }[op]
        name = "reconstruct_compact_backward_sensitivity_" if op == "compact_backward_sensitivity_" else op
        function = getattr(reference, name)
        if provider == "torch_compile":
            if name not in _compiled:  # dynamic shapes: one compile per op, not one per size
                _compiled[name] = torch.compile(function, dynamic=True)
            function = _compiled[name]
        return lambda: function(*args)
    calls = {
        "reconstruct": lambda: stdet_kernels.reconstruct(*dense),
        "reconstruct_backward": lambda: torch.ops.stdet.reconstruct_backward(
            x["grad"], x["code"], x["a"], x["refs"]
        ),
        "reconstruct_sma_": lambda: stdet_kernels.reconstruct_sma_(*dense, x["sma"], 0.1),
        "reconstruct_compact": lambda: stdet_kernels.reconstruct_compact(*compact),
        "reconstruct_compact_sma_": lambda: stdet_kernels.reconstruct_compact_sma_(*compact, x["sma"], 0.1),
        "compact_backward_sensitivity_": lambda: stdet_kernels.reconstruct_compact_backward_sensitivity_(
            *backward, 0.9, "taylor"
        ),
    }
    return calls[op]


def time_call(call, backend: str, repeats: int) -> float:
    """Median seconds of one call, each timed alone between two CUDA events."""
    with stdet_kernels.use_backend(backend):
        for _ in range(3):
            call()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure(sizes, repeats: int) -> list[dict]:
    rows = []
    for n in sizes:
        x = inputs(n, "cuda")
        for op in BYTES_PER_ELEMENT:
            for provider in PROVIDERS:
                backend = provider if provider in ("cuda", "triton") else "torch"
                if provider in ("cuda", "triton") and not stdet_kernels.backends.supports(
                    provider, torch.device("cuda")
                ):
                    continue
                try:
                    seconds = time_call(operation(op, provider, x), backend, repeats)
                except Exception as error:  # a broken provider is reported, not fatal to the table
                    print(f"{op} n={n:.0e} {provider}: {type(error).__name__}: {str(error)[:300]}")
                    continue
                moved = n * BYTES_PER_ELEMENT[op]
                rows.append({"op": op, "n": n, "provider": provider, "seconds": seconds, "bytes": moved})
                rate = moved / seconds / 1e9
                print(f"{op:32s} n={n:.0e} {provider:14s} {seconds * 1e6:10.1f} us {rate:8.1f} GB/s")
        del x
        torch.cuda.empty_cache()
    return rows


def report(rows: list[dict]) -> str:
    props = torch.cuda.get_device_properties(0)
    lines = [
        f"Ops on {props.name} (torch {torch.__version__}), `python bench/bench_gpu.py`: median of timed "
        "calls (CUDA events), float32, 10 modes, half FREE. GB/s counts each op's minimum traffic; "
        "'of copy' is against `copy_` of the same bytes in the same run.",
        "",
        "| op | n | provider | time (us) | GB/s | of copy |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    copy = {(r["op"], r["n"]): r["bytes"] / r["seconds"] for r in rows if r["provider"] == "copy"}
    for r in rows:
        if (r["op"], r["n"]) not in copy:
            continue
        rate = r["bytes"] / r["seconds"]
        lines.append(
            f"| {r['op']} | {r['n']:.0e} | {r['provider']} | {r['seconds'] * 1e6:.1f} | {rate / 1e9:.0f} | "
            f"{rate / copy[r['op'], r['n']]:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for gpu_ops.md and gpu_ops.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no GPU: this benchmark needs CUDA (bench/run_bench.py covers the CPU)")
    rows = measure(SIZES, args.repeats)
    text = report(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_ops.md").write_text(text)
    (args.out / "gpu_ops.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
