"""Evaluation with real entropy coding, rate-distortion points, BD-rate and RD plots.

`evaluate` does what `compressai.utils.eval_model` does, per image: pad to the model's multiple
(centred, zeros), ``compress`` to bytes, ``decompress``, crop back; it reports the actual bits per pixel
(from the byte strings), PSNR, MS-SSIM (`pytorch_msssim`), encode and decode times, and the bpp the
likelihoods estimate. The RD loss is the training objective on the coded image:
``lambda * 255^2 * MSE + bpp`` (or ``lambda * (1 - MS-SSIM) + bpp``).

BD-rate and BD-PSNR come from the `bjontegaard` package with piecewise cubic ("pchip") interpolation,
the method of the common test conditions.
"""

import csv
import json
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

PAD_MULTIPLE = 64  # 2^6: enough for every CompressAI image model's down-sampling


def rd_loss(metric: str, lmbda: float, mse: float, ms_ssim: float, bpp: float) -> float:
    """The training objective on one image: distortion term plus rate in bits per pixel."""
    if metric == "mse":
        return lmbda * 255.0**2 * mse + bpp
    if metric == "ms-ssim":
        return lmbda * (1.0 - ms_ssim) + bpp
    raise ValueError(f"metric: expected 'mse' or 'ms-ssim', got {metric!r}")


