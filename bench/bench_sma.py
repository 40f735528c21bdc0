"""Per-step cost of weight averaging on a CompressAI model: stdet.SMA against PyTorch's AveragedModel
EMA and against a timm-style `torch._foreach_lerp_` EMA, each updating every step. Writes
bench/results/sma.md.

For a plain model all three update every floating-point tensor once per step. On a model attached by
STDET, SMA takes the parametrized weights' sample inside the reconstruction the forward runs anyway
(`reconstruct_compact_sma_` instead of `reconstruct_compact`): its extra cost is the difference
between the two forwards, measured here too.
"""

import statistics
import time
from pathlib import Path

import torch
from compressai.models import MeanScaleHyperprior
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import stdet
from stdet.parametrize import attach

RESULTS = Path(__file__).resolve().parent / "results"


def median_ms(function, repeats: int = 30, warmup: int = 3) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.manual_seed(0)
    model = MeanScaleHyperprior(N=128, M=192)  # the zoo's mbt2018-mean at qualities 1-5
    parameters = sum(p.numel() for p in model.parameters())
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    ema = [p.detach().clone() for p in model.parameters()]
    live = [p.detach() for p in model.parameters()]
    sma = stdet.SMA(model, every=1, alpha=0.1)
    rows = [
        ("AveragedModel EMA (multi_avg_fn)", median_ms(lambda: averaged.update_parameters(model))),
        ("torch._foreach_lerp_ EMA (timm style)", median_ms(lambda: torch._foreach_lerp_(ema, live, 0.1))),
        ("stdet.SMA, plain model (multi-tensor lerp_)", median_ms(sma.step)),
    ]

    attach(model)
    attached_sma = stdet.SMA(model, every=1, alpha=0.1)
    attached_sma.step()
    attached_sma.flush()
    x = torch.rand(1, 3, 128, 128)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def sampled_forward() -> None:
        attached_sma.step()
        forward()

    # Interleaved, so both see the same machine load; the difference is taken pair by pair.
    for _ in range(3):
        forward()
        sampled_forward()
    pairs = []
    for _ in range(20):
        start = time.perf_counter()
        forward()
        middle = time.perf_counter()
        sampled_forward()
        pairs.append((middle - start, time.perf_counter() - middle))
    rows.append(("model forward, STDET-attached (1x3x128x128)", statistics.median(p[0] for p in pairs) * 1e3))
    rows.append(
        ("same forward + stdet.SMA step (fused sample)", statistics.median(p[1] for p in pairs) * 1e3)
    )
    rows.append(("  SMA's extra cost per sampling step", statistics.median(b - a for a, b in pairs) * 1e3))

    header = (
        f"mbt2018-mean (MeanScaleHyperprior N=128, M=192), {parameters:,} parameters, "
        f"{torch.get_num_threads()} threads; median over repeats, ms per step (averaging every step)."
    )
    table = ["| what | ms per step |", "|---|---:|"] + [f"| {name} | {ms:.2f} |" for name, ms in rows]
    report = header + "\n\n" + "\n".join(table) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sma.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
