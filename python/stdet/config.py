"""The STDET configuration: every knob of the embedding schedule in one place.

Field names mirror the training CLI's flags (``--warmup-steps`` is ``warmup_steps``).
"""

import math
from dataclasses import asdict, dataclass, field


@dataclass
class STDETConfig:
    """Knobs of STDET (METHOD.md, "CMD mode discovery" and "STDET embedding schedule").

    warmup_steps: ordinary training steps before modes are fitted and the model is attached.
    snapshots: F, trajectory snapshots recorded evenly over the warm-up (the last at its end).
    modes: M, at most this many modes (1..254).
    samples: K, parameters sampled (balanced across tensors) for the clustering.
    embed_every: steps between embedding rounds after the warm-up.
    embed_rate: fraction of the still-free elements embedded per round.
    max_embedded: stop embedding once this fraction of the embeddable elements is embedded.
    protect: the most sensitive fraction of the free elements is never embedded in a round.
    min_r2: an element is truly embedded (``a * ref + b``) only if its fit explains this much of its
        trajectory's variance (R^2); the other selected elements are frozen (DUMMY).
    max_drift: and only if its ``a, b`` moved by at most this much (relative) since the last round.
    sensitivity: "taylor" (running mean of |g * w|, the default) or "fisher" (of g^2).
    sensitivity_decay: decay of the running mean of the sensitivity, per step.
    continuity: shift ``b`` at embedding time so the embedded value equals the current value (no jump);
        False jumps to the fitted line (the CMD behaviour).
    ref_grad: "full" (the default): each reference receives the full reparametrized gradient, its own
        plus ``sum a * g`` over its mode's embedded elements (training continues in the reduced space);
        "own": only its own element's gradient (the CMD code's behaviour: embedded elements follow).
    refit: keep ``a, b`` of free elements current by recursive least squares after the warm-up.
    safety_window: steps of training loss averaged before and after a round to judge it.
    safety_tolerance: a round whose after-window loss exceeds the before-window's by more than this
        fraction is undone and the rate halved. Needs the loss passed to ``STDET.step(loss)``.
    safety_sigmas: ... and only if the rise also exceeds this many standard errors of the difference
        of the two window means. The training loss of small random-crop batches is noisy: windows of
        20 steps differ by far more than 2% by chance, and the plain rule (``safety_sigmas=0``, as
        METHOD.md words it) then undoes rounds at random and halves the rate towards zero.
    start: "warmup" starts embedding when the warm-up ends; "plateau" also waits until the loss has
        stopped falling: a least-squares line through the probe loss (or, without a probe, the mean
        training loss) every `warmup_steps / snapshots` steps over the last `plateau_window` steps
        must change by at most `plateau_tolerance` (relative), `plateau_sigmas` standard errors
        included. Rounds then happen only while it stays flat; a confident rise by more than the
        tolerance stops embedding for good. While the model still learns fast, freezing or tying
        elements costs more than it saves (bench/results/screen_*.md), so it waits; the modes are
        fitted on the last `snapshots` snapshots before the start.
    plateau_window: steps the plateau test looks back over; None: `warmup_steps`.
    plateau_tolerance: the relative change over the window that counts as flat.
    plateau_sigmas: standard errors of that change added to it before comparing.
    release: at the learning rate's drop (the optimizer's lr at most half the largest it has had: a
        step decay, a plateau's cut, a cosine past its middle) every embedded element returns to FREE
        with its current value and embedding ends, so the anneal trains the whole model. Embedding
        saves work while the lr is high and the weights follow their modes; the fine steps of the
        anneal are per-element work, and a model held to its modes there ends worse.
    sma_restart: when `release` happens, the SMA's average restarts from the weights of that step
        (its horizon then spans the anneal, not the constant phase before it).
    accelerate_every: every this many steps of the embedding phase, extrapolate the references along
        the least-squares line of their values since the last time (METHOD.md, "Beyond the paper":
        the model lives mostly in the M references then, a low-dimensional trajectory as in P-BFGS /
        DLDR) and keep the move only if the caller's probe loss drops (`STDET`'s ``probe``); else
        half the move, else none. 0 (the default) turns it off; else an integer >= 2 (a line needs
        two points).
    accelerate_horizon: steps ahead the references are extrapolated; None: `accelerate_every`.
    accelerate_free_r2: None (the default) moves the references alone; a fraction r also moves every
        FREE element whose online fit on its reference explains at least r of its trajectory
        (R^2 >= r) by ``a`` times its reference's move: the whole model along its modes.
    snapshot_dtype: storage dtype of the warm-up trajectories ("float32" or "float16").
    coefficient_dtype: storage dtype of the embedded elements' ``a, b`` ("bfloat16", the default,
        "float16" or "float32"). 16-bit halves their cost; in bench/bench_memory.py it changed the
        eval loss by under 0.1% against float32 (README, "Memory").
    include_gdn, include, exclude: which tensors are embeddable (see `stdet.parametrize`).
    sma_every, sma_alpha, sma_mode: SMA run by the STDET object (`stdet.SMA`): sample every
        `sma_every` steps (0, the default here, turns it off: SMA is a separate choice that applies to
        plain training too; METHOD.md's own defaults are 10, 0.1, "shadow").
    sma_guard: with a shadow SMA, a training loop that hands out weights (`stdet train`'s
        evaluations and its exported model) hands out the average only where it wins a paired test
        on a probe batch's per-crop losses against the live weights (`sma_guard_sigmas`;
        `stdet.sma.average_is_better`), else the live weights. An average lags the live weights;
        where the model still learns fast (the study's scratch track) the lag cost up to 1.1% at S,
        and STDET's SMA must not do harm.
    sma_guard_sigmas: the guard's evidence (`stdet.sma.average_is_better`): the average is handed
        out only where its per-crop probe losses are lower than the live weights' by more than this
        many standard errors of the paired differences. 0: wherever their mean is not higher. The
        default 2 was the rule written down before bench/results/screen_guard.md ran. There, with
        the study's 8-crop probe, the plain comparison of means handed out averages up to 0.9% worse
        on the held-out photos (median +0.14% in fine-tuning); the paired test handed out the
        average in 1 of 24 runs (median +0.00% in both tracks), giving up averages up to 2% better:
        a probe of a few crops rarely proves a difference, and then the live weights stay.
    seed: seeds the sampling of the clustering.
    """

    warmup_steps: int = 1000
    snapshots: int = 20
    modes: int = 10
    samples: int = 1000
    embed_every: int = 100
    embed_rate: float = 0.1
    max_embedded: float = 0.9
    protect: float = 0.1
    min_r2: float = 0.9
    max_drift: float = 0.05
    sensitivity: str = "taylor"
    sensitivity_decay: float = 0.9
    continuity: bool = True
    ref_grad: str = "full"
    refit: bool = True
    safety_window: int = 20
    safety_tolerance: float = 0.02
    safety_sigmas: float = 2.0
    start: str = "plateau"
    plateau_window: int | None = None
    plateau_tolerance: float = 0.01
    plateau_sigmas: float = 1.0
    release: bool = False
    sma_restart: bool = False
    accelerate_every: int = 0
    accelerate_horizon: float | None = None
    accelerate_free_r2: float | None = None
    snapshot_dtype: str = "float32"
    coefficient_dtype: str = "bfloat16"
    include_gdn: bool = False
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    sma_every: int = 0
    sma_alpha: float | str = 0.1
    sma_mode: str = "shadow"
    sma_guard: bool = True
    sma_guard_sigmas: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        def require(name: str, ok: bool, expected: str) -> None:
            if not ok:
                raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_fraction(value: object, low_open: bool = False) -> bool:
            return (
                isinstance(value, (int, float))
                and math.isfinite(value)
                and (value > 0 if low_open else value >= 0)
                and value <= 1
            )

        require("warmup_steps", is_int(self.warmup_steps) and self.warmup_steps >= 2, "an integer >= 2")
        require(
            "snapshots",
            is_int(self.snapshots) and 2 <= self.snapshots <= max(2, self.warmup_steps),
            "an integer in 2..warmup_steps",
        )
        require("modes", is_int(self.modes) and 1 <= self.modes <= 254, "an integer in 1..254")
        require("samples", is_int(self.samples) and self.samples >= 2, "an integer >= 2")
        require("embed_every", is_int(self.embed_every) and self.embed_every >= 1, "an integer >= 1")
        require("embed_rate", is_fraction(self.embed_rate, low_open=True), "a fraction in (0, 1]")
        require("max_embedded", is_fraction(self.max_embedded), "a fraction in [0, 1]")
        require("protect", is_fraction(self.protect), "a fraction in [0, 1]")
        require("min_r2", is_fraction(self.min_r2), "a fraction in [0, 1]")
        require(
            "max_drift", isinstance(self.max_drift, (int, float)) and self.max_drift >= 0, "a number >= 0"
        )
        require("sensitivity", self.sensitivity in ("taylor", "fisher"), "'taylor' or 'fisher'")
        require(
            "sensitivity_decay",
            is_fraction(self.sensitivity_decay) and self.sensitivity_decay < 1,
            "a number in [0, 1)",
        )
        require("safety_window", is_int(self.safety_window) and self.safety_window >= 1, "an integer >= 1")
        require(
            "safety_tolerance",
            isinstance(self.safety_tolerance, (int, float)) and self.safety_tolerance >= 0,
            "a number >= 0",
        )
        require(
            "safety_sigmas",
            isinstance(self.safety_sigmas, (int, float)) and self.safety_sigmas >= 0,
            "a number >= 0",
        )
        require(
            "accelerate_every",
            is_int(self.accelerate_every) and (self.accelerate_every == 0 or self.accelerate_every >= 2),
            "0 (off) or an integer >= 2",
        )
        require(
            "accelerate_horizon",
            self.accelerate_horizon is None
            or (
                isinstance(self.accelerate_horizon, (int, float))
                and not isinstance(self.accelerate_horizon, bool)
                and math.isfinite(self.accelerate_horizon)
                and self.accelerate_horizon > 0
            ),
            "None or a number of steps > 0",
        )
        require(
            "accelerate_free_r2",
            self.accelerate_free_r2 is None
            or (not isinstance(self.accelerate_free_r2, bool) and is_fraction(self.accelerate_free_r2)),
            "None or a fraction in [0, 1]",
        )
        require("start", self.start in ("warmup", "plateau"), "'warmup' or 'plateau'")
        require(
            "plateau_window",
            self.plateau_window is None or (is_int(self.plateau_window) and self.plateau_window >= 2),
            "None or an integer >= 2",
        )
        require("plateau_tolerance", is_fraction(self.plateau_tolerance), "a fraction in [0, 1]")
        require(
            "plateau_sigmas",
            isinstance(self.plateau_sigmas, (int, float)) and self.plateau_sigmas >= 0,
            "a number >= 0",
        )
        require("sma_every", is_int(self.sma_every) and self.sma_every >= 0, "an integer >= 0")
        require("sma_mode", self.sma_mode in ("shadow", "feedback"), "'shadow' or 'feedback'")
        sma_alpha_ok = self.sma_alpha == "uniform" or (
            not isinstance(self.sma_alpha, bool) and is_fraction(self.sma_alpha, low_open=True)
        )
        require("sma_alpha", sma_alpha_ok, "a number in (0, 1] or 'uniform'")
        require("sma_guard", isinstance(self.sma_guard, bool), "True or False")
        require(
            "sma_guard_sigmas",
            isinstance(self.sma_guard_sigmas, (int, float))
            and not isinstance(self.sma_guard_sigmas, bool)
            and math.isfinite(self.sma_guard_sigmas)
            and self.sma_guard_sigmas >= 0,
            "a finite number >= 0",
        )
        require("ref_grad", self.ref_grad in ("full", "own"), "'full' or 'own'")
        require(
            "snapshot_dtype",
            self.snapshot_dtype in ("float32", "float16", "bfloat16"),
            "'float32', 'float16' or 'bfloat16'",
        )

    def to_dict(self) -> dict:
        return asdict(self)
