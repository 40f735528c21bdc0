"""`STDET`: the object a training loop adds to run the method (METHOD.md, "STDET embedding schedule").

    st = stdet.STDET(model, optimizer, stdet.STDETConfig(...))
    for batch in data:
        ...; loss.backward(); optimizer.step()
        st.step(loss)          # the loss is optional; without it embedding rounds are not judged

It records trajectories during the warm-up, fits the modes at its end, attaches the parametrization
(all FREE, references embedded in their modes), then every `embed_every` steps embeds a fraction of the
still-free elements: the least sensitive ones, truly (``a * ref + b``) where their fit is good and
stable, frozen (DUMMY) otherwise. A round that raises the smoothed loss by more than the tolerance is
undone and the rate halved. Embedded elements get no update: their optimizer moments are zeroed, and
their gradient is zero from then on.

This first version keeps the dense layout (full-size value, a, b next to each weight); the compact
layout that shrinks training state comes later.
"""

import logging
import math

import torch
from torch import nn

from stdet_kernels import DUMMY, FREE

from .config import STDETConfig
from .modes import ModeFit, OnlineRefit, fit_modes
from .parametrize import Embedded, attach, embeddable_parameters, parametrized_tensors
from .trajectory import TrajectoryRecorder, layout

log = logging.getLogger("stdet")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, param_name = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), param_name


