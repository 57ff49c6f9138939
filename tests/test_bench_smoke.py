"""The benchmark scripts of bench/ end to end at tiny sizes: they run, print their tables and write sane JSON
and PNG files. (The full-size runs are in the README's Benchmarks section.)"""

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from bench import contenders, memory, repro_gradient_error, repro_smoothness
from bench.baselines import eager_forward, residual
from bench.contenders import TORCHDIFFEQ_MISSING, Sizes, torchdiffeq_adjoint, training_loss
from helpers import make_stack, smooth_stack


def _outputs(tmp_path, name):
    (json_file,) = tmp_path.glob(f"{name}-cpu-*.json")
    png = json_file.with_suffix(".png")
    assert png.stat().st_size > 1000
    return json.loads(json_file.read_text())


@pytest.mark.parametrize("script", [memory, repro_gradient_error, repro_smoothness])
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
    (tmp_path / "results.json").write_text("{}")  # untracked files are not the code measured
    assert report.git_dirty() is False and report.environment(torch.device("cpu"))["git_dirty"] is False
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


def test_dispatch_overhead(capsys, tmp_path):
    from bench import dispatch_overhead

    result = dispatch_overhead.main(["--calls", "50", "--out", str(tmp_path)])
    assert "custom_op_minus_plain_function" in capsys.readouterr().out
    assert set(result["median_us"]) == {"custom_op", "ode_mlp", "plain_function"}
    assert all(v > 0 for v in result["median_us"].values())
    (json_file,) = tmp_path.glob("dispatch-overhead-cpu-*.json")
    assert json.loads(json_file.read_text())["overhead_us"] == result["overhead_us"]


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


def test_memory_starts_no_depth_after_its_deadline(tmp_path):
    """The GPU memory stage inside a time-limited call: the depths measured before the deadline keep
    their JSON (reported after each depth), plot and ratios; later depths do not start."""
    import time

    deadline = time.time() + 3.0
    seen = []

    def on_depth(results):  # the first depth ends past the deadline
        seen.append([m["depth"] for m in results["measurements"]])
        time.sleep(max(0.0, deadline - time.time()))

    args = ["--depths", "2", "3", "--batch", "8", "--dim", "4", "--hidden", "8", "--device", "cpu", "--reps", "1",
            "--backend", "reference", "--out", str(tmp_path), "--contenders", "eager_backprop", "odenets_adjoint"]
    results = memory.main(args, deadline=deadline, on_depth=on_depth)
    assert seen == [[2, 2]] and results["complete"] is False
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


def test_gpu_suite_dry_run(tmp_path):
    # The GPU run happens only where a session is lent a GPU, with little device time: check its
    # plumbing here, on the interpreter at tiny sizes — the results file, the issues' ratio names,
    # stages spread over two calls and combined into one report afterwards.
    from bench import gpu_suite

    gpu_suite.main(["--dry-run", "--stages", "bench", "--out", str(tmp_path / "first")])
    gpu_suite.main(["--dry-run", "--stages", "crossover,tune,micro", "--out", str(tmp_path / "second")])
    (first,) = (tmp_path / "first").glob("gpu-suite-cpu-*.json")
    (second,) = (tmp_path / "second").glob("gpu-suite-cpu-*.json")
    assert json.loads(second.read_text())["benchmarks"] == []  # each call's report holds its own stages
    gpu_suite.main(["--combine", str(first), str(second), "--out", str(tmp_path)])
    (json_file,) = tmp_path.glob("gpu-suite-cpu-*.json")
    results = json.loads(json_file.read_text())
    assert [part["stages_run"] for part in results["combined_from"]] == [["bench"], ["crossover", "micro", "tune"]]
    assert {"device", "commit", "torch", "triton", "date", "tests", "benchmarks"} <= set(results)
    assert results["dry_run"] is True and {"passed", "failed"} <= set(results["tests"])
    assert results["stages_run"] == ["bench", "crossover", "micro", "tune"]
    assert list(results["stage_seconds"]) == results["stages_run"] and all(results["stage_seconds"].values())
    micro = results["micro"]
    assert micro["ran"] and micro["exit_code"] == 0, micro
    (benchmark,) = json.loads((tmp_path / micro["file"]).read_text())["benchmarks"]  # copied by --combine
    assert benchmark["group"].startswith("step L=16 q=16") and benchmark["stats"]["median"] > 0
    (bench,) = results["benchmarks"]
    assert {"adjoint_step_vs_eager_backprop", "forward_vs_eager_forward"} <= set(bench["ratios"])
    assert all(t > 0 for t in bench["median_ms"].values())
    (crossover,) = results["crossover"]
    graphed = {name for name in gpu_suite.triton_step.CROSSOVER_CONTENDERS if name.endswith("_graphed")}  # CUDA only
    assert graphed and set(crossover["median_ms"]) == set(gpu_suite.triton_step.CROSSOVER_CONTENDERS) - graphed
    assert {"whole_depth_forward_vs_per_layer", "whole_depth_adjoint_step_vs_per_layer"} <= set(crossover["ratios"])
    (tune,) = results["tune"]
    for kind in ("forward", "reverse", "product"):
        assert all(isinstance(ms, float) and ms > 0 for ms in tune["tiles_ms"][kind].values())
        assert tune["best"][kind] in tune["tiles_ms"][kind]
    report = json_file.with_suffix(".md").read_text()
    assert "Whole-depth against per-layer" in report and "Tile candidates" in report


