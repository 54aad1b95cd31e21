import numpy as np
import torch

from mtlvision.data.arrays import ImageSet
from mtlvision.data.loader import BatchAugment, Normalize, TensorImages, TrainLoader, eval_batches

CPU = torch.device("cpu")


def _data(n=50, size=8):
    rng = np.random.default_rng(0)
    return TensorImages(ImageSet(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                                 {"t": np.arange(n) % 3}), CPU)


def test_crop_is_a_window_of_the_zero_padded_image():
    x = torch.randint(0, 256, (16, 8, 8, 3), dtype=torch.uint8)
    aug = BatchAugment(crop_padding=2, flip=False)
    out = aug(x, aug.draw(16, torch.Generator().manual_seed(0)))
    padded = torch.nn.functional.pad(x, (0, 0, 2, 2, 2, 2))
    for i in range(16):
        windows = [padded[i, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert not torch.equal(out, x)  # some sample moved


def test_flip_only_when_enabled():
    x = torch.randint(0, 256, (64, 8, 8, 3), dtype=torch.uint8)
    no_flip = BatchAugment(0, flip=False)
    assert torch.equal(no_flip(x, no_flip.draw(64, torch.Generator().manual_seed(0))), x)
    flip = BatchAugment(0, flip=True)
    flipped = flip(x, flip.draw(64, torch.Generator().manual_seed(0)))
    is_flip = [torch.equal(flipped[i], x[i].flip(1)) for i in range(64)]
    is_same = [torch.equal(flipped[i], x[i]) for i in range(64)]
    assert all(a or b for a, b in zip(is_flip, is_same))
    assert 10 < sum(is_flip) < 54


def test_batches_are_deterministic_and_cover_the_epoch():
    data = _data()
    loader = TrainLoader(data, 10, seed=1, stream=0, augment=BatchAugment(1, True))
    steps = loader.natural_steps
    assert steps == 5
    first = [loader.batch(0, s, steps) for s in range(steps)]
    again = TrainLoader(data, 10, seed=1, stream=0, augment=BatchAugment(1, True))
    assert torch.equal(again.batch(0, 3, steps)[0], first[3][0])  # resume mid-epoch: same batch
    seen = torch.cat([b[1]["t"] for b in first])
    assert sorted(seen.tolist()) == sorted((torch.arange(50) % 3).tolist())  # each sample once
    other_epoch = loader.batch(1, 0, steps)[1]["t"]
    assert not torch.equal(torch.cat([loader.batch(1, s, steps)[1]["t"] for s in range(steps)]), seen) \
        or not torch.equal(other_epoch, first[0][1]["t"])


def test_short_stream_cycles_for_more_steps():
    data = _data(n=20)
    loader = TrainLoader(data, 8, seed=0, stream=1, augment=None)
    batches = [loader.batch(0, s, 7)[1]["t"] for s in range(7)]
    assert all(len(b) == 8 for b in batches)


def test_normalize_channels_last_and_values():
    x = torch.randint(0, 256, (4, 6, 6, 3), dtype=torch.uint8)
    norm = Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.3], CPU, channels_last=True)
    y = norm(x)
    assert y.shape == (4, 3, 6, 6) and y.is_contiguous(memory_format=torch.channels_last)
    expect = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) \
        / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)
    assert Normalize([0.5] * 3, [0.2] * 3, CPU, channels_last=False)(x).is_contiguous()


def test_eval_batches_cover_split_in_order():
    data = _data(n=23)
    got = torch.cat([y["t"] for _, y in eval_batches(data, 10)])
    assert torch.equal(got, torch.arange(23) % 3)
