"""The STDET reparametrization of a model's weights (METHOD.md, "Notation").

`attach` lays every embeddable tensor into one `stdet.layout.FlatLayout` (the model's child
``stdet``) and registers an `Embedded` parametrization (`torch.nn.utils.parametrize`) on each: the
layer's weight becomes its view of the flat weight ``reconstruct(value, code, a, b, refs)``, which one
fused op of `stdet_kernels` computes per forward of the model. Right after attaching every element is
FREE, so the model computes exactly what it computed before. Users, CompressAI, ``state_dict`` and
``torch.compile`` see ordinary parametrized layers.

Default embeddable set: weights and biases of every convolution, transposed convolution and linear
layer that is not part of an entropy model (CompressAI's `EntropyModel`: `quantiles`, CDF tables and
the factorized prior's own parameters stay as they are). GDN's `beta`/`gamma` are opt-in; name
patterns (fnmatch) include or exclude more.

CompressAI's `MaskedConv2d` multiplies its weight by a causal mask in `forward` by writing
``weight.data``, which a parametrized weight would lose. Here the masked-out elements are DUMMY with
``b = 0``: the reconstruction itself is masked, at no extra cost, and the write is harmless.

State-dict keys: the flat storage under ``stdet.`` (``free_values``, ``refs``, ``code``, ``offsets``,
``a``, ``b``, ``sensitivity``, and STDET's ``_extra_state`` with the tensors' names and shapes); each
layer keeps an empty ``<layer>.parametrizations.<tensor>.original``. `plain_state_dict` turns such a
state dict into CompressAI's keys without a model.
"""

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

import stdet_kernels
from stdet_kernels import FREE

from .layout import FlatLayout

# `stdet.STDET` adds a child module of this name to the model; its state is this state-dict key.
STATE_MODULE = "stdet"
STATE_PREFIX = f"{STATE_MODULE}."
STATE_KEY = f"{STATE_PREFIX}_extra_state"
# A layer's (empty) ``<layer>.parametrizations.<tensor>.original``.
_PARAMETRIZED_KEY = re.compile(r"(?:.*\.)?parametrizations\.[^.]+\.original")

EMBEDDABLE_LAYERS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


def _entropy_model_types() -> tuple[type, ...]:
    try:
        from compressai.entropy_models import EntropyModel
    except ImportError:
        return ()
    return (EntropyModel,)


def _gdn_types() -> tuple[type, ...]:
    try:
        from compressai.layers import GDN
    except ImportError:
        return ()
    return (GDN,)


def embeddable_parameters(
    model: nn.Module,
    include_gdn: bool = False,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the tensors `attach` would parametrize.

    `include` and `exclude` are fnmatch patterns on those names: `include` adds any parameter (outside
    entropy models too), `exclude` removes; exclusion wins.
    """
    include, exclude = list(include), list(exclude)
    entropy_models = _entropy_model_types()
    inside_entropy_model: set[str] = set()
    for name, module in model.named_modules():
        if entropy_models and isinstance(module, entropy_models):
            inside_entropy_model.update(f"{name}.{p}" if name else p for p, _ in module.named_parameters())
    chosen = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        default = isinstance(module, EMBEDDABLE_LAYERS) or (include_gdn and isinstance(module, _gdn_types()))
        for param_name, param in module.named_parameters(recurse=False):
            name = prefix + param_name
            if parametrize.is_parametrized(module, param_name) or name in inside_entropy_model:
                continue
            wanted = default or any(fnmatch.fnmatchcase(name, p) for p in include)
            if (
                wanted
                and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
                and param.is_floating_point()
            ):
                chosen.append(name)
    return chosen


class Embedded(nn.Module):
    """The parametrization of one layer's tensor: its view of the flat weight of `layout` (tensor
    `index` there). Holds no storage of its own: the layer's ``parametrizations.<name>.original`` is
    empty, and assigning a weight to the layer writes its FREE elements' values into the layout."""

    def __init__(self, layout: FlatLayout, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "layout", layout)  # not a submodule: the model holds it as ``stdet``
        self.index = index

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self.layout.view(self.index)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        if self.layout.attached:  # an assignment ``layer.weight = w`` after attaching
            with torch.no_grad():
                self.layout.view(self.index)  # (any pending SMA sample is taken first)
                start = sum(self.layout.sizes[: self.index])
                indices = torch.arange(start, start + weight.numel(), device=self.layout.code.device)
                free = self.layout.code[indices] == FREE
                self.layout.edit(indices[free], FREE, value=weight.detach().reshape(-1)[free])
        # Empty, with the weight's number of dimensions: the parameter object keeps its rank (what
        # torch.compile remembers of a tensor it has traced before).
        return weight.new_empty([0] * weight.dim())


def owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(module, attribute) of a dotted tensor name such as ``g_a.0.weight``."""
    module_name, _, attribute = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attribute


def flat_layout(model: nn.Module) -> FlatLayout | None:
    """The model's `FlatLayout` (its child ``stdet``), or None."""
    layout = getattr(model, STATE_MODULE, None)
    return layout if isinstance(layout, FlatLayout) else None


def parametrized_tensors(model: nn.Module) -> dict[str, Embedded]:
    """Parametrized tensor name (CompressAI's key, e.g. ``g_a.0.weight``) -> its `Embedded`."""
    found = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param_name, chain in module.parametrizations.items():
            embedded = [p for p in chain if isinstance(p, Embedded)]
            if embedded:
                found[f"{module_name}.{param_name}" if module_name else param_name] = embedded[0]
    return found


