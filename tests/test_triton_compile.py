"""The Triton kernels compile for an H100 (sm_90) — checked on CPU machines by ahead-of-time
compilation (tests/triton_aot.py), which catches what the interpreter cannot."""

import os
import subprocess
import sys
from pathlib import Path


def _triton_aot(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default of the Triton releases in use; silences 3.9's warning
    script = Path(__file__).with_name("triton_aot.py")
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_kernels_compile_for_sm90():
    out = _triton_aot()
    assert out.count("\nok ") + out.startswith("ok ") >= 6, out


def test_tune_candidates_compile_for_sm90():
    """Every tile candidate the GPU suite's tune stage would time compiles within the bounds (a
    candidate that does not would cost device time for an error)."""
    from bench import triton_step

    out = _triton_aot("--tune")
    candidates = [triton_step.tune_candidates(config, dry_run=False) for config in triton_step.TUNE_CONFIGS]
    compiled = 2 * sum(len(tiles) for kinds in candidates for tiles in kinds.values())  # Euler and Heun
    assert out.count("\nok ") + out.startswith("ok ") == compiled, out
