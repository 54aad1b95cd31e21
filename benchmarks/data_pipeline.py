"""Training throughput through mtlvision's full data pipeline versus pre-made tensors, on real CIFAR-10.

Measured, in one process (CPU, fp32, channels_last; the network of --config, by default
configs/cifar10_aux.yaml = ResNet-18 width 0.25, task-features, tasks class + vehicle):
  cache     wall time to decode all 60,000 JPEGs of the imagefolder source into a FRESH uint8 .npy
            cache (temporary dir unless --cache-dir), then to reload it (cache hit + copy into RAM, as
            a run's start does; the OS page cache is warm because the files were just written).
  pipeline  img/s of `Trainer.train_step`: `next_batch` (TrainLoader.batch: index_select on the uint8
            cache + pad/crop/flip; Normalize) then `step_on` (forward -> Task.loss -> balancer.backward ->
            optimizer.step -> scheduler.step).
  in-memory img/s of the SAME `Trainer.step_on` on batches made once by `next_batch` before timing and
            reused (no loading, no augmentation in the timed loop).
  loader    ms per batch of `Trainer.next_batch` alone (context: the loader's share of a step).
Pipeline, in-memory and loader are interleaved step by step (`_timing.py`; rounds x steps cycles, the
starting variant rotating) after warm-up. Read the RATIO pipeline/in-memory throughput: the median of
the per-cycle ratios with its 95% interval. Goal: >= 0.95, i.e. the data pipeline keeps at least 95% of
the pure compute rate; "inconclusive" while the interval straddles it. Absolute img/s and seconds are
context for this machine only. --smoke runs on 100 random JPEGs in CIFAR-10's layout (made on the fly,
unless --data-root is given) with a tiny network: a check that the script works, not a measurement.

Example:  python benchmarks/data_pipeline.py                    (data: ../shared/data/cifar10)
          python benchmarks/data_pipeline.py --data-root DIR --width 0.5 --json
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml

from _common import REPO_ROOT, environment, report
from _smoke import make_tiny_cifar10
from _timing import add_timing_args, check_timing_args, fmt_ratio, interleave, ratio_fields, ratio_stats

from mtlvision.config import load_config, set_path
from mtlvision.data.build import _load
from mtlvision.data.cache import cache_key
from mtlvision.data.sources import SOURCES
from mtlvision.training import build_trainer

GOAL = 0.95
DEFAULT_DATA = "../shared/data/cifar10"


def find_data(arg: str | None) -> Path | None:
    """The CIFAR-10 folder (train/test as tar.gz or folders); default tried from cwd, then the repo root."""
    candidates = [Path(arg)] if arg else [Path(DEFAULT_DATA), REPO_ROOT / DEFAULT_DATA]
    for c in candidates:
        c = c.expanduser()
        if all((c / s).is_dir() or any((c / f"{s}{e}").is_file() for e in (".tar.gz", ".tgz", ".tar"))
               for s in ("train", "test")):
            return c.resolve()
    return None


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None,
                    help=f"CIFAR-10 JPEG folder with train/test (.tar.gz or folders); default {DEFAULT_DATA}")
    ap.add_argument("--config", default=str(REPO_ROOT / "configs" / "cifar10_aux.yaml"),
                    help="run config giving model/tasks/augmentation (default configs/cifar10_aux.yaml); "
                         "its data.source.path is replaced by --data-root")
    ap.add_argument("--cache-dir", default=None,
                    help="decoded-cache root (default: a fresh temporary dir, deleted afterwards); if the "
                         "entry already exists there the build is not timed")
    ap.add_argument("--keep-cache", action="store_true", help="keep the temporary cache dir")
    ap.add_argument("--width", type=float, default=0.25, help="ResNet-18 width multiplier (default 0.25)")
    ap.add_argument("--batch-size", type=int, default=128)
    add_timing_args(ap, steps=20, warmup=5, rounds=7)
    args = ap.parse_args(argv)
    check_timing_args(ap, args, steps=2, width=0.0625, batch_size=8)
    if args.device != "cpu":
        ap.error("--device: this benchmark runs on the CPU only")
    if args.batch_size < 1 or args.width <= 0:
        ap.error("--batch-size must be >= 1, --width > 0")

    smoke_dir = None
    if args.smoke and args.data_root is None:
        smoke_dir = Path(tempfile.mkdtemp(prefix="mtlvision-bench-smoke-"))
        args.data_root = str(make_tiny_cifar10(smoke_dir / "cifar10"))
    data_root = find_data(args.data_root)
    if data_root is None:
        tried = args.data_root or f"{DEFAULT_DATA} (from {Path.cwd()} and from {REPO_ROOT})"
        print(f"data_pipeline: CIFAR-10 JPEGs not found at {tried}: expected train.tar.gz and test.tar.gz "
              "(or train/ and test/ folders) in ImageFolder layout. Pass --data-root DIR.", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)

    fresh = args.cache_dir is None
    cache_root = Path(tempfile.mkdtemp(prefix="mtlvision-bench-cache-")) if fresh else Path(args.cache_dir)
    out_dir = tempfile.mkdtemp(prefix="mtlvision-bench-run-")
    try:
        raw = yaml.safe_load(Path(args.config).read_text()) or {}
        needed_steps = 2 * (args.warmup + args.rounds * args.steps) + 8  # scheduler steps this run takes
        for key, value in {"data.source.path": str(data_root), "data.cache": True, "data.cache_dir": str(cache_root),
                           "data.batch_size": args.batch_size, "model.backbone.width": args.width,
                           "train.device": "cpu", "train.precision": "fp32", "train.channels_last": True,
                           "train.compile": False, "train.threads": args.threads}.items():
            set_path(raw, key, value)
        raw["train"]["epochs"] = max(int(raw["train"].get("epochs", 1)), needed_steps)  # OneCycle total >= steps
        cfg = load_config(data=raw)
        if cfg.data.sources:
            ap.error(f"{args.config}: multi-input configs (data.sources) are not supported here")

        # -- decoded cache: build (fresh) and reload, through build.py's own _load ------------------
        name = cfg.data.source.name
        source = SOURCES.build(cfg.data.source, image_size=cfg.data.image_size)
        entry = cache_root / f"{name}-{cache_key(name, source, cfg.data.image_size, cfg.data.channels)}"
        existed = (entry / "meta.json").is_file()
        t0 = time.perf_counter()
        loaded, _ = _load(cfg.data.source, cfg)
        build_s = None if existed else time.perf_counter() - t0
        n_images = sum(len(s) for s in (loaded.train, loaded.val, loaded.test) if s is not None)
        del loaded
        t0 = time.perf_counter()
        loaded, _ = _load(cfg.data.source, cfg)
        arrays = [np.array(s.images) for s in (loaded.train, loaded.val, loaded.test) if s is not None]
        reload_s = time.perf_counter() - t0
        del loaded, arrays

        t0 = time.perf_counter()
        tr = build_trainer(cfg, out_dir, quiet=True)
        init_s = time.perf_counter() - t0

        # -- the three variants: the Trainer's own next_batch / step_on / train_step ---------------------
        tr.model.train()
        pre = [tr.next_batch(0, s) for s in range(min(8, tr.steps))]  # made before any timing, then reused
        batch_images = len(pre[0][0])
        # pipeline and loader in lockstep: the same (epoch, step)s, so they share the loaders' epoch order
        pos = {"pipeline": 0, "loader": 0, "in_memory": 0}

        def advance(kind: str) -> tuple[int, int]:
            pos[kind] += 1
            return divmod(pos[kind] - 1, tr.steps)

        def pipeline(n: int) -> None:
            for _ in range(n):
                tr.train_step(*advance("pipeline"))

        def in_memory(n: int) -> None:
            for _ in range(n):
                pos["in_memory"] += 1
                tr.step_on(*pre[pos["in_memory"] % len(pre)], 0, pos["in_memory"] % tr.steps)

        def loader_only(n: int) -> None:
            for _ in range(n):
                tr.next_batch(*advance("loader"))

        times = interleave({"pipeline": lambda: pipeline(1), "in_memory": lambda: in_memory(1),
                            "loader": lambda: loader_only(1)}, args.rounds * args.steps, max(1, args.warmup),
                           clock=args.clock)
        n_params = sum(p.numel() for p in tr.model.parameters())
        tasks = [t.name for t in tr.tasks]
        train_images = len(tr.loaders[0].data)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
        if smoke_dir is not None:
            shutil.rmtree(smoke_dir, ignore_errors=True)
        if fresh and not args.keep_cache:
            shutil.rmtree(cache_root, ignore_errors=True)

    ips = {k: [batch_images / t for t in v] for k, v in times.items() if k != "loader"}
    med = {k: statistics.median(v) for k, v in ips.items()}
    loader_ms = statistics.median(1000 * t for t in times["loader"])
    pipe_ms = statistics.median(1000 * t for t in times["pipeline"])
    ratio = ratio_stats(times["in_memory"], times["pipeline"])  # = throughput pipeline / in-memory, per cycle
    fields = ratio_fields(ratio, GOAL, higher_is_better=True)
    result = {
        "benchmark": "data_pipeline", "goal": {"ratio_pipeline_over_in_memory_min": GOAL},
        "verdict": fields["verdict"], "pass": {"pass": True, "fail": False}.get(fields["verdict"]), "smoke": args.smoke,
        "settings": {"config": str(args.config), "data_root": str(data_root), "width": args.width,
                     "batch_size": args.batch_size, "batch_images": batch_images, "steps": args.steps,
                     "rounds": args.rounds, "cycles": args.rounds * args.steps, "warmup_steps": args.warmup,
                     "clock": args.clock, "tasks": tasks, "parameters": n_params,
                     "train_images": train_images, "augment": cfg.to_dict()["data"]["augment"],
                     "precision": "fp32", "channels_last": True},
        "cache": {"images": n_images, "build_s": build_s, "reload_s": reload_s, "fresh_dir": fresh,
                  "entry_existed": existed, "dir": None if fresh and not args.keep_cache else str(cache_root)},
        "trainer_init_s": init_s,
        "img_per_s": med, "cycles_img_per_s": ips, "loader_ms_per_batch": loader_ms,
        "pipeline_ms_per_step": pipe_ms, "ratio_pipeline_over_in_memory": ratio, **fields, "env": environment(),
    }
    rows = [
        ("model", f"resnet18 w{args.width:g}, {cfg.model.architecture.name}, tasks {tasks}, "
                  f"{n_params / 1e6:.2f}M params"),
        ("batch / threads", f"{batch_images} x {tuple(tr.data.image_shape)} uint8 -> fp32 channels_last / "
                            f"{torch.get_num_threads()} threads"),
        ("cycles", f"{args.rounds * args.steps}, one step of each variant per cycle (warm-up {args.warmup}, "
                   f"{args.clock} clock)"),
        ("cache build", f"{build_s:.1f} s for {n_images} JPEGs ({n_images / build_s:.0f} img/s, fresh dir)"
         if build_s is not None else f"not timed: entry already in {cache_root}"),
        ("cache reload", f"{reload_s:.2f} s (hit + copy into RAM; "
                         f"{'page cache warm: just written' if build_s is not None else 'page cache state unknown'})"),
        ("trainer init", f"{init_s:.2f} s (warm cache: split, stats, model)"),
        ("pipeline", f"{med['pipeline']:.0f} img/s  (median; cycles "
                     f"{min(ips['pipeline']):.0f}-{max(ips['pipeline']):.0f})"),
        ("in-memory", f"{med['in_memory']:.0f} img/s  (median; cycles "
                      f"{min(ips['in_memory']):.0f}-{max(ips['in_memory']):.0f})"),
        ("loader alone", f"{loader_ms:.2f} ms/batch ({100 * loader_ms / pipe_ms:.1f}% of a pipeline step)"),
        ("ratio pipe/mem", f"{fmt_ratio(ratio)}  (median of per-cycle ratios [95% interval]; ratio of medians "
                           f"{ratio['of_medians']:.3f})"),
        (f"goal >= {GOAL}", fields["verdict"].upper()),
    ]
    report("data_pipeline: CIFAR-10 JPEGs -> cache -> TrainLoader -> step vs pre-made tensors (CPU)",
           rows, result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
