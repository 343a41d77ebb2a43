"""Data-parallel training with ``torch.distributed`` (DDP-style gradient all-reduce, gloo on CPU).

Launch with ``torchrun`` (``python -m torch.distributed.run --standalone --nproc_per_node N
-m smoothchain train ... --distributed``): every rank builds the same model from the same seed,
draws the same global mini-batch (same generator), takes its shard (rows rank, rank + N, ...),
computes the gradient of its shard's mean objective, and the gradients are averaged over ranks
with ``all_reduce`` -- equal shards make the average the gradient of the global batch mean
(F eq. 34).  Every rank then runs the same deterministic optimizer step on identical gradients
and weights, so every rank picks the same layer (F Algo. 4.1 line 9) and step;
:meth:`Context.check_same` verifies it after each step (an all-reduce of the chosen layers).
DSGD's hook-captured low-rank factors are local to a rank, so distributed runs use the dense
q = 2 route (``capture="none"``).  Only rank 0 writes metrics, checkpoints and figures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["Context", "in_torchrun"]


def in_torchrun() -> bool:
    """True when the torchrun environment variables are set (WORLD_SIZE, RANK, MASTER_ADDR)."""
    return all(k in os.environ for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"))


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
        import torch.distributed as dist

        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()
