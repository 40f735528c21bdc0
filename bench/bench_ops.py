"""Microbenchmarks of the ops (pytest-benchmark): reconstruct forward, backward, reconstruct_sma_, the
compact layout's forward (compact_forward: what STDET's model computes in each training forward), its
backward fused with the sensitivity update (compact_backward_sensitivity_), the same from the
layers' gradients read in place (compact_backward_pieces_sensitivity_: 16 pieces), the same with the
online refit's snapshot fused in (compact_backward_pieces_refit_), the online refit's moment update
alone (refit_update_) and the sensitivity of dense tensors before the model is laid out
(sensitivity_update_: 16 tensors, one launch).

Providers: ``cpp`` (the C++ backend through the public API), ``torch`` (the eager reference),
``torch_compile`` (torch.compile of the reference) and ``copy`` (``dst.copy_(src)`` moving the same
number of bytes: the memory-bandwidth ceiling, measured in the same run); for the fused backward also
``cpp_unfused`` (the C++ compact backward, then the sensitivity updated by eager PyTorch: what it
replaces; for the pieces, the copy of the pieces into one flat buffer, then the flat fused
backward; for the refit's, the pieces backward, then refit_update_). Inputs: float32, 10 modes,
50% FREE, the rest embedded. Bytes are each op's minimum traffic: every input read once, every
output written once. Run through ``make bench`` (bench/run_bench.py), which also writes the table.
"""

import os
import platform

import pytest
import torch

import stdet_kernels
from stdet_kernels import FREE, reference

