"""pytest-benchmark's JSON of bench/test_micro.py gets the environment every other benchmark file records."""

from bench.report import environment
from bench.test_micro import DEVICE


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["environment"] = environment(DEVICE)
