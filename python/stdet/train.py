"""The training job behind `stdet train`: a CompressAI model, plain Adam or STDET, optional SMA.

It follows CompressAI's ``examples/train.py``: loss ``lambda * 255^2 * MSE + bpp`` (or
``lambda * (1 - MS-SSIM) + bpp``), Adam on the network's parameters, a second Adam on the entropy
bottlenecks' ``quantiles`` minimising ``aux_loss()``, gradient-norm clipping. Around it:

- data: random crops of the bundled photos or of a folder (`stdet.data`), batch ``k`` a function of
  the seed and ``k`` only, so a resumed run sees exactly the batches the uninterrupted one would;
- evaluation every ``eval_every`` steps on the eval images with real entropy coding
  (`stdet.evaluate`), on the averaged weights when SMA runs in shadow mode (``eval_live`` adds the
  live weights' evaluation beside it);
- files in ``out``: ``config.toml`` (the resolved configuration), ``log.jsonl`` (one record per
  logged step and per evaluation), ``last.ckpt`` (everything needed to continue, written atomically
  every ``checkpoint_every`` steps, at the end and on SIGINT/SIGTERM), ``model.pth`` (a plain
  CompressAI state dict, `stdet.export_state_dict`) and ``summary.json``;
- several processes (``torchrun``): DistributedDataParallel over the global batch (each rank takes
  its share of batch ``k``), gloo on CPU and NCCL on GPU; STDET stays identical on every rank (see
  `stdet.STDET`), only rank 0 evaluates and writes.
"""

import functools
import json
import math
import os
import resource
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .config import STDETConfig
from .data import RandomCrops, bundled_images, load_folder
from .evaluate import evaluate, psnr
from .parametrize import export_state_dict
from .schedule import STDET
from .sma import SMA, average_is_better, paired_difference

# CompressAI's lambdas for its pretrained qualities 1..8.
MSE_LAMBDAS = {1: 0.0018, 2: 0.0035, 3: 0.0067, 4: 0.0130, 5: 0.0250, 6: 0.0483, 7: 0.0932, 8: 0.1800}
MS_SSIM_LAMBDAS = {1: 2.40, 2: 4.58, 3: 8.73, 4: 16.64, 5: 31.73, 6: 60.50, 7: 115.37, 8: 220.00}
CHECKPOINT_FORMAT = "stdet-train-2"  # 2: STDET's state inside the model's state dict
LR_SCHEDULES = ("constant", "cosine", "step", "plateau")
# Flags that may differ when a run is resumed (the rest must match the checkpoint's configuration).
# The probe batch's crops come from seed + this: no training batch's generator (seed * 1_000_003 + step).
PROBE_SEED_OFFSET = 7919
RESUME_MAY_CHANGE = (
    "steps",
    "out",
    "device",
    "eval_every",
    "eval_live",
    "log_every",
    "checkpoint_every",
    "progress",
)


def resolved_lmbda(metric: str, quality: int, lmbda: float | None = None) -> float:
    """`lmbda` if given, else CompressAI's lambda for `quality` under `metric`."""
    if lmbda is not None:
        return float(lmbda)
    table = MSE_LAMBDAS if metric == "mse" else MS_SSIM_LAMBDAS
    if quality not in table:
        raise ValueError(f"--quality: expected 1..8, got {quality!r}")
    return table[quality]


class TrainingError(Exception):
    """A problem with the user's input or files: the CLI prints it as one line."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the checkpoint was written."""


