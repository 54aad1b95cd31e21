"""Fine-tuning step of mtlvision with a timm backbone versus a plain PyTorch loop on the same timm model.

Measured: ms per training step of
  plain        `timm.create_model(MODEL, num_classes=0)` (its pooled features) plus one linear head per
               task, summed cross-entropy, backward, SGD (momentum 0.9, Nesterov, weight decay 5e-4) on
               pre-made normalised channels_last batches: the loop a user would write.
  mtl-equal    mtlvision's `Trainer.train_step` with `{name: timm, model: MODEL}` and `hps` (one linear head
               per task on the pooled features: the same network) and equal weighting: loader batch
               (index_select, crop/flip), Normalize, forward, task losses, backward, optimiser and schedule.
  mtl-pcgrad,  the same with PCGrad and MGDA in feature space (per-task gradients at the pooled features,
  mtl-mgda     one backward through the backbone).
Every variant runs in one process, interleaved step by step (`_timing.py`); the ratios are medians of the
per-cycle ratios to `plain` with 95% intervals. Goals: equal weighting <= 1.05, PCGrad and MGDA <= 1.15.
`--memory` measures peak memory instead: each variant trains --steps steps in a fresh process and reports its
peak resident set size (VmHWM; on a GPU, peak allocated CUDA memory).

Example:  python benchmarks/finetune_step.py                       (efficientnet_lite0, 64 px, batch 64)
          python benchmarks/finetune_step.py --model convnext_atto --image-size 96 --json
          python benchmarks/finetune_step.py --memory --json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from _common import environment, report  # also registers bench-random
from _timing import add_timing_args, check_timing_args, fmt_ratio, interleave, ratio_fields, ratio_stats

from mtlvision.config import load_config
from mtlvision.device import peak_memory_mb
from mtlvision.training import build_trainer

GOALS = {"mtl-equal": 1.05, "mtl-pcgrad": 1.15, "mtl-mgda": 1.15}
METHODS = {"mtl-equal": {"method": "equal"}, "mtl-pcgrad": {"method": "pcgrad"}, "mtl-mgda": {"method": "mgda"}}


class Plain(nn.Module):
    """A timm model's pooled features and one linear head per task."""

    def __init__(self, model: str, classes: list[int]) -> None:
        super().__init__()
        import timm

        self.features = timm.create_model(model, num_classes=0)
        self.heads = nn.ModuleList([nn.Linear(self.features.num_features, k) for k in classes])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.features(x)
        return [h(z) for h in self.heads]


def trainer(args: argparse.Namespace, balancing: dict[str, Any], out: str):
    cfg = load_config(data={
        "name": "bench-finetune-step", "seed": 0,
        "data": {"source": {"name": "bench-random", "n_train": 8 * args.batch_size, "classes": args.classes,
                            "size": args.image_size},
                 "batch_size": args.batch_size, "augment": {"crop_padding": 4, "flip": True}, "cache": False},
        "model": {"backbone": {"name": "timm", "model": args.model}, "architecture": {"name": "hps"}},
        "balancing": balancing,
        "train": {"epochs": 1000, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
                  "schedule": "constant", "device": args.device, "channels_last": True, "threads": args.threads},
    })
    return build_trainer(cfg, out, quiet=True)


