"""Data-parallel scaling on this machine: training images/s with 1 and 2 processes (torch.distributed, gloo, CPU).

Measured: `Trainer.train_step` (loader slice -> forward -> task losses -> global loss values -> balancer.backward
-> gradient all_reduce -> optimiser step) of a ResNet-18 (CIFAR stem, --width) on random 32x32 data, 3 tasks.
Each process takes --batch-size images per step (the per-rank batch), so 2 processes train on a global batch
twice as large (weak scaling). Variants: "2p" = 2 processes with --threads // 2 threads each; "1p-all" =
1 process with all --threads (the same CPU budget as 2p); "1p-half" = 1 process with --threads // 2 (the
same resources per process as 2p). A round spawns each variant once (process start-up and warm-up are not
timed) and times --steps steps; the order rotates per round. Reported: images/s per variant (median over
rounds), the ratios 2p/1p-all and 2p/1p-half (median of the per-round ratios; 2p/1p-half would be 2.0 with
perfect scaling), and the communication share of a 2p step: wall time inside all_reduce calls / step time
(gloo's all_reduce is synchronous, so this includes waiting for the slower rank).

Ratios come with the 95% interval of their median (`_timing.py`); with the default 3 rounds the interval
is the range of the rounds and reaches only 75% coverage: give --rounds 6 or more for a 95% interval.

Example:  python benchmarks/ddp_scaling.py                       (width 0.25, batch 64, 3 rounds x 8 steps)
          python benchmarks/ddp_scaling.py --method mgda --space parameter --json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _common import default_threads, environment, report  # also registers bench-random
from _timing import fmt_ratio, ratio_stats

from mtlvision.config import load_config
from mtlvision.training import build_trainer


def _worker(rank: int, world: int, threads: int, args: argparse.Namespace, tmp: str) -> None:
    """One rank: warm up, then time args.steps train steps; rank 0 saves images/s and the comm share."""
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        balancing = {"method": args.method, **({"space": args.space} if args.space else {})}
        steps = args.warmup + args.steps
        cfg = load_config(data={
            "name": "bench-ddp", "seed": 0,
            "data": {"source": {"name": "bench-random", "n_train": steps * args.batch_size * world},
                     "batch_size": args.batch_size, "cache": False, "augment": {"crop_padding": 4, "flip": True}},
            "model": {"backbone": {"name": "resnet18", "width": args.width, "stem": "cifar"},
                      "architecture": {"name": "task-features", "feature_dim": 128}},
            "balancing": balancing,
            "train": {"epochs": 1000, "lr": 0.01, "schedule": "constant", "device": "cpu", "precision": "fp32",
                      "threads": threads, "log_every": 10**6},
        })
        tr = build_trainer(cfg, f"{tmp}/run", quiet=True)
        assert tr.steps == steps, (tr.steps, steps)
        tr.model.train()
        for step in range(args.warmup):
            tr.train_step(0, step)
        tr.dist.barrier()
        comm0, t0 = tr.dist.comm_s, time.perf_counter()
        for step in range(args.warmup, steps):
            tr.train_step(0, step)
        wall = time.perf_counter() - t0
        share = torch.tensor([(tr.dist.comm_s - comm0) / wall])
        if world > 1:
            dist.all_reduce(share)  # mean over ranks
            share /= world
        if rank == 0:
            torch.save({"images_per_s": args.steps * args.batch_size * world / wall, "comm_share": share.item(),
                        "ms_per_step": 1000 * wall / args.steps}, f"{tmp}/result.pt")
    finally:
        dist.destroy_process_group()


VARIANTS = {"2p": (2, 2), "1p-all": (1, 1), "1p-half": (1, 2)}  # name: (processes, divisor of --threads)


def measure(variant: str, args: argparse.Namespace) -> dict[str, float]:
    world, div = VARIANTS[variant]
    with tempfile.TemporaryDirectory(prefix="mtlvision-ddp-") as tmp:
        # --smoke forks (no re-import of torch per process: seconds instead of tens); measurements spawn
        mp.start_processes(_worker, args=(world, max(1, args.threads // div), args, tmp), nprocs=world,
                           start_method="fork" if args.smoke else "spawn")
        return torch.load(Path(tmp) / "result.pt")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant per round (default 8)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each variant once per round (default 3)")
    ap.add_argument("--width", type=float, default=0.25, help="ResNet-18 width multiplier (default 0.25)")
    ap.add_argument("--batch-size", type=int, default=64, help="per-process batch (default 64)")
    ap.add_argument("--method", default="equal", help="balancing method (default equal)")
    ap.add_argument("--space", choices=["feature", "parameter"], help="space of a gradient method")
    ap.add_argument("--threads", type=int, default=default_threads(),
                    help="CPU threads in total, split between the processes (default: all cores)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--smoke", action="store_true",
                    help="one round of one step on a tiny network, one thread, forked processes: checks that the "
                         "script works")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.rounds, args.width, args.batch_size, args.threads = 1, 0, 1, 0.0625, 8, 1
    if min(args.steps, args.rounds, args.batch_size, args.threads) < 1 or args.warmup < 0:
        ap.error("--steps, --rounds, --batch-size and --threads must be >= 1, --warmup >= 0")

    names = list(VARIANTS)
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % 3:] + names[:r % 3]:
            runs[name].append(measure(name, args))
    rate = {n: [x["images_per_s"] for x in v] for n, v in runs.items()}
    ratio = {base: ratio_stats(rate["2p"], rate[base]) for base in ("1p-all", "1p-half")}
    share = statistics.median(x["comm_share"] for x in runs["2p"])
    med = {n: statistics.median(v) for n, v in rate.items()}
    ms = {n: statistics.median(x["ms_per_step"] for x in v) for n, v in runs.items()}
    result = {
        "benchmark": "ddp_scaling",
        "settings": {"backbone": "resnet18", "width": args.width, "stem": "cifar", "image": [32, 32, 3],
                     "tasks": [10, 10, 2], "method": args.method, "space": args.space,
                     "batch_per_process": args.batch_size, "threads_total": args.threads, "steps": args.steps,
                     "warmup": args.warmup, "rounds": args.rounds, "backend": "gloo", "precision": "fp32"},
        "images_per_s": med, "rounds_images_per_s": rate, "ms_per_step": ms,
        "ratio_2p_over": ratio, "comm_share_2p": share,
        "env": environment(),
    }
    rows = [
        ("model", f"resnet18 w{args.width:g} cifar stem, task-features, tasks [10, 10, 2], {args.method}"
                  + (f" ({args.space})" if args.space else "")),
        ("batch / threads", f"{args.batch_size} per process; {args.threads} threads in total "
                            f"(2 processes: {max(1, args.threads // 2)} each)"),
        ("rounds x steps", f"{args.rounds} x {args.steps} per variant (warm-up {args.warmup}), "
                           "order rotating per round"),
        *[(n, f"{med[n]:.0f} images/s  ({ms[n]:.0f} ms/step; rounds {min(rate[n]):.0f}-{max(rate[n]):.0f})")
          for n in names],
        *[(f"ratio 2p/{b}", f"{fmt_ratio(q)}  (median of per-round ratios [interval, {100 * q['coverage']:.0f}% "
                            f"coverage]; ratio of medians {q['of_medians']:.2f})") for b, q in ratio.items()],
        ("comm share (2p)", f"{100 * share:.1f}% of the step inside all_reduce (incl. waiting for the other rank)"),
    ]
    report("ddp_scaling: images/s with 1 and 2 processes (gloo, CPU)", rows, result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
