"""AdjointResidualStack: any residual blocks, against a plain loop and against ode_mlp."""

import math
import warnings

import pytest
import torch
from torch import nn

from helpers import make_stack, smooth_stack
from odenets_fast import AdjointResidualStack, diagnostics, ode_mlp


class MLPBlock(nn.Module):
    """f(x) = a_out V tanh(a_in W x): the ODE-MLP residual as a module, to compare with ode_mlp."""

    def __init__(self, W, V):
        super().__init__()
        self.W, self.V = nn.Parameter(W.clone()), nn.Parameter(V.clone())

    def forward(self, x):
        q, m = self.W.shape[1], self.W.shape[0]
        return (torch.tanh(x @ self.W.T / math.sqrt(q)) @ self.V.T) / math.sqrt(m)


def conv_block(channels, dropout=0.0):
    """The pre-activation basic block bn → relu → conv → bn → relu → conv (NeurIPS 2022)."""
    return nn.Sequential(
        nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
        nn.BatchNorm2d(channels), nn.ReLU(), nn.Dropout(dropout), nn.Conv2d(channels, channels, 3, padding=1),
    )  # fmt: skip


def _mlp_stack(method, L=5, **kwargs):
    x, W, V, _, _ = make_stack(B=6, q=4, m=7, L=L, method=method)
    stack = AdjointResidualStack([MLPBlock(W[n], V[n]) for n in range(W.shape[0])], method=method, **kwargs)
    return x, W, V, stack.double()


def _grads(stack, x, grad_out):
    x = x.clone().requires_grad_(True)
    out = stack(x)
    params = list(stack.parameters())
    return [out.detach()] + list(torch.autograd.grad(out, [x] + params, grad_out))


@pytest.mark.parametrize("backward, anchor_every", [("backprop", None), ("adjoint", None), ("adjoint", 2)])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_mlp_blocks_match_ode_mlp(method, backward, anchor_every):
    """The generic stack, differentiated through autograd per layer, equals the hand-written
    reference backend of ode_mlp in every backward mode."""
    x, W, V, stack = _mlp_stack(method, backward=backward, anchor_every=anchor_every)
    grad_out = torch.randn_like(x)
    got = _grads(stack, x, grad_out)
    leaves = [t.clone().requires_grad_(True) for t in (x, W, V)]
    out = ode_mlp(*leaves, method=method, activation="tanh", backward=backward, anchor_every=anchor_every,
                  backend="reference")  # fmt: skip
    gx, gW, gV = torch.autograd.grad(out, leaves, grad_out)
    torch.testing.assert_close(got[0], out.detach())
    torch.testing.assert_close(got[1], gx)
    torch.testing.assert_close(torch.stack(got[2::2]), gW)
    torch.testing.assert_close(torch.stack(got[3::2]), gV)


