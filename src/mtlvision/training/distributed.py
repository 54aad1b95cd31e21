"""Data-parallel training with torch.distributed, launched by torchrun (gloo on CPU, NCCL on GPU).

Every rank holds a full replica of the model and of the balancing method and takes its own slice of
each global batch (N x data.batch_size rows of the epoch's shared permutation, see `TrainLoader`).
After the forward pass the trainer makes each step equal to one step on the global batch:

* loss values: `global_losses` gives every method the global batch's loss values (the gradients stay
  local), so methods that read loss values (FAMO, GLS, GradNorm, DB-MTL, DWA via the epoch means, ...)
  keep identical state on every rank without knowing about ranks;
* Gramians: feature-space gradient methods sum their T x T Gramian through `StepContext.all_reduce`;
  parameter-space ones average their Jacobian (T x P) instead, which makes their trunk update global;
* gradients: every other parameter gradient is averaged with one flattened all_reduce per dtype
  (`average_gradients`) after the method's backward pass.

PyTorch's DistributedDataParallel wrapper is not used: it averages gradients from hooks on the one
`backward()` per forward pass as they accumulate into `.grad`, while gradient-balancing methods take
per-task gradients with several `torch.autograd.grad` passes (which DDP does not see: the head
parameters it waits for never become ready, and a parameter-space Jacobian must be averaged before its
Gramian is formed) and then set `.grad` themselves. The collectives here run explicitly, at the points
where each family of methods needs them.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..rng import keyed_generator

_owned_group = False  # True when `setup` created the default process group (and `shutdown` must end it)


def launched_by_torchrun() -> bool:
    """True in a worker started by torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def restart_count() -> int:
    """How often torchrun has restarted this worker's group after a failure (`--max-restarts`); 0 otherwise."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def job_id() -> Optional[str]:
    """What stays the same across torchrun's restarts of one job's workers (host, agent process, rendezvous
    id); None outside torchrun."""
    if not launched_by_torchrun():
        return None
    return f"{socket.gethostname()}:{os.getppid()}:{os.environ.get('TORCHELASTIC_RUN_ID', '')}"


def is_main_process() -> bool:
    """Rank 0 of the job (or the only process): the one that prints results."""
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0


class Distributed:
    """This process's place in a data-parallel job (rank 0 of 1 on its own) and its collectives.

    Every collective is a no-op on one process. `comm_s` accumulates the wall time spent in
    all_reduce calls (meaningful on CPU/gloo, where they are synchronous; it includes waiting for the
    slowest rank).
    """

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.world_size = rank, world_size
        self.comm_s = 0.0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files and prints progress."""
        return self.rank == 0

    def _sum_(self, t: torch.Tensor) -> None:
        t0 = time.perf_counter()
        dist.all_reduce(t)
        self.comm_s += time.perf_counter() - t0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over ranks as a new tensor (`t` is left alone); `t` itself on one process."""
        if not self.active:
            return t
        out = t.detach().clone()
        self._sum_(out)
        return out

    def _average_(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors over ranks in place: one flattened all_reduce per dtype."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            self._sum_(flat)
            flat.div_(self.world_size)
            for t, v in zip(group, flat.split([t.numel() for t in group])):
                t.copy_(v.view_as(t))

    def average_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Average the gradients of `params` over ranks (parameters without a gradient are skipped:
        which ones have none is a property of the graph, the same on every rank)."""
        if self.active:
            self._average_([p.grad for p in params if p.grad is not None])

    def average_buffers(self, module: nn.Module) -> None:
        """Average floating-point buffers (BatchNorm running statistics) over ranks.

        BatchNorm normalises each rank's rows with their own statistics, so the running estimates drift
        apart during an epoch; averaging them (an EMA is linear, so this equals averaging every step)
        gives every rank the same model for evaluation and checkpoints.
        """
        if self.active:
            self._average_([b for b in module.buffers() if b.is_floating_point()])

    def any_rank(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when `flag` is true on at least one."""
        if not self.active:
            return flag
        return bool(self.all_reduce(torch.tensor([int(flag)], device=device)).item() > 0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def seed_epoch(self, seed: int, epoch: int) -> None:
        """Give each rank its own global-RNG stream (dropout) for the epoch, keyed by (seed, epoch, rank)
        so a resumed run draws the same numbers. One process keeps its checkpointed RNG stream."""
        if self.active:
            torch.manual_seed(keyed_generator(seed, epoch, self.rank, -2).initial_seed())

    def global_losses(self, losses: dict[str, torch.Tensor], counts: dict[str, torch.Tensor],
                      ) -> dict[str, torch.Tensor]:
        """Per-task losses whose values are the global batch's and whose gradients, averaged over ranks,
        are the global batch loss's gradients.

        Rank r's loss L_r is a mean over its n_r labelled samples; L_r * N n_r / Σn averages over ranks
        to the global mean Σ n_r L_r / Σn, and so do its gradients (the factor is exactly 1 when every
        sample is labelled). Its value is then swapped for the global mean (identical on every rank)
        while its gradient is kept: `x - x.detach()` is exactly 0 with the gradient of x.
        """
        names = list(losses)
        n = torch.stack([counts[k] for k in names]).double()
        local = torch.stack([losses[k].detach() for k in names]).double()
        summed = self.all_reduce(torch.stack([local * n, n]))
        total = summed[1].clamp(min=1)
        value, scale = summed[0] / total, self.world_size * n / total
        out = {}
        for i, k in enumerate(names):
            scaled = losses[k] * scale[i].to(losses[k].dtype)
            out[k] = (scaled - scaled.detach()) + value[i].to(scaled.dtype)
        return out


def setup(device: torch.device) -> tuple[Distributed, torch.device]:
    """This process's Distributed and device.

    Under torchrun with several workers the default process group is created once per process (NCCL
    for CUDA devices, gloo for CPU), unless the caller created one already; a CUDA rank uses
    cuda:LOCAL_RANK whatever index `device` names.
    """
    global _owned_group
    if launched_by_torchrun() and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        store = None
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent keeps one store for every attempt and recent torch no longer scopes the
            # workers' keys by attempt (pytorch/pytorch#135712): a restarted worker could read the failed
            # attempt's addresses and connect to a dead peer. Scope them by the restart count.
            store = dist.PrefixStore(f"mtlvision/attempt_{restart_count()}", next(dist.rendezvous("env://"))[0])
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), device_id=device if cuda else None)
        _owned_group = True
    if dist.is_initialized():
        return Distributed(dist.get_rank(), dist.get_world_size()), device
    return Distributed(), device


def shutdown() -> None:
    """Destroy the process group if `setup` created it (one the caller created is left alone)."""
    global _owned_group
    if _owned_group and dist.is_initialized():
        dist.destroy_process_group()
    _owned_group = False
