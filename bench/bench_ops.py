"""Microbenchmarks of the ops (pytest-benchmark): reconstruct forward, backward and reconstruct_sma_.

Providers: ``cpp`` (the C++ backend through the public API), ``torch`` (the eager reference),
``torch_compile`` (torch.compile of the reference) and ``copy`` (``dst.copy_(src)`` moving the same
number of bytes: the memory-bandwidth ceiling, measured in the same run). Inputs: float32, 10 modes,
50% FREE, the rest embedded. Bytes are each op's minimum traffic: every input read once, every output
written once. Run through ``make bench`` (bench/run_bench.py), which also writes the table.
"""

import os
import platform

import pytest
import torch

import stdet_kernels
from stdet_kernels import FREE, reference

SIZES = (10**5, 10**6, 10**7)
OPS = ("forward", "backward", "reconstruct_sma_")
PROVIDERS = ("cpp", "torch", "torch_compile", "copy")
# float32 value/a/b/grad/sma/w are 4 bytes, code is 1.
BYTES_PER_ELEMENT = {
    "forward": 4 * 3 + 1 + 4,  # read value, code, a, b; write w
    "backward": 4 + 1 + 4 + 4,  # read grad, code, a; write dL/dvalue (dL/drefs is 40 bytes)
    "reconstruct_sma_": 4 * 4 + 1 + 4 * 2,  # read value, code, a, b, sma; write w, sma
}
ROUNDS = {10**5: 200, 10**6: 40, 10**7: 20}
NUM_MODES = 10
_compiled: dict[str, object] = {}


def _inputs(n: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    modes = torch.randint(0, NUM_MODES, (n,), generator=generator).to(torch.uint8)
    free = torch.rand(n, generator=generator) < 0.5
    return {
        "value": torch.randn(n, generator=generator),
        "code": torch.where(free, FREE, modes).to(torch.uint8),
        "a": torch.randn(n, generator=generator),
        "b": torch.randn(n, generator=generator),
        "refs": torch.randn(NUM_MODES, generator=generator),
        "sma": torch.randn(n, generator=generator),
        "grad": torch.randn(n, generator=generator),
    }


def _compiled_reference(name: str):
    if name not in _compiled:
        _compiled[name] = torch.compile(getattr(reference, name), dynamic=False)
    return _compiled[name]


def _operation(op: str, provider: str, x: dict[str, torch.Tensor]):
    """A no-argument callable running `op` on `provider`."""
    args = (x["value"], x["code"], x["a"], x["b"], x["refs"])
    if provider == "copy":
        source = torch.empty(x["value"].numel() * BYTES_PER_ELEMENT[op] // 2, dtype=torch.uint8)
        target = torch.empty_like(source)
        return lambda: target.copy_(source)
    if provider == "cpp":
        if op == "forward":
            return lambda: stdet_kernels.reconstruct(*args)
        if op == "backward":
            return lambda: torch.ops.stdet.reconstruct_backward(x["grad"], x["code"], x["a"], x["refs"])
        return lambda: stdet_kernels.reconstruct_sma_(*args, x["sma"], 0.1)
    functions = {
        "forward": ("reconstruct", args),
        "backward": ("reconstruct_backward", (x["grad"], x["code"], x["a"], x["refs"])),
        "reconstruct_sma_": ("reconstruct_sma_", (*args, x["sma"], 0.1)),
    }
    name, call_args = functions[op]
    function = getattr(reference, name) if provider == "torch" else _compiled_reference(name)
    return lambda: function(*call_args)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n={n:.0e}")
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, op: str, n: int, provider: str) -> None:
    x = _inputs(n)
    operation = _operation(op, provider, x)
    with stdet_kernels.use_backend("cpp"):
        operation()  # compile, fault pages in
        if provider == "cpp":
            assert stdet_kernels.last_backend() == "cpp"
        benchmark.group = f"{op} n={n:.0e}"
        benchmark.extra_info.update(
            op=op,
            n=n,
            provider=provider,
            bytes=n * BYTES_PER_ELEMENT[op],
            machine=machine(),
            malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default"),
        )
        benchmark.pedantic(operation, rounds=ROUNDS[n], iterations=1, warmup_rounds=2)
