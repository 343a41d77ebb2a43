"""Data-parallel training with ``torch.distributed`` (DDP-style gradient all-reduce, gloo on CPU).

Launch with ``smoothchain train --nproc N ...`` (:func:`launch`: N local processes, one-line
errors) or ``torchrun`` (``python -m torch.distributed.run --standalone --nproc_per_node N
-m smoothchain train ...``): every rank builds the same model from the same seed,
draws the same global mini-batch (same generator), takes its shard (rows rank, rank + N, ...),
computes the gradient of its shard's mean objective, and the gradients are averaged over ranks
with ``all_reduce`` -- equal shards make the average the gradient of the global batch mean
(F eq. 34).  Every rank then runs the same deterministic optimizer step on identical gradients
and weights, so every rank picks the same layer (F Algo. 4.1 line 9) and step;
:meth:`Context.check_same` verifies it after each step (an all-reduce of the chosen layers).
DSGD's hook-captured low-rank factors are local to a rank, so distributed runs use the dense
q = 2 route (``capture="none"``).  Only rank 0 writes metrics, checkpoints and figures.

:meth:`Context.close` ends a run cleanly: a barrier, then ``destroy_process_group``, which
frees the group -- and joins gloo's threads -- only if nothing else holds it; see
:func:`_import_lazy_torch_modules` for what did.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["Context", "in_torchrun", "launch"]


def in_torchrun() -> bool:
    """True when the torchrun environment variables are set (WORLD_SIZE, RANK, MASTER_ADDR)."""
    return all(k in os.environ for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"))


def _import_lazy_torch_modules() -> None:
    """Do, *before* the process group exists, the lazy imports that ``torch.optim`` performs.

    Constructing a ``torch.optim.Optimizer`` imports ``torch._dynamo`` lazily, and some of the
    ~800 modules that pulls in evaluate ``dist.group.WORLD`` at import time (e.g. as default
    arguments).  Imported after ``init_process_group`` they keep ~10 references to the process
    group, so ``destroy_process_group`` cannot free it: gloo's worker threads survive until
    interpreter finalisation, and one of them releasing a tensor then needs the GIL of a
    finalising interpreter -> "terminate called without an active exception" (SIGABRT) at exit.
    Imported first, they see ``WORLD = None`` and hold nothing.  The imports are triggered
    through the public API only: a throwaway optimizer, built and stepped once."""
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.0)
    opt.zero_grad()
    p.grad = torch.zeros(1)
    opt.step()


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    initialized_here: bool = False

    @classmethod
    def single(cls) -> "Context":
        return cls()

    @classmethod
    def from_env(cls) -> "Context":
        """Join the process group torchrun describes (gloo backend); a single process otherwise."""
        import torch.distributed as dist

        if not in_torchrun():
            return cls()
        ws = int(os.environ["WORLD_SIZE"])
        if ws == 1:
            return cls()
        here = False
        if not dist.is_initialized():
            _import_lazy_torch_modules()
            dist.init_process_group("gloo")
            here = True
        return cls(dist.get_rank(), dist.get_world_size(), here)

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.rank:: self.world_size]

    def average_gradients(self, model: torch.nn.Module) -> None:
        import torch.distributed as dist

        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(self.world_size)

    def average_scalar(self, value: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / self.world_size

    def check_same(self, layers: list[int]) -> None:
        """Raise if the ranks updated different layers in this step."""
        import torch.distributed as dist

        t = torch.zeros(8, dtype=torch.int64)
        for i in layers[:8]:
            t[i - 1] = 1
        lo, hi = t.clone(), t.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError(f"rank {self.rank}: ranks chose different layers ({layers})")

    def close(self) -> None:
        """Leave the process group: a barrier (no rank tears its gloo pairs down while another
        still talks to it), then ``destroy_process_group``.  Without this, gloo's threads are
        still alive at interpreter exit and a rank can die with "terminate called without an
        active exception" (SIGABRT) after training finished.  Idempotent."""
        import torch.distributed as dist

        if not (self.initialized_here and dist.is_initialized()):
            return
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
            self.initialized_here = False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: Sequence[str], nproc: int, *, poll: float = 0.05) -> int:
    """Run ``python -m smoothchain *argv`` as ``nproc`` local ranks of one gloo group.

    The environment torchrun would set (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT`` on a free localhost port) is given to each child; their
    output goes straight to this terminal.  When a rank fails the others are stopped (they would
    wait for it in a collective) and its exit status is returned, so a bad input is the one line
    rank 0 prints (the CLI's other ranks stay quiet on bad input) with no launcher report.
    Ctrl-C stops every rank.
    """
    env = dict(os.environ, WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen([sys.executable, "-m", "smoothchain", *argv],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nproc)]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                break
            time.sleep(poll)
    except KeyboardInterrupt:
        failed = [128 + signal.SIGINT]
    for p in procs:  # a rank still waiting for a failed one would wait for its collective
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return failed[0] if failed else 0
