"""Commands that train a model and use it: demo, train, evaluate, predict, export."""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..errors import MTLVisionError


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
    from ..config import load_config
    from ..reports import print_results
    from ..training import train

    cfg = load_config(data=DEMO_CONFIG, overrides=[f"train.epochs={args.epochs}"] if args.epochs else [])
    out = Path(args.out) if args.out else _free_dir(Path("runs") / "demo")
    Console(stderr=True).print(f"Training the demo (procedural shapes, 4 tasks) into {out} ...")
    print_results(train(cfg, out, quiet=args.quiet))


def cmd_train(args: argparse.Namespace) -> None:
    from ..rundir import RunDir
    from ..config import load_config
    from ..reports import print_results
    from ..training import default_out_dir, train
    from ..training.distributed import is_main_process

    resume = args.resume is not None
    if args.config is None and not resume:
        raise MTLVisionError("train: give a CONFIG.yaml (or --resume RUN_DIR)")
    cfg = load_config(args.config, args.set) if args.config else RunDir(args.resume).read_config(args.set)
    out = Path(args.resume) if resume else Path(args.out) if args.out else default_out_dir(cfg)
    if args.out and resume and Path(args.out) != Path(args.resume):
        raise MTLVisionError("train: --out and --resume name different folders; give one")
    if args.overwrite and resume:
        raise MTLVisionError("train: --overwrite starts a new run, --resume continues one; give one")
    summary = train(cfg, out, resume=resume, quiet=args.quiet, overwrite=args.overwrite)
    if is_main_process():  # under torchrun every worker gets the summary; rank 0 prints it
        print_results(summary)


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Rebuild the test split from the run's config and score its best weights."""
    from ..evaluation.evaluate import evaluate
    from ..inference import Run
    from ..storage import dumps

    run = Run(args.run_dir, device=args.device)
    metrics = evaluate(run.model, run.load_split(args.split), run.tasks, run.normalize,
                       run.config.data.eval_batch_size)
    result = {"split": args.split, "best_epoch": run.best_epoch, "tasks": metrics}
    if args.json:
        print(dumps(result))
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
    from ..inference import Run, image_files
    from ..storage import dumps

    run = Run(args.run_dir, device=args.device)
    found = image_files(args.images)
    if not found:
        raise MTLVisionError(f"no image files found in {args.images}")
    arrays, kept, skipped = run.read_images([str(f) for f in found], skip_unreadable=args.skip_unreadable)
    files = [found[i] for i in kept]
    preds = run.predict(arrays, top_k=args.top_k)
    for name, reason in skipped:
        Console(stderr=True).print(f"skipped {reason}", highlight=False, soft_wrap=True)
    if skipped:
        Console(stderr=True).print(f"skipped {len(skipped)} unreadable image(s) of {len(found)}", highlight=False)
    if args.format == "json":
        print(dumps([{"image": str(f), "predictions": {t: [{"class": c, "probability": round(p, 6)}
                                                           for c, p in v] for t, v in row.items()}}
                     for f, row in zip(files, preds)]))
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


def cmd_export(args: argparse.Namespace) -> None:
    """Export a run's best weights to ONNX (uint8 NHWC images in, logits per task out) plus a JSON sidecar."""
    from ..export import sidecar_path, verify_onnx
    from ..inference import Run

    run = Run(args.run_dir, device="cpu")
    spec = run.export_onnx(args.onnx, args.opset)
    inp = spec["input"]
    outputs = ", ".join(f"{o['name']} ({len(o['classes'])})" for o in spec["outputs"])
    print(f"wrote {args.onnx} (opset {spec['opset']}) and {sidecar_path(args.onnx)}\n"
          f"input {inp['name']}: {inp['dtype']} {inp['layout']} {inp['shape']} {inp['channel_order']} 0..255, "
          f"normalisation in the graph\noutputs (logits): {outputs}")
    if args.check:
        diffs = verify_onnx(args.onnx, run.model, run.tasks, run.input)
        print("check (ONNX Runtime vs PyTorch, batches 1 and 5): max abs diff "
              + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()) + f"; overall {max(diffs.values()):.2e}")
