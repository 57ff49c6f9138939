"""`make gpu-quick` and `make gpu`: the GPU evidence of the project, in one report.

    python -m bench.gpu_suite [--run quick|full] [--budget-s S] [--out DIR] [--dry-run]

quick (`make gpu-quick`, the first call on a GPU machine): both Triton paths' accuracy against the
      float64 reference on the GPU (tests/gpu/test_paths_gpu.py; no test starts after QUICK_TESTS_S,
      so that the goals keep the rest of the budget), then the goal configurations
      (bench.triton_step --mode goals), the planner's predicted times beside the measured ones.
full  (`make gpu`): the whole GPU test suite (tests/gpu), then bench.triton_step's bench mode,
      bench.memory on the GPU, the crossover sweep and the tile candidates.

Writes `gpu-suite-<device>-<yyyymmdd>.json` and `.md` under --out (bench/results): the environment
of bench.report (device, torch, commit — `git rev-parse HEAD`, or ODENETS_FAST_COMMIT where the tree
travelled without .git — date), triton's version, the tests' counts, and per benchmark mode each
configuration with its median times and ratios. The files are written again after every test and
every configuration, so a run cut off by a time limit leaves what it measured. --budget-s: no step,
test or configuration starts after it (tests not started in time are skipped by
bench.deadline_plugin and counted as not started); a hung test is ended by pytest-timeout.
--dry-run (with TRITON_INTERPRET=1 in the environment, as the tests set it): on the CPU at tiny
sizes, with DRY_RUN_TESTS for the GPU tests, to check the plumbing; the report says dry_run.
"""

import argparse
import importlib.util
import os
import time
from pathlib import Path

import torch
import triton

from bench import memory, triton_step
from bench.deadline_plugin import DEADLINE_ENV, DEADLINE_SKIP_REASON
from bench.report import ROOT, environment, output_stem, write_json

