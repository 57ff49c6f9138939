"""`convert`: switch an existing model's residual stages to memory-free AdjointResidualStacks.

Which blocks are residual (each must map a tensor to one of the same shape):

* a module whose forward is ``x + g(x)`` (or ``g(x) + x``, ``torch.add``) in training mode and in
  eval mode, read off torch.fx traces of a copy of it in each mode;
* a torchvision-style ``BasicBlock`` / ``Bottleneck`` (forward ``relu(x + g(x))``) without a
  ``downsample`` and with stride 1.

The increment is computed by the block itself, g(x) = block(x) − x: the trace only recognises the
form and never replaces the forward, so the block's Python code runs on every call as in the
original. Mode branches (``if self.training:``, ``F.dropout(..., training=self.training)``) follow
the current mode through any number of ``train()``/``eval()`` switches, and side effects (a
counter, an attribute set in forward) happen on every call — in adjoint mode also when the backward
pass re-runs the block, as under ``torch.utils.checkpoint`` (the stack restores the blocks' buffers
afterwards, not their other attributes). The price is one subtraction per block call, and rounding:
with the default step the stack's x + (block(x) − x) is block(x) exactly wherever the subtraction is
(block(x) within a factor 2 of x), within an ε·|x| or two elsewhere (measured on MLP blocks, float32
and float64, L = 1 … 16: identical outputs).

Recognition traces deep copies, so the block is left exactly as it was (its attributes, buffers
and Python state; no fx Proxy assigned anywhere); effects of its forward outside the module
(globals, printing) do happen, once per mode, at conversion. A block torch.fx cannot trace
(data-dependent control flow) or that is ``x + g(x)`` in one mode only stays as it is, with a
warning naming it and saying why. torch.nn's own layers (fx's leaf modules) are not residual and
are not traced; a module that already contains an AdjointResidualStack or an ODEMLP (memory-free
already) is left as it is, quietly.

Rescaling, so that the converted model computes the same function: a run of L residual blocks
with increments g_n becomes a stack with step h (default 1, T = L, or `step`) and vector fields
f_n = g_n / h, hence x + h f_n(x) = x + g_n(x) — the original block, up to float rounding. h cancels
out of the reconstruction x_{n+1} − h f_n and of the gradients, so it changes rounding only: the
default divides by nothing (a float16 model with |g|/h beyond 65504 would overflow where the original
does not). The reverse reconstruction is accurate when the increments are small (check `last_drift`).

A Sequential subclass with a forward of its own is left as it is (with a warning where it holds
residual blocks): its forward may use the children other than by chaining them.

A run is a maximal sequence of consecutive residual blocks inside an ``nn.Sequential``; other
modules (a downsampling block, say) stay as they are. The model is changed in place and returned,
a top-level ``nn.Sequential`` included. Every module keeps its train/eval mode; the inserted
stacks take the mode of their Sequential, the wrappers around a block that block's mode. A
Sequential with the default names 0, 1, … is renumbered; other names are kept, a stack taking the
name of its run's first block. Warnings name modules as the converted model does.

In adjoint mode the backward reconstructs from the stack's output, so nothing may modify that output in
place. The module that receives it — read off the chaining of nn.Sequentials: the next module, out of a
Sequential's last child to the Sequential's next sibling, into a Sequential's first child, through
nn.Identity and empty Sequentials — is set to ``inplace=False`` if it has ``inplace=True``
(``nn.ReLU(inplace=True)``, dropout), with a warning. Anything else that writes into that output is not
seen — a custom module calling ``F.relu(x, inplace=True)``, a custom forward modifying the result of a
Sequential that ends with converted blocks — and makes the backward raise autograd's "modified by an
inplace operation".
"""

import copy
import itertools
import operator
import warnings
from typing import Optional

import torch
import torch.fx
from torch import Tensor, nn

from .nn import ODEMLP
from .spec import BACKWARD_MODES, check_anchor_every, check_choice, check_real, check_vjp_at, type_name
from .stack import AdjointResidualStack

_ADDS = (operator.add, torch.add)


class ScaledIncrement(nn.Module):
    """f(x) = g(x) / h: a block's increment g as the vector field of a stack with step h."""

    def __init__(self, increment: nn.Module, step: float):
        super().__init__()
        self.increment, self.step = increment, step
        self.training = increment.training

    def forward(self, x: Tensor) -> Tensor:
        g = self.increment(x)
        return g if self.step == 1.0 else g / self.step  # the default step: no pass, no rounding, no overflow


