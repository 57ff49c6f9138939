"""PyTorch integration of ode_mlp / ODEMLP: torch.library opcheck, torch.compile(fullgraph=True),
torch.autograd.grad on parts of the inputs, double backward, autocast, hooks and frozen parameters."""

import pytest
import torch
from torch import nn

import naive
from helpers import make_stack
from odenets_fast import ODEMLP, AdjointResidualStack, available_backends, ode_mlp
from odenets_fast.library import is_absent, ode_mlp_backward, ode_mlp_forward
from odenets_fast.nn import NOT_MEASURED
from odenets_fast.spec import StackSpec

CPU_BACKENDS = [name for name in ("reference", "cpp") if available_backends()[name] == "available"]


def test_cpp_backend_is_built_here():
    # the tests below are parametrized over the available CPU backends: make sure cpp is among them
    assert "cpp" in CPU_BACKENDS, available_backends()["cpp"]


def _forward_args(method, backward, anchor_every, backend, bias, dtype=torch.float64, requires_grad=True):
    """ode_mlp_forward's arguments; anchor_every="auto": error-controlled anchors at layers 0 and 2."""
    x, W, V, b, c = make_stack(B=5, q=3, m=4, L=3, method=method, bias=bias, dtype=dtype)
    tensors = [None if t is None else t.requires_grad_(requires_grad) for t in (x, W, V, b, c)]
    auto = anchor_every == "auto"
    spec = StackSpec(method=method, activation="tanh", depth=3, step=1 / 3, scale_in=3**-0.5, scale_out=0.5,
                     backward=backward, anchor_every=None if auto else anchor_every or None,
                     drift_tol=1e-3 if auto else None)  # fmt: skip
    mask = torch.tensor([True, False, True]) if auto else torch.zeros(0, dtype=dtype)
    drifts = torch.full((3,), -1.0) if auto else torch.zeros(0, dtype=dtype)
    return (*tensors, *spec.op_args(), backend, torch.zeros((), dtype=dtype), mask, drifts)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method, backward, anchor_every, bias", [
    ("euler", "adjoint", 0, False), ("heun", "backprop", 0, True), ("heun", "adjoint", 2, True),
    ("heun", "adjoint", "auto", True),
])  # fmt: skip
def test_opcheck_forward_and_backward(backend, method, backward, anchor_every, bias):
    args = _forward_args(method, backward, anchor_every, backend, bias)
    torch.library.opcheck(ode_mlp_forward, args)
    out, final, anchors, stages, layers = ode_mlp_forward(*[a.detach() if isinstance(a, torch.Tensor) else a
                                                            for a in args])  # fmt: skip
    _, W, V, b, c = args[:5]
    scalars_and_backend = args[5:-3]
    backward_args = (torch.randn_like(out), out if is_absent(final) else final, anchors, stages, layers,
                     *[None if t is None else t.detach() for t in (W, V, b, c)], *scalars_and_backend)  # fmt: skip
    torch.library.opcheck(ode_mlp_backward, backward_args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_with_views_of_other_layouts(backend):
    """A transposed x, tied weights V = Wᵀ (a transposed view), column-major biases: the fake implementations
    give the dense layout the kernels write (empty_like copied the views' strides)."""
    x, W, _, b, c = _forward_args("heun", "adjoint", 2, backend, True)[:5]
    args = list(_forward_args("heun", "adjoint", 2, backend, True))
    args[:5] = (x.detach().t().contiguous().t().requires_grad_(True), W, W.transpose(1, 2),
                b.detach().t().contiguous().t().requires_grad_(True), c.detach().t().contiguous().t().requires_grad_(True))
    assert not (args[0].is_contiguous() or args[2].is_contiguous() or args[3].is_contiguous())
    torch.library.opcheck(ode_mlp_forward, tuple(args))
    out, final, anchors, stages, layers = ode_mlp_forward(*[a.detach() if isinstance(a, torch.Tensor) else a
                                                            for a in args])  # fmt: skip
    backward_args = (torch.randn_like(out), out if is_absent(final) else final, anchors, stages, layers,
                     *[t.detach() for t in args[1:5]], *args[5:-3])  # fmt: skip
    torch.library.opcheck(ode_mlp_backward, backward_args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_with_tied_weights_and_a_transposed_input(backend):
    """(The backward's fake gave a transposed V's gradient V's strides: the compiled graph failed its stride check,
    and without that check read the gradient wrongly; the reference's output kept a transposed x's layout.)"""
    torch._dynamo.reset()
    x = make_stack(B=6, q=3, m=5, L=4, dtype=torch.float32)[0].t().contiguous().t()
    W = make_stack(B=6, q=3, m=5, L=4, dtype=torch.float32)[1].requires_grad_(True)

    def loss(x, W):
        return ode_mlp(x, W, W.transpose(1, 2), activation="tanh", backend=backend).square().sum()

    want = torch.autograd.grad(loss(x, W), W)[0]
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True)(x, W), W)[0]
    torch.testing.assert_close(got, want)


