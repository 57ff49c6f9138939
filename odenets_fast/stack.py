"""Memory-free residual stacks of arbitrary blocks: x_{n+1} = x_n + h f_n(x_n) with any nn.Module f_n.

The same backward modes as `ode_mlp` (DESIGN.md §5), for blocks that are not MLPs — e.g. the
pre-activation convolution blocks of "Do Residual Neural Networks discretize Neural Ordinary
Differential Equations?". The per-layer VJP is taken by autograd on a recompute of one layer at a
time, so the memory held by the backward pass is one layer's graph, whatever the depth.

Training-mode state (BatchNorm): the forward pass updates running statistics once per layer, as a
plain loop would. Reconstruction and recompute run the blocks again in the same mode, so
BatchNorm normalises with the *batch statistics of the state it is given* (the reconstructed x̃_n
in adjoint mode, the stored x_n at anchors and in backprop mode — identical to the forward's
there), and the running statistics are updated exactly once per forward: the re-runs leave the
blocks' buffers as the forward left them (`_buffers_kept`). Other buffers that a block call writes and
may read (a spectral norm's power-iteration vectors, a hand-kept running mean, a counter): each re-run
starts from the values its forward call started from (`_BufferRecorder`), so it computes what the call
computed — one copy of a block's buffers per forward call, for the blocks that have such buffers.

Randomness (dropout): with `preserve_rng_state=True` (default) the RNG state before each block call
of the forward that draws random numbers is kept (5 KB for the CPU generator, 16 B for a CUDA one;
nothing for calls that draw none) and restored when that call is re-run, so reconstruction and
recompute use the forward's random numbers — as `torch.utils.checkpoint` does, per call rather than
per segment, because Heun's reconstruction calls f_{n+1} before f_n. Like checkpoint's, only PyTorch's
default generators are replayed: a block drawing from a `torch.Generator` of its own is not. After a forward whose blocks drew
nothing, the next reads the RNG state only around its loop; if they drew after all, it runs the loop
again from the same state and buffer values, reading it at every call (`_RngRecorder`).

Tensors the blocks read besides x and their own parameters (a conditioning embedding, another
module's weight): the adjoint backward differentiates each layer with respect to x, that layer's
parameters and the tensors passed as `extra_inputs`; anything else that requires grad would get no
gradient, so each re-run's graph is walked and such a tensor is an error, not a silent zero (where x,
the parameters and `extra_inputs` are all frozen no backward would run: the forward loop itself is run
under autograd then, and finds it).

Autocast: the blocks are re-run under the autocast state of the forward (the backward pass usually
runs outside the caller's `torch.autocast` region; where the state at backward already is the
forward's, nothing is entered). The state x itself is never cast: x_n + h f_n(x_n) keeps the dtype
of x (float32 for a float32 input) while the blocks compute in the autocast dtype.

Where the VJP is taken (`vjp_at`, DESIGN.md §4). "state" (default): the reconstruction runs the
step backwards without autograd, then the step is recomputed under autograd at x̃_n and
differentiated — per layer 2 block evaluations and 1 backward through them (Heun: 4 and 2).
"reconstruction": the reconstruction's own block evaluations run under autograd and give the VJP,
the Jacobians taken where the reconstruction evaluates instead of at the forward's points — per
layer 1 evaluation and 1 backward (Heun: 2 and 2). Euler evaluates f_n at x̃_{n+1}, O(h) from
x_n; Heun evaluates f_{n+1} at x̃_{n+1} and f_n at ỹ_n, each O(h²) from the forward's y_n and
x_n (x_{n+1} − y_n = (h/2)(k2 − k1), and k2 − k1 = O(h) when f varies smoothly with depth). With
g = ∂ℓ/∂x_{n+1}, z = x̃_{n+1}, ỹ = z − h f_{n+1}(z):

    Euler:  g_n = g + h ∂x f_n(z)ᵀ g,                dθ_n += h ∂θ f_n(z)ᵀ g
    Heun:   gy  = (h/2) ∂x f_{n+1}(z)ᵀ g,            dθ_{n+1} += (h/2) ∂θ f_{n+1}(z)ᵀ g
            u1  = (h/2) g + h gy
            g_n = g + gy + ∂x f_n(ỹ)ᵀ u1,            dθ_n += ∂θ f_n(ỹ)ᵀ u1

— the forward step's chain rule (DESIGN.md §4) with y_n → z and x_n → ỹ.

"extrapolated" (Euler): as "reconstruction", one evaluation and one backward per layer, but f_n is
evaluated — and the reconstruction x̃_n = x̃_{n+1} − h f_n(z_n) and the VJP taken — at
z_n = x̃_{n+1} − c h k_{n+1}, k_{n+1} the block output of the layer above, c = clamp(⟨k_{n+1}, k_{n+2}⟩ /
‖k_{n+2}‖², 0, 1): the output of f_n predicted from the last two. Where f varies smoothly with depth,
c → 1 and z_n is O(h²) from x_n (x_{n+1} − x_n − h k_{n+1} = h (f_n(x_n) − f_{n+1}(x̃_{n+2})) = O(h²)):
reconstruction and Jacobians are second order, the gradient error falls as 1/L² and drops below the
default's; where consecutive blocks are unrelated their outputs are nearly orthogonal, c ≈ 0 and it is
"reconstruction". Costs two dot products per layer and holds two block outputs. The top layer of each
segment (fewer than two outputs known) evaluates at x̃_{n+1}.

At a stored state (an anchor, a segment's first layer) the VJP is taken at that exact state in every
mode.
"""

import contextlib
import dataclasses
import warnings
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from . import segments
from .interface import relative_drift
from .spec import (
    AUTO,
    BACKWARD_MODES,
    METHODS,
    check_anchor_every,
    check_bool,
    check_choice,
    check_error_control,
    check_not_torchscript,
    check_real,
    check_vjp_at,
    torchscript_unsupported,
    type_name,
)


