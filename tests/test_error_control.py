"""anchor_every="auto": error-controlled anchors (odenets_fast.segments) on ode_mlp, ODEMLP and
AdjointResidualStack, on every backend, against exact backprop; the controller's rules; bad input."""

import math

import pytest
import torch
from torch import nn

from helpers import BACKENDS, backend, make_stack  # noqa: F401 (backend: a fixture)
from odenets_fast import AdjointResidualStack, ODEMLP, diagnostics, ode_mlp, segments
from odenets_fast.reference import forward as reference_forward
from odenets_fast.spec import check_stack



def _grads(model, x, y):
    model.zero_grad(set_to_none=True)
    (model(x) - y).square().mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _rough_mlp(L=64, seed=0, **kwargs):
    """An iid-initialised ReLU stack with O(1) residuals: not smooth in depth, plain adjoint drifts."""
    torch.manual_seed(seed)
    model = ODEMLP(16, 32, L, init="iid", activation="relu", **kwargs)
    with torch.no_grad():
        model.V.normal_()
    return model


def _exact_twin(model):
    twin = ODEMLP(model.dim, model.hidden, model.depth, init=model.init, activation=model.activation,
                  method=model.method, backward="backprop", bias=model.b is not None)  # fmt: skip
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if k != "anchor_mask"})
    return twin


