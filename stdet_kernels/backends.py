"""Which implementation runs an op: discovery, default order, forcing one, and telling which ran.

Four backends implement the same functions (`reconstruct`, `reconstruct_sma_`,
`reconstruct_backward`, `lerp_`, their compact-layout versions) on contiguous, validated tensors
(`refit_update_`, the online refit's moments, only ``cpp`` and ``torch``: on a GPU the reference's
element-wise torch ops are what a kernel would be):

- ``cuda``: the CUDA extension (stdet_kernels._C_cuda), CUDA tensors;
- ``triton``: Triton kernels, CUDA tensors, or CPU tensors under TRITON_INTERPRET=1;
- ``cpp``: the C++ CPU extension (stdet_kernels._C), CPU tensors (its compact-layout kernels take
  AVX2 paths where the CPU has AVX2, with the same bits; ``_C.set_simd(False)`` switches them off);
- ``torch``: the pure-PyTorch reference, any device.

Default order: cuda, then triton (on GPU), then cpp, then torch. A missing extension never breaks the
import: the dispatcher falls back and warns once.
"""

import contextlib
import importlib
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

from . import reference

log = logging.getLogger("stdet_kernels")

BACKENDS = ("cuda", "triton", "cpp", "torch")

_import_errors: dict[str, str] = {}
_modules: dict[str, ModuleType | None] = {}
_state = threading.local()
_warned_fallback: set[str] = set()


def _load(name: str) -> ModuleType | None:
    """The module implementing a backend, or None (with the reason kept) if it cannot load."""
    if name in _modules:
        return _modules[name]
    module_name = {
        "cuda": "stdet_kernels._C_cuda",
        "triton": "stdet_kernels.triton_backend",
        "cpp": "stdet_kernels._C",
    }.get(name)
    module: ModuleType | None = reference
    if module_name is not None:
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # an ImportError, or a broken build raising anything else
            module = None
            _import_errors[name] = f"{type(error).__name__}: {error}"
            log.debug("stdet_kernels: backend %r unavailable: %s", name, error)
    _modules[name] = module
    return module


def _triton_runs_on_cpu() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(name: str, device: torch.device) -> bool:
    """Whether backend `name` is loadable and can run on `device`."""
    if name == "torch":
        return True
    if name == "cpp":
        return device.type == "cpu" and _load("cpp") is not None
    if name == "cuda":
        return device.type == "cuda" and _load("cuda") is not None
    if name == "triton":
        on_gpu = device.type == "cuda"
        return (on_gpu or (device.type == "cpu" and _triton_runs_on_cpu())) and (_load("triton") is not None)
    raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")


def available_backends() -> list[str]:
    """Backends that can run in this process, in default order.

    ``cuda`` needs the CUDA extension and a GPU; ``triton`` needs Triton and a GPU (or the
    interpreter); ``cpp`` needs the C++ extension; ``torch`` is always there.
    """
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return [name for name in BACKENDS if any(supports(name, d) for d in devices)]


def unavailable_reasons() -> dict[str, str]:
    """Why each compiled or Triton backend failed to load (empty when all loaded)."""
    for name in ("cuda", "triton", "cpp"):
        _load(name)
    return dict(_import_errors)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every op in this thread to run on backend `name` (one of BACKENDS) inside the block."""
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    previous = getattr(_state, "forced", None)
    _state.forced = name
    try:
        yield
    finally:
        _state.forced = previous


@contextlib.contextmanager
def record_calls() -> Iterator[list[tuple[str, str]]]:
    """Inside the block, every kernel dispatched in this thread is appended to the yielded list as
    (op, backend): a way to count passes over memory without timing anything."""
    calls: list[tuple[str, str]] = []
    previous = getattr(_state, "calls", None)
    _state.calls = calls
    try:
        yield calls
    finally:
        _state.calls = previous


def last_backend() -> str | None:
    """The backend that ran the most recent op in this thread (None before the first)."""
    return getattr(_state, "last", None)


def _implements(name: str, op: str) -> bool:
    module = _load(name)
    return module is not None and hasattr(module, op)


def select(device: torch.device, op: str) -> Callable:
    """The kernel of `op` for `device`: the forced backend's, else that of the first backend in
    default order that implements it."""
    forced = getattr(_state, "forced", None)
    if forced is not None:
        if not supports(forced, device):
            reason = _import_errors.get(forced, f"it does not run on {device.type} tensors")
            raise RuntimeError(f"use_backend({forced!r}): backend unavailable here: {reason}")
        if not _implements(forced, op):
            raise RuntimeError(f"use_backend({forced!r}): backend has no {op!r} kernel")
        chosen = forced
    else:
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpp", "torch")
        chosen = next(name for name in order if supports(name, device) and _implements(name, op))
        preferred = order[0]
        if chosen != preferred and not supports(preferred, device) and preferred not in _warned_fallback:
            _warned_fallback.add(preferred)
            warnings.warn(
                f"stdet_kernels: the {preferred!r} backend is unavailable "
                f"({_import_errors.get(preferred, 'not built')}); using {chosen!r}",
                RuntimeWarning,
                stacklevel=3,
            )
    _state.last = chosen
    calls = getattr(_state, "calls", None)
    if calls is not None:
        calls.append((op, chosen))
    log.debug("stdet_kernels: running %s on backend %r", op, chosen)
    return getattr(_load(chosen), op)
