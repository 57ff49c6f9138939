"""convert: existing residual stages become AdjointResidualStacks computing the same function."""

import copy
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from odenets_fast import ODEMLP, AdjointResidualStack, convert


class Residual(nn.Module):
    """A user block whose forward is x + g(x)."""

    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        return x + self.net(x)


class ResidualOtherOrder(Residual):
    def forward(self, x):
        return torch.add(self.net(x), x)


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock's structure: relu(x + bn(conv(relu(bn(conv(x)))))),
    with a downsample branch when the shape changes."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample, self.stride = downsample, stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


def _stage(inplanes, planes, blocks):
    down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes))
    return nn.Sequential(BasicBlock(inplanes, planes, 2, down), *[BasicBlock(planes, planes) for _ in range(blocks - 1)])


def _stacks(model):
    return [m for m in model.modules() if isinstance(m, AdjointResidualStack)]


@pytest.mark.parametrize("backward", ["backprop", "adjoint"])
def test_sequential_of_residual_blocks(backward):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), Residual(8), ResidualOtherOrder(8), Residual(8), nn.ReLU(), Residual(8))
    x = torch.randn(16, 5)
    want = model(x)
    params = set(model.parameters())
    converted = convert(model, backward=backward)
    stacks = _stacks(converted)
    assert [s.depth for s in stacks] == [3, 1]
    assert set(converted.parameters()) == params  # the same parameters, not copies
    torch.testing.assert_close(converted(x), want, rtol=1e-5, atol=1e-6)


def test_converted_backprop_gradients_equal_original():
    torch.manual_seed(0)
    original = nn.Sequential(*[Residual(6) for _ in range(4)])
    x, grad_out = torch.randn(10, 6), torch.randn(10, 6)
    want = torch.autograd.grad(original(x), list(original.parameters()), grad_out)
    converted = convert(original, backward="backprop")
    got = torch.autograd.grad(converted(x), list(converted.parameters()), grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backward", ["backprop", "adjoint"])
def test_an_in_place_module_after_converted_blocks_still_trains(backward):
    """The adjoint backward reads the stack's output: a module after it that would overwrite it in place
    runs with inplace=False (a warning says so), and the converted model gives the original gradients;
    backprop mode reads nothing of it and leaves the module as it is."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), Residual(6), Residual(6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    x = torch.randn(8, 5)
    want = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(model, backward=backward, anchor_every=1 if backward == "adjoint" else None)
    assert model[2].inplace == (backward == "backprop")
    messages = [str(w.message) for w in caught]
    warned = ["convert: '2' (ReLU) receives the output of converted blocks and now runs with inplace=False: the "
              "adjoint backward reads that output"]  # fmt: skip
    assert messages == (warned if backward == "adjoint" else [])
    got = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _relu_in_place_after_nesting():
    return nn.Sequential(nn.Linear(5, 6), nn.Sequential(Residual(6), Residual(6)), nn.ReLU(inplace=True))


def _relu_in_place_after_identity():
    return nn.Sequential(nn.Linear(5, 6), Residual(6), Residual(6), nn.Identity(), nn.ReLU(inplace=True))


def _relu_in_place_first_in_a_sequential():
    head = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(6, 2))
    return nn.Sequential(nn.Linear(5, 6), Residual(6), Residual(6), head)


def _relu_in_place_after_an_empty_sequential():
    return nn.Sequential(nn.Linear(5, 6), Residual(6), Residual(6), nn.Sequential(), nn.ReLU(inplace=True))


@pytest.mark.parametrize("make, name", [
    (_relu_in_place_after_nesting, "2"), (_relu_in_place_after_identity, "3"),
    (_relu_in_place_first_in_a_sequential, "2.0"), (_relu_in_place_after_an_empty_sequential, "3"),
])  # fmt: skip
def test_the_module_receiving_the_stack_s_output_through_nesting_runs_out_of_place(make, name):
    """The stack's output is followed through the Sequential chaining: out of a Sequential, into one,
    through nn.Identity and an empty Sequential (which return their input). Before, only the next sibling
    was checked and these failed in backward with autograd's "modified by an inplace operation"."""
    torch.manual_seed(0)
    model = make()
    x = torch.randn(8, 5)
    want = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(model, anchor_every=1)
    assert [str(w.message).split(" receives")[0] for w in caught] == [f"convert: {name!r} (ReLU)"]
    assert model.get_submodule(name).inplace is False
    got = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class FunctionalReLUInPlace(nn.Module):
    def forward(self, x):
        return F.relu(x, inplace=True)


def test_an_in_place_call_inside_a_custom_module_is_autograd_s_error():
    """What convert does not see (documented): a custom module's own in-place call on the stack's output."""
    model = convert(nn.Sequential(nn.Linear(5, 6), Residual(6), Residual(6), FunctionalReLUInPlace(), nn.Linear(6, 2)))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(torch.randn(8, 5)).sum().backward()


@pytest.mark.parametrize("train", [True, False])
def test_torchvision_style_stage_keeps_the_downsampling_block(train):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _stage(8, 16, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.train(train)
    x = torch.randn(4, 3, 12, 12)
    want = model(x)
    converted = convert(model, step=0.25)
    stage = converted[1]
    assert isinstance(stage[0], BasicBlock) and stage[0].downsample is not None
    assert isinstance(stage[1], AdjointResidualStack) and stage[1].depth == 3 and stage[1].T == pytest.approx(0.75)
    torch.testing.assert_close(converted(x), want, rtol=1e-4, atol=1e-5)
    if train:  # memory-free training runs and fills every gradient
        converted(x).square().sum().backward()
        assert all(p.grad is not None for p in converted.parameters())
        assert stage[1].last_drift is not None


def test_model_without_residual_blocks_is_unchanged():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 3)))
    children = list(model.children())
    assert convert(model) is model and list(model.children()) == children


