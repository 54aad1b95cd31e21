"""Accuracy cross-check: CIFAR-10 trained by a plain torchvision pipeline that shares no code with mtlvision.

The reference is the canonical recipe: `torchvision.datasets.ImageFolder` on the extracted JPEGs,
`RandomCrop(32, padding=4)` + `RandomHorizontalFlip` + `Normalize` per sample in DataLoader workers,
torchvision's ResNet-18 layout with the CIFAR stem (3x3 stride-1 conv, no max-pool) and PyTorch's default
initialisation, SGD-Nesterov with weight decay on every parameter and torch's one-cycle schedule,
cross-entropy with label smoothing, all 50,000 training images, the last epoch's test accuracy.
Compare it with `mtlvision train` on the same data and budget (e.g. configs/cifar10_gpu.yaml with the
`hps` architecture and the vehicle task disabled): if mtlvision's data cache, batch augmentation, model
or trainer lost accuracy, the two would differ by more than the seed spread. It also says what this data
allows: the shared CIFAR-10 files are 4:2:0 quality-75 JPEG re-encodings.

Example:  python benchmarks/cifar10_reference.py --device cuda --epochs 30            (GPU: bf16, batch 512)
          ... --limit 47500 / --no-decay-norms / --max-momentum 0.9 / --mtlvision-init
                                                                 (mtlvision's choices, one at a time)
          python benchmarks/cifar10_reference.py --width 0.25 --epochs 2 --limit 5000  (short CPU run)
          python benchmarks/cifar10_reference.py --smoke    (100 random JPEGs, tiny network: does it run?)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms as T

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # the usual CIFAR-10 statistics


def resnet18_cifar(width: float, classes: int, mtlvision_init: bool) -> torch.nn.Module:
    """torchvision's ResNet-18 layout with the CIFAR stem (3x3 stride-1 conv, no max-pool), channels x `width`.

    The stem, stages and classifier are rebuilt, so they start from PyTorch's default initialisation;
    `mtlvision_init` uses mtlvision's instead (Kaiming-normal fan-out convolutions, each block's last BN
    weight zero)."""
    block = torchvision.models.resnet.BasicBlock
    chans = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
    net = torchvision.models.ResNet(block, [2, 2, 2, 2], num_classes=classes)
    net.conv1 = torch.nn.Conv2d(3, chans[0], 3, 1, 1, bias=False)
    net.bn1 = torch.nn.BatchNorm2d(chans[0])
    net.maxpool = torch.nn.Identity()
    net.inplanes = chans[0]
    for i, c in enumerate(chans):
        setattr(net, f"layer{i + 1}", net._make_layer(block, c, 2, stride=1 if i == 0 else 2))
    net.fc = torch.nn.Linear(chans[3], classes)
    if mtlvision_init:
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, block):
                torch.nn.init.zeros_(m.bn2.weight)
    return net


def loaders(root: Path, batch: int, workers: int, limit: int, pin: bool) -> tuple[torch.utils.data.DataLoader, ...]:
    norm = [T.ToTensor(), T.Normalize(MEAN, STD)]
    train = torchvision.datasets.ImageFolder(
        str(root / "train"), T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *norm]))
    test = torchvision.datasets.ImageFolder(str(root / "test"), T.Compose(norm))
    if train.classes != test.classes:
        raise SystemExit(f"train and test classes differ: {train.classes} vs {test.classes}")
    if limit:
        train = torch.utils.data.Subset(train, torch.randperm(len(train))[:limit].tolist())
    kw = {"num_workers": workers, "pin_memory": pin, "persistent_workers": workers > 0}
    return (torch.utils.data.DataLoader(train, batch, shuffle=True, drop_last=True, **kw),
            torch.utils.data.DataLoader(test, 1000, **kw))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(os.environ.get("MTLVISION_DATA", "../shared/data"), "cifar10"),
                    help="folder with train.tar.gz and test.tar.gz (default $MTLVISION_DATA/cifar10)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=0.4, help="one-cycle peak (default 0.4, for batch 512)")
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--no-decay-norms", action="store_true",
                    help="no weight decay on norms and biases (as mtlvision); default: decay every parameter")
    ap.add_argument("--max-momentum", type=float, default=0.95,
                    help="one-cycle momentum range 0.85..this (torch's default 0.95; mtlvision uses 0.9)")
    ap.add_argument("--mtlvision-init", action="store_true",
                    help="mtlvision's initialisation (Kaiming fan-out convs, zero last BN per block)")
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--limit", type=int, default=0, help="train on this many random images (0: all)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true",
                    help="1 epoch of a width-0.0625 network on 100 random JPEGs in CIFAR-10's layout (made on the "
                         "fly unless --data is given), on the CPU: checks that the script works")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    smoke_dir = None
    if args.smoke:
        args.device, args.epochs, args.batch_size, args.width, args.workers = "cpu", 1, 8, 0.0625, 0
        torch.set_num_threads(1)  # tiny ops on several threads of a busy machine spin
        if "--data" not in (argv if argv is not None else sys.argv[1:]):
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from _smoke import make_tiny_cifar10  # numpy and PIL only: no mtlvision code

            smoke_dir = tempfile.TemporaryDirectory(prefix="cifar10-ref-smoke-")
            args.data = str(make_tiny_cifar10(Path(smoke_dir.name)))
    if min(args.epochs, args.batch_size) < 1 or args.width <= 0 or args.limit < 0 or args.workers < 0:
        ap.error("--epochs and --batch-size must be >= 1, --width > 0, --limit and --workers >= 0")
    if not all((Path(args.data) / f"{s}.tar.gz").is_file() for s in ("train", "test")):
        ap.error(f"--data {args.data}: expected train.tar.gz and test.tar.gz there (set MTLVISION_DATA or --data)")

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory(prefix="cifar10-ref-") as tmp:
        for split in ("train", "test"):
            with tarfile.open(Path(args.data) / f"{split}.tar.gz") as tf:
                tf.extractall(tmp, filter="data")
        train, test = loaders(Path(tmp), args.batch_size, args.workers, args.limit, cuda)
        if args.epochs * len(train) < 8:  # torch's OneCycleLR divides by zero on a handful of steps
            ap.error(f"only {args.epochs * len(train)} training steps: raise --epochs or --limit")
        model = resnet18_cifar(args.width, 10, args.mtlvision_init).to(device, memory_format=torch.channels_last)
        params = list(model.parameters())
        groups = ([{"params": [p for p in params if p.ndim > 1]},
                   {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
                  if args.no_decay_norms else [{"params": params}])
        opt = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * len(train),
                                                    pct_start=0.25, max_momentum=args.max_momentum)
        autocast = torch.autocast("cuda", torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
        t0, seen = time.perf_counter(), 0
        for epoch in range(args.epochs):
            model.train()
            for x, y in train:
                x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                y = y.to(device, non_blocking=True)
                with autocast:
                    loss = F.cross_entropy(model(x).float(), y, label_smoothing=args.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                seen += len(y)
            print(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.3f}", file=sys.stderr, flush=True)
        if cuda:
            torch.cuda.synchronize()
        train_s = time.perf_counter() - t0
        model.eval()
        correct = total = 0
        with torch.no_grad(), autocast:
            for x, y in test:
                pred = model(x.to(device).contiguous(memory_format=torch.channels_last)).argmax(1).cpu()
                correct += int((pred == y).sum())
                total += len(y)
    print(json.dumps({"benchmark": "cifar10_reference", "test_accuracy": correct / total, "epochs": args.epochs,
                      "train_images": len(train.dataset), "batch_size": args.batch_size, "lr": args.lr,
                      "width": args.width, "decay_norms": not args.no_decay_norms,
                      "max_momentum": args.max_momentum,
                      "mtlvision_init": args.mtlvision_init, "train_wall_s": round(train_s, 1),
                      "train_images_per_s": round(seen / train_s), "device": torch.cuda.get_device_name(device)
                      if cuda else "cpu", "torch": torch.__version__, "smoke": args.smoke}, indent=1))
    if smoke_dir is not None:
        smoke_dir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
