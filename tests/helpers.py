"""Inputs and comparisons shared by the op tests, and the loading of the bench scripts they test."""

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from stdet_kernels import DUMMY, FREE, reference

MIXES = ("mixed", "all_free", "all_embedded", "all_dummy")
BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench_script(name: str) -> ModuleType:
    """bench/`name`.py as a module (bench/ is no package: its scripts run as ``python bench/x.py``)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Inputs:
    value: torch.Tensor
    code: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    refs: torch.Tensor

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return self.value, self.code, self.a, self.b, self.refs

    def to(self, dtype: torch.dtype) -> "Inputs":
        return Inputs(
            self.value.to(dtype), self.code, self.a.to(dtype), self.b.to(dtype), self.refs.to(dtype)
        )


def make_codes(n: int, num_modes: int, mix: str, generator: torch.Generator) -> torch.Tensor:
    """Codes for n elements: 'mixed' is about 50% FREE, 10% DUMMY and 40% spread over the modes;
    'mostly_free' 95% FREE and 'mostly_embedded' 5% (the rest as in 'mixed': a fifth DUMMY)."""
    if mix == "all_free":
        return torch.full((n,), FREE, dtype=torch.uint8)
    if mix == "all_dummy":
        return torch.full((n,), DUMMY, dtype=torch.uint8)
    modes = torch.randint(0, num_modes, (n,), generator=generator).to(torch.uint8)
    if mix == "all_embedded":
        return modes
    free = {"mixed": 0.5, "mostly_free": 0.95, "mostly_embedded": 0.05}.get(mix)
    if free is None:
        raise ValueError(f"mix: unknown {mix!r}")
    draw = torch.rand(n, generator=generator)
    dummy = free + 0.2 * (1.0 - free)
    return torch.where(draw < free, FREE, torch.where(draw < dummy, DUMMY, modes)).to(torch.uint8)


def make_inputs(
    n: int, num_modes: int, mix: str, dtype: torch.dtype = torch.float32, seed: int = 0
) -> Inputs:
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    code = make_codes(n, num_modes, mix, generator)
    return Inputs(normal(n), code, normal(n), normal(n), normal(num_modes)).to(dtype)


def upcast(inputs: Inputs) -> Inputs:
    return inputs.to(torch.float64)


def assert_verbose_close(name: str, got: torch.Tensor, expected: torch.Tensor, tolerance) -> None:
    """|got - expected| <= tolerance elementwise; on failure say how many elements differ and where."""
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    error = (got.double() - expected.double()).abs()
    bound = torch.as_tensor(tolerance, dtype=torch.float64).expand_as(error)
    bad = ~(error <= bound)  # NaN counts as bad
    if bool(bad.any()):
        where = bad.nonzero()[:5].flatten().tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ; first at {where}: "
            f"got {got.flatten()[where].tolist()}, expected {expected.flatten()[where].tolist()}, "
            f"max error {float(error.max()):.3g}, bound there {bound.flatten()[where].tolist()}"
        )


def flash_tolerance(low: torch.Tensor, high: torch.Tensor, atol: float) -> torch.Tensor:
    """FlashAttention's rule: a kernel may be at most twice as far from the float64 result as plain
    PyTorch at the inputs' dtype is, plus a small absolute slack."""
    return 2 * (low.double() - high.double()).abs() + atol


def reference_forward(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain PyTorch at the inputs' dtype, float64 result) of the reconstruction."""
    low = reference.reconstruct(*inputs.as_tuple(), upcast=False)
    high = reference.reconstruct(*upcast(inputs).as_tuple(), upcast=False)
    return low, high


def refs_grad_tolerance(inputs: Inputs, grad: torch.Tensor) -> torch.Tensor:
    """Bound on a float32 summation of a * grad per mode: a few float32 ulps of the sum of |terms|."""
    magnitude = reference.reconstruct_backward(
        grad.double().abs(), inputs.code, inputs.a.double().abs(), inputs.refs.double()
    )[1]
    return 1e-5 * magnitude + 1e-6


@dataclass(frozen=True)
class Target:
    """A backend and the device whose tensors it runs on."""

    backend: str
    device: str

    def __str__(self) -> str:
        return f"{self.backend}-{self.device}"

    def put(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(self.device) for t in tensors)


def targets() -> list[Target]:
    """Every backend on the CPU (Triton under its interpreter) and, where a GPU is present, on it."""
    found = [Target("torch", "cpu"), Target("cpp", "cpu"), Target("triton", "cpu")]
    if torch.cuda.is_available():
        found += [Target("cuda", "cuda"), Target("triton", "cuda"), Target("torch", "cuda")]
    return found


def require(target: Target) -> Target:
    import pytest

    from stdet_kernels.backends import supports

    if not supports(target.backend, torch.device(target.device)):
        pytest.skip(
            f"backend {target.backend!r} unavailable on {target.device} (test_backends checks which must be)"
        )
    return target


def compact_case_id(case) -> str:
    """A test id for a (n, mix, modes, value dtype, coefficient dtype) case."""
    n, mix, modes, dtype, coef = case
    name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    return f"{n}-{mix}-{modes}modes-{name(dtype)}-coef_{name(coef)}"


def compact_refs_bound(grad, code, offsets, a, refs) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 dL/drefs of the compact backward, bound on a float32 evaluation of it): relative to
    the sum of the terms' magnitudes, plus one rounding to a 16-bit refs dtype."""
    exact = reference.reconstruct_compact_backward(grad.double(), code, offsets, a.double(), refs.double())[1]
    magnitude = reference.reconstruct_compact_backward(
        grad.double().abs(), code, offsets, a.double().abs(), refs.double()
    )[1]
    rounding = 2.0**-8 if refs.dtype != torch.float32 else 0.0  # one rounding to a 16-bit refs dtype
    return exact, 1e-5 * magnitude + rounding * exact.abs() + 1e-6


class ConvStack(torch.nn.Module):
    """Two convolutions: the smallest model STDET lays out (two embeddable tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.second = torch.nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))