SIZES = (10**5, 10**6, 10**7)
OPS = (
    "forward",
    "backward",
    "reconstruct_sma_",
    "compact_forward",
    "compact_backward_sensitivity_",
    "compact_backward_pieces_sensitivity_",
    "compact_backward_pieces_refit_",
    "refit_update_",
    "sensitivity_update_",
)
PIECES = 16
PROVIDERS = ("cpp", "cpp_unfused", "torch", "torch_compile", "copy")
# float32 value/a/b/grad/sma/w are 4 bytes, code is 1.
BYTES_PER_ELEMENT = {
    "forward": 4 * 3 + 1 + 4,  # read value, code, a, b; write w
    "backward": 4 + 1 + 4 + 4,  # read grad, code, a; write dL/dvalue (dL/drefs is 40 bytes)
    "reconstruct_sma_": 4 * 4 + 1 + 4 * 2,  # read value, code, a, b, sma; write w, sma
    # read code, free_values (the FREE half), a and b (the other half); write w
    "compact_forward": 1 + (4 + 4 + 4) // 2 + 4,
    # read grad, code, a (half the elements), free_values and sensitivity (the other half); write
    # dL/dfree_values and sensitivity (the FREE half)
    "compact_backward_sensitivity_": 4 + 1 + (4 + 4 + 4 + 4 + 4) // 2,
    "compact_backward_pieces_sensitivity_": 4 + 1 + (4 + 4 + 4 + 4 + 4) // 2,
    # and at the FREE half the refit's: read mean, moment2, comoment, mode; write the three moments
    "compact_backward_pieces_refit_": 4 + 1 + (4 + 4 + 4 + 4 + 4 + 4 * 3 + 1 + 4 * 3) // 2,
    # read values, mean, moment2, comoment, mode; write mean, moment2, comoment
    "refit_update_": 4 * 4 + 1 + 4 * 3,
    "sensitivity_update_": 4 * 3 + 4,  # read grad, value, sensitivity; write sensitivity
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


def _compact(x: dict[str, torch.Tensor]) -> tuple:
    """(grad, free_values, code, offsets, a, refs, sensitivity) of the compact layout of x."""
    free_values, offsets, a, _ = stdet_kernels.pack(x["value"], x["code"], x["a"], x["b"])
    sensitivity = torch.rand(free_values.numel(), generator=torch.Generator().manual_seed(1))
    return x["grad"], free_values, x["code"], offsets, a, x["refs"], sensitivity


def _unfused_backward_sensitivity(grad, free_values, code, offsets, a, refs, sensitivity, decay):
    """The C++ compact backward, then the sensitivity's update in eager PyTorch (three more passes)."""
    grad_free, grad_refs = torch.ops.stdet.reconstruct_compact_backward(grad, code, offsets, a, refs)
    sensitivity.mul_(decay).add_((grad_free * free_values).abs_(), alpha=1.0 - decay)
    return grad_free, grad_refs


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
    if op == "compact_backward_pieces_refit_":
        return _pieces_refit(provider, x)
    if op == "compact_backward_pieces_sensitivity_":
        grad, *layout = _compact(x)
        n = grad.numel()
        sizes = [n // PIECES + (k < n % PIECES) for k in range(PIECES)]
        pieces = [piece.clone() for piece in grad.split_with_sizes(sizes)]
        if provider == "cpp":
            name = "reconstruct_compact_backward_pieces_sensitivity_"
            return lambda: getattr(torch.ops.stdet, name)(pieces, sizes, *layout, 0.9, "taylor")
        if provider == "cpp_unfused":
            flat = torch.empty_like(grad)
            views = list(flat.split_with_sizes(sizes))

            def gather_then_backward():
                torch._foreach_copy_(views, pieces)
                return stdet_kernels.reconstruct_compact_backward_sensitivity_(flat, *layout, 0.9, "taylor")

            return gather_then_backward
        name = "reconstruct_compact_backward_pieces_sensitivity_"
        function = getattr(reference, name) if provider == "torch" else _compiled_reference(name)
        return lambda: function(pieces, sizes, *layout, 0.9, False)
    if op in ("refit_update_", "sensitivity_update_"):
        return _dense_update(op, provider, x)
    if op == "compact_backward_sensitivity_":
        compact = _compact(x)
        if provider == "cpp":
            return lambda: stdet_kernels.reconstruct_compact_backward_sensitivity_(*compact, 0.9, "taylor")
        if provider == "cpp_unfused":
            return lambda: _unfused_backward_sensitivity(*compact, 0.9)
        name = "reconstruct_compact_backward_sensitivity_"
        function = getattr(reference, name) if provider == "torch" else _compiled_reference(name)
        return lambda: function(*compact, 0.9, False)
    if provider == "cpp_unfused":
        pytest.skip("cpp_unfused: only for the fused backwards")
    if op == "compact_forward":
        free_values, offsets, a, b = stdet_kernels.pack(x["value"], x["code"], x["a"], x["b"])
        layout = (free_values, x["code"], offsets, a, b, x["refs"])
        if provider == "cpp":
            return lambda: stdet_kernels.reconstruct_compact(*layout)
        function = (
            reference.reconstruct_compact
            if provider == "torch"
            else _compiled_reference("reconstruct_compact")
        )
        return lambda: function(*layout)
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


def _pieces_refit(provider: str, x: dict[str, torch.Tensor]):
    """The pieces backward with the sensitivity and the refit's snapshot (10 modes) fused in; unfused:
    the pieces backward, then refit_update_ (both C++)."""
    grad, *layout = _compact(x)
    free_values = layout[0]
    n = grad.numel()
    sizes = [n // PIECES + (k < n % PIECES) for k in range(PIECES)]
    pieces = [piece.clone() for piece in grad.split_with_sizes(sizes)]
    free = free_values.numel()
    generator = torch.Generator().manual_seed(2)
    moments = [torch.randn(free, generator=generator).abs() for _ in range(3)]
    mode = torch.randint(0, NUM_MODES, (free,), generator=generator).to(torch.uint8)
    refit = (*moments, mode, torch.randn(NUM_MODES, generator=generator), 5)
    if provider == "cpp":
        op = torch.ops.stdet.reconstruct_compact_backward_pieces_refit_
        return lambda: op(pieces, sizes, *layout, 0.9, "taylor", *refit)
    if provider == "cpp_unfused":
        backward = torch.ops.stdet.reconstruct_compact_backward_pieces_sensitivity_

        def backward_then_refit():
            result = backward(pieces, sizes, *layout, 0.9, "taylor")
            stdet_kernels.refit_update_(free_values, *refit)
            return result

        return backward_then_refit
    name = "reconstruct_compact_backward_pieces_refit_"
    function = getattr(reference, name) if provider == "torch" else _compiled_reference(name)
    return lambda: function(pieces, sizes, *layout, 0.9, False, *refit)


def _dense_update(op: str, provider: str, x: dict[str, torch.Tensor]):
    """refit_update_ (10 modes) or sensitivity_update_ (the elements in PIECES tensors)."""
    if provider == "cpp_unfused":
        pytest.skip("cpp_unfused: only for the fused backwards")
    n = x["value"].numel()
    if op == "refit_update_":
        moments = [x["a"].clone(), x["b"].abs(), x["sma"].clone()]
        mode = (x["code"] % NUM_MODES).to(torch.uint8)
        call_args = (x["value"], *moments, mode, x["refs"], 5)
        if provider == "cpp":
            return lambda: stdet_kernels.refit_update_(*call_args)
    else:
        sizes = [n // PIECES + (k < n % PIECES) for k in range(PIECES)]
        grads, values = list(x["grad"].split_with_sizes(sizes)), list(x["value"].split_with_sizes(sizes))
        running = list(x["sma"].abs().split_with_sizes(sizes))
        if provider == "cpp":
            return lambda: stdet_kernels.sensitivity_update_(running, grads, values, 0.9)
        call_args = (grads, values, running, 0.9, False)
    function = getattr(reference, op) if provider == "torch" else _compiled_reference(op)
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