def test_torchvision_resnet18():
    models = pytest.importorskip("torchvision.models", reason="torchvision not installed; the hand-built "
                                 "BasicBlock stages above cover the same structure")  # fmt: skip
    torch.manual_seed(0)
    model = models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    want = model(x)
    converted = convert(model)
    assert len(_stacks(converted)) == 4  # layer1: 2 blocks; layer2–4: 1 block after the downsampling block
    torch.testing.assert_close(converted(x), want, rtol=1e-4, atol=1e-4)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        convert(lambda x: x)
    with pytest.raises(ValueError, match="only with method='euler'"):
        convert(nn.Sequential(Residual(3)), method="heun")
    with pytest.raises(ValueError, match="step must be > 0"):
        convert(nn.Sequential(Residual(3)), step=0.0)
    with pytest.raises(ValueError, match=r"vjp_at must be one of \['state', 'reconstruction', 'extrapolated'\]; got 'output'"):
        convert(nn.Sequential(Residual(3)), vjp_at="output")
    with pytest.raises(ValueError, match="vjp_at is only meaningful with backward='adjoint'"):
        convert(nn.Sequential(Residual(3)), backward="backprop", vjp_at="reconstruction")


def test_vjp_at_reaches_the_stacks():
    """convert(vjp_at="reconstruction") gives stacks that take their VJPs at the reconstruction: the
    gradients of a stack built directly with that option, bit for bit, and not the default's."""
    torch.manual_seed(0)
    model = nn.Sequential(*[Residual(3) for _ in range(4)]).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    grads = {}
    for vjp_at in ("state", "reconstruction"):
        converted = convert(copy.deepcopy(model), vjp_at=vjp_at)
        (stack,) = [m for m in converted.modules() if isinstance(m, AdjointResidualStack)]
        assert stack.vjp_at == vjp_at
        xi = x.clone().requires_grad_(True)
        grads[vjp_at] = torch.autograd.grad(converted(xi).square().sum(), [xi] + list(converted.parameters()))
        direct = AdjointResidualStack(list(stack.blocks), T=stack.T, vjp_at=vjp_at)
        xi = x.clone().requires_grad_(True)
        for a, b in zip(grads[vjp_at], torch.autograd.grad(direct(xi).square().sum(), [xi] + list(direct.parameters()))):
            assert torch.equal(a, b)
    assert not torch.equal(grads["state"][0], grads["reconstruction"][0])