@dataclass
class TrainConfig:
    """Every setting of a training run; names are the CLI's flags with ``_`` for ``-``."""

    arch: str = "bmshj2018-factorized"
    N: int | None = None
    M: int | None = None
    quality: int = 3
    lmbda: float | None = None  # None: CompressAI's lambda for `quality` and `metric`
    metric: str = "mse"
    method: str = "adam"
    steps: int = 1000
    batch_size: int = 16
    patch_size: int = 256
    lr: float = 1e-4
    # "constant"; "cosine": lr * (1 + cos(pi * step / steps)) / 2; "step": lr * gamma^(milestones
    # passed), the LIC habit of a 10x drop late; "plateau": CompressAI's ReduceLROnPlateau on the eval
    # RD loss (factor lr_gamma, patience lr_patience evaluations).
    lr_schedule: str = "constant"
    lr_milestones: list[float] = field(default_factory=lambda: [0.85])  # < 1: fraction of steps
    lr_gamma: float = 0.1
    lr_patience: int = 10
    aux_lr: float = 1e-3
    clip: float = 1.0  # max gradient norm; 0 turns clipping off
    init: str | None = None  # start from this trained model (any checkpoint `stdet export` reads)
    data: str | None = None  # None: the bundled train photos
    eval_data: str | None = None  # None: the bundled eval photos
    # The probe batch (STDET's plateau test and accelerations, the SMA guard) from this folder of
    # held-out photos instead of training crops. None: training crops no batch uses (left out of
    # run.toml, so older configurations read, and cache, the same).
    probe_data: str | None = None
    eval_every: int = 100  # 0: evaluate only at the end
    # With shadow SMA each evaluation codes the average; True also codes the live weights (the eval
    # records' "live", the summary's "live_curve" and "live_final_eval"), so one run shows both.
    # None: off, left out of run.toml (older configurations read, and cache, the same).
    eval_live: bool | None = None
    log_every: int = 10
    checkpoint_every: int = 100
    out: str = "runs/train"
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    # STDET (method "stdet") and SMA (either method): stdet.STDETConfig's knobs, with its defaults.
    warmup_steps: int = STDETConfig.warmup_steps
    snapshots: int = STDETConfig.snapshots
    modes: int = STDETConfig.modes
    samples: int = STDETConfig.samples
    embed_every: int = STDETConfig.embed_every
    embed_rate: float = STDETConfig.embed_rate
    max_embedded: float = STDETConfig.max_embedded
    protect: float = STDETConfig.protect
    min_r2: float = STDETConfig.min_r2
    safety_window: int = STDETConfig.safety_window
    safety_tolerance: float = STDETConfig.safety_tolerance
    safety_sigmas: float = STDETConfig.safety_sigmas
    # None: STDETConfig's default (left out of run.toml, so older configurations read the same)
    max_drift: float | None = None
    continuity: bool | None = None
    ref_grad: str | None = None
    sensitivity: str | None = None
    release: bool | None = None
    sma_restart: bool | None = None
    start: str | None = None
    plateau_window: int | None = None
    plateau_tolerance: float | None = None
    plateau_sigmas: float | None = None
    accelerate_every: int | None = None
    accelerate_horizon: float | None = None
    accelerate_free_r2: float | None = None
    sma_every: int = STDETConfig.sma_every
    sma_alpha: float = STDETConfig.sma_alpha
    sma_mode: str = STDETConfig.sma_mode
    # None: STDETConfig's default (on) for method "stdet"; off for "adam", whose average is the plain
    # EMA a user tries first (torch's AveragedModel). Left out of run.toml when None.
    sma_guard: bool | None = None
    sma_guard_sigmas: float | None = None  # None: STDETConfig's default. Left out of run.toml when None.

    def __post_init__(self) -> None:
        def positive_int(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(
                    f"--{name.replace('_', '-')}: expected an integer >= {minimum}, got {value!r}"
                )

        def positive_number(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < 0 or (value == 0 and not allow_zero):
                raise ValueError(f"--{name.replace('_', '-')}: expected a positive number, got {value!r}")

        for name in ("steps", "batch_size", "patch_size", "log_every", "checkpoint_every"):
            positive_int(name)
        for name in ("eval_every", "seed", "sma_every", "lr_patience"):
            positive_int(name, 0)
        if self.quality not in MSE_LAMBDAS:
            raise ValueError(f"--quality: expected 1..8, got {self.quality!r}")
        for name in ("N", "M"):
            if getattr(self, name) is not None:
                positive_int(name)
        for name in ("lr", "aux_lr"):
            positive_number(name)
        positive_number("clip", allow_zero=True)
        if self.lmbda is not None:
            positive_number("lmbda")
        if self.metric not in ("mse", "ms-ssim"):
            raise ValueError(f"--metric: expected 'mse' or 'ms-ssim', got {self.metric!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"--lr-schedule: expected one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"
            )
        milestones_ok = isinstance(self.lr_milestones, list) and all(
            isinstance(m, (int, float)) and not isinstance(m, bool) and m > 0 and (m < 1 or m == int(m))
            for m in self.lr_milestones
        )
        if not milestones_ok:
            raise ValueError(
                "--lr-milestones: expected fractions of the steps in (0, 1) or step numbers >= 1, "
                f"got {self.lr_milestones!r}"
            )
        gamma = self.lr_gamma
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
            raise ValueError(f"--lr-gamma: expected a number in (0, 1], got {gamma!r}")
        if self.method not in ("adam", "stdet"):
            raise ValueError(f"--method: expected 'adam' or 'stdet', got {self.method!r}")
        if self.metric == "ms-ssim" and self.patch_size <= 160:
            raise ValueError(
                f"--patch-size: MS-SSIM needs crops larger than 160 pixels, got {self.patch_size}"
            )
        self.stdet_config()  # validates the STDET/SMA knobs, naming the flag

    def resolved_lmbda(self) -> float:
        return resolved_lmbda(self.metric, self.quality, self.lmbda)

    def stdet_config(self) -> STDETConfig:
        knobs = ("warmup_steps", "snapshots", "modes", "samples", "embed_every", "embed_rate")
        knobs += ("max_embedded", "protect", "min_r2", "safety_window", "safety_tolerance", "safety_sigmas")
        knobs += ("sma_every", "sma_alpha", "sma_mode")
        values = {name: getattr(self, name) for name in knobs}
        optional = ("max_drift", "continuity", "ref_grad", "sensitivity", "release", "sma_restart")
        optional += ("sma_guard", "sma_guard_sigmas")
        optional += ("accelerate_every", "accelerate_horizon", "accelerate_free_r2")
        optional += ("start", "plateau_window", "plateau_tolerance", "plateau_sigmas")
        values.update({name: getattr(self, name) for name in optional})
        values = {name: value for name, value in values.items() if value is not None}
        try:
            return STDETConfig(**values, seed=self.seed)
        except ValueError as error:
            name, _, rest = str(error).partition(":")
            raise ValueError(f"--{name.replace('_', '-')}:{rest}") from None

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """From a dict such as a parsed TOML file; keys may use ``-`` or ``_``; unknown keys are errors."""
        known = {f.name for f in fields(cls)}
        clean = {key.replace("-", "_"): value for key, value in values.items()}
        unknown = sorted(set(clean) - known)
        if unknown:
            raise ValueError(f"config: unknown setting(s) {', '.join(unknown)}")
        return cls(**clean)

    def to_toml(self) -> str:
        """The configuration as TOML (unset optional settings are left out)."""
        lines = ["# stdet train: the resolved configuration of this run (usable as --config)"]
        for key, value in asdict(self).items():
            if value is None:
                continue
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, list):
                text = json.dumps(value)  # a JSON list of numbers is a valid TOML array
            elif isinstance(value, (int, float)):
                text = repr(value)
            else:
                text = json.dumps(str(value))  # a JSON string is a valid TOML basic string
            lines.append(f"{key} = {text}")
        return "\n".join(lines) + "\n"


def _probe_images(config: TrainConfig) -> dict[str, torch.Tensor]:
    """The --probe-data photos (at least a crop's size), the error naming the flag."""
    try:
        return load_folder(config.probe_data, config.patch_size).images
    except (FileNotFoundError, ValueError) as error:
        raise type(error)(f"--probe-data: {error}") from None


def milestone_steps(config: TrainConfig) -> list[int]:
    """The steps after which the "step" schedule multiplies the learning rate by ``lr_gamma``."""
    return [round(m * config.steps) if m < 1 else int(m) for m in config.lr_milestones]


def learning_rate(config: TrainConfig, step: int, eval_losses: list | tuple = ()) -> float:
    """The network's learning rate for the step after `step` steps: a function of the step (and, for
    "plateau", of the eval RD losses ``[(step, loss), ...]`` logged up to it), so a resumed run
    follows the same schedule."""
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * step / config.steps))
    if config.lr_schedule == "step":
        return config.lr * config.lr_gamma ** sum(1 for m in milestone_steps(config) if m <= step)
    if config.lr_schedule == "plateau" and config.lr_gamma < 1:
        losses = tuple(loss for at, loss in eval_losses if at <= step)
        return _plateau_lr(config.lr, config.lr_gamma, config.lr_patience, losses)
    return config.lr


