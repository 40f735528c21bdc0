"""`STDET`: the object a training loop adds to run the method (METHOD.md, "STDET embedding schedule").

    st = stdet.STDET(model, optimizer, stdet.STDETConfig(...))
    for batch in data:
        ...; loss.backward(); optimizer.step()
        st.step(loss)          # the loss is optional; without it embedding rounds are not judged

It records trajectories during the warm-up and fits the modes at its end, then every `embed_every`
steps embeds a fraction of the still-free elements: the least sensitive ones, truly (``a * ref + b``)
where their fit is good and stable, frozen (DUMMY) otherwise. A round that raises the smoothed loss
by more than the tolerance is undone and the rate halved. Embedded elements leave training: they are
no longer trainable values and have no optimizer state (see below).

Until the first round embeds something every element is FREE, and the model stays as it is: its layers'
own tensors, trained by the user's optimizer as in plain training, so that this phase costs what plain
training does (the sensitivity of the window before the round comes from gradient hooks,
`stdet.sensitivity`, and the refit reads the layers' tensors). The first round attaches the
parametrization (the optimizer's state moves over with the values) and embeds each mode's reference
element in its mode (``a = 1, b = 0``: ``refs`` take its value and its optimizer state) with the
elements it chose.

The parts: storage (`stdet.layout.FlatLayout`: every embeddable tensor on one flat axis in the
compact layout, one trainable ``free_values`` that shrinks at every round, the optimizer's
per-element state and the sensitivity following it), decisions (`stdet.policy.EmbeddingPolicy`:
which elements a round takes, how, and whether it did harm), and this object, which runs the phases
and keeps the schedule's state. The sensitivity is updated by the backward of the fused
reconstruction itself (one pass over the flat gradient); the optimizer trains the layout's
``free_values`` and ``refs`` in place of the layers' own tensors.

Checkpoints need nothing of their own: STDET's state travels inside the model's ``state_dict()``
(as ``stdet._extra_state``, PyTorch's mechanism for non-tensor module state), and loading such a state
dict into a model with a new `STDET` on it re-attaches the parametrizations with the saved layout
before the layers load, so a training loop's usual ``torch.save({"state_dict": net.state_dict(),
"optimizer": optimizer.state_dict()})`` and its resume path (model, optimizer, STDET, then
``net.load_state_dict``, then ``optimizer.load_state_dict``) just work. The layout's ``free_values``
and ``refs`` join the optimizer's param group of the network's weights, so whatever the user's
learning-rate scheduler does to that group (created before STDET attaches or not, decayed already or
not) it does to them.

Optionally (``accelerate_every``, off by default) the references are moved along the least-squares
line of their recent values every few steps of the embedding phase (`stdet.accelerate`), judged by a
``probe``: a callable the caller supplies that returns a fixed batch's loss, deterministically. A move
that does not lower it is halved once, then undone exactly; each decision is logged in `history`.

Under torch.distributed (DistributedDataParallel, several ranks) the modes are fitted once, on rank 0,
and broadcast, and the loss given to `step` is averaged over the ranks; gradients being all-reduced,
the sensitivities (averaged over the ranks before each round, each rank's backward seeing its own
share of the batch) and so every round's choices are the same on every rank.
"""

import logging
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from stdet_kernels import FREE

from .accelerate import RefTrajectory
from .config import STDETConfig
from .layout import FlatLayout
from .modes import OnlineRefit, fit_modes
from .parametrize import (
    STATE_KEY,
    STATE_MODULE,
    attach,
    embeddable_parameters,
    flat_layout,
    parametrized_tensors,
)
from .policy import EmbeddingPolicy
from .sensitivity import HookedSensitivity
from .sma import SMA
from .trajectory import TrajectoryRecorder, layout

log = logging.getLogger("stdet")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device | None:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None


def _mean_over_ranks(value: float) -> float:
    """Under torch.distributed, the mean of `value` over the ranks (each sees its own share of the
    batch); the rounds' safety rule then decides the same on every rank."""
    if not _distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_GROUP_SETTINGS_IGNORED = ("params", "initial_lr")


