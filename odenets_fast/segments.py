"""Error-controlled anchors (anchor_every="auto"): the stack cut into segments at stored states, each
segment's reconstruction drift measured in every backward, and a controller that places the anchors
of the next call so that the drift stays under `drift_tol`.

A segment [a, b) starts at an anchor x_a (stored by the forward) and ends at the next anchor x_b (or
x_L). Every backend runs each segment as a stack of its own — layers a … b − 1, weights θ_a … θ_{b−1}
(Heun: … θ_b), the same step — in anchored adjoint mode with one anchor (anchor_every = b − a): the
backward reconstructs from the exact x_b down to x̃_{a+1}, takes the VJP at the exact x_a in layer a,
and reports the segment's drift ‖x̃_a − x_a‖ / ‖x_a‖ (x̃_a reconstructed from x̃_{a+1}) from the same
pass — the fused kernels and the C++ backend measure it as they do plain adjoint's, with no launch or
pass per layer. Memory: one stored state per segment, as with anchor_every; a segment of length 1
is exact backprop there, one segment of length L is plain adjoint's memory.

strict=True: a segment whose drift exceeds `drift_tol` is redone exactly within the same backward —
its forward re-run from x_a in backprop mode (that segment's states: the extra memory) and
differentiated with the same incoming gradient, its gradients replacing the approximate ones — so
every gradient comes from segments within the tolerance or exact.

The controller (`next_positions`) works per segment: one that drifted above `drift_tol` is cut into
pieces short enough for half the tolerance if drift grew linearly with length (at least halved); two
neighbours whose drifts add up to less than `drift_tol / GROW_BELOW` merge (the hysteresis: a segment
grows by at most 2× per call, only far below the tolerance, and fresh pieces do not merge back). A
segment of one layer takes its VJP at the stored state — exact — but still reports the drift of its
one reconstruction step, which is what the controller needs to judge a merge. Anchors travel between calls as a mask over the
layers (`anchor_mask`, (L,) bool, x_0 always anchored): a tensor, so that the state is a module buffer
in `state_dict` and a change of layout recompiles nothing under torch.compile (the layout is read
inside the op: one host synchronisation per call, so an auto-mode step does not capture in a CUDA
graph). Reading the drifts is one more synchronisation per backward (per segment with strict=True).
"""

import dataclasses
import math

import torch
from torch import Tensor
from torch.utils.checkpoint import CheckpointError

from .interface import Gradients, Saved, in_grad_dtype
from .spec import StackSpec, compute_dtype

# Merge two neighbouring segments when their drifts add up to less than drift_tol / GROW_BELOW: a cut
# aims at drift_tol / 2, so two fresh pieces do not merge back (the hysteresis).
GROW_BELOW = 4.0
# In an (L,) tensor of segment drifts, the entries of layers that start no segment (not NaN: opcheck
# compares the op's eager and traced outputs, and NaN is unequal to itself)
NO_SEGMENT = -1.0


def saved_tensors(ctx) -> tuple:
    """`ctx.saved_tensors` of an anchor_every="auto" stack's backward, with an error that says what happened
    where non-reentrant torch.utils.checkpoint recomputed the region with another number of stored states:
    the layout is read by each forward, and the backward of another call of the same module, run between
    the forward and the recompute, may have moved it. (With as many anchors as before the recompute's own
    layout travels with them, so that case is merely a different, consistent layout.)"""
    try:
        return ctx.saved_tensors
    except CheckpointError as error:
        raise RuntimeError(
            "torch.utils.checkpoint recomputed a region holding an anchor_every='auto' stack and the recompute "
            "saved other tensors than the forward. The stack does so when its anchor layout moved in between: "
            "the backward of another call of the same module ran first and its controller changed the layout. "
            "Run the checkpointed call's backward first, give that stack a fixed anchor_every, or leave it out of "
            "the checkpoint (an adjoint stack keeps only its anchors anyway). PyTorch's message follows."
        ) from error


def positions_of(mask: Tensor) -> list:
    """The anchored layers of a mask, x_0 always among them, in increasing order."""
    positions = mask.nonzero().flatten().tolist()
    return positions if positions[:1] == [0] else [0] + positions


def bounds(positions: list, depth: int) -> list:
    """(a, b) of every segment."""
    return list(zip(positions, positions[1:] + [depth]))


def _segment(spec: StackSpec, a: int, b: int, backward: str = "adjoint") -> StackSpec:
    """The spec of layers a … b − 1 as a stack of their own: in adjoint mode with one anchor (x_a),
    used at layer a; or in backprop mode (strict's exact redo)."""
    anchor_every = b - a if backward == "adjoint" else None
    return dataclasses.replace(spec, depth=b - a, backward=backward, anchor_every=anchor_every, drift_tol=None,
                               strict=False)  # fmt: skip


def _params(spec: StackSpec, tensors: tuple, a: int, b: int) -> tuple:
    """θ_a … θ_{b−1} (Heun: … θ_b) of the stacked W, V, b, c (None stays None)."""
    stop = b + (1 if spec.method == "heun" else 0)
    return tuple(None if t is None else t[a:stop] for t in tensors)


