"""What torch's Adam costs on one flat tensor (STDET's ``free_values``) against the same elements in
many tensors (plain training's layers), with the default (foreach) and the fused implementation.

On a CPU the default Adam makes full-size temporaries. On one large tensor, alone in a process,
glibc gives that memory back to the OS when it is freed (28 MB blocks are above its mmap threshold,
or are trimmed off the top of the heap), and every step faults it in again: the page-fault column
shows it. Fixing both glibc thresholds (below) removes the faults and the gap. In a training step
other allocations keep the memory in use and nothing is given back (`bench_step.py`'s page-fault
column). The four cases run interleaved, one step of each in turn, in one process.

    python bench/bench_adam.py                       # bench/results/adam.md
    MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824 \
        python bench/bench_adam.py --out /tmp/kept   # glibc keeps the memory (adam_glibc_kept.md)
"""

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from bench_step import page_faults  # bench/ is on sys.path: this script runs as `python bench/bench_adam.py`

RESULTS = Path(__file__).parent / "results"
ELEMENTS = 7_027_619  # mbt2018-mean's embeddable elements at its zoo size (bench_step.py)
PIECES = 100


def cases() -> dict[str, tuple[torch.optim.Optimizer, list[torch.Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    sizes = {"one flat tensor": [ELEMENTS], f"{PIECES} tensors": [ELEMENTS // PIECES] * PIECES}
    sizes[f"{PIECES} tensors"][-1] += ELEMENTS % PIECES
    made = {}
    for fused in (False, True):
        for layout, pieces in sizes.items():
            params = [torch.nn.Parameter(torch.randn(n, generator=generator)) for n in pieces]
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer = torch.optim.Adam(params, lr=1e-4, fused=fused)
            made[f"{'fused' if fused else 'foreach (default)'}, {layout}"] = (optimizer, params)
    return made


def measure(steps: int) -> dict[str, tuple[float, float]]:
    """Case -> (median ms per step, median page faults per step); the first two steps warm up."""
    torch.set_num_threads(2)
    made = cases()
    times = {name: [] for name in made}
    faults = {name: [] for name in made}
    for _ in range(steps):
        for name, (optimizer, _) in made.items():
            before = page_faults()
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
            faults[name].append(page_faults() - before)
    return {
        name: (statistics.median(times[name][2:]) * 1e3, statistics.median(faults[name][2:])) for name in made
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    medians = measure(args.steps)
    glibc = ", ".join(
        f"{name} {os.environ.get(name, 'default')}"
        for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    )
    lines = [
        f"Adam step on {ELEMENTS:,} float32 elements, {platform.machine()}, 2 threads, torch "
        f"{torch.__version__}, glibc {glibc}; the four cases interleaved step by "
        f"step, medians over {args.steps - 2} steps. `python bench/bench_adam.py`.",
        "",
        "| Adam | layout | ms per step | page faults per step |",
        "| --- | --- | ---: | ---: |",
    ]
    for name, (ms, faults) in medians.items():
        implementation, layout = name.split(", ")
        lines.append(f"| {implementation} | {layout} | {ms:.1f} | {faults:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adam.md").write_text(text)


if __name__ == "__main__":
    main()
