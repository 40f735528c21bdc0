"""Recording parameter trajectories during warm-up (METHOD.md, "CMD mode discovery", step 1).

All recorded tensors are laid end to end in one flat element axis, so a snapshot is one row of a
``(snapshots, elements)`` matrix and everything downstream (correlations, least squares) is a matrix
product over that axis. Memory is fixed up front: snapshots x elements x the storage dtype's size,
on the storage device (float16 and the CPU halve it and keep it off the accelerator).
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorSlice:
    """Where one recorded tensor lies on the flat element axis."""

    name: str
    start: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def stop(self) -> int:
        return self.start + self.numel


def layout(tensors: Mapping[str, torch.Tensor]) -> list[TensorSlice]:
    """The flat layout of `tensors`, in their order."""
    slices, start = [], 0
    for name, tensor in tensors.items():
        slices.append(TensorSlice(name, start, tuple(tensor.shape)))
        start += tensor.numel()
    return slices


class TrajectoryRecorder:
    """Keeps up to `snapshots` copies of a fixed set of tensors, one row per `record()`.

    Args:
        tensors: name -> tensor to record (parameters, usually); the same objects are read at every
            `record()`, so pass the live parameters.
        snapshots: rows to keep (F in METHOD.md). Recording more than that is an error.
        dtype: storage dtype: float32 (default) or float16/bfloat16 to halve the memory.
        device: storage device; "cpu" offloads GPU parameters.
        rolling: once full, a `record()` replaces the oldest row (the last `snapshots` are kept).
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        snapshots: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        rolling: bool = False,
    ) -> None:
        if not tensors:
            raise ValueError("tensors: expected at least one tensor to record, got none")
        if not isinstance(snapshots, int) or snapshots < 2:
            raise ValueError(
                f"snapshots: expected an integer >= 2 (a correlation needs two), got {snapshots!r}"
            )
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"dtype: expected a floating-point storage dtype, got {dtype}")
        self.tensors = dict(tensors)
        self.slices = layout(self.tensors)
        self.elements = self.slices[-1].stop
        self.buffer = torch.empty((snapshots, self.elements), dtype=dtype, device=device)
        self.count = 0
        self.rolling = rolling

    @property
    def capacity(self) -> int:
        return self.buffer.shape[0]

    @property
    def full(self) -> bool:
        return self.count >= self.capacity

    def record(self) -> None:
        """Copy the tensors' current values into the next row."""
        if self.count >= self.capacity and not self.rolling:
            raise RuntimeError(f"TrajectoryRecorder: all {self.capacity} snapshots are recorded already")
        row = self.buffer[self.count % self.capacity]
        for piece in self.slices:
            row[piece.start : piece.stop].copy_(self.tensors[piece.name].detach().reshape(-1))
        self.count += 1

    def trajectories(self) -> torch.Tensor:
        """The recorded rows, ``(min(count, snapshots), elements)``, oldest first."""
        if self.count <= self.capacity:
            return self.buffer[: self.count]
        return self.buffer.roll(-(self.count % self.capacity), dims=0)

    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()
