"""The "triton" backend: which of its two paths a call takes, and the launch plan and buffers of the
fused path around the kernels of `odenets_fast.triton_kernels.mlp_step`.

Paths (DESIGN.md §7): `odenets_fast.planner.choose_path` picks the layered path
(`triton_layered`: cuBLAS products, Triton epilogues) or the fused one described below, by the cost
model's predicted step time on the device (`ODENETS_FAST_TRITON_PATH` overrides); both save the same
states, so a backward may follow either forward.

Each launch walks a range of layers with every program's rows of x (and g) on-chip in float32:
the whole depth in one launch by default ("whole-depth"), or `ODENETS_FAST_TRITON_LAYERS_PER_LAUNCH`
layers per launch (1 = the per-layer path: a launch and a round trip of the state through memory
per layer). In deterministic mode a backward launch reduces its weight gradients over the batch in
a fixed order, through per-program float32 partial rows or through a workspace of the gradients'
factors and batch-wide products (`weight_grad_reduction` picks the one that moves fewer bytes); a
launch covers as many layers as fit in the gradient buffer (`grad_buffer_bytes`: 64 MiB unless
ODENETS_FAST_TRITON_GRAD_BUFFER_MIB says otherwise), at least one (whose buffer alone may be larger).
With `deterministic=False` the kernels add into the accumulator with atomics: no buffer.

What is saved for backward follows the reference exactly (`interface.Saved`): x_L, the anchors
and, for Heun in backprop mode, the stages y_n — so the activation memory of adjoint mode is
O(B q) whatever the depth. Weight gradients accumulate in float32 (P, …) tensors, cast to the
parameter dtype at the end (no copy for float32 parameters).
"""

import functools
import os

import torch
import triton
from torch import Tensor

from . import planner, triton_layered
from .interface import Gradients, Saved, in_grad_dtype, relative_drift
from .spec import StackSpec
from .triton_kernels import mlp_step
from .triton_kernels.activations import ACTIVATION_CODES
from .triton_kernels.mlp_step import KernelConfigs, Params, ProductConfig

INTERPRETED = type(mlp_step.forward_layers_kernel).__name__ == "InterpretedFunction"
LAYERS_PER_LAUNCH_ENV = "ODENETS_FAST_TRITON_LAYERS_PER_LAUNCH"
TILES_ENV = KernelConfigs("ODENETS_FAST_TRITON_FORWARD_TILES", "ODENETS_FAST_TRITON_REVERSE_TILES")
PRODUCT_TILES_ENV = "ODENETS_FAST_TRITON_PRODUCT_TILES"
GRAD_BUFFER_ENV = "ODENETS_FAST_TRITON_GRAD_BUFFER_MIB"
DEFAULT_GRAD_BUFFER_MIB = 64
WEIGHT_GRADS_ENV = "ODENETS_FAST_TRITON_WEIGHT_GRADS"
# what the planner's estimate of the fused path reads besides the sizes (its cached choices are keyed by them)
TUNING_ENVS = (LAYERS_PER_LAUNCH_ENV, *TILES_ENV, PRODUCT_TILES_ENV, GRAD_BUFFER_ENV, WEIGHT_GRADS_ENV)


def check_path_limits(x: Tensor, W: Tensor, path: str) -> None:
    """A clear error for sizes the kernels of `path` cannot index (the fused kernels' int32 offsets and
    on-chip state), never a wrong answer; device and dtype: `check_device_and_dtype`."""
    if path == "layered":  # cuBLAS products and int64-indexed elementwise kernels: no further limit
        return
    P, m, q = W.shape
    unsupported = planner.fused_unsupported(x.shape[0], q, m, P)
    if unsupported is not None:
        raise ValueError(f"backend 'triton': {unsupported} with {planner.PATH_ENV}=fused. Unset it: the layered path "
                         f"runs such stacks")  # fmt: skip


def check_device_and_dtype(x: Tensor) -> None:
    """What both paths need, checked before the planner is asked (`plan` would reject float64 in its own words)."""
    if x.device.type != "cuda" and not (INTERPRETED and x.device.type == "cpu"):
        raise ValueError(
            f"backend 'triton' runs on CUDA tensors (or on CPU tensors when TRITON_INTERPRET=1 was set before "
            f"odenets_fast was imported); got tensors on {x.device}"
        )
    if INTERPRETED and x.dtype in (torch.bfloat16, torch.float64):
        raise TypeError(f"the Triton interpreter does not support {x.dtype}; use float32 or float16")
    if x.dtype == torch.float64:
        raise TypeError("backend 'triton' supports float32, float16 and bfloat16; use 'reference' or 'cpp' for float64")


