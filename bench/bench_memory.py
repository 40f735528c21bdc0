"""What training keeps per embeddable element: plain Adam against STDET at 80% embedded, with float32
and with bfloat16 coefficients; and whether 16-bit coefficients change the training loss.

A bmshj2018-factorized model (N=32, M=48) trains on random 64x64 crops of the photo matplotlib ships
(grace_hopper.jpg), the same crops in the same order for every run. Writes bench/results/memory.md.
"""

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from compressai.models import FactorizedPrior
from matplotlib import cbook
from PIL import Image

import stdet
from stdet.parametrize import embeddable_parameters

RESULTS = Path(__file__).resolve().parent / "results"


def photo() -> torch.Tensor:
    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def crops(image: torch.Tensor, step: int, batch: int, size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    _, height, width = image.shape
    tops = torch.randint(0, height - size + 1, (batch,), generator=generator).tolist()
    lefts = torch.randint(0, width - size + 1, (batch,), generator=generator).tolist()
    return torch.stack([image[:, t : t + size, x : x + size] for t, x in zip(tops, lefts, strict=True)])


def rd_loss(model: torch.nn.Module, x: torch.Tensor, lmbda: float) -> torch.Tensor:
    out = model(x)
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    log_likelihood = sum(torch.log(likelihood).sum() for likelihood in out["likelihoods"].values())
    return lmbda * 255**2 * torch.nn.functional.mse_loss(out["x_hat"], x) + log_likelihood / (
        -math.log(2) * pixels
    )


def nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def state_bytes(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter) -> int:
    return sum(
        nbytes(t)
        for t in optimizer.state.get(param, {}).values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )


def accounting(model, optimizer, st: stdet.STDET | None) -> dict[str, float]:
    """Bytes per embeddable element of each part of what training keeps."""
    parts = dict.fromkeys(("values", "gradients", "optimizer state", "codes", "coefficients"), 0)
    if st is None:
        names = embeddable_parameters(model)
        elements = sum(model.get_parameter(n).numel() for n in names)
        for name in names:
            param = model.get_parameter(name)
            parts["values"] += nbytes(param)
            parts["gradients"] += nbytes(param)  # one gradient per value once backward has run
            parts["optimizer state"] += state_bytes(optimizer, param)
    else:
        elements = st.elements
        layout = st.layout
        for tensor in (layout.free_values, layout.refs):
            parts["values"] += nbytes(tensor)
            parts["gradients"] += nbytes(tensor)
            parts["optimizer state"] += state_bytes(optimizer, tensor)
        parts["codes"] += nbytes(layout.code) + nbytes(layout.offsets)
        parts["coefficients"] += nbytes(layout.a) + nbytes(layout.b)
    result = {name: size / elements for name, size in parts.items()}
    result["total"] = sum(result.values())
    if st is not None:
        schedule = nbytes(st.mode) + sum(nbytes(getattr(st.refit, n)) for n in st.refit.PER_ELEMENT)
        schedule += nbytes(st.layout.sensitivity)
        result["schedule statistics (not counted above)"] = schedule / elements
        result["embedded fraction"] = st.embedded_fraction()
    return result


def train(args, image, coefficient_dtype: str | None) -> tuple[dict, float, float, float]:
    torch.manual_seed(0)
    model = FactorizedPrior(N=32, M=48)
    parameters = [p for n, p in model.named_parameters() if not n.endswith(".quantiles")]
    optimizer = torch.optim.Adam(parameters, lr=args.lr)
    st = None
    if coefficient_dtype is not None:
        config = stdet.STDETConfig(
            warmup_steps=args.warmup,
            snapshots=20,
            embed_every=args.embed_every,
            embed_rate=0.3,
            max_embedded=0.8,
            safety_window=args.safety_window,
            safety_tolerance=args.safety_tolerance,
            coefficient_dtype=coefficient_dtype,
            start="warmup",  # the memory of the embedded layout: embed from the warm-up's end
        )
        st = stdet.STDET(model, optimizer, config)
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        optimizer.zero_grad()
        loss = rd_loss(model, crops(image, step, args.batch, 64), args.lmbda)
        loss.backward()
        optimizer.step()
        if st is not None:
            st.step(loss)
        losses.append(float(loss.detach()))
    wall = time.perf_counter() - start
    # Held-out evaluation: fixed crops, noise-free quantisation as at test time.
    model.eval()
    with torch.no_grad():
        evaluation = float(rd_loss(model, crops(image, 10**6, 32, 64), args.lmbda))
    final = sum(losses[-20:]) / 20
    return accounting(model, optimizer, st), final, evaluation, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--embed-every", type=int, default=25)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lmbda", type=float, default=0.0130)
    parser.add_argument("--safety-window", type=int, default=25)
    parser.add_argument("--safety-tolerance", type=float, default=0.02)
    args = parser.parse_args()
    image = photo()
    runs = {"plain Adam": None} | {f"STDET, {d} a, b": d for d in ("float32", "bfloat16", "float16")}
    results = {name: train(args, image, dtype) for name, dtype in runs.items()}
    accounts = [result[0] for result in results.values()]
    plain = accounts[0]

    def row(label: str, cells) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    rows = [row("bytes per embeddable element", results), "|---|" + "---:|" * len(results)]
    for key in ("values", "gradients", "optimizer state", "codes", "coefficients", "total"):
        rows.append(row(key, (f"{acc[key]:.2f}" for acc in accounts)))
    schedule = "schedule statistics (not counted above)"
    rows.append(row(schedule, (f"{acc[schedule]:.2f}" if schedule in acc else "-" for acc in accounts)))
    rows.append(row("total / plain", (f"{acc['total'] / plain['total']:.0%}" for acc in accounts)))
    state = "optimizer state"
    rows.append(row("optimizer state / plain", (f"{acc[state] / plain[state]:.0%}" for acc in accounts)))
    rows.append(row("embedded fraction", (f"{acc.get('embedded fraction', 0.0):.0%}" for acc in accounts)))
    rows.append(row("train RD loss, last 20 steps", (f"{r[1]:.3f}" for r in results.values())))
    rows.append(row("eval RD loss, 32 fixed crops", (f"{r[2]:.3f}" for r in results.values())))
    rows.append(row("wall time, s", (f"{r[3]:.1f}" for r in results.values())))
    header = (
        f"bmshj2018-factorized N=32 M=48, {args.steps} steps of {args.batch} 64x64 crops of "
        f"grace_hopper.jpg, Adam lr {args.lr}, lambda {args.lmbda}; STDET warm-up {args.warmup}, a round "
        f"every {args.embed_every} steps at rate 0.3 up to 80% embedded, safety window "
        f"{args.safety_window} steps, tolerance {args.safety_tolerance:.0%}. "
        f"{torch.get_num_threads()} threads."
    )
    report = header + "\n\n" + "\n".join(rows) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