class BlockIncrement(nn.Module):
    """g(x) = block(x) − x, running the block's own forward on every call (its mode branches and
    side effects included)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.training = block.training

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        if out is x:  # `x += g(x); return x`: the stack's states (anchors, the reconstruction's) overwritten
            raise RuntimeError(
                f"convert: a converted {type(self.block).__name__} returned its input, modified in place (x += g(x)): "
                "the stack keeps and re-runs the states it passes to its blocks. Write the block out of place "
                "(return x + g(x)), or leave it unconverted."
            )
        return out - x


class NotRecognised(Exception):
    """A block that may be residual but cannot be converted faithfully; the message says why."""


def _is_x_plus_g(traced: torch.fx.GraphModule) -> bool:
    """Whether the traced forward takes one input x and returns x + (something other than x)."""
    placeholders = [node for node in traced.graph.nodes if node.op == "placeholder"]
    (output,) = [node for node in traced.graph.nodes if node.op == "output"]
    result = output.args[0]
    if len(placeholders) != 1 or not isinstance(result, torch.fx.Node):
        return False
    if result.op != "call_function" or result.target not in _ADDS or len(result.args) != 2 or result.kwargs:
        return False
    left, right = result.args
    return (left is placeholders[0]) != (right is placeholders[0])


def _error_line(error: Exception) -> str:
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _traced_residual(block: nn.Module) -> bool:
    """Whether block's forward is x + g(x) in both modes. Each mode traces its own deep copy: tracing
    runs the forward's Python code (it would increment the block's counters and buffers, leave fx
    Proxies in attributes it assigns, and the first trace's leftovers would steer the second)."""
    residual = {}
    for training in (True, False):
        mode = "training" if training else "eval"
        try:
            probe = copy.deepcopy(block).train(training)
        except Exception as error:
            raise NotRecognised(f"it cannot be deep-copied for tracing ({_error_line(error)})") from error
        try:
            residual[mode] = _is_x_plus_g(torch.fx.symbolic_trace(probe))
        except Exception as error:  # data-dependent control flow, mostly
            raise NotRecognised(
                f"torch.fx cannot trace its forward in {mode} mode ({_error_line(error)}), so whether it is "
                "x + g(x) cannot be read off"
            ) from error
    if residual["training"] != residual["eval"]:
        only, other = ("training", "eval") if residual["training"] else ("eval", "training")
        raise NotRecognised(f"its forward is x + g(x) in {only} mode only, not in {other} mode")
    return residual["training"]


def _torchvision_style_block(block: nn.Module) -> bool:
    """BasicBlock / Bottleneck that keeps the shape: no downsample branch, stride 1."""
    if type(block).__name__ not in ("BasicBlock", "Bottleneck") or not hasattr(block, "downsample"):
        return False
    return block.downsample is None and getattr(block, "stride", 1) == 1


def residual_increment(block: nn.Module) -> Optional[nn.Module]:
    """The increment g of a residual block (block(x) = x + g(x) up to a final activation), or None if
    it is not one; `NotRecognised` if it cannot tell, or the form depends on the mode."""
    memory_free = any(isinstance(module, (AdjointResidualStack, ODEMLP)) for module in block.modules())
    if memory_free or torch.fx.Tracer().is_leaf_module(block, ""):  # torch.nn's own layers
        return None
    if _torchvision_style_block(block) or _traced_residual(block):
        return BlockIncrement(block)
    return None


def _residual_or_unsure(block: nn.Module) -> bool:
    try:
        return residual_increment(block) is not None
    except NotRecognised:
        return True


def _chains(module: nn.Module) -> bool:
    """Whether module is an nn.Sequential whose forward is nn.Sequential's: each child's output is the
    next one's input."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _full_name(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _next_in_chain(modules: dict, path: str) -> Optional[str]:
    """The path of the module that the nn.Sequential chaining passes the output of the module at `path`
    to: its next sibling, or past a Sequential's last child the Sequential's own next sibling. None where
    the output leaves the model or a module whose forward is not nn.Sequential's."""
    while path:
        parent_path, _, name = path.rpartition(".")
        parent = modules[parent_path]
        if not _chains(parent):
            return None
        names = list(parent._modules)
        position = names.index(name)
        if position + 1 < len(names):
            return _full_name(parent_path, names[position + 1])
        path = parent_path
    return None