@functools.lru_cache(maxsize=8)
def _plateau_lr(lr: float, factor: float, patience: int, losses: tuple[float, ...]) -> float:
    """CompressAI's schedule (torch's ReduceLROnPlateau, mode "min") replayed over the eval losses."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "min", factor=factor, patience=patience)
    for loss in losses:
        scheduler.step(loss)
    return optimizer.param_groups[0]["lr"]


def build_model(arch: str, N: int | None = None, M: int | None = None, quality: int = 3) -> nn.Module:
    """A CompressAI zoo architecture, untrained, with the zoo's channel counts for `quality` unless
    `N`, `M` are given."""
    from compressai.zoo.image import cfgs, model_architectures

    if arch not in model_architectures:
        raise ValueError(
            f"--arch: unknown architecture {arch!r}; choose from {', '.join(model_architectures)}"
        )
    channels = list(cfgs[arch][quality] if quality in cfgs[arch] else cfgs[arch][max(cfgs[arch])])
    if N is not None:
        channels[0] = N
    if M is not None:
        if len(channels) < 2:
            raise ValueError(f"--M: {arch} has a single channel count (N)")
        channels[1] = M
    return model_architectures[arch](*channels)


def load_model(arch: str, state_dict: dict) -> nn.Module:
    """A CompressAI model of `arch` holding `state_dict` (its channel counts read from it)."""
    from compressai.zoo.image import model_architectures

    if arch not in model_architectures:
        raise ValueError(
            f"--arch: unknown architecture {arch!r}; choose from {', '.join(model_architectures)}"
        )
    try:
        return model_architectures[arch].from_state_dict(state_dict)
    except (KeyError, RuntimeError, AttributeError, IndexError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrainingError(f"checkpoint: does not fit {arch} ({first[:200]})") from None


def initial_model(config: TrainConfig) -> nn.Module:
    """The model of ``--init``: its architecture's CompressAI model holding the checkpoint's weights
    (channel counts read from them; ``--N``/``--M`` must agree where given)."""
    from .export import ExportError, read_plain_state_dict

    try:
        plain, _ = read_plain_state_dict(config.init)
    except ExportError as error:
        raise TrainingError(f"--init: {error}") from None
    try:
        model = load_model(config.arch, plain)
    except TrainingError as error:
        raise TrainingError(f"--init: {str(error).removeprefix('checkpoint: ')}") from None
    for name in ("N", "M"):
        wanted, held = getattr(config, name), getattr(model, name, None)
        if wanted is not None and held is not None and wanted != held:
            raise TrainingError(f"--init: the checkpoint's model has {name}={held}, but --{name} is {wanted}")
    return model


# The entropy models' CDF tables: their size follows the weights at the last ``update()``.
ENTROPY_TABLES = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")


def _fit_entropy_tables(model: nn.Module, state_dict: dict) -> None:
    """Resize `model`'s CDF tables to `state_dict`'s: CompressAI's own ``update_registered_buffers``
    with the "resize" policy. Its ``load_state_dict`` resizes only empty ones, so a fine-tuning run
    (``--init``: tables filled by the starting model) could not resume from a checkpoint whose tables
    an evaluation had resized."""
    from compressai.entropy_models import EntropyModel
    from compressai.models.utils import update_registered_buffers

    for name, module in model.named_modules():
        if isinstance(module, EntropyModel):
            saved = [t for t, _ in module.named_buffers(recurse=False) if f"{name}.{t}" in state_dict]
            tables = [t for t in saved if t in ENTROPY_TABLES]
            update_registered_buffers(module, name, tables, state_dict, policy="resize")


def _atomic_save(obj: object, path: Path) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over `path`: a
    reader (or a crash) sees the old file or the new one, never half of one."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _atomic_write_text(text: str, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def load_checkpoint(path: str | Path) -> dict:
    file = Path(path)
    if file.is_dir():
        file = file / "last.ckpt"
    if not file.is_file():
        raise TrainingError(f"--resume: no checkpoint at {file}")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file: say which, in one line
        raise TrainingError(
            f"--resume: {file} is not a readable checkpoint ({type(error).__name__})"
        ) from None
    saved_format = checkpoint.get("format") if isinstance(checkpoint, dict) else None
    if (
        isinstance(saved_format, str)
        and saved_format.startswith("stdet-train")
        and saved_format != CHECKPOINT_FORMAT
    ):
        raise TrainingError(
            f"--resume: {file} was written by an older stdet ({saved_format}), which this one cannot resume"
        )
    if saved_format != CHECKPOINT_FORMAT:
        raise TrainingError(f"--resume: {file} is not a stdet training checkpoint")
    return checkpoint


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


class _Distributed:
    """Rank and world size under torchrun, or a single process."""

    def __init__(self, device: str) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.started_here = False
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            dist.init_process_group(backend)
            self.started_here = True

    @property
    def active(self) -> bool:
        return self.world > 1

    def mean(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        nccl = self.dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        self.dist.all_reduce(tensor)
        return (tensor / self.world).cpu().tolist()

    def broadcast(self, value: object) -> object:
        """Rank 0's `value` on every rank (`value` itself without torchrun)."""
        if not self.active:
            return value
        shared = [value]
        self.dist.broadcast_object_list(shared, src=0)
        return shared[0]

    def gather(self, value: object) -> list:
        """`value` of every rank, in rank order (a list of one without torchrun)."""
        if not self.active:
            return [value]
        gathered: list = [None] * self.world
        self.dist.all_gather_object(gathered, value)
        return gathered

    def close(self) -> None:
        if self.started_here:
            self.dist.destroy_process_group()


