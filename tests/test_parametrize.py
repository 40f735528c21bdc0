"""The reparametrization on CompressAI models: identical outputs after attaching, the inspection
contract, and exported state dicts that plain CompressAI loads."""

import subprocess
import sys

import pytest
import torch
from compressai.models import (
    Cheng2020Anchor,
    Cheng2020Attention,
    FactorizedPrior,
    JointAutoregressiveHierarchicalPriors,
    MeanScaleHyperprior,
    ScaleHyperprior,
)

import stdet_kernels
from stdet.parametrize import (
    attach,
    embeddable_parameters,
    embedding_state,
    export_state_dict,
    parametrized_tensors,
)

# The zoo's architectures, with few channels to keep the tests quick.
ARCHITECTURES = {
    "bmshj2018-factorized": lambda: FactorizedPrior(N=8, M=12),
    "bmshj2018-hyperprior": lambda: ScaleHyperprior(N=8, M=12),
    "mbt2018-mean": lambda: MeanScaleHyperprior(N=8, M=12),
    "mbt2018": lambda: JointAutoregressiveHierarchicalPriors(N=8, M=12),
    "cheng2020-anchor": lambda: Cheng2020Anchor(N=8),
    "cheng2020-attn": lambda: Cheng2020Attention(N=8),
}


def _image(size: int = 64) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_attaching_changes_no_output(arch: str) -> None:
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().eval()
    x = _image()
    with torch.no_grad():
        before = model(x)
    attach(model)
    assert parametrized_tensors(model)
    with torch.no_grad():
        after = model(x)
    assert torch.equal(after["x_hat"], before["x_hat"])
    for name in before["likelihoods"]:
        assert torch.equal(after["likelihoods"][name], before["likelihoods"][name])


def test_masked_convolution_keeps_its_causal_mask() -> None:
    torch.manual_seed(0)
    model = JointAutoregressiveHierarchicalPriors(N=8, M=12)
    attach(model)
    masked = model.context_prediction
    masked.weight = torch.ones_like(masked.mask)  # assigned: masked positions would hold non-zeros
    masked.bias = torch.zeros_like(masked.bias)
    assert torch.equal(masked.weight, masked.mask)
    y = torch.zeros(1, 12, 5, 5)
    y[..., 2, 2] = 1.0
    out = masked(y)
    # Mask A: an output sees only inputs strictly before it in raster order, so the one non-zero input
    # reaches only the outputs after it.
    assert torch.all(out[..., :2, :] == 0) and torch.all(out[..., 2, :3] == 0)
    assert torch.all(out[..., 2, 3:] != 0) and torch.all(out[..., 3, 1:4] != 0)


def test_a_released_masked_convolution_keeps_its_causal_mask() -> None:
    """Releasing every element (STDET's ``release=True`` at the lr drop) keeps the masked-out
    elements DUMMY at 0: the layer's own masking writes a weight that is not its parameter."""
    torch.manual_seed(0)
    model = JointAutoregressiveHierarchicalPriors(N=8, M=12)
    layout = attach(model)
    masked = model.context_prediction
    optimizer = torch.optim.SGD([layout.free_values, layout.refs], lr=1.0)
    layout.release_all(optimizer)
    x = torch.rand(1, 3, 64, 64)
    for _ in range(2):
        optimizer.zero_grad()
        out = model(x)  # the rate term: the context model's gradient comes through the likelihoods
        rate = -sum(torch.log(p).mean() for p in out["likelihoods"].values())
        (out["x_hat"].square().mean() + rate).backward()
        optimizer.step()
    with torch.no_grad():
        weight = masked.weight
    assert torch.all(weight[masked.mask == 0] == 0) and bool((weight[masked.mask == 1] != 0).any())
    assert layout.free_count == layout.numel - int((masked.mask == 0).sum())


def test_default_set_skips_entropy_models_and_gdn() -> None:
    model = ScaleHyperprior(N=8, M=12)
    names = embeddable_parameters(model)
    assert "g_a.0.weight" in names and "g_a.0.bias" in names and "h_s.4.weight" in names
    assert not any("entropy_bottleneck" in n or "quantiles" in n for n in names)
    assert not any(n.endswith(("beta", "gamma")) for n in names)
    with_gdn = embeddable_parameters(model, include_gdn=True)
    assert "g_a.1.beta" in with_gdn and "g_a.1.gamma" in with_gdn
    assert embeddable_parameters(model, exclude=["g_s.*", "*.bias"]) == [
        n for n in names if not n.startswith("g_s.") and not n.endswith(".bias")
    ]