def test_gpu_suite_quick_stage_dry_run(tmp_path):
    """`make gpu-quick`'s stages on the interpreter: the goal configurations with the goal contenders
    only (both paths and eager), the planner's predictions beside them, then the bench stage adds
    the other contenders; nothing left undone of what was selected."""
    from bench import gpu_suite

    report = gpu_suite.main(["--dry-run", "--stages", "quick", "--out", str(tmp_path / "quick")])
    (goal,) = report["benchmarks"]
    assert set(goal["median_ms"]) == set(gpu_suite.triton_step.GOAL_CONTENDERS) and not goal["errors"]
    assert {"layered_adjoint_step_vs_eager_backprop", "whole_depth_adjoint_step_vs_eager_backprop"} <= set(goal["ratios"])
    assert set(goal["predicted"]["median_ms"]) == set(gpu_suite.triton_step.GOAL_CONTENDERS)
    assert report["stages_run"] == ["quick"] and "quick" not in report["unfinished"]
    report = gpu_suite.main(["--dry-run", "--stages", "quick,bench", "--out", str(tmp_path / "both")])
    (bench,) = report["benchmarks"]  # one configuration: bench's fuller result replaces quick's
    assert set(gpu_suite.triton_step.GOAL_CONTENDERS) < set(bench["median_ms"]) and report["unfinished"] == []
    assert "layered adjoint/eager" in next((tmp_path / "both").glob("*.md")).read_text()


def test_gpu_quick_fits_one_device_call():
    """The schedule of `make gpu-quick`: the quick stage (its accuracy tests capped inside it) ends
    within the run's budget with time left for other benchmarks, and the budget leaves room in a
    420 s call for the install and CUDA start-up."""
    from bench import gpu_suite

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    budget = float(re.search(r"^QUICK_BUDGET \?= (\d+)$", makefile, re.M).group(1))
    assert "gpu-quick:\n\t$(MAKE) gpu STAGES=quick,bench BUDGET=$(QUICK_BUDGET)" in makefile
    assert gpu_suite.QUICK_TESTS_CAP_S < gpu_suite.STAGE_CAPS_S["quick"] < budget <= 420 - 60
    assert gpu_suite.STAGES[0] == "quick"


