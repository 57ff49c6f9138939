"""The benchmark scripts of bench/ end to end at tiny sizes: they run, print their tables and write sane JSON
and PNG files. (The full-size runs are in docs/benchmarks.md.)"""

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from bench import contenders, generic_blocks, memory, repro_gradient_error, repro_smoothness
from bench.baselines import eager_forward, residual
from bench.contenders import TORCHDIFFEQ_MISSING, Sizes, torchdiffeq_adjoint, training_loss
from helpers import make_stack, smooth_stack


def _outputs(tmp_path, name):
    (json_file,) = tmp_path.glob(f"{name}-cpu-*.json")
    png = json_file.with_suffix(".png")
    assert png.stat().st_size > 1000
    return json.loads(json_file.read_text())


@pytest.mark.parametrize("script", [memory, repro_gradient_error, repro_smoothness, generic_blocks])
def test_help(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_memory(tmp_path, capsys, monkeypatch):
    # torchdiffeq is optional; its absence is what must be handled here (it is checked below when installed)
    monkeypatch.setattr(memory, "torchdiffeq_installed", lambda: False)
    contenders = ["eager_backprop", "odenets_adjoint", "torchdiffeq_adjoint"]
    sizes = ["--batch", "4096", "--dim", "8", "--hidden", "32"]
    memory.main(["--depths", "4", "16", *sizes, "--device", "cpu", "--reps", "1", "--backend", "reference",
                 "--out", str(tmp_path), "--contenders", *contenders])  # fmt: skip
    out = capsys.readouterr().out
    results = _outputs(tmp_path, "memory")
    assert "Peak memory of a training step" in out and "Median time of a training step" in out
    measured = {(m["contender"], m["depth"]): m for m in results["measurements"]}
    assert all(m["peak_bytes"] > 0 and m["median_ms"] > 0 for m in measured.values())
    # at L = 16 eager keeps ~16 MiB of activations, adjoint a few (B, m) temporaries
    assert measured[("odenets_adjoint", 16)]["peak_bytes"] < measured[("eager_backprop", 16)]["peak_bytes"]
    assert results["ratios"]["eager_backprop_over_adjoint_peak_L16"] > 1 and results["complete"] is True
    assert set(results["load_average_1min_after_depth"]) == {"4", "16"}
    assert results["environment"]["git_dirty"] in (True, False)
    assert TORCHDIFFEQ_MISSING in out
    assert results["skipped"] == {"torchdiffeq_adjoint": TORCHDIFFEQ_MISSING}


def _output_and_gradients(forward, x, W, V, y):
    W, V = (t.detach().requires_grad_(True) for t in (W, V))
    out = forward(x, W, V)
    return out.detach(), torch.autograd.grad(training_loss(out, y), (W, V))


def test_torchdiffeq_contender_computes_the_networks_gradient():
    """odeint_adjoint on DepthIndexedField: the ResNet's output, and every layer's gradient — the first and
    the last included — within O(1/L) of exact backprop. (Indexed by round(t·L), layer 0 got no gradient
    and layer L − 1 twice its own.) L = 100, not a power of two, where the grid times do not round alike."""
    depth = 100
    x, W, V, _, _ = smooth_stack(depth, method="euler")
    y = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    exact_out, exact = _output_and_gradients(eager_forward, x, W, V, y)
    out, approx = _output_and_gradients(lambda *a: torchdiffeq_adjoint(*a, None), x, W, V, y)
    assert (out - exact_out).abs().max() < 1e-12
    for name, a, e in zip("WV", approx, exact):
        per_layer = (a - e).flatten(1).norm(dim=1) / e.flatten(1).norm(dim=1)
        assert per_layer.max() < 0.05, f"d{name}: worst layer {int(per_layer.argmax())}, error {per_layer.max():.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torchdiffeq_steps_through_the_layers_in_order(monkeypatch, dtype):
    """The forward's step n and the adjoint's backward step from t_(n+1) to t_n both use layer n, at
    depths whose grid times 1/L do not round alike forwards and backwards."""
    layers = []

    def recorded_residual(x, W, V, b, c, n, activation):
        layers.append(n)
        return residual(x, W, V, b, c, n, activation)

    monkeypatch.setattr(contenders, "residual", recorded_residual)
    for depth in (3, 12, 100, 1000):
        x, W, V, _, _ = make_stack(B=2, q=2, m=2, L=depth, dtype=dtype)
        layers.clear()
        out = torchdiffeq_adjoint(x, W.requires_grad_(True), V.requires_grad_(True), None)
        assert layers == list(range(depth))
        layers.clear()
        out.sum().backward()
        assert layers == list(reversed(range(depth))), depth


def test_memory_checks_the_torchdiffeq_contender_against_backprop():
    check = memory.torchdiffeq_check(Sizes(64, 8, 16), 16, torch.device("cpu"), None)
    assert check["max_abs_diff_vs_ode_mlp"] < 1e-5
    errors = check["gradient_relative_error_vs_backprop"]
    assert set(errors) == {"torchdiffeq_adjoint", "odenets_adjoint"}
    assert all(0 < e[k] < 0.5 for e in errors.values() for k in ("W", "V", "W_worst_layer", "V_worst_layer"))


def test_results_say_whether_the_code_measured_was_committed(tmp_path, monkeypatch):
    import subprocess

    from bench import report

    monkeypatch.setattr(report, "ROOT", tmp_path)
    assert report.git_dirty() is None  # no checkout: unknown
    (tmp_path / "code.py").write_text("x = 1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    for args in (["init", "-q"], ["add", "code.py"], ["commit", "-q", "-m", "code"]):
        subprocess.run(git + args, check=True)
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "earlier.json").write_text("{}")  # results of the same run: not code
    assert report.git_dirty() is False and report.environment(torch.device("cpu"))["git_dirty"] is False
    (tmp_path / "bench" / "new_benchmark.py").write_text("x = 1\n")  # an uncommitted script measured
    assert report.git_dirty() is True
    (tmp_path / "bench" / "new_benchmark.py").unlink()
    (tmp_path / "code.py").write_text("x = 2\n")
    assert report.git_dirty() is True


def test_repro_gradient_error(tmp_path):
    repro_gradient_error.main(["--min-depth", "4", "--max-depth", "32", "--out", str(tmp_path)])
    results = _outputs(tmp_path, "gradient-error")
    assert results["config"]["depths"] == [4, 8, 16, 32]
    assert all(results["heun_below_euler_at_every_depth"].values())
    slopes = results["loglog_slope"]
    assert -1.3 < slopes["euler"]["W"] < -0.7
    assert slopes["heun"]["W"] < -1.7


def test_repro_smoothness(tmp_path):
    repro_smoothness.main(["--min-depth", "2", "--max-depth", "4", "--steps", "3", "--out", str(tmp_path)])
    results = _outputs(tmp_path, "smoothness")
    runs = results["runs"]
    assert set(runs) == {"gelu-tied", "relu-tied", "gelu-iid"}
    assert all(math.isfinite(r["loss_end"]) for rs in runs.values() for r in rs)
    # tied weights start equal and move little in 3 steps; i.i.d. ones differ by O(1) from the start
    assert all(t["smoothness_W"] < 0.1 * i["smoothness_W"] for t, i in zip(runs["gelu-tied"], runs["gelu-iid"]))


def test_conv_example(tmp_path, capsys):
    from bench import conv_example

    results = conv_example.main(["--depths", "3", "--steps", "1", "--batch", "8", "--out", str(tmp_path)])
    assert "adjoint grad. error" in capsys.readouterr().out
    (json_file,) = tmp_path.glob("conv-example-cpu-*.json")
    row = json.loads(json_file.read_text())["depths"]["3"]
    assert row == json.loads(json.dumps(results["depths"]["3"]))
    assert row["backprop"]["peak_bytes"] > 0 and row["adjoint"]["peak_bytes"] > 0
    assert 0 < row["adjoint_gradient_error"] < 0.5  # an approximation, not a different gradient


def test_generic_blocks(tmp_path, capsys):
    results = generic_blocks.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Time × backprop" in out and "Gradient error against depth" in out
    assert json.loads(next(tmp_path.glob("generic-blocks-cpu-*.json")).read_text())["goals"] == json.loads(
        json.dumps(results["goals"]))
    assert next(tmp_path.glob("generic-blocks-cpu-*.png")).stat().st_size > 1000
    row = results["depths"]["4"]
    for clock in ("cpu", "wall"):
        ratios = row["time_over_backprop"][clock]
        assert set(ratios) == set(generic_blocks.CONTENDERS) and ratios["backprop"] == 1.0
        assert all(r > 0 for r in ratios.values())
    # the goals' time ratios are medians of per-round ratios, not ratios of medians
    assert results["goals"]["adjoint_over_minimal_time"]["4"] == row["time_over_minimal_adjoint"]["cpu"]["adjoint"]
    assert row["time_over_checkpoint_sqrtL"]["cpu"]["checkpoint_sqrtL"] == 1.0
    errors = row["gradient_error"]
    assert errors["backprop"] == 0 and errors["checkpoint_sqrtL"] < 1e-5
    # memcnn, the stand-in for the paper's code and the stack's default compute the same but for rounding
    assert errors["minimal_adjoint"] > 0 and errors["adjoint_vjp_reconstruction"] > 0
    assert errors["adjoint_vjp_extrapolated"] > 0
    for contender in ("memcnn", "adjoint"):
        assert errors[contender] == pytest.approx(errors["minimal_adjoint"], rel=1e-3)
    sweep = results["gradient_error_vs_depth"]
    assert set(sweep) == {"conv, Euler", "conv tied, Euler", "MLP smooth, Euler", "MLP smooth, Heun",
                          "MLP iid, Euler", "MLP iid, Heun"}  # fmt: skip
    assert set(sweep["MLP smooth, Euler"]["ratio"]) == {"reconstruction", "extrapolated"}
    assert set(sweep["MLP smooth, Heun"]["ratio"]) == {"reconstruction"}  # extrapolation is Euler's
    worst = results["goals"]["worst_over_state_gradient_error_vs_depth"]
    assert worst["conv tied, Euler"]["extrapolated"] == max(sweep["conv tied, Euler"]["ratio"]["extrapolated"])


def test_generic_blocks_memory_worker_measures_the_adjoint_peak_flat_in_depth():
    """The full run measures each configuration's memory in a fresh process (--quick does not). The
    parameter gradients it subtracts must have been counted: held in memory of their own, the adjoint's
    peak is about the same at L = 4 and 64 (2.8–3.1 MiB at L = 4; 2.9–3.8 MiB at L = 64, where
    thousands of small blocks leave the RSS more room to vary) — reusing the freed warm-up gradients'
    blocks, it fell to 1.4 MiB at L = 64."""
    shallow, deep = (generic_blocks.measure_peak("adjoint", depth, 32, 1) for depth in (4, 64))
    assert 0.8 < deep / shallow < 1.5, (shallow, deep)


def test_dispatch_overhead(capsys, tmp_path):
    from bench import dispatch_overhead

    result = dispatch_overhead.main(["--calls", "50", "--out", str(tmp_path)])
    assert "custom_op_minus_plain_function" in capsys.readouterr().out
    assert set(result["median_us"]) == {"custom_op", "ode_mlp", "plain_function"}
    assert all(v > 0 for v in result["median_us"].values())
    (json_file,) = tmp_path.glob("dispatch-overhead-cpu-*.json")
    assert json.loads(json_file.read_text())["overhead_us"] == result["overhead_us"]


def test_cpu_training_step(tmp_path, capsys):
    from bench import cpu_training_step

    threads = torch.get_num_threads()
    try:
        result = cpu_training_step.main(["--reps", "1", "--warmup", "0", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # the benchmark's 2 threads must not carry into other tests
    assert "cpp_adjoint_step_vs_eager_backprop" in capsys.readouterr().out
    (json_file,) = tmp_path.glob("training-step-cpu-*.json")
    saved = json.loads(json_file.read_text())
    assert saved["ratios"] == result["ratios"] and saved["environment"]["torch_threads"] == 2
    assert set(saved["median_ms"]) == {"eager_backprop", "reference_adjoint", "cpp_adjoint", "cpp_backprop"}
    assert all(ms > 0 for ms in saved["median_ms"].values())


def test_memory_keeps_the_depths_measured_before_a_failure(tmp_path, monkeypatch):
    """A GPU call cut short (or a depth that runs out of memory) still leaves the shallower depths."""

    def peak(name, sizes, depth, device, backend):
        if depth == 3:
            raise RuntimeError("CUDA out of memory")
        return 1

    monkeypatch.setattr(memory, "measure_peak_bytes", peak)
    args = ["--depths", "2", "3", "--batch", "8", "--dim", "4", "--hidden", "8", "--device", "cpu", "--reps", "1",
            "--backend", "reference", "--out", str(tmp_path), "--contenders", "eager_backprop", "odenets_adjoint"]
    with pytest.raises(RuntimeError, match="out of memory"):
        memory.main(args)
    (json_file,) = tmp_path.glob("memory-cpu-*.json")
    results = json.loads(json_file.read_text())
    assert results["complete"] is False
    assert {(m["contender"], m["depth"]) for m in results["measurements"]} == {("eager_backprop", 2), ("odenets_adjoint", 2)}


def test_memory_starts_no_depth_after_its_deadline(tmp_path, monkeypatch):
    """The GPU memory step inside a time-limited call: the depths measured before the deadline keep
    their JSON, plot and ratios; later depths do not start."""
    import time

    deadline = time.time() + 3.0
    timed = memory.steps_ms

    def steps_ms_then_wait(*args):  # the first depth ends past the deadline
        result = timed(*args)
        time.sleep(max(0.0, deadline - time.time()))
        return result

    monkeypatch.setattr(memory, "steps_ms", steps_ms_then_wait)
    args = ["--depths", "2", "3", "--batch", "8", "--dim", "4", "--hidden", "8", "--device", "cpu", "--reps", "1",
            "--backend", "reference", "--out", str(tmp_path), "--contenders", "eager_backprop", "odenets_adjoint"]
    results = memory.main(args, deadline=deadline)
    assert results["complete"] is False
    assert {m["depth"] for m in results["measurements"]} == {2} and "eager_backprop_over_adjoint_peak_L2" in results["ratios"]
    assert len(list(tmp_path.glob("memory-cpu-*.png"))) == 1


def test_error_control_benchmark_runs(tmp_path):
    from bench import error_control

    report = error_control.main(["--steps", "2", "--depth", "8", "--conv-depth", "2", "--out", str(tmp_path)])
    for kind in ("rough-mlp", "smooth-mlp", "conv"):
        modes = report["results"][kind]
        assert modes["backprop"]["median_gradient_error"] == 0.0 and modes["adjoint"]["median_gradient_error"] > 0
        assert modes["adjoint"]["activation_bytes"] < modes["backprop"]["activation_bytes"]
        assert modes["auto"]["anchors"][0] == 1 and len(modes["auto strict"]["gradient_error"]) == 2
    assert all(r["min"] <= r["median"] <= r["max"] for r in report["relation"].values())
    assert len(list(tmp_path.glob("error-control-cpu-*.png"))) == 1


# Each test writes it under a name of its own: pytest.main runs in this process, where a module name
# imported once stays taken.
SAMPLE_TESTS = "def test_passes():\n    pass\n\ndef test_fails():\n    assert False\n"


def test_gpu_quick_dry_run_writes_one_report(tmp_path, monkeypatch):
    """`make gpu-quick`'s run on the interpreter: one JSON and markdown report with the environment,
    the commit from ODENETS_FAST_COMMIT (the GPU machine's tree has no .git), the tests' counts, and
    the goal configuration's times and goal ratios with the planner's predictions beside them."""
    from bench import gpu_suite, triton_step

    (tmp_path / "test_quick_sample.py").write_text(SAMPLE_TESTS)
    monkeypatch.setattr(gpu_suite, "DRY_RUN_TESTS", tmp_path / "test_quick_sample.py")
    monkeypatch.setenv("ODENETS_FAST_COMMIT", "c0ffee")
    gpu_suite.main(["--dry-run", "--budget-s", "600", "--out", str(tmp_path / "out")])
    (json_file,) = (tmp_path / "out").glob("gpu-suite-cpu-*.json")
    report = json.loads(json_file.read_text())
    assert {"device", "torch", "triton", "date", "dry_run", "tests", "benchmarks"} <= set(report)
    assert report["commit"] == "c0ffee" and report["dry_run"] is True
    assert (report["tests"]["passed"], report["tests"]["failed"]) == (1, 1)
    assert report["tests"]["failures"][0].endswith("test_quick_sample.py::test_fails")
    (goal,) = report["benchmarks"]["goals"]
    assert goal["config"] == triton_step.DRY_RUN_CONFIGS[0] and not goal["errors"]
    contenders = set(triton_step.goal_contenders(goal["config"]))
    assert set(goal["median_ms"]) == contenders and all(goal["median_ms"].values())
    assert {"layered_adjoint_step_vs_eager_backprop", "whole_depth_forward_vs_eager_forward"} <= set(goal["ratios"])
    assert set(goal["predicted"]["median_ms"]) == contenders
    assert set(goal["wall_ms"]) == contenders and set(goal["wall_ratios"]) == set(goal["ratios"]) - {
        "forward_fraction_of_roofline", "layered_forward_fraction_of_roofline"}  # fmt: skip
    assert {g["ratio"] for g in report["goals"]} == {ratio for ratio, _, _ in triton_step.GOALS}
    assert report["not_started"] == [] and report["errors"] == {}
    markdown = json_file.with_suffix(".md").read_text()
    assert "1 passed, 1 failed" in markdown and "layered adjoint/eager" in markdown and "predicted ms" in markdown


def test_every_goal_is_measured_by_its_configuration_s_contenders():
    """Checked here, since only a GPU runs the goal configurations: each goal of the issues names a goal
    configuration, carries that configuration's suffix, and is a ratio of contenders the goals mode times
    for it (or the roofline fraction of one); goal_outcomes reads the value and compares it to the limit."""
    from bench import triton_step

    configs = {config["name"]: config for config in triton_step.GOAL_CONFIGS}
    fractions = {"forward_fraction_of_roofline": "fused_forward", "layered_forward_fraction_of_roofline": "layered_forward"}
    for ratio, name, _ in triton_step.GOALS:
        config = configs[name]
        suffix = triton_step.goal_suffix(config)
        assert ratio.endswith(suffix) and ratio[: len(ratio) - len(suffix)] in triton_step.GOAL_RATIOS
        base = ratio[: len(ratio) - len(suffix)]
        needed = {fractions[base]} if base in fractions else set(triton_step.RATIOS[base])
        assert needed <= set(triton_step.goal_contenders(config)), (ratio, name)
    results = [{"name": "wide-float32", "ratios": {"layered_adjoint_step_vs_eager_backprop": 1.4}},
               {"name": "wide-bfloat16", "ratios": {"layered_adjoint_step_vs_eager_backprop_bf16": 0.9}}]  # fmt: skip
    outcomes = {(g["ratio"], g["config"]): g for g in triton_step.goal_outcomes(results)}
    assert outcomes["layered_adjoint_step_vs_eager_backprop", "wide-float32"]["met"] is False
    assert outcomes["layered_adjoint_step_vs_eager_backprop_bf16", "wide-bfloat16"]["met"] is True
    assert outcomes["whole_depth_forward_vs_eager_forward_bf16", "narrow-bfloat16-L256"]["value"] is None


def test_gpu_suite_starts_nothing_after_its_budget(tmp_path):
    from bench import gpu_suite

    report = gpu_suite.main(["--dry-run", "--budget-s", "0", "--out", str(tmp_path)])
    assert report["not_started"] == ["tests", "goals"] and report["tests"] == {} and report["benchmarks"] == {}
    (json_file,) = tmp_path.glob("gpu-suite-cpu-*.json")
    assert json.loads(json_file.read_text())["not_started"] == ["tests", "goals"]


def test_gpu_quick_fits_one_device_call():
    """`make gpu-quick`'s budget leaves room in a 420 s call for the install and CUDA start-up, and
    its accuracy tests leave part of it to the goal configurations."""
    from bench import gpu_suite

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    budget = float(re.search(r"^QUICK_BUDGET \?= (\d+)$", makefile, re.M).group(1))
    assert "--run quick --budget-s $(QUICK_BUDGET)" in makefile
    assert gpu_suite.QUICK_TESTS_S < budget <= 420 - 60


def test_gpu_tests_collect_on_a_cpu_machine():
    """A renamed or moved name in the package must not first show as an import or collection error on the
    scarce GPU run: tests/gpu is collected here (imports, parametrisations) without its CUDA check (its
    conftest), and the sanitizer's script is imported."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(["tests", "tests/gpu"])}
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "--noconftest",
                                "-p", "no:cacheprovider", "tests/gpu"], cwd=root, env=env, capture_output=True,
                               text=True)  # fmt: skip
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    assert int(re.search(r"^(\d+) tests? collected", collected.stdout, re.M).group(1)) >= 100
    imported = subprocess.run([sys.executable, "-c", "import sanitize_case"], cwd=root, env=env, capture_output=True,
                              text=True)  # fmt: skip
    assert imported.returncode == 0, imported.stderr[-3000:]


def test_gpu_test_counts_are_saved_after_every_test(tmp_path):
    """A run cut off by the device's time limit still leaves the counts it reached; a module that no
    longer imports counts as a failure, not as a clean run."""
    from bench import gpu_suite

    (tmp_path / "test_counts_sample.py").write_text(SAMPLE_TESTS)
    (tmp_path / "test_broken.py").write_text("import module_that_does_not_exist\n")
    seen = []
    final = gpu_suite.run_tests(tmp_path, lambda counts: seen.append((counts["passed"], counts["failed"])))
    assert seen == [(1, 1), (1, 2)]  # the broken module's failure is counted at collection
    assert (final["passed"], final["failed"], final["pytest_exit_code"]) == (1, 2, 1)
    assert [f.rsplit("/", 1)[-1] for f in final["failures"]] == ["test_broken.py (collection error)",
                                                                 "test_counts_sample.py::test_fails"]  # fmt: skip


def test_gpu_tests_past_the_deadline_are_not_started(tmp_path):
    """A test not started by the deadline is skipped by bench.deadline_plugin and counted as not started."""
    import time

    from bench import gpu_suite

    (tmp_path / "test_deadline_sample.py").write_text("import time\n\ndef test_slow():\n    time.sleep(1.5)\n\n"
                                                      "def test_late():\n    pass\n")  # fmt: skip
    final = gpu_suite.run_tests(tmp_path, lambda counts: None, deadline=time.time() + 1.0)
    assert (final["passed"], final["failed"], final["skipped"], final["not_started"]) == (1, 0, 0, 1)
    assert gpu_suite.DEADLINE_ENV not in os.environ  # set for the run only


def test_gpu_full_dry_run_records_a_failing_step_and_runs_the_next(tmp_path, monkeypatch):
    """`make gpu`'s run on the interpreter, its bench step raising: the error is in the report, and
    the crossover and tune steps still run and report their tables."""
    from bench import gpu_suite, triton_step

    real = triton_step.run_all

    def bench_fails(dry_run=False, mode="bench", **kwargs):
        if mode == "bench":
            raise KeyError("a bug in the bench step")
        return real(dry_run=dry_run, mode=mode, **kwargs)

    monkeypatch.setattr(triton_step, "run_all", bench_fails)
    (tmp_path / "test_full_sample.py").write_text(SAMPLE_TESTS)
    monkeypatch.setattr(gpu_suite, "DRY_RUN_TESTS", tmp_path / "test_full_sample.py")
    report = gpu_suite.main(["--dry-run", "--run", "full", "--out", str(tmp_path)])
    assert report["errors"] == {"bench": "KeyError: 'a bug in the bench step'"}
    assert list(report["benchmarks"]) == ["crossover", "tune"]
    (crossover,) = report["benchmarks"]["crossover"]
    assert {"whole_depth_forward_vs_per_layer", "whole_depth_adjoint_step_vs_per_layer"} <= set(crossover["ratios"])
    (tune,) = report["benchmarks"]["tune"]
    assert all(tune["best"][kind] in tune["tiles_ms"][kind] for kind in ("forward", "reverse", "product"))
    assert (report["tests"]["passed"], report["tests"]["failed"]) == (1, 1)
    markdown = next(tmp_path.glob("gpu-suite-*.md")).read_text()
    assert "**bench failed**: KeyError" in markdown and "fwd whole/per-layer" in markdown and "fastest" in markdown


def test_benchmark_configuration_errors_are_recorded_not_raised(monkeypatch):
    from bench import triton_step

    def fail(config, device, only):
        raise RuntimeError("out of resources")

    monkeypatch.setattr(triton_step, "run_config", fail)
    seen = []
    results = triton_step.run_all(dry_run=True, on_result=lambda r: seen.append(len(r)))
    assert results == [{**results[0], "error": "RuntimeError: out of resources"}] and seen == [1]
    assert "error: RuntimeError: out of resources" in triton_step.markdown_table(results)


def test_a_failing_contender_keeps_the_others_times(monkeypatch):
    """One contender failing on the GPU (a precision that does not compile) must not cost the
    configuration's other times and ratios."""
    from bench import triton_step

    real = triton_step.ode_mlp

    def tf32x3_fails(*args, input_precision="ieee", **kw):
        if input_precision == "tf32x3":
            raise RuntimeError("PassManager::run failed")
        return real(*args, input_precision=input_precision, **kw)

    monkeypatch.setattr(triton_step, "ode_mlp", tf32x3_fails)
    (result,) = triton_step.run_all(dry_run=True)
    assert result["errors"] == {"fused_adjoint_step_tf32x3": "RuntimeError: PassManager::run failed"}
    assert "fused_adjoint_step_tf32x3" not in result["median_ms"] and "fused_adjoint_step_tf32" in result["median_ms"]
    assert {"adjoint_step_vs_eager_backprop", "adjoint_step_tf32_vs_eager_backprop_tf32"} <= set(result["ratios"])
    assert "adjoint_step_tf32x3_vs_eager_backprop" not in result["ratios"]
    assert "fused_adjoint_step_tf32x3: RuntimeError: PassManager::run failed" in triton_step.markdown_table([result])


def test_configurations_past_the_deadline_are_not_started():
    import time

    from bench import triton_step

    (result,) = triton_step.run_all(dry_run=True, deadline=time.time() - 1)
    assert result["error"] == "not started: the time budget (--budget-s) was spent" and "median_ms" not in result


def test_every_tuned_configuration_has_tile_candidates_led_by_the_tables_tiles():
    from bench import triton_step
    from odenets_fast.triton_kernels import mlp_step

    for config in triton_step.TUNE_CONFIGS:
        candidates = triton_step.tune_candidates(config, dry_run=False)
        itemsize = torch.empty(0, dtype=getattr(torch, config["dtype"])).element_size()
        table = mlp_step.kernel_configs(config["q"], config["m"], itemsize, interpreted=False)
        for kind, tiles in zip(("forward", "reverse"), table):
            assert candidates[kind][0] == (tiles.block_b, tiles.block_m, tiles.num_warps), (config["name"], kind)
        assert candidates["product"][0] == tuple(mlp_step.product_config(itemsize, interpreted=False))


def test_mnist1d_quick(tmp_path, monkeypatch):
    """Every model and backward mode trains on the real MNIST-1D split, generated offline: no network, no
    file outside the output folder; backprop learns, and adjoint memory is flat in depth."""
    import socket

    from bench import mnist1d

    def no_network(*args, **kwargs):
        raise AssertionError("bench.mnist1d tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    working_dir = tmp_path / "cwd"
    working_dir.mkdir()
    monkeypatch.chdir(working_dir)
    threads = torch.get_num_threads()
    mnist1d.main(["--quick", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # the one-thread policy ends with the run
    assert not any(working_dir.iterdir())
    report = _outputs(tmp_path, "mnist1d")
    assert report["data"] == {"train": 4000, "test": 1000, "length": 40, "classes": 10}
    results = report["results"]
    modes = {"backprop", "adjoint", "heun", "anchors √L", "auto"}
    assert {kind: set(per_depth) for kind, per_depth in results.items()} == {"mlp": {"2", "4"}, "conv": {"2"}, "rough-mlp": {"2"}}
    assert set(results["mlp"]["4"]["summary"]) == modes and set(results["rough-mlp"]["2"]["summary"]) == modes | {"auto strict"}
    assert set(results["conv"]["2"]["summary"]) == modes | {"extrapolated"}
    for kind, per_depth in results.items():
        for depth, result in per_depth.items():
            (seed,) = result["seeds"]
            assert all(0 <= run["test_accuracy"] <= 1 for run in seed.values())
            assert set(seed["backprop"]["gradient_error"].values()) == {0.0}
            if kind != "rough-mlp":  # one epoch lifts backprop well above chance (10 %)
                assert seed["backprop"]["test_accuracy"] > 0.2, (kind, depth)
    memory = {(name, depth): r["summary"][name]["activation_bytes"] for depth, r in results["mlp"].items() for name in modes}
    for name in ("adjoint", "heun"):
        assert memory[(name, "2")] == memory[(name, "4")] < memory[("backprop", "2")] < memory[("backprop", "4")]
    for depth in ("2", "4"):  # after training the residuals are non-zero: the adjoint gradient is approximate
        errors = {name: results["mlp"][depth]["summary"][name]["final_gradient_error"] for name in ("adjoint", "heun")}
        assert 0 < errors["heun"] < errors["adjoint"] < 0.1, errors
