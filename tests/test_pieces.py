"""`reconstruct_compact_pieces` (issue 11, point 2): the flat weight as views of a model's layers,
whose backward reads the layers' gradients in place. Every backend against its own flat op (bit for
bit: the views' gradients laid end to end are the flat gradient) and against the reference, with
pieces across block boundaries, of no elements, and with no gradient; the SMA update, the
sensitivity update and ``ref_grad="own"``; one launch per forward and per backward; bad inputs."""

import itertools

import pytest
import torch
from helpers import MIXES, Target, compact_case_id, make_inputs, require

import stdet_kernels
from stdet_kernels import COMPACT_BLOCK, FREE

SIZES = (1, 2, 1023, 4097, 100_003)  # 100_003 is prime
F32 = torch.float32
CASES = (
    [(n, mix, 10, F32, F32) for n in SIZES for mix in MIXES]
    + [(n, "mixed", modes, F32, F32) for modes in (1, 254) for n in (2, 4097)]
    + [(4097, "mixed", 10, F32, coef) for coef in (torch.bfloat16, torch.float16)]
    + [(4097, "mixed", 10, dtype, dtype) for dtype in (torch.bfloat16, torch.float16)]
)


def _sizes(n: int, generator: torch.Generator) -> list[int]:
    """Pieces adding up to n: random cuts (most pieces cross a block boundary), a piece of no
    elements, and, from 3 elements on, a piece of one element."""
    cuts = sorted(torch.randint(0, n + 1, (5,), generator=generator).tolist())
    edges = [0, *cuts, n]
    sizes = [hi - lo for lo, hi in itertools.pairwise(edges)]
    sizes.insert(1, 0)
    if n >= 3 and sizes[0] > 1:
        sizes[:1] = [1, sizes[0] - 1]
    return sizes


def _problem(case, seed: int = 0):
    n, mix, modes, dtype, coef = case
    x = make_inputs(n, modes, mix, dtype, seed=seed + n + modes)
    free_values, offsets, a, b = stdet_kernels.pack(x.value, x.code, x.a, x.b, coef)
    generator = torch.Generator().manual_seed(seed + 1)
    sizes = _sizes(n, generator)
    grads = [torch.randn(size, generator=generator).to(dtype) for size in sizes]
    unused = max(range(len(sizes)), key=lambda k: sizes[k])  # the largest piece gets no gradient
    if len(sizes) > 2:
        grads[unused] = None
    sensitivity = torch.rand(free_values.numel(), generator=generator)
    return (free_values, x.code, offsets, a, b, x.refs), sizes, grads, sensitivity


def _flat(grads, sizes, like) -> torch.Tensor:
    return torch.cat([like.new_zeros(s) if g is None else g for g, s in zip(grads, sizes, strict=True)])


def _run_pieces(target, compact, sizes, grads, **options):
    """(w, dL/dfree_values, dL/drefs) through the pieces op on `target`."""
    free_values, code, offsets, a, b, refs = target.put(*compact)
    fv, r = free_values.clone().requires_grad_(), refs.clone().requires_grad_()
    with stdet_kernels.use_backend(target.backend):
        views = stdet_kernels.reconstruct_compact_pieces(fv, code, offsets, a, b, r, sizes, **options)
        assert [v.numel() for v in views] == sizes
        used = [(v, g.to(target.device)) for v, g in zip(views, grads, strict=True) if g is not None]
        torch.autograd.backward([v for v, _ in used], [g for _, g in used])
    return torch.cat(views).detach().cpu(), fv.grad.cpu(), r.grad.cpu()


def _run_flat(target, compact, grad, **options):
    free_values, code, offsets, a, b, refs = target.put(*compact)
    fv, r = free_values.clone().requires_grad_(), refs.clone().requires_grad_()
    with stdet_kernels.use_backend(target.backend):
        if "sma" in options:
            w = stdet_kernels.reconstruct_compact_sma_(
                fv, code, offsets, a, b, r, options.pop("sma"), options.pop("alpha"), **options
            )
        else:
            w = stdet_kernels.reconstruct_compact(fv, code, offsets, a, b, r, **options)
        w.backward(grad.to(target.device))
    return w.detach().cpu(), fv.grad.cpu(), r.grad.cpu()


