"""Acceleration in mode space (METHOD.md, "Beyond the paper"): the references' recent trajectory.

After STDET's warm-up most of the model moves through the M reference scalars ``refs`` (every truly
embedded element is ``a * refs[mode] + b``). As in training in a low-dimensional trajectory subspace
(P-BFGS / DLDR), a line fitted to each reference's values over the last steps is a cheap model of
where training is heading; `STDET` moves the references along it and keeps the move only if a fixed
probe batch's loss drops. This module holds the trajectory and the fit; the move, the probe and the
decision are `STDET._accelerate`'s.
"""

import torch
from torch import Tensor


class RefTrajectory:
    """The references' values after each step since the last acceleration: one row of M floats a
    step, written on the references' device (no host sync), at most `capacity` rows."""

    def __init__(self, capacity: int, refs: Tensor) -> None:
        self.buffer = torch.zeros(capacity, refs.numel(), dtype=refs.dtype, device=refs.device)
        self.count = 0

    def record(self, refs: Tensor) -> None:
        if self.count >= self.buffer.shape[0]:
            raise RuntimeError(f"trajectory: full ({self.count} steps recorded); call clear() first")
        self.buffer[self.count].copy_(refs.detach().reshape(-1))
        self.count += 1

    def clear(self) -> None:
        self.count = 0

    def slope(self) -> Tensor:
        """Per reference, the least-squares slope of its value against the step (per step), in float64
        (the moves are small against the values); zeros with fewer than two steps recorded."""
        values = self.buffer[: self.count].double()
        if self.count < 2:
            return torch.zeros(self.buffer.shape[1], dtype=torch.float64, device=self.buffer.device)
        steps = torch.arange(self.count, dtype=torch.float64, device=values.device)
        centred = steps - steps.mean()
        return centred @ (values - values.mean(dim=0)) / centred.square().sum()

    def state_dict(self) -> dict:
        """The recorded rows (host copies, so a checkpoint loads anywhere)."""
        return {"values": self.buffer[: self.count].cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        values = state["values"]
        if values.dim() != 2 or values.shape[1] != self.buffer.shape[1] or len(values) > len(self.buffer):
            raise ValueError(
                f"state: the references' trajectory has shape {tuple(values.shape)}, expected at most "
                f"({self.buffer.shape[0]}, {self.buffer.shape[1]})"
            )
        self.count = len(values)
        self.buffer[: self.count].copy_(values.to(self.buffer))
