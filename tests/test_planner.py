"""odenets_fast.plan: the cost model that picks the Triton backend's path, checked where its choices
are clear-cut, against the backend's own planning, and for bad input."""

import pytest
import torch

from odenets_fast import plan, planner
from odenets_fast.spec import check_stack

WIDE = dict(batch=4096, dim=256, hidden=512, depth=64)  # the layered path's goal shape (GPU issue, part 1)
NARROW = dict(batch=16384, dim=64, hidden=128, depth=256)  # the fused path's goal shape (part 2)


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv(planner.PATH_ENV, raising=False)


@pytest.mark.parametrize("device", ["H100", "H200"])
@pytest.mark.parametrize("precision", [None, "ieee"])
def test_wide_float32_picks_the_layered_path(device, precision):
    """float32 IEEE products run on CUDA cores: cuBLAS beats the fused kernels' FMA products."""
    result = plan(**WIDE, input_precision=precision, device=device)
    assert result.backend == "triton" and result.path == "layered" and result.device == device
    assert result.estimates["layered"].step_ms < result.estimates["fused"].step_ms
    assert "cuBLAS on FP32 cores" in result.reason and "Triton fma" in result.reason


@pytest.mark.parametrize("dtype, precision", [(torch.bfloat16, None), (torch.float32, "tf32")])
def test_narrow_tensor_core_stacks_pick_the_fused_path(dtype, precision):
    """Narrow states: launches and traffic dominate, and 64-row tiles put the products on wgmma."""
    result = plan(**NARROW, dtype=dtype, input_precision=precision)
    assert result.path == "fused" and "Triton wgmma" in result.estimates["fused"].products
    assert result.estimates["fused"].step.launches < result.estimates["layered"].step.launches


def test_states_wider_than_the_fused_kernels_take_the_layered_path():
    result = plan(8, 300, 16, 4)
    assert result.path == "layered" and "fused" not in result.estimates and "on-chip up to q = 256; got q = 300" in result.reason


@pytest.mark.parametrize("dim, want", [(256, "layered"), (200, "layered"), (128, "fused"), (64, "fused")])
def test_tf32x3_above_q_128_takes_the_layered_path(dim, want):
    """Three TF32 passes make the fused reverse kernel spill above q = 128 (triton 3.6: 32 registers and
    6 KiB of stack a thread); the model prices no spills, so those widths are not offered to it even
    where its estimate is lower — but the estimate is still shown, and the override still runs it."""
    shape = dict(WIDE, dim=dim)
    result = plan(**shape, input_precision="tf32x3", anchor_every=8)
    assert result.path == want and "fused" in result.estimates
    if want == "layered":
        assert "tf32x3 at q = " in result.reason and "spills" in result.reason
    for other in (dict(dtype=torch.bfloat16, input_precision="tf32x3"), dict(input_precision="tf32")):
        assert plan(**shape, **other).reason.startswith("predicted")  # 16-bit operands and TF32: the model decides


def test_the_override_is_the_plan(monkeypatch):
    monkeypatch.setenv(planner.PATH_ENV, "fused")
    assert plan(**WIDE).path == "fused" and plan(**WIDE).reason == "ODENETS_FAST_TRITON_PATH=fused"
    monkeypatch.setenv(planner.PATH_ENV, "fast")
    with pytest.raises(ValueError, match="ODENETS_FAST_TRITON_PATH must be one of"):
        plan(**WIDE)


def test_the_model_counts_what_each_mode_does():
    """Adjoint reconstructs (more products than backprop), anchors skip reconstructions, Heun
    evaluates f twice per layer; the forward is the same in every mode."""
    steps = {mode: plan(**WIDE, backward=mode).estimates["layered"] for mode in ("adjoint", "backprop")}
    anchored = plan(**WIDE, anchor_every=8).estimates["layered"]
    assert steps["backprop"].step.flops < anchored.step.flops < steps["adjoint"].step.flops
    assert steps["backprop"].forward == steps["adjoint"].forward
    euler, heun = plan(**WIDE).estimates["layered"], plan(**WIDE, method="heun").estimates["layered"]
    assert heun.forward.flops == 2 * euler.forward.flops
    # Euler forward: two products of 2·B·q·m FLOPs per layer
    assert euler.forward.flops == WIDE["depth"] * 2 * 2 * 4096 * 256 * 512