def test_gpu_suite_combines_only_reports_of_one_commit_and_device(tmp_path):
    from bench import gpu_suite

    base = {"commit": "a" * 40, "device": "NVIDIA H100", "torch": "2.11", "triton": "3.6", "dry_run": False,
            "date": "2026-11-25T12:00:00+00:00", **gpu_suite.NOT_RUN}
    tests = {"passed": 40, "failed": 1, "skipped": 0, "failures": ["t"], "complete": False}  # cut off: still kept
    first, second, other = (tmp_path / name for name in ("first.json", "second.json", "other.json"))
    first.write_text(json.dumps({**base, "stages_run": [], "tests": tests}))
    wide = {"name": "wide", "config": dict(B=8, q=4, m=8, L=2), "median_ms": {"eager_forward": 1.0}, "ratios": {}}
    second.write_text(json.dumps({**base, "stages_run": ["bench"], "benchmarks": [wide]}))
    other.write_text(json.dumps({**base, "commit": "b" * 40}))
    combined = gpu_suite.main(["--combine", str(first), str(second), "--out", str(tmp_path / "out")])
    assert combined["tests"] == tests and combined["benchmarks"] == [wide]
    assert combined["stages_run"] == ["bench"] and combined["memory"] == gpu_suite.NOT_RUN["memory"]
    assert "Combined from 2 calls" in (tmp_path / "out" / "first.md").read_text()
    with pytest.raises(SystemExit, match="has commit"):
        gpu_suite.main(["--combine", str(first), str(other), "--out", str(tmp_path)])


def test_combined_calls_keep_each_configuration_measured_and_say_what_is_left(tmp_path):
    """Call 1 ran out of budget after one bench configuration; call 2 ran bench again and was cut
    off after another: the combined report has both, and lists the stages still to run."""
    from bench import gpu_suite

    base = {"commit": "a" * 40, "device": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "dry_run": False,
            "date": "2026-11-30T12:00:00+00:00", **gpu_suite.NOT_RUN}
    config = dict(B=8, q=4, m=8, L=2)
    done = lambda name: {"name": name, "config": config, "median_ms": {"eager_forward": 1.0}, "ratios": {}}  # noqa: E731
    late = lambda name: {"name": name, "config": config, "error": "not started: the time budget was spent"}  # noqa: E731
    tests = {"passed": 118, "failed": 0, "skipped": 0, "not_started": 0, "failures": [], "complete": True}
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps({**base, "stages_run": ["tests", "bench"], "tests": tests,
                                 "benchmarks": [done("wide"), late("narrow"), late("deep")]}))  # fmt: skip
    second.write_text(json.dumps({**base, "stages_run": ["bench"], "benchmarks": [late("wide"), done("narrow"), late("deep")]}))
    combined = gpu_suite.main(["--combine", str(first), str(second), "--out", str(tmp_path / "out")])
    assert combined["benchmarks"] == [done("wide"), done("narrow"), late("deep")]
    # quick: its goal configurations (wide-float32, …) are not among those measured
    assert combined["unfinished"] == ["quick", "bench", "sanitizer", "memory", "crossover", "micro", "tune"]
    assert "left undone: quick, bench, sanitizer" in (tmp_path / "out" / "first.md").read_text()
    report = {**base, "stages_run": ["tests", "bench"], "tests": tests, "benchmarks": [done("wide")]}
    assert gpu_suite.unfinished_stages(report, ["tests", "bench", "memory"]) == ["memory"]
    assert gpu_suite.unfinished_stages({**report, "tests": {**tests, "complete": False}}, ["tests"]) == ["tests"]


def test_benchmark_configuration_errors_are_recorded_not_raised(monkeypatch):
    from bench import triton_step

    def fail(config, device, only):
        raise RuntimeError("out of resources")

    monkeypatch.setattr(triton_step, "run_config", fail)
    seen = []
    results = triton_step.run_all(dry_run=True, on_result=lambda r: seen.append(len(r)))
    assert results == [{**results[0], "error": "RuntimeError: out of resources"}] and seen == [1]
    assert "error: RuntimeError: out of resources" in triton_step.markdown_table(results)


