"""pytest plugin of a time-limited run (`-p bench.deadline_plugin`): a test not started by the Unix
time in ODENETS_FAST_DEADLINE is skipped, so that pytest still ends normally inside a device call's
limit — its reports complete, pytest-benchmark's JSON written — instead of being killed mid-run.
Named with -p, it is loaded by pytest-xdist's workers too (a conftest's fixture would have to live
beside each test folder). bench.gpu_suite sets the variable; without it the plugin does nothing."""

import os
import time

import pytest

from bench.timing import DEADLINE_ENV, DEADLINE_SKIP_REASON


def pytest_runtest_setup(item):
    deadline = os.environ.get(DEADLINE_ENV)
    if deadline and time.time() > float(deadline):
        pytest.skip(DEADLINE_SKIP_REASON)
