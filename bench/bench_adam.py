"""What torch's Adam costs on one flat tensor (STDET's ``free_values``) against the same elements in
many tensors (plain training's layers), with the default (foreach) and the fused implementation.

On a CPU the default Adam's full-size temporaries are fresh memory every step; on one large tensor
that memory is faulted in anew each time, so the flat layout's optimizer phase costs more than the
layers' own. The four cases run interleaved, one step of each in turn, in one process.

    python bench/bench_adam.py                       # bench/results/adam.md
    MALLOC_MMAP_THRESHOLD_=1000000000 python bench/bench_adam.py --out /tmp   # glibc keeps the memory
"""

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

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


def measure(steps: int) -> dict[str, float]:
    torch.set_num_threads(2)
    made = cases()
    times = {name: [] for name in made}
    for _ in range(steps):
        for name, (optimizer, _) in made.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[2:]) * 1e3 for name, t in times.items()}  # the first two warm up


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    medians = measure(args.steps)
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc's default")
    lines = [
        f"Adam step on {ELEMENTS:,} float32 elements, {platform.machine()}, 2 threads, torch "
        f"{torch.__version__}, MALLOC_MMAP_THRESHOLD_ {threshold}; the four cases interleaved step by "
        f"step, medians over {args.steps - 2} steps. `python bench/bench_adam.py`.",
        "",
        "| Adam | layout | ms per step |",
        "| --- | --- | ---: |",
    ]
    for name, ms in medians.items():
        implementation, layout = name.split(", ")
        lines.append(f"| {implementation} | {layout} | {ms:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adam.md").write_text(text)


if __name__ == "__main__":
    main()