def layers_per_launch(depth: int) -> int:
    """Layers one launch walks: the whole depth unless ODENETS_FAST_TRITON_LAYERS_PER_LAUNCH says
    otherwise (1 = per-layer launches). The crossover between the two is to be measured on the GPU
    (bench.triton_step reports both); until then whole-depth is the default, as it saves a launch
    and a round trip of the state through memory per layer."""
    value = os.environ.get(LAYERS_PER_LAUNCH_ENV, "")
    if not value:
        return depth
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{LAYERS_PER_LAUNCH_ENV} must be a positive integer; got {value!r}")
    return min(int(value), depth)


def grad_buffer_bytes() -> int:
    """Memory for the weight-gradient buffer of one backward launch (partial rows or workspace): the
    memory/speed knob of the deterministic backward. More layers per launch save launches and round
    trips of the state; the buffer is the adjoint step's largest allocation, so the default (64 MiB)
    keeps it near one layer's buffer at wide shapes (about 25 MB per layer at q = 256, m = 512,
    B = 4096) — the peak then stays flat from a few layers on, far below what backprop stores."""
    value = os.environ.get(GRAD_BUFFER_ENV, "")
    if not value:
        return DEFAULT_GRAD_BUFFER_MIB * 2**20
    if not value.isdigit():
        raise ValueError(
            f"{GRAD_BUFFER_ENV} must be a non-negative integer (MiB; 0: one layer per launch); got {value!r}"
        )
    return int(value) * 2**20


def _chunks(depth: int, size: int) -> list:
    """(start, stop) ranges of at most `size` layers, from the top of the stack down."""
    return [(max(0, stop - size), stop) for stop in range(depth, 0, -size)]


def kernel_configs(q: int, m: int, operand_bytes: int) -> KernelConfigs:
    """The tiles of mlp_step's table, or those that ODENETS_FAST_TRITON_FORWARD_TILES /
    ODENETS_FAST_TRITON_REVERSE_TILES give as "BLOCK_B,BLOCK_M,num_warps,num_stages" (for tuning
    on a GPU: `bench.triton_step --mode tune` times alternatives through them)."""
    configs = mlp_step.kernel_configs(q, m, operand_bytes, INTERPRETED)
    overrides = (_tiles_from_env(env, ("BLOCK_B", "BLOCK_M")) for env in TILES_ENV)
    return KernelConfigs(*(c if tiles is None else c._replace(**tiles) for c, tiles in zip(configs, overrides)))


def product_config(operand_bytes: int) -> ProductConfig:
    """Tiles of the workspace products (mlp_step.product_config), or those that
    ODENETS_FAST_TRITON_PRODUCT_TILES gives as "BLOCK_R,BLOCK_C,BLOCK_K,num_warps,num_stages"."""
    tiles = _tiles_from_env(PRODUCT_TILES_ENV, ("BLOCK_R", "BLOCK_C", "BLOCK_K"))
    config = mlp_step.product_config(operand_bytes, INTERPRETED)
    return config if tiles is None else config._replace(**tiles)


def _tiles_from_env(env: str, blocks: tuple):
    """The fields of `env` = "<blocks…>,num_warps,num_stages" as {field: value} (lower-case names),
    or None when it is unset; a clear error when it is malformed."""
    value = os.environ.get(env, "")
    if not value:
        return None
    names = ",".join(blocks + ("num_warps", "num_stages"))
    parts = [part.strip() for part in value.split(",")]
    if len(parts) != len(blocks) + 2 or not all(part.isdigit() for part in parts):
        raise ValueError(f"{env} must be '{names}' ({len(blocks) + 2} positive integers); got {value!r}")
    *sizes, num_warps, num_stages = map(int, parts)
    if any(size < 16 or size & (size - 1) for size in sizes):
        raise ValueError(f"{env}: {', '.join(blocks)} must be powers of two of at least 16 (tl.dot); got {value!r}")
    if num_warps not in (1, 2, 4, 8, 16, 32) or num_stages < 1:
        raise ValueError(f"{env}: num_warps must be a power of two up to 32 and num_stages positive; got {value!r}")
    return dict(zip([block.lower() for block in blocks], sizes), num_warps=num_warps, num_stages=num_stages)


