"""Decisions: which FREE elements an embedding round takes and how, and whether a round did harm
(METHOD.md, "STDET embedding schedule"). Pure functions of the numbers `STDET` hands in, so that
another policy can be tried without touching the storage (`stdet.layout`) or the orchestration
(`stdet.schedule`).
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from stdet_kernels import DUMMY

from .config import STDETConfig


@dataclass
class Round:
    """One round's choice: flat `indices`, their new `codes` (a mode, or DUMMY), `a` and `b`, and
    `positions` (the chosen elements' places in FREE order)."""

    indices: Tensor
    codes: Tensor
    a: Tensor
    b: Tensor
    positions: Tensor

    @property
    def true_count(self) -> int:
        return int((self.codes != DUMMY).sum())

    @property
    def dummy_count(self) -> int:
        return int((self.codes == DUMMY).sum())


class EmbeddingPolicy:
    """METHOD.md's policy with the `STDETConfig` knobs: the least sensitive free elements, the most
    sensitive `protect` fraction never; truly embedded (``a * ref + b``) where the fit is good and
    stable, frozen (DUMMY) otherwise; `continuity` keeps each element's value."""

    def __init__(self, config: STDETConfig) -> None:
        self.config = config

    def count(self, free: int, elements: int, rate: float) -> int:
        """Elements the next round embeds: `rate` of the `free` ones, within `max_embedded`."""
        room = math.floor(self.config.max_embedded * elements) - (elements - free)
        return max(0, min(room, math.ceil(rate * free)))

    def choose(
        self,
        free: Tensor,
        count: int,
        sensitivity: Tensor,
        fits: tuple[Tensor, Tensor, Tensor, Tensor],
        weights: Tensor,
        refs: Tensor,
        mode: Tensor,
    ) -> Round:
        """`free`: flat indices of the FREE elements; `sensitivity` and `fits` = (a, b, R^2, drift) in
        the same (FREE) order; `weights`: every element's current value; `mode`: every element's mode."""
        config = self.config
        unprotected = free.numel() - math.floor(config.protect * free.numel())
        positions = sensitivity.argsort(stable=True)[: min(count, unprotected)]
        chosen = free[positions]
        a, b, r2, drift = (fit[positions] for fit in fits)
        good = (r2 >= config.min_r2) & (drift <= config.max_drift)
        chosen_mode = mode[chosen]
        chosen_a = torch.where(good, a, 0.0)
        # Continuity: b such that the element keeps its current value; else the fitted line's b.
        fitted_b = weights[chosen] - chosen_a * refs[chosen_mode.long()] if config.continuity else b
        chosen_b = torch.where(good, fitted_b, weights[chosen])
        codes = torch.where(good, chosen_mode, torch.tensor(DUMMY, dtype=torch.uint8))
        return Round(chosen, codes, chosen_a, chosen_b, positions)

    def trend(self, points: list[tuple[int, float]], window: int) -> str:
        """How the loss moves over the last `window` steps, from `points` = [(step, loss), ...]: the
        relative change of a least-squares line through them over the window, c, and its standard
        error, se. "flat" when ``|c| + plateau_sigmas * se <= plateau_tolerance``; "falling" or
        "rising" when c is beyond the tolerance by that margin; "unsure" otherwise, or with fewer
        than 5 points spanning half the window."""
        last = points[-1][0] if points else 0
        kept = [(step, loss) for step, loss in points if step > last - window]
        if len(kept) < 5 or kept[-1][0] - kept[0][0] < window / 2:
            return "unsure"
        steps = torch.tensor([s for s, _ in kept], dtype=torch.float64)
        losses = torch.tensor([v for _, v in kept], dtype=torch.float64)
        centred = steps - steps.mean()
        slope = float((centred * (losses - losses.mean())).sum() / (centred**2).sum())
        residuals = losses - losses.mean() - slope * centred
        slope_se = math.sqrt(float((residuals**2).sum()) / (len(kept) - 2) / float((centred**2).sum()))
        scale = abs(float(losses.mean())) or 1.0
        change, se = slope * window / scale, slope_se * window / scale
        tolerance, margin = self.config.plateau_tolerance, self.config.plateau_sigmas * se
        if abs(change) + margin <= tolerance:
            return "flat"
        if change - margin > tolerance:
            return "rising"
        if change + margin < -tolerance:
            return "falling"
        return "unsure"

    def keeps(self, before: float, before_se: float, after: float, after_se: float) -> bool:
        """Whether a round whose smoothed loss went from `before` to `after` did no harm: a rise of at
        most `safety_tolerance`, or one that does not stand out of the batch noise (`safety_sigmas`
        standard errors of the difference of the two window means)."""
        tolerance = self.config.safety_tolerance
        limit = before * (1 + tolerance) if before >= 0 else before * (1 - tolerance)
        noise = math.hypot(before_se, after_se)
        return after <= limit or after - before <= self.config.safety_sigmas * noise
