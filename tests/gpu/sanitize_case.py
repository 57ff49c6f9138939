"""A small forward + backward through every Triton kernel specialisation family, on both paths, for
`compute-sanitizer --tool memcheck` (its command: bench/README.md): odd sizes so that every mask is hit."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import make_stack  # noqa: E402

from odenets_fast import ode_mlp  # noqa: E402
from odenets_fast.planner import PATH_ENV, PATHS  # noqa: E402
from odenets_fast.triton_backend import WEIGHT_GRADS_ENV  # noqa: E402


def main() -> None:
    for path, method in ((path, method) for path in PATHS for method in ("euler", "heun")):
        os.environ[PATH_ENV] = path
        for backward, anchor_every, grads in (("backprop", None, "partials"), ("adjoint", None, "partials"),
                                              ("adjoint", None, "workspace"), ("adjoint", 2, "atomic")):  # fmt: skip
            deterministic = grads != "atomic"
            os.environ[WEIGHT_GRADS_ENV] = grads if deterministic else ""
            tensors = [t.cuda().requires_grad_(True) for t in make_stack(B=37, q=24, m=40, L=4, method=method,
                                                                        bias=True, dtype=torch.float32)]  # fmt: skip
            out = ode_mlp(*tensors, method=method, backward=backward, anchor_every=anchor_every,
                          deterministic=deterministic, backend="triton")  # fmt: skip
            out.square().sum().backward()
    torch.cuda.synchronize()
    print("sanitize_case: done")


if __name__ == "__main__":
    main()