def test_the_fused_estimate_follows_the_backend_planning():
    """Tiles, weight-gradient reduction and backward launches are the backend's own choices."""
    from odenets_fast import triton_backend
    from odenets_fast.triton_kernels import mlp_step

    fused = plan(**WIDE).estimates["fused"]
    configs = mlp_step.kernel_configs(256, 512, 4, interpreted=False)
    assert fused.details["tiles"]["reverse"] == configs.reverse._asdict()
    assert fused.details["weight_grads"] == triton_backend.weight_grad_reduction(True, 4096, 256, 512,
                                                                                  configs.reverse.block_b)  # fmt: skip


@pytest.mark.parametrize("block_b, operand_bytes, precision, block_m, weight_products, want", [
    (32, 4, "ieee", 16, True, "fma"), (64, 4, "tf32", 32, False, "wgmma"), (16, 2, "ieee", 16, True, "mma"),
    (64, 2, "ieee", 64, False, "wgmma"), (32, 4, "tf32x3", 16, False, "mma"), (64, 2, "ieee", 16, True, "wgmma+mma"),
    (64, 2, "ieee", 64, True, "wgmma"),
])  # fmt: skip
def test_fused_product_instructions(block_b, operand_bytes, precision, block_m, weight_products, want):
    """The rule the fused model rests on (tests/triton_aot.py checks it against the compiled PTX)."""
    assert planner.fused_product_instruction(block_b, operand_bytes, precision, block_m, weight_products) == want


@pytest.mark.parametrize("device", [torch.device("cpu"), "cpu"])
def test_cpu_tensors_have_no_triton_plan(device):
    result = plan(**WIDE, device=device)
    assert result.backend == "cpp" and result.path is None and not result.estimates


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(batch=0), ValueError, "batch must be a positive int"),
    (dict(dtype=torch.float64), TypeError, "dtype must be float32, float16 or bfloat16"),
    (dict(device="A100"), ValueError, "device must be 'H100', 'H200' or a CUDA device"),
    (dict(method="rk4"), ValueError, "method must be one of"),
    (dict(backward="backprop", anchor_every=2), ValueError, "anchor_every is only meaningful"),
    (dict(input_precision="fp8"), ValueError, "input_precision must be one of"),
    (dict(anchor_every="auto"), ValueError, "plan: anchor_every='auto' places the stored states at run time"),
    (dict(deterministic=None), TypeError, "deterministic must be a bool; got NoneType"),
    (dict(bias="yes"), TypeError, "bias must be a bool; got str"),
    *([(dict(device="cuda:0"), ValueError, "no CUDA device is available here")] if not torch.cuda.is_available()
      else []),
])  # fmt: skip
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        plan(**{**WIDE, **kwargs})


def test_a_cpu_plan_has_no_ratio():
    with pytest.raises(ValueError, match="a plan on cpu has no predicted times"):
        plan(**WIDE, device="cpu").ratio()


@pytest.mark.parametrize("shape", [dict(batch=2**25, dim=64, hidden=128, depth=4),
                                   dict(batch=64, dim=64, hidden=128, depth=300000)])  # fmt: skip
def test_stacks_beyond_the_fused_kernels_32_bit_offsets_take_the_layered_path(shape, monkeypatch):
    """B·q or P·m·q ≥ 2^31: the layered path (int64 offsets, cuBLAS), which the backend runs, where the
    plan used to pick the fused kernels, which raise for such stacks; forcing them is the same error."""
    from odenets_fast.triton_kernels import mlp_step

    assert planner.MAX_FUSED_WIDTH == mlp_step.MAX_STATE_WIDTH
    result = plan(**shape, dtype=torch.bfloat16)
    assert result.path == "layered" and "int32" in result.reason and "fused" not in result.estimates
    monkeypatch.setenv(planner.PATH_ENV, "fused")
    with pytest.raises(ValueError, match="ODENETS_FAST_TRITON_PATH=fused, but the fused kernels index .* int32"):
        plan(**shape, dtype=torch.bfloat16)


@pytest.mark.parametrize("name, sms, model", [
    ("NVIDIA H100 80GB HBM3", 132, "H100"),
    ("NVIDIA H200", 132, "H200"),
    ("NVIDIA H100 PCIe", 114, None),  # 114 SMs and 2 TB/s: not the SXM part the table describes
    ("NVIDIA GH200 480GB", 132, None),  # not an H200
])  # fmt: skip
def test_a_live_device_is_modelled_as_a_table_entry_only_when_it_is_that_part(monkeypatch, name, sms, model):
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(name=name, multi_processor_count=sms))
    got = planner.device_model("cuda:0")
    if model is not None:
        assert got is planner.DEVICES[model]
    else:
        assert got.approximate and got.name == name and got.sms == sms


