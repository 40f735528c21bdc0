"""SMA: sampling-then-moving-average of the weights (METHOD.md, "SMA").

    sma = stdet.SMA(model, every=10, alpha=0.1)
    ...; optimizer.step(); sma.step()
    with sma.swap():          # the model holds the averaged weights inside the block
        evaluate(model)

Every `every` steps (after `start_step`) a sample of the full weights is averaged:
``avg += alpha * (sample - avg)``; the first sample initialises the average; ``alpha="uniform"``
uses 1/n for the n-th sample (a plain mean of the samples). STDET's parametrized tensors are sampled
by the flat layout's reconstruction itself at the next forward (`reconstruct_compact_sma_`: one op,
one pass over memory, into one flat average whose views are the tensors' averages); other
floating-point parameters and buffers through the multi-tensor `lerp_`; integer buffers (CompressAI's
CDF tables) are never averaged. Averages are dense, one per weight, so an element that becomes
embedded keeps its average. In "feedback" mode the live weights are set to the average after each
sample (free values and references of the layout; no optimizer state is touched).
"""

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import nn

from stdet_kernels import FREE

from .layout import FlatLayout
from .parametrize import flat_layout, is_layout_key, owner

T = TypeVar("T")


def paired_difference(live: torch.Tensor, average: torch.Tensor) -> tuple[float, float]:
    """(mean, standard error) of the per-crop loss differences, average minus live, in float64; the
    standard error is 0 for one crop (no spread to measure)."""
    for name, value in (("live", live), ("average", average)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor of per-crop losses, got {type(value).__name__}")
    if live.dim() != 1 or live.numel() == 0 or live.shape != average.shape:
        raise ValueError(
            f"live, average: expected two 1-D tensors of the same crops' losses, got shapes "
            f"{tuple(live.shape)} and {tuple(average.shape)}"
        )
    difference = average.double() - live.double()
    se = float(difference.std()) / math.sqrt(difference.numel()) if difference.numel() > 1 else 0.0
    return float(difference.mean()), se


def average_is_better(live: torch.Tensor, average: torch.Tensor, sigmas: float) -> bool:
    """The SMA guard's rule: hand out the average only where its per-crop losses on the same probe
    crops are lower than the live weights' by more than `sigmas` standard errors of the paired
    differences (``sigmas=0``: wherever their mean is not higher). Paired, because both weights see
    the same crops: the crops' own spread cancels and the test is of the weights alone. With
    ``sigmas > 0`` one crop proves nothing (no spread to measure): the live weights stay. Non-finite
    losses: the finite side is handed out; both non-finite, the live weights."""
    number = not isinstance(sigmas, bool) and isinstance(sigmas, (int, float))
    if not (number and math.isfinite(sigmas) and sigmas >= 0):
        raise ValueError(f"sigmas: expected a finite number >= 0, got {sigmas!r}")
    mean, se = paired_difference(live, average)
    live_finite, average_finite = bool(live.isfinite().all()), bool(average.isfinite().all())
    if not (live_finite and average_finite):
        return average_finite
    if sigmas == 0:
        return mean <= 0
    return live.numel() > 1 and mean < -sigmas * se


class SMA:
    """Averages of `model`'s weights, sampled every `every` steps. See the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        every: int = 10,
        alpha: float | str = 0.1,
        mode: str = "shadow",
        start_step: int = 0,
        references: torch.Tensor | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected an integer >= 1, got {every!r}")
        if alpha != "uniform":
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
                raise TypeError(f"alpha: expected a number in (0, 1] or 'uniform', got {alpha!r}")
            if not (math.isfinite(alpha) and 0 < alpha <= 1):
                raise ValueError(f"alpha: expected a number in (0, 1] or 'uniform', got {alpha!r}")
        if mode not in ("shadow", "feedback"):
            raise ValueError(f"mode: expected 'shadow' or 'feedback', got {mode!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step: expected an integer >= 0, got {start_step!r}")
        self.model, self.every, self.alpha, self.mode, self.start_step = model, every, alpha, mode, start_step
        # For feedback on STDET's layout: the flat index of each mode's reference element, whose
        # average becomes refs[mode] (STDET provides it).
        self.references = references
        self.step_count = 0
        self.samples = 0
        self.averages: dict[str, torch.Tensor] = {}
        self._flat: torch.Tensor | None = None  # the layout's flat average (its views are in averages)

    # ------------------------------------------------------------------------------------------

    def _plain_tensors(self) -> dict[str, torch.Tensor]:
        """Floating-point parameters and buffers that are not STDET's parametrization internals."""
        named = list(self.model.named_parameters()) + list(self.model.named_buffers())
        return {
            name: tensor
            for name, tensor in named
            if ".parametrizations." not in name
            and not name.startswith("parametrizations.")
            and not is_layout_key(name)
            and tensor.is_floating_point()
        }

    def _layout(self) -> FlatLayout | None:
        layout = flat_layout(self.model)
        return layout if layout is not None and layout.attached else None

    def _flat_average(self, layout: FlatLayout) -> tuple[torch.Tensor, bool]:
        """The layout's flat average, its views put in `averages` under the tensors' names; True if it
        is new (nothing sampled yet: the next sample initialises it). Averages the tensors got before
        STDET attached (or from a saved state) are laid end to end."""
        if self._flat is None:
            first = not all(name in self.averages for name in layout.names)
            if first:
                values = layout.free_values
                self._flat = torch.zeros(layout.numel, dtype=values.dtype, device=values.device)
            else:
                self._flat = torch.cat([self.averages[name].reshape(-1) for name in layout.names])
            self.averages.update(layout.split(self._flat))
            return self._flat, first
        return self._flat, False

    def _alpha(self) -> float:
        if self.samples == 1:
            return 1.0
        return 1.0 / self.samples if self.alpha == "uniform" else float(self.alpha)

    def step(self) -> None:
        """Call after each optimizer step; samples on every `every`-th step after `start_step`."""
        self.step_count += 1
        since = self.step_count - self.start_step
        if since <= 0 or since % self.every != 0:
            return
        self.flush()  # a sample still waiting for a forward is taken now: none is lost
        self.samples += 1
        alpha = self._alpha()
        plain = self._plain_tensors()
        averages, samples = [], []
        for name, tensor in plain.items():
            if name not in self.averages:  # first seen: the sample initialises its average
                self.averages[name] = tensor.detach().clone()
            else:
                averages.append(self.averages[name])
                samples.append(tensor.detach())
        if averages:
            # Averages are clones of their tensors (same shape, dtype, device), so the public
            # function's per-pair checks are skipped: they cost more than the update itself.
            torch.ops.stdet.lerp_(averages, samples, alpha)
        layout = self._layout()
        if layout is not None:
            flat, first = self._flat_average(layout)
            layout.pending_sample = (flat, 1.0 if first else alpha)  # alpha is 1 after a restart
        if self.mode == "feedback":
            self.flush()
            self._write_back()

    def restart(self) -> None:
        """Start the averages afresh: the next sample initialises them (a new horizon, e.g. at an
        anneal's start; METHOD.md's SMA from a later start step)."""
        self.flush()
        self.samples = 0

    def flush(self) -> None:
        """Take a sample still waiting for a forward now (one fused reconstruction)."""
        layout = self._layout()
        if layout is not None:
            layout.flush()

    @torch.no_grad()
    def _write_back(self) -> None:
        for name, tensor in self._plain_tensors().items():
            tensor.copy_(self.averages[name])
        layout = self._layout()
        if layout is not None and self._flat is not None:
            layout.free_values.copy_(self._flat[layout.code == FREE])
            if self.references is not None:
                layout.refs.copy_(self._flat[self.references.to(self._flat.device)])

    @contextlib.contextmanager
    def swap(self, update_entropy_models: bool = False) -> Iterator[nn.Module]:
        """Inside the block the model holds the averaged weights; the live ones come back on exit,
        exactly, also on an exception. Tensors never sampled keep their live values.

        With `update_entropy_models`, a CompressAI model's ``update(force=True)`` runs inside the
        block, so its CDF tables fit the averaged entropy models for compressing; every buffer it
        changes is put back on exit.
        """
        self.flush()
        plain = {name: t for name, t in self._plain_tensors().items() if name in self.averages}
        saved = {name: tensor.detach().clone() for name, tensor in plain.items()}
        layout = self._layout()
        if layout is not None and not all(name in self.averages for name in layout.names):
            layout = None  # never sampled: the live weights stay
        flat = None if layout is None else self._flat_average(layout)[0]
        buffers = {name: b.clone() for name, b in self.model.named_buffers()} if update_entropy_models else {}
        try:
            with torch.no_grad():
                for name, tensor in plain.items():
                    tensor.copy_(self.averages[name])
            if layout is not None:
                layout.override = flat
            if update_entropy_models:
                if not hasattr(self.model, "update"):
                    raise TypeError(
                        "model: has no update() (not a CompressAI model), so no CDF tables to refresh"
                    )
                self.model.update(force=True)
            yield self.model
        finally:
            with torch.no_grad():
                for name, tensor in plain.items():
                    tensor.copy_(saved[name])
                for name, buffer in buffers.items():
                    module, attribute = owner(self.model, name)
                    setattr(module, attribute, buffer)  # update() may have resized it
            if layout is not None:
                layout.override = None

    def probe_both(self, probe: Callable[[], T]) -> tuple[T, T]:
        """(`probe` with the live weights, `probe` with the average): a caller's fixed-batch losses,
        deterministic, to judge whether the average is worth handing out (``sma_guard``; see
        `average_is_better`)."""
        live = probe()
        with self.swap():
            average = probe()
        return live, average

    # ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        self.flush()
        return {
            "every": self.every,
            "alpha": self.alpha,
            "mode": self.mode,
            "start_step": self.start_step,
            "step": self.step_count,
            "samples": self.samples,
            "averages": {name: t.clone() for name, t in self.averages.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("every", "alpha", "mode", "start_step"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"state: saved with {key}={state[key]!r}, this SMA has {getattr(self, key)!r}"
                )
        self.step_count, self.samples = state["step"], state["samples"]
        self.averages = {name: t.clone() for name, t in state["averages"].items()}
        self._flat = None  # laid end to end again at its next use
