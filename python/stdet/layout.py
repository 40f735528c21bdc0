"""Storage: the flat layout of every STDET-parametrized tensor of a model, and its edits.

Every embeddable tensor lies end to end on one element axis (`stdet.trajectory.layout`'s order), in
the compact layout of `stdet_kernels.compact`: one ``code`` (uint8, one per element), one ``offsets``,
one trainable ``free_values`` (the FREE elements only), one ``a`` and ``b`` (the other elements'
coefficients), one ``refs`` (a scalar per mode), and STDET's ``sensitivity`` (one per FREE element).

One fused op computes the whole flat weight per forward of the model (a forward pre-hook), with the
SMA sample when one is due, split into each layer's view (`Embedded`, the layers'
`torch.nn.utils.parametrize` parametrization, returns it); its backward reads the layers' gradients
where autograd left them, with the sensitivity's running update in the same pass. Outside the
model's forward (CompressAI's ``compress`` calls the layers directly) a layer's first access computes
the flat weight again, once for all layers while nothing changed and gradients are off.

Edits (embed elements, release them, take a saved layout) repack the whole axis and carry the
optimizer's per-element state and the sensitivity of the elements that stay FREE over to the new
layout: one tensor each, no per-tensor loop.
"""

import math

import torch
from torch import Tensor, nn

import stdet_kernels
from stdet_kernels import DUMMY, FREE


def remap_free(array: Tensor, old_code: Tensor, new_code: Tensor) -> Tensor:
    """An array indexed by FREE element (compact order) after the FREE set changes from `old_code` to
    `new_code`: elements that stay FREE keep their entries, newly FREE ones get 0."""
    dense = torch.zeros(old_code.numel(), dtype=array.dtype, device=array.device)
    dense[old_code.reshape(-1) == FREE] = array.reshape(-1)
    return dense[new_code.reshape(-1) == FREE]