def _setup(spec: StackSpec, W, V, b, c, q: int) -> tuple:
    params = Params(W.contiguous(), V.contiguous(), None if b is None else b.contiguous(),
                    None if c is None else c.contiguous())  # fmt: skip
    configs = kernel_configs(q, W.shape[1], W.element_size())
    args = dict(heun=spec.method == "heun", act=ACTIVATION_CODES[spec.activation], step=spec.step,
                scale_in=spec.scale_in, scale_out=spec.scale_out, precision=spec.input_precision)  # fmt: skip
    return params, args, configs


def _path(x: Tensor, W: Tensor, spec: StackSpec) -> str:
    """The planner's choice (odenets_fast.planner); forward and backward of a call agree on it, and
    both paths save the same states, so either backward can follow either forward."""
    check_device_and_dtype(x)
    P, m, q = W.shape
    path = planner.choose_path(x.shape[0], q, m, spec, W.dtype, x.device)
    check_path_limits(x, W, path)
    return path


def forward(x: Tensor, W, V, b, c, spec: StackSpec) -> tuple[Tensor, Saved]:
    if _path(x, W, spec) == "layered":
        return triton_layered.forward(x, W, V, b, c, spec)
    B, q = x.shape
    params, args, configs = _setup(spec, W, V, b, c, q)
    state = x.to(torch.float32, copy=True).contiguous()
    every = spec.anchor_interval
    anchors = state.new_empty((len(range(0, spec.depth, every)), B, q))
    stages = state.new_empty((spec.depth, B, q)) if args["heun"] and spec.backward == "backprop" else None
    if B:
        for start, stop in reversed(_chunks(spec.depth, layers_per_launch(spec.depth))):
            mlp_step.forward_layers(state, params, start, stop, anchors=anchors, anchor_every=every, stages=stages,
                                    config=configs.forward, **args)  # fmt: skip
    return state.to(x.dtype), Saved(state, anchors, stages)


@functools.lru_cache(maxsize=None)
def _processors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 under the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def weight_grad_reduction(deterministic: bool, B: int, q: int, m: int, block_b: int) -> str:
    """How the reverse kernel reduces weight gradients over the batch (mlp_step's docstring):
    "atomic" when not `deterministic`; otherwise whichever of "partials" and "workspace" moves fewer
    bytes per layer — partial rows: batch tiles × (2qm + m + q) floats (each tile adds its share into
    its persistent program's row), workspace: B × (2m + 2q) floats,
    so the workspace wins when qm / BLOCK_B > m + q (at B = 4096, q = 256, m = 512 with 16-row blocks
    it is 11× less; at q = 64, m = 128 with 64-row blocks the partial rows are 1.5× less).
    ODENETS_FAST_TRITON_WEIGHT_GRADS=partials|workspace overrides the deterministic choice."""
    if not deterministic:
        return "atomic"
    value = os.environ.get(WEIGHT_GRADS_ENV, "")
    if value:
        if value not in ("partials", "workspace"):
            raise ValueError(f"{WEIGHT_GRADS_ENV} must be 'partials' or 'workspace'; got {value!r}")
        return value
    sections = mlp_step.GradSections(q, m)
    partial_floats = triton.cdiv(B, block_b) * sum(sections.sizes)
    return "workspace" if B * sections.workspace_row < partial_floats else "partials"