def plain_step(args: argparse.Namespace, tr: Any) -> Any:
    """The plain loop on the trainer's own data (pre-made batches), as a closure doing one step."""
    torch.manual_seed(0)
    model = Plain(args.model, args.classes).to(tr.device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    data, b = tr.loaders[0].data, args.batch_size
    names = [t.name for t in tr.tasks]
    batches = [(tr.normalize(data.images[i * b:(i + 1) * b]).contiguous(memory_format=torch.channels_last),
                [data.labels[n][i * b:(i + 1) * b] for n in names]) for i in range(4)]
    pos = [0]

    def step() -> None:
        x, ys = batches[pos[0] % len(batches)]
        pos[0] += 1
        loss = sum(F.cross_entropy(o, y) for o, y in zip(model(x), ys))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def mtl_step(tr: Any) -> Any:
    pos = [0]

    def step() -> None:
        tr.train_step(*divmod(pos[0], tr.steps))
        pos[0] += 1
    return step


def one_variant(args: argparse.Namespace) -> dict[str, Any]:
    """--variant: train one variant for --steps steps in this process and report its peak memory."""
    with tempfile.TemporaryDirectory(prefix="mtlvision-bench-") as tmp:
        tr = trainer(args, METHODS.get(args.variant, {"method": "equal"}), f"{tmp}/run")
        if tr.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(tr.device)
        run = plain_step(args, tr) if args.variant == "plain" else mtl_step(tr)
        for _ in range(args.steps):
            run()
        return {"variant": args.variant, "peak_memory_mb": peak_memory_mb(tr.device)}


def memory(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for name in ["plain", *METHODS]:
        cmd = [sys.executable, __file__, "--variant", name, "--model", args.model, "--image-size",
               str(args.image_size), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
               "--device", args.device, "--threads", str(args.threads),
               "--classes", ",".join(map(str, args.classes))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name}: {proc.stderr[-2000:]}")
        out[name] = json.loads(proc.stdout)["peak_memory_mb"]
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0", help="timm model name (default efficientnet_lite0)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--classes", type=lambda s: [int(v) for v in s.split(",")], default=[2, 5, 7],
                    help="classes per task, comma-separated (default 2,5,7: UTKFace's tasks)")
    ap.add_argument("--memory", action="store_true", help="peak memory per variant, each in a fresh process")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    add_timing_args(ap, steps=5, warmup=2, rounds=4)
    args = ap.parse_args(argv)
    check_timing_args(ap, args, batch_size=4, image_size=32, model="test_efficientnet", steps=2)
    if args.variant:
        print(json.dumps(one_variant(args)))
        return 0
    if args.memory:
        mem = memory(args)
        result = {"benchmark": "finetune_step", "mode": "memory", "model": args.model,
                  "image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps,
                  "peak_memory_mb": mem, "env": environment()}
        report("finetune_step: peak memory per variant (fresh process each)",
               [(k, f"{v:.0f} MiB") for k, v in mem.items()], result, args.json)
        return 0
    cycles = args.rounds * args.steps
    with tempfile.TemporaryDirectory(prefix="mtlvision-bench-") as tmp:
        trainers = {name: trainer(args, spec, f"{tmp}/{name}") for name, spec in METHODS.items()}
        variants = {"plain": plain_step(args, trainers["mtl-equal"]),
                    **{name: mtl_step(tr) for name, tr in trainers.items()}}
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
        times = interleave(variants, cycles, max(1, args.warmup), sync=sync, clock=args.clock)
    ms = {k: [1000 * t for t in v] for k, v in times.items()}
    ratios = {name: ratio_stats(ms[name], ms["plain"]) for name in METHODS}
    fields = {name: ratio_fields(r, GOALS[name]) for name, r in ratios.items()}
    result = {"benchmark": "finetune_step", "model": args.model, "image_size": args.image_size,
              "batch_size": args.batch_size, "classes": args.classes, "cycles": cycles, "clock": args.clock,
              "ms_per_step": {k: statistics.median(v) for k, v in ms.items()},
              "ratios": fields, "verdicts": {k: f["verdict"] for k, f in fields.items()}, "env": environment()}
    rows = [("model", f"timm {args.model}, {args.image_size} px, batch {args.batch_size}, tasks {args.classes}"),
            ("cycles", f"{cycles} (warm-up {max(1, args.warmup)}), {args.clock} clock, {torch.get_num_threads()} "
                       "threads"),
            ("plain", f"{statistics.median(ms['plain']):.1f} ms/step")]
    rows += [(name, f"{statistics.median(ms[name]):.1f} ms/step, ratio {fmt_ratio(ratios[name])}, goal <= "
                    f"{GOALS[name]}: {fields[name]['verdict']}") for name in METHODS]
    report("finetune_step: mtlvision fine-tuning step vs a plain loop on the same timm model", rows, result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
