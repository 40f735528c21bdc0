"""The online refit's snapshot fused into the compact pieces backward (issue 11: a refit step costs
no launch of its own). Every backend against the reference (`reference.refit_update_` after the
pieces backward): dL/dfree_values, dL/drefs, the sensitivity when tracked, and the refit's three
moments, over odd sizes, code mixes, numbers of modes, dtypes and counts; the autograd path through
`reconstruct_compact_pieces(..., refit=...)`; one launch; thread counts; bad inputs; and STDET's
training step, whose snapshot is the FREE values its backward read."""

import pytest
import torch
from helpers import MIXES, ConvStack, Target, assert_verbose_close, compact_refs_bound, make_inputs, require

import stdet_kernels
from stdet_kernels import FREE, RefitSnapshot, reference

SIZES = (1, 2, 1023, 4097, 100_003)  # 100_003 is prime
F32 = torch.float32
CASES = (
    # (n, mix, modes, value dtype, coefficient dtype, sensitivity measure or None, count)
    [(n, mix, 10, F32, F32, None, 3) for n in SIZES for mix in MIXES]
    + [(n, mix, 10, F32, F32, "taylor", 1) for n in (1023, 100_003) for mix in MIXES]
    + [(n, "mixed", modes, F32, F32, "fisher", 7) for modes in (1, 254) for n in (2, 4097)]
    + [(4097, "mixed", 0, F32, F32, None, 2), (4097, "all_free", 0, F32, F32, "taylor", 2)]
    + [
        (4097, "mixed", 10, dtype, coef, measure, 5)
        for dtype in (torch.bfloat16, torch.float16)
        for coef in (dtype, F32)
        for measure in (None, "taylor")
    ]
    + [(100_003, "all_free", 254, torch.float16, torch.bfloat16, "taylor", 9)]
)


def _id(case) -> str:
    n, mix, modes, dtype, coef, measure, count = case
    name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    return f"{n}-{mix}-{modes}modes-{name(dtype)}-coef_{name(coef)}-{measure or 'nosens'}-count{count}"