class _RngRecorder:
    """Records, in the forward, the RNG state each block call started from — only for the calls that
    drew random numbers: a stack whose blocks draw nothing keeps nothing.

    A call is keyed by (layer n, stage): stage 0 is f_n's call in step n, stage 1 Heun's f_{n+1}
    call in step n. Per call rather than per step, because Heun's reconstruction calls f_{n+1}
    before f_n, the reverse of the forward's order: each must start from its own state. The states
    (CPU generator, and the current CUDA device's for CUDA tensors) end up among the stack's saved
    tensors, so saved-tensor hooks see them and `diagnostics.saved_tensor_bytes` counts them.

    Reading the state costs (5 KB for the CPU generator: about 2 % of a small convolution stack's
    training step when read at every call), so a forward whose previous one drew nothing reads it only
    before and after the loop (`drew_since_start`); see `_AdjointStackFunction.forward` for what it
    does when the blocks did draw.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.slots: dict[tuple, tuple] = {}  # call key → (CPU state index or None, CUDA state index or None)
        self.tensors: list[Tensor] = []
        # The state the next call starts from: the one the previous call ended with, as nothing between two
        # block calls of the forward draws — one state read per call. Compared as bytes (torch.equal's
        # dispatch costs more than reading the 5 KB state).
        self.start = self._last = self._current()

    def _current(self) -> tuple:
        states = (torch.get_rng_state(), torch.cuda.get_rng_state() if self.cuda else None)
        return tuple(None if s is None else (s, s.numpy().tobytes()) for s in states)

    def _keep(self, before: Optional[tuple], after: Optional[tuple]) -> Optional[int]:
        if before is None or before[1] == after[1]:
            return None
        self.tensors.append(before[0])
        return len(self.tensors) - 1

    def __call__(self, key: tuple, block: nn.Module, x: Tensor) -> Tensor:
        before = self._last
        out = block(x)
        self._last = self._current()
        slot = tuple(self._keep(b, a) for b, a in zip(before, self._last))
        if slot != (None, None):
            self.slots[key] = slot
        return out

    def drew_since_start(self) -> bool:
        return any(s is not None and s[1] != now[1] for s, now in zip(self.start, self._current()))

    def rewind(self) -> None:
        """Back to the state the recorder started from (the blocks then draw again what they drew since)."""
        cpu, cuda = self._last = self.start
        torch.set_rng_state(cpu[0])
        if cuda is not None:
            torch.cuda.set_rng_state(cuda[0])


class _RngReplay:
    """Gives each recorded block call, when it is re-run, the RNG state it started from in the forward."""

    def __init__(self, slots: dict, tensors: Sequence[Tensor]):
        self.slots, self.tensors = slots, tensors

    def __call__(self, key: tuple, block: nn.Module, x: Tensor) -> Tensor:
        slot = self.slots.get(key)
        if slot is None:
            return block(x)
        cpu, cuda = slot
        devices = [torch.cuda.current_device()] if cuda is not None else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            if cpu is not None:
                torch.set_rng_state(self.tensors[cpu])
            if cuda is not None:
                torch.cuda.set_rng_state(self.tensors[cuda])
            return block(x)


# An _RngRecorder, _RngReplay, _BufferRecorder or _BufferReplay: runs block(x) for the block call `key` (plain
# functions, not context managers: a generator-based context costs microseconds per block call)
RngRunner = Callable[[tuple, nn.Module, Tensor], Tensor]


# The forwards that, with track_running_stats off, leave the running statistics alone (`_buffers_kept`); a
# subclass with a forward of its own (batch renormalisation, which reads and updates them in training) is not
# assumed to, and its buffers are recorded and restored like any other module's.
_STATS_UNTOUCHED_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def _is_plain_batch_norm(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm) and type(m).forward in _STATS_UNTOUCHED_FORWARDS


def _buffers_by_block(blocks: nn.Module) -> dict:
    """{id(block): [(module, name)]}: each block's buffers other than BatchNorm's (whose re-runs write nothing,
    see `_buffers_kept`), for the blocks that have any."""
    found = {}
    for block in blocks:
        named = [(m, name) for m in _submodules(block) if m._buffers and not _is_plain_batch_norm(m)
                 for name, buf in m._buffers.items() if buf is not None]  # fmt: skip
        if named:
            found[id(block)] = named
    return found


class _BufferRecorder:
    """Records, in the forward, for each block call that wrote its block's buffers (a spectral norm's
    power-iteration vectors, a running mean kept by hand, a step counter), their values before the call —
    in place or by assigning a new tensor — so that each re-run starts from them and computes what the
    call computed. Blocks without such buffers cost nothing; the others one copy of their buffers a call.
    Wraps the RNG recorder, if any (`inner`)."""

    def __init__(self, buffers: dict, inner: Optional[RngRunner]):
        self.buffers, self.inner = buffers, inner
        # call key → [(module, name, index of its value before the call)]; the values end up among the stack's
        # saved tensors, as the RNG states do (saved-tensor hooks see them, saved_tensor_bytes counts them)
        self.slots: dict[tuple, list] = {}
        self.tensors: list[Tensor] = []

    def __call__(self, key: tuple, block: nn.Module, x: Tensor) -> Tensor:
        named = self.buffers.get(id(block))
        if named is None:
            return block(x) if self.inner is None else self.inner(key, block, x)
        before = [(m, name, buf, buf._version, buf.clone()) for m, name in named for buf in (m._buffers[name],)]
        out = block(x) if self.inner is None else self.inner(key, block, x)
        written = [(m, name, value) for m, name, buf, version, value in before
                   if m._buffers.get(name) is not buf or buf._version != version]  # fmt: skip
        if written:
            self.slots[key] = [(m, name, len(self.tensors) + i) for i, (m, name, _) in enumerate(written)]
            self.tensors.extend(value for _, _, value in written)
        return out

    def rewind(self) -> None:
        """The written buffers back to their values before the forward (each one's first recorded call)."""
        first = {}
        for written in self.slots.values():
            for m, name, index in written:
                first.setdefault((id(m), name), (m, name, index))
        _restore(first.values(), self.tensors)
        self.slots, self.tensors = {}, []


def _restore(written, values: Sequence[Tensor]) -> None:
    """Buffers (module, name, index) set to values[index]: in place where the buffer keeps its shape and dtype."""
    with torch.no_grad():
        for m, name, index in written:
            value = values[index]
            current = m._buffers.get(name)
            if current is not None and current.shape == value.shape and current.dtype == value.dtype:
                current.copy_(value)
            else:
                m._buffers[name] = value.clone()


class _BufferReplay:
    """Gives each recorded block call, when it is re-run, the buffer values it started from in the forward
    (the backward's `_buffers_kept` puts the forward's final values back afterwards)."""

    def __init__(self, slots: dict, tensors: Sequence[Tensor], inner: Optional[RngRunner]):
        self.slots, self.tensors, self.inner = slots, tensors, inner

    def __call__(self, key: tuple, block: nn.Module, x: Tensor) -> Tensor:
        written = self.slots.get(key)
        if written is not None:
            _restore(written, self.tensors)
        return block(x) if self.inner is None else self.inner(key, block, x)


class _AutocastState:
    """The autocast setting of the forward for one device type, to re-enter during backward."""

    def __init__(self, device: torch.device):
        self.device_type = device.type
        self.enabled = torch.is_autocast_enabled(self.device_type)
        self.dtype = torch.get_autocast_dtype(self.device_type)

    def replay(self) -> Callable[[], contextlib.AbstractContextManager]:
        """A context factory for the re-runs: nothing to enter where the current state is the forward's
        (entering and leaving torch.autocast costs microseconds per block call)."""
        enabled = torch.is_autocast_enabled(self.device_type)
        if enabled == self.enabled and (not enabled or torch.get_autocast_dtype(self.device_type) == self.dtype):
            return contextlib.nullcontext
        return lambda: torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


def _submodules(root: nn.Module) -> list:
    """root and every module below it, once each, as root.modules() gives them but without the qualified
    names modules() builds on the way (a third of the time for a 32-block convolution stack)."""
    found, seen = [root], {id(root)}
    for module in found:  # grows while iterated: breadth first
        for child in module._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                found.append(child)
    return found


@contextlib.contextmanager
def _buffers_kept(blocks: nn.Module):
    """Re-run blocks without leaving a trace in their buffers (running statistics, counters).

    BatchNorm in training mode normalises with the batch statistics and only writes the running ones:
    re-run with track_running_stats off, it computes the same output and gradients and writes nothing
    (in torch's source F.batch_norm picks the same kernel with or without running buffers — native,
    cuDNN or MIOpen — computes the batch statistics the same way and, in training mode, reads the
    running buffers only to update them; a test checks it bit for bit on the CPU). In eval mode, or
    without running statistics, it writes nothing anyway. Other modules' buffers are saved, and
    restored if a re-run wrote to them: in place (their version moved) or by assigning a new tensor to the
    attribute (`self.count = self.count + 1`), where the original tensor goes back in its place. A tensor
    registered in several modules (one table shared by every block) is copied once."""
    modules = _submodules(blocks)
    tracking = [m for m in modules if _is_plain_batch_norm(m) and m.training and m.track_running_stats]
    # m._buffers rather than m.buffers(recurse=False): a generator per module costs more than the rest
    registered = [(m, name, buf) for m in modules if not _is_plain_batch_norm(m)
                  for name, buf in m._buffers.items() if buf is not None]  # fmt: skip
    unique = {id(buf): buf for _, _, buf in registered}
    copies = [(buf, buf._version, buf.detach().clone()) for buf in unique.values()]
    # object.__setattr__: nn.Module.__setattr__ searches its parameter, buffer and module dicts first
    # (about 1.4 µs a module; 40 µs a backward for a 32-BatchNorm stack)
    for m in tracking:
        object.__setattr__(m, "track_running_stats", False)
    try:
        yield
    finally:
        for m in tracking:
            object.__setattr__(m, "track_running_stats", True)
        with torch.no_grad():
            for module, name, buf in registered:
                if module._buffers.get(name) is not buf:
                    module._buffers[name] = buf
            for buf, version, value in copies:
                if buf._version != version:
                    buf.copy_(value)


@contextlib.contextmanager
def _parametrizations_uncached():
    """Parametrized weights computed afresh inside `torch.nn.utils.parametrize.cached()` too. The forward loop
    runs without grad: the weight it would cache has no autograd history, so other readers of the cache in
    the same region (the backward's re-runs, a tied use outside the stack) would differentiate a constant and
    give the parametrization's `original` no gradient. The re-runs compute the weight under autograd."""
    enabled = parametrize._cache_enabled
    parametrize._cache_enabled = 0
    try:
        yield
    finally:
        parametrize._cache_enabled = enabled


_ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad


def _unlisted_leaves(out: Tensor, listed: list) -> list:
    """Leaves requiring grad that `out` depends on, other than `listed`: a walk of autograd's graph
    from `out` that stops at the listed tensors (their AccumulateGrad, or for a non-leaf the edge into
    its grad_fn: the output of that node it is — a node of unbind/chunk/split has several, and the
    others are other tensors). Leaves, because a non-leaf reached is built from some leaf the walk
    then finds."""
    listed_leaves = {id(t) for t in listed if t.grad_fn is None}
    stops = {(t.grad_fn, t.output_nr) for t in listed if t.grad_fn is not None}
    seen, pending, found = set(), [(out.grad_fn, out.output_nr)], []
    while pending:
        edge = pending.pop()
        node = edge[0]
        if node is None or node in seen or edge in stops:
            continue
        seen.add(node)
        if type(node) is _ACCUMULATE_GRAD:  # not hasattr(node, "variable"): it raises and catches at every other node
            if id(node.variable) not in listed_leaves:
                found.append(node.variable)
            continue
        pending.extend(node.next_functions)
    return found


def _unlisted_message(layer: int, leaf: Tensor) -> str:
    return (f"layer {layer} of an adjoint-mode AdjointResidualStack reads a tensor that requires grad (a leaf "
            f"of shape {tuple(leaf.shape)}) other than x, the layer's own parameters and extra_inputs: the "
            "adjoint backward would give it no gradient. Pass the tensor the blocks read as "
            "stack(x, extra_inputs=[...]), or use backward='backprop'.")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The settings one call of a stack ran with, which its adjoint backward reconstructs and differentiates
    with: the stack's attributes may be reassigned between a call and its backward (T changed to integrate
    the same blocks to a second horizon in the same graph), and each call's backward must be its own."""

    method: str
    h: float  # T / L
    anchored: bool  # anchor_every set: the stored states replace the reconstruction at their layers
    vjp_at: str
    strict: bool
    drift_tol: Optional[float]