TESTS = {"quick": ROOT / "tests" / "gpu" / "test_paths_gpu.py", "full": ROOT / "tests" / "gpu"}
DRY_RUN_TESTS = ROOT / "tests" / "test_planner.py"  # CPU tests of what the goal configurations' paths rest on
# The quick run's accuracy tests (32, compiling both paths' kernels) start none after this, so the
# goal configurations keep the rest of `make gpu-quick`'s budget.
QUICK_TESTS_S = 150
TEST_TIMEOUT_S = 300  # per test: a hang must not use up a session's device time
# The GPU tests spend most of their time compiling kernels, which is CPU work: pytest-xdist workers
# compile in parallel (16 cores on the lent machines; each worker's CUDA context is well under 1 GiB).
GPU_TEST_WORKERS = max(1, min(8, (os.cpu_count() or 2) // 2))
BENCHMARKS = {"quick": ("goals",), "full": ("bench", "memory", "crossover", "tune")}


class _Outcomes:
    """pytest plugin: counts outcomes (setup/teardown errors and modules that fail to import count as
    failures; tests the deadline skipped, as not started) and hands them to `on_change` after every test."""

    def __init__(self, suite: str, on_change):
        self.counts = {"suite": suite, "passed": 0, "failed": 0, "skipped": 0, "not_started": 0, "failures": []}
        self.on_change = on_change

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.passed:
            self.counts["passed"] += 1
        elif report.failed:
            self.counts["failed"] += 1
            self.counts["failures"].append(report.nodeid)
        elif report.skipped and report.when in ("setup", "call"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.counts["not_started" if DEADLINE_SKIP_REASON in reason else "skipped"] += 1
        if report.when == "teardown":
            self.on_change(self.counts)

    def pytest_collectreport(self, report):
        if report.failed:
            self.counts["failed"] += 1
            self.counts["failures"].append(f"{report.nodeid or 'collection'} (collection error)")


def run_tests(path: Path, on_change, deadline=None, workers: int = GPU_TEST_WORKERS) -> dict:
    """pytest on `path`, no test started after `deadline` (a Unix time; in pytest-xdist's workers too)."""
    import pytest

    outcomes = _Outcomes(os.path.relpath(path, ROOT), on_change)
    args = ["-q", "--continue-on-collection-errors", "-p", "bench.deadline_plugin", str(path)]
    if importlib.util.find_spec("pytest_timeout") is not None:  # on the GPU image
        # the thread method: a signal cannot interrupt a worker blocked in a CUDA synchronisation
        timeout = TEST_TIMEOUT_S if deadline is None else max(1.0, min(TEST_TIMEOUT_S, deadline - time.time()))
        args += [f"--timeout={timeout:.0f}", "--timeout-method=thread"]
    if workers > 1 and importlib.util.find_spec("xdist") is not None:
        args += ["-n", str(workers)]
    with triton_step.environment_variable(DEADLINE_ENV, deadline):
        exit_code = pytest.main(args, plugins=[outcomes])
    return {**outcomes.counts, "pytest_exit_code": int(exit_code)}


def goals_table(goals: list) -> str:
    """The issues' goals (triton_step.GOALS): measured value, limit, met (- where not measured or not a limit)."""
    lines = ["| goal | configuration | measured (do_bench) | synchronised wall | at most | met |", "|" + " --- |" * 6]
    for goal in goals:
        value, wall = ("-" if v is None else f"{v:.3f}" for v in (goal["value"], goal.get("wall_value")))
        limit = "-" if goal["at_most"] is None else f"{goal['at_most']}"
        met = {True: "yes", False: "**no**", None: "-"}[goal["met"]]
        lines.append(f"| `{goal['ratio']}` | {goal['config']} | {value} | {wall} | {limit} | {met} |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    tests = report["tests"]
    lines = [
        f"# GPU results: {report['device']}, {report['date']}",
        "",
        f"commit `{report['commit']}` · torch {report['torch']} · triton {report['triton']} · run {report['run']}"
        + (" · **dry run on CPU**" if report["dry_run"] else ""),
        "",
        "- tests: " + ("not run" if not tests else
                       f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped, "
                       f"{tests['not_started']} not started (time budget), `{tests['suite']}`"
                       + (f", pytest exit code {tests['pytest_exit_code']}" if "pytest_exit_code" in tests else "")),
        *(f"  - failed: `{nodeid}`" for nodeid in tests.get("failures", [])[:20]),
        *([f"- not started (time budget): {', '.join(report['not_started'])}"] if report["not_started"] else []),
        *(f"- **{step} failed**: {error}" for step, error in report["errors"].items()),
    ]  # fmt: skip
    if report["goals"]:
        lines += ["", "## goals", "", goals_table(report["goals"])]
    if "memory" in report:
        lines.append(f"- memory against depth: `{report['memory']['file']}`, ratios {report['memory']['ratios']}")
    for mode, results in report["benchmarks"].items():
        lines += ["", f"## {mode} (median ms, ratios)", "", triton_step.TABLES[mode](results)]
        if mode in ("goals", "bench"):
            lines += ["", "Predicted by odenets_fast.plan:", "", triton_step.predicted_table(results)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", choices=BENCHMARKS, default="quick")
    parser.add_argument("--budget-s", type=float, default=None, help="no step, test or configuration starts after it")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (set TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    started = time.time()
    deadline = None if args.budget_s is None else started + args.budget_s
    device = torch.device("cpu" if args.dry_run else "cuda")
    # the package's knobs, which change what is timed, as the run found them
    knobs = {name: value for name, value in sorted(os.environ.items()) if name.startswith("ODENETS_FAST_")}
    report = {**environment(device), "triton": triton.__version__, "dry_run": args.dry_run, "run": args.run,
              "budget_s": args.budget_s, "environment_variables": knobs, "tests": {}, "goals": [], "benchmarks": {},
              "not_started": [], "errors": {}}  # fmt: skip
    stem = output_stem("gpu-suite", device, args.out)

    def save():
        write_json(stem.with_suffix(".json"), report)
        stem.with_suffix(".md").write_text(markdown(report))

    def tests():
        tests_deadline = deadline
        if args.run == "quick" and deadline is not None:
            tests_deadline = min(deadline, started + QUICK_TESTS_S)
        path = DRY_RUN_TESTS if args.dry_run else TESTS[args.run]
        report["tests"] = run_tests(path, save_tests, tests_deadline)

    def save_tests(counts):
        report["tests"] = dict(counts)
        save()

    def gpu_memory():
        results = memory.main(["--device", "cuda", "--backend", "triton", "--out", str(stem.parent)], deadline=deadline)
        report["memory"] = {"file": output_stem("memory", device).name + ".json", "ratios": results["ratios"],
                            "complete": results["complete"]}  # fmt: skip

    def benchmark(mode):
        def on_result(results):
            report["benchmarks"][mode] = list(results)
            if mode == "goals":
                report["goals"] = triton_step.goal_outcomes(results)
            save()

        return lambda: triton_step.run_all(dry_run=args.dry_run, mode=mode, on_result=on_result, deadline=deadline)

    steps = [("tests", tests)]
    steps += [(mode, gpu_memory if mode == "memory" else benchmark(mode)) for mode in BENCHMARKS[args.run]]
    for name, step in steps:
        if name == "memory" and args.dry_run:
            continue  # bench.memory's CPU run is `make bench`'s
        if deadline is not None and time.time() >= deadline:
            report["not_started"].append(name)
        else:
            print(f"== {name}", flush=True)
            try:
                step()
            except Exception as err:  # noqa: BLE001 — recorded in the report; the next step still runs
                report["errors"][name] = f"{type(err).__name__}: {err}"[:500]
        save()
    print(markdown(report))
    print(f"wrote {stem}.json and .md")
    return report


if __name__ == "__main__":
    main()
