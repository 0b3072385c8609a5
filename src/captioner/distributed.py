"""torch.distributed, for training and captioning across processes (``torchrun`` or
``captioner train --nproc N``): this process's place in the run, and the few collective steps the
project uses. A plain run is rank 0 of a world of 1, where every method is a no-op."""

from __future__ import annotations

import os

import torch

from captioner.runtime import pick_device


class Dist:
    """This process's place in a torch.distributed run: one process per device, started by
    ``torchrun`` (or ``captioner train --nproc N``), which sets RANK, WORLD_SIZE and LOCAL_RANK.
    A plain run is rank 0 of a world of 1, and every method is then a no-op."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_name: str = "auto") -> tuple[Dist, torch.device]:
        """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA); pick the device."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(), pick_device(device_name)
        import torch.distributed as dist

        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        device = pick_device(device_name)
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu":  # N processes share the cores: one thread pool each would oversubscribe
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        return cls(rank, world, local), device

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj`, on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def gather_objects(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...], on every rank (small picklable values only)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        box = [None] * self.world
        dist.all_gather_object(box, obj)
        return box

    def average_gradients(self, params) -> None:
        """All-reduce the gradients of `params` to their mean over ranks (for code paths that do
        not go through DistributedDataParallel, such as self-critical sampling)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= self.world

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
