"""Where training runs: the device (cpu or cuda, optional AMP) and, under torchrun, the ranks of a
DistributedDataParallel run (nccl on CUDA, gloo on CPU). One process is one rank; rank 0 evaluates and writes.

    torchrun --standalone --nproc_per_node=2 -m export.train --data DIR --out ckpt.pt          # CPU, gloo
    torchrun --nproc_per_node=8 --nnodes=2 ... -m export.train --data DIR --device cuda --amp --out ckpt.pt

Reproducibility: on CPU a run is bitwise reproducible for a given world size, thread count and library versions
(gloo reduces in a fixed order). A different world size gives another (equally trained) model: BatchNorm sees each
rank's share of the global batch. CUDA runs are not bitwise reproducible (cuDNN and atomics choose their order);
the checkpoint records which it was.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from edge_pfm.errors import InvalidArgument, UnavailableError
from export.train_plan import DEVICES


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp: bool = False
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def deterministic(self) -> bool:
        return self.device.type == "cpu"

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def all_sum(self, *values: float) -> list[float]:
        """Sum of each value over the ranks (the epoch's loss over the global batch)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def to_dict(self) -> dict:
        return {"device": str(self.device), "amp": self.amp, "world_size": self.world,
                "deterministic": self.deterministic}

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def runtime(device: str = "auto", amp: bool = False) -> Runtime:
    """The device asked for (auto: cuda when there is one), and the rank torchrun gave this process, if any."""
    if device not in DEVICES:
        raise InvalidArgument(f"--device must be one of {DEVICES}, got {device!r}")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise UnavailableError("--device cuda: PyTorch sees no CUDA device here (torch.cuda.is_available() is False; "
                               f"this torch is {torch.__version__}). Use --device cpu, or install a CUDA build of torch")
    use_cuda = device == "cuda" or (device == "auto" and cuda)
    if amp and not use_cuda:
        raise InvalidArgument("--amp is mixed precision on CUDA (float16 with a gradient scaler); on CPU train in "
                              "float32 (drop --amp)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return Runtime(dev, amp, rank, world)


def distributed_sampler(dataset, seed: int, epoch: int, rank: int = 0, world: int = 1
                        ) -> torch.utils.data.DistributedSampler:
    """This rank's share of a seeded epoch order (one rank included): the same permutation on every rank, padded
    to a multiple of `world` with its first indices, rank r taking every world-th from r."""
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return sampler


class MultiTask(torch.nn.Module):
    """model.forward_multitask as forward: DistributedDataParallel synchronises gradients of what its forward ran."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, white: torch.Tensor, fluo: torch.Tensor):
        return self.model.forward_multitask(white, fluo)


def parallel(model: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    """The module the training step calls: DDP over MultiTask on several ranks, MultiTask alone on one."""
    step = MultiTask(model)
    if rt.world == 1:
        return step
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    # every parameter is used each step: a lesion head exists only with masks, and an unknown mask's loss is 0 * map
    return torch.nn.parallel.DistributedDataParallel(step, device_ids=ids)