@pytest.mark.parametrize("case", CASES, ids=compact_case_id)
def test_pieces_give_the_flat_ops_bits(target: Target, case) -> None:
    compact, sizes, grads, _ = _problem(case)
    grad = _flat(grads, sizes, compact[0])
    pieces = _run_pieces(target, compact, sizes, grads)
    flat = _run_flat(target, compact, grad)
    for name, got, expected in zip(("w", "dL/dfree_values", "dL/drefs"), pieces, flat, strict=True):
        assert torch.equal(got, expected), name
    # And the reference's FREE gradient: the flat gradient at the FREE elements, exactly.
    assert torch.equal(pieces[1], grad[compact[1] == FREE])


SMA_CASES = [c for c in CASES if c[0] in (4097, 100_003) or c[2] != 10]


@pytest.mark.parametrize("case", SMA_CASES, ids=compact_case_id)
def test_pieces_with_sma_and_sensitivity_give_the_flat_ops_bits(target: Target, case) -> None:
    compact, sizes, grads, sensitivity = _problem(case, seed=5)
    grad = _flat(grads, sizes, compact[0])
    average = torch.randn(compact[1].shape, generator=torch.Generator().manual_seed(9)).to(compact[0].dtype)
    results = []
    for run in (_run_pieces, _run_flat):
        (tracked, sma) = target.put(sensitivity.clone(), average.clone())
        options = dict(sma=sma, alpha=0.3, sensitivity=tracked, decay=0.9, measure="fisher")
        got = (
            run(target, compact, sizes, grads, **options)
            if run is _run_pieces
            else run(target, compact, grad, **options)
        )
        results.append((*got, tracked.cpu(), sma.cpu()))
    names = ("w", "dL/dfree_values", "dL/drefs", "sensitivity", "average")
    for name, got, expected in zip(names, *results, strict=True):
        assert torch.equal(got, expected), name


def test_cpp_reads_the_pieces_in_place_and_matches_the_reference() -> None:
    """The C++ backend's pieces kernel (no concatenation) against the reference's, pieces starting
    and ending inside blocks and on their edges."""
    cpp = require(Target("cpp", "cpu"))
    case = (5 * COMPACT_BLOCK + 7, "mixed", 10, F32, torch.bfloat16)
    compact, _, _, sensitivity = _problem(case, seed=2)
    n = case[0]
    sizes = [COMPACT_BLOCK, 3, COMPACT_BLOCK - 3, 0, 2 * COMPACT_BLOCK + 5, n - 4 * COMPACT_BLOCK - 5]
    generator = torch.Generator().manual_seed(4)
    grads = [torch.randn(s, generator=generator) for s in sizes]
    grads[2] = None
    results = {}
    for backend in ("cpp", "torch"):
        tracked = sensitivity.clone()
        options = dict(sensitivity=tracked, decay=0.5, measure="taylor")
        run = _run_pieces(Target(backend, cpp.device), compact, sizes, grads, **options)
        results[backend] = (*run, tracked)
    (w, free, refs, tracked), (w_ref, free_ref, refs_ref, tracked_ref) = results.values()
    assert torch.equal(w, w_ref) and torch.equal(free, free_ref)
    torch.testing.assert_close(tracked, tracked_ref, rtol=1e-6, atol=0)
    # The refs gradient sums thousands of terms in another order: within float32 rounding of their
    # magnitudes.
    free_values, code, offsets, a, _, refs_in = compact
    grad = _flat(grads, sizes, free_values).abs()
    magnitude = stdet_kernels.reference.reconstruct_compact_backward(
        grad, code, offsets, a.float().abs(), refs_in
    )[1]
    assert torch.all((refs - refs_ref).abs() <= 1e-5 * magnitude + 1e-6)


def test_own_reference_gradient_is_the_reference_elements_gradient() -> None:
    compact, sizes, grads, _ = _problem((4097, "mixed", 10, F32, F32), seed=3)
    grad = _flat(grads, sizes, compact[0])
    index = torch.randperm(4097, generator=torch.Generator().manual_seed(0))[:10]
    _, _, refs_grad = _run_pieces(Target("cpp", "cpu"), compact, sizes, grads, reference_index=index)
    assert torch.equal(refs_grad, grad[index])