class ModeDependent(Residual):
    """Residual in both modes, computing something else in each: dropout on the increment, and extra
    noise in training mode only."""

    def forward(self, x):
        g = F.dropout(self.net(x), p=0.3, training=self.training)
        if self.training:
            g = g + 0.1 * torch.randn_like(g)
        return x + g


def test_mode_switches_after_conversion_keep_the_original_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), ModeDependent(8), ModeDependent(8), Residual(8)).train()
    original = copy.deepcopy(model)
    x = torch.randn(16, 5)
    model = convert(model)
    assert isinstance(model[1], AdjointResidualStack)
    for training in (False, True, False, True, False):
        model.train(training), original.train(training)
        for seed in (1, 2):
            torch.manual_seed(seed)
            want = original(x)
            torch.manual_seed(seed)
            got = model(x)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        if not training:  # no dropout mask or noise left from the training-mode conversion
            torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


class SideEffects(Residual):
    """Counts its calls (in an attribute and in a buffer) and keeps its latest output, as
    instrumentation would."""

    def __init__(self, dim):
        super().__init__(dim)
        self.calls, self.last = 0, None
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        self.steps.add_(1)  # a buffer: tracing runs this on the real tensor
        self.last = x + self.net(x)
        return self.last


def _proxies(model):
    return [
        (name, attr) for name, module in model.named_modules() for attr, value in vars(module).items()
        if isinstance(value, torch.fx.Proxy)
    ]  # fmt: skip


@pytest.mark.parametrize("backward", ["backprop", "adjoint"])
def test_side_effects_of_a_block_run_on_every_call(backward):
    torch.manual_seed(0)
    block = SideEffects(6)
    model = nn.Sequential(block, Residual(6))
    x = torch.randn(4, 6)
    convert(model, backward=backward)
    assert block.calls == 0 and block.steps == 0 and block.last is None and not _proxies(model)  # untouched
    for calls in (1, 2, 3):
        with torch.no_grad():
            out = model(x)
        assert block.calls == calls and block.steps == calls
        torch.testing.assert_close(block.last, x + block.net(x))
    assert isinstance(model[0], AdjointResidualStack) and out.shape == x.shape


class DataDependent(Residual):
    def forward(self, x):
        return x + self.net(x) if x.sum() > 0 else x - self.net(x)


class ResidualInTrainingOnly(Residual):
    def forward(self, x):
        return x + self.net(x) if self.training else self.net(x)


@pytest.mark.parametrize(
    "block, reason",
    [(DataDependent, "torch.fx cannot trace its forward"), (ResidualInTrainingOnly, "x \\+ g\\(x\\) in training mode only")],
)
def test_unrecognisable_block_stays_with_a_warning(block, reason):
    torch.manual_seed(0)
    odd = block(4)
    model = nn.Sequential(Residual(4), odd, Residual(4)).train()
    x = torch.randn(3, 4)
    want = model(x)
    with pytest.warns(UserWarning, match=f"'1' \\({block.__name__}\\) left unconverted: .*{reason}") as caught:
        convert(model)
    assert caught[0].filename == __file__  # points at the caller's line
    assert model[1] is odd and [s.depth for s in _stacks(model)] == [1, 1]
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


def test_warnings_name_modules_as_in_the_converted_model():
    """Renumbering moves the children after a run, and converting an outer Sequential moves the inner ones:
    the warnings named them by their places before conversion ('4' for what is model[2] after it)."""
    torch.manual_seed(0)
    inner_odd, outer_odd = DataDependent(4), DataDependent(4)
    model = nn.Sequential(Residual(4), Residual(4), Residual(4), nn.Sequential(inner_odd, Residual(4)), outer_odd)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(model)
    named = [str(w.message).split(" left unconverted")[0] for w in caught]
    assert named == ["convert: '1.0' (DataDependent)", "convert: '2' (DataDependent)"]
    assert model.get_submodule("1.0") is inner_odd and model.get_submodule("2") is outer_odd


