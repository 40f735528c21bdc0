"""`stdet export`: any checkpoint a training loop with STDET in it wrote, as a plain CompressAI one.

Reads the three kinds of file our users have and writes ``{"state_dict": plain}`` with CompressAI's key
names, which ``compressai.utils.eval_model checkpoint`` and ``compressai.utils.update_model`` load in a
process that never imports stdet:

- a `stdet train` checkpoint (``last.ckpt``: the model's state dict under ``"model"``, and the SMA's
  under ``"sma"`` when SMA ran on its own);
- a CompressAI-style dict (``{"state_dict": ..., "optimizer": ...}``, as ``examples/train.py`` saves;
  ``"network"`` and ``"model_state_dict"`` are read too), written by a loop with `stdet.STDET` in it;
- a bare state dict (``net.state_dict()`` saved as is), plain or with STDET on it.

STDET's state (and so its SMA averages) travels in the model's state dict (``stdet._extra_state``). By
default the averages are exported where there are any (SMA in shadow mode keeps the better weights
there); ``raw`` exports the live weights.
"""

import os
from pathlib import Path

import torch

from .parametrize import STATE_KEY, plain_state_dict
from .train import CHECKPOINT_FORMAT, TrainingError, load_model

# Where CompressAI's own tools look for the state dict in a checkpoint dict (eval_model, update_model).
STATE_DICT_KEYS = ("state_dict", "network", "model_state_dict")


class ExportError(Exception):
    """The file is missing, unreadable, or not a model checkpoint: one line for the user."""


def _state_dict_in(checkpoint: object) -> tuple[dict, dict | None, str | None]:
    """(state dict, standalone SMA state or None, architecture or None) of a loaded checkpoint."""
    if not isinstance(checkpoint, dict):
        raise ExportError(f"holds a {type(checkpoint).__name__}, not a checkpoint dict")
    if checkpoint.get("format") == CHECKPOINT_FORMAT:
        return checkpoint["model"], checkpoint.get("sma"), checkpoint["config"].get("arch")
    if isinstance(checkpoint.get("format"), str) and checkpoint["format"].startswith("stdet-train"):
        raise ExportError(
            f"was written by an older stdet ({checkpoint['format']}); export it with that version"
        )
    for key in STATE_DICT_KEYS:
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key], None, None
    return checkpoint, None, None


def read_plain_state_dict(path: str | Path, raw: bool = False) -> tuple[dict[str, torch.Tensor], str | None]:
    """(plain CompressAI state dict, architecture if the file names one) of the checkpoint at `path`."""
    file = Path(path)
    if not file.is_file():
        raise ExportError(f"{file} does not exist")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # a foreign or truncated file: say so in one line
        raise ExportError(f"{file}: not a readable PyTorch checkpoint ({type(error).__name__})") from None
    try:
        state_dict, sma, arch = _state_dict_in(checkpoint)
    except ExportError as error:
        raise ExportError(f"{file}: {error}") from None
    tensors = [key for key, value in state_dict.items() if isinstance(value, torch.Tensor)]
    if not tensors or not all(isinstance(key, str) for key in state_dict):
        raise ExportError(f"{file}: holds no model state dict (no tensors under string keys)")
    if sma is None and isinstance(state_dict.get(STATE_KEY), dict):
        sma = state_dict[STATE_KEY].get("sma")
    averages = None if raw or sma is None else sma.get("averages")
    try:
        return plain_state_dict(state_dict, averages), arch
    except (ValueError, RuntimeError) as error:
        raise ExportError(f"{file}: {str(error).splitlines()[0]}") from None


def check_architecture(plain: dict[str, torch.Tensor], arch: str) -> None:
    """Raise `ExportError` unless CompressAI's `arch` loads `plain` (as eval_model does)."""
    try:
        load_model(arch, plain)
    except (TrainingError, ValueError) as error:
        raise ExportError(str(error)) from None


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, raw: bool = False, arch: str | None = None
) -> dict[str, torch.Tensor]:
    """Write ``{"state_dict": plain}`` for the checkpoint at `checkpoint` to `out` and return `plain`.

    The SMA averages are exported where the checkpoint has them, the live weights with `raw`. With
    `arch` (or a `stdet train` checkpoint, which names its own) the result is checked to load into that
    CompressAI architecture.
    """
    plain, saved_arch = read_plain_state_dict(checkpoint, raw)
    if arch or saved_arch:
        check_architecture(plain, arch or saved_arch)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    torch.save({"state_dict": plain}, temporary)
    os.replace(temporary, target)
    return plain
