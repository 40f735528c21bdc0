"""`STDET`: the object a training loop adds to run the method (METHOD.md, "STDET embedding schedule").

    st = stdet.STDET(model, optimizer, stdet.STDETConfig(...))
    for batch in data:
        ...; loss.backward(); optimizer.step()
        st.step(loss)          # the loss is optional; without it embedding rounds are not judged

It records trajectories during the warm-up, fits the modes at its end, attaches the parametrization
(all FREE, references embedded in their modes), then every `embed_every` steps embeds a fraction of the
still-free elements: the least sensitive ones, truly (``a * ref + b``) where their fit is good and
stable, frozen (DUMMY) otherwise. A round that raises the smoothed loss by more than the tolerance is
undone and the rate halved. Embedded elements leave training: they are no longer trainable values
and have no optimizer state (see below).

Storage is the compact layout (`stdet_kernels.compact`): a tensor's trainable parameter holds only
its FREE elements and shrinks at every round; the optimizer's per-element state (moments) and the
sensitivity estimate shrink with it, the entries of elements that stay free kept as they were.

Checkpoints need nothing of their own: STDET's state travels inside the model's ``state_dict()``
(as ``stdet._extra_state``, PyTorch's mechanism for non-tensor module state), and loading such a state
dict into a model with a new `STDET` on it re-attaches the parametrizations with the saved layout
before the layers load, so a training loop's usual ``torch.save({"state_dict": net.state_dict(),
"optimizer": optimizer.state_dict()})`` and its resume path (model, optimizer, STDET, then
``net.load_state_dict``, then ``optimizer.load_state_dict``) just work. The shared ``refs`` join the
optimizer's param group of the network's weights, so whatever the user's learning-rate scheduler does
to that group (created before STDET attaches or not, decayed already or not) it does to them.

Under torch.distributed (DistributedDataParallel, several ranks) the modes are fitted once, on rank 0,
and broadcast, and the loss given to `step` is averaged over the ranks; gradients being all-reduced,
the sensitivities and so every round's choices are the same on every rank.
"""

import logging
import math
import weakref

import torch
import torch.distributed as dist
from torch import nn

from stdet_kernels import DUMMY, FREE

from .config import STDETConfig
from .modes import OnlineRefit, fit_modes
from .parametrize import (
    STATE_KEY,
    STATE_MODULE,
    Embedded,
    attach,
    embeddable_parameters,
    free_values,
    owner,
    parametrized_tensors,
    remap_free,
)
from .sma import SMA
from .trajectory import TrajectoryRecorder, layout

