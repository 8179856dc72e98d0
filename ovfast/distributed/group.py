"""The collectives of a tensor-parallel group, and the control channel rank 0 drives it with.

Data collectives run on the device's backend (NCCL on CUDA, gloo on the CPU); they are plain
``torch.distributed`` calls on fixed buffers, so a CUDA graph can capture them. Commands (which
step to run, with what shapes) are small Python objects broadcast from rank 0 over a separate
gloo group, which never enters a graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TensorParallel:
    rank: int
    size: int
    control: dist.ProcessGroup  # gloo, every rank: commands from rank 0 (data collectives use the default group)
    backend: str  # the default group's: "nccl" or "gloo"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place."""
        dist.all_reduce(x)
        return x

    def gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """(T, n) on every rank -> (T, size * n), rank-major along the last dimension."""
        x = x.contiguous()
        if self.backend == "nccl":
            out = torch.empty((self.size, *x.shape), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, x)
            parts = out.unbind(0)
        else:
            parts = [torch.empty_like(x) for _ in range(self.size)]
            dist.all_gather(parts, x)
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` into every rank's ``x``, in place."""
        dist.broadcast(x, src=0)
        return x

    def send(self, message) -> None:
        """Rank 0: a command to every worker."""
        dist.broadcast_object_list([message], src=0, group=self.control)

    def receive(self):
        """A worker: the next command from rank 0 (blocks)."""
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]
