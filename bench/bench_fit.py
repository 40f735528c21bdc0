"""Time of mode discovery (`stdet.modes.fit_modes`) for a 5-million-parameter model, F = 20.

The trajectories are synthetic (random-walk modes plus noise, over tensors shaped like a CompressAI
model's), which costs the same as real ones: the fit is matrix products over the element axis and a
clustering of K samples, whatever the values. Writes bench/results/fit.md.
"""

import argparse
import time
from pathlib import Path

import torch

from stdet.modes import OnlineRefit, fit_modes
from stdet.trajectory import layout

RESULTS = Path(__file__).resolve().parent / "results"


def synthetic_trajectories(elements: int, snapshots: int, modes: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    walks = torch.randn(snapshots, modes, generator=generator).cumsum(0)
    mode = torch.randint(0, modes, (elements,), generator=generator)
    x = torch.randn(snapshots, elements, generator=generator).mul_(0.1)
    x.add_(walks[:, mode] * torch.randn(elements, generator=generator))
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--elements", type=int, default=5_000_000)
    parser.add_argument("--snapshots", type=int, default=20)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--modes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    x = synthetic_trajectories(args.elements, args.snapshots, args.modes, seed=0)
    # Tensor sizes like a conv stack: a few large tensors and many small ones.
    sizes, left = [], args.elements
    while left > 0:
        size = min(left, max(1, left // 4))
        sizes.append(size)
        left -= size
    slices = layout({f"tensor{i}": torch.empty(size) for i, size in enumerate(sizes)})
    times = []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        fit = fit_modes(
            x, slices, samples=args.samples, modes=args.modes, generator=torch.Generator().manual_seed(repeat)
        )
        times.append(time.perf_counter() - start)
    refit = OnlineRefit(fit)
    start = time.perf_counter()
    refit.update(x[-1])
    refit.coefficients()
    update_s = time.perf_counter() - start
    median = sorted(times)[len(times) // 2]
    report = (
        f"fit_modes: {args.elements:,} parameters, F = {args.snapshots}, K = {args.samples}, "
        f"M = {args.modes}, "
        f"{torch.get_num_threads()} threads: median {median:.2f} s over {args.repeats} runs "
        f"({', '.join(f'{t:.2f}' for t in times)}); {fit.num_modes} modes found; "
        f"one online refit update + coefficients: {update_s:.3f} s"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fit.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
