"""The STDET reparametrization of a model's weights (METHOD.md, "Notation").

`attach` registers an `Embedded` parametrization (`torch.nn.utils.parametrize`) on every embeddable
tensor: the layer's weight becomes ``reconstruct(value, code, a, b, refs)``, computed by the fused op
of `stdet_kernels`. Right after attaching every element is FREE, so the model computes exactly what it
computed before. One `refs` parameter (one scalar per mode) is shared by every parametrization.

Default embeddable set: weights and biases of every convolution, transposed convolution and linear
layer that is not part of an entropy model (CompressAI's `EntropyModel`: `quantiles`, CDF tables and
the factorized prior's own parameters stay as they are). GDN's `beta`/`gamma` are opt-in; name
patterns (fnmatch) include or exclude more.

CompressAI's `MaskedConv2d` multiplies its weight by a causal mask in `forward` by writing
``weight.data``, which a parametrized weight would lose. Here the masked-out elements are DUMMY with
``b = 0``: the reconstruction itself is masked, at no extra cost, and the write is harmless.
"""

import fnmatch
import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

import stdet_kernels
from stdet_kernels import DUMMY, FREE

# `stdet.STDET` adds a child module of this name to the model; its state is this state-dict key.
STATE_MODULE = "stdet"
STATE_KEY = f"{STATE_MODULE}._extra_state"
# ``<layer>.parametrizations.<tensor>.original`` and ``<layer>.parametrizations.<tensor>.0.<buffer>``
_PARAMETRIZED_KEY = re.compile(
    r"(?:(.*)\.)?parametrizations\.([^.]+)\.(original|0\.(?:code|offsets|a|b|refs))"
)

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


def remap_free(array: torch.Tensor, old_code: torch.Tensor, new_code: torch.Tensor) -> torch.Tensor:
    """An array indexed by FREE element (compact order) after the FREE set changes from `old_code` to
    `new_code`: elements that stay FREE keep their entries, newly FREE ones get 0."""
    dense = torch.zeros(old_code.numel(), dtype=array.dtype, device=array.device)
    dense[old_code.reshape(-1) == FREE] = array.reshape(-1)
    return dense[new_code.reshape(-1) == FREE]


class Embedded(nn.Module):
    """``weight = reconstruct_compact(free_values, code, offsets, a, b, refs)`` (the compact layout of
    `stdet_kernels.compact`). The parametrized tensor's trainable storage
    (``parametrizations.<name>.original``) holds only the FREE elements' values; buffers ``code`` (the
    weight's shape), ``offsets``, and ``a``, ``b`` for the other elements, in `coefficient_dtype`.
    ``refs`` is the model-wide reference parameter, shared by every `Embedded`.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        refs: nn.Parameter,
        mask: torch.Tensor | None = None,
        coefficient_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        code = torch.full(weight.shape, FREE, dtype=torch.uint8, device=weight.device)
        if mask is not None:
            code[mask == 0] = DUMMY  # b = 0 there: the reconstruction is masked
        embedded = int((code != FREE).sum())
        dtype = coefficient_dtype or weight.dtype
        self.register_buffer("code", code)
        self.register_buffer("offsets", stdet_kernels.compact_offsets(code))
        self.register_buffer("a", torch.zeros(embedded, dtype=dtype, device=weight.device))
        self.register_buffer("b", torch.zeros(embedded, dtype=dtype, device=weight.device))
        self.refs = refs
        # Set by `stdet.SMA`: (average, alpha) to update in the next reconstruction, in the same pass.
        self.pending_sample: tuple[torch.Tensor, float] | None = None
        # Set by `stdet.SMA.swap`: a weight to return instead of the reconstruction.
        self.override: torch.Tensor | None = None

    def forward(self, free_values: torch.Tensor) -> torch.Tensor:
        if self.override is not None:
            return self.override
        layout = (free_values, self.code, self.offsets, self.a, self.b, self.refs)
        if self.pending_sample is not None:
            (average, alpha), self.pending_sample = self.pending_sample, None
            return stdet_kernels.reconstruct_compact_sma_(*layout, average, alpha)
        return stdet_kernels.reconstruct_compact(*layout)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight assigned to the layer sets the FREE elements' values; embedded ones keep theirs."""
        return weight.detach().reshape(-1)[self.code.reshape(-1) == FREE].clone()

    def dense(self, free_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(value, a, b) in the dense layout, the weight's shape and dtype; 0 where nothing is stored."""
        value, a, b = stdet_kernels.unpack(free_values.detach(), self.code, self.a, self.b)
        return value, a.to(value.dtype), b.to(value.dtype)

    @torch.no_grad()
    def repack(
        self,
        free_values: nn.Parameter,
        value: torch.Tensor,
        code: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
    ) -> None:
        """Take a new dense state. `free_values` (the trainable parameter) is resized in place
        (``set_``), so optimizers keep referring to it; their per-element state is the caller's job."""
        new_values, offsets, new_a, new_b = stdet_kernels.pack(value, code, a, b, self.a.dtype)
        self.code.copy_(code.view(self.code.shape))
        self.offsets = offsets
        self.a, self.b = new_a, new_b
        free_values.set_(new_values.to(free_values.dtype))
        free_values.grad = None


def owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(module, attribute) of a dotted tensor name such as ``g_a.0.weight``."""
    module_name, _, attribute = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attribute


def free_values(model: nn.Module, name: str) -> nn.Parameter:
    """The trainable storage of parametrized tensor `name`: its FREE elements' values."""
    module, attribute = owner(model, name)
    return module.parametrizations[attribute].original


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
) -> nn.Parameter:
    """Parametrize every embeddable tensor of `model` (all FREE) and return the shared `refs`.

    `refs` starts with `num_modes` zeros; mode discovery fills it. The model's outputs are unchanged.
    The trainable parameters keep their identity (optimizers keep referring to them) but become 1-D,
    holding the FREE elements only: optimizer state kept for them no longer fits (`STDET` remaps it).
    """
    if parametrized_tensors(model):
        raise RuntimeError("attach: the model already has STDET parametrizations (attached twice?)")
    names = embeddable_parameters(model, include_gdn, include, exclude)
    if not names:
        raise ValueError(
            "model: no embeddable parameters (no convolution or linear layer outside entropy models, "
            "and no include pattern matched)"
        )
    first = model.get_parameter(names[0])
    refs = nn.Parameter(torch.zeros(num_modes, dtype=first.dtype, device=first.device))
    for name in names:
        module, param_name = owner(model, name)
        mask = getattr(module, "mask", None) if param_name == "weight" else None
        weight = getattr(module, param_name)
        parametrize.register_parametrization(
            module, param_name, Embedded(weight.detach(), refs, mask, coefficient_dtype)
        )
    return refs


