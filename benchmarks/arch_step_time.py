"""Training-step time of every architecture relative to hard sharing (`hps`), in one process.

Measured: seconds per `Trainer.train_step` (batch -> forward -> losses -> balanced backward -> optimiser
step) on random images for T tasks, each architecture with the same backbone and balancing method.
Architectures are interleaved step by step (`_timing.py`: each cycle runs one step of every architecture,
the starting one rotating) after --warmup untimed cycles; the table gives the median of the per-cycle
ratios to `hps` with its 95% interval, and the images/s that implies. Parameters and forward FLOPs
(`mtlvision archs`) are printed beside them.

Example:  python benchmarks/arch_step_time.py --backbone smallcnn --width 16 --image-size 36 --tasks 2
          python benchmarks/arch_step_time.py --method pcgrad --json
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from typing import Any

import torch

from _common import environment  # also registers bench-random
from _timing import add_timing_args, check_timing_args, interleave, ratio_fields, ratio_stats

from mtlvision.config import load_config
from mtlvision.models import ARCHITECTURES
from mtlvision.models.profile import profile_architectures
from mtlvision.training import Trainer, build_trainer


def make_trainer(arch: str, args: argparse.Namespace, out: str) -> Trainer:
    steps = min(8, args.steps + args.warmup)  # distinct batches; the benchmark cycles through them
    backbone: dict[str, Any] = {"name": args.backbone, "width": args.width}
    cfg = load_config(data={
        "name": f"bench-arch-{arch}", "seed": 0,
        "data": {"source": {"name": "bench-random", "classes": [10] * args.tasks, "n_train": steps * args.batch_size,
                            "size": args.image_size},
                 "batch_size": args.batch_size, "cache": False, "augment": {"crop_padding": 2, "flip": False}},
        "model": {"backbone": backbone, "architecture": {"name": arch}},
        "balancing": {"method": args.method},
        "train": {"epochs": 1000, "lr": 0.01, "schedule": "constant", "device": args.device,
                  "threads": args.threads, "log_every": 10**6},
    })
    return build_trainer(cfg, out, quiet=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=ARCHITECTURES.names())
    ap.add_argument("--backbone", default="smallcnn")
    ap.add_argument("--width", type=float, default=16)
    ap.add_argument("--image-size", type=int, default=36)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--method", default="equal")
    ap.add_argument("--batch-size", type=int, default=128)
    add_timing_args(ap)
    args = ap.parse_args(argv)
    check_timing_args(ap, args, archs=["hps", "task-features", "mtan"], width=4, image_size=16, batch_size=8)
    unknown = sorted(set(args.archs) - set(ARCHITECTURES.names()))
    if unknown:
        ap.error(f"--archs: unknown {unknown}; valid: {', '.join(ARCHITECTURES.names())}")
    if args.tasks < 1 or args.batch_size < 1 or args.image_size < 8 or args.width <= 0:
        ap.error("--tasks and --batch-size must be >= 1, --image-size >= 8, --width > 0")
    if args.backbone == "smallcnn":
        args.width = int(args.width)
    archs = list(dict.fromkeys(["hps", *args.archs]))
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {a: make_trainer(a, args, f"{tmp}/{a}") for a in archs}
        pos = {a: 0 for a in archs}

        def runner(arch: str):
            tr = trainers[arch]

            def run() -> None:  # one training step of this architecture
                tr.train_step(0, pos[arch] % tr.steps)
                pos[arch] += 1
            return run

        variants = {a: runner(a) for a in archs}
        cuda = trainers["hps"].device.type == "cuda"
        times = interleave(variants, args.rounds * args.steps, args.warmup,
                           torch.cuda.synchronize if cuda else None, args.clock)
    profiles = {p["architecture"]: p for p in profile_architectures(
        {"name": args.backbone, "width": args.width}, args.tasks, args.image_size, 10, 3)}
    rows = []
    for a in archs:
        r = ratio_fields(ratio_stats(times[a], times["hps"]))
        s = statistics.median(times[a])
        rows.append({"architecture": a, "method": args.method, "step_ratio": r.pop("ratio"), **r,
                     "ms_per_step": 1000 * s,
                     "images_per_s": args.batch_size / s, "parameters": profiles.get(a, {}).get("parameters"),
                     "flops_ratio": profiles.get(a, {}).get("relative_flops")})
    if args.json:
        import json
        import sys

        json.dump({"benchmark": "arch_step_time", "environment": environment(), "args": vars(args), "rows": rows},
                  sys.stdout, indent=2)
        print()
        return 0
    print(f"step time vs hps: {args.backbone} width {args.width}, {args.tasks} tasks, batch {args.batch_size}, "
          f"{args.image_size}px, method {args.method}, {environment()}")
    print(f"{'architecture':14} {'step ratio':>10} {'95% interval':>13} {'ms/step':>8} {'img/s':>7} {'params':>10} "
          f"{'FLOPs ratio':>11}")
    for r in rows:
        lo, hi = r["ratio_ci"]
        flops = f"{r['flops_ratio']:.2f}" if r["flops_ratio"] else "-"
        params = f"{r['parameters']:,}" if r["parameters"] else "-"
        print(f"{r['architecture']:14} {r['step_ratio']:10.2f} {f'{lo:.2f}-{hi:.2f}':>13} {r['ms_per_step']:8.0f} "
              f"{r['images_per_s']:7.0f} {params:>10} {flops:>11}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