def _receiver(model: nn.Module, path: str) -> Optional[nn.Module]:
    """The first module that computes with the output of `model`'s submodule at `path`:
    the next module in the nn.Sequential chaining (_next_in_chain), entering Sequentials at their first
    child and passing through nn.Identity and empty Sequentials, which return their input. None where the
    output leaves the model, or a Sequential subclass or other module with a forward of its own (what
    that forward does with it is not known)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    path = _next_in_chain(modules, path)
    while path is not None:
        module = modules[path]
        if _chains(module) and len(module) > 0:
            path = _full_name(path, next(iter(module._modules)))
        elif isinstance(module, nn.Identity) or _chains(module):
            path = _next_in_chain(modules, path)
        else:
            return module
    return None


def convert(
    model: nn.Module,
    *,
    method: str = "euler",
    backward: str = "adjoint",
    step: Optional[float] = None,
    anchor_every: Optional[int] = None,
    vjp_at: str = "state",
) -> nn.Module:
    """Replace every run of residual blocks in the `nn.Sequential`s of `model` (`model` itself
    included) by an `AdjointResidualStack` computing the same function, in place; blocks that cannot
    be converted faithfully stay, with a warning (see the module docstring). `backward`,
    `anchor_every` and `vjp_at` are the stacks' (AdjointResidualStack)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type_name(model)}")
    if check_choice("method", method, ("euler", "heun")) != "euler":
        raise ValueError(
            "convert keeps the model's function only with method='euler' (one block per step); a Heun stack "
            "evaluates each block twice per step and would change what the model computes"
        )
    check_choice("backward", backward, BACKWARD_MODES)
    check_anchor_every(anchor_every, backward)
    check_vjp_at(vjp_at, backward)
    step = None if step is None else check_real("step", step, positive=True)
    # (module, what to say of it): warned about at the end, naming each module as the converted model does
    # (renumbering moves children, and converting an outer Sequential moves the inner ones)
    notes = []
    inserted = []  # the stacks this call builds

    def stack_of(increments: list, training: bool) -> AdjointResidualStack:
        h = 1.0 if step is None else step
        fields = [ScaledIncrement(increment, h) for increment in increments]
        stack = AdjointResidualStack(fields, T=h * len(fields), backward=backward, anchor_every=anchor_every,
                                     vjp_at=vjp_at)  # fmt: skip
        # Only the new containers: .train() would also reset the blocks' own modes.
        stack.training = stack.blocks.training = training
        inserted.append(stack)
        return stack

    def replace_runs(seq: nn.Sequential, increments: dict) -> None:
        """Each run of children with an increment becomes one stack, named after its first block."""
        parts = []  # (name, module)
        runs = itertools.groupby(seq._modules.items(), key=lambda item: increments[item[0]] is not None)
        for residual, group in runs:
            group = list(group)
            if residual:
                parts.append((group[0][0], stack_of([increments[name] for name, _ in group], seq.training)))
            else:
                parts.extend(group)
        numbered = list(seq._modules) == [str(i) for i in range(len(seq._modules))]
        seq._modules.clear()
        for position, (name, part) in enumerate(parts):
            seq.add_module(str(position) if numbered else name, part)

    # Innermost first (reversed pre-order), so a Sequential's converted children are seen as such.
    for module in reversed(list(model.modules())):
        if not isinstance(module, nn.Sequential):
            continue
        if not _chains(module):
            # its forward may do more than chain its children (return an intermediate one, index them)
            if any(_residual_or_unsure(child) for child in module._modules.values()):
                notes.append((module, "left unconverted: an nn.Sequential subclass with its own forward, which may "
                                      "use its children other than by chaining them"))  # fmt: skip
            continue
        increments = {}
        for name, child in module._modules.items():
            try:
                increments[name] = residual_increment(child)
            except NotRecognised as why:
                notes.append((child, f"left unconverted: {why}"))
                increments[name] = None
        if any(increment is not None for increment in increments.values()):
            replace_runs(module, increments)
    final_names = {id(module): name for name, module in model.named_modules()}
    if backward == "adjoint":
        # The adjoint backward starts its reconstruction from the stack's output: a module that overwrote
        # it in place would make the backward autograd's "modified by an inplace operation" error.
        for stack in inserted:
            receiver = _receiver(model, final_names[id(stack)])
            if getattr(receiver, "inplace", False):
                receiver.inplace = False
                notes.append((receiver, "receives the output of converted blocks and now runs with inplace=False: "
                                        "the adjoint backward reads that output"))  # fmt: skip
    for module, note in notes:
        warnings.warn(f"convert: {final_names[id(module)] or 'the model'!r} ({type(module).__name__}) {note}",
                      stacklevel=2)  # fmt: skip
    return model
