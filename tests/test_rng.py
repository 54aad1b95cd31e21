"""The keyed-RNG scheme: an explicit CPython tuple hash, so seeds do not depend on the Python version."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mtlvision.rng import int_hash, key_hash, keyed_generator

EDGES = [0, 1, -1, -2, 2, 2**61 - 2, 2**61 - 1, 2**61, -(2**61 - 1), -(2**61), 2**63 - 1, 2**63, -(2**63),
         2**64 - 1, 2**64, 2**64 + 7, -(2**64), 2**200 + 3, -(2**200), 1546275796]


def test_int_hash_is_pythons():
    for n in EDGES + list(range(-1000, 1000)):
        assert int_hash(n) == hash(n)


def test_key_hash_is_pythons_tuple_hash_on_many_keys():
    """Equal to the built-in hash on this (64-bit CPython >= 3.8) interpreter: the draws are unchanged."""
    r = random.Random(0)
    for length in range(7):
        for _ in range(2000):
            key = tuple(r.choice(EDGES) if r.random() < 0.3 else
                        r.randint(-2**70, 2**70) if r.random() < 0.3 else r.randint(-50, 10**6)
                        for _ in range(length))
            assert key_hash(key) == hash(key), key
    # the keys mtlvision draws with: (seed, stream, epoch, k), (seed, epoch, rank, -2), (seed, epoch, step)
    for key in [(0, 0, 0, 0), (42, 1, 3, -1), (7, 2, 1, -2), (2**32, 5, 9), (123, 0, 17, -3), (1, 2, 3, 4, -1)]:
        assert key_hash(key) == hash(key)


def test_integer_like_keys_and_refusals():
    assert key_hash((np.int64(5), True, np.uint8(3))) == hash((5, 1, 3))
    with pytest.raises(TypeError):
        key_hash((1.5,))


def test_keyed_generator_draws():
    a = torch.randperm(20, generator=keyed_generator(3, 1, 4))
    assert torch.equal(a, torch.randperm(20, generator=keyed_generator(3, 1, 4)))
    assert not torch.equal(a, torch.randperm(20, generator=keyed_generator(3, 1, 5)))
    assert keyed_generator(3, 1, 4).initial_seed() == hash((3, 1, 4)) & 0x7FFF_FFFF_FFFF_FFFF
    # pinned values: the same on every Python version and platform
    assert [keyed_generator(*k).initial_seed() for k in [(0, 0, 0), (1, 2, 3, -1), (2**64, -5)]] == [
        3010437511937009226, 4543913971763897871, 981364396023642207]