def test_printed_plan_and_command_line(capsys):
    planner.main(["4096", "256", "512", "64", "--dtype", "bfloat16", "--device", "H200"])
    out = capsys.readouterr().out
    assert out.startswith("backend 'triton', path ") and out.count("(predicted)") == 3 and "H200" in out


def test_the_backend_asks_the_planner_on_cuda_only(monkeypatch):
    """Under the interpreter (CPU tensors) there is no device to model: the fused path unless
    overridden or too wide; on CUDA, the plan's choice, but for an empty batch."""
    x, W, V = torch.zeros(4, 8), torch.zeros(2, 16, 8), torch.zeros(2, 8, 16)
    spec = check_stack(x, W, V, None, None, method="euler", activation="gelu", T=1.0, backward="adjoint",
                       anchor_every=None, scale_in=None, scale_out=None)  # fmt: skip
    assert planner.choose_path(4, 8, 16, spec, torch.float32, torch.device("cpu")) == "fused"
    assert planner.choose_path(4, 300, 16, spec, torch.float32, torch.device("cpu")) == "layered"
    # an empty batch on CUDA: nothing to model (plan rejected B = 0, so every empty CUDA call raised)
    assert planner.choose_path(0, 8, 16, spec, torch.float32, torch.device("cuda")) == "fused"
    assert planner.choose_path(0, 300, 16, spec, torch.float32, torch.device("cuda")) == "layered"
    monkeypatch.setattr(planner, "plan", lambda *args, **kwargs: type("P", (), {"path": "layered"})())
    assert planner.choose_path(4, 8, 16, spec, torch.float32, torch.device("cuda")) == "layered"


def test_a_changed_tuning_knob_is_planned_afresh(monkeypatch):
    """plan's fused estimate reads the Triton knobs (weight-gradient reduction, gradient buffer, tiles): the
    cached choice is per knob setting (a changed knob kept the path planned under the old one)."""
    x, W, V = torch.zeros(4, 8), torch.zeros(2, 16, 8), torch.zeros(2, 8, 16)
    spec = check_stack(x, W, V, None, None, method="euler", activation="gelu", T=1.0, backward="adjoint",
                       anchor_every=None, scale_in=None, scale_out=None)  # fmt: skip
    planned = []
    monkeypatch.setattr(planner, "plan", lambda *args, **kwargs: planned.append(1) or type("P", (), {"path": "fused"})())
    planner._planned_path.cache_clear()
    for reduction in ("partials", "atomic", "partials"):
        monkeypatch.setenv("ODENETS_FAST_TRITON_WEIGHT_GRADS", reduction)
        planner.choose_path(4, 8, 16, spec, torch.float32, torch.device("cuda"))
    assert len(planned) == 2  # the third setting is the first's, cached
    planner._planned_path.cache_clear()


