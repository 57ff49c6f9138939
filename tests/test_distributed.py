"""DistributedDataParallel and FSDP2 (gloo, 2 CPU processes): adjoint-mode gradients equal
single-process training on the concatenated batch."""

import gc
import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from odenets_fast import AdjointResidualStack, ODEMLP

WORLD = 2


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "odemlp":
        return ODEMLP(6, 12, 8, init="smooth", bias=True, dtype=torch.float64)
    blocks = [nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 6)) for _ in range(5)]
    return AdjointResidualStack(blocks, method="heun").double()


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * 5, 6, generator=gen, dtype=torch.float64), torch.randn(WORLD * 5, 6, generator=gen,
                                                                                       dtype=torch.float64)


def _loss(model, x, y):
    return (model(x) - y).square().sum(-1).mean()


KINDS = ("odemlp", "stack")
WRAPPERS = ("ddp", "fsdp")


def _wrap(model: nn.Module, wrapper: str, mesh) -> nn.Module:
    if wrapper == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    # FSDP2 shards every parameter along dim 0: for ODEMLP that is the depth of W, V, b, c
    return fully_shard(model, mesh=mesh)


def _full_grads(model: nn.Module, wrapper: str) -> list:
    if wrapper == "ddp":
        return [p.grad for p in model.module.parameters()]
    return [p.grad.full_tensor() for p in model.parameters()]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two workers on a 2-core CI machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        for kind in KINDS:
            for wrapper in WRAPPERS:
                model = _wrap(_model(kind), wrapper, mesh)
                x, y = _data()
                local = slice(rank * 5, (rank + 1) * 5)
                _loss(model, x[local], y[local]).backward()
                torch.save(_full_grads(model, wrapper), os.path.join(out_dir, f"{kind}-{wrapper}-rank{rank}.pt"))
                # DDP's reducer holds the process group: drop it now, or the group outlives
                # destroy_process_group and its gloo threads are torn down at interpreter exit.
                del model
        dist.barrier()
    finally:
        dist.destroy_process_group()
        gc.collect()  # free cyclic garbage holding gloo work objects before the interpreter exits


@pytest.fixture(scope="module")
def parallel_grads():
    # One spawn for every model and wrapper: starting the processes is most of the cost. Gloo picks
    # its interface from the machine's hostname by default; pinning it to loopback keeps the test
    # independent of the CI machine's network setup (a worker aborted there with SIGABRT).
    with pytest.MonkeyPatch.context() as env, tempfile.TemporaryDirectory() as tmp:
        env.setenv("GLOO_SOCKET_IFNAME", "lo")
        try:
            mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        except mp.ProcessExitedException as err:
            # A worker killed by a signal (not a Python error: those propagate) once aborted in gloo
            # on CI and never here; one more attempt, reported, and a second failure fails the test.
            warnings.warn(f"retrying the 2-process run once after: {err}")
            mp.spawn(_worker, args=(os.path.join(tmp, "init2"), tmp), nprocs=WORLD, join=True)
        return {
            (kind, wrapper): [torch.load(os.path.join(tmp, f"{kind}-{wrapper}-rank{r}.pt")) for r in range(WORLD)]
            for kind in KINDS for wrapper in WRAPPERS
        }  # fmt: skip


@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("kind", KINDS)
def test_data_parallel_gradients_equal_single_process(kind, wrapper, parallel_grads):
    model = _model(kind)
    _loss(model, *_data()).backward()
    for p, *per_rank in zip(model.parameters(), *parallel_grads[kind, wrapper]):
        for g in per_rank:
            torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)