def _problem(n: int, mix: str, modes: int, dtype: torch.dtype, coef: torch.dtype, seed: int = 0):
    """(pieces, sizes, free_values, code, offsets, a, refs, sensitivity, moments, mode, deviation): a
    packed layout, its gradient in three pieces (the middle one given none when it has elements),
    a running sensitivity, and the refit's moments, one entry per FREE element."""
    x = make_inputs(n, max(modes, 1), mix, dtype, seed=seed + n + modes)
    code = x.code if modes else torch.where(x.code < FREE - 1, torch.full_like(x.code, FREE), x.code)
    refs = x.refs if modes else x.refs[:0]
    free_values, offsets, a, _ = stdet_kernels.pack(x.value, code, x.a, x.b, coef)
    generator = torch.Generator().manual_seed(seed + 1)
    grad = torch.randn(n, generator=generator).to(dtype)
    sizes = [n // 3, n // 3, n - 2 * (n // 3)]
    pieces = list(grad.split(sizes))
    if sizes[1]:
        pieces[1] = grad.new_empty(0)  # a layer that got no gradient: zeros
        grad[sizes[0] : sizes[0] + sizes[1]] = 0
    free = free_values.numel()
    sensitivity = torch.rand(free, generator=generator)
    moments = [torch.randn(free, generator=generator) for _ in range(3)]
    moments[1] = moments[1].abs()
    mode = torch.randint(0, max(modes, 1), (free,), generator=generator, dtype=torch.uint8)
    deviation = torch.randn(modes, generator=generator)
    return pieces, sizes, free_values, code, offsets, a, refs, sensitivity, moments, mode, deviation, grad


def _expected(problem, measure, count):
    pieces, sizes, free_values, code, offsets, a, refs, sensitivity, moments, mode, deviation, _ = problem
    sensitivity = None if measure is None else sensitivity.clone()
    moments = [m.clone() for m in moments]
    result = reference.reconstruct_compact_backward_pieces_refit_(
        pieces, sizes, free_values, code, offsets, a, refs, sensitivity, 0.9, measure == "fisher",
        *moments, mode, deviation, count,
    )  # fmt: skip
    return result, sensitivity, moments


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_fused_refit_backward_matches_reference(target: Target, case) -> None:
    n, mix, modes, dtype, coef, measure, count = case
    problem = _problem(n, mix, modes, dtype, coef)
    pieces, sizes, free_values, code, offsets, a, refs, sensitivity, moments, mode, deviation, grad = problem
    (expected_free, expected_refs), expected_sensitivity, expected_moments = _expected(
        problem, measure, count
    )

    put = target.put
    running = put(sensitivity.clone())[0] if measure is not None else None
    got_moments = list(put(*(m.clone() for m in moments)))
    with stdet_kernels.use_backend(target.backend), stdet_kernels.record_calls() as calls:
        grad_free, grad_refs = torch.ops.stdet.reconstruct_compact_backward_pieces_refit_(
            list(put(*pieces)), sizes, *put(free_values, code, offsets, a, refs), running, 0.9,
            measure or "taylor", *got_moments, *put(mode, deviation), count,
        )  # fmt: skip
    assert calls == [("reconstruct_compact_backward_pieces_refit_", target.backend)]

    grad_free, grad_refs = grad_free.cpu(), grad_refs.cpu()
    assert grad_free.dtype == dtype and torch.equal(grad_free, grad[code == FREE])
    assert torch.equal(expected_free, grad_free)
    exact_refs, refs_bound = compact_refs_bound(grad, code, offsets, a, refs)
    assert grad_refs.dtype == refs.dtype
    assert_verbose_close("dL/drefs", grad_refs, exact_refs, refs_bound)
    assert_verbose_close("dL/drefs (reference)", expected_refs, exact_refs, refs_bound)
    if measure is not None:
        assert torch.equal(running.cpu(), expected_sensitivity)
    for name, got, expected in zip(
        ("mean", "moment2", "comoment"), got_moments, expected_moments, strict=True
    ):
        # float32 as written, no fused multiply-add, on every backend: the reference's bits
        assert torch.equal(got.cpu(), expected), (name, (got.cpu() - expected).abs().max())
    if modes == 0:  # no references: the co-moments stay as they were
        assert torch.equal(got_moments[2].cpu(), moments[2])


def test_the_fused_refit_does_not_depend_on_the_thread_count() -> None:
    require(Target("cpp", "cpu"))
    problem = _problem(100_003, "mixed", 10, F32, F32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            moments = [m.clone() for m in problem[8]]
            pieces, sizes, free_values, code, offsets, a, refs, sensitivity = problem[:8]
            with stdet_kernels.use_backend("cpp"):
                torch.ops.stdet.reconstruct_compact_backward_pieces_refit_(
                    pieces, sizes, free_values, code, offsets, a, refs, sensitivity.clone(), 0.9,
                    "taylor", *moments, problem[9], problem[10], 4,
                )  # fmt: skip
            results.append(moments)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for other in results[1:] for x, y in zip(results[0], other, strict=True))


def _snapshot(problem, count: int = 2) -> RefitSnapshot:
    moments, mode, deviation = problem[8], problem[9], problem[10]
    return RefitSnapshot(*(m.clone() for m in moments), mode, deviation, count)


@pytest.mark.parametrize("backend", ("torch", "cpp", "triton"))
@pytest.mark.parametrize("measure", (None, "taylor"))
def test_reconstruct_compact_pieces_takes_the_snapshot_in_its_backward(backend, measure) -> None:
    """Same gradients as without the refit; the moments as refit_update_ of the values the forward
    saw; the snapshot marked taken by the forward and done by the backward; one backward launch."""
    require(Target(backend, "cpu"))
    problem = _problem(5000, "mixed", 7, F32, F32)
    _, sizes, free_values, code, offsets, a, refs, sensitivity = problem[:8]
    b = torch.randn(a.shape)
    expected = _snapshot(problem)
    stdet_kernels.refit_update_(free_values, *expected.arguments())
    runs = []
    for refit in (None, _snapshot(problem)):
        values = free_values.clone().requires_grad_()
        weights = refs.clone().requires_grad_()
        options = {} if measure is None else dict(sensitivity=sensitivity.clone(), measure=measure)
        with stdet_kernels.use_backend(backend), stdet_kernels.record_calls() as calls:
            views = stdet_kernels.reconstruct_compact_pieces(
                values, code, offsets, a, b, weights, sizes, refit=refit, **options
            )
            assert refit is None or (refit.taken and not refit.done)
            loss = sum((view * torch.arange(view.numel())).sum() for view in views)
            loss.backward()
        runs.append((values.grad, weights.grad, options.get("sensitivity")))
        if refit is not None:
            assert refit.done and [c[0] for c in calls][1:] == ["reconstruct_compact_backward_pieces_refit_"]
            for got, want in zip(refit.arguments()[:3], expected.arguments()[:3], strict=True):
                assert torch.equal(got, want)
    (grad_plain, refs_plain, sens_plain), (grad_fused, refs_fused, sens_fused) = runs
    assert torch.equal(grad_plain, grad_fused) and torch.equal(refs_plain, refs_fused)
    assert sens_plain is None or torch.equal(sens_plain, sens_fused)


def test_without_gradients_the_snapshot_is_left_as_it_is() -> None:
    problem = _problem(3000, "mixed", 4, F32, F32)
    _, sizes, free_values, code, offsets, a, refs = problem[:7]
    refit = _snapshot(problem)
    before = [t.clone() for t in refit.arguments()[:3]]
    with torch.no_grad():
        stdet_kernels.reconstruct_compact_pieces(
            free_values.requires_grad_(), code, offsets, a, torch.zeros_like(a), refs, sizes, refit=refit
        )
    assert not refit.taken and not refit.done
    assert all(torch.equal(x, y) for x, y in zip(before, refit.arguments()[:3], strict=True))


def test_bad_refit_arguments_name_the_argument() -> None:
    problem = _problem(3000, "mixed", 4, F32, F32)
    _, sizes, free_values, code, offsets, a, refs = problem[:7]
    layout = (free_values.clone().requires_grad_(), code, offsets, a, torch.zeros_like(a), refs)

    def call(refit):
        return stdet_kernels.reconstruct_compact_pieces(*layout, sizes, refit=refit)

    with pytest.raises(TypeError, match="^refit: "):
        call((1, 2))
    taken = _snapshot(problem)
    taken.taken = True
    with pytest.raises(ValueError, match="^refit: "):
        call(taken)
    good = _snapshot(problem)
    for name, bad, error in [
        ("mean", good.mean[:-1], ValueError),
        ("moment2", good.moment2.double(), TypeError),
        ("mode", good.mode.long(), TypeError),
        ("mode", torch.full_like(good.mode, 4), ValueError),  # 4 modes: 0..3
        ("ref_deviation", good.ref_deviation.double(), TypeError),
    ]:
        snapshot = _snapshot(problem)
        setattr(snapshot, name, bad)
        with pytest.raises(error, match=f"^{name}: "):
            call(snapshot)
    snapshot = _snapshot(problem)
    snapshot.count = 0
    with pytest.raises(ValueError, match="^count: "):
        call(snapshot)


def _training_step(model, optimizer, st, step: int, backward: bool = True) -> None:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(step))
    optimizer.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), x)
    if backward:
        loss.backward()
    optimizer.step()
    st.step(loss.detach())