def psnr(mse: float) -> float:
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _ms_ssim(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """MS-SSIM on [0, 1] images (pytorch_msssim, its defaults). Its 4 down-samplings need a side above
    160 pixels with the 11-pixel window: smaller images get the largest odd window that fits, and
    images of 32 pixels or less single-scale SSIM."""
    from pytorch_msssim import ms_ssim, ssim

    side = min(x.shape[-2:])
    window = 11
    while window > 3 and side <= (window - 1) * 16:
        window -= 2
    if side > (window - 1) * 16:
        return float(ms_ssim(x, x_hat, data_range=1.0, win_size=window))
    return float(ssim(x, x_hat, data_range=1.0, win_size=min(11, side - 1 + side % 2)))


def _pad(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    from compressai.ops import compute_padding

    height, width = x.shape[-2:]
    pad, unpad = compute_padding(height, width, min_div=PAD_MULTIPLE)
    return F.pad(x, pad, mode="constant", value=0.0), unpad


@torch.no_grad()
def evaluate_image(
    model: nn.Module, image: torch.Tensor, metric: str = "mse", lmbda: float = 0.01
) -> dict[str, float]:
    """Code one 3xHxW image in [0, 1] with `model` (its CDF tables already updated)."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected a 3xHxW tensor, got shape {tuple(image.shape)}")
    device = next(model.parameters()).device
    x = image.to(device).unsqueeze(0)
    height, width = x.shape[-2:]
    pixels = height * width
    padded, unpad = _pad(x)

    start = time.perf_counter()
    coded = model.compress(padded)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    decoded = model.decompress(coded["strings"], coded["shape"])
    decode_s = time.perf_counter() - start
    x_hat = F.pad(decoded["x_hat"], unpad).clamp_(0, 1)
    num_bytes = sum(len(s) for strings in coded["strings"] for s in strings)
    bpp = num_bytes * 8.0 / pixels

    likelihoods = model(padded)["likelihoods"]
    estimated_bpp = float(sum(torch.log2(p).sum() for p in likelihoods.values()) / -pixels)

    mse = float(F.mse_loss(x_hat, x))
    msssim = _ms_ssim(x, x_hat)
    return {
        "bpp": bpp,
        "estimated_bpp": estimated_bpp,
        "mse": mse,
        "psnr": psnr(mse),
        "ms_ssim": msssim,
        "rd_loss": rd_loss(metric, lmbda, mse, msssim, bpp),
        "encode_s": encode_s,
        "decode_s": decode_s,
        "bytes": num_bytes,
    }


def evaluate(
    model: nn.Module,
    images: dict[str, torch.Tensor],
    metric: str = "mse",
    lmbda: float = 0.01,
    update: bool = True,
) -> dict:
    """Every image coded for real; ``{"images": {name: record}, "mean": record}``.

    `update` first runs CompressAI's ``update(force=True)`` so the CDF tables fit the current weights
    (leave it False when the caller did it, as `stdet.SMA.swap(update_entropy_models=True)` does)."""
    from torch.nn.utils import parametrize

    if not images:
        raise ValueError("images: nothing to evaluate")
    if not hasattr(model, "compress"):
        raise TypeError(f"model: {type(model).__name__} has no compress() (not a CompressAI model)")
    was_training = model.training
    model.eval()
    try:
        if update:
            model.update(force=True)
        with parametrize.cached():  # each parametrized weight reconstructed once, not per call
            records = {name: evaluate_image(model, image, metric, lmbda) for name, image in images.items()}
    finally:
        model.train(was_training)
    keys = next(iter(records.values())).keys()
    mean = {key: sum(r[key] for r in records.values()) / len(records) for key in keys}
    return {"images": records, "mean": mean}


def write_results(result: dict, out: Path) -> tuple[Path, Path]:
    """`result` of `evaluate` as eval.json and eval.csv (one row per image, then the mean) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "eval.json", out / "eval.csv"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    rows = [{"image": name, **record} for name, record in result["images"].items()]
    rows.append({"image": "mean", **result["mean"]})
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


# ----------------------------------------------------------------------------------------------
# Rate-distortion curves


def _sorted_curve(rates: Sequence[float], dists: Sequence[float], name: str) -> tuple[list, list]:
    if len(rates) != len(dists):
        raise ValueError(f"{name}: {len(rates)} rates but {len(dists)} distortions")
    if len(rates) < 2:
        raise ValueError(f"{name}: at least 2 rate-distortion points are needed, got {len(rates)}")
    values = [float(v) for v in (*rates, *dists)]
    if not all(math.isfinite(v) for v in values) or min(rates) <= 0:
        raise ValueError(f"{name}: rates must be positive and every value finite")
    pairs = sorted(zip(rates, dists, strict=True))
    return [float(r) for r, _ in pairs], [float(d) for _, d in pairs]


def bd_rate(anchor: tuple[Sequence, Sequence], test: tuple[Sequence, Sequence]) -> float:
    """Average bitrate difference (percent) of `test` against `anchor` at equal quality; each curve is
    (rates, distortions) with distortion a quality such as PSNR (higher is better)."""
    import bjontegaard

    rate_a, dist_a = _sorted_curve(*anchor, "anchor")
    rate_t, dist_t = _sorted_curve(*test, "test")
    return float(
        bjontegaard.bd_rate(rate_a, dist_a, rate_t, dist_t, method="pchip", require_matching_points=False)
    )


def bd_psnr(anchor: tuple[Sequence, Sequence], test: tuple[Sequence, Sequence]) -> float:
    """Average quality difference (dB for PSNR) of `test` against `anchor` at equal rate."""
    import bjontegaard

    rate_a, dist_a = _sorted_curve(*anchor, "anchor")
    rate_t, dist_t = _sorted_curve(*test, "test")
    return float(
        bjontegaard.bd_psnr(rate_a, dist_a, rate_t, dist_t, method="pchip", require_matching_points=False)
    )


def load_points(paths: Iterable[str | Path], quality: str = "psnr") -> tuple[list[float], list[float]]:
    """(bpp, quality) of each eval.json (from `stdet eval` or `stdet train`), or of each file's mean."""
    rates, dists = [], []
    for path in paths:
        file = Path(path)
        if file.is_dir():
            file = file / "eval.json"
        if not file.is_file():
            raise FileNotFoundError(f"eval result: {file} does not exist")
        try:
            mean = json.loads(file.read_text())["mean"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"eval result: {file} is not an eval.json ({error})") from None
        rates.append(float(mean["bpp"]))
        dists.append(float(mean[quality.replace("-", "_")]))
    return rates, dists


def plot_rd(curves: dict[str, tuple[Sequence, Sequence]], out: Path, quality: str = "PSNR (dB)") -> Path:
    """Quality against bpp, one line per curve, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 4))
    for name, (rates, dists) in curves.items():
        pairs = sorted(zip(rates, dists, strict=True))
        axes.plot([r for r, _ in pairs], [d for _, d in pairs], marker="o", label=name)
    axes.set_xlabel("bits per pixel")
    axes.set_ylabel(quality)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