def test_embedding_state_reconstructs_every_weight() -> None:
    torch.manual_seed(0)
    model = MeanScaleHyperprior(N=8, M=12)
    layout = attach(model, num_modes=3)
    with torch.no_grad():
        layout.refs.copy_(torch.tensor([0.5, -2.0, 3.0]))
        value, a, b = layout.dense()
        code = layout.code.clone()  # embed about a third of the elements
        picked = torch.rand(code.shape) < 0.33
        code[picked] = torch.randint(0, 4, (int(picked.sum()),), dtype=torch.uint8)
        code[code == 3] = stdet_kernels.DUMMY
        layout.repack(value, code, torch.randn_like(a), torch.randn_like(b))
    state = embedding_state(model)
    for name in parametrized_tensors(model):
        module = model.get_submodule(name.rpartition(".")[0])
        rebuilt = stdet_kernels.reconstruct(**state[name], refs=state["refs"])
        assert torch.equal(rebuilt, getattr(module, name.rpartition(".")[2]))


def test_gradients_reach_values_and_refs() -> None:
    torch.manual_seed(0)
    model = FactorizedPrior(N=8, M=12)
    layout = attach(model, num_modes=1)
    dense_value, a, b = layout.dense()
    code = layout.code.clone()
    code[:10] = 0  # the first 10 elements of g_a.0.weight
    layout.repack(dense_value, code, torch.ones_like(a), b)
    out = model(_image(32))
    out["x_hat"].square().mean().backward()
    value = layout.free_values
    assert value.shape == (layout.numel - 10,)  # only the FREE elements are trainable
    assert value.grad is not None and value.grad.abs().sum() > 0
    assert layout.refs.grad is not None and layout.refs.grad.abs().sum() > 0
    assert model.g_a[0].parametrizations.weight.original.numel() == 0  # the layer stores nothing


def test_misuse_gives_clear_errors() -> None:
    model = FactorizedPrior(N=8, M=12)
    attach(model)
    with pytest.raises(RuntimeError, match="attached twice"):
        attach(model)
    with pytest.raises(ValueError, match="^model: no embeddable parameters"):
        attach(torch.nn.Sequential(torch.nn.ReLU()))
    with pytest.raises(ValueError, match="^model: has no STDET parametrizations"):
        embedding_state(FactorizedPrior(N=8, M=12))


@pytest.mark.parametrize("arch", ["bmshj2018-factorized", "mbt2018"])
def test_exported_state_dict_loads_into_plain_compressai(arch: str, tmp_path) -> None:
    """A process that never imports stdet builds the model with from_state_dict and codes an image."""
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]()
    attach(model)
    exported = export_state_dict(model)
    assert not any("parametrizations" in k for k in exported)
    assert set(exported) == set(ARCHITECTURES[arch]().state_dict())
    path = tmp_path / "model.pth"
    torch.save(exported, path)
    model_class = type(model).__name__
    script = (
        "import sys, torch\n"
        f"from compressai.models import {model_class}\n"
        f"model = {model_class}.from_state_dict(torch.load({str(path)!r})).eval()\n"
        "model.update(force=True)\n"
        "x = torch.rand(1, 3, 64, 64)\n"
        "with torch.no_grad():\n"
        "    coded = model.compress(x)\n"
        "    out = model.decompress(coded['strings'], coded['shape'])\n"
        "assert out['x_hat'].shape == x.shape\n"
        "assert not any(m.startswith('stdet') for m in sys.modules), 'stdet was imported'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_a_forward_that_raises_leaves_no_stale_views() -> None:
    """The layout's views of a forward end with it, also when it raises: a later access outside the
    forward sees the weights as they are then."""
    torch.manual_seed(0)
    model = FactorizedPrior(N=8, M=12)
    layout = attach(model)
    with pytest.raises(RuntimeError):
        model(torch.rand(1, 5, 32, 32))  # 5 channels: the first convolution refuses them
    assert layout._views is None
    with torch.no_grad():
        layout.free_values.add_(1.0)
        expected = layout.weights()[: layout.sizes[0]].view(layout.shapes[0])
        assert torch.equal(model.g_a[0].weight, expected)