def _attached_with_a_begun_snapshot():
    """(model, optimizer, STDET, next step): trained until attached and a snapshot begun ahead."""
    import stdet

    torch.manual_seed(0)
    model = ConvStack()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    config = stdet.STDETConfig(
        warmup_steps=4, snapshots=2, modes=2, samples=20, embed_every=3, embed_rate=0.3, start="warmup"
    )
    st = stdet.STDET(model, optimizer, config)
    step = 0
    while not st.layout.attached or (st.step_count + 1) % st.snapshot_interval:
        _training_step(model, optimizer, st, step)
        step += 1
    return model, optimizer, st, step


@pytest.mark.parametrize("backward", (True, False))
def test_stdet_refit_snapshot_is_of_the_values_the_steps_backward_read(backward: bool) -> None:
    """Attached, a snapshot step's refit adds the FREE values as they were before the step (those its
    backward read), in that backward; a step with no backward (here: none called) adds them at
    `STDET.step`, unchanged by an optimizer step that had no gradients."""
    model, optimizer, st, step = _attached_with_a_begun_snapshot()
    layout, refit = st.layout, st.refit
    assert layout.pending_refit is not None and refit.pending_deviation is not None
    deviation, count = refit.pending_deviation.clone(), refit.count
    values = layout.free_values.detach().clone()
    moments = [t.clone() for t in (refit.mean, refit.moment2, refit.comoment)]
    mode = refit.mode.clone()
    stdet_kernels.refit_update_(values, *moments, mode, deviation, count)
    snapshot = layout.pending_refit
    with stdet_kernels.record_calls() as calls:
        _training_step(model, optimizer, st, step, backward=backward)
    assert snapshot.taken and snapshot.done == backward
    assert layout.pending_refit is None or layout.pending_refit is not snapshot
    assert ("refit_update_" in [op for op, _ in calls]) != backward
    assert refit.count == count and refit.pending_deviation is None
    assert not [h for h in st.history if h["step"] == st.step_count]  # (no round remapped the moments)
    for got, want in zip((refit.mean, refit.moment2, refit.comoment), moments, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ("torch", "cpp"))
@pytest.mark.parametrize("measure", (None, "fisher"))
def test_opcheck_fused_refit_backward(backend: str, measure) -> None:
    require(Target(backend, "cpu"))
    problem = _problem(3000, "mixed", 4, F32, F32)
    pieces, sizes, free_values, code, offsets, a, refs, sensitivity, moments, mode, deviation, _ = problem
    running = None if measure is None else sensitivity.clone()
    args = (pieces, sizes, free_values, code, offsets, a, refs, running, 0.9, measure or "taylor",
            *(m.clone() for m in moments), mode, deviation, 3)  # fmt: skip
    with stdet_kernels.use_backend(backend):
        torch.library.opcheck(torch.ops.stdet.reconstruct_compact_backward_pieces_refit_.default, args)


def test_a_begun_snapshot_is_finished_by_the_next_step_whatever_the_schedule_says() -> None:
    """A snapshot begun ahead is added at the next step even if the snapshot interval changed in
    between (a benchmark or a user editing the schedule): never two begun at once."""
    model, optimizer, st, step = _attached_with_a_begun_snapshot()
    count = st.refit.count  # (the begun snapshot counted already)
    st.snapshot_interval = 7  # the next step is no longer a snapshot step
    begun = 0
    for extra in range(8):
        _training_step(model, optimizer, st, step + extra)
        assert st.refit.pending_deviation is None or (st.step_count + 1) % 7 == 0
        begun += (st.step_count + 1) % 7 == 0
    assert begun == 1 and st.refit.count == count + begun
