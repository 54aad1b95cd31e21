"""Peak memory of every balancing method, each trained in a fresh process (CPU or GPU).

For every T, input kind and method, one child process builds the trainer of `balancing_overhead.py`
(ResNet-18 at --width, random 32x32 data, T tasks, single- or multi-input) with that method as its
balancing config, runs --warmup + --steps training steps and reports its peak resident set size
(VmHWM) and, on a GPU, its peak allocated CUDA memory. The peak RSS includes torch itself, the
model and the data, so the difference from the equal-weight (EW) process is the method's cost; the
modelled size of the per-task gradients ("J MiB": T x B x D floats in feature space, T x trunk
parameters in parameter space) is printed beside it. Separate processes, because a process's peak RSS
never goes down: measured in one process, every method would inherit the largest one's peak.

Example:  python benchmarks/balancing_memory.py --tasks 3 10
          python benchmarks/balancing_memory.py --methods equal mgda db_mtl --space parameter --json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from typing import Any

import torch

from _common import default_threads, environment

from balancing_overhead import add_setup_args, j_mib, kind, make_trainer, task_counts

SMOKE = {"tasks": [3], "inputs": ["single"], "methods": ["equal", "pcgrad"], "width": 0.0625, "batch_size": 12,
         "steps": 1, "warmup": 0, "threads": 1}


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM (Linux), else ru_maxrss. VmHWM belongs to the process's own address
    space, whereas ru_maxrss can start at the forking parent's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource  # Unix only

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def child(args: argparse.Namespace) -> int:
    """--_child METHOD: train with that method only, then print this process's peaks as JSON."""
    tasks, multi = args.tasks[0], args.inputs[0] == "multi"
    with tempfile.TemporaryDirectory() as tmp:
        tr = make_trainer(tasks, multi, args, tmp, method=args._child)
        for step in range(args.warmup + args.steps):
            tr.train_step(0, step % tr.steps)
        k = kind(tr.balancer)
        cuda = torch.cuda.max_memory_allocated() / 2**20 if tr.device.type == "cuda" else None
    print(json.dumps({"kind": k, "j_mib": j_mib(tr, tasks, k), "peak_rss_mib": peak_rss_mib(),
                      "peak_cuda_mib": cuda}))
    return 0


def measure(tasks: int, inp: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--_child", method, "--tasks", str(tasks), "--inputs", inp,
           "--space", args.space, "--width", str(args.width), "--batch-size", str(args.batch_size),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return {"tasks": tasks, "input": inp, "method": method, **json.loads(out.splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_args(ap)
    ap.add_argument("--steps", type=int, default=3, help="training steps after warm-up (default 3)")
    ap.add_argument("--warmup", type=int, default=2, help="training steps first (default 2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--smoke", action="store_true",
                    help="EW and PCGrad on a tiny network, one step each: checks that the script works")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    task_counts(ap, args)
    if args.smoke:
        vars(args).update(SMOKE)
    if args._child:
        return child(args)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1, --warmup >= 0")
    methods = ["equal", *[m for m in args.methods if m != "equal"]]
    rows = []
    for t in args.tasks:
        for inp in args.inputs:
            group = [measure(t, inp, m, args) for m in methods]
            for r in group:
                r["rss_over_ew_mib"] = r["peak_rss_mib"] - group[0]["peak_rss_mib"]
            rows += group
    if args.json:
        json.dump({"benchmark": "balancing_memory", "env": environment(), "args": vars(args), "rows": rows},
                  sys.stdout, indent=2)
        print()
        return 0
    print(f"peak memory per balancing method: resnet18 w{args.width}, batch {args.batch_size}, {args.space} "
          f"space, {args.warmup}+{args.steps} steps per process, {environment()}")
    print(f"{'T':>3} {'input':6} {'method':12} {'kind':24} {'J MiB':>7} {'RSS MiB':>8} {'RSS-EW':>7} {'CUDA MiB':>9}")
    for r in rows:
        cuda = f"{r['peak_cuda_mib']:.0f}" if r["peak_cuda_mib"] is not None else "-"
        print(f"{r['tasks']:>3} {r['input']:6} {r['method']:12} {r['kind']:24} {r['j_mib']:7.1f} "
              f"{r['peak_rss_mib']:8.0f} {r['rss_over_ew_mib']:+7.0f} {cuda:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
