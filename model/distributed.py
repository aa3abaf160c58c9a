"""Training as one process, or as one of N ranks started by torchrun: who this process is, and the
few collective steps the training loop needs.

    torchrun --nproc-per-node 4 -m model.train ...      # or python -m torch.distributed.run

torchrun starts one process per rank and tells each who it is through RANK, WORLD_SIZE and
LOCAL_RANK (and where rank 0 listens, through MASTER_ADDR and MASTER_PORT). Without those variables
this process is the only one and every collective here does nothing. The rules of a run:

- every rank computes its slice of each global batch; DistributedDataParallel averages the
  gradients, so all ranks take the same optimizer step and keep the same weights;
- rank 0 alone writes (checkpoints, metrics, sample grids, printed lines, the exported weights);
- what steers the loop and is not the same everywhere by construction (the clock) is rank 0's,
  broadcast, so that every rank takes the same steps and none waits in a collective the others skipped.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    rank: int = 0  # this process's place among all ranks, 0..size-1
    size: int = 1  # number of ranks (WORLD_SIZE)
    local_rank: int = 0  # place among the ranks on this host: its GPU
    launched: bool = False  # started by torchrun: a process group joins the ranks

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> World:
        """The world torchrun describes in ``env``; a single process when it describes none."""
        present = [name for name in TORCHRUN_VARIABLES if name in env]
        if not present:
            return cls()
        if len(present) < len(TORCHRUN_VARIABLES):
            raise ValueError(f"torchrun sets all of {', '.join(TORCHRUN_VARIABLES)}; found only {', '.join(present)}")
        world = cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), launched=True)
        if not 0 <= world.rank < world.size:
            raise ValueError(f"RANK must be in 0..{world.size - 1}, got {world.rank}")
        return world

    @property
    def is_main(self) -> bool:
        """Whether this process writes: rank 0, or the only process."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: ``cuda:LOCAL_RANK`` under torchrun on a GPU host, else ``device``."""
        if not self.launched or device.type != "cuda":
            return device
        if device.index is not None:
            raise ValueError(
                f"under torchrun each rank uses cuda:LOCAL_RANK, so --device {device} cannot be honoured; "
                "pass --device cuda (or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES"
            )
        if self.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {self.local_rank} has no GPU: this host has {torch.cuda.device_count()}; "
                "start at most that many processes per node"
            )
        return torch.device("cuda", self.local_rank)

    def per_rank_batch(self, global_batch: int) -> int:
        """The rows of a global batch that each rank computes."""
        if global_batch % self.size:
            raise ValueError(
                f"--batch-size {global_batch} does not divide among {self.size} ranks; use a multiple of {self.size}"
            )
        return global_batch // self.size

    def part(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a tensor of global-batch rows."""
        n = self.per_rank_batch(len(rows))
        return rows[self.rank * n : (self.rank + 1) * n]


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join torchrun's ranks for the block, NCCL on CUDA and gloo otherwise, and leave cleanly
    whatever happens; a single process joins nothing."""
    if not world.launched:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method="env://", device_id=device)
    else:
        dist.init_process_group("gloo", init_method="env://")
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here."""
    if dist.is_initialized():
        dist.barrier()


def broadcast(value: float, device: torch.device) -> float:
    """Rank 0's ``value``, on every rank."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.item()


def average(values: list[float], device: torch.device) -> list[float]:
    """The mean over ranks of each of ``values`` (gloo has no AVG: a sum, divided)."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return (tensor / dist.get_world_size()).tolist()