class STDET:
    """Runs STDET on `model`, whose parameters `optimizer` updates. See the module docstring."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, config: STDETConfig | None = None
    ) -> None:
        self.config = config or STDETConfig()
        if not isinstance(self.config, STDETConfig):
            raise TypeError(f"config: expected a stdet.STDETConfig, got {type(self.config).__name__}")
        self.model = model
        self.optimizer = optimizer
        if parametrized_tensors(model):
            raise RuntimeError("model: already has STDET parametrizations (one STDET per model)")
        self.names = embeddable_parameters(
            model, self.config.include_gdn, self.config.include, self.config.exclude
        )
        if not self.names:
            raise ValueError(
                "model: no embeddable parameters (no convolution or linear layer outside entropy models)"
            )
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for name in self.names:
            if id(model.get_parameter(name)) not in held:
                raise ValueError(f"optimizer: does not hold the model's parameter {name!r}")
        tensors = {name: model.get_parameter(name) for name in self.names}
        self.slices = layout(tensors)
        self.elements = self.slices[-1].stop
        self.recorder: TrajectoryRecorder | None = TrajectoryRecorder(
            tensors, self.config.snapshots, dtype=_DTYPES[self.config.snapshot_dtype]
        )
        warmup, snapshots = self.config.warmup_steps, self.config.snapshots
        self.record_steps = sorted({round(warmup * (j + 1) / snapshots) for j in range(snapshots)})
        self.snapshot_interval = max(1, warmup // snapshots)
        self.step_count = 0
        self.phase = "warmup"
        self.rate = self.config.embed_rate
        self.history: list[dict] = []
        self.losses: list[tuple[int, float]] = []
        self.pending: dict | None = None
        self.last_round = 0
        self.fit: ModeFit | None = None
        self.refit: OnlineRefit | None = None
        self.refs: nn.Parameter | None = None
        self.last_a = self.last_b = None
        self.sensitivity: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------
    # Views of the attached model

    def _embedded(self) -> dict[str, Embedded]:
        return parametrized_tensors(self.model)

    def _value(self, name: str) -> nn.Parameter:
        module, param_name = _owner(self.model, name)
        return module.parametrizations[param_name].original

    def _flat(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[piece.name].detach().reshape(-1).float().cpu() for piece in self.slices])

    def _flat_codes(self) -> torch.Tensor:
        return self._flat({n: e.code for n, e in self._embedded().items()}).to(torch.uint8)

    def flat_weights(self) -> torch.Tensor:
        """Every embeddable element's current weight, flat, in the layout's order."""
        if self.phase == "warmup":
            return self._flat({name: self.model.get_parameter(name) for name in self.names})
        with torch.no_grad():
            return self._flat({name: getattr(*_owner(self.model, name)) for name in self.names})

    def _pieces(self, indices: torch.Tensor):
        """(tensor name, local indices, positions in `indices`) for each tensor that `indices` touch."""
        for piece in self.slices:
            inside = ((indices >= piece.start) & (indices < piece.stop)).nonzero().flatten()
            if inside.numel():
                yield piece.name, indices[inside] - piece.start, inside

    # ------------------------------------------------------------------------------------------
    # The training-loop hook

    def step(self, loss: float | torch.Tensor | None = None) -> None:
        """Call once after each ``optimizer.step()``; pass the step's training loss to judge rounds."""
        self.step_count += 1
        if loss is not None:
            value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
            if not math.isfinite(value):
                raise ValueError(f"loss: expected a finite number, got {value}")
            self.losses.append((self.step_count, value))
            del self.losses[: -4 * self.config.safety_window]
        if self.phase == "warmup":
            if self.step_count in self.record_steps and self.recorder is not None:
                self.recorder.record()
            if self.step_count >= self.config.warmup_steps:
                self._start_embedding()
            return
        self._update_sensitivity()
        if self.refit is not None and self.step_count % self.snapshot_interval == 0:
            self.refit.update(self.flat_weights())
        if self.pending is not None and self.step_count >= self.pending["step"] + self.config.safety_window:
            self._judge()
        due = self.step_count - self.last_round >= self.config.embed_every
        if self.pending is None and due and self.embedded_fraction() < self.config.max_embedded:
            self._round()

    def trainable_fraction(self) -> float:
        """Trainable scalars (free elements plus one reference per mode) over embeddable elements."""
        if self.phase == "warmup":
            return 1.0
        free = int((self._flat_codes() == FREE).sum())
        return (free + self.refs.numel()) / self.elements

    def embedded_fraction(self) -> float:
        """Elements that are not FREE (references included) over embeddable elements."""
        if self.phase == "warmup":
            return 0.0
        return 1.0 - int((self._flat_codes() == FREE).sum()) / self.elements

    # ------------------------------------------------------------------------------------------
    # Phases

    def _attach(self, num_modes: int) -> None:
        config = self.config
        self.refs = attach(self.model, num_modes, config.include_gdn, config.include, config.exclude)
        if list(self._embedded()) != self.names:
            raise RuntimeError("attach: parametrized a different set of tensors than was recorded")
        self.optimizer.add_param_group({"params": [self.refs]})
        self.sensitivity = {name: torch.zeros_like(self._value(name)) for name in self.names}
        self.phase = "embedding"

    def _start_embedding(self) -> None:
        generator = torch.Generator().manual_seed(self.config.seed)
        self.fit = fit_modes(
            self.recorder.trajectories(), self.slices, self.config.samples, self.config.modes, generator
        )
        self.recorder = None  # the trajectories are not needed any more
        weights = self.flat_weights()
        self._attach(self.fit.num_modes)
        with torch.no_grad():
            self.refs.copy_(weights[self.fit.references].to(self.refs.dtype))
            modes = torch.arange(self.fit.num_modes, dtype=torch.uint8)
            self._embed(
                self.fit.references, modes, torch.ones(self.fit.num_modes), torch.zeros(self.fit.num_modes)
            )
        self.refit = OnlineRefit(self.fit) if self.config.refit else None
        self.last_a, self.last_b = self.fit.a.clone(), self.fit.b.clone()
        self.last_round = self.step_count
        log.info("stdet: step %d: %d modes fitted, model attached", self.step_count, self.fit.num_modes)
        self.history.append({"step": self.step_count, "event": "attach", "modes": self.fit.num_modes})

    def _update_sensitivity(self) -> None:
        decay = self.config.sensitivity_decay
        for name in self.names:
            value = self._value(name)
            if value.grad is None:
                continue
            grad = value.grad.detach()
            score = grad.square() if self.config.sensitivity == "fisher" else (grad * value.detach()).abs_()
            self.sensitivity[name].mul_(decay).add_(score, alpha=1.0 - decay)

    def _embed(self, indices: torch.Tensor, modes: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """Give flat elements `indices` codes `modes` (a mode, or DUMMY) and coefficients; they leave
        the optimizer (moments zeroed)."""
        embedded = self._embedded()
        for name, local, where in self._pieces(indices):
            target = embedded[name]
            target.code.view(-1)[local] = modes[where].to(target.code.device)
            target.a.view(-1)[local] = a[where].to(target.a)
            target.b.view(-1)[local] = b[where].to(target.b)
            self._clear_optimizer_state(self._value(name), local)

    def _clear_optimizer_state(self, param: nn.Parameter, local: torch.Tensor) -> None:
        for state in self.optimizer.state.get(param, {}).values():
            if isinstance(state, torch.Tensor) and state.shape == param.shape:
                state.view(-1)[local.to(state.device)] = 0

    def _round(self) -> None:
        config = self.config
        codes = self._flat_codes()
        free = (codes == FREE).nonzero().flatten()
        room = math.floor(config.max_embedded * self.elements) - (self.elements - free.numel())
        count = min(room, math.ceil(self.rate * free.numel()))
        self.last_round = self.step_count
        if count <= 0 or free.numel() == 0:
            return
        sensitivity = self._flat(self.sensitivity)[free]
        unprotected = free.numel() - math.floor(config.protect * free.numel())
        chosen = free[sensitivity.argsort(stable=True)[: min(count, unprotected)]]
        if self.refit is not None:
            a, b, r2 = self.refit.coefficients()
        else:
            a, b, r2 = self.fit.a, self.fit.b, self.fit.r2
        drift = ((a - self.last_a).abs() + (b - self.last_b).abs()) / (
            self.last_a.abs() + self.last_b.abs() + 1e-12
        )
        good = (r2[chosen] >= config.min_r2) & (drift[chosen] <= config.max_drift)
        weights = self.flat_weights()
        mode = self.fit.mode[chosen]
        chosen_a = torch.where(good, a[chosen], 0.0)
        refs = self.refs.detach().float().cpu()
        # Continuity: b such that the element keeps its current value; else the fitted line's b.
        fitted_b = weights[chosen] - chosen_a * refs[mode.long()] if config.continuity else b[chosen]
        chosen_b = torch.where(good, fitted_b, weights[chosen])
        codes_new = torch.where(good, mode, torch.tensor(DUMMY, dtype=torch.uint8))
        with torch.no_grad():
            self._embed(chosen, codes_new, chosen_a, chosen_b)
        self.last_a, self.last_b = a.clone(), b.clone()
        before = self._mean_loss(self.step_count - config.safety_window, self.step_count)
        self.pending = {"step": self.step_count, "before": before, "indices": chosen}
        decision = {
            "step": self.step_count,
            "event": "round",
            "true": int(good.sum()),
            "dummy": int((~good).sum()),
            "rate": self.rate,
            "embedded_fraction": self.embedded_fraction(),
        }
        self.history.append(decision)
        log.info("stdet: %s", decision)

    def _mean_loss(self, after: int, until: int) -> float | None:
        window = [loss for step, loss in self.losses if after < step <= until]
        return sum(window) / len(window) if len(window) == self.config.safety_window else None

    def _judge(self) -> None:
        pending, self.pending = self.pending, None
        after = self._mean_loss(pending["step"], pending["step"] + self.config.safety_window)
        before = pending["before"]
        if before is None or after is None:
            self.history.append({"step": self.step_count, "event": "kept", "reason": "no loss to judge by"})
            return
        limit = (
            before * (1 + self.config.safety_tolerance)
            if before >= 0
            else before * (1 - self.config.safety_tolerance)
        )
        if after <= limit:
            self.history.append({"step": self.step_count, "event": "kept", "before": before, "after": after})
            return
        # Undo: the round's elements return to FREE with their current values.
        indices = pending["indices"]
        weights = self.flat_weights()
        embedded = self._embedded()
        with torch.no_grad():
            for name, local, where in self._pieces(indices):
                target = embedded[name]
                self._value(name).view(-1)[local] = weights[indices[where]].to(target.a)
                target.code.view(-1)[local] = FREE
                target.a.view(-1)[local] = 0
                target.b.view(-1)[local] = 0
        self.rate /= 2
        decision = {
            "step": self.step_count,
            "event": "undone",
            "before": before,
            "after": after,
            "rate": self.rate,
        }
        self.history.append(decision)
        log.warning("stdet: embedding round undone: %s", decision)

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict:
        """Everything needed to continue exactly; the model's and optimizer's own state dicts hold the
        weights, codes, coefficients and moments."""
        return {
            "config": self.config.to_dict(),
            "names": list(self.names),
            "shapes": [piece.shape for piece in self.slices],
            "step": self.step_count,
            "phase": self.phase,
            "rate": self.rate,
            "history": list(self.history),
            "losses": list(self.losses),
            "pending": self.pending,
            "last_round": self.last_round,
            "recorder": None
            if self.recorder is None
            else {"buffer": self.recorder.buffer.clone(), "count": self.recorder.count},
            "fit": None if self.fit is None else dict(vars(self.fit)),
            "refit": None if self.refit is None else self.refit.state_dict(),
            "last_a": self.last_a,
            "last_b": self.last_b,
            "sensitivity": {name: s.clone() for name, s in self.sensitivity.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict`. Call on a new STDET, before loading the model's and the optimizer's
        state dicts: past the warm-up it attaches the model so those state dicts fit."""
        if self.step_count != 0 or self.phase != "warmup":
            raise RuntimeError("load_state_dict: call it on a new STDET, before any step")
        shapes = [piece.shape for piece in self.slices]
        if state.get("names") != self.names or [tuple(s) for s in state.get("shapes", [])] != shapes:
            raise ValueError("state: was saved for a different model (its embeddable tensors differ)")
        self.step_count, self.rate = state["step"], state["rate"]
        self.history, self.losses = list(state["history"]), [tuple(x) for x in state["losses"]]
        self.pending, self.last_round = state["pending"], state["last_round"]
        if state["recorder"] is not None:
            self.recorder.buffer.copy_(state["recorder"]["buffer"])
            self.recorder.count = state["recorder"]["count"]
        if state["phase"] == "warmup":
            return
        self.recorder = None
        self.fit = ModeFit(**state["fit"])
        self._attach(self.fit.num_modes)
        if state["refit"] is not None:
            self.refit = OnlineRefit.from_state_dict(state["refit"])
        self.last_a, self.last_b = state["last_a"], state["last_b"]
        for name, saved in state["sensitivity"].items():
            self.sensitivity[name].copy_(saved)
