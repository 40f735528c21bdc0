"""Correlation mode discovery (METHOD.md, "CMD mode discovery", steps 2-5).

From F snapshots of N parameters (one ``(F, N)`` matrix, see `trajectory`):

1. sample K parameters, balanced across tensors, skipping constant trajectories;
2. cluster the samples by |Pearson correlation| (complete linkage, scipy) into at most M modes;
3. take as each mode's reference the sample with the highest mean |corr| to its cluster;
4. assign every parameter to the reference it correlates with most, with least-squares ``a, b`` of
   its trajectory on the reference's, and the fit quality R^2 (= corr^2 for one regressor).

Everything over N is done in chunks of matrix products: no Python loop per parameter. A constant
trajectory correlates with nothing: it gets ``a = 0``, ``b =`` its value, ``R^2 = 0``, all finite.
`OnlineRefit` then keeps ``a, b, R^2`` current from later snapshots by recursive least squares
(Welford-style running moments), without storing trajectories again.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

import stdet_kernels

from .trajectory import TensorSlice

MAX_MODES = 254  # codes 0..253 name modes
DEFAULT_CHUNK = 1 << 20


@dataclass
class ModeFit:
    """The result of `fit_modes`. Indices are positions on the flat element axis."""

    references: torch.Tensor  # (M,) int64: the reference element of each mode
    mode: torch.Tensor  # (N,) uint8: the mode each element is assigned to
    a: torch.Tensor  # (N,) float32
    b: torch.Tensor  # (N,) float32
    r2: torch.Tensor  # (N,) float32, in [0, 1]
    samples: torch.Tensor  # (K,) int64: the sampled elements that were clustered
    clusters: torch.Tensor  # (K,) int64: the mode of each sample
    # Running moments over the warm-up snapshots, the starting point of `OnlineRefit`.
    count: int
    mean: torch.Tensor  # (N,) float32: mean of each element's trajectory
    moment2: torch.Tensor  # (N,) float32: sum of squared deviations of each trajectory
    comoment: torch.Tensor  # (N,) float32: sum of (w - mean) (ref - ref mean) with its own reference

    @property
    def num_modes(self) -> int:
        return int(self.references.numel())


def sample_balanced(slices: Sequence[TensorSlice], samples: int, generator: torch.Generator) -> torch.Tensor:
    """`samples` distinct flat indices, as evenly spread over the tensors as their sizes allow.

    Each tensor gets an equal quota; quotas a small tensor cannot fill go to the others in turn.
    """
    sizes = [piece.numel for piece in slices]
    quota = [0] * len(slices)
    remaining = min(samples, sum(sizes))
    open_tensors = [i for i, size in enumerate(sizes) if size > 0]
    while remaining > 0 and open_tensors:
        share = max(1, remaining // len(open_tensors))
        for i in list(open_tensors):
            take = min(share, sizes[i] - quota[i], remaining)
            quota[i] += take
            remaining -= take
            if quota[i] == sizes[i]:
                open_tensors.remove(i)
            if remaining == 0:
                break
    chosen = [
        piece.start + torch.randperm(piece.numel, generator=generator)[:count]
        for piece, count in zip(slices, quota, strict=True)
        if count > 0
    ]
    return torch.cat(chosen) if chosen else torch.empty(0, dtype=torch.int64)


def _standardize(trajectories: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unit-norm centred columns, column means, column norms), float32; zero columns stay zero."""
    x = trajectories.float()
    mean = x.mean(dim=0)
    centred = x - mean
    norm = centred.norm(dim=0)
    unit = centred / torch.where(norm > 0, norm, 1.0)
    return unit, mean, norm


def _cluster(abs_corr: np.ndarray, modes: int) -> np.ndarray:
    """Complete-linkage clusters (labels 0..) of the samples at distance 1 - |corr|, at most `modes`."""
    if abs_corr.shape[0] < 2:
        return np.zeros(abs_corr.shape[0], dtype=np.int64)
    distance = 1.0 - abs_corr
    np.fill_diagonal(distance, 0.0)
    tree = linkage(squareform(np.clip(distance, 0.0, 1.0), checks=False), method="complete")
    labels = fcluster(tree, t=modes, criterion="maxclust")
    _, dense = np.unique(labels, return_inverse=True)
    return dense.astype(np.int64)