@pytest.mark.parametrize("backward", ["backprop", "adjoint"])
def test_a_changed_T_is_the_one_used(backward):
    """T set after construction takes effect in the forward and the reconstruction, as ODEMLP's does."""
    x, W, V, stack = _mlp_stack("heun", backward=backward)
    stack.T = 0.5
    grad_out = torch.randn_like(x)
    got = _grads(stack, x, grad_out)
    leaves = [t.clone().requires_grad_(True) for t in (x, W, V)]
    out = ode_mlp(*leaves, method="heun", activation="tanh", T=0.5, backward=backward, backend="reference")
    torch.testing.assert_close(got[0], out.detach())
    torch.testing.assert_close(got[1], torch.autograd.grad(out, leaves[0], grad_out)[0])


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_anchor_every_one_equals_backprop(method):
    x, W, V, stack = _mlp_stack(method, anchor_every=1)
    grad_out = torch.randn_like(x)
    exact = _grads(stack, x, grad_out)
    stack.backward_mode, stack.anchor_every = "backprop", None
    for a, b in zip(exact, _grads(stack, x, grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


def test_last_drift_equals_reconstruction_error():
    x, W, V, stack = _mlp_stack("euler", L=8)
    assert stack.last_drift is None
    stack(x.clone().requires_grad_(True)).sum().backward()
    want = diagnostics.reconstruction_error(x, W, V, method="euler", activation="tanh")[0]
    assert stack.last_drift == pytest.approx(float(want), rel=1e-10)


def test_weight_tied_blocks_count_each_use_once():
    x, W, V, _ = _mlp_stack("heun", L=4)
    block = MLPBlock(W[0], V[0]).double()
    tied = AdjointResidualStack([block] * 5, method="heun", anchor_every=1)
    plain = AdjointResidualStack([block] * 5, method="heun", backward="backprop")
    grad_out = torch.randn_like(x)
    for a, b in zip(_grads(tied, x, grad_out), _grads(plain, x, grad_out)):
        torch.testing.assert_close(a, b)


def _conv_model(L, method="euler", dropout=0.0, **kwargs):
    torch.manual_seed(0)
    blocks = [conv_block(4, dropout) for _ in range(L + (method == "heun"))]
    return AdjointResidualStack(blocks, method=method, **kwargs)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_batchnorm_running_stats_updated_once(method):
    x = torch.randn(8, 4, 6, 6)
    adjoint = _conv_model(3, method)
    plain = _conv_model(3, method, backward="backprop")
    for model in (adjoint, plain):
        model(x.clone().requires_grad_(True)).square().sum().backward()
    for (name, a), b in zip(adjoint.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, msg=name)  # same running stats and num_batches_tracked
    assert adjoint.blocks[0][0].num_batches_tracked.item() == 1


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_batchnorm_gradients_exact_at_anchors(method):
    """In train mode BatchNorm normalises with the batch statistics of the state it is given: at
    stored states (anchor_every=1) those are the forward's, so gradients are exact."""
    x = torch.randn(8, 4, 6, 6)
    grad_out = torch.randn(8, 4, 6, 6)
    anchored, plain = _conv_model(3, method, anchor_every=1), _conv_model(3, method, backward="backprop")
    for a, b in zip(_grads(anchored, x, grad_out), _grads(plain, x, grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dropout_recompute_uses_forward_random_numbers():
    x, grad_out = torch.randn(8, 4, 6, 6), torch.randn(8, 4, 6, 6)
    results = {}
    for preserve in (True, False):
        for mode, anchors in (("backprop", None), ("adjoint", 1)):
            model = _conv_model(2, dropout=0.5, backward=mode, anchor_every=anchors, preserve_rng_state=preserve)
            torch.manual_seed(1)
            results[preserve, mode] = _grads(model, x, grad_out)
    for a, b in zip(results[True, "adjoint"], results[True, "backprop"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # without the RNG state the recompute draws new masks: the gradients differ
    assert not torch.allclose(results[False, "adjoint"][2], results[False, "backprop"][2])


class NoisyBlock(nn.Module):
    """f(x) = tanh(x) ⊙ r with r drawn afresh at every call; logs (block, r) at every call."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def forward(self, x):
        r = torch.rand_like(x)
        self.log.append((self, r))
        return torch.tanh(x) * r


@pytest.mark.parametrize("anchor_every", [None, 2])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_every_rerun_of_a_block_draws_what_that_block_drew_in_the_forward(method, anchor_every):
    """Reconstruction (Heun: f_{n+1} before f_n) and recompute give each block call the random
    numbers of the same call in the forward, not those of the call that came first there."""
    log = []
    blocks = [NoisyBlock(log) for _ in range(4 + (method == "heun"))]
    stack = AdjointResidualStack(blocks, method=method, anchor_every=anchor_every).double()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    stack(x).sum().backward()
    forward_draws = len(blocks) if method == "euler" else 2 * (len(blocks) - 1)
    drawn = {}
    for block, r in log[:forward_draws]:
        drawn.setdefault(block, []).append(r)
    reruns = log[forward_draws:]
    assert len(reruns) > forward_draws  # every call re-run once by the recompute, some by the reconstruction
    for block, r in reruns:
        assert any(torch.equal(r, seen) for seen in drawn[block])


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_dropout_reconstruction_is_as_accurate_as_without_dropout(method):
    """An MLP stack with dropout 0.2: reconstruction sees the forward's masks, so the drift and the
    gradient error stay near the no-dropout level (Heun with swapped masks: 2.4e-2 and 1.5e-2, against
    2.7e-4 and 1.8e-4 without dropout and 3.3e-4 and 2.1e-4 with the right masks)."""
    L, q, m = 32, 8, 16
    x, grad_out = torch.randn(16, q, dtype=torch.float64), torch.randn(16, q, dtype=torch.float64)
    drift, error = {}, {}
    for p in (0.0, 0.2):
        torch.manual_seed(0)
        blocks = [nn.Sequential(nn.Linear(q, m), nn.Tanh(), nn.Dropout(p), nn.Linear(m, q))
                  for _ in range(L + (method == "heun"))]  # fmt: skip
        grads = {}
        for mode in ("adjoint", "backprop"):
            stack = AdjointResidualStack(blocks, method=method, backward=mode).double()
            torch.manual_seed(1)
            grads[mode] = torch.cat([t.flatten() for t in _grads(stack, x, grad_out)[2:]])
            drift[p] = stack.last_drift if mode == "adjoint" else drift.get(p)
        error[p] = float((grads["adjoint"] - grads["backprop"]).norm() / grads["backprop"].norm())
    assert drift[0.2] < 2 * drift[0.0]
    assert error[0.2] < 2 * error[0.0]


def test_rng_states_kept_only_for_calls_that_draw_and_counted():
    """No random numbers drawn: nothing kept (the CPU generator's state is 5 KB a call). Dropout in some
    blocks: one state per drawing call, counted by saved_tensor_bytes like any saved tensor."""
    x = torch.randn(4, 4, 6, 6, requires_grad=True)
    state_bytes = torch.get_rng_state().numel()

    def saved(dropouts, preserve):
        torch.manual_seed(0)
        blocks = [conv_block(4, p) for p in dropouts]
        model = AdjointResidualStack(blocks, preserve_rng_state=preserve)
        return diagnostics.saved_tensor_bytes(lambda: model(x), exclude=tuple(model.parameters()))

    assert saved([0.0] * 12, True) == saved([0.0] * 12, False)
    draws = [0.5, 0.0, 0.0, 0.5, 0.5, 0.0]
    assert saved(draws, True) - saved(draws, False) == 3 * state_bytes


def _set_dropout(model, p):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


def test_rng_state_read_per_block_call_only_while_the_blocks_draw(monkeypatch):
    """Reading the 5 KB CPU generator state at every block call costs ~2 % of a small convolution stack's
    step: after a forward that drew nothing, the next reads it before and after its loop only — and when
    it finds the blocks drew after all, runs again reading it per call (1 + 6 reads)."""
    reads = []
    real = torch.get_rng_state
    monkeypatch.setattr(torch, "get_rng_state", lambda: reads.append(1) or real())
    x = torch.randn(4, 4, 6, 6, requires_grad=True)
    model, counts = _conv_model(6), []
    for p in (0.0, 0.0, 0.5, 0.5):
        _set_dropout(model, p)
        reads.clear()
        model(x)
        counts.append(len(reads))
    assert counts == [1 + 6, 2, 2 + 6, 1 + 6]


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_blocks_that_start_drawing_get_their_random_numbers_replayed(method):
    """A stack whose previous forward drew nothing reads the RNG state only around its loop; when its blocks
    draw after all (dropout switched on), the forward runs again from the same RNG state recording each
    call's: the output, the random numbers consumed, the running statistics (updated once) and, at stored
    states, the gradients are a plain loop's with the same seed."""
    x, grad_out = torch.randn(8, 4, 6, 6), torch.randn(8, 4, 6, 6)
    models = {mode: _conv_model(3, method, backward=mode, anchor_every=1 if mode == "adjoint" else None)
              for mode in ("adjoint", "backprop")}  # fmt: skip
    results = {}
    for mode, model in models.items():
        _grads(model, x, grad_out)  # no dropout yet: nothing drawn
        _set_dropout(model, 0.5)
        torch.manual_seed(1)
        results[mode] = _grads(model, x, grad_out) + [torch.rand(3)]  # the generator where the step left it
    assert not torch.equal(results["adjoint"][0], _conv_model(3, method)(x))  # the dropout does draw
    for a, b in zip(results["adjoint"], results["backprop"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(models["adjoint"].named_buffers(), models["backprop"].buffers()):
        torch.testing.assert_close(a, b, msg=name)


def test_autocast_bfloat16_replayed_in_backward_and_state_stays_float32():
    x, grad_out = torch.randn(8, 4, 6, 6), torch.randn(8, 4, 6, 6)
    results = {}
    for mode, anchors in (("backprop", None), ("adjoint", 1)):
        model = _conv_model(2, backward=mode, anchor_every=anchors)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            xl = x.clone().requires_grad_(True)
            out = model(xl)
        assert out.dtype == torch.float32  # x + h f(x): the state keeps x's dtype
        results[mode] = [out] + list(torch.autograd.grad(out, [xl] + list(model.parameters()), grad_out))
    # exact at anchors only if the recompute ran in bfloat16 like the forward
    for a, b in zip(results["adjoint"], results["backprop"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adjoint_memory_does_not_grow_with_depth():
    x = torch.randn(4, 4, 6, 6, requires_grad=True)

    def saved(L, mode):
        model = _conv_model(L, backward=mode)
        return diagnostics.saved_tensor_bytes(lambda: model(x), exclude=tuple(model.parameters()))

    assert saved(2, "adjoint") == saved(12, "adjoint")
    assert saved(12, "backprop") > 5 * saved(12, "adjoint")


def test_double_backward_is_a_clear_error():
    x, W, V, stack = _mlp_stack("euler")
    x = x.requires_grad_(True)
    out = stack(x)
    with pytest.raises(RuntimeError, match="double backward .* not supported.*backward='backprop'"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


def test_bad_arguments():
    with pytest.raises(TypeError, match="blocks must be a sequence of nn.Module"):
        AdjointResidualStack([lambda x: x])
    with pytest.raises(TypeError, match="blocks must be a sequence of nn.Module"):
        AdjointResidualStack(block for block in [nn.Identity(), lambda x: x])
    assert AdjointResidualStack(nn.Identity() for _ in range(3)).depth == 3
    with pytest.raises(ValueError, match="needs L \\+ 1 >= 2 blocks"):
        AdjointResidualStack([nn.Identity()], method="heun")
    with pytest.raises(ValueError, match="anchor_every is only meaningful"):
        AdjointResidualStack([nn.Identity()], backward="backprop", anchor_every=2)


def test_frozen_block_and_input_only_gradients():
    x, W, V, stack = _mlp_stack("euler", anchor_every=1)
    stack.blocks[1].W.requires_grad_(False)
    xl = x.clone().requires_grad_(True)
    out = stack(xl)
    (gx,) = torch.autograd.grad(out.sum(), xl, retain_graph=True)  # input only
    out.sum().backward()  # parameters
    assert stack.blocks[1].W.grad is None and stack.blocks[1].V.grad is not None
    plain = AdjointResidualStack(list(stack.blocks), backward="backprop")
    xp = x.clone().requires_grad_(True)
    plain_out = plain(xp)
    torch.testing.assert_close(gx, torch.autograd.grad(plain_out.sum(), xp)[0])


def test_forward_hooks_on_the_blocks_are_warned_of_once():
    """An auxiliary loss on what a forward hook captures gets no gradient through an adjoint stack (its
    forward runs without grad): the first adjoint forward says so when a block has forward hooks."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3)]
    captured = []
    blocks[1][0].register_forward_hook(lambda module, inputs, output: captured.append(output))
    stack, x = AdjointResidualStack(blocks), torch.randn(2, 4, requires_grad=True)
    with pytest.warns(UserWarning, match="forward hooks on the blocks of an adjoint-mode AdjointResidualStack"):
        stack(x).sum().backward()
    assert not captured[0].requires_grad  # what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stack(x).sum().backward()  # once per stack
        AdjointResidualStack(blocks, backward="backprop")(x).sum().backward()  # there hooks behave as usual
        AdjointResidualStack([nn.Linear(4, 4) for _ in range(3)])(x).sum().backward()  # no hooks, no warning


@pytest.mark.parametrize("backward", ["backprop", "adjoint"])
def test_a_block_modifying_its_input_in_place_is_an_error(backward):
    """nn.ReLU(inplace=True) as a block's first layer rectifies x itself: the step would compute relu(x) + h f(x)
    (silently, without grad and in the adjoint's forward; autograd's leaf error in the backward)."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 4)) for _ in range(3)]
    stack = AdjointResidualStack(blocks, backward=backward)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match="block 0 of an AdjointResidualStack "
                                                                              "modified its input in place"):  # fmt: skip
            stack(torch.randn(2, 4, requires_grad=grad) * 1.0)
    inner = [nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 4)) for _ in range(3)]
    AdjointResidualStack(inner, backward=backward)(torch.randn(2, 4, requires_grad=True)).sum().backward()  # fine


@pytest.mark.parametrize("backward", ["backprop", "adjoint"])
def test_inference_mode_gives_the_no_grad_output(backward):
    """(The in-place check read the input's version counter, which inference tensors do not have.)"""
    x, W, V, stack = _mlp_stack("heun", backward=backward)
    with torch.no_grad():
        want = stack(x)
    with torch.inference_mode():
        assert torch.equal(stack(x), want) and torch.equal(stack(x.clone()), want)
    with torch.inference_mode():
        plain = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():  # an inference tensor outside inference mode
        torch.testing.assert_close(stack(plain), AdjointResidualStack(list(stack.blocks), method="heun",
                                                                     backward="backprop")(plain.clone()))  # fmt: skip


@pytest.mark.parametrize("change, message", [
    (lambda stack: stack.blocks.append(nn.Identity()), "of depth 4 .* needs 4 blocks; it has 5"),
    (lambda stack: setattr(stack, "method", "heun"), "of depth 4 .*method='heun' needs 5 blocks; it has 4"),
    (lambda stack: setattr(stack, "vjp_at", "bogus"), "vjp_at must be one of"),
    (lambda stack: setattr(stack, "backward_mode", "bogus"), "backward must be one of"),
    (lambda stack: setattr(stack, "anchor_every", 0), "anchor_every must be a positive int"),
    (lambda stack: setattr(stack, "anchor_every", "auto"), "anchor_every='auto' is chosen at construction"),
    (lambda stack: setattr(stack, "T", -1.0), "T must be > 0"),
    (lambda stack: setattr(stack, "T", float("nan")), "T must be finite"),
    (lambda stack: setattr(stack, "drift_tol", 1e-3), "drift_tol is only meaningful with anchor_every='auto'"),
])  # fmt: skip
def test_settings_changed_after_construction_are_checked(change, message):
    """Attributes reassigned after construction meet the constructor's checks at the next call. (An appended
    block was ignored, a bogus vjp_at ran as "reconstruction", a bogus backward as adjoint.)"""
    x, W, V, stack = _mlp_stack("euler", L=4)
    change(stack)
    with pytest.raises(ValueError, match=message):
        stack(x)


@pytest.mark.parametrize("backward", ["backprop", "adjoint"])
def test_a_block_output_of_another_shape_is_a_clear_error(backward):
    """(A block returning a broadcastable (q,) ran in backprop mode and failed inside autograd in adjoint mode.)"""

    class Forcing(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return self.c

    stack = AdjointResidualStack([Forcing() for _ in range(3)], backward=backward)
    with pytest.raises(ValueError, match=r"block 0 .* must return a tensor of its input's shape \(5, 4\); got shape \(4,\)"):
        stack(torch.randn(5, 4, requires_grad=True))


@pytest.mark.parametrize("change", [
    lambda stack: setattr(stack, "T", 0.25),
    lambda stack: setattr(stack, "anchor_every", None),
    lambda stack: setattr(stack, "vjp_at", "reconstruction"),
])  # fmt: skip
def test_each_call_is_differentiated_with_the_settings_it_ran_with(change):
    """A setting changed between a call and its backward (the same blocks integrated to a second horizon, in the
    same graph) leaves that call's backward alone. (T, anchor_every and vjp_at were read at backward: 0.3 off
    with T.)"""
    x, W, V, stack = _mlp_stack("euler", L=4, anchor_every=2)
    leaf = x.clone().requires_grad_(True)
    want = torch.autograd.grad(stack(leaf).square().sum(), [leaf] + list(stack.parameters()))
    out = stack(leaf)
    change(stack)
    stack(leaf)  # a second call under the new setting
    got = torch.autograd.grad(out.square().sum(), [leaf] + list(stack.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_lazy_modules_need_their_dry_run_first():
    """Uninitialized lazy parameters would be the adjoint Function's inputs (autograd's "invalid gradient"
    from the backward, on every call): a clear error says to run the dry forward first, after which the
    stack trains as a plain loop would."""
    torch.manual_seed(0)
    stack = AdjointResidualStack([nn.Sequential(nn.LazyLinear(6), nn.Tanh()) for _ in range(4)])
    x = torch.randn(3, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match="uninitialized lazy parameters .* run one forward under torch.no_grad"):
        stack(x)
    with torch.no_grad():
        stack(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the dry run removed the lazy modules' pre-hooks: no hooks warning
        stack(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in stack.parameters())


@pytest.mark.parametrize("toggle", ["frozen after the forward", "unfrozen after the forward"])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_requires_grad_toggled_between_forward_and_backward(method, toggle):
    """As in a plain loop: the toggled parameter gets no gradient (autograd recorded it as the forward found
    it, and accumulates nothing into a tensor that no longer requires grad), the others theirs. (The adjoint
    backward raised autograd's "does not require grad", or its own error for unlisted tensors.)"""
    x, W, V, stack = _mlp_stack(method, anchor_every=2)
    toggled, grad_out = stack.blocks[1].W, torch.randn_like(x)
    others = [p for p in stack.parameters() if p is not toggled]
    in_forward = toggle == "frozen after the forward"
    toggled.requires_grad_(in_forward)
    xl = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(stack(xl), [xl] + others, grad_out)  # untoggled
    out = stack(xl)
    toggled.requires_grad_(not in_forward)
    out.backward(grad_out)
    assert toggled.grad is None
    for a, b in zip([xl.grad] + [p.grad for p in others], expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


class ScaledBlock(nn.Module):
    """tanh(Linear(x)) times a tensor the block reads but does not own (FiLM-style conditioning)."""

    def __init__(self, width, scale):
        super().__init__()
        self.lin = nn.Linear(width, width, dtype=torch.float64)
        self.scale = scale  # a plain tensor attribute: not one of the block's parameters

    def forward(self, x):
        return torch.tanh(self.lin(x)) * self.scale


def _scaled_stacks(method, scale, **kwargs):
    """The same blocks in an adjoint stack with every state anchored (exact gradients) and in a plain one."""
    torch.manual_seed(0)
    blocks = [ScaledBlock(3, scale) for _ in range(4 if method == "euler" else 5)]
    adjoint = AdjointResidualStack(blocks, method=method, anchor_every=1, **kwargs)
    return adjoint, AdjointResidualStack(blocks, method=method, backward="backprop")


def _loss_grads(stack, x, wrt, **call):
    return torch.autograd.grad(stack(x, **call).square().sum(), wrt)


def test_tensor_the_blocks_read_but_do_not_own_is_an_error_not_a_lost_gradient():
    embedding = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    adjoint, _ = _scaled_stacks("euler", embedding * 2)
    with pytest.raises(RuntimeError, match=r"layer 3 .* reads a tensor that requires grad \(a leaf of shape \(\)\).*"
                                           r"extra_inputs=\[\.\.\.\]"):  # fmt: skip
        adjoint(torch.randn(2, 3, dtype=torch.float64)).square().sum().backward()


def test_unlisted_tensor_of_a_frozen_stack_is_an_error_not_a_lost_gradient():
    """x and every parameter frozen, the blocks reading a tensor that requires grad (a conditioning
    embedding trained through a frozen stack): the adjoint's backward would never run, so the same error
    comes from the forward; listed, the tensor gets its gradient; nothing requiring grad: no error."""
    embedding = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    adjoint, plain = _scaled_stacks("euler", embedding * 2)
    adjoint.requires_grad_(False)
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"layer 0 .* reads a tensor that requires grad \(a leaf of shape \(\)\)"):
        adjoint(x)

    def scale(value):  # rebuilt per call, as a model's forward would
        for block in adjoint.blocks:
            block.scale = value
        return value

    (got,) = _loss_grads(adjoint, x, [embedding], extra_inputs=[scale(embedding * 2)])
    scale(embedding * 2)
    torch.testing.assert_close(got, _loss_grads(plain, x, [embedding])[0])
    scale(torch.tensor(1.0, dtype=torch.float64))
    assert not adjoint(x).requires_grad


class ZeroBlock(nn.Module):
    """A block whose output is zero: reading nothing differentiable (a switched-off block, a constant
    forcing), or, `through_autograd`, times 0 after a layer of its own (the same values under autograd)."""

    def __init__(self, through_autograd=False):
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=torch.float64) if through_autograd else None

    def forward(self, x):
        return torch.zeros_like(x) if self.lin is None else self.lin(x) * 0.0


@pytest.mark.parametrize("method, vjp_at", [("euler", "state"), ("euler", "reconstruction"), ("euler", "extrapolated"),
                                            ("heun", "state"), ("heun", "reconstruction")])  # fmt: skip
@pytest.mark.parametrize("anchor_every", [None, 1])
def test_block_reading_nothing_differentiable(method, vjp_at, anchor_every):
    """Its VJP is zero (its layer passes the gradient on unchanged), not autograd's error on an output
    that does not require grad: the gradients of the same stack with a zero block that goes through
    autograd."""
    torch.manual_seed(0)
    others = [nn.Linear(3, 3, dtype=torch.float64) for _ in range(3 if method == "heun" else 2)]
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    wrt = [x] + [p for block in others for p in block.parameters()]
    grads = []
    for zero in (ZeroBlock(), ZeroBlock(through_autograd=True)):
        blocks = [others[0], zero, *others[1:]]
        stack = AdjointResidualStack(blocks, method=method, anchor_every=anchor_every, vjp_at=vjp_at)
        grads.append(_loss_grads(stack, x, wrt))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("leaf", [False, True])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_extra_inputs_get_their_gradient(method, leaf):
    embedding = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def scale():  # a non-leaf is rebuilt per call, as a model's forward would
        value = embedding if leaf else embedding * 2
        for block in adjoint.blocks:
            block.scale = value
        return value

    adjoint, plain = _scaled_stacks(method, None)
    x = torch.randn(2, 3, dtype=torch.float64)
    wrt = [embedding] + list(plain.parameters())
    listed = scale()
    got = _loss_grads(adjoint, x, wrt, extra_inputs=[listed, listed])  # a repeat counts once
    scale()
    for a, b in zip(got, _loss_grads(plain, x, wrt)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_saved_tensor_hooks_that_unpack_copies(method):
    """Under torch.autograd.graph.save_on_cpu (its unpack returns new tensors) the gradients are the ones
    without hooks — parameters and extra inputs alike (a KeyError before)."""
    embedding = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    scale = embedding * 2
    adjoint, plain = _scaled_stacks(method, scale)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    wrt = [x, embedding] + list(plain.parameters())
    want = _loss_grads(plain, x, wrt)
    scale = embedding * 2  # rebuilt per call, as a model's forward would
    for block in adjoint.blocks:
        block.scale = scale
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t.clone()):
        out = adjoint(x, extra_inputs=[scale])
    for a, b in zip(torch.autograd.grad(out.square().sum(), wrt), want):
        torch.testing.assert_close(a, b)


def test_parameters_swapped_out_before_backward_are_an_error_not_a_lost_gradient():
    """torch.func.functional_call (fast weights, hypernetworks) puts the module's own parameters back
    before backward, which re-runs the blocks: an error, not gradients of other weights (the fast
    weights' was None before); backprop mode differentiates the recorded graph and works."""
    adjoint, plain = _scaled_stacks("euler", torch.tensor(1.0, dtype=torch.float64))
    x = torch.randn(2, 3, dtype=torch.float64)
    want = _loss_grads(plain, x, list(plain.parameters()))
    for p in adjoint.parameters():  # frozen base weights, trained offsets
        p.requires_grad_(False)
    delta = {name: torch.zeros_like(p, requires_grad=True) for name, p in adjoint.named_parameters()}
    fast = {name: p + delta[name] for name, p in adjoint.named_parameters()}
    out = torch.func.functional_call(adjoint, fast, (x,))
    with pytest.raises(RuntimeError, match="block 0 .* other parameter tensors at backward than its forward read"):
        out.square().sum().backward()
    out = torch.func.functional_call(plain, fast, (x,))
    grads = torch.autograd.grad(out.square().sum(), list(delta.values()))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)


def test_parameter_of_another_block_needs_listing():
    adjoint, plain = _scaled_stacks("euler", torch.tensor(1.0, dtype=torch.float64))
    shared = adjoint.blocks[2].lin.weight
    adjoint.blocks[0].scale = shared[0]  # layer 0 reads layer 2's weight
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"layer 0 .*a leaf of shape \(3, 3\)"):
        adjoint(x).square().sum().backward()
    wrt = list(plain.parameters())
    for a, b in zip(_loss_grads(adjoint, x, wrt, extra_inputs=[shared]), _loss_grads(plain, x, wrt)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("split", ["unbind", "chunk"])
def test_outputs_of_one_node_are_listed_one_by_one(split):
    """Per-layer conditioning cut from one tensor (unbind, chunk, split: one autograd node, one output per
    piece): listing a piece lists that piece only. Blocks reading unlisted pieces are the unlisted-tensor
    error (their gradient was silently zero: the walk stopped at the whole node), all pieces listed give
    the exact gradients."""
    table = nn.Parameter(torch.randn(4, 1, dtype=torch.float64))
    adjoint, plain = _scaled_stacks("euler", None)

    def pieces():
        parts = table.unbind(0) if split == "unbind" else table.chunk(4, 0)
        for block, part in zip(adjoint.blocks, parts):
            block.scale = part
        return list(parts)

    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"layer 3 of an adjoint-mode AdjointResidualStack reads a tensor"):
        _loss_grads(adjoint, x, [table], extra_inputs=pieces()[:1])
    wrt = [table] + list(plain.parameters())
    got = _loss_grads(adjoint, x, wrt, extra_inputs=pieces())
    pieces()
    for a, b in zip(got, _loss_grads(plain, x, wrt)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_extra_inputs_must_be_tensors():
    adjoint, _ = _scaled_stacks("euler", torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(TypeError, match="extra_inputs must be a sequence of torch.Tensor"):
        adjoint(torch.randn(2, 3, dtype=torch.float64), extra_inputs=[1.0])


# --- bookkeeping only where it is needed ---


@pytest.mark.parametrize("method, vjp_at", [("euler", "state"), ("euler", "reconstruction"), ("euler", "extrapolated"),
                                            ("heun", "state"), ("heun", "reconstruction")])  # fmt: skip
def test_backward_writes_no_batchnorm_buffer(method, vjp_at):
    """The re-runs normalise with batch statistics without touching the running ones (track_running_stats
    off while they run): no write at all, not a write and a restore."""
    model = _conv_model(3, method, vjp_at=vjp_at)
    out = model(torch.randn(8, 4, 6, 6, requires_grad=True))
    after_forward = [(b, b._version, b.clone()) for b in model.buffers()]
    out.square().sum().backward()
    for buf, version, value in after_forward:
        assert buf._version == version and torch.equal(buf, value)
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batchnorm_without_running_stats_is_the_same_computation_in_training_mode(dtype):
    """What the re-runs rely on: in training mode BatchNorm's output and gradients do not depend on whether
    it tracks running statistics, bit for bit (channels-last too)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, dtype=dtype)
    x = torch.randn(8, 4, 5, 5, dtype=dtype)
    for x in (x.requires_grad_(True), x.to(memory_format=torch.channels_last)):
        results = []
        for track in (True, False):
            bn.track_running_stats = track
            out = bn(x)
            loss = (out * out.detach().flip(0)).sum()
            results.append([out] + list(torch.autograd.grad(loss, [x, bn.weight, bn.bias])))
        for a, b in zip(*results):
            assert torch.equal(a, b)


class CountingBlock(nn.Module):
    """tanh(Linear(x)) that counts its calls in a buffer (a module that writes a buffer, not BatchNorm), in
    place or by assigning a new tensor to the attribute (`self.calls = self.calls + 1`)."""

    def __init__(self, width, in_place=True):
        super().__init__()
        self.lin = nn.Linear(width, width, dtype=torch.float64)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.in_place = in_place

    def forward(self, x):
        if self.in_place:
            self.calls += 1
        else:
            self.calls = self.calls + 1
        return torch.tanh(self.lin(x))


@pytest.mark.parametrize("in_place", [True, False], ids=["in place", "reassigned"])
@pytest.mark.parametrize("vjp_at, anchor_every", [("state", None), ("state", 2), ("reconstruction", None),
                                                   ("extrapolated", None)])  # fmt: skip
def test_other_buffers_written_by_reruns_are_restored(vjp_at, anchor_every, in_place):
    """(A reassigned buffer was left as the last re-run wrote it: 3 calls counted per block, not 1.)"""
    blocks = [CountingBlock(3, in_place) for _ in range(4)]
    stack = AdjointResidualStack(blocks, vjp_at=vjp_at, anchor_every=anchor_every)
    stack(torch.randn(2, 3, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert [int(b.calls) for b in blocks] == [1] * 4
    assert all(dict(b.named_buffers()) == {"calls": b.calls} for b in blocks)


class BatchRenorm1d(nn.BatchNorm1d):
    """Batch renormalisation (Ioffe 2017): a BatchNorm subclass whose own training forward reads the running
    statistics and updates them whatever track_running_stats says."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        mean, std = x.mean(0), x.std(0, unbiased=False) + self.eps
        running_std = self.running_var.sqrt() + self.eps
        r = (std.detach() / running_std).clamp(1 / 3, 3)
        d = ((mean.detach() - self.running_mean) / running_std).clamp(-5, 5)
        with torch.no_grad():
            self.running_mean += self.momentum * (mean - self.running_mean)
            self.running_var += self.momentum * (std**2 - self.running_var)
        return self.weight * ((x - mean) / std * r + d) + self.bias


def test_a_batchnorm_subclass_with_its_own_forward_has_its_buffers_restored():
    """(Every _BatchNorm was assumed to write nothing with track_running_stats off: the re-runs updated the
    running statistics again and read updated ones — gradients 0.3 off at anchor_every=1.)"""
    results = {}
    for backward, anchor_every in (("backprop", None), ("adjoint", 1)):
        torch.manual_seed(0)
        blocks = [nn.Sequential(BatchRenorm1d(4, dtype=torch.float64), nn.Linear(4, 4, dtype=torch.float64), nn.Tanh())
                  for _ in range(3)]  # fmt: skip
        stack = AdjointResidualStack(blocks, backward=backward, anchor_every=anchor_every)
        torch.manual_seed(1)
        grads = []
        for _ in range(2):
            x = (3 * torch.randn(8, 4, dtype=torch.float64) + 1).requires_grad_(True)
            grads += torch.autograd.grad(stack(x).square().sum(), [x] + list(stack.parameters()))
        results[backward] = grads + list(stack.buffers())
    for a, b in zip(results["adjoint"], results["backprop"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_buffer_shared_by_every_block_is_kept_once_during_backward(monkeypatch):
    """The backward keeps a copy of the buffers its re-runs might write: one per tensor, not per registration
    (a table every block registers was copied L times — memory growing with depth)."""

    class TableBlock(nn.Module):
        def __init__(self, table):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.register_buffer("table", table)

        def forward(self, x):
            return torch.tanh(self.lin(x) + self.table)

    def bytes_copied_by_backward(depth):
        table = torch.randn(64, 8)
        stack = AdjointResidualStack([TableBlock(table) for _ in range(depth)])
        out = stack(torch.randn(64, 8, requires_grad=True))
        copied, clone = [], torch.Tensor.clone
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "clone", lambda t, *a, **k: copied.append(t.nbytes) or clone(t, *a, **k))
            out.sum().backward()
        return sum(copied)

    assert bytes_copied_by_backward(2) == bytes_copied_by_backward(8) > 0


def _spectral_norm_blocks(count, dropout):
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    blocks = [nn.Sequential(spectral_norm(nn.Linear(5, 5)), nn.Tanh(), nn.Dropout(dropout), nn.Linear(5, 5)).double()
              for _ in range(count)]  # fmt: skip
    with torch.no_grad():  # as after an optimizer step: the power iteration's vectors no longer converged
        for block in blocks:
            block[0].parametrizations.weight.original.add_(torch.randn(5, 5, dtype=torch.float64))
    return blocks


@pytest.mark.parametrize("vjp_at", ["state", "reconstruction"])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_re_runs_start_from_the_buffers_their_forward_call_read(method, vjp_at):
    """Spectral norm in training mode updates its power-iteration vectors (buffers) at every call and
    computes the weight from them: each re-run starts from the values its forward call started from, so
    anchor_every=1 is exact — outputs, gradients and the buffers left — as with BatchNorm. (Re-runs from
    the buffers the forward left computed other weights: relative gradient errors of 0.04–0.3.)"""
    x, grad_out = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    results = {}
    for mode, anchors in (("backprop", None), ("adjoint", 1)):
        blocks = _spectral_norm_blocks(4 + (method == "heun"), 0.0)
        stack = AdjointResidualStack(blocks, method=method, backward=mode, anchor_every=anchors,
                                     **({"vjp_at": vjp_at} if mode == "adjoint" else {}))  # fmt: skip
        results[mode] = _grads(stack, x, grad_out) + [b.clone() for b in stack.buffers()]
    for a, b in zip(results["adjoint"], results["backprop"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_forward_run_again_for_its_random_numbers_starts_from_the_same_buffers():
    """The forward that first draws random numbers runs its loop again, recording (see _RngRecorder): the
    buffers its first pass wrote go back to their values before it, so the second pass computes what the
    first did and the buffers are updated once, as in a plain loop."""
    x, grad_out = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    results = {}
    for mode, anchors in (("backprop", None), ("adjoint", 1)):
        blocks = _spectral_norm_blocks(4, 0.0)
        stack = AdjointResidualStack(blocks, backward=mode, anchor_every=anchors)
        _grads(stack, x, grad_out)  # draws nothing: the next adjoint forward reads the RNG around its loop only
        _set_dropout(stack, 0.5)
        torch.manual_seed(3)
        results[mode] = _grads(stack, x, grad_out) + [b.clone() for b in stack.buffers()]
    for a, b in zip(results["adjoint"], results["backprop"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


class Symmetric(nn.Module):
    def forward(self, weight):
        return 0.5 * (weight + weight.T)


@pytest.mark.parametrize("where", ["backward inside", "tied use outside the stack"])
def test_parametrize_cached_region_gives_the_exact_gradients(where):
    """Inside torch.nn.utils.parametrize.cached() the parametrized weight reaches its `original` as in the
    plain loop (anchor_every=1: the adjoint is exact) — when the backward runs inside the region, and when
    a layer outside the stack reads the same weight there. (The forward loop, run without grad, cached a
    weight with no autograd history, which the re-runs and the tied layer then read: `original` got no
    gradient from them.)"""
    from torch.nn.utils import parametrize

    x = torch.randn(5, 4, dtype=torch.float64)
    grads = {}
    for mode, anchors in (("backprop", None), ("adjoint", 1)):
        torch.manual_seed(0)
        blocks = [nn.Sequential(nn.Linear(4, 4), nn.Tanh()).double() for _ in range(3)]
        parametrize.register_parametrization(blocks[0][0], "weight", Symmetric())
        stack = AdjointResidualStack(blocks, backward=mode, anchor_every=anchors)
        with parametrize.cached():
            out = stack(x)
            if where == "tied use outside the stack":
                out = blocks[0](out)
            loss = (out**2).sum()
            if where == "backward inside":
                loss.backward()
        if where != "backward inside":
            loss.backward()
        grads[mode] = [p.grad for p in stack.parameters()]
    for a, b in zip(grads["adjoint"], grads["backprop"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_autocast_is_entered_in_backward_only_where_the_forward_state_differs(monkeypatch):
    """Entering torch.autocast costs microseconds per block call: the backward enters it only when the
    forward's autocast state differs from the one the backward runs under, and then every re-run runs in it."""
    real = torch.autocast
    entered = []

    def counted(*args, **kwargs):
        entered.append(kwargs.get("enabled", True))
        return real(*args, **kwargs)

    x = torch.randn(8, 4, 6, 6, requires_grad=True)
    model = _conv_model(3)
    out = model(x)
    monkeypatch.setattr(torch, "autocast", counted)
    out.square().sum().backward()
    assert entered == []  # no autocast in the forward, none at backward: nothing to enter
    with real("cpu", dtype=torch.bfloat16):
        out = model(x)
        out.float().square().sum().backward()  # backward inside the same region
    assert entered == []
    with real("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().sum().backward()  # outside: the forward's state is re-entered per re-run
    assert entered and all(entered)


class AutocastLoggingBlock(nn.Module):
    """tanh(Linear(x)), logging at each call whether autocast was on."""

    def __init__(self, log):
        super().__init__()
        self.lin, self.log = nn.Linear(4, 4), log

    def forward(self, x):
        self.log.append(torch.is_autocast_enabled("cpu"))
        return torch.tanh(self.lin(x))


@pytest.mark.parametrize("vjp_at, anchor_every", [("state", None), ("reconstruction", None), ("reconstruction", 2),
                                                  ("extrapolated", None)])  # fmt: skip
def test_every_rerun_runs_under_the_forwards_autocast(vjp_at, anchor_every):
    log = []
    blocks = [AutocastLoggingBlock(log) for _ in range(4)]
    stack = AdjointResidualStack(blocks, vjp_at=vjp_at, anchor_every=anchor_every)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = stack(torch.randn(3, 4, requires_grad=True))
    assert log == [True] * 4
    out.sum().backward()
    assert len(log) > 4 and all(log)


# --- vjp_at="reconstruction" ---


def _by_the_formulas(blocks, method, x_L, g, h):
    """vjp_at="reconstruction" written out from the module docstring: per layer from the top, the
    reconstruction's block evaluations differentiated where they evaluate. Returns (g_0, {param: grad})."""
    grads = {}

    def vjp(out, inp, block, cotangent):
        params = list(block.parameters())
        d_in, *d_params = torch.autograd.grad(out, [inp] + params, cotangent)
        for p, d in zip(params, d_params):
            grads[p] = grads[p] + d if p in grads else d
        return d_in

    x, L = x_L, len(blocks) - (method == "heun")
    for n in reversed(range(L)):
        z = x.detach().requires_grad_(True)
        if method == "euler":
            k = blocks[n](z)
            x, g = (z - h * k).detach(), g + vjp(k, z, blocks[n], h * g)
            continue
        k_next = blocks[n + 1](z)
        y = (z - h * k_next).detach().requires_grad_(True)
        k = blocks[n](y)
        gy = vjp(k_next, z, blocks[n + 1], h / 2 * g)
        gx = vjp(k, y, blocks[n], h / 2 * g + h * gy)
        x, g = (z - h / 2 * (k_next + k)).detach(), g + gy + gx
    return g, grads


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_reconstruction_vjp_is_the_documented_chain_rule(method, tied):
    x, W, V, stack = _mlp_stack(method, L=6, vjp_at="reconstruction")
    if tied:  # one block at every depth: each use's gradient counted once
        stack = AdjointResidualStack([stack.blocks[0]] * len(stack.blocks), method=method, vjp_at="reconstruction")
    grad_out = torch.randn_like(x)
    got = _grads(stack, x, grad_out)
    x_L = got[0]
    g0, grads = _by_the_formulas(list(stack.blocks), method, x_L, grad_out, stack.step_size)
    torch.testing.assert_close(got[1], g0, rtol=1e-12, atol=1e-14)
    for p, d in zip(stack.parameters(), got[2:]):
        torch.testing.assert_close(d, grads[p], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_reconstruction_vjp_of_linear_blocks_gives_the_exact_input_gradient(method):
    """f(x) = A_n x has the same Jacobian everywhere: where the VJP is taken does not change the input
    gradient (the weight gradients do change: A's gradient reads the state)."""
    torch.manual_seed(0)
    blocks = [nn.Linear(5, 5, bias=False, dtype=torch.float64) for _ in range(6 + (method == "heun"))]
    x, grad_out = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    exact = _grads(AdjointResidualStack(blocks, method=method, backward="backprop"), x, grad_out)
    got = _grads(AdjointResidualStack(blocks, method=method, vjp_at="reconstruction"), x, grad_out)
    torch.testing.assert_close(got[1], exact[1], rtol=1e-12, atol=1e-14)
    assert not torch.allclose(got[2], exact[2])


def _gradient_error(stack, exact, x, grad_out):
    got = torch.cat([t.flatten() for t in _grads(stack, x, grad_out)[1:]])
    return float((got - exact).norm() / exact.norm())


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_reconstruction_vjp_error_falls_with_depth_like_the_defaults(method):
    """Depth-smooth MLP blocks: the error falls as 1/L (Euler, the Jacobians O(h) from the forward's
    points) and faster for Heun (O(h²) from them, measured 1/L³ like the default), a few times the
    default's error at every depth (bench.generic_blocks' GELU blocks: 2.2–2.9× for Euler, 3.4–3.7× for
    Heun at L = 8 … 512)."""
    errors = {}
    for L in (16, 64):
        x, W, V, _, _ = smooth_stack(L, method=method)
        stacks = {v: AdjointResidualStack([MLPBlock(W[n], V[n]) for n in range(W.shape[0])], method=method, vjp_at=v)
                  for v in ("state", "reconstruction")}  # fmt: skip
        grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
        plain = AdjointResidualStack(list(stacks["state"].blocks), method=method, backward="backprop")
        exact = torch.cat([t.flatten() for t in _grads(plain, x, grad_out)[1:]])
        errors[L] = {v: _gradient_error(s, exact, x, grad_out) for v, s in stacks.items()}
    fall = errors[16]["reconstruction"] / errors[64]["reconstruction"]
    assert fall > (3 if method == "euler" else 12)  # 4× fewer steps: 4× (Euler), 16–64× (Heun)
    for L, e in errors.items():
        assert e["state"] < e["reconstruction"] < 5 * e["state"], (L, e)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_reconstruction_vjp_reconstructs_as_the_default(method):
    """The same states, so the same drift: the evaluations under autograd compute what reverse_step does."""
    drifts = []
    for vjp_at in ("state", "reconstruction"):
        x, W, V, stack = _mlp_stack(method, L=8, vjp_at=vjp_at)
        stack(x.clone().requires_grad_(True)).sum().backward()
        drifts.append(stack.last_drift)
    assert drifts[0] > 0 and drifts[1] == pytest.approx(drifts[0], rel=1e-12)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_reconstruction_vjp_at_stored_states_is_exact(method):
    """anchor_every=1: every layer's VJP at its stored input state, as vjp_at="state" does — backprop's
    gradients; BatchNorm in training mode included."""
    x, W, V, stack = _mlp_stack(method, anchor_every=1, vjp_at="reconstruction")
    grad_out = torch.randn_like(x)
    plain = AdjointResidualStack(list(stack.blocks), method=method, backward="backprop")
    for a, b in zip(_grads(stack, x, grad_out), _grads(plain, x, grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
    conv_x, conv_g = torch.randn(8, 4, 6, 6), torch.randn(8, 4, 6, 6)
    anchored = _conv_model(3, method, anchor_every=1, vjp_at="reconstruction")
    plain = _conv_model(3, method, backward="backprop")
    for a, b in zip(_grads(anchored, conv_x, conv_g), _grads(plain, conv_x, conv_g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_reconstruction_vjp_with_anchors_takes_the_stored_state_at_each_segments_first_layer(method):
    """anchor_every=2 over 4 layers: layers 3 and 1 at the reconstruction's points (from the exact x_4 and
    x_2), layers 2 and 0 at their stored input states, each with the cotangent the layer above passed on."""
    x, W, V, stack = _mlp_stack(method, L=4, anchor_every=2, vjp_at="reconstruction")
    blocks, h = list(stack.blocks), stack.step_size
    grad_out = torch.randn_like(x)
    got = _grads(stack, x, grad_out)
    plain = AdjointResidualStack(blocks, method=method, backward="backprop")
    settings = plain._checked_settings()
    states = [x]
    for n in range(4):
        states.append(plain.step(states[-1], n, settings).detach())
    g, grads = grad_out, {}
    for a in (2, 0):
        top = blocks[a + 1 : a + 2] if method == "euler" else blocks[a + 1 : a + 3]
        g, upper = _by_the_formulas(top, method, states[a + 2], g, h)  # layer a + 1
        x_in = states[a].clone().requires_grad_(True)
        params = list(blocks[a].parameters()) + ([] if method == "euler" else list(blocks[a + 1].parameters()))
        g, *lower = torch.autograd.grad(plain.step(x_in, a, settings), [x_in] + params, g)  # layer a, exact
        for p, d in list(upper.items()) + list(zip(params, lower)):
            grads[p] = grads[p] + d if p in grads else d
    torch.testing.assert_close(got[1], g, rtol=1e-12, atol=1e-14)
    for p, d in zip(stack.parameters(), got[2:]):
        torch.testing.assert_close(d, grads[p], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_reconstruction_vjp_with_error_control(method):
    """anchor_every="auto": the same drifts as vjp_at="state" (the same reconstruction), so the same
    layouts call after call; strict=True redoes a drifted segment exactly in either mode."""
    x, W, V, _ = _mlp_stack(method, L=16)
    grad_out = torch.randn_like(x)
    blocks = [MLPBlock(W[n], V[n]).double() for n in range(W.shape[0])]
    stacks = {v: AdjointResidualStack(blocks, method=method, anchor_every="auto", drift_tol=1e-4, vjp_at=v)
              for v in ("state", "reconstruction")}  # fmt: skip
    for _ in range(3):
        for s in stacks.values():
            _grads(s, x, grad_out)
        assert stacks["state"].anchor_layout() == stacks["reconstruction"].anchor_layout()
        for a, b in zip(stacks["state"].last_segment_drift, stacks["reconstruction"].last_segment_drift):
            assert a[:2] == b[:2] and a[2] == pytest.approx(b[2], rel=1e-10)
    assert len(stacks["state"].anchor_layout()) > 1
    strict = AdjointResidualStack(blocks, method=method, anchor_every="auto", drift_tol=1e-12, strict=True,
                                  vjp_at="reconstruction")  # fmt: skip
    plain = AdjointResidualStack(blocks, method=method, backward="backprop")
    for a, b in zip(_grads(strict, x, grad_out), _grads(plain, x, grad_out)):  # one segment, drifted: redone
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_reconstruction_vjp_replays_dropout_and_batchnorm(method):
    """Dropout 0.5 and BatchNorm in training mode: the running statistics are updated once per forward, and
    the evaluations under autograd draw the forward's masks — the gradient error stays near the error
    without dropout (L = 8, Euler and Heun: 0.19 and 0.11 against 0.14 and 0.08), where fresh masks give
    another gradient (error 1.0 and 0.87)."""
    gen = torch.Generator().manual_seed(0)
    x, grad_out = torch.randn(8, 4, 6, 6, generator=gen), torch.randn(8, 4, 6, 6, generator=gen)
    adjoint = _conv_model(8, method, dropout=0.5, vjp_at="reconstruction")
    plain = _conv_model(8, method, dropout=0.5, backward="backprop")
    for model in (adjoint, plain):
        torch.manual_seed(1)
        model(x.clone().requires_grad_(True)).square().sum().backward()
    for (name, a), b in zip(adjoint.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, msg=name)

    def error(dropout, **kwargs):
        grads = {}
        for backward, options in (("adjoint", kwargs), ("backprop", {})):
            model = _conv_model(8, method, dropout=dropout, backward=backward, **options)
            torch.manual_seed(1)
            grads[backward] = torch.cat([t.flatten() for t in _grads(model, x, grad_out)[2:]])
        return float((grads["adjoint"] - grads["backprop"]).norm() / grads["backprop"].norm())

    replayed = error(0.5, vjp_at="reconstruction")
    assert replayed < 2 * error(0.0, vjp_at="reconstruction")
    assert error(0.5, vjp_at="reconstruction", preserve_rng_state=False) > 3 * replayed


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_reconstruction_vjp_gives_extra_inputs_their_gradient(method):
    """A tensor the blocks read, listed in extra_inputs, gets the gradient it gets as a parameter the blocks
    own (the same computation); unlisted, it is the RuntimeError."""
    embedding = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    torch.manual_seed(0)
    blocks = [ScaledBlock(3, embedding) for _ in range(4 + (method == "heun"))]
    x = torch.randn(2, 3, dtype=torch.float64)
    read = AdjointResidualStack(blocks, method=method, vjp_at="reconstruction")
    (listed,) = _loss_grads(read, x, [embedding], extra_inputs=[embedding])
    for block in blocks:  # now the blocks own it: a weight tied across them
        del block.scale
        block.scale = embedding
    owned = AdjointResidualStack(blocks, method=method, vjp_at="reconstruction")
    (as_parameter,) = _loss_grads(owned, x, [embedding])
    torch.testing.assert_close(listed, as_parameter, rtol=1e-12, atol=1e-14)
    for block in blocks:
        del block.scale
        block.scale = embedding * 2
    with pytest.raises(RuntimeError, match=r"layer 3 .* reads a tensor that requires grad"):
        AdjointResidualStack(blocks, method=method, vjp_at="reconstruction")(x).square().sum().backward()


# --- vjp_at="extrapolated" ---


def _extrapolated_by_the_formulas(blocks, x_L, g, h):
    """vjp_at="extrapolated" written out (Euler): per layer from the top, z = x̃ − c h k_{n+1} with
    c = clamp(⟨k_{n+1}, k_{n+2}⟩ / ‖k_{n+2}‖², 0, 1) (z = x̃ while fewer than two block outputs are known),
    k = f_n(z) differentiated at z, x̃ ← x̃ − h k. Returns (g_0, {param: grad})."""
    grads, outputs, x = {}, [], x_L
    for n in reversed(range(len(blocks))):
        z = x
        if len(outputs) >= 2:
            k1, k2 = outputs[-1], outputs[-2]
            z = x - min(max(float((k1 * k2).sum() / (k2 * k2).sum()), 0.0), 1.0) * h * k1
        z = z.detach().requires_grad_(True)
        k = blocks[n](z)
        params = list(blocks[n].parameters())
        d_in, *d_params = torch.autograd.grad(k, [z] + params, h * g)
        for p, d in zip(params, d_params):
            grads[p] = grads[p] + d if p in grads else d
        x, g = (x - h * k).detach(), g + d_in
        outputs.append(k.detach())
    return g, grads


@pytest.mark.parametrize("tied", [False, True])
def test_extrapolated_vjp_is_the_documented_chain_rule(tied):
    x, W, V, stack = _mlp_stack("euler", L=6, vjp_at="extrapolated")
    if tied:
        stack = AdjointResidualStack([stack.blocks[0]] * len(stack.blocks), vjp_at="extrapolated")
    grad_out = torch.randn_like(x)
    got = _grads(stack, x, grad_out)
    g0, grads = _extrapolated_by_the_formulas(list(stack.blocks), got[0], grad_out, stack.step_size)
    torch.testing.assert_close(got[1], g0, rtol=1e-12, atol=1e-14)
    for p, d in zip(stack.parameters(), got[2:]):
        torch.testing.assert_close(d, grads[p], rtol=1e-12, atol=1e-14)


def _errors_by_vjp_point(W, V, x, points):
    """{vjp_at: relative error of the input and weight gradients against backprop} for MLP blocks W, V."""
    blocks = [MLPBlock(W[n], V[n]) for n in range(W.shape[0])]
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    exact = torch.cat([t.flatten() for t in _grads(AdjointResidualStack(blocks, backward="backprop"), x, grad_out)[1:]])
    return {v: _gradient_error(AdjointResidualStack(blocks, vjp_at=v), exact, x, grad_out) for v in points}


def test_extrapolated_vjp_is_second_order_where_the_blocks_vary_smoothly_with_depth():
    """Depth-smooth MLP blocks: c → 1 and z_n is O(h²) from x_n, so the error falls as 1/L² — below the
    default's from some depth on (bench.generic_blocks: 1.16× at L = 8, 0.03× at L = 512)."""
    errors = {L: _errors_by_vjp_point(*smooth_stack(L, method="euler")[1:3], smooth_stack(L, method="euler")[0],
                                      ("state", "extrapolated")) for L in (16, 64)}  # fmt: skip
    assert errors[16]["extrapolated"] / errors[64]["extrapolated"] > 10  # 4× the depth: 16× (1/L²)
    assert errors[64]["extrapolated"] < 0.5 * errors[64]["state"], errors


def test_extrapolated_vjp_is_the_reconstructions_where_consecutive_blocks_are_unrelated():
    """Blocks drawn independently at each depth: their outputs are nearly orthogonal, c ≈ 0, and the error
    is vjp_at="reconstruction"'s (bench.generic_blocks: within 1 % of it at L = 8 … 512)."""
    gen = torch.Generator().manual_seed(0)
    L = 32
    x = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    W, V = (torch.randn(L, 16, 8, generator=gen, dtype=torch.float64),
            torch.randn(L, 8, 16, generator=gen, dtype=torch.float64))  # fmt: skip
    errors = _errors_by_vjp_point(W, V, x, ("reconstruction", "extrapolated"))
    assert errors["extrapolated"] == pytest.approx(errors["reconstruction"], rel=0.05), errors


def test_extrapolated_vjp_starts_afresh_below_every_stored_state():
    """A layer's VJP at a stored state forgets the outputs above it: with segments of two layers no layer has
    two reconstructed outputs above it in its segment, so every point is vjp_at="reconstruction"'s; with
    segments of four the lower two layers extrapolate."""
    x, W, V, _ = _mlp_stack("euler", L=8)
    grad_out = torch.randn_like(x)
    blocks = [MLPBlock(W[n], V[n]).double() for n in range(W.shape[0])]
    for anchor_every, same in ((2, True), (4, False)):
        got = {v: _grads(AdjointResidualStack(blocks, vjp_at=v, anchor_every=anchor_every), x, grad_out)
               for v in ("reconstruction", "extrapolated")}  # fmt: skip
        assert all(torch.equal(a, b) for a, b in zip(*got.values())) == same


def test_extrapolated_vjp_with_error_control():
    """anchor_every="auto" measures the drift of the extrapolated reconstruction; with strict=True and a
    tolerance nothing meets, every segment is redone exactly from its anchor: backprop's gradients."""
    x, W, V, _ = _mlp_stack("euler", L=12)
    grad_out = torch.randn_like(x)
    blocks = [MLPBlock(W[n], V[n]).double() for n in range(W.shape[0])]
    exact = _grads(AdjointResidualStack(blocks, backward="backprop"), x, grad_out)
    stack = AdjointResidualStack(blocks, vjp_at="extrapolated", anchor_every="auto", drift_tol=1e-15, strict=True)
    for _ in range(2):
        for a, b in zip(_grads(stack, x, grad_out), exact):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert all(drift > 1e-15 for first, length, drift in stack.last_segment_drift if length > 1)


def test_bad_vjp_at():
    with pytest.raises(ValueError, match=r"vjp_at must be one of \['state', 'reconstruction', 'extrapolated'\]; got 'output'"):
        AdjointResidualStack([nn.Identity()], vjp_at="output")
    with pytest.raises(ValueError, match="vjp_at='extrapolated' is defined for method='euler'"):
        AdjointResidualStack([nn.Identity()] * 2, method="heun", vjp_at="extrapolated")
    with pytest.raises(TypeError, match="vjp_at must be a string"):
        AdjointResidualStack([nn.Identity()], vjp_at=None)
    with pytest.raises(ValueError, match="vjp_at is only meaningful with backward='adjoint'"):
        AdjointResidualStack([nn.Identity()], backward="backprop", vjp_at="reconstruction")
    assert "vjp_at='reconstruction'" in repr(AdjointResidualStack([nn.Identity()], vjp_at="reconstruction"))


@pytest.mark.parametrize("method, vjp_at", [("heun", "state"), ("heun", "reconstruction"), ("euler", "extrapolated")])
def test_torch_compile_gives_the_eager_adjoint_gradients(method, vjp_at):
    """torch.compile breaks the graph at the adjoint stack's autograd.Function (fullgraph=True is not
    supported: dynamo does not trace torch.get_rng_state), which then runs eagerly: the eager gradients
    and drift, call after call, and the same learnt "the blocks draw nothing"."""
    torch._dynamo.reset()
    x, W, V, stack = _mlp_stack(method, L=4, vjp_at=vjp_at)
    grad_out = torch.randn_like(x)
    eager = _grads(stack, x, grad_out)
    eager_drift = stack.last_drift
    compiled = torch.compile(stack)
    for _ in range(2):
        for a, b in zip(_grads(compiled, x, grad_out), eager):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        assert stack.last_drift == pytest.approx(eager_drift, rel=1e-12) and not stack._blocks_drew


@pytest.mark.parametrize("compiled", ["module", "train step"])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_torch_compile_replays_the_forward_s_dropout_masks(method, compiled):
    """Blocks with dropout under torch.compile — of the stack, or of a train step that calls backward too:
    the blocks run eagerly in the forward and in the backward's re-runs, so the re-runs replay the forward's
    masks and the drift and gradients are the eager ones from the same seed. (When dynamo compiled the
    forward's block calls, their masks came from inductor's RNG, which the recorded generator states do
    not replay: drift 0.035 / 0.026 (Euler / Heun, L = 32) against 0.0005 / 0.0003. Tracing the
    backward's re-runs cost 25 graphs and 3× the first call's time.)"""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    L, q, m = 12, 8, 16
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(q, m), nn.Tanh(), nn.Dropout(0.2), nn.Linear(m, q))
              for _ in range(L + (method == "heun"))]  # fmt: skip
    stack = AdjointResidualStack(blocks, method=method).double()
    x, grad_out = torch.randn(16, q, dtype=torch.float64), torch.randn(16, q, dtype=torch.float64)
    torch.manual_seed(1)
    eager, eager_drift = _grads(stack, x, grad_out), stack.last_drift
    traced = []
    blocks[0].register_forward_hook(lambda *_: traced.append(torch.compiler.is_compiling()))
    if compiled == "module":
        compiled_module = torch.compile(stack)
        run = lambda: _grads(compiled_module, x, grad_out)  # noqa: E731
    else:
        run = torch.compile(lambda: _grads(stack, x, grad_out))
    for _ in range(2):
        torch.manual_seed(1)
        for a, b in zip(run(), eager):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        assert stack.last_drift == pytest.approx(eager_drift, rel=1e-12) and stack._blocks_drew
    assert traced and not any(traced)  # block 0 ran in the forward and in the backward, never under dynamo
    # the code around the stack's Function: one graph (module) or three (train step); 25–56 with the re-runs traced
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3
    assert eager_drift < 5e-3  # the masks replayed: near the no-dropout drift (2.0e-3 / 1.2e-3 here)
