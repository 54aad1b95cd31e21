"""Command-line interface: `mtlvision demo | train | evaluate | predict | list`."""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from .errors import MTLVisionError

DEMO_CONFIG = {
    "name": "demo",
    "data": {"source": {"name": "shapes", "n_train": 12000, "n_test": 2000}, "batch_size": 128},
    "model": {"backbone": {"name": "smallcnn", "width": 16, "out_dim": 128},
              "architecture": {"name": "task-features", "feature_dim": 64}},
    "train": {"epochs": 8, "optimizer": "sgd", "lr": 0.05, "schedule": "onecycle", "weight_decay": 5e-4},
}


def _free_dir(base: Path) -> Path:
    if not base.exists():
        return base
    i = 2
    while Path(f"{base}-{i}").exists():
        i += 1
    return Path(f"{base}-{i}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .config import load_config
    from .reports import print_results
    from .training.trainer import train

    cfg = load_config(data=DEMO_CONFIG, overrides=[f"train.epochs={args.epochs}"] if args.epochs else [])
    out = Path(args.out) if args.out else _free_dir(Path("runs") / "demo")
    Console(stderr=True).print(f"Training the demo (procedural shapes, 4 tasks) into {out} ...")
    print_results(train(cfg, out, quiet=args.quiet))


def cmd_train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .reports import print_results
    from .training.trainer import default_out_dir, train

    resume = args.resume is not None
    if args.config is None and not resume:
        raise MTLVisionError("train: give a CONFIG.yaml (or --resume RUN_DIR)")
    config_path = args.config or Path(args.resume) / "config.yaml"
    cfg = load_config(config_path, args.set)
    out = Path(args.resume) if resume else Path(args.out) if args.out else default_out_dir(cfg)
    if args.out and resume and Path(args.out) != Path(args.resume):
        raise MTLVisionError("train: --out and --resume name different folders; give one")
    print_results(train(cfg, out, resume=resume, quiet=args.quiet))


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Rebuild the test split from the run's config and score its best weights."""
    import contextlib

    from .data import build_data
    from .data.loader import TensorImages
    from .evaluation.evaluate import evaluate
    from .inference import Run

    run = Run(args.run_dir, device=args.device)
    data = build_data(run.config)
    names = [t.name for t in data.tasks]
    if names != [t.name for t in run.tasks] or any(
            a.classes != b.classes for a, b in zip(data.tasks, run.tasks)):
        raise MTLVisionError(f"{args.run_dir}: the data now gives tasks/classes that differ from the checkpoint")
    splits = [(TensorImages(getattr(s, args.split), run.device), s.tasks) for s in data.streams]
    metrics = evaluate(run.model, splits, run.tasks, run.normalize, run.config.data.eval_batch_size,
                          contextlib.nullcontext)
    result = {"split": args.split, "best_epoch": run.best_epoch, "tasks": metrics}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"{args.run_dir}: {args.split} split, best epoch {run.best_epoch + 1}")
    for col in ("task", "images", "accuracy", "top5", "balanced accuracy", "loss"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for name, m in metrics.items():
        pct = lambda k: f"{100 * m[k]:.2f}%" if k in m else "-"  # noqa: E731
        table.add_row(name, str(m["count"]), pct("accuracy"), pct("top5"), pct("balanced_accuracy"),
                      f"{m.get('loss', float('nan')):.4f}")
    Console().print(table)


def cmd_predict(args: argparse.Namespace) -> None:
    from .inference import Run, image_files

    run = Run(args.run_dir, device=args.device)
    files = image_files(args.images)
    if not files:
        raise MTLVisionError(f"no image files found in {args.images}")
    preds = run.predict([str(f) for f in files], top_k=args.top_k)
    if args.format == "json":
        print(json.dumps([{"image": str(f), "predictions": {t: [{"class": c, "probability": round(p, 6)}
                                                                for c, p in v] for t, v in row.items()}}
                          for f, row in zip(files, preds)], indent=2))
    elif args.format == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["image", "task", "rank", "class", "probability"])
        for f, row in zip(files, preds):
            for task, v in row.items():
                for rank, (c, p) in enumerate(v, 1):
                    w.writerow([str(f), task, rank, c, f"{p:.6f}"])
        sys.stdout.write(buf.getvalue())
    else:
        table = Table(title=f"predictions of {args.run_dir}")
        table.add_column("image")
        for t in run.tasks:
            table.add_column(t.name)
        for f, row in zip(files, preds):
            table.add_row(str(f), *["\n".join(f"{c} {100 * p:.1f}%" for c, p in row[t.name]) for t in run.tasks])
        Console().print(table)


def cmd_list(args: argparse.Namespace) -> None:
    from .balancing import METHODS
    from .data import SOURCES
    from .models import ARCHITECTURES, BACKBONES, HEADS

    registries = {"sources": SOURCES, "backbones": BACKBONES, "architectures": ARCHITECTURES,
                  "heads": HEADS, "methods": METHODS}
    for kind in ([args.kind] if args.kind else registries):
        table = Table(title=kind)
        table.add_column("name")
        table.add_column("description")
        for e in registries[kind].entries():
            table.add_row(e.name, e.description)
        Console().print(table)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="mtlvision", description="Multi-task image classification.")
    p.add_argument("--version", action="version", version=f"mtlvision {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="train a 4-task model on built-in procedural shapes (offline, ~1 min on CPU)")
    d.add_argument("--out", help="run directory (default: runs/demo, runs/demo-2, ...)")
    d.add_argument("--epochs", type=int, help="override the number of epochs (default 8)")
    d.add_argument("--quiet", action="store_true", help="no progress output")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train from a YAML config")
    t.add_argument("config", nargs="?", help="CONFIG.yaml (optional with --resume: the run's own config)")
    t.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (YAML syntax), e.g. --set train.epochs=5; repeatable")
    t.add_argument("--out", help="run directory (default: runs/<config name>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="re-evaluate a run's best checkpoint")
    e.add_argument("run_dir")
    e.add_argument("--split", choices=["test", "val", "train"], default="test")
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", help="predict every task for images or folders of images")
    r.add_argument("run_dir")
    r.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    r.add_argument("--format", choices=["table", "csv", "json"], default="table")
    r.add_argument("--top-k", type=int, default=1)
    r.add_argument("--device", default="cpu")
    r.set_defaults(func=cmd_predict)

    ls = sub.add_parser("list", help="list registered sources, backbones, architectures, heads, methods")
    ls.add_argument("kind", nargs="?", choices=["sources", "backbones", "architectures", "heads", "methods"])
    ls.set_defaults(func=cmd_list)

    m = sub.add_parser("methods", help="list balancing methods (same as `list methods`)")
    m.set_defaults(func=cmd_list, kind="methods")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MTLVisionError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted; resume with `mtlvision train --resume RUN_DIR`")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
