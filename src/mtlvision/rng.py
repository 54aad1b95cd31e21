"""Generators keyed by integers (seed, stream, epoch, step, ...): reproducible, resumable, equal on every rank.

Every keyed draw in mtlvision (sample order and augmentation, per-rank dropout seeds, the random task orders
of PCGrad and GradVac, GradDrop's thresholds, RLW's weights) comes from `keyed_generator(*key)`: a CPU
torch.Generator seeded with `key_hash(key)`, a fixed function of the integers.

`key_hash` is CPython 3.8+'s hash of a tuple of ints on a 64-bit build (the xxHash-based `tuplehash` of
Objects/tupleobject.c over `hash(int)`), written out here so it cannot change with the Python version,
the platform's word size or PYTHONHASHSEED (int hashes are not randomised, but nothing promises the
algorithm). Earlier versions seeded from the built-in `hash(key)`; the draws are bit-for-bit the same.
"""
from __future__ import annotations

import operator

import torch

_MASK64 = (1 << 64) - 1
_MODULUS = (1 << 61) - 1  # sys.hash_info.modulus on 64-bit builds
_PRIME1 = 11400714785074694791  # _PyHASH_XXPRIME_1
_PRIME2 = 14029467366897019727  # _PyHASH_XXPRIME_2
_PRIME5 = 2870177450012600261  # _PyHASH_XXPRIME_5


def int_hash(n: int) -> int:
    """CPython's hash of an int (64-bit): sign(n) * (|n| mod 2^61 − 1), and −2 where that is −1."""
    h = abs(n) % _MODULUS
    h = -h if n < 0 else h
    return -2 if h == -1 else h


def key_hash(key: tuple[int, ...]) -> int:
    """CPython 3.8+'s `hash(key)` for a tuple of ints (64-bit `tuplehash`), as a signed 64-bit int."""
    acc = _PRIME5
    for item in key:
        lane = int_hash(operator.index(item)) & _MASK64
        acc = (acc + lane * _PRIME2) & _MASK64
        acc = ((acc << 31) | (acc >> 33)) & _MASK64  # rotate left by 31
        acc = (acc * _PRIME1) & _MASK64
    acc = (acc + (len(key) ^ (_PRIME5 ^ 3527539))) & _MASK64
    if acc == _MASK64:  # -1 is CPython's error value
        return 1546275796
    return acc - (1 << 64) if acc >> 63 else acc


def keyed_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of ints (the same seed on every Python version and platform)."""
    return torch.Generator().manual_seed(key_hash(key) & 0x7FFF_FFFF_FFFF_FFFF)