# Eager under torch.compile too: the backward re-runs the blocks eagerly, so the forward must compute what those
# re-runs reproduce. Compiled, a block drawing random numbers (dropout) draws them through inductor's own RNG, which
# the recorded generator states do not replay: the reconstruction then saw other masks than the forward (drift
# 0.035 against 0.0005 eager on a dropout-0.2 MLP stack, and gradients to match).
@torch.compiler.disable
def _forward_states(stack, x: Tensor, positions: list, settings: _Settings, runner: Optional[RngRunner]) -> tuple:
    """(x_L, [x_a for a in positions]): the forward loop, keeping the anchors' input states."""
    stored, anchors = set(positions), []
    with _parametrizations_uncached():
        for n in range(stack.depth):
            if n in stored:
                anchors.append(x)
            x = stack.step(x, n, settings, runner)
    return x, anchors


class _AdjointStackFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        stack: "AdjointResidualStack",
        settings: _Settings,
        parameters_read: list,
        block_params: tuple,
        num_params: int,
        listed_params: tuple,
        *inputs: Tensor,
    ) -> Tensor:
        """`inputs`: the blocks' `num_params` parameters that require grad, then the caller's extra
        inputs that are not among them; `parameters_read`: per block, all its parameters (the backward
        checks the blocks still hold them); `block_params`: per block, those that require grad;
        `listed_params`: the positions of those parameters that the caller listed as extra inputs too
        (read by other layers than their own)."""
        positions = stack.anchor_layout()
        rng = _RngRecorder(x.device) if stack.preserve_rng_state else None
        per_call = rng is not None and stack._blocks_drew
        buffers = _buffers_by_block(stack.blocks)

        def recorder(inner: Optional[RngRunner]) -> Optional[RngRunner]:  # buffer values around the RNG's, if any
            return _BufferRecorder(buffers, inner) if buffers else inner

        runner = recorder(rng if per_call else None)
        with torch.no_grad():
            state, anchors = _forward_states(stack, x.detach(), positions, settings, runner)
            if rng is not None and not per_call and rng.drew_since_start():
                # The blocks drew random numbers, unlike in the previous call: the forward again from the
                # same RNG state and buffer values, recording each call's (the same draws, so the same
                # result; BatchNorm's running statistics left as the first pass updated them).
                rng.rewind()
                with _buffers_kept(stack.blocks):  # the first pass's values, which the second recomputes
                    if buffers:
                        runner.rewind()
                    runner = recorder(rng)
                    state, anchors = _forward_states(stack, x.detach(), positions, settings, runner)
        if rng is not None:
            stack._blocks_drew = bool(rng.slots)
        rng_states = [] if rng is None else rng.tensors
        ctx.stack, ctx.autocast, ctx.positions, ctx.settings = stack, _AutocastState(x.device), positions, settings
        ctx.rng_slots = None if rng is None else rng.slots
        buffer_values = runner.tensors if buffers else []
        ctx.buffer_slots = runner.slots if buffers and runner.slots else None
        ctx.block_params, ctx.num_params, ctx.listed_params = block_params, num_params, listed_params
        ctx.num_anchors, ctx.num_rng_states, ctx.num_buffer_values = len(anchors), len(rng_states), len(buffer_values)
        # The re-runs read these very tensors (the blocks' parameters, what the blocks close over), so their
        # gradients are keyed by them: a saved-tensor hook (save_on_cpu) unpacks copies. They are saved too,
        # so that an in-place change before backward is autograd's error, not a gradient at other values.
        ctx.inputs, ctx.parameters_read = inputs, parameters_read
        # "auto": the layout saved as a tensor beside the anchors, so that a torch.utils.checkpoint recompute,
        # which reads the layout again (another call's backward may have moved it), saves its own with them
        ctx.auto = stack.anchor_every == AUTO
        layout = [torch.tensor(positions)] if ctx.auto else []
        ctx.save_for_backward(state, *anchors, *rng_states, *buffer_values, *layout, *inputs)
        return state

    @staticmethod
    @torch.compiler.disable  # eager, as the forward loop: a train step compiled whole must not trace the re-runs
    def backward(ctx, grad_out: Tensor):
        """Segment by segment from the top (a segment: from a stored state to the next; plain adjoint
        has one, whose stored x_0 only measures the drift): per layer the state — reconstructed, or
        stored at the segment's first layer — and the layer's VJP by autograd: on a recompute at that
        state, or (vjp_at="reconstruction", where no state is stored) on the reconstruction's own block
        evaluations. With anchor_every="auto", each segment's drift, strict's exact redo of those above
        drift_tol, and the controller's layout for the next call (odenets_fast.segments)."""
        if torch.is_grad_enabled():
            raise RuntimeError(
                "double backward (create_graph=True) through an adjoint-mode stack is not supported: its backward "
                "reconstructs states instead of recording them. Use backward='backprop' for higher-order gradients."
            )
        stack, settings, autocast = ctx.stack, ctx.settings, ctx.autocast.replay()
        _check_parameters_unchanged(stack, ctx.parameters_read)
        auto = ctx.auto
        final, *saved = segments.saved_tensors(ctx) if auto else ctx.saved_tensors
        anchors, saved = saved[: ctx.num_anchors], saved[ctx.num_anchors :]
        rng_states, saved = saved[: ctx.num_rng_states], saved[ctx.num_rng_states :]
        buffer_values, saved = saved[: ctx.num_buffer_values], saved[ctx.num_buffer_values :]
        positions, inputs = saved[0].tolist() if auto else ctx.positions, ctx.inputs
        replay = _RngReplay(ctx.rng_slots, rng_states) if ctx.rng_slots else None
        if ctx.buffer_slots:
            replay = _BufferReplay(ctx.buffer_slots, buffer_values, replay)
        extras = [inputs[i] for i in ctx.listed_params] + [t for t in inputs[ctx.num_params :] if t.requires_grad]
        vjp = _LayerVJP(stack, settings, autocast, replay, extras, ctx.block_params, ctx.parameters_read)
        at_reconstruction = settings.vjp_at != "state"
        totals = dict.fromkeys(inputs)
        drifts = {}
        x_next, g = final, grad_out
        with _buffers_kept(stack.blocks), _parametrizations_uncached():
            for j, (a, end) in reversed(list(enumerate(segments.bounds(positions, stack.depth)))):
                g_top, layer_grads = g, {}
                for n in reversed(range(a, end)):
                    use_anchor = settings.anchored and n == a  # the stored state replaces the reconstruction
                    if at_reconstruction and not use_anchor:
                        x, g = vjp.at_reconstruction(x_next, g, n, layer_grads)
                        if n == a:
                            drifts[a] = relative_drift(x, anchors[j])
                        x_next = x
                        continue
                    if not use_anchor or auto or n == 0:  # the drift is measured at the segment's anchor
                        with torch.no_grad(), autocast():
                            reconstructed = stack.reverse_step(x_next, n, settings, replay)
                        if n == a:
                            drifts[a] = relative_drift(reconstructed.detach(), anchors[j])
                    x = anchors[j] if use_anchor else reconstructed
                    g = vjp(x, g, n, n + 1, layer_grads)
                    x_next = x
                # NaN too; a segment of one layer is exact already
                if auto and settings.strict and end - a > 1 and not float(drifts[a]) <= settings.drift_tol:
                    layer_grads = {}
                    g = vjp(anchors[j], g_top, a, end, layer_grads)  # the segment exactly, from its anchor
                for t, d in layer_grads.items():
                    totals[t] = d if totals[t] is None else totals[t] + d
        stack._drift = drifts[0]
        if auto:
            stack.record_segments(positions, drifts, settings.drift_tol, final.numel() > 0)
        return (g, None, None, None, None, None, None) + tuple(totals[t] for t in inputs)