def test_one_launch_forward_and_one_backward() -> None:
    compact, sizes, grads, sensitivity = _problem((4097, "mixed", 10, F32, F32))
    with stdet_kernels.record_calls() as calls:
        _run_pieces(Target("cpp", "cpu"), compact, sizes, grads, sensitivity=sensitivity)
    assert [op for op, _ in calls] == [
        "reconstruct_compact",
        "reconstruct_compact_backward_pieces_sensitivity_",
    ]


def test_without_gradients_no_autograd_and_views_of_one_weight() -> None:
    compact, sizes, _, _ = _problem((4097, "mixed", 10, F32, F32))
    views = stdet_kernels.reconstruct_compact_pieces(*compact, sizes)
    assert all(v.grad_fn is None for v in views)
    torch.testing.assert_close(torch.cat(views), stdet_kernels.reconstruct_compact(*compact), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("argument", "replacement", "error", "message"),
    [
        ("sizes", [1, 2], ValueError, "^sizes: expected"),
        ("sizes", [4098, -1], ValueError, "^sizes: expected"),
        ("reference_index", torch.zeros(3, dtype=torch.int64), ValueError, "^reference_index: expected"),
        ("reference_index", torch.zeros(10), ValueError, "^reference_index: expected"),
        ("sma", torch.zeros(3), ValueError, "^sma: expected"),
        ("sensitivity", torch.zeros(3), ValueError, "^sensitivity: expected"),
    ],
)
def test_bad_arguments_are_rejected(argument, replacement, error, message) -> None:
    compact, sizes, _, _ = _problem((4097, "mixed", 10, F32, F32))
    options = {"sizes": sizes, argument: replacement}
    if argument == "sma":
        options["alpha"] = 0.5
    with pytest.raises(error, match=message):
        stdet_kernels.reconstruct_compact_pieces(*compact, **options)


def test_all_free_views_are_free_values_itself() -> None:
    """Every element FREE (a released layout): no forward kernel, the views share free_values'
    memory, and the backward is the gradient's copy (with the sensitivity update)."""
    compact, sizes, grads, sensitivity = _problem((4097, "all_free", 10, F32, F32))
    free_values = compact[0].clone().requires_grad_()
    with stdet_kernels.record_calls() as calls:
        views = stdet_kernels.reconstruct_compact_pieces(
            free_values, *compact[1:], sizes, sensitivity=sensitivity.clone()
        )
        used = [(v, g) for v, g in zip(views, grads, strict=True) if g is not None]
        torch.autograd.backward([v for v, _ in used], [g for _, g in used])
    assert [op for op, _ in calls] == ["reconstruct_compact_backward_pieces_sensitivity_"]
    start = free_values.data_ptr()
    for view, offset in zip(views, itertools.accumulate([0, *sizes[:-1]]), strict=True):
        assert view.untyped_storage().data_ptr() == free_values.untyped_storage().data_ptr()
        assert view.numel() == 0 or view.data_ptr() == start + 4 * offset
    assert torch.equal(free_values.grad, _flat(grads, sizes, compact[0]))


def test_a_strided_sensitivity_is_written_back() -> None:
    compact, sizes, grads, _ = _problem((4097, "mixed", 10, F32, F32))
    free_count = compact[0].numel()
    strided = torch.ones(2 * free_count)[::2]
    expected = torch.ones(free_count)
    _run_pieces(Target("cpp", "cpu"), compact, sizes, grads, sensitivity=strided, decay=0.5)
    _run_pieces(Target("cpp", "cpu"), compact, sizes, grads, sensitivity=expected, decay=0.5)
    assert not torch.equal(expected, torch.ones(free_count)) and torch.equal(strided, expected)