def test_gpu_test_counts_are_saved_after_every_test(tmp_path):
    """A tests stage cut off by the device's time limit still leaves the counts it reached."""
    from bench import gpu_suite

    (tmp_path / "test_sample.py").write_text("def test_a():\n    pass\n\ndef test_b():\n    assert False\n")
    seen = []
    final = gpu_suite.run_tests(on_change=seen.append, path=tmp_path)
    assert [(c["passed"], c["failed"], c["complete"]) for c in seen] == [(1, 0, False), (1, 1, False)]
    assert final["passed"] == 1 and final["failed"] == 1 and final["complete"] is True
    assert len(final["failures"]) == 1 and final["failures"][0].endswith("test_sample.py::test_b")


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
    assert {"adjoint_step_vs_eager_backprop", "adjoint_step_tf32_vs_eager_backprop"} <= set(result["ratios"])
    assert "adjoint_step_tf32x3_vs_eager_backprop" not in result["ratios"]
    assert "fused_adjoint_step_tf32x3: RuntimeError: PassManager::run failed" in triton_step.markdown_table([result])


def test_micro_benchmarks_past_the_deadline_are_skipped_not_killed(tmp_path):
    """A micro stage that starts late in a device call stops starting benchmarks, so that pytest ends
    normally and pytest-benchmark writes the JSON of those that ran — here none, so no JSON."""
    import time

    from bench import gpu_suite

    micro = gpu_suite.run_micro(str(tmp_path), dry_run=True, deadline=time.time() + gpu_suite.MICRO_MARGIN_S / 2)
    assert micro["ran"] and micro["exit_code"] == 0, micro
    assert "not started: the run's time budget is spent" in micro["tail"]
    assert micro["file"] is None and not list(tmp_path.iterdir())


def test_gpu_suite_starts_no_stage_after_its_budget(tmp_path):
    from bench import gpu_suite

    report = gpu_suite.main(["--dry-run", "--stages", "bench,micro", "--budget-s", "0", "--out", str(tmp_path)])
    assert report["stages_run"] == [] and report["benchmarks"] == [] and not report["micro"]["ran"]


def test_gpu_tests_past_the_stage_deadline_are_not_started(tmp_path):
    """The tests stage inside a time-limited call: a test not started by its deadline is skipped by
    bench.deadline_plugin and counted as not started, and the stage reads as cut off."""
    import time

    from bench import gpu_suite

    (tmp_path / "test_deadline_sample.py").write_text("import time\n\ndef test_slow():\n    time.sleep(1.5)\n\n"
                                                      "def test_late():\n    pass\n")  # fmt: skip
    final = gpu_suite.run_tests(path=tmp_path, deadline=time.time() + 1.0)
    assert (final["passed"], final["failed"], final["skipped"], final["not_started"]) == (1, 0, 0, 1)
    assert final["complete"] is False and final["pytest_exit_code"] == 0
    assert gpu_suite.DEADLINE_ENV not in os.environ  # set for the run only
    markdown = gpu_suite.markdown({**gpu_suite._start_report(gpu_suite._parse(["--dry-run"])), "tests": final})
    assert "1 passed, 0 failed, 0 skipped, 1 not started (time budget) (cut off before the end)" in markdown


def test_each_stage_but_the_last_is_capped_within_the_budget():
    from bench import gpu_suite

    caps = gpu_suite._parse(["--stage-caps", "tests=100,tune=7"]).stage_caps
    assert caps == {**gpu_suite.STAGE_CAPS_S, "tests": 100.0, "tune": 7.0}
    selected = ["tests", "bench", "memory"]
    assert gpu_suite.stage_deadline("tests", selected, 1000.0, 5000.0, caps) == 1100.0
    assert gpu_suite.stage_deadline("tests", selected, 1000.0, 1050.0, caps) == 1050.0  # the run's end comes first
    assert gpu_suite.stage_deadline("memory", selected, 1000.0, 5000.0, caps) == 5000.0  # the last: the rest
    assert gpu_suite.stage_deadline("tests", selected, 1000.0, None, caps) is None  # no budget, no caps
    with pytest.raises(SystemExit):
        gpu_suite._parse(["--stage-caps", "tset=100"])


