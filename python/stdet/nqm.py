"""The noisy quadratic model (NQM): steady-state variance of SGD and of SMA's average, closed form and
Monte Carlo (METHOD.md, "NQM analysis"; the derivation is in docs/nqm.md).

One dimension: loss ``0.5 * h * x^2``, stochastic gradient ``h * x + noise`` with noise variance ``c``,
step size ``lr``. With ``rho = 1 - lr * h`` (stable for ``0 < lr * h < 2``):

- SGD: ``V = lr^2 c / (1 - rho^2)``.
- SMA, sample every ``k`` steps, ``avg += alpha * (sample - avg)``, with ``phi = rho^k`` and
  ``beta = 1 - alpha``:
  - shadow (the average only watches): ``V * alpha * (1 + beta*phi) / ((2 - alpha) * (1 - beta*phi))``;
  - feedback (the weights are set to the average after each sample):
    ``V * alpha^2 * (1 - phi^2) / (1 - (beta + alpha*phi)^2)``.

A spectrum of curvatures ``h_i`` (and noise ``c_i``) sums the per-dimension variances.
"""

from dataclasses import dataclass

import numpy as np

MODES = ("sgd", "shadow", "feedback")


def _check(lr: float, h: np.ndarray, alpha: float, every: int) -> None:
    if not np.all((lr * h > 0) & (lr * h < 2)):
        raise ValueError(
            f"lr * h: expected every value in (0, 2) for a stable SGD, got lr={lr} with h in "
            f"[{np.min(h):.3g}, {np.max(h):.3g}]"
        )
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha: expected a number in (0, 1], got {alpha}")
    if not (isinstance(every, int) and every >= 1):
        raise ValueError(f"every: expected an integer >= 1, got {every}")


def variance(mode: str, lr: float, h, c, alpha: float = 0.1, every: int = 10) -> np.ndarray:
    """Closed-form steady-state variance per dimension (arrays broadcast): of the SGD iterate
    (``mode="sgd"``) or of SMA's average (``"shadow"``, ``"feedback"``)."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    h, c = np.asarray(h, dtype=np.float64), np.asarray(c, dtype=np.float64)
    _check(lr, h, alpha, every)
    rho = 1.0 - lr * h
    sgd = lr**2 * c / (1.0 - rho**2)
    if mode == "sgd":
        return sgd
    phi, beta = rho**every, 1.0 - alpha
    if mode == "shadow":
        return sgd * alpha * (1 + beta * phi) / ((2 - alpha) * (1 - beta * phi))
    return sgd * alpha**2 * (1 - phi**2) / (1 - (beta + alpha * phi) ** 2)


@dataclass
class Simulation:
    """Monte-Carlo variances per dimension, over `replicas` independent chains: of the live iterate
    (in shadow mode, plain SGD's) and of SMA's average."""

    iterate: np.ndarray
    average: np.ndarray
    replicas: int


def simulate(
    mode: str,
    lr: float,
    h,
    c,
    alpha: float = 0.1,
    every: int = 10,
    replicas: int = 20_000,
    seed: int = 0,
) -> Simulation:
    """Run `replicas` independent chains from 0 until stationary, then take each chain's final iterate
    and average: independent samples of the steady state, whose variance is estimated across chains.
    `mode` is "shadow" or "feedback"."""
    if mode not in ("shadow", "feedback"):
        raise ValueError(f"mode: expected 'shadow' or 'feedback', got {mode!r}")
    h = np.atleast_1d(np.asarray(h, dtype=np.float64))
    c = np.broadcast_to(np.asarray(c, dtype=np.float64), h.shape)
    _check(lr, h, alpha, every)
    rng = np.random.default_rng(seed)
    # Ten relaxation times of the slowest part: SGD (1 / (1 - |rho|) steps) and the average
    # (every / alpha steps; in feedback mode every / (alpha * (1 - |phi|)), as it pulls the weights).
    contraction = np.max(np.abs(1.0 - lr * h))
    relax = max(1.0 / (1.0 - contraction), every / alpha)
    if mode == "feedback":
        relax = max(relax, every / (alpha * (1.0 - contraction**every)))
    burn_in = int(10 * relax)
    samples = -(-burn_in // every)
    x = np.zeros((replicas, h.size))
    average = np.zeros_like(x)
    noise_scale = np.sqrt(c)
    for sample in range(samples):
        for _ in range(every):
            x -= lr * (h * x + noise_scale * rng.standard_normal(x.shape))
        average = x.copy() if sample == 0 else average + alpha * (x - average)
        if mode == "feedback":
            x = average.copy()
    return Simulation(iterate=x.var(axis=0), average=average.var(axis=0), replicas=replicas)


def spectrum(dimensions: int = 100, low: float = 1e-2, high: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A log-spaced curvature spectrum with noise proportional to curvature (the usual NQM)."""
    h = np.logspace(np.log10(low), np.log10(high), dimensions)
    return h, h.copy()


def report(
    lr: float, h: np.ndarray, c: np.ndarray, alpha: float, every: int, replicas: int, seed: int = 0
) -> str:
    """A table of total variance over the spectrum: closed form against simulation, SGD and both modes."""
    shadow = simulate("shadow", lr, h, c, alpha, every, replicas, seed)
    feedback = simulate("feedback", lr, h, c, alpha, every, replicas, seed + 1)
    rows = [
        ("SGD iterate", variance("sgd", lr, h, c).sum(), shadow.iterate.sum()),
        ("SMA shadow average", variance("shadow", lr, h, c, alpha, every).sum(), shadow.average.sum()),
        ("SMA feedback average", variance("feedback", lr, h, c, alpha, every).sum(), feedback.average.sum()),
    ]
    lines = [
        f"NQM: {h.size} dimensions, h in [{h.min():.3g}, {h.max():.3g}], lr {lr}, alpha {alpha}, "
        f"sample every {every} steps, {replicas} simulated chains",
        f"{'':22s} {'closed form':>12s} {'simulation':>12s} {'sim/closed':>10s}",
    ]
    lines += [
        f"{name:22s} {closed:12.5g} {simulated:12.5g} {simulated / closed:10.3f}"
        for name, closed, simulated in rows
    ]
    return "\n".join(lines)


def plot(path, lr: float, h: np.ndarray, c: np.ndarray, everies=(1, 5, 10, 50)) -> None:
    """Total steady-state variance against alpha, one line per sampling interval and mode, with SGD's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = np.logspace(-2, 0, 60)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    sgd = variance("sgd", lr, h, c).sum()
    for axis, mode in zip(axes, ("shadow", "feedback"), strict=True):
        for every in everies:
            totals = [variance(mode, lr, h, c, a, every).sum() for a in alphas]
            axis.plot(alphas, totals, label=f"sample every {every}")
        axis.axhline(sgd, color="black", linestyle="--", label="SGD iterate")
        axis.set(xscale="log", yscale="log", xlabel="alpha", title=f"SMA {mode} average")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("steady-state variance (sum over dimensions)")
    axes[1].legend()
    figure.suptitle(f"Noisy quadratic model: {h.size} curvatures in [{h.min():.3g}, {h.max():.3g}], lr {lr}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