def backward_layers_per_launch(grads: str, depth: int, sets: int, B: int, q: int, m: int, programs: int) -> int:
    """Layers per backward launch: `layers_per_launch(depth)`, cut (to at least one) so that one
    launch's gradient buffers fit in `grad_buffer_bytes()`. Per layer, and per Heun set of θ_n / θ_{n+1}
    gradients: partial rows, programs × (2mq + m + q) floats (and Heun's θ_stop one slot more);
    workspace, B × (2m + 2q) floats of factors plus the mq + max(m, q) of its products' partial buffer
    (times the batch ranges, used only while a launch has fewer output tiles than two per streaming
    processor) — without the latter, a small batch would fit thousands of layers into the factors,
    and the products' buffer would grow like the weight gradients with depth. The partial rows also
    stay below 2^31 floats in all."""
    size = layers_per_launch(depth)
    if grads == "atomic":
        return size
    sections = mlp_step.GradSections(q, m)
    extra = sets - 1 if grads == "partials" else 0
    if grads == "partials":
        layer_floats = programs * sum(sections.sizes)
    else:
        layer_floats = sets * max(B, 1) * sections.workspace_row + m * q + max(m, q)
    return max(1, min(size, grad_buffer_bytes() // (4 * layer_floats) - extra, planner.INT32_MAX // layer_floats - extra))


def backward(grad_out: Tensor, saved: Saved, W, V, b, c, spec: StackSpec) -> Gradients:
    """Layers L−1 … 0 with the same anchor and drift rules as `reference.backward`."""
    if _path(grad_out, W, spec) == "layered":
        return triton_layered.backward(grad_out, saved, W, V, b, c, spec)
    final, anchors, stages = saved
    B, q = final.shape
    P, m, _ = W.shape
    params, args, configs = _setup(spec, W, V, b, c, q)
    sections = mlp_step.GradSections(q, m)
    accumulators = [torch.zeros(shape, dtype=torch.float32, device=final.device)
                     for shape in (W.shape, V.shape, (P, m), (P, q))]  # fmt: skip
    present = (True, True, b is not None, c is not None)
    grads = weight_grad_reduction(spec.deterministic, B, q, m, configs.reverse.block_b)
    adjoint = spec.backward == "adjoint"
    sets = 2 if args["heun"] else 1  # Heun's layer n also has gradients of θ_{n+1}
    programs = mlp_step.reverse_programs(B, configs.reverse.block_b, _processors(final.device))
    ws_row = sections.workspace_row
    # partial rows: a launch over n layers also writes Heun's θ_stop, one slot more
    extra = sets - 1 if grads == "partials" else 0
    size = backward_layers_per_launch(grads, spec.depth, sets, B, q, m, programs)
    if grads == "partials":
        # zeros, not empty: without biases the kernels never write the db/dc entries
        partials = torch.zeros((programs, sections.row(size + extra)), dtype=torch.float32, device=final.device)
        targets = [partials[:, start:] for start in sections.partial_starts(size + extra)]
    else:
        targets = accumulators
    if grads == "workspace":
        workspace = torch.empty(sets * size * B * ws_row, dtype=torch.float32, device=final.device)
        product = product_config(W.element_size())
    state = final.clone()
    g = grad_out.to(torch.float32, copy=True).contiguous()
    drift_state = torch.zeros_like(state) if adjoint else None
    use_anchors = spec.backward == "backprop" or spec.anchor_every is not None
    for start, stop in _chunks(spec.depth, size) if B else []:
        chunk = workspace[: sets * (stop - start) * B * ws_row].view(sets, stop - start, B, ws_row) \
            if grads == "workspace" else None  # fmt: skip
        mlp_step.reverse_layers(
            state, g, params, start, stop, [t if keep else None for t, keep in zip(targets, present)],
            partials.stride(0) if grads == "partials" else 0, 0 if grads == "atomic" else start,
            reconstruct=adjoint, anchors=anchors if use_anchors else None, anchor_every=spec.anchor_interval,
            stages=stages, drift_state=drift_state if start == 0 else None, grads=grads, workspace=chunk,
            programs=programs, config=configs.reverse, **args,
        )  # fmt: skip
        if grads == "partials":
            touched = stop - start + extra
            for acc, part, section_size, keep in zip(accumulators, targets, sections.sizes, present):
                if keep:
                    mlp_step.sum_partials(part, acc.view(-1)[start * section_size :], touched * section_size)
        elif grads == "workspace":
            tiles = triton.cdiv(m, product.block_r) * triton.cdiv(q, product.block_c) * (stop - start)
            mlp_step.workspace_grads(
                chunk, [acc if keep else None for acc, keep in zip(accumulators, present)], start, params.W,
                scale_in=spec.scale_in, scale_out=spec.scale_out, precision=spec.input_precision, config=product,
                splits=mlp_step.product_splits(tiles, B, product.block_k, _processors(final.device)),
            )  # fmt: skip
    drift = relative_drift(drift_state, anchors[0]) if adjoint else None
    return in_grad_dtype(grad_out, g, *(acc if keep else None for acc, keep in zip(accumulators, present)), drift)