def forward(backend, x: Tensor, W, V, b, c, spec: StackSpec, positions: list) -> tuple:
    """x_0 → x_L segment by segment; (x_L, Saved(x_L, the anchors (S, B, q), None))."""
    anchors, state = [], x
    for a, end in bounds(positions, spec.depth):
        state, saved = backend.forward(state, *_params(spec, (W, V, b, c), a, end), _segment(spec, a, end))
        anchors.append(saved.anchors[0])
        state = saved.final  # the compute dtype: the next segment starts from it unrounded
    return state.to(x.dtype), Saved(state, torch.stack(anchors), None)


def backward(backend, grad_out: Tensor, saved: Saved, positions: list, W, V, b, c, spec: StackSpec) -> tuple:
    """Segments from the top down, each with the gradient the one above passed on. Returns
    (Gradients, drifts, redone): each segment's drift (a list of floats) and whether strict redid it."""
    final, anchors, _ = saved
    dtype = compute_dtype(grad_out.dtype)
    params = (W, V, b, c)
    totals = [None if t is None else torch.zeros(t.shape, dtype=dtype, device=t.device) for t in params]
    g = grad_out.to(dtype)  # carried between segments in the compute dtype, as within one (DESIGN.md §6)
    segments = bounds(positions, spec.depth)
    drifts, redone = [math.nan] * len(segments), [False] * len(segments)
    drift_of_first = None
    for j in reversed(range(len(segments))):
        a, end = segments[j]
        top = final if j == len(segments) - 1 else anchors[j + 1]
        seg_params = _params(spec, params, a, end)
        grads = backend.backward(g, Saved(top, anchors[j : j + 1], None), *seg_params, _segment(spec, a, end))
        if spec.strict:
            drifts[j] = float(grads.drift)
            if end - a > 1 and not drifts[j] <= spec.drift_tol:  # NaN too; one layer is exact already
                grads = _exact(backend, g, anchors[j], seg_params, _segment(spec, a, end, backward="backprop"))
                redone[j] = True
        else:
            drifts[j] = grads.drift.reshape(())
        if j == 0:
            drift_of_first = grads.drift if not redone[0] else _drift_before_redo(drifts[0], grads)
        for total, grad, seg in zip(totals, grads[1:5], _params(spec, totals, a, end)):
            if total is not None:
                seg += grad.to(dtype)
        g = grads.x
    if not spec.strict:  # one synchronisation for all of them
        drifts = torch.stack(drifts).tolist()

    gradients = in_grad_dtype(grad_out, g, *totals, drift_of_first)
    return gradients, drifts, redone


def _exact(backend, g: Tensor, anchor: Tensor, seg_params: tuple, exact_spec: StackSpec) -> Gradients:
    """The segment run again from its stored anchor in backprop mode, and its exact gradients."""
    _, saved = backend.forward(anchor, *seg_params, exact_spec)
    return backend.backward(g, saved, *seg_params, exact_spec)


def _drift_before_redo(drift: float, grads: Gradients) -> Tensor:
    """The first segment's measured drift (last_drift), also when strict redid the segment exactly."""
    return grads.x.new_tensor(drift, dtype=compute_dtype(grads.x.dtype))


def next_positions(positions: list, drifts: list, depth: int, drift_tol: float, measured: bool = True) -> list:
    """The anchors of the next call (module docstring): drifted segments cut, quiet neighbours merged.
    `measured=False` (an empty batch, whose drifts are 0 for want of rows): the layout as it is."""
    if not measured:
        return list(positions)
    cut = []
    for (a, end), drift in zip(bounds(positions, depth), drifts):
        length = end - a
        if drift <= drift_tol:
            cut.append((a, end, drift))
            continue
        # NaN or inf: as short as possible; otherwise short enough for tol/2 if drift ∝ length
        wanted = 1 if not math.isfinite(drift) else int(length * drift_tol / (2 * drift))
        piece = max(1, min(length // 2, wanted))
        cut += [(start, min(start + piece, end), math.nan) for start in range(a, end, piece)]
    merged, j = [], 0
    while j < len(cut):
        a, end, drift = cut[j]
        if j + 1 < len(cut) and drift + cut[j + 1][2] < drift_tol / GROW_BELOW:  # NaN compares False
            merged.append(a)
            j += 2
        else:
            merged.append(a)
            j += 1
    return merged


def mask_of(positions: list, like: Tensor) -> Tensor:
    mask = torch.zeros_like(like, dtype=torch.bool)
    mask[positions] = True
    return mask


def segment_drifts(positions: list, drifts: list, like: Tensor) -> Tensor:
    """(L,) float: each segment's drift at its first layer, NO_SEGMENT elsewhere."""
    out = torch.full(like.shape, NO_SEGMENT, dtype=torch.float32, device=like.device)
    out[positions] = torch.tensor(drifts, dtype=torch.float32).to(like.device)
    return out


def described(segment_drift: Tensor) -> list:
    """[(first layer, length, drift)] of the segments a backward measured, from its (L,) segment drifts."""
    values = segment_drift.tolist()
    starts = [n for n, value in enumerate(values) if value != NO_SEGMENT]
    return [(a, end - a, values[a]) for a, end in bounds(starts, len(values))] if starts else []