def embedding_state(model: nn.Module) -> dict[str, object]:
    """For each parametrized tensor, dense ``{"value", "code", "a", "b"}`` in METHOD.md's notation, plus
    ``"refs"``: ``stdet_kernels.reconstruct(**state[name], refs=state["refs"])`` is the layer's weight."""
    state: dict[str, object] = {}
    refs = None
    for name, embedded in parametrized_tensors(model).items():
        value, a, b = embedded.dense(free_values(model, name))
        state[name] = {"value": value, "code": embedded.code, "a": a, "b": b}
        refs = embedded.refs
    if refs is None:
        raise ValueError("model: has no STDET parametrizations (call attach first)")
    state["refs"] = refs.detach()
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
            if ".parametrizations." not in key and not _is_state_key(key):
                plain[key] = tensor
        for name in parametrized:
            module, param_name = owner(model, name)
            plain[name] = getattr(module, param_name).detach().clone()
    return plain


def _is_state_key(key: str) -> bool:
    return key == STATE_KEY or key.endswith("." + STATE_KEY)


def plain_state_dict(
    state_dict: Mapping[str, object], averages: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """A plain CompressAI state dict from the state dict of a model with STDET on it (works on the
    keys alone, no model needed): each parametrized tensor is reconstructed under its own key
    (``g_a.0.weight``), STDET's own state is left out, everything else is kept. With `averages` (SMA's,
    keyed like the plain state dict) a tensor that has an average is exported as its average.
    """
    plain: dict[str, torch.Tensor] = {}
    layouts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if _is_state_key(key):
            continue
        match = _PARAMETRIZED_KEY.fullmatch(key)
        if match is None:
            plain[key] = value
            continue
        layer, tensor, part = match.groups()
        name = f"{layer}.{tensor}" if layer else tensor
        layouts.setdefault(name, {})[part.removeprefix("0.")] = value
    with torch.no_grad():
        for name, parts in layouts.items():
            missing = {"original", "code", "offsets", "a", "b", "refs"} - set(parts)
            if missing:
                raise ValueError(
                    f"state_dict: parametrized tensor {name!r} lacks {', '.join(sorted(missing))}"
                )
            free = parts["original"]
            layout = (free, parts["code"], parts["offsets"], parts["a"], parts["b"], parts["refs"].to(free))
            plain[name] = stdet_kernels.reconstruct_compact(*layout)
    if averages:
        for key in plain:
            if key in averages:
                plain[key] = averages[key].detach().clone()
    return plain
