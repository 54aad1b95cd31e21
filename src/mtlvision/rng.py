"""Generators keyed by integers (seed, stream, epoch, step, ...): reproducible, resumable, equal on every rank."""
from __future__ import annotations

import torch


def keyed_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of ints (tuple hashes of ints do not vary between processes)."""
    return torch.Generator().manual_seed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)