class _Executed:
    """FLOPs of the products and kernel launches a Triton call executes under the interpreter: every tl.dot
    (fused path) or cuBLAS product (layered path) counted at the shapes it runs, every launch of the
    paths' kernels (and the 16-bit weight gradients' add_)."""

    def __init__(self, monkeypatch):
        from triton.runtime import interpreter

        from odenets_fast import triton_backend, triton_layered
        from odenets_fast.triton_kernels import layered, mlp_step

        self.flops, self.launches = 0, 0
        create_dot = interpreter.InterpreterBuilder.create_dot

        def counted_dot(builder, a, b, *rest):
            self.flops += 2 * a.data.shape[0] * a.data.shape[1] * b.data.shape[1]
            return create_dot(builder, a, b, *rest)

        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counted_dot)
        into = triton_layered._Products.into

        def counted_into(products, out, left, right):
            self.flops += 2 * left.shape[0] * left.shape[1] * right.shape[1]
            self.launches += 1
            return into(products, out, left, right)

        def counted_accumulate(products, acc, left, right, alpha, scratch):
            if products.widen:
                self.launches += 1  # the add_ after the float32-output product
                acc.add_(counted_into(products, scratch, left, right), alpha=alpha)
            else:
                acc.addmm_(left, right, alpha=alpha)
                self.flops += 2 * left.shape[0] * left.shape[1] * right.shape[1]
                self.launches += 1

        monkeypatch.setattr(triton_layered._Products, "into", counted_into)
        monkeypatch.setattr(triton_layered._Products, "accumulate", counted_accumulate)
        for module, names in ((mlp_step, ("forward_layers_kernel", "reverse_layers_kernel", "sum_partials_kernel",
                                          "workspace_grads_kernel")),
                              (layered, ("activation_kernel", "hidden_grad_kernel", "combine_kernel",
                                         "heun_cotangent_kernel"))):  # fmt: skip
            for name in names:
                monkeypatch.setattr(module, name, self._launch_counter(getattr(module, name)))
        # the GPU's tiles and SM count, which the plan models, instead of the interpreter's
        kernel_configs = mlp_step.kernel_configs
        monkeypatch.setattr(mlp_step, "kernel_configs", lambda q, m, ob, interpreted: kernel_configs(q, m, ob, False))
        monkeypatch.setattr(triton_backend, "_processors", lambda device: 132)

    def _launch_counter(self, kernel):
        executed = self

        class Counted:
            def __getitem__(self, grid):
                executed.launches += 1
                return kernel[grid]

        return Counted()


@pytest.mark.parametrize(
    "path, B, q, m, L, method, dtype, backward, anchor_every, grads, bias",
    [
        ("fused", 128, 64, 32, 2, "euler", torch.float32, "adjoint", 1, "partials", False),
        ("fused", 128, 64, 32, 2, "heun", torch.float32, "adjoint", None, "partials", False),
        ("fused", 128, 64, 32, 2, "euler", torch.float32, "adjoint", None, "workspace", True),
        ("fused", 1, 64, 32, 2, "euler", torch.float32, "backprop", None, "partials", True),  # one padded tile
        ("fused", 70, 64, 32, 3, "heun", torch.float32, "backprop", None, "atomic", False),
        ("layered", 20, 8, 16, 6, "euler", torch.float32, "adjoint", 2, None, False),
        ("layered", 20, 8, 16, 6, "heun", torch.float32, "adjoint", None, None, True),
        ("layered", 20, 8, 16, 6, "heun", torch.float32, "adjoint", 2, None, False),
        ("layered", 20, 8, 16, 5, "heun", torch.float16, "backprop", None, None, False),
        ("layered", 20, 8, 16, 4, "euler", torch.float16, "adjoint", None, None, True),
    ],
)
def test_the_plan_counts_what_the_kernels_execute(monkeypatch, path, B, q, m, L, method, dtype, backward,
                                                  anchor_every, grads, bias):  # fmt: skip
    """FLOPs and launches of the forward and of the step, as plan prices them and as the interpreter
    executes them (whole padded tiles; the fused reverse reconstructs at stored states too; Heun's
    reconstruction reuses the VJP's f): the model follows the code, not a sketch of it."""
    from odenets_fast import ode_mlp
    from odenets_fast.triton_backend import WEIGHT_GRADS_ENV

    executed = _Executed(monkeypatch)
    monkeypatch.setenv(planner.PATH_ENV, path)
    if grads in ("partials", "workspace"):
        monkeypatch.setenv(WEIGHT_GRADS_ENV, grads)
    P = L + 1 if method == "heun" else L
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, q, generator=gen).to(dtype).requires_grad_(True)
    W, V = (torch.randn(shape, generator=gen).mul(0.3).to(dtype).requires_grad_(True) for shape in ((P, m, q), (P, q, m)))
    b, c = (torch.zeros(P, n, dtype=dtype, requires_grad=True) if bias else None for n in (m, q))
    out = ode_mlp(x, W, V, b, c, method=method, backward=backward, anchor_every=anchor_every, backend="triton",
                  input_precision="ieee", deterministic=grads != "atomic")  # fmt: skip
    forward = (executed.flops, executed.launches)
    out.sum().backward()
    estimate = plan(B, q, m, L, method=method, dtype=dtype, input_precision="ieee", backward=backward,
                    anchor_every=anchor_every, bias=bias, deterministic=grads != "atomic").estimates[path]  # fmt: skip
    assert forward == (estimate.forward.flops, estimate.forward.launches)
    assert (executed.flops, executed.launches) == (estimate.step.flops, estimate.step.launches)