def _warn_of_forward_hooks(blocks: nn.Module) -> None:
    """Forward hooks on the blocks see what the adjoint's forward loop computes without grad (no autograd
    history) and fire again in the backward's re-runs, on reconstructed states: a loss on an output they
    capture would silently get no gradient through the stack."""
    if any(m._forward_hooks or m._forward_pre_hooks for m in _submodules(blocks)):
        warnings.warn(
            "forward hooks on the blocks of an adjoint-mode AdjointResidualStack see block inputs and outputs "
            "without autograd history (the forward loop runs under no_grad) and run again during the backward, "
            "on reconstructed states: a loss on what they capture gets no gradient through the stack. Use "
            "backward='backprop' for such hooks.",
            stacklevel=3,
        )


def _exporting() -> bool:
    """Under torch.export's (default, non-strict) tracing. torch 2.11's dynamo folds is_exporting() to True
    inside torch.compile as well, where the adjoint's Function must run: hence the second test.
    (Strict export traces with dynamo: there the Function runs, as under torch.compile.)"""
    return torch.compiler.is_exporting() and not torch.compiler.is_dynamo_compiling()


def _check_parameters_unchanged(stack: "AdjointResidualStack", parameters_read: list) -> None:
    """The backward re-runs the blocks as they are now: with other parameter tensors than the forward read
    (torch.func.functional_call puts the module's own back before backward; a parameter reassigned) it
    would differentiate other weights and give the forward's none — an error instead."""
    for n, (block, read) in enumerate(zip(stack.blocks, parameters_read)):
        now = tuple(block.parameters())
        if len(now) != len(read) or any(p is not q for p, q in zip(now, read)):
            raise RuntimeError(
                f"block {n} of an adjoint-mode AdjointResidualStack holds other parameter tensors at backward than "
                "its forward read (torch.func.functional_call restores the module's own before backward runs; or a "
                "parameter was reassigned): the backward re-runs the blocks, so it would differentiate other "
                "weights. Use backward='backprop' with functional_call, or keep the parameters until backward.")