def test_strict_keeps_every_segment_within_the_tolerance():
    """strict=True on a rough stack: in every backward each segment drifted at most drift_tol, or is
    one layer (exact), or was redone exactly — and the gradients are those of exact backprop where a
    segment was redone. Measured here: 6e-3 gradient error at drift ≤ 1e-3 once the layout settles
    (gradient error follows drift, about 5–10× it on this stack, not equal to it)."""
    model = _rough_mlp(anchor_every="auto", drift_tol=1e-3, strict=True)
    exact = _exact_twin(model)
    x, y = torch.randn(64, 16), torch.randn(64, 16)
    errors = []
    for _ in range(4):
        got, want = _grads(model, x, y), _grads(exact, x, y)
        errors.append(float((got - want).norm() / want.norm()))
    # the first call: one segment, drifted 1.2e-3 > 1e-3, redone exactly (the redo decisions segment by
    # segment: test_strict_redoes_exactly_what_exceeds_the_tolerance)
    assert errors[0] < 1e-12 and model.last_segment_drift[0][2] <= 1e-3 < 1.2e-3
    assert max(errors) < 1e-2


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_without_strict_the_drift_falls_under_the_tolerance_within_a_few_steps(method):
    model = _rough_mlp(method=method, anchor_every="auto", drift_tol=3e-4)
    x, y = torch.randn(64, 16), torch.randn(64, 16)
    worst = []
    for _ in range(4):
        _grads(model, x, y)
        worst.append(max(d for *_, d in model.last_segment_drift))
    assert worst[0] > 3e-4  # plain adjoint's one segment drifts past the tolerance
    assert max(worst[2:]) <= 3e-4, worst
    assert 1 < len(model.anchor_positions) < model.depth


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("init", ["tied", "smooth"])
def test_smooth_stacks_grow_to_plain_adjoints_memory(init, method):
    """Started from an anchor at every layer, a smooth GELU stack's segments merge (at most 2× per
    call) until one segment is left: the memory of plain adjoint, x_0 and x_L."""
    torch.manual_seed(0)
    model = ODEMLP(8, 16, 32, init=init, method=method, anchor_every="auto", drift_tol=1e-3)
    model.anchor_mask.fill_(True)
    x, y = torch.randn(32, 8), torch.randn(32, 8)
    for _ in range(6):  # 32 → 16 → … → 1 segment
        _grads(model, x, y)
    assert model.anchor_positions == [0]
    plain = ODEMLP(8, 16, 32, init=init, method=method)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "anchor_mask"})
    saved = {name: diagnostics.saved_tensor_bytes(lambda m=m: m(x), exclude=tuple(m.parameters()))
             for name, m in (("auto", model), ("plain", plain))}  # fmt: skip
    assert saved["auto"] == saved["plain"] + 8  # and the int64 index of the one anchored layer


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_every_backend_runs_the_segments_as_the_reference(backend, method, strict):
    """The segments run on the backend's own forward and backward (per-segment drift from the same
    pass): outputs, gradients, drifts and the next layout as the reference's."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    tensors = make_stack(B=9, q=5, m=7, L=12, method=method, bias=True, dtype=dtype, v_scale=0.3)
    grad_out = torch.randn(9, 5, dtype=dtype)
    results = {}
    for name in (backend, "reference"):
        mask = torch.zeros(12, dtype=torch.bool)
        mask[[0, 3, 4, 9]] = True
        drift = torch.full((12,), segments.NO_SEGMENT)
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        out = ode_mlp(*leaves, method=method, anchor_every="auto", drift_tol=1e-3, strict=strict, anchor_mask=mask,
                      segment_drift_out=drift, backend=name)  # fmt: skip
        results[name] = (out, *torch.autograd.grad(out, leaves, grad_out), drift, mask)
    *got, got_drift, got_mask = results[backend]
    *want, want_drift, want_mask = results["reference"]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_drift, want_drift, rtol=1e-3, atol=1e-7)
    assert torch.equal(got_mask, want_mask) and not torch.equal(got_mask, mask_of([0, 3, 4, 9]))


def mask_of(positions, L=12):
    return segments.mask_of(positions, torch.empty(L))


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_a_uniform_layout_is_anchor_every(method):
    """Segments at 0, k, 2k, … compute what anchor_every=k does (same states, same VJPs)."""
    tensors = make_stack(B=6, q=4, m=5, L=12, method=method, bias=True)
    grad_out = torch.randn(6, 4, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    auto = torch.autograd.grad(ode_mlp(*leaves, method=method, anchor_every="auto", drift_tol=1.0,
                                       anchor_mask=mask_of([0, 4, 8])), leaves, grad_out)  # fmt: skip
    fixed = torch.autograd.grad(ode_mlp(*leaves, method=method, anchor_every=4), leaves, grad_out)
    for a, b in zip(auto, fixed):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("backend, dtype", [(name, dtype) for name in BACKENDS for dtype in (torch.float16, torch.bfloat16)
                                            if not (name.startswith("triton") and dtype == torch.bfloat16)],
                         indirect=["backend"])  # fmt: skip  (the Triton interpreter has no bfloat16)
def test_16_bit_gradients_cross_segment_boundaries_unrounded(backend, dtype, method):
    """A 16-bit stack carries its gradients in float32 between segments as within one (DESIGN.md §6):
    one segment per layer gives anchor_every=1's gradients (Heun's θ at a boundary, which two segments
    share, summed before it is rounded), not gradients rounded to 16 bits at each of 23 boundaries."""
    L = 24
    tensors = [t.to(dtype) for t in make_stack(B=16, q=8, m=16, L=L, method=method, bias=True, v_scale=0.5)]
    grad_out = torch.randn(16, 8).to(dtype)
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    auto = torch.autograd.grad(ode_mlp(*leaves, method=method, anchor_every="auto", drift_tol=1.0, backend=backend,
                                       anchor_mask=torch.ones(L, dtype=torch.bool)), leaves, grad_out)  # fmt: skip
    fixed = torch.autograd.grad(ode_mlp(*leaves, method=method, anchor_every=1, backend=backend), leaves, grad_out)
    for a, b in zip(auto, fixed):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=torch.finfo(dtype).eps, atol=0)  # at most an ulp: float32 order


def test_strict_redoes_exactly_what_exceeds_the_tolerance():
    """segments.backward's own report: segments above drift_tol (longer than one layer) redone, the
    others not; the redone ones' gradients are exact backprop's."""
    from odenets_fast import reference

    x, W, V, b, c = make_stack(B=8, q=4, m=6, L=10, bias=True)
    spec = check_stack(x, W, V, b, c, method="euler", activation="tanh", T=1.0, backward="adjoint",
                       anchor_every="auto", scale_in=None, scale_out=None, drift_tol=1e-3, strict=True)  # fmt: skip
    positions = [0, 1, 5]
    out, saved = segments.forward(reference, x, W, V, b, c, spec, positions)
    grads, drifts, redone = segments.backward(reference, torch.ones_like(out), saved, positions, W, V, b, c, spec)
    assert redone == [False, drifts[1] > 1e-3, drifts[2] > 1e-3] and any(redone)
    exact_spec = check_stack(x, W, V, b, c, method="euler", activation="tanh", T=1.0, backward="backprop",
                             anchor_every=None, scale_in=None, scale_out=None)  # fmt: skip
    _, exact_saved = reference_forward(x, W, V, b, c, exact_spec)
    exact = reference.backward(torch.ones_like(out), exact_saved, W, V, b, c, exact_spec)
    for j, (a, end) in enumerate(segments.bounds(positions, 10)):
        if redone[j] or end - a == 1:
            torch.testing.assert_close(grads.W[a:end], exact.W[a:end])


def test_the_controller_cuts_merges_and_settles():
    L, tol = 32, 1e-3
    # a segment 4× over the tolerance: cut to pieces for tol/2 if drift ∝ length (32 · 1/8 = 4 layers)
    assert segments.next_positions([0], [4e-3], L, tol) == list(range(0, 32, 4))
    # NaN or inf: single layers
    assert segments.next_positions([0, 16], [math.nan, 1e-6], L, tol) == list(range(16)) + [16]
    # two quiet neighbours merge, at most pairwise per call
    assert segments.next_positions([0, 8, 16, 24], [1e-5] * 4, L, tol) == [0, 16]
    # pieces cut for tol/2 do not merge back (the hysteresis)
    assert segments.next_positions([0, 8], [5e-4, 5e-4], L, tol) == [0, 8]
    # under the tolerance but not far under: kept
    assert segments.next_positions([0, 8, 16], [2e-4, 2e-4, 9e-4], L, tol) == [0, 8, 16]


def test_layout_is_module_state():
    model = _rough_mlp(anchor_every="auto")
    model.anchor_mask[[5, 17]] = True
    copy = ODEMLP(16, 32, 64, init="iid", activation="relu", anchor_every="auto")
    copy.load_state_dict(model.state_dict())
    assert copy.anchor_positions == [0, 5, 17] and "anchor_mask" in model.state_dict()
    assert "anchor_mask" not in ODEMLP(16, 32, 64).state_dict()  # other modes: no new state


def test_torch_compile_follows_layout_changes_without_recompiling():
    """The layout is a tensor read inside the op: a changed layout is no recompilation, and the
    compiled steps give the eager steps' gradients and layouts."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the graphs counted by earlier tests
    eager, compiled_model = _rough_mlp(L=32, anchor_every="auto", drift_tol=3e-4), _rough_mlp(L=32, anchor_every="auto",
                                                                                              drift_tol=3e-4)  # fmt: skip
    compiled = torch.compile(compiled_model, fullgraph=True)
    x, y = torch.randn(16, 16), torch.randn(16, 16)
    layouts = [tuple(eager.anchor_positions)]
    for _ in range(3):
        torch.testing.assert_close(_grads(compiled, x, y), _grads(eager, x, y))
        assert compiled_model.anchor_positions == eager.anchor_positions
        layouts.append(tuple(eager.anchor_positions))
    assert len(set(layouts)) > 1  # the layout did change (from one segment)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def _layout(model, positions):
    model.anchor_mask.zero_()
    model.anchor_mask[positions] = True