class FlatLayout(nn.Module):
    """The flat storage of a model's parametrized tensors; the model's child ``stdet``.

    Empty until `attach` (STDET's warm-up trains the plain model). `step` is the STDET object's (the
    training loop reaches it as ``model.stdet.step(loss)``), and its state travels in the model's
    state dict as this module's extra state.
    """

    def __init__(self, names: list[str], shapes: list[tuple[int, ...]], owner=None) -> None:
        super().__init__()
        self.names = list(names)
        self.shapes = [tuple(shape) for shape in shapes]
        self.sizes = [math.prod(shape) for shape in self.shapes]
        self.numel = sum(self.sizes)
        self.attached = False
        self.free_count = self.numel
        self.owner = owner  # the STDET object: its state is this module's extra state
        # Sensitivity tracking in the backward (STDET's embedding phase): (decay, measure) or None.
        self.track_sensitivity: tuple[float, str] | None = None
        # Set by `stdet.SMA`: (flat average, alpha) to update in the next reconstruction, same pass.
        self.pending_sample: tuple[Tensor, float] | None = None
        # Set by STDET: the online refit's snapshot, for the next training backward to add in its pass
        # (eager only; under torch.compile, and without a training forward, STDET adds it itself).
        self.pending_refit: stdet_kernels.RefitSnapshot | None = None
        # Set by `stdet.SMA.swap`: a flat weight to return instead of the reconstruction.
        self.override: Tensor | None = None
        self._views: tuple[Tensor, ...] | None = None  # during the model's forward
        self._cache: tuple[tuple, tuple[Tensor, ...]] | None = None  # outside it, gradients off
        self._generation = 0  # bumped by every edit
        self._masks: list[Tensor | None] = [None] * len(self.names)  # masked layers' masks
        # ref_grad="own": each mode's reference element (flat index); the references then get only
        # their own elements' gradients. None: the full reparametrized gradient.
        self.register_buffer("own_reference_index", None, persistent=False)

    # ------------------------------------------------------------------------------------------
    # Building

    @torch.no_grad()
    def attach(
        self,
        weights: list[Tensor],
        masks: list[Tensor | None],
        num_modes: int,
        coefficient_dtype: torch.dtype | None = None,
    ) -> None:
        """Take the layers' current `weights` (all FREE; a masked convolution's masked-out elements
        DUMMY with ``b = 0``) and `num_modes` zero references."""
        flat = torch.cat([w.detach().reshape(-1) for w in weights])
        # The layers' masks (the model's own buffers): their masked-out elements stay DUMMY with b = 0
        # through every edit, releases included.
        self._masks = list(masks)
        code = self.unmasked_code(torch.full((self.numel,), FREE, dtype=torch.uint8, device=flat.device))
        zeros = torch.zeros_like(flat)
        values, offsets, a, b = stdet_kernels.pack(flat, code, zeros, zeros, coefficient_dtype or flat.dtype)
        self.register_buffer("code", code)
        self.register_buffer("offsets", offsets)
        self.register_buffer("a", a)
        self.register_buffer("b", b)
        self.free_values = nn.Parameter(values)
        self.refs = nn.Parameter(torch.zeros(num_modes, dtype=flat.dtype, device=flat.device))
        self.register_buffer(
            "sensitivity", torch.zeros(values.numel(), dtype=torch.float32, device=flat.device)
        )
        self.free_count = values.numel()
        self.attached = True
        self._generation += 1

    def forward(self, x):
        """Identity: a model that calls every child in order (``nn.Sequential``) passes through."""
        return x

    def step(self, loss: float | Tensor | None = None) -> None:
        """`STDET.step`, reachable from the model: ``model.stdet.step(loss)`` in a training loop that
        is handed the model but not the STDET object (CompressAI's ``train_one_epoch``)."""
        if self.owner is None:
            raise RuntimeError(
                "model.stdet.step: this layout was made by stdet.attach, not by a STDET object"
            )
        self.owner.step(loss)

    def get_extra_state(self) -> dict:
        """The STDET object's state (names and shapes included), or the names and shapes alone for a
        layout made by `stdet.attach` without one: what `stdet.plain_state_dict` needs."""
        if self.owner is not None:
            return self.owner.state_dict()
        return {"names": list(self.names), "shapes": [list(shape) for shape in self.shapes]}

    def set_extra_state(self, state: dict) -> None:
        """Already restored by the model's load pre-hook (`STDET`), before its layers loaded."""

    # ------------------------------------------------------------------------------------------
    # The weights

    def _arguments(self) -> tuple[tuple[Tensor, ...], dict, tuple[Tensor, float] | None]:
        """The fused op's layout tensors, its options (the sensitivity update while STDET tracks it)
        and the pending SMA sample (taken: the next reconstruction updates the average)."""
        layout = (self.free_values, self.code, self.offsets, self.a, self.b, self.refs)
        options = {}
        if self.track_sensitivity is not None and torch.is_grad_enabled():
            decay, measure = self.track_sensitivity
            options = dict(sensitivity=self.sensitivity, decay=decay, measure=measure)
        sample, self.pending_sample = self.pending_sample, None
        return layout, options, sample

    def _own_references(self) -> bool:
        return self.own_reference_index is not None and self.refs.requires_grad and torch.is_grad_enabled()

    def reconstruct(self) -> Tensor:
        """The flat weight: one fused op (with the pending SMA sample, and the sensitivity update in
        its backward while STDET tracks it)."""
        if self.override is not None:
            return self.override
        own = self._own_references()
        (*layout, refs), options, sample = self._arguments()
        layout.append(refs.detach() if own else refs)
        if sample is not None:
            average, alpha = sample
            flat = stdet_kernels.reconstruct_compact_sma_(*layout, average, alpha, **options)
        else:
            flat = stdet_kernels.reconstruct_compact(*layout, **options)
        return _OwnReferenceGradient.apply(flat, self.refs, self.own_reference_index) if own else flat

    def _layer_views(self) -> tuple[Tensor, ...]:
        """The layers' views of the flat weight. While training (eager), by the fused op that splits
        the weight itself and whose backward reads the views' gradients in place: on mbt2018-mean's
        7M elements that saves a 28 MB concatenation (2 ms on 2 CPU cores) per step. Under
        torch.compile, the traced op and a plain split."""
        training = torch.is_grad_enabled() and (self.free_values.requires_grad or self.refs.requires_grad)
        if self.override is not None or torch.compiler.is_compiling() or not training:
            return self._shaped(self.reconstruct())
        layout, options, sample = self._arguments()
        if sample is not None:
            options.update(sma=sample[0], alpha=sample[1])
        if self._own_references():
            options["reference_index"] = self.own_reference_index
        refit = self.pending_refit
        if refit is not None and not refit.taken and refit.mean.numel() == self.free_values.numel():
            options["refit"] = refit
        return stdet_kernels.reconstruct_compact_pieces(*layout, self.sizes, shapes=self.shapes, **options)

    def _shaped(self, flat: Tensor) -> tuple[Tensor, ...]:
        """The layers' views of a flat weight, each of its layer's shape."""
        return tuple(
            piece.view(shape)
            for piece, shape in zip(flat.split_with_sizes(self.sizes), self.shapes, strict=True)
        )

    def begin_forward(self, *_) -> None:
        """The model's forward pre-hook: the flat weight once for every layer of this forward."""
        if self.attached:
            self._views = self._layer_views()

    def end_forward(self, *_) -> None:
        """The model's forward hook (also when the forward raises): views of this forward are not
        reused after it."""
        self._views = None

    def view(self, index: int) -> Tensor:
        """Layer `index`'s weight."""
        views = self._views if self._views is not None else self._views_outside_forward()
        return views[index]

    def _views_outside_forward(self) -> tuple[Tensor, ...]:
        if torch.is_grad_enabled() or self.pending_sample is not None:
            return self._layer_views()
        key = (
            self._generation,
            self.free_values._version,
            self.refs._version,
            id(self.override),
            self.free_values.data_ptr(),
        )
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._shaped(self.reconstruct()))
        return self._cache[1]

    @torch.no_grad()
    def weights(self) -> Tensor:
        """The current flat weight (float, detached)."""
        return self.reconstruct().detach()

    def flush(self) -> None:
        """Take a pending SMA sample now (one fused reconstruction)."""
        if self.attached and self.pending_sample is not None:
            with torch.no_grad():
                self.reconstruct()

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """A flat array as name -> view of the tensor's shape."""
        return {
            name: piece.view(shape)
            for name, piece, shape in zip(
                self.names, flat.split_with_sizes(self.sizes), self.shapes, strict=True
            )
        }

    def unmasked_code(self, code: Tensor) -> Tensor:
        """`code` with every masked-out element of a masked layer (CompressAI's `MaskedConv2d`)
        DUMMY, in place: with b = 0 there the reconstruction is masked, whatever the layer's forward
        writes into its weight."""
        for piece, mask in zip(self._pieces(code), self._masks, strict=True):
            if mask is not None:
                piece[mask.reshape(-1).to(piece.device) == 0] = DUMMY
        return code

    def _pieces(self, flat: Tensor) -> tuple[Tensor, ...]:
        return flat.split_with_sizes(self.sizes)

    # ------------------------------------------------------------------------------------------
    # Edits

    def dense(self) -> tuple[Tensor, Tensor, Tensor]:
        """(value, a, b) over all elements, free_values' dtype; 0 where nothing is stored."""
        value, a, b = stdet_kernels.unpack(self.free_values.detach(), self.code, self.a, self.b)
        return value, a.to(value.dtype), b.to(value.dtype)

    @torch.no_grad()
    def repack(
        self,
        value: Tensor,
        code: Tensor,
        a: Tensor,
        b: Tensor,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """Take a new dense state. ``free_values`` is resized in place (``set_``), so optimizers keep
        referring to it; `optimizer`'s per-element state and the sensitivity follow the FREE set."""
        old_code = self.code.clone()
        values, offsets, new_a, new_b = stdet_kernels.pack(value, code, a, b, self.a.dtype)
        self.code.copy_(code.reshape(-1))
        self.offsets, self.a, self.b = offsets, new_a, new_b
        self.free_values.set_(values.to(self.free_values.dtype))
        self.free_values.grad = None
        self.free_count = values.numel()
        self.sensitivity = remap_free(self.sensitivity, old_code, self.code)
        if optimizer is not None:
            self.remap_optimizer_state(optimizer, old_code, self.code)
        self._generation += 1

    def edit(self, indices: Tensor, code, value=None, a=None, b=None, optimizer=None) -> None:
        """Set code (a mode, DUMMY or FREE; one for all or one each) and, where given, value, a, b of
        flat elements `indices`, and repack."""
        dense_value, dense_a, dense_b = self.dense()
        new_code = self.code.clone()
        at = indices.to(new_code.device)
        new_code[at] = code.to(new_code.device) if isinstance(code, Tensor) else code
        for dense, update in ((dense_value, value), (dense_a, a), (dense_b, b)):
            if update is not None:
                dense[at] = update.to(dense) if isinstance(update, Tensor) else update
        self.repack(dense_value, new_code, dense_a, dense_b, optimizer)

    @torch.no_grad()
    def embed_references(self, references: Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Embed each mode's reference element (flat index `references`, FREE until now) in its mode
        with ``a = 1, b = 0``: ``refs`` take their values and `optimizer`'s state of them (per-element
        state such as Adam's moments at their places, scalar state such as its step as it is), so
        their training carries on rather than restarting from zero at a late step."""
        free = (self.code == FREE).to(torch.int64)
        positions = (free.cumsum(0) - 1)[references.to(free.device)]  # in free_values
        self.refs.copy_(self.free_values[positions].to(self.refs.dtype))
        if optimizer is not None:
            refs_state = optimizer.state[self.refs]
            for key, value in optimizer.state.get(self.free_values, {}).items():
                if self._per_element(value):
                    refs_state[key] = value[positions].to(self.refs.dtype)
                else:
                    refs_state[key] = value.clone() if isinstance(value, Tensor) else value
        modes = torch.arange(references.numel(), dtype=torch.uint8)
        ones, zeros = torch.ones(references.numel()), torch.zeros(references.numel())
        self.edit(references, modes, a=ones, b=zeros, optimizer=optimizer)

    def _per_element(self, value: object) -> bool:
        """Whether an optimizer-state entry of ``free_values`` holds one entry per FREE element."""
        return isinstance(value, Tensor) and value.dim() > 0 and value.numel() == self.free_count

    @torch.no_grad()
    def release_all(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Every element becomes FREE with its current value, but the masked-out elements of a
        masked layer, which stay DUMMY (0). The newly FREE elements' per-element
        optimizer state starts from its tensor's mean over the elements that were FREE (each tensor's
        typical second moment, rather than Adam's zero, whose first steps at a late step count are
        several times the lr in size); a tensor with none FREE takes the mean over all."""
        old_code = self.code.clone()
        state = {} if optimizer is None else optimizer.state.get(self.free_values, {})
        means = {
            key: self._tensor_means(tensor, old_code)
            for key, tensor in state.items()
            if self._per_element(tensor)
        }
        value = self.weights().to(self.free_values.dtype)  # every element's current value
        released = self.unmasked_code(torch.full_like(old_code, FREE))
        zeros = torch.zeros_like(value)
        self.repack(value, released, zeros, zeros, optimizer)
        newly_free = (old_code != FREE) & (released == FREE)
        for key, dense_mean in means.items():
            state[key][newly_free] = dense_mean[newly_free].to(state[key].dtype)

    def _tensor_means(self, array: Tensor, code: Tensor) -> Tensor:
        """Per element, the mean of `array` (indexed by FREE element) over its tensor's FREE elements."""
        sizes = torch.tensor(self.sizes, device=array.device)
        tensor_of = torch.repeat_interleave(torch.arange(len(self.sizes), device=array.device), sizes)
        free_tensor = tensor_of[code.to(array.device) == FREE]
        values = array.reshape(-1).float()
        sums = torch.zeros(len(self.sizes), device=array.device).index_add_(0, free_tensor, values)
        counts = torch.bincount(free_tensor, minlength=len(self.sizes))
        overall = values.mean() if values.numel() else torch.zeros((), device=array.device)
        means = torch.where(counts > 0, sums / counts.clamp(min=1), overall)
        return means.repeat_interleave(sizes)

    def take_layout(self, code: Tensor, optimizer=None) -> None:
        """Lay the storage out for `code` (a saved layout) so that a saved state dict fits; the values
        themselves come with that state dict."""
        zeros = torch.zeros(self.numel, dtype=self.free_values.dtype, device=self.code.device)
        self.repack(zeros, code.to(self.code.device), zeros, zeros, optimizer)

    def remap_optimizer_state(
        self, optimizer: torch.optim.Optimizer, old_code: Tensor, new_code: Tensor
    ) -> None:
        """Per-element optimizer state of ``free_values`` (moments, momentum buffers) follows its FREE
        set from `old_code` to `new_code`; scalar state (Adam's step) stays."""
        state = optimizer.state.get(self.free_values, {})
        old_numel = int((old_code == FREE).sum())
        for key, tensor in list(state.items()):
            if isinstance(tensor, Tensor) and tensor.dim() > 0 and tensor.numel() == old_numel:
                state[key] = remap_free(tensor, old_code, new_code)

    def take_over(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], group: int) -> None:
        """The optimizer trains ``free_values`` and ``refs`` (in param group `group`) instead of the
        layers' own `params`; their per-element state is laid end to end and follows the FREE set."""
        held = {id(p) for p in params}
        per_element: dict[str, list[Tensor]] = {}
        scalars: dict[str, object] = {}
        for param, size in zip(params, self.sizes, strict=True):  # (params may be emptied already)
            for key, value in optimizer.state.pop(param, {}).items():
                if isinstance(value, Tensor) and value.dim() > 0 and value.numel() == size:
                    per_element.setdefault(key, []).append(value.reshape(-1))
                else:
                    scalars.setdefault(key, value)
        for g in optimizer.param_groups:
            g["params"] = [p for p in g["params"] if id(p) not in held]
        optimizer.param_groups[group]["params"] += [self.free_values, self.refs]
        state = dict(scalars)
        state.update(
            {key: torch.cat(parts) for key, parts in per_element.items() if len(parts) == len(params)}
        )
        if state:
            all_free = torch.full_like(self.code, FREE)
            optimizer.state[self.free_values] = state
            self.remap_optimizer_state(optimizer, all_free, self.code)

    # ------------------------------------------------------------------------------------------
    # Counts

    def embedded_fraction(self) -> float:
        """Elements that are not FREE (references included) over all elements."""
        return 1.0 - self.free_count / self.numel


class _OwnReferenceGradient(torch.autograd.Function):
    """Identity on the flat weight whose backward gives ``refs`` their reference elements' own
    gradients (``ref_grad="own"``); the fused op, called with detached refs, gives them nothing."""

    @staticmethod
    def forward(ctx, flat: Tensor, refs: Tensor, reference_index: Tensor) -> Tensor:
        ctx.save_for_backward(reference_index)
        ctx.refs_dtype = refs.dtype
        return flat.view_as(flat)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        (reference_index,) = ctx.saved_tensors
        return grad, grad[reference_index].to(ctx.refs_dtype), None
