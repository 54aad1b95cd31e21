"""Training-step time of every architecture relative to hard sharing (`hps`), in one process.

Measured: seconds per `Trainer.train_step` (batch -> forward -> losses -> balanced backward -> optimiser
step) on random images for T tasks, each architecture with the same backbone and balancing method.
Architectures alternate in rounds after warm-up; the table gives the median per-round ratio to `hps`
and the images/s that implies. Parameters and forward FLOPs (`mtlvision archs`) are printed beside them.

Example:  python benchmarks/arch_step_time.py --backbone smallcnn --width 16 --image-size 36 --tasks 2
          python benchmarks/arch_step_time.py --method pcgrad --json
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from typing import Any

from _common import add_timing_args, environment, interleave, ratio_stats  # also registers bench-random

from mtlvision.config import load_config
from mtlvision.models import ARCHITECTURES
from mtlvision.models.profile import profile_architectures
from mtlvision.training.trainer import Trainer


def make_trainer(arch: str, args: argparse.Namespace, out: str) -> Trainer:
    steps = args.steps + args.warmup
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
    return Trainer(cfg, out, quiet=True)


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
    if args.backbone == "smallcnn":
        args.width = int(args.width)
    archs = list(dict.fromkeys(["hps", *args.archs]))
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {a: make_trainer(a, args, f"{tmp}/{a}") for a in archs}
        pos = {a: 0 for a in archs}

        def runner(arch: str):
            tr = trainers[arch]

            def run() -> None:
                for _ in range(args.steps):
                    tr.train_step(0, pos[arch] % tr.steps)
                    pos[arch] += 1
                if tr.device.type == "cuda":
                    import torch

                    torch.cuda.synchronize()
            return run

        variants = {a: runner(a) for a in archs}
        for run in variants.values():  # warm-up
            run()
        times = interleave(variants, args.rounds)
    profiles = {p["architecture"]: p for p in profile_architectures(
        {"name": args.backbone, "width": args.width}, args.tasks, args.image_size, 10, 3)}
    rows = []
    for a in archs:
        r = ratio_stats(times[a], times["hps"])
        s = statistics.median(times[a]) / args.steps
        rows.append({"architecture": a, "method": args.method, "step_ratio": r["median"],
                     "ratio_range": [r["min"], r["max"]], "ms_per_step": 1000 * s,
                     "images_per_s": args.batch_size / s, "parameters": profiles.get(a, {}).get("parameters"),
                     "flops_ratio": profiles.get(a, {}).get("relative_flops")})
    if args.json:
        import json
        import sys

        json.dump({"environment": environment(), "args": vars(args), "rows": rows}, sys.stdout, indent=2)
        print()
        return 0
    print(f"step time vs hps: {args.backbone} width {args.width}, {args.tasks} tasks, batch {args.batch_size}, "
          f"{args.image_size}px, method {args.method}, {environment()}")
    print(f"{'architecture':14} {'step ratio':>10} {'range':>13} {'ms/step':>8} {'img/s':>7} {'params':>10} "
          f"{'FLOPs ratio':>11}")
    for r in rows:
        lo, hi = r["ratio_range"]
        flops = f"{r['flops_ratio']:.2f}" if r["flops_ratio"] else "-"
        params = f"{r['parameters']:,}" if r["parameters"] else "-"
        print(f"{r['architecture']:14} {r['step_ratio']:10.2f} {f'{lo:.2f}-{hi:.2f}':>13} {r['ms_per_step']:8.0f} "
              f"{r['images_per_s']:7.0f} {params:>10} {flops:>11}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
