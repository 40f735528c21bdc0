"""The ops as `torch.library` ops: opcheck, and models using them under torch.compile(fullgraph=True)."""

import pytest
import torch
from helpers import make_inputs

import stdet_kernels


@pytest.fixture(params=("torch", "cpp"))
def backend(request) -> str:
    if request.param not in stdet_kernels.available_backends():
        pytest.skip(f"backend {request.param!r} unavailable here")
    return request.param


def _leaf_inputs(n: int = 37) -> tuple[torch.Tensor, ...]:
    inputs = make_inputs(n, 4, "mixed", seed=11)
    return (
        inputs.value.requires_grad_(),
        inputs.code,
        inputs.a,
        inputs.b,
        inputs.refs.requires_grad_(),
    )


def test_opcheck_reconstruct(backend: str) -> None:
    with stdet_kernels.use_backend(backend):
        torch.library.opcheck(torch.ops.stdet.reconstruct.default, _leaf_inputs())


def test_opcheck_reconstruct_backward(backend: str) -> None:
    _, code, a, _, refs = _leaf_inputs()
    with stdet_kernels.use_backend(backend):
        torch.library.opcheck(
            torch.ops.stdet.reconstruct_backward.default, (torch.randn(37), code, a, refs.detach())
        )


def test_opcheck_reconstruct_sma(backend: str) -> None:
    value, code, a, b, refs = _leaf_inputs()
    args = (value.detach(), code, a, b, refs.detach(), torch.randn(37), 0.3)
    with stdet_kernels.use_backend(backend):
        torch.library.opcheck(torch.ops.stdet.reconstruct_sma_.default, args)


def test_opcheck_lerp(backend: str) -> None:
    averages = [torch.randn(5), torch.randn(3, 2, dtype=torch.bfloat16)]
    samples = [torch.randn(5), torch.randn(3, 2, dtype=torch.bfloat16)]
    with stdet_kernels.use_backend(backend):
        torch.library.opcheck(torch.ops.stdet.lerp_.default, (averages, samples, 0.5))


def test_opcheck_refit_update(backend: str) -> None:
    values = torch.randn(37)
    moments = [torch.randn(37), torch.rand(37), torch.randn(37)]
    mode = torch.randint(0, 3, (37,), dtype=torch.uint8)
    with stdet_kernels.use_backend(backend):
        torch.library.opcheck(
            torch.ops.stdet.refit_update_.default, (values, *moments, mode, torch.randn(3), 4)
        )


def test_opcheck_sensitivity_update(backend: str) -> None:
    grads = [torch.randn(5), torch.randn(3, 2)]
    values = [torch.randn(5), torch.randn(3, 2)]
    running = [torch.rand(5), torch.rand(3, 2)]
    with stdet_kernels.use_backend(backend):
        torch.library.opcheck(
            torch.ops.stdet.sensitivity_update_.default, (grads, values, running, 0.9, False)
        )


class _EmbeddedLinear(torch.nn.Module):
    """A linear layer whose weight is a STDET reconstruction, optionally sampled into an SMA average."""

    def __init__(self, out_features: int, in_features: int, with_average: bool) -> None:
        super().__init__()
        inputs = make_inputs(out_features * in_features, 3, "mixed", seed=12)
        shape = (out_features, in_features)
        self.value = torch.nn.Parameter(inputs.value.reshape(shape))
        self.refs = torch.nn.Parameter(inputs.refs)
        self.register_buffer("code", inputs.code.reshape(shape))
        self.register_buffer("a", inputs.a.reshape(shape))
        self.register_buffer("b", inputs.b.reshape(shape))
        self.register_buffer("sma", torch.zeros(shape))
        self.register_buffer("bias_average", torch.zeros(out_features))
        self.bias = torch.nn.Parameter(torch.randn(out_features))
        self.with_average = with_average

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_average:
            weight = stdet_kernels.reconstruct_sma_(
                self.value, self.code, self.a, self.b, self.refs, self.sma, 0.5
            )
            stdet_kernels.lerp_([self.bias_average], [self.bias.detach()], 0.5)
        else:
            weight = stdet_kernels.reconstruct(self.value, self.code, self.a, self.b, self.refs)
        return torch.nn.functional.linear(x, weight, self.bias).square().sum()


@pytest.mark.parametrize("with_average", (False, True), ids=("reconstruct", "reconstruct_sma_"))
def test_compiles_with_fullgraph(with_average: bool) -> None:
    torch.manual_seed(0)
    eager = _EmbeddedLinear(6, 5, with_average)
    compiled_model = _EmbeddedLinear(6, 5, with_average)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(4, 5)
    for _ in range(2):  # twice: the averages move on each call
        loss_eager = eager(x)
        loss_compiled = compiled(x)
        torch.testing.assert_close(loss_compiled, loss_eager)
    loss_eager.backward()
    loss_compiled.backward()
    for name in ("value", "refs", "bias"):
        torch.testing.assert_close(getattr(compiled_model, name).grad, getattr(eager, name).grad)
    torch.testing.assert_close(compiled_model.sma, eager.sma)
    torch.testing.assert_close(compiled_model.bias_average, eager.bias_average)
    assert compiled_model.refs.grad.abs().sum() > 0