def fit_modes(
    trajectories: torch.Tensor,
    slices: Sequence[TensorSlice],
    samples: int = 1000,
    modes: int = 10,
    generator: torch.Generator | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> ModeFit:
    """Discover at most `modes` modes in `trajectories` ``(F, N)`` and fit every element to one.

    `slices` (from `trajectory.layout`) says which columns belong to which tensor, for the balanced
    sampling of `samples` elements. `chunk` bounds the columns processed at once (memory), not the
    result.
    """
    if trajectories.dim() != 2:
        raise ValueError(f"trajectories: expected a (snapshots, elements) matrix, got {trajectories.dim()}-D")
    snapshots, elements = trajectories.shape
    if snapshots < 2:
        raise ValueError(f"trajectories: expected at least 2 snapshots, got {snapshots}")
    if not trajectories.is_floating_point():
        raise TypeError(f"trajectories: expected a floating-point tensor, got {trajectories.dtype}")
    if not slices or slices[-1].stop != elements:
        raise ValueError(f"slices: expected a layout covering the {elements} elements of trajectories")
    if not 1 <= modes <= MAX_MODES:
        raise ValueError(f"modes: expected 1..{MAX_MODES}, got {modes}")
    if samples < 1:
        raise ValueError(f"samples: expected at least 1, got {samples}")
    if chunk < 1:
        raise ValueError(f"chunk: expected at least 1, got {chunk}")
    if not bool(torch.isfinite(trajectories).all()):
        raise ValueError("trajectories: contain NaN or infinity; mode fitting needs finite snapshots")
    generator = generator or torch.Generator().manual_seed(0)

    # Steps 2-3 on the samples whose trajectories move.
    sampled = sample_balanced(slices, samples, generator)
    unit, _, norm = _standardize(trajectories[:, sampled.to(trajectories.device)].cpu())
    moving = norm > 0
    sampled, unit = sampled[moving], unit[:, moving]
    abs_corr = (unit.T @ unit).abs().clamp_(max=1.0)
    clusters = torch.from_numpy(_cluster(abs_corr.double().numpy(), modes))
    references = []
    for label in range(int(clusters.max()) + 1 if clusters.numel() else 0):
        members = (clusters == label).nonzero().flatten()
        cohesion = abs_corr[members][:, members].mean(dim=1)
        references.append(sampled[members[cohesion.argmax()]])
    references_t = torch.stack(references) if references else torch.empty(0, dtype=torch.int64)

    # Step 4 over all elements, chunk by chunk.
    ref_unit, ref_mean, ref_norm = _standardize(trajectories[:, references_t.to(trajectories.device)])
    mode = torch.zeros(elements, dtype=torch.uint8)
    a, b, r2, mean, moment2, comoment = (torch.zeros(elements) for _ in range(6))
    for start in range(0, elements, chunk):
        stop = min(elements, start + chunk)
        unit, chunk_mean, chunk_norm = _standardize(trajectories[:, start:stop])
        mean[start:stop], moment2[start:stop] = chunk_mean.cpu(), chunk_norm.square().cpu()
        if references_t.numel() == 0:
            b[start:stop] = chunk_mean.cpu()
            continue
        corr = unit.T @ ref_unit  # (chunk, M)
        best = corr.abs().argmax(dim=1)
        r = corr.gather(1, best[:, None]).squeeze(1).clamp(-1.0, 1.0)
        slope = r * chunk_norm / ref_norm[best]
        mode[start:stop] = best.to(torch.uint8).cpu()
        a[start:stop] = slope.cpu()
        b[start:stop] = (chunk_mean - slope * ref_mean[best]).cpu()
        r2[start:stop] = r.square().cpu()
        comoment[start:stop] = (r * chunk_norm * ref_norm[best]).cpu()
    # A reference follows itself exactly.
    mode[references_t] = torch.arange(references_t.numel(), dtype=torch.uint8)
    a[references_t], b[references_t], r2[references_t] = 1.0, 0.0, 1.0
    return ModeFit(
        references=references_t,
        mode=mode,
        a=a,
        b=b,
        r2=r2,
        samples=sampled,
        clusters=clusters,
        count=snapshots,
        mean=mean,
        moment2=moment2,
        comoment=comoment,
    )


class OnlineRefit:
    """Exact least squares of elements on their references over every snapshot so far, kept by
    recursive updates of running moments (Welford): no stored trajectories. Starts from the warm-up's
    moments in a `ModeFit`.

    It follows a subset of the elements (STDET: the FREE ones): per-element arrays hold the tracked
    elements only, in element order, and `remap` follows the subset as it changes. It also keeps each
    tracked element's ``a, b`` at the last `mark`, to measure their drift since.

    A snapshot can come in two parts: `begin_snapshot` (the references', a few numbers) and then the
    tracked elements' values, either by `finish_snapshot` or inside a fused backward that reads them
    anyway (`pending_snapshot`, then `snapshot_done`); between the two, `pending_deviation` is set.
    """

    PER_ELEMENT = ("mode", "mean", "moment2", "comoment", "marked_a", "marked_b")

    def __init__(self, fit: ModeFit) -> None:
        self.references = fit.references
        self.count = fit.count
        self.mode = fit.mode.clone()
        self.mean = fit.mean.clone()
        self.moment2 = fit.moment2.clone()
        self.comoment = fit.comoment.clone()
        self.ref_mean = fit.mean[fit.references].clone()
        self.ref_moment2 = fit.moment2[fit.references].clone()
        self.marked_a, self.marked_b = fit.a.clone(), fit.b.clone()
        # Between begin_snapshot and the tracked values' part: each reference's deviation from its
        # updated mean (a checkpoint keeps it, so a resumed run adds the same values' part).
        self.pending_deviation: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "OnlineRefit":
        """Keep the running moments on `device`, that of the values it follows: a refit is then a few
        element-wise passes there, not a copy of every FREE value to the host (on a GPU, a copy and
        a host pass of 7M elements cost mbt2018-mean ~45 ms per refit)."""
        for name in (*self.PER_ELEMENT, "ref_mean", "ref_moment2"):
            setattr(self, name, getattr(self, name).to(device))
        if self.pending_deviation is not None:
            self.pending_deviation = self.pending_deviation.to(device)
        return self

    def state_dict(self) -> dict[str, object]:
        """Host copies, so that a checkpoint loads on any machine (scratch arrays left out)."""
        return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, object]) -> "OnlineRefit":
        refit = cls.__new__(cls)
        refit.pending_deviation = None  # (a state saved before snapshots came in two parts)
        vars(refit).update(state)
        return refit

    def update(self, snapshot: torch.Tensor, tracked: torch.Tensor | None = None) -> None:
        """Add one snapshot: `snapshot` holds every element's value (references included) and
        `tracked` (bool, same size) marks the tracked ones; None means all elements are tracked."""
        snapshot = snapshot.detach().float().cpu().reshape(-1)
        self.update_tracked(snapshot if tracked is None else snapshot[tracked], snapshot[self.references])

    def update_tracked(self, tracked_values: torch.Tensor, reference_values: torch.Tensor) -> None:
        """`update` from the tracked elements' values (in element order) and the references' values
        alone: STDET's FREE values and ``refs``, with no full snapshot of the weights. One fused pass
        over the per-element moments (`stdet_kernels.refit_update_`; on mbt2018-mean's 7M elements,
        2 CPU threads, about 3x faster than the same arithmetic as separate torch operations)."""
        values = self._tracked(tracked_values)  # (checked before the snapshot begins)
        self.begin_snapshot(reference_values)
        self.finish_snapshot(values)

    def _tracked(self, tracked_values: torch.Tensor) -> torch.Tensor:
        """The tracked values, flat, on the moments' device, in a dtype the kernel takes."""
        w = tracked_values.detach().reshape(-1).to(self.mean.device)
        if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            w = w.float()
        if w.shape != self.mean.shape:
            raise ValueError(f"snapshot: expected {self.mean.numel()} tracked elements, got {w.numel()}")
        return w

    def begin_snapshot(self, reference_values: torch.Tensor) -> None:
        """A snapshot's first part: the count and the references' moments (a few numbers); the
        tracked elements' part follows by `finish_snapshot` or by a fused backward."""
        if self.pending_deviation is not None:
            raise RuntimeError("refit: the previous snapshot's tracked values were never added")
        device = self.mean.device
        self.count += 1
        deviation = torch.zeros(0, device=device)
        if self.references.numel():
            r = reference_values.detach().float().reshape(-1).to(device)
            delta_r = r - self.ref_mean
            self.ref_mean += delta_r / self.count
            deviation = r - self.ref_mean  # each reference's new deviation, for the co-moments
            self.ref_moment2 += delta_r * deviation
        self.pending_deviation = deviation

    def pending_snapshot(self) -> stdet_kernels.RefitSnapshot:
        """The begun snapshot's tracked part for a fused backward (`stdet_kernels.RefitSnapshot`); call
        `snapshot_done` once it reports done."""
        if self.pending_deviation is None:
            raise RuntimeError("refit: no snapshot begun")
        return stdet_kernels.RefitSnapshot(
            self.mean, self.moment2, self.comoment, self.mode, self.pending_deviation, self.count
        )

    def snapshot_done(self) -> None:
        """A fused backward added the begun snapshot's tracked values."""
        self.pending_deviation = None

    def finish_snapshot(self, tracked_values: torch.Tensor) -> None:
        """The begun snapshot's tracked elements' values (in element order), one fused pass."""
        if self.pending_deviation is None:
            raise RuntimeError("refit: no snapshot begun")
        w = self._tracked(tracked_values)
        moments = (self.mean, self.moment2, self.comoment)
        stdet_kernels.refit_update_(w, *moments, self.mode, self.pending_deviation, self.count)
        self.pending_deviation = None

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a, b, R^2) of every tracked element on its reference, over every snapshot so far."""
        if self.references.numel() == 0:
            zeros = torch.zeros_like(self.mean)
            return zeros, self.mean.clone(), zeros
        mode = self.mode.long()
        ref_var = self.ref_moment2[mode]
        a = torch.where(ref_var > 0, self.comoment / torch.where(ref_var > 0, ref_var, 1.0), 0.0)
        b = self.mean - a * self.ref_mean[mode]
        denominator = self.moment2 * ref_var
        r2 = torch.where(
            denominator > 0, self.comoment.square() / torch.where(denominator > 0, denominator, 1.0), 0.0
        ).clamp(0.0, 1.0)
        return a, b, r2

    def mark(self) -> None:
        """Remember the current ``a, b`` as the reference point of `drift`."""
        self.marked_a, self.marked_b, _ = self.coefficients()

    def drift(self) -> torch.Tensor:
        """Relative change of each tracked element's ``a, b`` since the last `mark`."""
        a, b, _ = self.coefficients()
        change = (a - self.marked_a).abs() + (b - self.marked_b).abs()
        return change / (self.marked_a.abs() + self.marked_b.abs() + 1e-12)

    def entries(self, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-element arrays at `positions` (in tracked order), e.g. to restore them later; on
        the host (they go into checkpoints)."""
        return {name: getattr(self, name)[positions].cpu() for name in self.PER_ELEMENT}

    def remap(
        self,
        old_tracked: torch.Tensor,
        new_tracked: torch.Tensor,
        restore: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """Follow the tracked set from mask `old_tracked` to `new_tracked` (bool over all elements).
        Newly tracked elements get zeros, or the `entries` in `restore` = (their element indices,
        entries)."""
        device = self.mean.device
        old_tracked, new_tracked = old_tracked.to(device), new_tracked.to(device)
        for name in self.PER_ELEMENT:
            array = getattr(self, name)
            dense = torch.zeros(old_tracked.numel(), dtype=array.dtype, device=device)
            dense[old_tracked] = array
            if restore is not None:
                dense[restore[0].to(device)] = restore[1][name].to(device)
            setattr(self, name, dense[new_tracked])