def test_opcheck_cpp_kernels():
    if "cpp" not in CPU_BACKENDS:
        pytest.fail("the C++ extension is not built")
    x, W, V, b, c = make_stack(B=5, q=3, m=4, L=3, method="heun", bias=True)
    scalars = ("heun", "gelu", 1 / 3, 3**-0.5, 0.5)
    for backward, anchor_every in (("backprop", None), ("adjoint", 2)):
        forward = (x, W, V, b, c, *scalars, backward, anchor_every)
        torch.library.opcheck(torch.ops.odenets_fast.mlp_stack_forward.default, forward)
        final, anchors, stages = torch.ops.odenets_fast.mlp_stack_forward(*forward)
        for V_given in (V, W.transpose(1, 2)):  # tied weights: a transposed view, whose gradient is dense
            torch.library.opcheck(torch.ops.odenets_fast.mlp_stack_backward.default,
                                  (torch.randn_like(x), final, anchors, stages, W, V_given, b, c, *scalars, backward,
                                   anchor_every))  # fmt: skip


def _train_step(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = (model(x) - y).square().sum()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_torch_compile_fullgraph(backend, method):
    """Every backend; triton runs interpreted on CPU tensors here and compiled on a GPU."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = ODEMLP(4, 8, 6, method=method, init="smooth", bias=True, backend=backend, device=device)
    x, y = torch.randn(10, 4, device=device), torch.randn(10, 4, device=device)
    want_loss, want_grads = _train_step(model, x, y)
    want_drift = model.last_drift
    model.drift.fill_(NOT_MEASURED)
    compiled = torch.compile(model, fullgraph=True)
    loss, grads = _train_step(compiled, x, y)
    torch.testing.assert_close(loss, want_loss)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)
    assert model.last_drift == pytest.approx(want_drift, rel=1e-6)  # the backward's side effect survives


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("backward, anchor_every", [("adjoint", None), ("adjoint", 2), ("backprop", None)])
def test_torch_compile_dynamic_fullgraph(backend, backward, anchor_every):
    """dynamic=True makes float attributes (T) and arguments SymFloats: the argument checks must
    not break the graph on them (math.isfinite did). Several batch sizes, a changed T, and a compiled
    function that takes T as an argument, all against eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ODEMLP(4, 8, 3, init="smooth", bias=True, backend=backend, backward=backward, anchor_every=anchor_every)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for batch, T in ((5, 1.0), (7, 1.0), (9, 0.5)):
        model.T = T
        x, y = torch.randn(batch, 4), torch.randn(batch, 4)
        want_loss, want_grads = _train_step(model, x, y)
        loss, grads = _train_step(compiled, x, y)
        torch.testing.assert_close(loss, want_loss)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w)

    def fn(x, W, V, T):
        return ode_mlp(x, W, V, T=T, backward=backward, anchor_every=anchor_every, backend=backend)

    x, W, V = make_stack(B=6, q=4, m=8, L=3, dtype=torch.float32)[:3]
    compiled_fn = torch.compile(fn, fullgraph=True, dynamic=True)
    for T in (1.0, 2.5):
        torch.testing.assert_close(compiled_fn(x, W, V, T), fn(x, W, V, T))


@pytest.mark.parametrize("make", [
    lambda: ODEMLP(4, 8, 3),
    lambda: nn.Sequential(nn.Linear(4, 4), ODEMLP(4, 8, 3)),
    lambda: AdjointResidualStack([nn.Linear(4, 4) for _ in range(3)]),
])  # fmt: skip
@pytest.mark.parametrize("convert", [lambda m: torch.jit.trace(m, torch.randn(2, 4, requires_grad=True)),
                                     torch.jit.script])  # fmt: skip
def test_torchscript_is_a_clear_error(make, convert):
    with pytest.raises(RuntimeError, match="does not support TorchScript .* use torch.compile .* or torch.export"):
        convert(make())


@pytest.mark.parametrize("make", [lambda: ODEMLP(4, 8, 3, init="smooth"),
                                  lambda: AdjointResidualStack([nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0))
                                                                for _ in range(3)])])  # fmt: skip