def attach(
    model: nn.Module,
    num_modes: int = 0,
    include_gdn: bool = False,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    coefficient_dtype: torch.dtype | None = None,
    layout: FlatLayout | None = None,
) -> FlatLayout:
    """Lay every embeddable tensor of `model` into one flat layout (all FREE, `num_modes` zero
    references), parametrize each layer with its view, and return the layout (also ``model.stdet``).

    The model's outputs are unchanged. The layers' own parameters become empty: an optimizer that
    held them must train ``layout.free_values`` and ``layout.refs`` instead (`FlatLayout.take_over`).
    `layout` is the model's existing, empty `FlatLayout` (`STDET` creates it first); None makes one.
    """
    if parametrized_tensors(model):
        raise RuntimeError("attach: the model already has STDET parametrizations (attached twice?)")
    names = embeddable_parameters(model, include_gdn, include, exclude)
    if not names:
        raise ValueError(
            "model: no embeddable parameters (no convolution or linear layer outside entropy models, "
            "and no include pattern matched)"
        )
    tensors = [model.get_parameter(name) for name in names]
    if layout is None:
        layout = FlatLayout(names, [tuple(t.shape) for t in tensors])
        model.add_module(STATE_MODULE, layout)
        model.register_forward_pre_hook(layout.begin_forward)
        model.register_forward_hook(layout.end_forward, always_call=True)
    elif layout.names != names:
        raise RuntimeError("attach: the layout was made for a different set of tensors")
    masks = []
    for name in names:
        module, param_name = owner(model, name)
        masks.append(getattr(module, "mask", None) if param_name == "weight" else None)
    layout.attach(tensors, masks, num_modes, coefficient_dtype)
    layout.attached = False  # registering calls right_inverse: not an assignment
    for index, name in enumerate(names):
        module, param_name = owner(model, name)
        parametrize.register_parametrization(module, param_name, Embedded(layout, index), unsafe=True)
    for tensor in tensors:  # now the empty ``original`` of each layer: no gradient, now or later
        tensor.grad = None
        tensor.requires_grad_(False)
    layout.attached = True
    return layout


def embedding_state(model: nn.Module) -> dict[str, object]:
    """For each parametrized tensor, dense ``{"value", "code", "a", "b"}`` in METHOD.md's notation, plus
    ``"refs"``: ``stdet_kernels.reconstruct(**state[name], refs=state["refs"])`` is the layer's weight."""
    layout = flat_layout(model)
    if layout is None or not layout.attached:
        raise ValueError("model: has no STDET parametrizations (call attach first)")
    value, a, b = (layout.split(t) for t in layout.dense())
    code = layout.split(layout.code)
    state: dict[str, object] = {
        name: {"value": value[name], "code": code[name], "a": a[name], "b": b[name]} for name in layout.names
    }
    state["refs"] = layout.refs.detach()
    return state


def export_state_dict(model: nn.Module, sma=None, raw: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict with plain weights under its own key names (``g_a.0.weight``, ...), as
    the unparametrized model has it (the weights it computes now, so inside ``SMA.swap`` the
    averages): loadable by code that has never imported stdet. With an `SMA` (and not `raw`), the
    averaged weights are exported instead of the live ones. `plain_state_dict` does the same from a
    saved state dict, with no model."""
    if sma is not None and not raw:
        with sma.swap():  # copies: the live weights come back when the block ends
            return {key: tensor.clone() for key, tensor in export_state_dict(model).items()}
    plain: dict[str, torch.Tensor] = {}
    parametrized = parametrized_tensors(model)
    with torch.no_grad(), parametrize.cached():
        for key, tensor in model.state_dict().items():
            if ".parametrizations." not in key and not is_layout_key(key):
                plain[key] = tensor
        for name in parametrized:
            module, param_name = owner(model, name)
            plain[name] = getattr(module, param_name).detach().clone()
    return plain


def is_layout_key(key: str) -> bool:
    """A state-dict (or parameter, buffer) name of STDET's flat layout and state (``stdet.*``)."""
    return key.startswith(STATE_PREFIX) or f".{STATE_PREFIX}" in key


def plain_state_dict(
    state_dict: Mapping[str, object], averages: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """A plain CompressAI state dict from the state dict of a model with STDET on it (works on the
    keys alone, no model needed): the flat layout's weights are reconstructed and split under the
    tensors' own keys (``g_a.0.weight``), STDET's storage and state are left out, everything else is
    kept. With `averages` (SMA's, keyed like the plain state dict) a tensor that has an average is
    exported as its average.
    """
    plain: dict[str, torch.Tensor] = {}
    storage: dict[str, object] = {}
    for key, value in state_dict.items():
        if is_layout_key(key):
            storage[key.rpartition(STATE_PREFIX)[2]] = value
        elif _PARAMETRIZED_KEY.fullmatch(key) is None:
            plain[key] = value
    if "free_values" in storage:
        missing = {"code", "offsets", "a", "b", "refs", "_extra_state"} - set(storage)
        if missing:
            raise ValueError(f"state_dict: the STDET layout lacks {', '.join(sorted(missing))}")
        state = storage["_extra_state"]
        free = storage["free_values"]
        tensors = (free, storage["code"], storage["offsets"], storage["a"], storage["b"])
        with torch.no_grad():
            flat = stdet_kernels.reconstruct_compact(*tensors, storage["refs"].to(free))
        sizes = [math.prod(shape) for shape in state["shapes"]]
        for name, piece, shape in zip(
            state["names"], flat.split_with_sizes(sizes), state["shapes"], strict=True
        ):
            plain[name] = piece.reshape(shape).clone()
    if averages:
        for key in plain:
            if key in averages:
                plain[key] = averages[key].detach().clone()
    return plain
