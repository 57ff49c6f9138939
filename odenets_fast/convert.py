"""`convert`: switch an existing model's residual stages to memory-free AdjointResidualStacks.

Which blocks are residual (each must map a tensor to one of the same shape):

* a module whose forward is ``x + g(x)`` (or ``g(x) + x``, ``torch.add``): found by tracing it with
  torch.fx; g is the traced graph with the addition's other operand as output, sharing the
  block's submodules and parameters;
* a torchvision-style ``BasicBlock`` / ``Bottleneck`` (forward ``relu(x + g(x))``) without a
  ``downsample`` and with stride 1: its increment is ``block(x) − x``.

Rescaling, so that the converted model computes the same function at conversion time: a run of
L residual blocks with increments g_n becomes a stack with step h (default 1/L, or `step`) and
vector fields f_n = g_n / h, hence x + h f_n(x) = x + g_n(x) — the original block, up to float
rounding. Training the converted model then trains the same parameters under the ODE scaling,
whose reverse reconstruction is accurate when the increments are small (check `last_drift`).

A run is a maximal sequence of consecutive residual blocks inside an ``nn.Sequential``; other
modules (a downsampling block, say) stay as they are. The model is changed in place and returned.
"""

import operator
from typing import Optional

import torch
import torch.fx
from torch import Tensor, nn

from .spec import BACKWARD_MODES, check_anchor_every, check_choice, check_real
from .stack import AdjointResidualStack

_ADDS = (operator.add, torch.add)


class ScaledIncrement(nn.Module):
    """f(x) = g(x) / h: a block's increment g as the vector field of a stack with step h."""

    def __init__(self, increment: nn.Module, step: float):
        super().__init__()
        self.increment, self.step = increment, step

    def forward(self, x: Tensor) -> Tensor:
        return self.increment(x) / self.step


class BlockIncrement(nn.Module):
    """g(x) = block(x) − x, for blocks whose residual sum is followed by more work (relu)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x) - x


def _traced_branch(block: nn.Module) -> Optional[nn.Module]:
    """g such that block(x) = x + g(x), read off the block's fx graph; None if it is not of that form."""
    try:
        traced = torch.fx.symbolic_trace(block)
    except Exception:  # data-dependent control flow and other untraceable forwards: not recognised
        return None
    placeholders = [node for node in traced.graph.nodes if node.op == "placeholder"]
    (output,) = [node for node in traced.graph.nodes if node.op == "output"]
    result = output.args[0]
    if len(placeholders) != 1 or not isinstance(result, torch.fx.Node):
        return None
    if result.op != "call_function" or result.target not in _ADDS or len(result.args) != 2 or result.kwargs:
        return None
    x = placeholders[0]
    left, right = result.args
    if (left is x) == (right is x):
        return None
    output.args = (right if left is x else left,)
    traced.graph.eliminate_dead_code()
    traced.recompile()
    return traced


def _torchvision_style_block(block: nn.Module) -> bool:
    """BasicBlock / Bottleneck that keeps the shape: no downsample branch, stride 1."""
    if type(block).__name__ not in ("BasicBlock", "Bottleneck") or not hasattr(block, "downsample"):
        return False
    return block.downsample is None and getattr(block, "stride", 1) == 1


def residual_increment(block: nn.Module) -> Optional[nn.Module]:
    """The increment g of a residual block (block(x) = x + g(x) up to a final activation), or None."""
    if _torchvision_style_block(block):
        return BlockIncrement(block)
    return _traced_branch(block)


def convert(
    model: nn.Module,
    *,
    method: str = "euler",
    backward: str = "adjoint",
    step: Optional[float] = None,
    anchor_every: Optional[int] = None,
) -> nn.Module:
    """Replace every run of residual blocks in the `nn.Sequential`s of `model` by an
    `AdjointResidualStack` computing the same function (see the module docstring)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if check_choice("method", method, ("euler", "heun")) != "euler":
        raise ValueError(
            "convert keeps the model's function only with method='euler' (one block per step); a Heun stack "
            "evaluates each block twice per step and would change what the model computes"
        )
    check_choice("backward", backward, BACKWARD_MODES)
    check_anchor_every(anchor_every, backward)
    step = None if step is None else check_real("step", step, positive=True)

    def stack_of(increments: list) -> AdjointResidualStack:
        h = step if step is not None else 1.0 / len(increments)
        fields = [ScaledIncrement(increment, h) for increment in increments]
        return AdjointResidualStack(fields, T=h * len(fields), backward=backward, anchor_every=anchor_every)

    def convert_sequential(seq: nn.Sequential) -> nn.Sequential:
        increments = [residual_increment(child) for child in seq]
        if all(inc is None for inc in increments):
            return seq
        parts, run = [], []
        for child, increment in zip(seq, increments):
            if increment is not None:
                run.append(increment)
                continue
            if run:
                parts.append(stack_of(run))
                run = []
            parts.append(child)
        if run:
            parts.append(stack_of(run))
        return nn.Sequential(*parts)

    def visit(module: nn.Module) -> nn.Module:
        for name, child in module.named_children():
            setattr(module, name, visit(child))
        if isinstance(module, nn.Sequential) and not isinstance(module, AdjointResidualStack):
            return convert_sequential(module)
        return module

    return visit(model)