class Trainer:
    """One training run; `run()` trains to `config.steps` and returns the summary."""

    def __init__(self, config: TrainConfig, resume: dict | None = None) -> None:
        self.config = config
        self.out = Path(config.out)
        self.distributed = _Distributed(config.device)
        self.rank, self.world = self.distributed.rank, self.distributed.world
        self.device = self._device(config.device)
        if config.batch_size % self.world:
            raise ValueError(
                f"--batch-size: {config.batch_size} is not divisible by the {self.world} processes"
            )
        self.lmbda = config.resolved_lmbda()

        train_images = (
            bundled_images("train")
            if config.data is None
            else load_folder(config.data, config.patch_size).images
        )
        self.crops = RandomCrops(train_images, config.patch_size, config.seed)
        self.eval_images = (
            bundled_images("eval") if config.eval_data is None else load_folder(config.eval_data).images
        )

        torch.manual_seed(config.seed)
        if config.init is None:
            self.model = build_model(config.arch, config.N, config.M, config.quality).to(self.device)
        else:
            self.model = initial_model(config).to(self.device)
        if self.rank > 0:
            # Same initialisation on every rank, but each rank its own stream of quantisation noise
            # (CompressAI draws it from the global generator); rank 0 keeps the single-process stream.
            torch.manual_seed(config.seed + 1_000_003 * self.rank)
        net = [p for n, p in self.model.named_parameters() if not n.endswith(".quantiles")]
        aux = [p for n, p in self.model.named_parameters() if n.endswith(".quantiles")]
        self.optimizer = torch.optim.Adam(net, lr=config.lr)
        self.aux_optimizer = torch.optim.Adam(aux, lr=config.aux_lr) if aux else None
        self.stdet: STDET | None = None
        self.sma: SMA | None = None
        # A batch of training crops of its own (a generator no training batch uses; with --probe-data,
        # crops of those held-out photos), drawn once: the probe of STDET's plateau test and
        # accelerations, and of the SMA guard (recorded at every evaluation with a shadow average,
        # the guard on or not).
        self.probe_batch: torch.Tensor | None = None
        shadow = config.sma_every > 0 and config.sma_mode == "shadow"
        stdet_config = config.stdet_config() if config.method == "stdet" else None
        probing = stdet_config is not None and bool(
            stdet_config.accelerate_every or stdet_config.start == "plateau"
        )
        if probing or shadow:
            probe_images = train_images if config.probe_data is None else _probe_images(config)
            probe_crops = RandomCrops(probe_images, config.patch_size, config.seed + PROBE_SEED_OFFSET)
            self.probe_batch = probe_crops.batch(0, config.batch_size).to(self.device)
        if stdet_config is not None:
            probe = self.probe_loss if probing else None
            self.stdet = STDET(self.model, self.optimizer, stdet_config, probe=probe)
            self.sma = self.stdet.sma
            self.sma_guard = stdet_config.sma_guard
        else:
            if config.sma_every:
                self.sma = SMA(self.model, config.sma_every, config.sma_alpha, config.sma_mode)
            self.sma_guard = bool(config.sma_guard)
        self.sma_guard_sigmas = (stdet_config or config.stdet_config()).sma_guard_sigmas
        # Whether the last evaluation (and so the exported model) used the average or the live weights.
        self.handed_out = "average"

        self.step = 0
        self.wall_s = 0.0
        self.curve: list[list[float]] = []
        self.final_eval: dict | None = None
        self.live_curve: list[list[float]] = []
        self.live_final_eval: dict | None = None
        if resume is not None:
            self._restore(resume)
        self._ddp = None
        self._ddp_shapes: tuple | None = None
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------------------------------

    def _device(self, name: str) -> torch.device:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device: not a device name: {name!r}") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"--device: {name} requested but no CUDA device is available")
            if self.world > 1:
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(device)
        elif device.type != "cpu":
            raise ValueError(f"--device: expected cpu or cuda, got {name!r}")
        return device

    def _restore(self, checkpoint: dict) -> None:
        """Continue from `checkpoint`. STDET's state is in the model's state dict: loading it
        re-attaches the model first, so the optimizer's state dict fits."""
        if self.stdet is None and self.sma is not None and checkpoint.get("sma") is not None:
            self.sma.load_state_dict(checkpoint["sma"])
        _fit_entropy_tables(self.model, checkpoint["model"])
        try:
            self.model.load_state_dict(checkpoint["model"])
        except (RuntimeError, ValueError) as error:
            raise TrainingError(
                f"--resume: the checkpoint does not fit the model ({str(error)[:200]})"
            ) from None
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.aux_optimizer is not None:
            self.aux_optimizer.load_state_dict(checkpoint["aux_optimizer"])
        saved = checkpoint["rng"]
        if len(saved) != self.world:
            raise TrainingError(
                f"--resume: the checkpoint was written by {len(saved)} process(es), this run has {self.world}"
            )
        torch.set_rng_state(saved[self.rank]["torch"])
        if torch.cuda.is_available() and saved[self.rank].get("cuda"):
            torch.cuda.set_rng_state_all(saved[self.rank]["cuda"])
        self.step = checkpoint["step"]
        self.wall_s = checkpoint["wall_s"]
        self.curve = [list(point) for point in checkpoint["curve"]]
        self.final_eval = checkpoint.get("final_eval")
        self.live_curve = [list(point) for point in checkpoint.get("live_curve", [])]
        self.live_final_eval = checkpoint.get("live_final_eval")
        self.handed_out = checkpoint.get("handed_out", "average")

    def checkpoint(self) -> None:
        """Rank 0 writes; every rank must call it (their generators' states are gathered)."""
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        rng_of_ranks = self.distributed.gather(rng)
        if self.rank != 0:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(self.config),
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "aux_optimizer": None if self.aux_optimizer is None else self.aux_optimizer.state_dict(),
            "sma": None if self.sma is None or self.stdet is not None else self.sma.state_dict(),
            "rng": rng_of_ranks,
            "wall_s": self.wall_s,
            "curve": self.curve,
            "final_eval": self.final_eval,
            "live_curve": self.live_curve,
            "live_final_eval": self.live_final_eval,
            "handed_out": self.handed_out,
        }
        _atomic_save(state, self.out / "last.ckpt")

    # ------------------------------------------------------------------------------------------

    def _forward_model(self) -> nn.Module:
        """The model to call for the forward pass: itself, or a DistributedDataParallel wrapper that is
        rebuilt whenever STDET changes the parameters' shapes (the FREE set shrinks at each round)."""
        if not self.distributed.active:
            return self.model
        shapes = tuple((id(p), tuple(p.shape)) for p in self.model.parameters())
        if shapes != self._ddp_shapes:
            from torch.nn.parallel import DistributedDataParallel

            ignored = [n for n, _ in self.model.named_parameters() if n.endswith(".quantiles")]
            # The aux loss does not depend on the data, so the quantiles' gradients are the same on
            # every rank without a reduction; DDP leaves them alone.
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, ignored)
            self._ddp = None
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(self.model, device_ids=device_ids, broadcast_buffers=False)
            self._ddp_shapes = shapes
        return self._ddp

    def _losses(self, out: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = x.shape[0] * x.shape[2] * x.shape[3]
        bpp = sum(torch.log(p).sum() for p in out["likelihoods"].values()) / (-math.log(2) * pixels)
        mse = F.mse_loss(out["x_hat"], x)
        if self.config.metric == "mse":
            distortion = self.lmbda * 255.0**2 * mse
        else:
            from pytorch_msssim import ms_ssim

            distortion = self.lmbda * (1.0 - ms_ssim(out["x_hat"], x, data_range=1.0))
        return distortion + bpp, mse, bpp

    def train_step(self) -> dict[str, float]:
        batch = self.crops.batch(self.step, self.config.batch_size)
        x = batch[self.rank :: self.world].to(self.device)
        net = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.optimizer.zero_grad(set_to_none=True)
        if self.aux_optimizer is not None:
            self.aux_optimizer.zero_grad(set_to_none=True)
        for group in self.optimizer.param_groups:  # STDET's refs group included
            group["lr"] = self.learning_rate(self.step)
        out = self._forward_model()(x)
        loss, mse, bpp = self._losses(out, x)
        if not torch.isfinite(loss.detach()):
            raise TrainingError(
                f"step {self.step + 1}: the loss is {float(loss.detach())} (diverged; try a smaller --lr)"
            )
        loss.backward()
        if self.config.clip > 0:
            nn.utils.clip_grad_norm_(net, self.config.clip)
        self.optimizer.step()
        aux_loss = torch.zeros(())
        if self.aux_optimizer is not None:
            aux_loss = self.model.aux_loss()
            aux_loss.backward()
            self.aux_optimizer.step()
        self.step += 1
        if self.stdet is not None:
            self.stdet.step(loss)  # averages the loss over ranks itself
        elif self.sma is not None:
            self.sma.step()
        stop = 1.0 if self._stop_signal is not None else 0.0
        loss_v, mse_v, bpp_v, aux_v, stop = self.distributed.mean(
            [float(loss.detach()), float(mse.detach()), float(bpp.detach()), float(aux_loss.detach()), stop]
        )
        if stop > 0 and self._stop_signal is None:
            self._stop_signal = signal.SIGTERM  # another rank was told to stop
        return {"loss": loss_v, "mse": mse_v, "bpp": bpp_v, "psnr": psnr(mse_v), "aux_loss": aux_v}

    def probe_loss(self) -> float:
        """The RD loss of the fixed probe batch, deterministic: the model in eval mode (CompressAI
        rounds the latents there instead of adding uniform noise, and draws no random number), put
        back in its mode afterwards. STDET's accelerations are judged by it."""
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                loss, _, _ = self._losses(self.model(self.probe_batch), self.probe_batch)
        finally:
            self.model.train(training)
        return float(loss)

    def probe_losses(self, crops: torch.Tensor | None = None, chunk: int = 32) -> torch.Tensor:
        """Each crop's RD loss (the loss of `probe_loss`, whose batch mean it is up to rounding), in
        eval mode, `chunk` crops per forward; `crops` default to the probe batch. The SMA guard's
        paired test compares them crop by crop."""
        crops = self.probe_batch if crops is None else crops
        training = self.model.training
        self.model.eval()
        losses = []
        try:
            with torch.no_grad():
                for x in crops.split(chunk):
                    out = self.model(x)
                    bits = sum(torch.log(p).flatten(1).sum(1) for p in out["likelihoods"].values())
                    bpp = bits / (-math.log(2) * x.shape[2] * x.shape[3])
                    if self.config.metric == "mse":
                        distortion = self.lmbda * 255.0**2 * (out["x_hat"] - x).pow(2).flatten(1).mean(1)
                    else:
                        from pytorch_msssim import ms_ssim

                        similarity = ms_ssim(out["x_hat"], x, data_range=1.0, size_average=False)
                        distortion = self.lmbda * (1.0 - similarity)
                    losses.append((distortion + bpp).cpu())
        finally:
            self.model.train(training)
        return torch.cat(losses)

    def learning_rate(self, step: int) -> float:
        """The network's learning rate for the step after `step` steps (`learning_rate`)."""
        return learning_rate(self.config, step, self.curve)

    def trainable_fraction(self) -> float:
        return 1.0 if self.stdet is None else self.stdet.trainable_fraction()

    def averaging(self) -> bool:
        """Whether `evaluate` codes an average: SMA in shadow mode with at least one sample."""
        return self.sma is not None and self.sma.mode == "shadow" and bool(self.sma.samples)

    def evaluate(self) -> dict:
        """Eval images coded for real; with shadow SMA, with the averaged weights."""
        if self.averaging():
            with self.sma.swap(update_entropy_models=True):
                return evaluate(self.model, self.eval_images, self.config.metric, self.lmbda, update=False)
        return self.evaluate_live()

    def evaluate_live(self) -> dict:
        """Eval images coded for real with the live weights (the CDF tables refreshed for them)."""
        return evaluate(self.model, self.eval_images, self.config.metric, self.lmbda)

    # ------------------------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with (self.out / "log.jsonl").open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def _prepare_out(self, resumed: bool) -> None:
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.config.to_toml(), self.out / "config.toml")
        log = self.out / "log.jsonl"
        if resumed and log.exists():
            # Records past the checkpoint were made by the interrupted run and will be made again.
            kept = [
                line
                for line in log.read_text().splitlines()
                if line and json.loads(line)["step"] <= self.step
            ]
            _atomic_write_text("".join(line + "\n" for line in kept), log)
        elif log.exists():
            log.unlink()

    def _on_signal(self, signum: int, _frame) -> None:
        self._stop_signal = signum

    def run(self, resumed: bool = False) -> dict:
        from tqdm import tqdm

        config = self.config
        self._prepare_out(resumed)
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(
            total=config.steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=(self.rank != 0) or not config.progress,
        )
        started = time.perf_counter()
        last_time, last_step = started, self.step
        try:
            while self.step < config.steps:
                metrics = self.train_step()
                now = time.perf_counter()
                bar.update(1)
                if self.step % config.log_every == 0 or self.step == config.steps:
                    rate = (self.step - last_step) / max(now - last_time, 1e-9)
                    last_time, last_step = now, self.step
                    fraction = self.trainable_fraction()
                    record = {"type": "train", "step": self.step, **metrics, "trainable_fraction": fraction}
                    record["lr"] = self.learning_rate(self.step - 1)
                    record["steps_per_s"] = rate
                    self._log(record)
                    bar.set_postfix(
                        loss=f"{metrics['loss']:.3f}",
                        bpp=f"{metrics['bpp']:.3f}",
                        psnr=f"{metrics['psnr']:.2f}",
                        trainable=f"{fraction:.0%}",
                    )
                due = config.eval_every and self.step % config.eval_every == 0
                if due or self.step == config.steps:
                    if self.rank == 0:
                        self._evaluate_and_log()
                    self.curve = self.distributed.broadcast(self.curve)  # the plateau schedule reads it
                self.wall_s += time.perf_counter() - started
                started = time.perf_counter()
                if self._stop_signal is not None:
                    self.checkpoint()
                    raise Interrupted(
                        f"stopped by {signal.Signals(self._stop_signal).name} at step {self.step}; "
                        f"checkpoint written to {self.out / 'last.ckpt'} (continue with --resume)"
                    )
                if self.step % config.checkpoint_every == 0 or self.step == config.steps:
                    self.checkpoint()
        finally:
            bar.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        summary = self._finish()
        self.distributed.close()
        return summary

    def _evaluate_and_log(self) -> None:
        averaged = self.averaging()
        probes = None
        if averaged and self.probe_batch is not None:
            live_probe, average_probe = self.sma.probe_both(self.probe_losses)
            difference, se = paired_difference(live_probe, average_probe)
            probes = {
                "live": float(live_probe.double().mean()),
                "average": float(average_probe.double().mean()),
                "difference": difference,
                "se": se,
            }
            better = average_is_better(live_probe, average_probe, self.sma_guard_sigmas)
            averaged = better or not self.sma_guard
        self.handed_out = "average" if averaged else "live"
        mean = self.evaluate()["mean"] if averaged else self.evaluate_live()["mean"]
        self.final_eval = {key: mean[key] for key in ("bpp", "psnr", "rd_loss")}
        if not self.curve or self.curve[-1][0] != self.step:
            self.curve.append([self.step, mean["rd_loss"]])
        record = {"type": "eval", "step": self.step, **mean}
        if probes is not None:
            record["probe"], record["weights"] = probes, self.handed_out
        if self.config.eval_live:
            live = self.evaluate_live()["mean"] if averaged else mean
            self.live_final_eval = {key: live[key] for key in ("bpp", "psnr", "rd_loss")}
            if not self.live_curve or self.live_curve[-1][0] != self.step:
                self.live_curve.append([self.step, live["rd_loss"]])
            record["live"] = live
        self._log(record)

    def _finish(self) -> dict:
        summary = {
            "method": self.config.method,
            "steps": self.step,
            "final_eval": self.final_eval,
            "curve": self.curve,
            "trainable_fraction_end": self.trainable_fraction(),
            "wall_s": self.wall_s,
            "peak_rss_mb": peak_rss_mb(),
        }
        if self.averaging():
            summary["final_weights"] = self.handed_out  # "average", or "live" where the guard said so
        if self.config.eval_live:
            summary["live_final_eval"] = self.live_final_eval
            summary["live_curve"] = self.live_curve
        if self.rank == 0:
            sma = self.sma if self.handed_out == "average" else None
            torch.save(export_state_dict(self.model, sma), self.out / "model.pth")
            _atomic_write_text(json.dumps(summary, indent=2) + "\n", self.out / "summary.json")
        return summary


def train(config: TrainConfig, resume: str | Path | None = None) -> dict:
    """Run (or continue, from the checkpoint at `resume`) a training run; return its summary."""
    checkpoint = load_checkpoint(resume) if resume is not None else None
    if checkpoint is not None:
        saved = TrainConfig(**checkpoint["config"])
        changed = {
            key: value
            for key, value in asdict(config).items()
            if key not in RESUME_MAY_CHANGE and value != getattr(saved, key)
        }
        if changed:
            key = sorted(changed)[0]
            raise TrainingError(
                f"--resume: --{key.replace('_', '-')} is {changed[key]!r} here but "
                f"{getattr(saved, key)!r} in the checkpoint (only {', '.join(RESUME_MAY_CHANGE)} may change)"
            )
    trainer = Trainer(config, checkpoint)
    return trainer.run(resumed=checkpoint is not None)
