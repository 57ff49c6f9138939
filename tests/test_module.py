"""ODEMLP: init structure, equivalence with the functional op, last_drift."""

import math

import pytest
import torch
from torch import nn

from odenets_fast import ODEMLP, diagnostics, ode_mlp, reference
from odenets_fast.spec import check_stack


@pytest.mark.parametrize("method, P", [("euler", 8), ("heun", 9)])
def test_parameter_shapes(method, P):
    model = ODEMLP(3, 5, 8, method=method, bias=True)
    assert model.W.shape == (P, 5, 3) and model.V.shape == (P, 3, 5)
    assert model.b.shape == (P, 5) and model.c.shape == (P, 3)
    assert not model.b.any() and not model.c.any()
    assert ODEMLP(3, 5, 8).b is None


def test_tied_init():
    torch.manual_seed(0)
    model = ODEMLP(4, 6, 10, init="tied")
    assert not model.V.any()
    assert torch.equal(model.W, model.W[:1].expand_as(model.W))
    assert diagnostics.depth_smoothness(model.W) == 0.0
    assert 0.6 < model.W[0].std() < 1.4  # standard Gaussian entries


def test_iid_init():
    torch.manual_seed(0)
    model = ODEMLP(8, 16, 32, init="iid")
    assert not model.V.any()
    corr = torch.corrcoef(model.W.flatten(1))
    off_diagonal = corr - torch.diag(torch.diag(corr))
    assert off_diagonal.abs().max() < 0.5
    assert 0.9 < model.W.std() < 1.1


def test_smooth_init_is_correlated_over_depth():
    torch.manual_seed(0)
    depth, ell = 64, 0.2
    model = ODEMLP(8, 16, depth, init="smooth", smooth_lengthscale=ell)
    W = model.W.detach().double().flatten(1)  # (P, entries): each column one GP sample path
    assert 0.8 < W.std() < 1.2
    assert 0.05 < model.V.std() < 0.15
    for lag in (1, 8, 16):  # empirical correlation at depth lag matches exp(-(lag/L)²/2ℓ²)
        emp = (W[lag:] * W[:-lag]).mean() / W.pow(2).mean()
        assert abs(float(emp) - torch.exp(torch.tensor(-0.5 * (lag / depth / ell) ** 2)).item()) < 0.1
    iid = ODEMLP(8, 16, depth, init="iid")
    assert diagnostics.depth_smoothness(model.W) < 0.5 * diagnostics.depth_smoothness(iid.W)


def test_smooth_init_large_depth_is_well_conditioned():
    model = ODEMLP(2, 3, 1024, method="heun", init="smooth")
    assert torch.isfinite(model.W).all() and torch.isfinite(model.V).all()


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_forward_and_grads_equal_functional(method):
    torch.manual_seed(0)
    model = ODEMLP(4, 6, 5, method=method, activation="silu", init="smooth", bias=True, dtype=torch.float64,
                   backend="reference")  # fmt: skip
    x = torch.randn(9, 4, dtype=torch.float64)
    out = model(x)
    params = [p.detach().clone().requires_grad_(True) for p in (model.W, model.V, model.b, model.c)]
    want = ode_mlp(x, *params, method=method, activation="silu", backend="reference")
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    out.square().sum().backward()
    want.square().sum().backward()
    for p, q in zip((model.W, model.V, model.b, model.c), params):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


@pytest.mark.parametrize("anchor_every", [None, 3])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_last_drift_equals_reference_reconstruction(method, anchor_every):
    torch.manual_seed(1)
    model = ODEMLP(5, 7, 12, method=method, init="smooth", anchor_every=anchor_every, dtype=torch.float64)
    with torch.no_grad():
        model.V.mul_(10)  # a visible drift
    x = torch.randn(6, 5, dtype=torch.float64)
    assert model.last_drift is None
    model(x).sum().backward()
    spec = check_stack(
        x, model.W, model.V, None, None, method=method, activation="gelu", T=1.0,
        backward="adjoint", anchor_every=anchor_every, scale_in=None, scale_out=None,
    )  # fmt: skip
    with torch.no_grad():
        states = reference.trajectory(x, model.W, model.V, None, None, spec)
        # x̃_0 is reconstructed from x̃_1: the reconstruction (with resets) one step before 0
        x1 = reference.reconstruct(states[-1], model.W, model.V, None, None, spec, anchors=states)[1]
        stack = reference._Stack(model.W, model.V, None, None, spec, torch.float64)
        x0 = reference.reverse_step(stack, x1, 0)
    want = float((x0 - x).norm() / x.norm())
    assert want > 1e-6
    assert model.last_drift == pytest.approx(want, rel=1e-12)
    if anchor_every is None:  # plain adjoint: the drift is the whole-depth reconstruction error
        errs = diagnostics.reconstruction_error(x, model.W, model.V, method=method)
        assert model.last_drift == pytest.approx(float(errs[0]), rel=1e-12)


def test_backprop_mode_has_no_drift():
    model = ODEMLP(3, 4, 6, backward="backprop")
    model(torch.randn(2, 3)).sum().backward()
    assert model.last_drift is None
    assert model.W.grad is not None


def test_a_nan_drift_reads_as_nan_not_as_not_measured():
    """None means only "no adjoint backward yet": a batch with an inf entry reconstructs a NaN x̃_0, and
    last_drift says nan (as AdjointResidualStack's does) instead of pretending nothing was measured."""
    torch.manual_seed(0)
    model = ODEMLP(3, 5, 4, init="smooth")
    x = torch.randn(2, 3)
    x[0, 0] = float("inf")
    model(x).sum().backward()
    assert math.isnan(model.last_drift)
    model(torch.randn(2, 3)).sum().backward()  # a finite batch after it: measured again
    assert 0 < model.last_drift < 1


def test_module_trains():
    torch.manual_seed(0)
    model = ODEMLP(4, 8, 16, init="tied", backend="reference")
    x, y = torch.randn(32, 4), torch.randn(32, 4)
    opt = torch.optim.SGD(model.parameters(), lr=16 * 1e-2)
    losses = []
    for _ in range(100):
        loss = (model(x) - y).square().sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(a >= b for a, b in zip(losses, losses[1:]))  # gradient descent on a smooth loss


@pytest.mark.parametrize("change", [
    lambda model: setattr(model, "W", nn.Parameter(torch.randn(6, 8, 4))),
    lambda model: setattr(model, "method", "heun"),
])  # fmt: skip
def test_parameters_of_another_depth_are_a_clear_error(change):
    """(A W of 6 layers ran as a depth-6 stack while depth, T / depth and the repr said 3; method="heun" set
    on an Euler model ran a depth-2 Heun stack.)"""
    model = ODEMLP(4, 8, 3)
    change(model)
    with pytest.raises(ValueError, match=r"an ODEMLP of depth 3, hidden 8, dim 4 .* needs W of shape"):
        model(torch.randn(5, 4))