def test_a_capped_stage_leaves_time_to_the_next(tmp_path):
    """With a budget, a stage past its cap starts no more configurations, and the next stage runs."""
    from bench import gpu_suite

    argv = ["--dry-run", "--stages", "bench,crossover", "--budget-s", "600", "--stage-caps", "bench=0"]
    report = gpu_suite.main([*argv, "--out", str(tmp_path)])
    (bench,) = report["benchmarks"]
    assert bench["error"] == "not started: the time budget (--budget-s, --stage-caps) was spent"
    (crossover,) = report["crossover"]
    assert "error" not in crossover and report["stages_run"] == ["bench", "crossover"]


def test_a_test_module_that_fails_to_import_counts_as_failed(tmp_path):
    from bench import gpu_suite

    (tmp_path / "test_fine.py").write_text("def test_a():\n    pass\n")
    (tmp_path / "test_broken.py").write_text("import module_that_does_not_exist\n")
    final = gpu_suite.run_tests(path=tmp_path)
    assert final["passed"] == 1 and final["failed"] == 1 and final["pytest_exit_code"] != 0
    # node ids are relative to pytest's rootdir, which depends on where the checkout lies
    (failure,) = final["failures"]
    assert failure.rsplit("/", 1)[-1] == "test_broken.py (collection error)"
    markdown = gpu_suite.markdown({**gpu_suite._start_report(gpu_suite._parse(["--dry-run"])), "tests": final})
    assert "1 passed, 1 failed, 0 skipped (pytest exit code" in markdown
    assert f"failed: `{failure}`" in markdown


def test_configurations_past_the_deadline_are_not_started():
    import time

    from bench import triton_step

    (result,) = triton_step.run_all(dry_run=True, deadline=time.time() - 1)
    assert result["error"] == "not started: the time budget (--budget-s, --stage-caps) was spent" and "median_ms" not in result


def test_a_failing_stage_is_recorded_and_the_next_stage_runs(tmp_path, monkeypatch):
    from bench import gpu_suite, triton_step

    real = triton_step.run_all

    def bench_fails(dry_run=False, mode="bench", **kwargs):
        if mode == "bench":
            raise KeyError("a bug in the bench stage")
        return real(dry_run=dry_run, mode=mode, **kwargs)

    monkeypatch.setattr(triton_step, "run_all", bench_fails)
    report = gpu_suite.main(["--dry-run", "--stages", "bench,crossover", "--out", str(tmp_path)])
    assert report["stage_errors"] == {"bench": "KeyError: 'a bug in the bench stage'"}
    assert report["stages_run"] == ["bench", "crossover"] and len(report["crossover"]) == 1
    assert "**bench stage error**: KeyError" in next(tmp_path.glob("gpu-suite-*.md")).read_text()


def test_a_subprocess_past_its_limit_is_killed_with_its_children():
    """compute-sanitizer's Python child must not outlive the sanitizer stage's time limit."""
    import sys
    import time

    from bench import gpu_suite

    spawn = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
             "time.sleep(60)']); print(child.pid, flush=True); time.sleep(60)")  # fmt: skip
    exit_code, output = gpu_suite._run_limited([sys.executable, "-c", spawn], timeout=3, env=dict(os.environ))
    assert exit_code is None
    child = int(output.split()[0])
    for _ in range(50):  # killed with its process group; reaped by init shortly after
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {child} outlived the limit")


def test_sanitizer_runs_without_the_caching_allocator(tmp_path, monkeypatch):
    """Inside a cached 2 MiB segment a small overrun is not an access fault: memcheck must see the
    kernels' real allocations."""
    from bench import gpu_suite

    tool = tmp_path / "compute-sanitizer"
    tool.write_text("#!/bin/sh\necho caching=$PYTORCH_NO_CUDA_MEMORY_CACHING\necho '========= ERROR SUMMARY: 0 errors'\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    result = gpu_suite.run_sanitizer()
    assert result["ran"] and result["errors"] == 0 and "caching=1" in result["tail"]


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
