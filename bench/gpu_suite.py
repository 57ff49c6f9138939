"""`make gpu`: the GPU evidence of the project in one run, written to bench/results/.

1. the GPU tests (tests/gpu) — passed / failed counts;
2. `compute-sanitizer --tool memcheck` on a small forward + backward (tests/gpu/sanitize_case.py);
3. the kernel benchmarks (bench.triton_step);
then a JSON and a `.md` table with the device name, torch and triton versions,
git commit and date.

    python -m bench.gpu_suite [--out DIR] [--dry-run]

Files: `gpu-suite-<device>-<yyyymmdd>.json/.md` under --out. The commit comes from `git rev-parse
HEAD`, or from ODENETS_FAST_COMMIT where the tree travelled without its .git folder. --dry-run exercises the whole pipeline on the CPU (TRITON_INTERPRET=1,
tiny benchmark, no sanitizer) to check the plumbing; its files are marked dry_run.
"""

import argparse
import datetime
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import triton

from bench import triton_step
from bench.report import git_commit, output_stem, write_json

ROOT = Path(__file__).resolve().parents[1]


class _Outcomes:
    """pytest plugin: counts test outcomes (setup/teardown errors count as failures)."""

    def __init__(self):
        self.passed, self.failed, self.skipped, self.failures = 0, 0, 0, []

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.passed:
            self.passed += 1
        elif report.failed:
            self.failed += 1
            self.failures.append(report.nodeid)
        elif report.skipped and report.when in ("setup", "call"):
            self.skipped += 1


def run_tests() -> dict:
    import pytest

    outcomes = _Outcomes()
    exit_code = pytest.main(["-q", str(ROOT / "tests" / "gpu")], plugins=[outcomes])
    return {"passed": outcomes.passed, "failed": outcomes.failed, "skipped": outcomes.skipped,
            "failures": outcomes.failures, "pytest_exit_code": int(exit_code)}  # fmt: skip


def run_sanitizer() -> dict:
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        return {"ran": False, "reason": "compute-sanitizer not on PATH"}
    cmd = [tool, "--tool", "memcheck", "--error-exitcode", "1", sys.executable,
           str(ROOT / "tests" / "gpu" / "sanitize_case.py")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    output = proc.stdout + proc.stderr
    found = re.search(r"ERROR SUMMARY: (\d+) error", output)
    return {"ran": True, "exit_code": proc.returncode, "errors": int(found.group(1)) if found else None,
            "tail": output[-2000:]}  # fmt: skip


def markdown(report: dict) -> str:
    tests, san = report["tests"], report["sanitizer"]
    san_line = (f"{san['errors']} errors (exit code {san['exit_code']})" if san.get("ran")
                else f"not run ({san.get('reason')})")  # fmt: skip
    return "\n".join([
        f"# GPU results: {report['device']}, {report['date']}",
        "",
        f"commit `{report['commit']}` · torch {report['torch']} · triton {report['triton']}"
        + (" · **dry run on CPU**" if report["dry_run"] else ""),
        "",
        f"- GPU tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped",
        f"- compute-sanitizer memcheck: {san_line}",
        "",
        "Median times (ms) and ratios, side by side in one run (`python -m bench.gpu_suite`):",
        "",
        triton_step.markdown_table(report["benchmarks"]),
        "",
    ])  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    now = datetime.datetime.now(datetime.timezone.utc)
    device = "cpu-dry-run" if args.dry_run else torch.cuda.get_device_name()
    report = {
        "device": device,
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": now.isoformat(timespec="seconds"),
        "dry_run": args.dry_run,
        "tests": {"passed": 0, "failed": 0, "skipped": 0, "failures": []} if args.dry_run else run_tests(),
        "sanitizer": {"ran": False, "reason": "dry run"} if args.dry_run else run_sanitizer(),
        "benchmarks": triton_step.run_all(dry_run=args.dry_run),
    }
    stem = output_stem("gpu-suite", torch.device("cpu" if args.dry_run else "cuda"), args.out)
    write_json(stem.with_suffix(".json"), report)
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json and .md")
    return report


if __name__ == "__main__":
    main()
