"""Real ImageNet weights, offline: timm's efficientnet_lite0 from the shared data folder's safetensors file, loaded
through the local-file path of the timm backbone (skipped where the shared data is absent)."""
import io
import tarfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from mtlvision.models.backbones import build_backbone

ANIMALS = ("bird", "cat", "deer", "dog", "frog", "horse")
VEHICLES = ("airplane", "automobile", "ship", "truck")
IMAGENET_ANIMALS = 398  # ImageNet-1k classes 0..397 are animals (tench .. puffer), 398.. objects and scenes
SIZE = 128


def _cifar_test_images(root, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `per_class` CIFAR-10 test JPEGs of each class (uint8 (N, 32, 32, 3)) and whether each is an animal."""
    found: dict[str, list[np.ndarray]] = {c: [] for c in ANIMALS + VEHICLES}
    with tarfile.open(root / "cifar10" / "test.tar.gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and len(found.get(parts[1], [0] * per_class)) < per_class:
                found[parts[1]].append(np.array(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")))
            if all(len(v) == per_class for v in found.values()):
                break
    images = torch.from_numpy(np.stack([im for c in found for im in found[c]]))
    return images, torch.tensor([c in ANIMALS for c in found for _ in found[c]])


def _animal_accuracy(backbone, state, images, is_animal) -> float:
    """Accuracy of 'animal or vehicle?' answered by the file's ImageNet classifier on the backbone's features:
    P(animal) = the probability of ImageNet's animal classes."""
    norm = backbone.normalization
    x = F.interpolate(images.permute(0, 3, 1, 2).float() / 255, size=SIZE, mode="bilinear", antialias=True)
    x = (x - torch.tensor(norm.mean).view(1, -1, 1, 1)) / torch.tensor(norm.std).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = F.linear(backbone.eval()(x), state["classifier.weight"], state["classifier.bias"])
    p_animal = logits.softmax(-1)[:, :IMAGENET_ANIMALS].sum(-1)
    return ((p_animal > 0.5) == is_animal).float().mean().item()


def test_efficientnet_lite0_imagenet_weights_from_a_local_file(shared_data):
    path = shared_data / "pretrained" / "efficientnet_lite0.safetensors"
    spec = {"name": "timm", "model": "efficientnet_lite0", "weights": str(path), "mean": [0.5] * 3, "std": [0.5] * 3}
    backbone = build_backbone(spec, 3, SIZE)
    state = load_file(str(path))
    assert (backbone.normalization.mean, backbone.normalization.std) == ((0.5,) * 3, (0.5,) * 3)
    report = backbone.weights_report
    assert report.loaded == len(state) - 2 and not report.missing and not report.unexpected  # all but the classifier
    images, is_animal = _cifar_test_images(shared_data, per_class=6)
    pretrained = _animal_accuracy(backbone, state, images, is_animal)
    torch.manual_seed(0)
    scratch = _animal_accuracy(build_backbone(spec, 3, SIZE, load_weights=False), state, images, is_animal)
    # measured: 0.90 with the weights; a random init gives one answer for every image (0.40 here)
    assert pretrained >= 0.75 and scratch <= 0.65, (pretrained, scratch)


def test_efficientnet_lite0_weights_for_grayscale_input(shared_data):
    """One input channel: timm's adapt_input_conv sums the first convolution over RGB, and the normalisation is
    averaged the same way."""
    path = shared_data / "pretrained" / "efficientnet_lite0.safetensors"
    backbone = build_backbone({"name": "timm", "model": "efficientnet_lite0", "weights": str(path),
                               "mean": [0.5] * 3, "std": [0.5] * 3}, 1, 64)
    stem = load_file(str(path))["conv_stem.weight"]
    torch.testing.assert_close(backbone.stem.conv_stem.weight, stem.sum(1, keepdim=True))
    assert (backbone.normalization.mean, backbone.normalization.std) == ((0.5,), (0.5,))
