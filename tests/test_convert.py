"""convert: existing residual stages become AdjointResidualStacks computing the same function."""

import pytest
import torch
from torch import nn

from odenets_fast import AdjointResidualStack, convert


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
