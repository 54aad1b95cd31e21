"""Training-step overhead of mtlvision versus a plain PyTorch loop, on the same network (CPU, fp32).

Measured: ms per training step of
  mtlvision  the Trainer's own code on an in-memory random uint8 dataset (one epoch = --steps steps):
             `--mtl-path epoch` (default) times whole `Trainer.train_epoch` calls: `Trainer.train_step`
             (`next_batch`: loader index_select + pad/crop/flip + Normalize; `step_on`: forward -> Task.loss
             per task -> balancer.backward -> optimizer.step -> scheduler.step) plus the epoch loop's metric
             sums, NaN tracking and every-log_every logging; `--mtl-path step` times `Trainer.train_step` alone.
  plain      a ~15-line PyTorch loop on the SAME network (mtlvision.models.build_model, same config and
             seed, so same initial weights): pre-made normalised channels_last float batches, summed
             cross-entropy, SGD step. No augmentation, no scheduler, no metrics.
Both run in one process, interleaved (`_timing.py`): each cycle runs one unit of each, the order
alternating; a unit is one epoch of --steps steps on the epoch path and one step on the step path
(rounds x steps cycles). Read the RATIO mtlvision/plain: the median of the per-cycle ratios with its 95%
interval. Goal: <= 1.05, i.e. everything mtlvision adds on top of the bare forward/backward/step costs
at most 5%; the verdict is "inconclusive" while the interval straddles it. The absolute ms/step are
context only: they depend on the machine and the load on it.

Example:  python benchmarks/step_time.py               (defaults: width 0.5, batch 128, 7 rounds x 20 steps)
          python benchmarks/step_time.py --arch hps --mtl-path step --json
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from _common import environment, report  # also registers bench-random
from _timing import add_timing_args, check_timing_args, fmt_ratio, interleave, ratio_fields, ratio_stats

from mtlvision.config import Config, load_config
from mtlvision.models import build_model
from mtlvision.training import Trainer, build_trainer

GOAL = 1.05
Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]


def make_config(args: argparse.Namespace, epochs: int) -> Config:
    if args.steps * epochs == 4:  # torch's OneCycleLR divides by zero when total_steps == 4 (pct_start 0.25)
        epochs += 1
    arch = {"name": "task-features", "feature_dim": 128} if args.arch == "task-features" else {"name": "hps"}
    return load_config(data={
        "name": "bench-step-time", "seed": 0,
        "data": {"source": {"name": "bench-random", "n_train": args.steps * args.batch_size, "classes": args.classes},
                 "batch_size": args.batch_size, "augment": {"crop_padding": 4, "flip": True}, "cache": False},
        "model": {"backbone": {"name": "resnet18", "width": args.width, "stem": "cifar"},
                  "architecture": arch, "head": {"name": "linear"}},
        "balancing": {"method": "equal"},
        "train": {"epochs": epochs, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                  "schedule": "onecycle", "device": "cpu", "precision": "fp32", "channels_last": True,
                  "threads": args.threads},
    })


def plain_loop(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: list[Batch], steps: int) -> None:
    """The reference: forward, summed cross-entropy over tasks, backward, SGD step."""
    model.train()
    for i in range(steps):
        x, ys = batches[i % len(batches)]
        out = model(x)
        loss = sum(F.cross_entropy(out.logits[n], y) for n, y in ys.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def mtl_runner(tr: Trainer, path: str) -> Callable[[int], None]:
    """run(n): the next n steps of the trainer (n a multiple of tr.steps for the epoch path)."""
    pos = 0
    tr.model.train()

    def run(n: int) -> None:
        nonlocal pos
        if path == "epoch":
            for _ in range(n // tr.steps):
                tr.train_epoch(pos // tr.steps)
                pos += tr.steps
        else:
            for _ in range(n):
                tr.train_step(*divmod(pos, tr.steps))
                pos += 1
    return run


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=float, default=0.5, help="ResNet-18 width multiplier (default 0.5)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--arch", choices=["task-features", "hps"], default="task-features")
    ap.add_argument("--classes", type=lambda s: [int(v) for v in s.split(",")], default=[10, 10, 2],
                    help="classes per task, comma-separated (default 10,10,2)")
    ap.add_argument("--mtl-path", choices=["epoch", "step"], default="epoch",
                    help="epoch: time Trainer.train_epoch (default); step: Trainer.train_step alone")
    add_timing_args(ap, steps=20, warmup=5, rounds=7)
    args = ap.parse_args(argv)
    check_timing_args(ap, args, steps=2, width=0.0625, batch_size=8)
    if args.device != "cpu":
        ap.error("--device: this benchmark runs on the CPU only")
    if args.batch_size < 1 or args.width <= 0:
        ap.error("--batch-size must be >= 1, --width > 0")

    # warm-up and timed cycles: whole epochs on the epoch path, single steps on the step path
    epoch_path = args.mtl_path == "epoch"
    warmup_cycles = math.ceil(max(1, args.warmup) / args.steps) if epoch_path else max(1, args.warmup)
    warmup = warmup_cycles * args.steps if epoch_path else warmup_cycles
    cycles = args.rounds if epoch_path else args.rounds * args.steps
    unit = args.steps if epoch_path else 1
    with tempfile.TemporaryDirectory(prefix="mtlvision-bench-") as tmp:
        cfg = make_config(args, math.ceil(warmup / args.steps) + args.rounds + 1)  # OneCycle total >= steps run
        tr = build_trainer(cfg, f"{tmp}/run", quiet=True)  # also sets torch's threads to --threads
        assert tr.steps == args.steps, (tr.steps, args.steps)

        torch.manual_seed(cfg.seed)  # same seed as the trainer -> same initial weights
        model = build_model(cfg.model, tr.tasks, tr.data.image_shape).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        imgs, labs, b = tr.loaders[0].data.images, tr.loaders[0].data.labels, args.batch_size
        batches = [(tr.normalize(imgs[i * b:(i + 1) * b]).clone(memory_format=torch.channels_last),
                    {n: v[i * b:(i + 1) * b].clone() for n, v in labs.items()}) for i in range(min(args.steps, 8))]

        mtl = mtl_runner(tr, args.mtl_path)
        times = interleave({"mtlvision": lambda: mtl(unit), "plain": lambda: plain_loop(model, opt, batches, unit)},
                           cycles, warmup_cycles, clock=args.clock)

    ms = {k: [1000 * t / unit for t in v] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in ms.items()}
    ratio = ratio_stats(ms["mtlvision"], ms["plain"])
    fields = ratio_fields(ratio, GOAL)
    n_params = sum(p.numel() for p in model.parameters())
    code = "Trainer.train_epoch" if args.mtl_path == "epoch" else "Trainer.train_step"
    result = {
        "benchmark": "step_time", "goal": {"ratio_mtlvision_over_plain_max": GOAL},
        "verdict": fields["verdict"], "pass": {"pass": True, "fail": False}.get(fields["verdict"]),
        "settings": {"arch": args.arch, "backbone": "resnet18", "width": args.width, "stem": "cifar",
                     "classes": args.classes, "batch_size": args.batch_size, "image": [32, 32, 3],
                     "steps": args.steps, "rounds": args.rounds, "cycles": cycles, "steps_per_cycle": unit,
                     "warmup_steps": warmup, "clock": args.clock,
                     "mtl_path": args.mtl_path, "mtl_code": code, "precision": "fp32", "channels_last": True,
                     "parameters": n_params},
        "ms_per_step": med, "cycles_ms_per_step": ms, "ratio_mtlvision_over_plain": ratio, **fields,
        "env": environment(),
    }
    spread = {k: f"{min(v):.1f}-{max(v):.1f}" for k, v in ms.items()}
    rows = [
        ("model", f"resnet18 w{args.width:g} cifar stem, {args.arch}, tasks {args.classes}, "
                  f"{n_params / 1e6:.2f}M params"),
        ("batch / threads", f"{args.batch_size} x 32x32x3 fp32 channels_last / {torch.get_num_threads()} threads"),
        ("cycles", f"{cycles} x {unit} step(s) per variant, interleaved (warm-up {warmup} steps, "
                   f"{args.clock} clock); mtlvision code: {code}"),
        ("mtlvision", f"{med['mtlvision']:.1f} ms/step  (median; cycles {spread['mtlvision']})"),
        ("plain PyTorch", f"{med['plain']:.1f} ms/step  (median; cycles {spread['plain']})"),
        ("ratio mtl/plain", f"{fmt_ratio(ratio)}  (median of per-cycle ratios [95% interval]; IQR {ratio['iqr'][0]:.3f}"
                            f"-{ratio['iqr'][1]:.3f}; ratio of medians {ratio['of_medians']:.3f})"),
        (f"goal <= {GOAL}", fields["verdict"].upper()),
    ]
    report("step_time: mtlvision training step vs plain PyTorch loop (CPU)", rows, result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
