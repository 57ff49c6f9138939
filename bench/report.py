"""What every benchmark script records next to its numbers: the environment they were measured in
(device, versions, git commit, date), where its files go, its JSON file, markdown tables and
log-log slope fits."""

import datetime
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional

import torch

from odenets_fast.backends import select_backend

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"


def git_commit() -> str:
    """`git rev-parse HEAD`, or ODENETS_FAST_COMMIT where the tree travelled without its .git folder."""
    if os.environ.get("ODENETS_FAST_COMMIT"):
        return os.environ["ODENETS_FAST_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def git_dirty() -> Optional[bool]:
    """Whether the tree differs from that commit — tracked files changed, or new files outside bench/results
    (an uncommitted benchmark script): results measured on uncommitted code; None where the tree has no git
    checkout. Results written earlier in the same run are new files too, hence the exception."""
    try:
        return bool(subprocess.run(["git", "status", "--porcelain", "--", ".", ":(exclude)bench/results"],
                                   capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip())  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


def load_average_1min() -> Optional[float]:
    """The 1-minute load average, None where the system keeps none: on a shared machine, how much else ran
    (a benchmark's own threads count too)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M).group(1)
    except (OSError, AttributeError):
        pass
    return f"{model}, {os.cpu_count()} cores"


def backend_label(backend: Optional[str], device: torch.device) -> str:
    """The public name of the odenets_fast backend that `backend=` (None: automatic) picks on `device`."""
    return select_backend(backend, device).__name__.rsplit(".", 1)[-1].removesuffix("_backend")


def environment(device: torch.device) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "commit": git_commit(),
        "git_dirty": git_dirty(),
        "load_average_1min": load_average_1min(),
        "date": now.isoformat(timespec="seconds"),
    }


def output_stem(name: str, device: torch.device, out_dir=None) -> Path:
    """`<out_dir>/<name>-<device>-<yyyymmdd>`: "cpu" or the GPU's name, lower-case and dashed."""
    slug = "cpu" if device.type == "cpu" else re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()
    today = datetime.datetime.now(datetime.timezone.utc)
    return Path(out_dir or RESULTS_DIR) / f"{name}-{slug}-{today:%Y%m%d}"


def write_json(path: Path, data: dict) -> None:
    """Written beside and renamed over `path`: a run killed mid-write (a device call's time limit) leaves the
    previous complete file, not a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(partial, path)


def markdown_table(headers: list, rows: list) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def powers_of_two(low: int, high: int) -> list:
    """The depths 2^k with low <= 2^k <= high."""
    return [2**k for k in range(math.ceil(math.log2(low)), int(math.log2(high)) + 1)]


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of log y against log x: the exponent p of y ≈ C x^p."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(points) < 2:
        return float("nan")
    mean_x = sum(p[0] for p in points) / len(points)
    mean_y = sum(p[1] for p in points) / len(points)
    covariance = sum((px - mean_x) * (py - mean_y) for px, py in points)
    return covariance / sum((px - mean_x) ** 2 for px, _ in points)