def _add_scaled(x: Tensor, direction: Tensor, scale: float) -> Tensor:
    """x + scale · direction in one pass over memory (torch.add's alpha) where `x + scale * direction` makes
    two, in x's dtype (the state is never cast to an autocast dtype). Every step, reconstruction and
    recompute of the stack goes through it, so the adjoint's arithmetic is the same as backprop's."""
    return torch.add(x, direction, alpha=scale)


def _scaled(g: Tensor, scale: float, like: Tensor) -> Tensor:
    """scale · g as the cotangent of `like`, rounded as autograd rounds the cotangent of `like` in
    torch.add(x, like, alpha=scale): the product in g's dtype, then cast to like's (the autocast dtype of
    a block's output)."""
    return (g * scale).to(like.dtype)


class _LayerVJP:
    """Layer VJPs under autograd (the forward's RNG state and autocast), with respect to the state, the
    layers' parameters and the extra inputs: at a state (`__call__`) or at the reconstruction's
    evaluation points (`at_reconstruction`)."""

    def __init__(self, stack, settings, autocast, replay, extras, block_params, parameters_read):
        self.stack, self.settings, self.autocast, self.replay, self.extras = stack, settings, autocast, replay, extras
        self.block_params = block_params  # gathered once in the forward, not once per layer here
        self.parameters_read = parameters_read
        # vjp_at="extrapolated": the block outputs of the last two reconstructed layers, k_{n+1} then k_{n+2}
        self.extrapolate = settings.vjp_at == "extrapolated"
        self.recent: list = []

    def __call__(self, x: Tensor, g: Tensor, first: int, stop: int, grads: dict) -> Tensor:
        """The VJP of forward layers first … stop − 1 at x, recomputed. One layer (all but strict's redo
        of a segment): x + c Δ's identity path added by hand, only Δ differentiated — the recompute
        skips forming x + c Δ, whose value nothing reads, and its backward."""
        stack, settings = self.stack, self.settings
        self.recent.clear()  # a stored state: the layers below extrapolate from their own evaluations only
        params = [p for n in range(first, stop) for p in self._layer_parameters(n)]
        with torch.enable_grad(), self.autocast():
            x_in = x.detach().requires_grad_(True)
            if stop == first + 1:
                scale, direction = stack.increment(x_in, first, settings, self.replay)
                return g + self._vjp(direction, x_in, params, _scaled(g, scale, direction), first, grads)
            out = x_in
            for n in range(first, stop):
                out = stack.step(out, n, settings, self.replay)
            return self._vjp(out, x_in, params, g, first, grads)

    def at_reconstruction(self, x_next: Tensor, g: Tensor, n: int, grads: dict) -> tuple:
        """(x̃_n, g_n): layer n's reconstruction from x̃_{n+1}, its block evaluations under autograd giving
        the VJP (module docstring); each backward runs as soon as its evaluation is done, so that one
        block's graph is alive at a time."""
        stack, h = self.stack, self.settings.h
        with torch.enable_grad(), self.autocast():
            if self.settings.method == "euler":
                z = (self._extrapolated(x_next) if self.extrapolate else x_next).detach().requires_grad_(True)
                k = stack._call(n, z, self.replay, (n, 0))
                with torch.no_grad():  # x̃_{n+1} − h k as reverse_step computes it (extrapolated: k taken at z)
                    x = _add_scaled(x_next, k, -h)
                if self.extrapolate:
                    self.recent = [k.detach()] + self.recent[:1]
                return x, g + self._vjp(k, z, self._own_parameters(n), _scaled(g, h, k), n, grads)
            z = x_next.detach().requires_grad_(True)
            k_next = stack._call(n + 1, z, self.replay, (n, 1))
            with torch.no_grad():
                y = _add_scaled(x_next, k_next, -h).requires_grad_(True)
            gy = self._vjp(k_next, z, self._own_parameters(n + 1), _scaled(g, 0.5 * h, k_next), n, grads)
            k = stack._call(n, y, self.replay, (n, 0))
            with torch.no_grad():
                x = _add_scaled(x_next, k_next + k, -0.5 * h)
            u1 = _scaled(g, 0.5 * h, k) + _scaled(gy, h, k)
            return x, g + gy + self._vjp(k, y, self._own_parameters(n), u1, n, grads)

    @torch.no_grad()
    def _extrapolated(self, x_next: Tensor) -> Tensor:
        """z_n = x̃_{n+1} − h c k_{n+1} ≈ x̃_{n+1} − h k_n = x̃_n: the next block output predicted as c k_{n+1},
        c = clamp(⟨k_{n+1}, k_{n+2}⟩ / ‖k_{n+2}‖², 0, 1) the least-squares fit k_{n+1} ≈ c k_{n+2} one layer
        up (x̃_{n+1} itself until two layers are known). c is a 0-dim tensor: no host synchronisation."""
        if len(self.recent) < 2:
            return x_next
        k1, k2 = (k.reshape(-1).to(x_next.dtype) for k in self.recent)
        c = (torch.dot(k1, k2) / torch.dot(k2, k2).clamp_min(torch.finfo(k2.dtype).tiny)).clamp(0.0, 1.0)
        return torch.addcmul(x_next, self.recent[0], c, value=-self.settings.h)  # one pass; c a tensor: no sync

    def _layer_parameters(self, n: int) -> list:
        """Parameters that forward layer n reads: f_n's (and f_{n+1}'s for Heun); `_vjp` removes repeats."""
        return self.block_params[n] + (self.block_params[n + 1] if self.settings.method == "heun" else [])

    def _own_parameters(self, block: int) -> list:
        return self.block_params[block]

    def _frozen_in_forward(self, leaf: Tensor) -> bool:
        """A block parameter that did not require grad in the forward (unfrozen since): listed, gradient-free
        as in a plain loop, whose graph did not record it."""
        trained = {id(p) for own in self.block_params for p in own}
        return id(leaf) not in trained and any(p is leaf for own in self.parameters_read for p in own)

    def _vjp(self, out: Tensor, x_in: Tensor, params: list, cotangent: Tensor, layer: int, grads: dict) -> Tensor:
        """The cotangent of x_in (zeros where out does not depend on it); the gradients of the parameters
        that require grad and of the extra inputs are added to `grads`."""
        if not out.requires_grad:  # a block that reads nothing differentiable (zeros, a constant forcing)
            return torch.zeros_like(x_in)
        # dict: a block reused at several depths (weight tying) must be differentiated once per call. A tensor
        # frozen since the forward gets no gradient, as autograd gives it none in a plain loop.
        wrt = [t for t in dict.fromkeys(params + self.extras) if t.requires_grad]
        unlisted = _unlisted_leaves(out, [x_in] + wrt)
        if unlisted:
            unlisted = [leaf for leaf in unlisted if not self._frozen_in_forward(leaf)]
            if unlisted:
                raise RuntimeError(_unlisted_message(layer, unlisted[0]))
        gx, *dinputs = torch.autograd.grad(out, [x_in] + wrt, cotangent, allow_unused=True)
        for t, d in zip(wrt, dinputs):
            if d is not None:
                grads[t] = d if t not in grads else grads[t] + d
        return torch.zeros_like(x_in) if gx is None else gx