@pytest.mark.parametrize("mix", ["mixed", "all_free"])
def test_compiles_with_fullgraph_and_matches_eager(mix: str) -> None:
    compact, sizes, _, _ = _problem((4097, mix, 10, F32, F32))
    weights = torch.linspace(-1, 1, len(sizes)).tolist()

    def loss(free_values, refs):
        views = stdet_kernels.reconstruct_compact_pieces(free_values, *compact[1:5], refs, sizes)
        return sum(w * v.square().sum() for w, v in zip(weights, views, strict=True))

    results = []
    for function in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        free_values, refs = compact[0].clone().requires_grad_(), compact[5].clone().requires_grad_()
        value = function(free_values, refs)
        value.backward()
        results.append((value.detach(), free_values.grad, refs.grad))
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_reference_index_out_of_range_is_rejected() -> None:
    compact, sizes, _, _ = _problem((4097, "mixed", 10, F32, F32))
    index = torch.arange(10)
    index[3] = 4097
    with pytest.raises(ValueError, match=r"^reference_index: expected indices in \[0, 4097\)"):
        stdet_kernels.reconstruct_compact_pieces(*compact, sizes, reference_index=index)


def test_shaped_views_are_the_flat_views_reshaped() -> None:
    compact, sizes, grads, _ = _problem((4097, "mixed", 10, F32, F32))
    shapes = [(size,) if size % 2 else (2, size // 2) for size in sizes]
    free_values = compact[0].clone().requires_grad_()
    views = stdet_kernels.reconstruct_compact_pieces(free_values, *compact[1:], sizes, shapes=shapes)
    assert [tuple(v.shape) for v in views] == shapes
    used = [(v, g.view(v.shape)) for v, g in zip(views, grads, strict=True) if g is not None]
    torch.autograd.backward([v for v, _ in used], [g for _, g in used])
    _, expected_free, _ = _run_pieces(Target("cpp", "cpu"), compact, sizes, grads)
    assert torch.equal(free_values.grad, expected_free)
    with pytest.raises(ValueError, match="^shapes: expected"):
        stdet_kernels.reconstruct_compact_pieces(*compact, sizes, shapes=[(s + 1,) for s in sizes])


@pytest.mark.parametrize(
    "extras",
    [(), ("sensitivity",), ("sensitivity", "sma"), ("refit",), ("sensitivity", "refit")],
    ids=["plain", "sensitivity", "sensitivity and SMA", "refit", "sensitivity and refit"],
)
def test_the_eager_path_matches_the_custom_ops_and_bumps_what_they_mutate(monkeypatch, extras) -> None:
    """In eager mode the pieces path calls the ops' bodies directly (no dispatcher round trip): the
    same bits as through the custom ops, and the same version bumps of the tensors written in place
    (the SMA average, the sensitivity, the refit's moments), which autograd's saved-tensor checks
    rely on."""
    import stdet_kernels.compact as compact_module

    compact, sizes, grads, sensitivity = _problem((4097, "mixed", 10, F32, F32))
    free = compact[0].numel()
    generator = torch.Generator().manual_seed(5)
    moments = [torch.randn(free, generator=generator) for _ in range(3)]
    moments[1] = moments[1].abs()
    element_mode = torch.randint(0, 10, (free,), generator=generator, dtype=torch.uint8)
    deviation = torch.randn(10, generator=generator)
    results = []
    for eager in (True, False):
        monkeypatch.setattr(compact_module, "_eager", lambda code, eager=eager: eager)
        options, written = {}, {}
        if "sensitivity" in extras:
            options["sensitivity"] = written["sensitivity"] = sensitivity.clone()
        if "sma" in extras:
            options.update(sma=torch.zeros(4097), alpha=0.5)
            written["sma"] = options["sma"]
        if "refit" in extras:
            refit = stdet_kernels.RefitSnapshot(*(m.clone() for m in moments), element_mode, deviation, 2)
            options["refit"] = refit
            written.update(zip(("mean", "moment2", "comoment"), refit.arguments()[:3], strict=True))
        versions = {name: tensor._version for name, tensor in written.items()}
        outputs = _run_pieces(Target("cpp", "cpu"), compact, sizes, grads, **options)
        bumps = {name: tensor._version - versions[name] for name, tensor in written.items()}
        assert "refit" not in options or options["refit"].done
        results.append(([*outputs, *written.values()], bumps))
    (eager_tensors, eager_bumps), (op_tensors, op_bumps) = results
    for ours, theirs in zip(eager_tensors, op_tensors, strict=True):
        assert torch.equal(ours, theirs)
    assert eager_bumps == op_bumps and all(bump >= 1 for bump in op_bumps.values()), (eager_bumps, op_bumps)