def _tanh_stack(L=8):
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 6)).double() for _ in range(L)]
    return AdjointResidualStack(blocks, anchor_every="auto", drift_tol=1e-3)


@pytest.mark.parametrize("module", ["ODEMLP", "AdjointResidualStack"])
def test_an_empty_batch_leaves_the_layout_as_it_is(module):
    """An empty batch's segments drift 0 for want of rows: the controller learns nothing from it. (It had
    merged every quiet pair: [0, 1, 2, 3] → [0, 2], and the next real batch's segments drifted 17× over.)"""
    model = _tanh_stack(L=4) if module == "AdjointResidualStack" else _rough_mlp(L=4, anchor_every="auto")
    width, dtype = (6, torch.float64) if module == "AdjointResidualStack" else (16, torch.float32)
    _layout(model, [0, 1, 2, 3])
    model(torch.randn(0, width, dtype=dtype, requires_grad=True)).sum().backward()
    assert model.anchor_positions == [0, 1, 2, 3]
    assert segments.next_positions([0, 1, 2, 3], [0.0] * 4, 4, 1e-3, measured=False) == [0, 1, 2, 3]


def test_checkpoint_recomputing_under_a_moved_layout_uses_the_recomputed_one():
    """Non-reentrant torch.utils.checkpoint re-runs the forward at the backward, under the layout of that
    moment (another call's backward may have moved it): as many anchors at other layers are the gradients
    of that layout, not anchors paired with the forward's positions (then the segment [4, 8) started from
    x_2, silently)."""
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(5, 6, dtype=torch.float64)
    stack = _tanh_stack()
    _layout(stack, [0, 2])
    expected = torch.autograd.grad(stack(x.clone().requires_grad_(True)).square().sum(), list(stack.parameters()))
    _layout(stack, [0, 4])
    out = checkpoint(stack, x.clone().requires_grad_(True), use_reentrant=False)
    _layout(stack, [0, 2])
    for a, b in zip(torch.autograd.grad(out.square().sum(), list(stack.parameters())), expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("module", ["AdjointResidualStack", "ODEMLP"])
def test_checkpoint_recomputing_another_number_of_anchors_says_why(module):
    from torch.utils.checkpoint import checkpoint

    model = _tanh_stack() if module == "AdjointResidualStack" else _rough_mlp(L=8, anchor_every="auto")
    width = 6 if module == "AdjointResidualStack" else 16
    x = torch.randn(5, width, dtype=next(model.parameters()).dtype)
    _layout(model, [0, 4])
    out = checkpoint(model, x.requires_grad_(True), use_reentrant=False)
    _layout(model, [0, 2, 4])
    with pytest.raises(RuntimeError, match="torch.utils.checkpoint recomputed a region holding an anchor_every='auto' "
                                           "stack.*its anchor layout moved in between"):  # fmt: skip
        out.sum().backward()


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_residual_stack_of_convolutions_with_batchnorm(method):
    """AdjointResidualStack: the conv blocks of bench.conv_example with BatchNorm in training mode;
    strict's first backward redoes the drifted segment exactly (the gradients are backprop's), the
    layout is state, and the BatchNorm statistics are updated once per forward."""
    from bench.conv_example import CHANNELS, preactivation_block

    torch.manual_seed(0)
    blocks = [preactivation_block() for _ in range(16 + (method == "heun"))]
    exact = AdjointResidualStack(blocks, method=method, backward="backprop")
    auto = AdjointResidualStack(blocks, method=method, anchor_every="auto", drift_tol=1e-5, strict=True)
    x = torch.randn(8, CHANNELS, 6, 6)

    def grads(stack):
        return torch.autograd.grad(stack(x.clone().requires_grad_(True)).square().sum(), list(stack.parameters()))

    before = blocks[0][0].num_batches_tracked.item()
    for a, b in zip(grads(auto), grads(exact)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert blocks[0][0].num_batches_tracked.item() == before + 2
    (segment,) = auto.last_segment_drift
    assert segment[:2] == (0, 16) and segment[2] > 1e-5  # drifted, hence redone
    assert len(auto.anchor_positions) > 1 and "anchor_mask" in auto.state_dict()
    assert exact.anchor_positions is None  # as ODEMLP's: a layout only in auto mode


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(anchor_every="auto", drift_tol=0.0), ValueError, "drift_tol must be > 0"),
    (dict(anchor_every="auto", drift_tol=math.nan), ValueError, "drift_tol must be finite"),
    (dict(anchor_every="auto", drift_tol="1e-3"), TypeError, "drift_tol must be a real number"),
    (dict(anchor_every=4, strict=True), ValueError, "strict=True redoes the segments of anchor_every='auto'"),
    (dict(drift_tol=1e-3), ValueError, "drift_tol is only meaningful with anchor_every='auto'"),
    (dict(anchor_every="auto", backward="backprop"), ValueError, "anchor_every is only meaningful with backward='adjoint'"),
    (dict(anchor_every="often"), ValueError, "anchor_every must be a positive int, 'auto' or None"),
    (dict(anchor_every="auto", strict=1), TypeError, "strict must be a bool"),
])  # fmt: skip
@pytest.mark.parametrize("entry", ["ode_mlp", "ODEMLP", "AdjointResidualStack"])
def test_bad_arguments(entry, kwargs, error, message):
    with pytest.raises(error, match=message):
        if entry == "ode_mlp":
            ode_mlp(*make_stack(dtype=torch.float32)[:3], **kwargs)
        elif entry == "ODEMLP":
            ODEMLP(4, 8, 3, **kwargs)
        else:
            AdjointResidualStack([nn.Linear(4, 4) for _ in range(3)], **kwargs)


def test_bad_state_tensors():
    tensors = make_stack(L=4, dtype=torch.float32)[:3]
    with pytest.raises(TypeError, match=r"anchor_mask must be a bool tensor of shape \(4,\)"):
        ode_mlp(*tensors, anchor_every="auto", anchor_mask=torch.zeros(4))
    with pytest.raises(TypeError, match=r"segment_drift_out must be a floating-point tensor of shape \(4,\)"):
        ode_mlp(*tensors, anchor_every="auto", segment_drift_out=torch.zeros(3))
    with pytest.raises(ValueError, match="anchor_mask is only meaningful with anchor_every='auto'"):
        ode_mlp(*tensors, anchor_mask=torch.zeros(4, dtype=torch.bool))