class AdjointResidualStack(nn.Module):
    """x_{n+1} = x_n + (T/L) f_n(x_n) over a list of blocks f_n (same-shape in and out).

    Args:
        blocks: L modules for ``method="euler"``, L + 1 for ``"heun"`` (f_0 … f_L, Heun's step n
            uses f_n and f_{n+1}).
        method, T, backward, anchor_every, drift_tol, strict: as in `odenets_fast.ode_mlp`.
            ``"backprop"`` runs the plain loop under autograd (exact, stores every activation);
            ``"adjoint"`` keeps x_0 and x_L (and the anchors) and reconstructs the rest in backward;
            ``anchor_every="auto"`` places the anchors by the error controller (odenets_fast.segments):
            each backward measures every segment's drift (one more block evaluation per segment) and
            sets the layout of the next call, kept in the buffer ``anchor_mask`` (in ``state_dict``).
        preserve_rng_state: re-run each block call with the RNG state of its forward (dropout).
        vjp_at: adjoint mode's VJP points (module docstring, DESIGN.md §4): ``"state"`` (default)
            recomputes each step at its reconstructed (or stored) input state; ``"reconstruction"``
            differentiates the reconstruction's own block evaluations — one block evaluation per
            layer less (Heun: two), the Jacobians taken O(h) (Heun: O(h²)) from the forward's points;
            ``"extrapolated"`` (Euler) the same cost, evaluating each block at a point extrapolated from
            the two above — O(h²) from the forward's where the blocks vary smoothly with depth.

    ``last_drift``: ‖x̃_0 − x_0‖ / ‖x_0‖ of the latest adjoint backward (None before one);
    ``last_segment_drift``: (first layer, length, drift) of its segments (anchor_every="auto").
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        *,
        method: str = "euler",
        T: float = 1.0,
        backward: str = "adjoint",
        anchor_every: Union[int, str, None] = None,
        drift_tol: Optional[float] = None,
        strict: bool = False,
        preserve_rng_state: bool = True,
        vjp_at: str = "state",
    ):
        super().__init__()
        blocks = list(blocks)  # a generator would be spent by the type check
        if not all(isinstance(block, nn.Module) for block in blocks):
            raise TypeError("blocks must be a sequence of nn.Module")
        self.blocks = nn.ModuleList(blocks)
        self.method = check_choice("method", method, METHODS)
        self.depth = len(self.blocks) - (1 if method == "heun" else 0)
        if self.depth < 1:
            needed = "L + 1 >= 2 blocks" if method == "heun" else "at least 1 block"
            raise ValueError(f"method={method!r} needs {needed}; got {len(self.blocks)}")
        self.T = check_real("T", T, positive=True)
        self.backward_mode = check_choice("backward", backward, BACKWARD_MODES)
        self.anchor_every = check_anchor_every(anchor_every, backward)
        self.drift_tol, self.strict = check_error_control(self.anchor_every, drift_tol, strict)
        self.preserve_rng_state = check_bool("preserve_rng_state", preserve_rng_state)
        self.vjp_at = check_vjp_at(vjp_at, self.backward_mode, method)
        self._drift: Optional[Tensor] = None
        # Whether the latest adjoint forward's blocks drew random numbers: if not, the next one reads the RNG
        # state before and after its loop only, not at every block call (_RngRecorder).
        self._blocks_drew = True
        self._hooks_checked = False  # the hooks warning: looked for at the first adjoint forward
        if self.anchor_every == AUTO:  # the controller's state, from plain adjoint's one segment on
            self.register_buffer("anchor_mask", torch.zeros(self.depth, dtype=torch.bool))
            self.register_buffer("segment_drift", torch.full((self.depth,), segments.NO_SEGMENT), persistent=False)

    def _checked_settings(self) -> _Settings:
        """The settings as they are now — attributes may be reassigned after construction — under the checks of
        __init__, and the blocks still as many as the depth (fixed at construction: h = T / depth, and the
        "auto" layout's length) needs."""
        method = check_choice("method", self.method, METHODS)
        needed = self.depth + (method == "heun")
        if len(self.blocks) != needed:
            raise ValueError(f"an AdjointResidualStack of depth {self.depth} (set at construction) with method={method!r} "
                             f"needs {needed} blocks; it has {len(self.blocks)}: build a new stack for other blocks")  # fmt: skip
        T = check_real("T", self.T, positive=True)
        check_choice("backward", self.backward_mode, BACKWARD_MODES)
        check_anchor_every(self.anchor_every, self.backward_mode)
        if self.anchor_every == AUTO and not hasattr(self, "anchor_mask"):
            raise ValueError("anchor_every='auto' is chosen at construction (its layout is module state): build a new "
                             "AdjointResidualStack with it")  # fmt: skip
        drift_tol, strict = check_error_control(self.anchor_every, self.drift_tol, self.strict)
        vjp_at = check_vjp_at(self.vjp_at, self.backward_mode, method)
        return _Settings(method, T / self.depth, self.anchor_every is not None, vjp_at, strict, drift_tol)

    def anchor_layout(self) -> list:
        """The layers whose input the next forward stores (x_0 always)."""
        if self.anchor_every == AUTO:
            return segments.positions_of(self.anchor_mask)
        return list(range(0, self.depth, self.anchor_every or self.depth))

    @property
    def step_size(self) -> float:
        """h = T / L, from T as it is now (T may be changed between calls, as ODEMLP's)."""
        return self.T / self.depth

    @property
    def anchor_positions(self) -> Optional[list]:
        """The layers whose input the next forward stores (anchor_every="auto"; None otherwise), as ODEMLP's."""
        return self.anchor_layout() if self.anchor_every == AUTO else None

    @torch.no_grad()
    def record_segments(self, positions: list, drifts: dict, drift_tol: float, measured: bool = True) -> None:
        """The drifts of an auto-mode backward's segments, and the controller's layout for the next call
        (the same layout where nothing was `measured`: an empty batch)."""
        values = torch.stack([drifts[a] for a in positions]).float().tolist()
        self.segment_drift.copy_(segments.segment_drifts(positions, values, self.segment_drift))
        layout = segments.next_positions(positions, values, self.depth, drift_tol, measured)
        self.anchor_mask.copy_(segments.mask_of(layout, self.anchor_mask))

    @property
    def last_segment_drift(self) -> Optional[list]:
        """[(first layer, length, drift)] of the latest backward's segments (anchor_every="auto")."""
        return segments.described(self.segment_drift) if self.anchor_every == AUTO else None

    def step(self, x: Tensor, n: int, settings: _Settings, rng: Optional[RngRunner] = None) -> Tensor:
        """Forward layer n (DESIGN.md §3): x + c Δ of `increment`."""
        scale, direction = self.increment(x, n, settings, rng)
        return _add_scaled(x, direction, scale)

    def increment(self, x: Tensor, n: int, settings: _Settings, rng: Optional[RngRunner] = None) -> tuple:
        """(c, Δ) with x_{n+1} = x_n + c Δ: (h, k1) for Euler, (h/2, k1 + k2) for Heun. `rng`, if given,
        runs each block call (see `_RngRecorder`)."""
        h = settings.h
        k1 = self._call(n, x, rng, (n, 0))
        if settings.method == "euler":
            return h, k1
        return 0.5 * h, k1 + self._call(n + 1, _add_scaled(x, k1, h), rng, (n, 1))

    def reverse_step(self, x_next: Tensor, n: int, settings: _Settings, rng: Optional[RngRunner] = None) -> Tensor:
        """x̃_n from x̃_{n+1} by the forward rule run backwards (DESIGN.md §4); each block call keyed as
        the same call of `step(·, n)`, so that a replay gives it the random numbers it drew there."""
        h = settings.h
        if settings.method == "euler":
            return _add_scaled(x_next, self._call(n, x_next, rng, (n, 0)), -h)
        k_next = self._call(n + 1, x_next, rng, (n, 1))
        return _add_scaled(x_next, k_next + self._call(n, _add_scaled(x_next, k_next, -h), rng, (n, 0)), -0.5 * h)

    def _call(self, block: int, x: Tensor, rng: Optional[RngRunner], key: tuple) -> Tensor:
        # compiled: functionalised, and a version read would be data-dependent; inference tensors have no version
        checked = not (torch.compiler.is_compiling() or x.is_inference())
        version = x._version if checked else 0
        out = self.blocks[block](x) if rng is None else rng(key, self.blocks[block], x)
        if not isinstance(out, Tensor) or out.shape != x.shape:  # the adjoint's cotangents take the state's shape
            got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type_name(out)
            raise ValueError(f"block {block} of an AdjointResidualStack must return a tensor of its input's shape "
                             f"{tuple(x.shape)}; got {got}")  # fmt: skip
        if checked and x._version != version:  # the step would add f(x) to the modified x, and the stack keeps x
            raise RuntimeError(
                f"block {block} of an AdjointResidualStack modified its input in place (an nn.ReLU(inplace=True) "
                "or x += … applied to it?): the step adds the block's output to that input, and the stack keeps "
                "the input. Make the block leave its input unchanged."
            )
        return out

    def __prepare_scriptable__(self):
        raise RuntimeError(torchscript_unsupported("AdjointResidualStack"))

    @property
    def last_drift(self) -> Optional[float]:
        return None if self._drift is None else float(self._drift)

    def forward(self, x: Tensor, extra_inputs: Sequence[Tensor] = ()) -> Tensor:
        """x_L from x. `extra_inputs`: tensors the blocks read other than x and their own
        parameters (needed in adjoint mode only, where gradients reach nothing else)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type_name(x)}")
        extra_inputs = list(extra_inputs)
        if not all(isinstance(t, Tensor) for t in extra_inputs):
            raise TypeError("extra_inputs must be a sequence of torch.Tensor")
        settings = self._checked_settings()
        # A plain loop where no adjoint backward will run: backprop mode, no grad, and torch.export, which
        # records the forward's computation only (an exported program differentiates its recorded graph).
        if self.backward_mode == "backprop" or not torch.is_grad_enabled() or _exporting():
            for n in range(self.depth):
                x = self.step(x, n, settings)
            return x
        check_not_torchscript("An adjoint-mode AdjointResidualStack")
        parameters_read = [tuple(block.parameters()) for block in self.blocks]
        if any(is_lazy(p) for own in parameters_read for p in own):  # the Function's inputs would be placeholders
            raise RuntimeError(
                "an adjoint-mode AdjointResidualStack's blocks hold uninitialized lazy parameters (nn.LazyLinear, …): "
                "run one forward under torch.no_grad() first (PyTorch's dry run for lazy modules, before the "
                "optimizer is built), then train.")  # fmt: skip
        if not self._hooks_checked:  # after the lazy modules' dry run, which removes their pre-hooks
            self._hooks_checked = True
            _warn_of_forward_hooks(self.blocks)
        block_params = tuple([p for p in own if p.requires_grad] for own in parameters_read)
        params = list(dict.fromkeys(p for own in block_params for p in own))  # as self.parameters(): each once
        position = {id(p): i for i, p in enumerate(params)}
        listed = dict.fromkeys(extra_inputs)
        listed_params = tuple(position[id(t)] for t in listed if id(t) in position)
        extras = [t for t in listed if id(t) not in position]
        if not (x.requires_grad or params or any(t.requires_grad for t in extras)):
            return self._loop_reading_nothing_listed(x, settings)
        try:
            return _AdjointStackFunction.apply(x, self, settings, parameters_read, block_params, len(params),
                                               listed_params, *params, *extras)  # fmt: skip
        except RuntimeError as error:  # PyTorch's own message names an internal it cannot act on
            if "setup_context" not in str(error):
                raise
            raise RuntimeError(
                "torch.func transforms (grad, vmap, jvp, jacrev, …) cannot run an adjoint-mode AdjointResidualStack: "
                "its backward re-runs the blocks outside the transform. Use backward='backprop' (a plain loop, which "
                "they transform) or torch.autograd.") from None

    def _loop_reading_nothing_listed(self, x: Tensor, settings: _Settings) -> Tensor:
        """The forward loop where nothing the adjoint differentiates requires grad (x, the parameters and
        extra_inputs all frozen): the adjoint's backward would never run, so a block reading another tensor
        that requires grad would get no gradient and no error. The loop runs under autograd, which records
        nothing unless a block reads such a tensor — then it raises the adjoint backward's error."""
        for n in range(self.depth):
            x = self.step(x, n, settings)
            if x.requires_grad:
                raise RuntimeError(_unlisted_message(n, _unlisted_leaves(x, [])[0]))
        return x

    def extra_repr(self) -> str:
        return (
            f"depth={self.depth}, method={self.method!r}, T={self.T}, backward={self.backward_mode!r}, "
            f"anchor_every={self.anchor_every!r}, preserve_rng_state={self.preserve_rng_state}, vjp_at={self.vjp_at!r}"
            + (f", drift_tol={self.drift_tol}, strict={self.strict}" if self.anchor_every == AUTO else "")
        )