@pytest.mark.parametrize("training", [True, False])
def test_top_level_sequential_is_converted_in_place_keeping_modes(training):
    torch.manual_seed(0)
    inner = nn.Sequential(Residual(4), Residual(4))
    model = nn.Sequential(nn.Linear(4, 4), Residual(4), Residual(4), inner, nn.BatchNorm1d(4)).train(training)
    frozen = model[2].net[0].train(not training)  # a submodule in the other mode keeps it
    blocks = [model[1], model[2], inner[0], inner[1]]
    modes = {module: module.training for module in model.modules()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = convert(model)
    new = [m for m in converted.modules() if m not in modes]
    assert new and all(m.training == training for m in new)  # the inserted stacks and wrappers
    assert converted is model
    assert isinstance(model[1], AdjointResidualStack) and model[2] is inner and isinstance(inner[0], AdjointResidualStack)
    assert [s.blocks[k].increment.block for s in _stacks(model) for k in range(s.depth)] == blocks
    assert all(module.training == mode for module, mode in modes.items())  # every original module
    assert frozen.training != training
    structure = [(m, m.training) for m in model.modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(model)  # converting again changes nothing, quietly
    assert [(m, m.training) for m in model.modules()] == structure


def test_an_odemlp_is_left_as_it_is_quietly():
    """ODEMLP is memory-free already; before, a warning said torch.fx could not trace it."""
    model = nn.Sequential(nn.Linear(4, 4), ODEMLP(4, 8, 16), Residual(4), nn.Sequential(ODEMLP(4, 8, 2)))
    odemlp, inner = model[1], model[3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(model)
    assert model[1] is odemlp and isinstance(model[2], AdjointResidualStack) and list(model[3]) == list(inner)


def test_named_sequential_keeps_its_names():
    model = nn.Sequential(OrderedDict(embed=nn.Linear(3, 4), first=Residual(4), second=Residual(4), head=nn.Linear(4, 2)))
    convert(model)
    assert list(model._modules) == ["embed", "first", "head"] and model.first.depth == 2


class Backbone(nn.Sequential):
    """A Sequential subclass whose forward also returns the feature after its second child."""

    def forward(self, x):
        features = []
        for layer in self:
            x = layer(x)
            features.append(x)
        return x, features[1]


def test_sequential_subclass_with_its_own_forward_stays_with_a_warning():
    """Its forward may use the children other than by chaining them: here merging the residual children
    into one stack made the returned feature that of another layer (relative error 1.1)."""
    torch.manual_seed(0)
    model = nn.Sequential(Backbone(Residual(4), Residual(4), Residual(4), nn.Linear(4, 4)), Residual(4), Residual(4))
    x = torch.randn(5, 4)
    want = model[0](x)
    with pytest.warns(UserWarning, match=r"'0' \(Backbone\) left unconverted: an nn.Sequential subclass with its own forward"):
        convert(model)
    assert isinstance(model[0], Backbone) and len(model[0]) == 4 and isinstance(model[1], AdjointResidualStack)
    for a, b in zip(model[0](x), want):
        assert torch.equal(a, b)


def test_the_default_step_is_one_so_float16_increments_do_not_overflow():
    """h = 1 (T = L): f_n = g_n exactly, no division. With h = 1/L a float16 block whose increment exceeds
    65504 / L overflowed (here x → −x at |x| up to 1500, so |g| up to 3000 at L = 64: outputs inf or NaN
    where the original's are finite)."""
    torch.manual_seed(0)

    class Flip(nn.Module):
        def forward(self, x):
            return x + (-2.0) * x

    model = nn.Sequential(*[Flip() for _ in range(64)]).half()
    x = (torch.rand(8, 4) * 1500).half()
    with torch.no_grad():
        want = model(x)
        (stack,) = _stacks(convert(model))
        got = model(x)
    assert stack.T == 64 and stack.step_size == 1.0
    assert torch.isfinite(want).all() and torch.equal(got, want)


class InPlaceResidual(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        x += self.bias
        return x


@pytest.mark.parametrize("backward", ["backprop", "adjoint"])
def test_a_block_adding_into_its_input_in_place_is_an_error(backward):
    """torch.fx records `x += g` as x + g, so the block is recognised; but it overwrites the states the
    stack keeps and re-runs (adjoint mode: autograd's "leaf Variable ... in-place", naming nothing)."""
    model = convert(nn.Sequential(nn.Linear(3, 3), InPlaceResidual(3), InPlaceResidual(3)), backward=backward)
    with pytest.raises(RuntimeError, match="a converted InPlaceResidual returned its input, modified in place"):
        model(torch.randn(2, 3))