log = logging.getLogger("stdet")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _mean_over_ranks(value: float) -> float:
    """Under torch.distributed, the mean of `value` over the ranks (each sees its own share of the
    batch); the rounds' safety rule then decides the same on every rank."""
    if not _distributed():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class STDETState(nn.Module):
    """Puts the `STDET` object's state into its model's ``state_dict()`` (``stdet._extra_state``).

    Added to the model as child ``stdet``; it holds no tensors of its own, and ``model.stdet.step(loss)``
    is the STDET object's `step`. Loading goes through the
    model's load pre-hook that `STDET` registers (the layers must be re-attached before they load, and
    this child loads last), so ``set_extra_state`` has nothing left to do.
    """

    def __init__(self, owner: "STDET") -> None:
        super().__init__()
        self._owner = weakref.ref(owner)  # the model's load hooks keep the STDET alive

    def step(self, loss: float | torch.Tensor | None = None) -> None:
        """`STDET.step`, reachable from the model: ``model.stdet.step(loss)`` in a training loop that
        is handed the model but not the STDET object (CompressAI's ``train_one_epoch``)."""
        self._owner().step(loss)

    def get_extra_state(self) -> dict:
        return self._owner().state_dict()

    def set_extra_state(self, state: dict) -> None:
        """Already restored by the model's load pre-hook, before its layers loaded."""


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
        if parametrized_tensors(model) or isinstance(getattr(model, STATE_MODULE, None), STDETState):
            raise RuntimeError("model: already has STDET parametrizations (one STDET per model)")
        self.names = embeddable_parameters(
            model, self.config.include_gdn, self.config.include, self.config.exclude
        )
        if not self.names:
            raise ValueError(
                "model: no embeddable parameters (no convolution or linear layer outside entropy models)"
            )
        held = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        for name in self.names:
            if id(model.get_parameter(name)) not in held:
                raise ValueError(f"optimizer: does not hold the model's parameter {name!r}")
        tensors = {name: model.get_parameter(name) for name in self.names}
        # refs join the group holding most of the embeddable elements: they follow its learning rate.
        groups = optimizer.param_groups
        elements = [0] * len(groups)
        for tensor in tensors.values():
            elements[next(i for i, g in enumerate(groups) if g is held[id(tensor)])] += tensor.numel()
        self.refs_group = elements.index(max(elements))
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
        self.references: torch.Tensor | None = None  # flat index of each mode's reference element
        self.mode: torch.Tensor | None = None  # (elements,) uint8: the mode each element follows
        self.refit: OnlineRefit | None = None  # a, b, R^2 of the FREE elements
        self.refs: nn.Parameter | None = None
        self.sensitivity: dict[str, torch.Tensor] = {}
        self.sma: SMA | None = None
        if self.config.sma_every:
            self.sma = SMA(model, self.config.sma_every, self.config.sma_alpha, self.config.sma_mode)
        model.add_module(STATE_MODULE, STDETState(self))
        model.register_load_state_dict_pre_hook(self._before_model_loads)
        model.register_load_state_dict_post_hook(_state_is_optional)

    # ------------------------------------------------------------------------------------------
    # Views of the attached model

    def _embedded(self) -> dict[str, Embedded]:
        return parametrized_tensors(self.model)

    def _value(self, name: str) -> nn.Parameter:
        return free_values(self.model, name)

    def _flat(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[piece.name].detach().reshape(-1).float().cpu() for piece in self.slices])

    def _flat_codes(self) -> torch.Tensor:
        return self._flat({n: e.code for n, e in self._embedded().items()}).to(torch.uint8)

    def flat_weights(self) -> torch.Tensor:
        """Every embeddable element's current weight, flat, in the layout's order."""
        if self.phase == "warmup":
            return self._flat({name: self.model.get_parameter(name) for name in self.names})
        with torch.no_grad():
            return self._flat({name: getattr(*owner(self.model, name)) for name in self.names})

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
        if self.sma is not None:
            self.sma.step()
        if loss is not None:
            value = _mean_over_ranks(float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss))
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
        if self.config.refit and self.step_count % self.snapshot_interval == 0:
            self.refit.update(self.flat_weights(), self._flat_codes() == FREE)
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
        before = {name: self.model.get_parameter(name).shape for name in self.names}
        self.refs = attach(
            self.model,
            num_modes,
            config.include_gdn,
            config.include,
            config.exclude,
            coefficient_dtype=_DTYPES[config.coefficient_dtype],
        )
        if list(self._embedded()) != self.names:
            raise RuntimeError("attach: parametrized a different set of tensors than was recorded")
        for name, embedded in self._embedded().items():
            # The parameter is now 1-D over its FREE elements (all but a masked convolution's
            # masked-out ones): so must its optimizer state be.
            all_free = torch.full(before[name], FREE, dtype=torch.uint8, device=embedded.code.device)
            self._remap_state(self._value(name), all_free, embedded.code)
        self.optimizer.param_groups[self.refs_group]["params"].append(self.refs)
        self.sensitivity = {name: torch.zeros_like(self._value(name)) for name in self.names}
        self.phase = "embedding"

    def _remap_state(self, param: nn.Parameter, old_code: torch.Tensor, new_code: torch.Tensor) -> None:
        """Per-element optimizer state of `param` (moments, momentum buffers) follows its FREE set
        from `old_code` to `new_code`; scalar state (Adam's step) stays."""
        state = self.optimizer.state.get(param, {})
        old_numel = int((old_code == FREE).sum())
        for key, tensor in list(state.items()):
            if isinstance(tensor, torch.Tensor) and tensor.dim() > 0 and tensor.numel() == old_numel:
                state[key] = remap_free(tensor, old_code, new_code)

    @property
    def num_modes(self) -> int:
        return 0 if self.references is None else int(self.references.numel())

    def _start_embedding(self) -> None:
        fit = None
        if not _distributed() or dist.get_rank() == 0:
            generator = torch.Generator().manual_seed(self.config.seed)
            fit = fit_modes(
                self.recorder.trajectories(), self.slices, self.config.samples, self.config.modes, generator
            )
        if _distributed():  # fitted once, on rank 0; every rank embeds the same modes
            shared = [fit]
            dist.broadcast_object_list(shared, src=0)
            fit = shared[0]
        self.recorder = None  # the trajectories are not needed any more
        self.references, self.mode = fit.references, fit.mode
        weights = self.flat_weights()
        self._attach(fit.num_modes)
        with torch.no_grad():
            self.refs.copy_(weights[fit.references].to(self.refs.dtype))
            modes = torch.arange(fit.num_modes, dtype=torch.uint8)
            self._embed(fit.references, modes, torch.ones(fit.num_modes), torch.zeros(fit.num_modes))
        # From here on only the FREE elements' fits are kept.
        self.refit = OnlineRefit(fit)
        self.refit.remap(torch.ones(self.elements, dtype=torch.bool), self._flat_codes() == FREE)
        if self.sma is not None:
            self.sma.references = self.reference_positions()
        self.last_round = self.step_count
        log.info("stdet: step %d: %d modes fitted, model attached", self.step_count, fit.num_modes)
        self.history.append({"step": self.step_count, "event": "attach", "modes": fit.num_modes})

    def reference_positions(self) -> dict[str, list[tuple[int, int]]]:
        """Tensor name -> [(flat index in the tensor, mode)] of the modes' reference elements."""
        positions: dict[str, list[tuple[int, int]]] = {}
        modes = torch.arange(self.num_modes)
        for name, local, where in self._pieces(self.references):
            positions[name] = list(zip(local.tolist(), modes[where].tolist(), strict=True))
        return positions

    def _update_sensitivity(self) -> None:
        decay = self.config.sensitivity_decay
        for name in self.names:
            value = self._value(name)
            if value.grad is None:
                continue
            grad = value.grad.detach()
            score = grad.square() if self.config.sensitivity == "fisher" else (grad * value.detach()).abs_()
            self.sensitivity[name].mul_(decay).add_(score, alpha=1.0 - decay)

    def _edit(self, name: str, local: torch.Tensor, code, value=None, a=None, b=None) -> None:
        """Set code (and value, a, b where given) of elements `local` of tensor `name`, repack its
        compact layout, and carry the optimizer state and the sensitivity of the elements that stay
        FREE over to the new layout (newly FREE elements start from zero)."""
        embedded = self._embedded()[name]
        param = self._value(name)
        old_code = embedded.code.clone()
        dense_value, dense_a, dense_b = embedded.dense(param)
        new_code = old_code.clone()
        device = new_code.device
        new_code.view(-1)[local.to(device)] = code.to(device) if isinstance(code, torch.Tensor) else code
        for dense, update in ((dense_value, value), (dense_a, a), (dense_b, b)):
            if update is not None:
                dense.view(-1)[local.to(device)] = (
                    update.to(dense) if isinstance(update, torch.Tensor) else update
                )
        embedded.repack(param, dense_value, new_code, dense_a, dense_b)
        self._remap_state(param, old_code, new_code)
        self.sensitivity[name] = remap_free(self.sensitivity[name], old_code, new_code)

    def _embed(self, indices: torch.Tensor, modes: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """Give flat elements `indices` codes `modes` (a mode, or DUMMY) and coefficients: they leave
        the trainable values and the optimizer."""
        for name, local, where in self._pieces(indices):
            self._edit(name, local, modes[where], a=a[where], b=b[where])

    def _round(self) -> None:
        config = self.config
        codes = self._flat_codes()
        free = (codes == FREE).nonzero().flatten()
        room = math.floor(config.max_embedded * self.elements) - (self.elements - free.numel())
        count = min(room, math.ceil(self.rate * free.numel()))
        self.last_round = self.step_count
        if count <= 0 or free.numel() == 0:
            return
        sensitivity = torch.cat(
            [self.sensitivity[piece.name].reshape(-1).float().cpu() for piece in self.slices]
        )
        unprotected = free.numel() - math.floor(config.protect * free.numel())
        positions = sensitivity.argsort(stable=True)[: min(count, unprotected)]  # in FREE order
        chosen = free[positions]
        a, b, r2 = self.refit.coefficients()
        good = (r2[positions] >= config.min_r2) & (self.refit.drift()[positions] <= config.max_drift)
        weights = self.flat_weights()
        mode = self.mode[chosen]
        chosen_a = torch.where(good, a[positions], 0.0)
        refs = self.refs.detach().float().cpu()
        # Continuity: b such that the element keeps its current value; else the fitted line's b.
        fitted_b = weights[chosen] - chosen_a * refs[mode.long()] if config.continuity else b[positions]
        chosen_b = torch.where(good, fitted_b, weights[chosen])
        codes_new = torch.where(good, mode, torch.tensor(DUMMY, dtype=torch.uint8))
        stash = self.refit.entries(positions)  # to restore if the round is undone
        self.refit.mark()
        with torch.no_grad():
            self._embed(chosen, codes_new, chosen_a, chosen_b)
        self.refit.remap(codes == FREE, self._flat_codes() == FREE)
        window = (self.step_count - config.safety_window, self.step_count)
        before = self._mean_loss(*window)
        self.pending = {
            "step": self.step_count,
            "before": before,
            "before_se": self._standard_error(*window),
            "indices": chosen,
            "refit": stash,
        }
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

    def _window(self, after: int, until: int) -> list[float] | None:
        window = [loss for step, loss in self.losses if after < step <= until]
        return window if len(window) == self.config.safety_window else None

    def _mean_loss(self, after: int, until: int) -> float | None:
        window = self._window(after, until)
        return None if window is None else sum(window) / len(window)

    def _standard_error(self, after: int, until: int) -> float:
        """Standard error of the window's mean loss: how much it moves by chance (batch noise)."""
        window = self._window(after, until)
        if window is None or len(window) < 2:
            return 0.0
        mean = sum(window) / len(window)
        variance = sum((loss - mean) ** 2 for loss in window) / (len(window) - 1)
        return math.sqrt(variance / len(window))

    def _judge(self) -> None:
        pending, self.pending = self.pending, None
        window = (pending["step"], pending["step"] + self.config.safety_window)
        after = self._mean_loss(*window)
        before = pending["before"]
        if before is None or after is None:
            self.history.append({"step": self.step_count, "event": "kept", "reason": "no loss to judge by"})
            return
        limit = (
            before * (1 + self.config.safety_tolerance)
            if before >= 0
            else before * (1 - self.config.safety_tolerance)
        )
        # A rise must also stand out of the batch noise: the two window means differ by chance with
        # this standard deviation.
        noise = math.hypot(pending.get("before_se", 0.0), self._standard_error(*window))
        if after <= limit or after - before <= self.config.safety_sigmas * noise:
            self.history.append({"step": self.step_count, "event": "kept", "before": before, "after": after})
            return
        # Undo: the round's elements return to FREE with their current values.
        indices = pending["indices"]
        weights = self.flat_weights()
        free_before = self._flat_codes() == FREE
        with torch.no_grad():
            for name, local, where in self._pieces(indices):
                self._edit(name, local, FREE, value=weights[indices[where]], a=0.0, b=0.0)
        self.refit.remap(free_before, self._flat_codes() == FREE, restore=(indices, pending["refit"]))
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
            "shapes": [list(piece.shape) for piece in self.slices],
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
            "references": self.references,
            "mode": self.mode,
            "refit": None if self.refit is None else self.refit.state_dict(),
            "sensitivity": {name: s.clone() for name, s in self.sensitivity.items()},
            "codes": {name: e.code.clone() for name, e in self._embedded().items()},
            "sma": None if self.sma is None else self.sma.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict`, before the model's and the optimizer's state dicts are loaded: past the
        warm-up it attaches the model (or re-lays its tensors out) so that those state dicts fit.

        Loading a model's state dict does this by itself (see `STDETState`). On a model already
        attached, the optimizer's per-element state follows the new layout (elements that become FREE
        start from zero) until the optimizer's own state dict is loaded.
        """
        shapes = [piece.shape for piece in self.slices]
        if state.get("names") != self.names or [tuple(s) for s in state.get("shapes", [])] != shapes:
            raise ValueError("state: was saved for a different model (its embeddable tensors differ)")
        if state["phase"] == "warmup" and self.phase != "warmup":
            raise RuntimeError(
                "state: saved during the warm-up, but this model is attached already; load it into a "
                "new model with a new STDET"
            )
        if self.phase != "warmup" and state["references"].numel() != self.num_modes:
            raise ValueError(
                f"state: has {state['references'].numel()} modes, this STDET {self.num_modes}; load it "
                "into a new model with a new STDET"
            )
        self.step_count, self.rate = state["step"], state["rate"]
        self.history, self.losses = list(state["history"]), [tuple(x) for x in state["losses"]]
        self.pending, self.last_round = state["pending"], state["last_round"]
        if self.sma is not None and state.get("sma") is not None:
            self.sma.load_state_dict(state["sma"])
        if state["phase"] == "warmup":
            self.recorder.buffer.copy_(state["recorder"]["buffer"])
            self.recorder.count = state["recorder"]["count"]
            return
        self.recorder = None
        self.references, self.mode = state["references"], state["mode"]
        if self.phase == "warmup":
            self._attach(self.num_modes)
        self.refit = OnlineRefit.from_state_dict(state["refit"])
        if self.sma is not None:
            self.sma.references = self.reference_positions()
        with torch.no_grad():
            for name, embedded in self._embedded().items():
                # The saved layout, so that the model's and the optimizer's state dicts fit; the
                # values themselves come with the model's state dict.
                param = self._value(name)
                old_code = embedded.code.clone()
                code = state["codes"][name].to(embedded.code.device)
                zeros = torch.zeros(code.shape, dtype=param.dtype, device=param.device)
                embedded.repack(param, zeros, code, zeros, zeros)
                self._remap_state(param, old_code, code)
        self.sensitivity = {name: saved.clone() for name, saved in state["sensitivity"].items()}

    def _before_model_loads(self, module, state_dict, prefix, *_) -> None:
        """The model's load pre-hook: restore STDET's state first, so the layers' keys fit."""
        state = state_dict.get(prefix + STATE_KEY)
        if state is not None:
            self.load_state_dict(state)


def _state_is_optional(module: nn.Module, incompatible_keys) -> None:
    """A state dict without STDET's state (plain weights, e.g. a pretrained model loaded before the
    warm-up ends) loads into a model with STDET on it without a missing-key error."""
    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if key != STATE_KEY and not key.endswith("." + STATE_KEY)]
