"""`make gpu`: the GPU evidence of the project, written to bench/results/.

Stages (all by default; `--stages` picks some; they run in this order, most needed evidence first):
    quick      what a first short run must show (`make gpu-quick`): both paths' accuracy against the
               float64 reference on the GPU (tests/gpu/test_paths_gpu.py, as the tests' counts), then
               the goal configurations of the GPU issues (bench.triton_step --mode goals);
    tests      the GPU tests (tests/gpu) — passed / failed counts;
    bench      the kernel benchmarks and the issues' ratios (bench.triton_step);
    sanitizer  `compute-sanitizer --tool memcheck` on a small forward + backward (tests/gpu/sanitize_case.py);
    memory     peak memory and time against depth against eager, checkpointing (and torchdiffeq when
               installed) at B = 4096, q = 256, m = 512 (bench.memory, its own JSON and PNG);
    crossover  whole-depth against per-layer launches over q and L (bench.triton_step --mode crossover);
    micro      the micro-benchmarks of bench/test_micro.py for the eager loop and the Triton backend
               (pytest-benchmark's JSON, micro-<device>-<yyyymmdd>.json);
    tune       tile candidates of each kernel at the benchmark shapes (bench.triton_step --mode tune),
               for the tile table of triton_kernels/mlp_step.py.
Writes `gpu-suite-<device>-<yyyymmdd>.json/.md` under --out with the device name, torch and triton
versions, git commit and date — after every stage, benchmark configuration and memory depth, so
that a run cut short by a time limit still leaves what it measured. --budget-s: no stage, test,
configuration or depth starts after it, and the subprocesses end by then; within it each stage but
the last one selected is capped (STAGE_CAPS_S, or --stage-caps), so that one slow stage cannot
starve the others, and time a stage leaves unused passes on. A configuration that
fails is recorded with its error and the others still run; a stage that raises is recorded under
`stage_errors` and the next one runs. The stages can be spread over several calls of a time-limited
GPU machine, each writing its own report; `--combine` then makes them one report, here, without a
GPU — so no file has to travel back to the machine between calls, and the calls can follow each
other at once, while the machine is still warm.

    python -m bench.gpu_suite [--out DIR] [--stages tests,bench] [--budget-s S] [--stage-caps tests=300,…] [--dry-run]
    python -m bench.gpu_suite --combine REPORT.json [REPORT.json …] [--out DIR]

The commit comes from `git rev-parse HEAD`, or from ODENETS_FAST_COMMIT where the tree travelled
without its .git folder. --dry-run exercises the pipeline on the CPU (TRITON_INTERPRET=1, tiny
benchmarks, one CPU micro-benchmark; no tests, sanitizer or memory stage) to check the plumbing; its
files are marked dry_run.
"""

import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton

from bench import memory, triton_step
from bench.report import git_commit, output_stem, write_json
from bench.timing import DEADLINE_ENV, DEADLINE_SKIP_REASON