def test_torch_export_still_works(make):
    """Adjoint-mode modules export (AdjointResidualStack as its plain loop: export records the forward's
    computation; its RNG-state recording failed on export's fake tensors before)."""
    torch.manual_seed(0)
    model = make()
    x = torch.randn(5, 4)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.testing.assert_close(exported.module()(x), model(x))
    x = torch.randn(7, 4)
    torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_of_input_only_and_params_only(backend):
    torch.manual_seed(0)
    model = ODEMLP(4, 8, 6, init="smooth", backend=backend, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    out = model(x)
    (gx,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
    gW, gV = torch.autograd.grad(out.sum(), [model.W, model.V])
    both = torch.autograd.grad(model(x).sum(), [x, model.W, model.V])
    for a, b in zip((gx, gW, gV), both):
        torch.testing.assert_close(a, b)
    assert model.W.grad is None and x.grad is None  # autograd.grad fills no .grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_double_backward_in_backprop_mode_is_exact(backend, method):
    x, W, V, b, c = [t.requires_grad_(True) for t in make_stack(B=3, q=3, m=4, L=3, method=method, bias=True)]

    def fn(*tensors):
        return ode_mlp(*tensors, method=method, backward="backprop", activation="tanh", backend=backend)

    assert torch.autograd.gradgradcheck(fn, (x, W, V, b, c))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_with_data_input_and_frozen_biases(backend):
    """Hessian-vector products in the weights only: x is data and b, c are frozen."""
    x, W, V, b, c = make_stack(B=3, q=3, m=4, L=3, bias=True)

    def fn(W, V):
        return ode_mlp(x, W, V, b, c, backward="backprop", activation="tanh", backend=backend)

    assert torch.autograd.gradgradcheck(fn, (W.requires_grad_(True), V.requires_grad_(True)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_in_adjoint_mode_is_a_clear_error(backend):
    x, W, V = [t.requires_grad_(True) for t in make_stack(B=3, q=3, m=4, L=3)[:3]]
    out = ode_mlp(x, W, V, backend=backend)
    with pytest.raises(RuntimeError, match="double backward .* adjoint mode is not supported.*backward='backprop'"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_batched_backward_in_backprop_mode_is_exact(backend, method):
    """jacobian(vectorize=True) and is_grads_batched run the backward under vmap: backprop mode differentiates
    the re-run there (the kernels have no batching rule: an internal error before); adjoint mode says what to
    do instead."""
    x, W, V = make_stack(B=3, q=4, m=5, L=3, method=method)[:3]

    def f(x, backward="backprop"):
        return ode_mlp(x, W, V, method=method, backward=backward, backend=backend)

    want = torch.func.jacrev(lambda x: naive.eager_forward(x, W, V, method=method, activation="gelu"))(x)
    torch.testing.assert_close(torch.autograd.functional.jacobian(f, x, vectorize=True), want)
    leaf = x.clone().requires_grad_(True)
    cotangents = torch.randn(2, *x.shape, dtype=x.dtype)
    batched = torch.autograd.grad(f(leaf), leaf, cotangents, is_grads_batched=True)[0]
    torch.testing.assert_close(batched, torch.einsum("kbq,bqcr->kcr", cotangents, want))
    with pytest.raises(RuntimeError, match=r"batched backward .* adjoint mode .*vectorize=False.*'backprop'"):
        torch.autograd.functional.jacobian(lambda x: f(x, "adjoint"), x, vectorize=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_func_grad(backend):
    """torch.func.grad differentiates with create_graph: exact in backprop mode (through the op's
    differentiable re-run), in adjoint mode the double-backward error naming torch.func; an adjoint-mode
    AdjointResidualStack says what to use instead of PyTorch's message about an internal."""
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    model = ODEMLP(4, 8, 3, init="smooth", backward="backprop", backend=backend)
    params = dict(model.named_parameters())
    got = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).square().sum())(params)
    want = torch.autograd.grad(model(x).square().sum(), list(params.values()))
    for name, w in zip(params, want):
        torch.testing.assert_close(got[name], w)
    model.backward_mode = "adjoint"
    with pytest.raises(RuntimeError, match=r"double backward .*torch.func transform.* adjoint mode is not supported"):
        torch.func.grad(lambda x: model(x).sum())(x)
    stack = AdjointResidualStack([nn.Linear(4, 4) for _ in range(3)])
    with pytest.raises(RuntimeError, match="torch.func transforms .* adjoint-mode AdjointResidualStack.*'backprop'"):
        torch.func.grad(lambda x: stack(x).sum())(x)
    stack.backward_mode = "backprop"
    torch.testing.assert_close(torch.func.grad(lambda x: stack(x).sum())(x),
                               torch.autograd.grad(stack(x.requires_grad_(True)).sum(), x)[0])  # fmt: skip


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_torch_func_vjp_jacrev_and_hessian_in_backprop_mode(backend, method):
    """torch.func.vjp's function and jacrev differentiate after their transform's level has ended
    (a RuntimeError about a tensor without grad_fn before); Jacobians and Hessians through the op are
    those of the float64 eager loop."""
    torch.manual_seed(0)
    x, W, V, b, c = make_stack(B=3, q=4, m=5, L=3, method=method, bias=True)

    def ours(x, W):
        return ode_mlp(x, W, V, b, c, method=method, activation="tanh", backward="backprop", backend=backend)

    def eager(x, W):
        return naive.eager_forward(x, W, V, b, c, method=method, activation="tanh")

    cotangent = torch.randn_like(x)
    got_vjp = torch.func.vjp(ours, x, W)[1](cotangent)
    for got, want in zip(got_vjp, torch.autograd.functional.vjp(eager, (x, W), cotangent)[1]):
        torch.testing.assert_close(got, want)
    jacobians = torch.func.jacrev(ours, argnums=(0, 1))(x, W)
    for got, want in zip(jacobians, torch.autograd.functional.jacobian(eager, (x, W))):
        torch.testing.assert_close(got, want)
    hessian = torch.func.jacrev(torch.func.jacrev(lambda x: ours(x, W).square().sum()))(x)
    torch.testing.assert_close(hessian, torch.autograd.functional.hessian(lambda x: eager(x, W).square().sum(), x))
    with pytest.raises(RuntimeError, match="adjoint mode is not supported"):
        torch.func.vjp(lambda x: ode_mlp(x, W, V, backend=backend), x)[1](cotangent)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_bfloat16_leaves_the_stack_in_float32(backend):
    """Inside torch.autocast the stack computes in its parameters' dtype: the state stays float32,
    and the forward and the backward's reconstruction use the same arithmetic."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), ODEMLP(4, 8, 6, init="smooth", backend=backend))
    x = torch.randn(10, 4)
    want, want_grads = _train_step(model, x, torch.zeros(10, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model[0](x)
        out = model[1](hidden)
    assert hidden.dtype == torch.bfloat16 and out.dtype == torch.float32
    model.zero_grad()
    out.square().sum().backward()
    stack = model[1]
    reference = ODEMLP(4, 8, 6, backend=backend)
    reference.load_state_dict(stack.state_dict())
    x_in = hidden.detach().float().requires_grad_(True)
    reference(x_in).square().sum().backward()
    torch.testing.assert_close(stack.W.grad, reference.W.grad)  # same float32 stack, same gradients


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_inside_autocast_differentiates_the_float32_stack(backend):
    """create_graph=True inside autocast: the re-run the backward differentiates computes as the forward
    did, in the parameters' dtype — the gradient is the one outside autocast, not a bfloat16 one (2.6e-3
    off before). (Differentiating that gradient again inside autocast follows PyTorch's own rule for
    backward under autocast, as any PyTorch graph does.)"""
    torch.manual_seed(0)
    model = ODEMLP(4, 8, 5, init="smooth", backward="backprop", backend=backend)
    x = torch.randn(6, 4)
    want, = torch.autograd.grad(model(x).square().sum(), model.W)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, = torch.autograd.grad(model(x).square().sum(), model.W, create_graph=True)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_frozen_parameters_and_hooks(backend):
    torch.manual_seed(0)
    model = ODEMLP(4, 8, 6, init="smooth", bias=True, backend=backend)
    model.V.requires_grad_(False)
    seen = []
    model.W.register_hook(lambda grad: seen.append(grad.shape))
    handle = model.register_forward_hook(lambda module, inputs, output: seen.append("forward"))
    model(torch.randn(5, 4)).sum().backward()
    assert model.V.grad is None and model.W.grad is not None and model.b.grad is not None
    assert seen == ["forward", model.W.shape]
    handle.remove()


def test_opcheck_triton_backend():
    """The Triton kernels under the same op (interpreted on CPU here; compiled on the GPU)."""
    if available_backends()["triton"] != "available":
        pytest.fail(available_backends()["triton"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = [a.to(device) if isinstance(a, torch.Tensor) else a
            for a in _forward_args("heun", "adjoint", 2, "triton", True, dtype=torch.float32)]  # fmt: skip
    torch.library.opcheck(ode_mlp_forward, tuple(args))
