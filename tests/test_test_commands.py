"""The test commands users type work from the repository root, not only `make test`."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plain_pytest_collects_tests_that_import_bench():
    """`pytest tests/...` (the console script, which, unlike `python -m pytest`, does not put the
    working directory on sys.path; `python -P` does the same) must find `bench`, which the tests'
    autograd oracle imports."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_reference.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "tests/test_reference.py::" in result.stdout
