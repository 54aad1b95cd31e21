"""Where a run executes: device, numeric precision, threads, cuDNN flags and the data-parallel group."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch

from ..config import TrainConfig
from ..device import resolve_device
from . import distributed
from .distributed import Distributed


@dataclasses.dataclass
class Runtime:
    device: torch.device
    dist: Distributed
    amp_dtype: Optional[torch.dtype]  # bf16 autocast, or None for full fp32

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def restarted(self) -> bool:
        """True on every rank when torchrun restarted any rank's worker group after a failure."""
        return self.dist.any_rank(distributed.restart_count() > 0, self.device)


def setup_runtime(tc: TrainConfig) -> Runtime:
    """Join the data-parallel group (under torchrun), pick the device, set threads, precision and cuDNN."""
    dist, device = distributed.setup(resolve_device(tc.device))
    if tc.threads:
        torch.set_num_threads(tc.threads)
    amp = torch.bfloat16 if (tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")) else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not tc.deterministic
        torch.backends.cudnn.deterministic = tc.deterministic
        tf32 = tc.precision != "fp32"  # fp32 means fp32: no TF32 matmuls/convolutions
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    return Runtime(device, dist, amp)