ROOT = Path(__file__).resolve().parents[1]
TEST_TIMEOUT_S = 300  # per GPU test, with pytest-timeout: a hang must not use up a session's device time
# The GPU tests spend most of their time compiling kernel specialisations (one per activation,
# method, mode, dtype, reduction…), which is CPU work: pytest-xdist workers compile in parallel on
# the GPU machine's cores (16 on the lent H100/H200 machines: 8 workers, each with its own CUDA
# context of well under 1 GiB). Peak-memory tests read their own process's allocator, so they stay exact.
GPU_TEST_WORKERS = max(1, min(8, (os.cpu_count() or 2) // 2))
SUBPROCESS_TIMEOUT_S = 480  # sanitizer, micro: inside one device call's 600 s, recorded as such, not killed unseen
# The micro-benchmarks stop starting benchmarks this long before their time is up, so that pytest
# still ends normally and writes its JSON (the slowest benchmark, wide L = 1024, takes seconds).
MICRO_MARGIN_S = 60


class _Outcomes:
    """pytest plugin: counts test outcomes (setup/teardown errors and modules that fail to collect
    count as failures: a GPU test file that no longer imports must not read as a clean run; tests
    skipped by bench.deadline_plugin count as not started, not as skipped) and hands the counts so
    far to `on_change` after every test, so that a run cut off by a time limit leaves them."""

    def __init__(self, on_change=None):
        self.passed, self.failed, self.skipped, self.not_started, self.failures = 0, 0, 0, 0, []
        self.on_change = on_change

    def summary(self, complete: bool) -> dict:
        return {"passed": self.passed, "failed": self.failed, "skipped": self.skipped,
                "not_started": self.not_started, "failures": list(self.failures),
                "complete": complete and self.not_started == 0}  # fmt: skip

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.passed:
            self.passed += 1
        elif report.failed:
            self.failed += 1
            self.failures.append(report.nodeid)
        elif report.skipped and report.when in ("setup", "call"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            if DEADLINE_SKIP_REASON in reason:
                self.not_started += 1
            else:
                self.skipped += 1
        if self.on_change is not None and report.when == "teardown":
            self.on_change(self.summary(complete=False))

    def pytest_collectreport(self, report):
        if report.failed:
            self.failed += 1
            self.failures.append(f"{report.nodeid or 'collection'} (collection error)")


def run_tests(on_change=None, path: Path = ROOT / "tests" / "gpu", workers: int = GPU_TEST_WORKERS,
              deadline=None, run_deadline=None) -> dict:
    """pytest on `path`: no test starts after `deadline` (a Unix time; bench.deadline_plugin, in the
    xdist workers too), and a hung test is ended after TEST_TIMEOUT_S, or at `run_deadline` if that
    comes first (a test that started in time may finish after `deadline`)."""
    import pytest

    suite = os.path.relpath(path, ROOT)  # which tests the counts are of: the quick stage runs a part
    outcomes = _Outcomes(None if on_change is None else lambda counts: on_change({**counts, "suite": suite}))
    # one broken module must not cost the others
    args = ["-q", "--continue-on-collection-errors", "-p", "bench.deadline_plugin", str(path)]
    if importlib.util.find_spec("pytest_timeout") is not None:  # on the GPU image: a hung kernel fails one test
        # the thread method: a signal cannot interrupt a worker blocked in a CUDA synchronisation
        args += [f"--timeout={_timeout_s(run_deadline, TEST_TIMEOUT_S):.0f}", "--timeout-method=thread"]
    if workers > 1 and importlib.util.find_spec("xdist") is not None:  # on the GPU image too
        args += ["-n", str(workers)]
    with triton_step.environment_variable(DEADLINE_ENV, deadline):  # read by the xdist workers too
        exit_code = pytest.main(args, plugins=[outcomes])
    return {**outcomes.summary(complete=True), "suite": suite, "pytest_exit_code": int(exit_code)}


def _timeout_s(deadline, limit: float = SUBPROCESS_TIMEOUT_S) -> float:
    """A time limit of `limit` seconds, or less when `deadline` (a Unix time) comes sooner."""
    return limit if deadline is None else max(1.0, min(limit, deadline - time.time()))


def _run_limited(cmd: list, timeout: float, env: dict) -> tuple:
    """(exit code, output) of `cmd`, or (None, output so far) when it ran past `timeout`. The command
    gets its own process group, killed whole at the limit: a Python process under compute-sanitizer
    must not go on using the GPU while the next stage times kernels."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return None, output


def run_micro(out_dir: str, dry_run: bool = False, deadline=None) -> dict:
    """bench/test_micro.py on the GPU for the eager loop and the Triton backend (pytest-benchmark's
    JSON beside the report; each benchmark also carries do_bench's median in extra_info). Benchmarks
    not started MICRO_MARGIN_S before the time limit are skipped, so a late stage still leaves the
    JSON of those that ran. The dry run times one tiny CPU benchmark of the eager loop, to check the
    plumbing."""
    device = torch.device("cpu" if dry_run else "cuda")
    path = output_stem("micro", device, out_dir).with_suffix(".json")
    selection = "eager and step and L16 and q16" if dry_run else "eager or triton"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "bench.deadline_plugin", str(ROOT / "bench" / "test_micro.py"),
           "--benchmark-only", "-k", selection, f"--benchmark-json={path}"]  # fmt: skip
    timeout = _timeout_s(deadline)
    env = dict(os.environ, **{DEADLINE_ENV: str(time.time() + timeout - MICRO_MARGIN_S)})
    exit_code, output = _run_limited(cmd, timeout, env)
    if exit_code is None:
        return {"ran": False, "reason": f"timed out after {timeout:.0f} s", "tail": output[-1500:]}
    return {"ran": True, "exit_code": exit_code, "file": path.name if path.exists() else None,  # none: no benchmark ran
            "tail": output[-1500:]}  # fmt: skip


def run_sanitizer(deadline=None) -> dict:
    """memcheck on tests/gpu/sanitize_case.py, with PyTorch's caching allocator off: its tensors are a
    few KB, and inside one cached 2 MiB segment an overrun of a few elements lands in memory that is
    allocated, so memcheck would not see it."""
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        return {"ran": False, "reason": "compute-sanitizer not on PATH"}
    cmd = [tool, "--tool", "memcheck", "--error-exitcode", "1", sys.executable,
           str(ROOT / "tests" / "gpu" / "sanitize_case.py")]  # fmt: skip
    timeout = _timeout_s(deadline)
    exit_code, output = _run_limited(cmd, timeout, dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1"))
    if exit_code is None:
        return {"ran": False, "reason": f"timed out after {timeout:.0f} s", "tail": output[-2000:]}
    found = re.search(r"ERROR SUMMARY: (\d+) error", output)
    return {"ran": True, "exit_code": exit_code, "errors": int(found.group(1)) if found else None,
            "tail": output[-2000:]}  # fmt: skip


STAGES = ("quick", "tests", "bench", "sanitizer", "memory", "crossover", "micro", "tune")
# Under --budget-s, the most seconds a stage may start work in (tests, configurations, depths) when
# later stages are selected; the last stage selected has no cap. Sized for a device lease of 15
# minutes in all (two calls), from counts, not timings: tests ≈ 120 tests compiling a few hundred
# kernel variants on 8 workers; the sanitizer (killed at its cap) compiles its kernels under memcheck.
STAGE_CAPS_S = {"quick": 300, "tests": 240, "bench": 150, "sanitizer": 120, "memory": 120, "crossover": 90,
                "micro": 150, "tune": 240}  # fmt: skip
# Within the quick stage: the accuracy tests (32 tests compiling both paths' kernels on 8 workers) get
# this much of it, the goal configurations the rest.
QUICK_TESTS_CAP_S = 150
QUICK_TESTS = ROOT / "tests" / "gpu" / "test_paths_gpu.py"
FULL_TESTS = os.path.join("tests", "gpu")
NOT_RUN = {
    "tests": {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "not_run": True},
    "sanitizer": {"ran": False, "reason": "stage not run"},
    "benchmarks": [],
    "crossover": [],
    "tune": [],
    "memory": {"ran": False, "reason": "stage not run"},
    "micro": {"ran": False, "reason": "stage not run"},
}
DRY_RUN_SKIPS = ("tests", "sanitizer", "memory")  # need a GPU; the other stages run tiny on the CPU
# Stages that use this process's CUDA context (the others run in subprocesses or xdist workers): after
# a sticky CUDA error (an illegal memory access) they cannot run here.
IN_PROCESS_STAGES = ("quick", "bench", "crossover", "tune", "memory")


def run_memory(out_dir: str, deadline=None, on_change=None) -> dict:
    """bench.memory on the GPU; `on_change(section)` after every depth, so that a call cut off mid-stage
    still reports the depths measured (their JSON is written beside the report after each one)."""
    name = f"{output_stem('memory', torch.device('cuda'), out_dir).name}.json"

    def section(results):
        return {"ran": True, "complete": results["complete"], "config": results["config"],
                "skipped": results["skipped"], "ratios": results["ratios"], "file": name}  # fmt: skip

    def on_depth(results):
        if on_change is not None:
            on_change(section(results))

    argv = ["--device", "cuda", "--backend", "triton", "--out", out_dir]
    return section(memory.main(argv, deadline=deadline, on_depth=on_depth))


def run_quick(dry_run: bool, deadline, started: float, on_tests, on_benchmarks) -> None:
    """The quick stage: the accuracy of both paths (not on a dry run: it needs a GPU), then the goal
    configurations, each part reporting through its callback as it goes."""
    if not dry_run:
        tests_deadline = started + QUICK_TESTS_CAP_S if deadline is None else min(deadline, started + QUICK_TESTS_CAP_S)
        on_tests(run_tests(on_change=on_tests, path=QUICK_TESTS, deadline=tests_deadline, run_deadline=deadline))
    triton_step.run_all(dry_run=dry_run, mode="goals", on_result=on_benchmarks, deadline=deadline)


def _not_started(result: dict) -> bool:
    """Whether a configuration's result (bench, crossover, tune) says triton_step.run_all did not start it."""
    return result.get("error", "").startswith("not started")


def unfinished_stages(report: dict, selected: list) -> list:
    """The stages of `selected` that did not start or left work undone (tests, configurations,
    memory depths or micro-benchmarks not started, the sanitizer killed at its limit): what a next
    call of a time-limited machine should run again."""
    started = set(report["stages_run"])
    measured = {r["name"] for r in report["benchmarks"] if "median_ms" in r}
    goals = {config["name"] for config in triton_step.goal_configs(report["dry_run"])}
    tests_done = report["tests"].get("complete", False)
    all_tests_done = tests_done and report["tests"].get("suite", FULL_TESTS) == FULL_TESTS
    tested = report["dry_run"] or tests_done  # quick's tests, or the full ones, which include them
    if tested and goals <= measured:  # done, by the quick stage or by the tests and bench stages
        started.add("quick")
    left = {
        "quick": not (tested and goals <= measured),
        "tests": not all_tests_done,
        "bench": any(map(_not_started, report["benchmarks"])),
        "sanitizer": str(report["sanitizer"].get("reason", "")).startswith("timed out"),
        "memory": not report["memory"].get("complete", False),
        "crossover": any(map(_not_started, report["crossover"])),
        "micro": not report["micro"].get("ran") or DEADLINE_SKIP_REASON in report["micro"].get("tail", ""),
        "tune": any(map(_not_started, report["tune"])),
    }
    return [stage for stage in selected if stage not in started or left[stage]]


def stage_deadline(stage: str, selected: list, started: float, deadline, caps: dict):
    """The Unix time after which `stage` starts no more work: the run's deadline (None: no limit),
    or `caps[stage]` seconds after it started if that comes sooner — unless it is the last stage
    selected, which has the rest of the run to itself."""
    if deadline is None or stage == selected[-1]:
        return deadline
    return min(deadline, started + caps[stage])


def markdown(report: dict) -> str:
    tests, san, mem, micro = report["tests"], report["sanitizer"], report["memory"], report["micro"]
    tests_line = "not run" if tests.get("not_run") else (
        f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped"
        + (f", {tests['not_started']} not started (time budget)" if tests.get("not_started") else "")
        + ("" if tests.get("complete", True) else " (cut off before the end)")
        + (f" (pytest exit code {tests['pytest_exit_code']})" if "pytest_exit_code" in tests else "")
        + (f", `{tests['suite']}`" if "suite" in tests else ""))
    san_line = (f"{san['errors']} errors (exit code {san['exit_code']})" if san.get("ran")
                else f"not run ({san.get('reason')})")  # fmt: skip
    lines = [
        f"# GPU results: {report['device']}, {report['date']}",
        "",
        f"commit `{report['commit']}` · torch {report['torch']} · triton {report['triton']}"
        + (" · **dry run on CPU**" if report["dry_run"] else ""),
        "",
        *([f"Combined from {len(report['combined_from'])} calls: " + "; ".join(
            f"`{part['file']}` ({part['date']}: {', '.join(part['stages_run']) or 'no stage complete'})"
            for part in report["combined_from"]), ""] if "combined_from" in report else []),
        f"- GPU tests: {tests_line}",
        *(f"  - failed: `{nodeid}`" for nodeid in tests.get("failures", [])[:20]),
        f"- compute-sanitizer memcheck: {san_line}",
        "- memory against depth: " + (f"`{mem['file']}`, ratios {json.dumps(mem['ratios'])}" if mem.get("ran")
                                       else f"not run ({mem.get('reason')})"),
        "- micro-benchmarks: " + (f"`{micro['file'] or 'no benchmark ran'}` (pytest exit code {micro['exit_code']})"
                                   if micro.get("ran") else f"not run ({micro.get('reason')})"),
        *([f"- left undone: {', '.join(report['unfinished'])} (run again with `--stages "
           f"{','.join(report['unfinished'])}`)"] if report.get("unfinished") else []),
        "- stage times: " + (", ".join(f"{stage} {s:.0f} s" for stage, s in report.get("stage_seconds", {}).items())
                             or "none complete"),
        *(f"- **{stage} stage error**: {error}" for stage, error in report.get("stage_errors", {}).items()),
        "",
        "Median times (ms) and ratios, side by side in one run (`python -m bench.gpu_suite`):",
        "",
        triton_step.markdown_table(report["benchmarks"]),
        "",
    ]  # fmt: skip
    if report["crossover"]:
        lines += ["Whole-depth against per-layer launches (float32):", "", triton_step.crossover_table(report["crossover"]), ""]
    if report["tune"]:
        lines += ["Tile candidates (median ms; forward: whole-depth forward, reverse: adjoint training step, "
                  "product: adjoint training step with the workspace reduction):", "",
                  triton_step.tune_table(report["tune"]), ""]  # fmt: skip
    return "\n".join(lines)


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {','.join(STAGES)}")
    parser.add_argument("--combine", nargs="+", default=None, metavar="REPORT",
                        help="no stage runs: one report from these gpu-suite JSONs of the same commit and device")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds this run may take (a device call's limit): the sanitizer and micro "
                             "subprocesses end by then, and no stage starts after it")  # fmt: skip
    parser.add_argument("--stage-caps", default="", metavar="STAGE=S,…",
                        help=f"with --budget-s: replace some caps of STAGE_CAPS_S {STAGE_CAPS_S}")
    args = parser.parse_args(argv)
    args.stages = [stage for stage in args.stages.split(",") if stage]
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {unknown}; expected some of {list(STAGES)}")
    caps = dict(STAGE_CAPS_S)
    for item in filter(None, args.stage_caps.split(",")):
        stage, _, seconds = item.partition("=")
        try:
            if stage not in STAGES:
                raise ValueError
            caps[stage] = float(seconds)
        except ValueError:
            parser.error(f"--stage-caps: expected STAGE=SECONDS with STAGE one of {list(STAGES)}; got {item!r}")
    args.stage_caps = caps
    return args


def _start_report(args) -> dict:
    return {
        "device": "cpu-dry-run" if args.dry_run else torch.cuda.get_device_name(),
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": args.dry_run,
        "stages_run": [],
        "stage_seconds": {},
        "stage_errors": {},
        **json.loads(json.dumps(NOT_RUN)),
    }


def _write(stem: Path, report: dict) -> None:
    write_json(stem.with_suffix(".json"), report)
    stem.with_suffix(".md").write_text(markdown(report))


SAME_RUN_KEYS = ("commit", "device", "torch", "triton", "dry_run")
CONFIG_SECTIONS = {"benchmarks", "crossover", "tune"}  # lists of one result per configuration


def _merge_configs(earlier: list, later: list) -> list:
    """Per configuration name, the later result, unless the later call did not start it."""
    merged = {r["name"]: r for r in earlier}
    for r in later:
        if r["name"] not in merged or not _not_started(r):
            merged[r["name"]] = r
    return list(merged.values())


def combine(paths: list, out_dir: str) -> dict:
    """One report from the reports of several calls (same commit, device and versions): each
    section comes from the last report in which its stage ran, even in part (a stage cut off by a
    time limit keeps what it measured). Written under `out_dir` with the first report's file name,
    beside the files of the memory and micro stages, copied from their reports' folders."""
    reports = [json.loads(Path(path).read_text()) for path in paths]
    for path, report in zip(paths[1:], reports[1:]):
        for key in SAME_RUN_KEYS:
            if report.get(key) != reports[0].get(key):
                raise SystemExit(f"--combine: {path} has {key} {report.get(key)!r}, {paths[0]} has "
                                 f"{reports[0].get(key)!r}; only reports of one run of one commit combine")  # fmt: skip
    combined = {key: reports[0][key] for key in (*SAME_RUN_KEYS, "date")}
    combined.update(json.loads(json.dumps(NOT_RUN)))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for path, report in zip(paths, reports):
        ran = {key: report[key] for key in NOT_RUN if report.get(key, NOT_RUN[key]) != NOT_RUN[key]}
        for key in CONFIG_SECTIONS.intersection(ran):  # a later call's rerun keeps what an earlier one measured
            ran[key] = _merge_configs(combined[key], ran[key])
        combined.update(ran)
        for key in ("memory", "micro"):  # their own files (JSON, the memory plot) lie beside the report
            name = ran.get(key, {}).get("file")
            for source in Path(path).parent.glob(f"{Path(name).stem}.*") if name else []:
                if source.parent.resolve() != Path(out_dir).resolve():
                    shutil.copy2(source, out_dir)
    ran = set().union(*(report.get("stages_run", []) for report in reports))
    combined["stages_run"] = sorted(ran, key=STAGES.index)
    combined["stage_seconds"], combined["stage_errors"] = {}, {}
    for report in reports:
        combined["stage_seconds"].update(report.get("stage_seconds", {}))
        combined["stage_errors"].update(report.get("stage_errors", {}))
    combined["combined_from"] = [{"file": Path(path).name, "date": report.get("date"),
                                  "stages_run": report.get("stages_run", [])} for path, report in zip(paths, reports)]  # fmt: skip
    suite = [stage for stage in STAGES if not (combined["dry_run"] and stage in DRY_RUN_SKIPS)]
    combined["unfinished"] = unfinished_stages(combined, suite)  # what the calls together still lack
    stem = Path(out_dir) / Path(paths[0]).name.removesuffix(".json")
    _write(stem, combined)
    print(f"wrote {stem}.json and .md from {len(paths)} reports")
    return combined


def main(argv=None) -> dict:
    args = _parse(argv)
    if args.combine:
        return combine(args.combine, args.out)
    report = _start_report(args)
    selected = [stage for stage in STAGES if stage in args.stages and not (args.dry_run and stage in DRY_RUN_SKIPS)]
    stem = output_stem("gpu-suite", torch.device("cpu" if args.dry_run else "cuda"), args.out)

    def save():
        report["unfinished"] = unfinished_stages(report, selected)
        _write(stem, report)

    def save_tests(counts):
        report["tests"] = counts
        save()

    def save_results(key):
        earlier = list(report[key])  # from an earlier stage of this run (quick's goal configurations)

        def on_result(results):
            report[key] = _merge_configs(earlier, list(results))
            save()

        return on_result

    def save_memory(section):
        report["memory"] = section
        save()

    deadline = None if args.budget_s is None else time.time() + args.budget_s
    for stage in selected:
        if deadline is not None and time.time() >= deadline:
            print(f"== {stage}: not started, the time budget (--budget-s) is spent", flush=True)
            continue
        if stage in IN_PROCESS_STAGES and not args.dry_run and not triton_step.cuda_usable():
            print(f"== {stage}: not started, this process's CUDA context is unusable", flush=True)
            report["stage_errors"][stage] = "not started: this process's CUDA context is unusable"
            continue
        started = time.time()
        ends = stage_deadline(stage, selected, started, deadline, args.stage_caps)
        print(f"== {stage}" + ("" if ends is None else f" (starts no work after {ends - started:.0f} s)"), flush=True)
        try:
            if stage == "quick":
                run_quick(args.dry_run, ends, started, save_tests, save_results("benchmarks"))
            elif stage == "tests":
                report["tests"] = run_tests(on_change=save_tests, deadline=ends, run_deadline=deadline)
            elif stage == "sanitizer":
                report["sanitizer"] = run_sanitizer(ends)
            elif stage in ("bench", "crossover", "tune"):
                key = "benchmarks" if stage == "bench" else stage
                triton_step.run_all(dry_run=args.dry_run, mode=stage, on_result=save_results(key), deadline=ends)
            elif stage == "memory":
                report["memory"] = run_memory(args.out, ends, on_change=save_memory)
            elif stage == "micro":
                report["micro"] = run_micro(args.out, args.dry_run, ends)
        except Exception as err:  # noqa: BLE001 — recorded in the report; the later stages still run
            report["stage_errors"][stage] = f"{type(err).__name__}: {err}"
            print(f"== {stage} failed: {report['stage_errors'][stage]}", flush=True)
        report["stages_run"] = sorted(set(report["stages_run"]) | {stage}, key=STAGES.index)
        report["stage_seconds"][stage] = round(time.time() - started, 1)  # to plan a time-limited machine's calls
        save()
    save()
    print(markdown(report))
    print(f"wrote {stem}.json and .md")
    return report


if __name__ == "__main__":
    main()
