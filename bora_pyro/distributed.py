"""Data-parallel SVI across processes with ``torch.distributed`` (launched by ``torchrun``).

Every process (rank) holds the frozen LM and the whole guide, draws the same global batches in the
same order and the same noise (same seeds), and scores only its own rows of each batch
(:meth:`Batch.shard <bora_pyro.data.Batch.shard>`). Every rank samples and scores the global
batch's tasks with the same weights (``BoRA.tasks_plate``) and its rows' likelihood with weight
``num_shards · N / B`` (B: the global batch), so the ranks' average ELBO, and its gradient, is the
single-process ELBO of the global batch: ``fit`` averages the gradients with one ``all_reduce``
per step.

Not ``DistributedDataParallel``: the guide's per-task parameters get gradients only for the global
batch's tasks (the same ones on every rank), so one ``all_reduce`` of Θ's and those ≤ B tasks'
gradients is the whole exchange; DDP's buckets would carry every task's gradient (zeros for the
absent ones) every step, traffic that grows with D.

Outside ``torchrun`` (or with one process) every function here is the identity.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from .errors import ConfigError


def init_from_env(device: str) -> str:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``MASTER_ADDR``, …), if there is one: nccl for CUDA devices, gloo for the CPU.

    Returns:
        this process's device: ``cuda:LOCAL_RANK`` for ``"cuda"``, otherwise ``device`` unchanged.

    Raises:
        ConfigError: ``device`` names one GPU (``cuda:N``), which every process would share.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.startswith("cuda:"):
        raise ConfigError(f"--device {device} under torchrun: every process needs its own GPU; pass --device cuda "
                          "(process k of a node then uses cuda:k)")
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this is rank 0, the one process that writes files and shows progress."""
    return world()[0] == 0


def collective_device() -> torch.device:
    """Where tensors must be for the process group's collectives (nccl: this rank's GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``tensor`` over all ranks (a new tensor on ``tensor``'s device);
    ``tensor`` itself outside a process group. Every rank must call it."""
    if world()[1] == 1:
        return tensor
    total = tensor.to(collective_device(), copy=True)
    dist.all_reduce(total)
    return total.to(tensor.device)


def average_gradients(parameters: list[torch.Tensor]) -> None:
    """Replace every ``.grad`` by its average over the ranks: one ``all_reduce`` of their
    concatenation. A parameter with a gradient on any rank gets one on every rank (zeros where
    it had none: a rank whose share of the batch is empty, under a flat prior, has no gradient
    at all), so that every rank reduces the same parameters in the same order."""
    num_ranks = world()[1]
    if num_ranks == 1:
        return
    device = parameters[0].device if parameters else torch.device("cpu")
    has_grad = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float32, device=device)
    for parameter, anywhere in zip(parameters, sum_over_ranks(has_grad).tolist(), strict=True):
        if anywhere and parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = sum_over_ranks(torch.cat([grad.reshape(-1) for grad in grads])).div_(num_ranks)
    for grad, averaged in zip(grads, flat.split([grad.numel() for grad in grads]), strict=True):
        grad.copy_(averaged.view_as(grad))


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
    if world()[1] > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first, the others after it (e.g. rank 0 downloads or builds a cache
    the others then read)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