class STDET:
    """Runs STDET on `model`, whose parameters `optimizer` updates. See the module docstring.

    `probe` (needed by ``config.accelerate_every``; used by ``config.start="plateau"``, which falls
    back on the training losses given to `step` without it): returns the loss of a fixed batch as a
    float, the same number for the same weights (e.g. the model in eval mode, so no quantization
    noise); STDET calls it without gradients, to judge each acceleration and to see a plateau.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: STDETConfig | None = None,
        probe: Callable[[], float] | None = None,
    ) -> None:
        self.config = config or STDETConfig()
        if not isinstance(self.config, STDETConfig):
            raise TypeError(f"config: expected a stdet.STDETConfig, got {type(self.config).__name__}")
        if self.config.accelerate_every and not callable(probe):
            raise ValueError(
                f"probe: config.accelerate_every={self.config.accelerate_every} needs a probe, a callable "
                f"returning a fixed batch's loss; got {probe!r}"
            )
        self.probe = probe
        self.model = model
        self.optimizer = optimizer
        if parametrized_tensors(model) or flat_layout(model) is not None:
            raise RuntimeError("model: already has STDET parametrizations (one STDET per model)")
        self.names = embeddable_parameters(
            model, self.config.include_gdn, self.config.include, self.config.exclude
        )
        if not self.names:
            raise ValueError(
                "model: no embeddable parameters (no convolution or linear layer outside entropy models)"
            )
        tensors = {name: model.get_parameter(name) for name in self.names}
        self.group = self._param_group(tensors)
        self.slices = layout(tensors)
        self.elements = self.slices[-1].stop
        plateau = self.config.start == "plateau"
        self.recorder: TrajectoryRecorder | None = TrajectoryRecorder(
            tensors, self.config.snapshots, dtype=_DTYPES[self.config.snapshot_dtype], rolling=plateau
        )
        # start="plateau": (step, loss) every snapshot interval over the plateau window; and whether
        # a rise stopped embedding for good.
        self.plateau_window = self.config.plateau_window or self.config.warmup_steps
        self.probes: list[tuple[int, float]] = []
        self.stopped = False
        warmup, snapshots = self.config.warmup_steps, self.config.snapshots
        self.record_steps = sorted({round(warmup * (j + 1) / snapshots) for j in range(snapshots)})
        self.snapshot_interval = max(1, warmup // snapshots)
        self.policy = EmbeddingPolicy(self.config)
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
        # From the fit to the first round (not attached yet): the sensitivity from gradient hooks.
        self.hooked: HookedSensitivity | None = None
        self.peak_lr = 0.0  # the largest lr of the layout's param group so far (`release`)
        self.trajectory: RefTrajectory | None = None  # refs since the last acceleration
        self.sma: SMA | None = None
        if self.config.sma_every:
            self.sma = SMA(model, self.config.sma_every, self.config.sma_alpha, self.config.sma_mode)
        # The storage: the model's child ``stdet`` (empty until the warm-up ends); it carries this
        # object's state in the model's state dict and computes the flat weight once per forward.
        self.layout = FlatLayout(self.names, [piece.shape for piece in self.slices], owner=self)
        model.add_module(STATE_MODULE, self.layout)
        model.register_forward_pre_hook(self.layout.begin_forward)
        model.register_forward_hook(self.layout.end_forward, always_call=True)
        model.register_load_state_dict_pre_hook(self._before_model_loads)
        model.register_load_state_dict_post_hook(_state_is_optional)

    def _param_group(self, tensors: dict[str, nn.Parameter]) -> int:
        """The optimizer's param group that will train the flat layout: the one holding the embeddable
        tensors (several only if their settings agree: one flat tensor has one learning rate)."""
        where = {
            id(p): index for index, group in enumerate(self.optimizer.param_groups) for p in group["params"]
        }
        for name, tensor in tensors.items():
            if id(tensor) not in where:
                raise ValueError(f"optimizer: does not hold the model's parameter {name!r}")
        groups = sorted({where[id(tensor)] for tensor in tensors.values()})

        def settings(index: int) -> dict:
            group = self.optimizer.param_groups[index]
            return {k: v for k, v in group.items() if k not in _GROUP_SETTINGS_IGNORED}

        if any(settings(index) != settings(groups[0]) for index in groups[1:]):
            raise ValueError(
                "optimizer: the embeddable parameters are in param groups with different settings; STDET "
                "trains them as one flat tensor, so they must share one learning rate, weight decay, ..."
            )
        return groups[0]

    # ------------------------------------------------------------------------------------------
    # Views

    @property
    def refs(self) -> nn.Parameter | None:
        """The references (one scalar per mode), once attached."""
        return self.layout.refs if self.layout.attached else None

    @property
    def num_modes(self) -> int:
        return 0 if self.references is None else int(self.references.numel())

    def flat_weights(self) -> torch.Tensor:
        """Every embeddable element's current weight, flat, in the layout's order (float32, CPU)."""
        if not self.layout.attached:
            return self._layer_weights().cpu()
        return self.layout.weights().float().cpu()

    def _free_mask(self) -> torch.Tensor:
        return self.layout.code.cpu() == FREE

    def trainable_fraction(self) -> float:
        """Trainable scalars (free elements plus one reference per mode) over embeddable elements."""
        if not self.layout.attached:
            return 1.0
        return min(1.0, (self.layout.free_count + self.num_modes) / self.elements)

    def embedded_fraction(self) -> float:
        """Elements that are not FREE (references included) over embeddable elements."""
        return self.layout.embedded_fraction() if self.layout.attached else 0.0

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
        if self.phase == "released":
            return
        if self.config.release and self._lr_dropped():
            self._release()
            return
        self._watch_loss()
        if self.phase in ("warmup", "waiting"):
            waiting = self.phase == "waiting" and self.step_count % self.snapshot_interval == 0
            if self.step_count in self.record_steps or waiting:
                self.recorder.record()
            looks = self.phase == "warmup" or self.step_count % self.snapshot_interval == 0
            if self.step_count >= self.config.warmup_steps and looks:
                trend = "flat" if self.config.start == "warmup" else self._trend()
                if trend == "flat":
                    self._start_embedding()
                elif self.phase == "warmup":
                    self.phase = "waiting"
                    self.history.append({"step": self.step_count, "event": "waiting", "trend": trend})
            return
        if self.refit is not None and self.refit.pending_deviation is not None:
            self._finish_refit_snapshot()  # begun by the last step, whatever the schedule says now
        elif self.config.refit and self.step_count % self.snapshot_interval == 0:
            if self.layout.attached:  # the FREE elements are the tracked ones; references are refs
                self.refit.update_tracked(self.layout.free_values.detach(), self.refs.detach())
            else:  # every element is tracked, the references among them
                weights = self._layer_weights()
                self.refit.update_tracked(weights, weights[self.references.to(weights.device)])
        if self.pending is not None and self.step_count >= self.pending["step"] + self.config.safety_window:
            self._judge()
        due = self.step_count - self.last_round >= self.config.embed_every
        if self.pending is None and due and self._embedding_open():
            self._round()
        if self.trajectory is not None:
            self.trajectory.record(self.refs)
            if self.trajectory.count >= self.config.accelerate_every:
                self._accelerate()
        self._track_sensitivity()
        self._begin_refit_snapshot()

    def _begin_refit_snapshot(self) -> None:
        """Attached, before a step whose snapshot is due: the snapshot's references' part now (refs as
        the next backward reads them), its FREE values' part handed to that backward, which adds it in
        the pass it makes over them anyway (no launch, no pass over memory of its own)."""
        if not (self.config.refit and self.refit is not None and self.layout.attached):
            return
        if (self.step_count + 1) % self.snapshot_interval == 0:
            self.refit.begin_snapshot(self.refs.detach())
            self.layout.pending_refit = self.refit.pending_snapshot()

    def _finish_refit_snapshot(self) -> None:
        """The step after `_begin_refit_snapshot`: the snapshot is of the FREE values this step's
        backward read, added by it. Where no backward added it (no training forward since, or the
        forward ran under torch.compile, whose traced op has no refit), the FREE values now. (The
        first snapshot after the model was attached was not begun ahead: all of it at its step.)"""
        snapshot, self.layout.pending_refit = self.layout.pending_refit, None
        if snapshot is not None and snapshot.done:
            self.refit.snapshot_done()
        else:
            self.refit.finish_snapshot(self.layout.free_values.detach())

    def _embedding_open(self) -> bool:
        """Whether a round may embed now: room under `max_embedded`, and with ``start="plateau"`` the
        loss still flat (falling: the round waits for the next; rising: embedding stops for good)."""
        if self.stopped or self.embedded_fraction() >= self.config.max_embedded:
            return False
        if self.config.start != "plateau":
            return True
        trend = self._trend()
        if trend == "rising":
            self.stopped = True
            self.history.append({"step": self.step_count, "event": "stopped", "trend": trend})
            log.info("stdet: step %d: the loss rises: embedding stops", self.step_count)
        elif trend != "flat":
            self.last_round = self.step_count  # no round now: look again after embed_every steps
        return trend == "flat"

    def _watch_loss(self) -> None:
        """start="plateau": every snapshot interval, the probe loss (or the mean training loss of the
        interval's steps) joins the points the plateau test reads."""
        if self.config.start != "plateau" or self.stopped or self.step_count % self.snapshot_interval:
            return
        if self.probe is not None:
            value = self._probe_loss()
        else:
            recent = [loss for step, loss in self.losses if step > self.step_count - self.snapshot_interval]
            if not recent:
                return
            value = sum(recent) / len(recent)
        self.probes.append((self.step_count, value))
        del self.probes[: -(self.plateau_window // self.snapshot_interval + 2)]

    def _trend(self) -> str:
        return self.policy.trend(self.probes, self.plateau_window)

    def _lr_dropped(self) -> bool:
        """Whether the lr of the layout's param group is at most half the largest it has had."""
        lr = float(self.optimizer.param_groups[self.group]["lr"])
        self.peak_lr = max(self.peak_lr, lr)
        return lr <= 0.5 * self.peak_lr

    @property
    def sensitivity_window(self) -> int:
        """Steps before a round over which the sensitivity is tracked: older steps would weigh under
        1% in its running mean (decay^window < 0.01), so tracking all steps would change nothing."""
        decay = self.config.sensitivity_decay
        return 1 if decay == 0 else math.ceil(math.log(0.01) / math.log(decay))

    def _track_sensitivity(self) -> None:
        """Turn the sensitivity's update in the backward on for the steps of the window before the
        next round (starting from zero), off otherwise: it costs a pass over the gradient, the values
        and the sensitivity."""
        next_round = max(self.last_round + self.config.embed_every, self.step_count + 1)
        if self.pending is not None:  # a round waits for its judgement first
            next_round = max(next_round, self.pending["step"] + self.config.safety_window)
        wanted = (
            not self.stopped
            and self.embedded_fraction() < self.config.max_embedded
            and next_round - (self.step_count + 1) < self.sensitivity_window
        )
        tracker = self._tracker()
        if wanted and tracker.track_sensitivity is None:
            tracker.sensitivity.zero_()
        config = self.config
        tracker.track_sensitivity = (config.sensitivity_decay, config.sensitivity) if wanted else None

    def _tracker(self) -> "FlatLayout | HookedSensitivity":
        """Where the sensitivity is tracked: the layout's backward once attached, else the hooks."""
        return self.hooked if self.hooked is not None else self.layout

    # ------------------------------------------------------------------------------------------
    # Phases

    def _attach(self, num_modes: int) -> None:
        """Lay the model out flat; the optimizer trains the layout instead of the layers' tensors."""
        config = self.config
        params = self._layer_tensors()
        attach(
            self.model,
            num_modes,
            config.include_gdn,
            config.include,
            config.exclude,
            coefficient_dtype=_DTYPES[config.coefficient_dtype],
            layout=self.layout,
        )
        self.layout.take_over(self.optimizer, params, self.group)
        self.phase = "embedding"

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
        # Every element is FREE until the first round: the model stays as it is (see the module
        # docstring), the refit follows every element.
        self.refit = OnlineRefit(fit).to(self._device())
        self.hooked = HookedSensitivity(self._layer_tensors())
        if self.sma is not None:
            self.sma.references = self.references
        self.phase = "embedding"
        self.last_round = self.step_count
        log.info("stdet: step %d: %d modes fitted", self.step_count, fit.num_modes)
        self.history.append({"step": self.step_count, "event": "fit", "modes": fit.num_modes})
        self._track_sensitivity()

    def _layer_tensors(self) -> list[nn.Parameter]:
        return [self.model.get_parameter(name) for name in self.names]

    def _device(self) -> torch.device:
        return self.model.get_parameter(self.names[0]).device

    def _layer_weights(self) -> torch.Tensor:
        """Before attaching: every embeddable element's weight, flat, float32, on the model's device."""
        return torch.cat([t.detach().reshape(-1).float() for t in self._layer_tensors()])

    @torch.no_grad()
    def _attach_for_the_first_round(self) -> None:
        """Lay the model out flat (all FREE; the optimizer's state and the hooks' sensitivity move
        over), then embed each mode's reference element in its mode with ``a = 1, b = 0``: ``refs`` take
        its value and its per-element optimizer state (its moments carry on rather than restarting
        from zero at a late step)."""
        num_modes = self.num_modes
        tracking, sensitivity = self.hooked.track_sensitivity, self.hooked.sensitivity
        self.hooked.remove()
        self.hooked = None
        self._attach(num_modes)
        free_mask = self._free_mask()  # all but a masked layer's masked-out elements (DUMMY)
        self.refit.remap(torch.ones(self.elements, dtype=torch.bool), free_mask)
        self.layout.sensitivity = sensitivity[free_mask.to(sensitivity.device)].clone()
        self.layout.track_sensitivity = tracking
        self.layout.embed_references(self.references, self.optimizer)
        self.refit.remap(free_mask, self._free_mask())
        self._own_reference_gradient()
        if self.config.accelerate_every:
            self.trajectory = RefTrajectory(self.config.accelerate_every, self.refs)
        log.info("stdet: step %d: model attached", self.step_count)
        self.history.append({"step": self.step_count, "event": "attach", "modes": num_modes})

    def _own_reference_gradient(self) -> None:
        """``ref_grad="own"``: the layout gives each reference its own element's gradient only."""
        if self.config.ref_grad == "own" and self.references is not None:
            self.layout.own_reference_index = self.references.to(self.layout.code.device)

    def _release(self) -> None:
        """The lr dropped: every element returns to FREE with its value and embedding ends (a round
        waiting for its judgement is kept); the SMA restarts if `sma_restart`."""
        embedded = self.embedded_fraction()
        if self.layout.attached:
            self.layout.release_all(self.optimizer)
            self.layout.track_sensitivity = None
            self.layout.pending_refit = None
        if self.hooked is not None:
            self.hooked.remove()
            self.hooked = None
        self.refit = None
        self.recorder, self.pending, self.trajectory, self.phase = None, None, None, "released"
        if self.sma is not None and self.config.sma_restart:
            self.sma.restart()
        event = {"step": self.step_count, "event": "released", "embedded_fraction": embedded}
        self.history.append(event)
        log.info("stdet: step %d: the lr dropped: %.1f%% embedded released", self.step_count, 100 * embedded)

    def _sensitivity(self) -> torch.Tensor:
        """The FREE elements' sensitivity (FREE order, CPU); averaged over the ranks under DDP."""
        sensitivity = self.layout.sensitivity
        if _distributed():
            sensitivity = sensitivity.to(_collective_device() or sensitivity.device, copy=True)
            dist.all_reduce(sensitivity)
        return sensitivity.float().cpu()

    def _round(self) -> None:
        if not self.layout.attached:
            count = self.policy.count(self.elements - self.num_modes, self.elements, self.rate)
            if count <= 0:
                self.last_round = self.step_count
                return
            self._attach_for_the_first_round()
        free_mask = self._free_mask()
        free = free_mask.nonzero().flatten()
        count = self.policy.count(free.numel(), self.elements, self.rate)
        self.last_round = self.step_count
        if count <= 0 or free.numel() == 0:
            return
        a, b, r2, drift = (t.cpu() for t in (*self.refit.coefficients(), self.refit.drift()))
        plan = self.policy.choose(
            free,
            count,
            self._sensitivity(),
            (a, b, r2, drift),
            self.layout.dense()[0].float().cpu(),  # the chosen elements are FREE: their values
            self.refs.detach().float().cpu(),
            self.mode,
        )
        stash = self.refit.entries(plan.positions)  # to restore if the round is undone
        self.refit.mark()
        self.layout.edit(plan.indices, plan.codes, a=plan.a, b=plan.b, optimizer=self.optimizer)
        self.refit.remap(free_mask, self._free_mask())
        window = (self.step_count - self.config.safety_window, self.step_count)
        self.pending = {
            "step": self.step_count,
            "before": self._mean_loss(*window),
            "before_se": self._standard_error(*window),
            "indices": plan.indices,
            "refit": stash,
        }
        decision = {
            "step": self.step_count,
            "event": "round",
            "true": plan.true_count,
            "dummy": plan.dummy_count,
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
        if self.policy.keeps(before, pending.get("before_se", 0.0), after, self._standard_error(*window)):
            self.history.append({"step": self.step_count, "event": "kept", "before": before, "after": after})
            return
        # Undo: the round's elements return to FREE with their current values.
        indices = pending["indices"]
        free_before = self._free_mask()
        weights = self.flat_weights()
        self.layout.edit(indices, FREE, value=weights[indices], a=0.0, b=0.0, optimizer=self.optimizer)
        self.refit.remap(free_before, self._free_mask(), restore=(indices, pending["refit"]))
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
    # Acceleration in mode space

    def _accelerate(self) -> None:
        """Move the references `accelerate_horizon` steps ahead along their fitted lines (and, with
        `accelerate_free_r2`, the well-fitted FREE elements with them); keep the move if the probe
        loss drops, else try half of it, else put every value back exactly. Adam's moments stay."""
        config = self.config
        slope = self.trajectory.slope()
        self.trajectory.clear()
        horizon = float(config.accelerate_horizon or config.accelerate_every)
        refs, free_values = self.refs, self.layout.free_values
        start_refs = refs.detach().clone()
        start_free = follow = None
        if config.accelerate_free_r2 is not None and free_values.numel():
            a, _, r2 = self.refit.coefficients()
            # Per FREE element: how far it moves per unit of its reference's move.
            follow = (torch.where(r2 >= config.accelerate_free_r2, a, 0.0), self.refit.mode.long())
            start_free = free_values.detach().clone()
        before = self._probe_loss()
        tried, accepted = [], 0.0
        for ahead in (horizon, horizon / 2):
            move = slope * ahead
            self._move_along_modes(start_refs, move, start_free, follow)
            loss = self._probe_loss()
            tried.append([ahead, loss])
            if loss < before:
                accepted = ahead
                break
        else:
            self._move_along_modes(start_refs, None, start_free, follow)
        event = {
            "step": self.step_count,
            "event": "accelerate",
            "accepted": accepted > 0,
            "horizon": accepted,
            "before": before,
            "after": tried[-1][1] if accepted else before,
            "tried": tried,
            "move": float(slope.abs().max() * accepted) if accepted else 0.0,
        }
        self.history.append(event)
        log.info("stdet: %s", event)

    @torch.no_grad()
    def _move_along_modes(
        self,
        start_refs: torch.Tensor,
        move: torch.Tensor | None,
        start_free: torch.Tensor | None,
        follow: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        """refs = start + `move` (None: the start, bit for bit); FREE values likewise by ``a * move``
        of their reference where `follow` = (a or 0, mode) says."""
        refs, free_values = self.refs, self.layout.free_values
        if move is None:
            refs.copy_(start_refs)
        else:
            refs.copy_((start_refs.double() + move).to(refs.dtype))
        if start_free is None:
            return
        if move is None:
            free_values.copy_(start_free)
        else:
            a, mode = follow
            free_values.copy_((start_free + a * move.to(a.dtype)[mode]).to(free_values.dtype))

    def _probe_loss(self) -> float:
        """The caller's probe loss (without gradients; averaged over the ranks, so that every rank
        takes the same decision); NaN counts as worse than anything."""
        # An SMA sample waiting for the next forward is of the weights training goes on from: the
        # probe's forward must not take it.
        pending_sample, self.layout.pending_sample = self.layout.pending_sample, None
        try:
            with torch.no_grad():
                value = float(self.probe())
        finally:
            self.layout.pending_sample = pending_sample
        return _mean_over_ranks(value)

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict:
        """Everything needed to continue exactly that the model's and optimizer's own state dicts do not
        hold (they hold the weights, coefficients, sensitivity and moments). It is also the model's
        ``stdet._extra_state``."""
        return {
            "config": self.config.to_dict(),
            "names": list(self.names),
            "shapes": [list(piece.shape) for piece in self.slices],
            "step": self.step_count,
            "phase": self.phase,
            "rate": self.rate,
            "peak_lr": self.peak_lr,
            "probes": list(self.probes),
            "stopped": self.stopped,
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
            "code": self.layout.code.clone() if self.layout.attached else None,
            "track_sensitivity": self._tracker().track_sensitivity,
            # Fitted, not attached yet: the hooks' sensitivity (attached, the layout's buffer holds it).
            "sensitivity": None if self.hooked is None else self.hooked.sensitivity.cpu().clone(),
            "sma": None if self.sma is None else self.sma.state_dict(),
            "trajectory": None if self.trajectory is None else self.trajectory.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict`, before the model's and the optimizer's state dicts are loaded: past the
        warm-up it attaches the model (or re-lays it out) so that those state dicts fit.

        Loading a model's state dict does this by itself (its load pre-hook). On a model already
        attached, the optimizer's per-element state follows the new layout (elements that become FREE
        start from zero) until the optimizer's own state dict is loaded.
        """
        shapes = [piece.shape for piece in self.slices]
        if state.get("names") != self.names or [tuple(s) for s in state.get("shapes", [])] != shapes:
            raise ValueError("state: was saved for a different model (its embeddable tensors differ)")
        if state["phase"] in ("warmup", "waiting") and self.layout.attached:
            raise RuntimeError(
                "state: saved during the warm-up, but this model is attached already; load it into a "
                "new model with a new STDET"
            )
        if (
            self.layout.attached
            and state["references"] is not None
            and state["references"].numel() != self.num_modes
        ):
            raise ValueError(
                f"state: has {state['references'].numel()} modes, this STDET {self.num_modes}; load it "
                "into a new model with a new STDET"
            )
        self.step_count, self.rate = state["step"], state["rate"]
        self.peak_lr = state.get("peak_lr", 0.0)
        self.probes = [tuple(point) for point in state.get("probes", [])]
        self.stopped = state.get("stopped", False)
        self.history, self.losses = list(state["history"]), [tuple(x) for x in state["losses"]]
        self.pending, self.last_round = state["pending"], state["last_round"]
        if self.sma is not None and state.get("sma") is not None:
            self.sma.load_state_dict(state["sma"])
        if state["phase"] in ("warmup", "waiting"):
            self.recorder.buffer.copy_(state["recorder"]["buffer"])
            self.recorder.count = state["recorder"]["count"]
            self.phase = state["phase"]
            return
        self.recorder = None
        self.references, self.mode = state["references"], state["mode"]
        if self.hooked is not None:
            self.hooked.remove()
            self.hooked = None
        refit = state["refit"]
        if self.sma is not None and self.references is not None:
            self.sma.references = self.references
        if state["code"] is None:  # saved before the first round attached the model (or released)
            if self.layout.attached:
                raise RuntimeError(
                    "state: saved before the model was attached, but this model is attached already; "
                    "load it into a new model with a new STDET"
                )
            self.phase = state["phase"]
            self.refit = None if refit is None else OnlineRefit.from_state_dict(refit).to(self._device())
            if self.phase == "embedding":
                self.hooked = HookedSensitivity(self._layer_tensors())
                self.hooked.sensitivity.copy_(state["sensitivity"])
                self.hooked.track_sensitivity = state["track_sensitivity"]
            return
        if not self.layout.attached:
            self._attach(self.num_modes)
        self.phase = state["phase"]
        self.refit, self.layout.pending_refit = None, None
        if refit is not None:
            self.refit = OnlineRefit.from_state_dict(refit).to(self.layout.free_values.device)
        self.trajectory = None
        if self.config.accelerate_every and self.phase == "embedding":
            self.trajectory = RefTrajectory(self.config.accelerate_every, self.refs)
            if state.get("trajectory") is not None:
                self.trajectory.load_state_dict(state["trajectory"])
        self._own_reference_gradient()
        # The saved layout, so that the model's and the optimizer's state dicts fit; the values come
        # with the model's state dict.
        self.layout.take_layout(state["code"], self.optimizer)
        self.layout.track_sensitivity = state.get("track_sensitivity")
        if self.refit is not None and self.refit.pending_deviation is not None:  # saved between the parts
            self.layout.pending_refit = self.refit.pending_snapshot()

    def _before_model_loads(self, module, state_dict, prefix, *_) -> None:
        """The model's load pre-hook: restore STDET's state first, so the layout's keys fit."""
        state = state_dict.get(prefix + STATE_KEY)
        if state is not None:
            self.load_state_dict(state)


def _state_is_optional(module: nn.Module, incompatible_keys) -> None:
    """A state dict without STDET's state (plain weights, e.g. a pretrained model loaded before the
    warm-up ends) loads into a model with STDET on it without a missing-key error."""
    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if key != STATE_KEY and not key.endswith("." + STATE_KEY)]
