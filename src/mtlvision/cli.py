"""Command-line interface: `mtlvision` and its subcommands (train, evaluate, predict, bench, report, ...)."""
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
    from .training import train

    cfg = load_config(data=DEMO_CONFIG, overrides=[f"train.epochs={args.epochs}"] if args.epochs else [])
    out = Path(args.out) if args.out else _free_dir(Path("runs") / "demo")
    Console(stderr=True).print(f"Training the demo (procedural shapes, 4 tasks) into {out} ...")
    print_results(train(cfg, out, quiet=args.quiet))


def cmd_train(args: argparse.Namespace) -> None:
    from .rundir import RunDir
    from .config import load_config
    from .reports import print_results
    from .training import default_out_dir, train
    from .training.distributed import is_main_process

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
    from .evaluation.evaluate import evaluate
    from .inference import Run
    from .storage import dumps

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
    from .inference import Run, image_files
    from .storage import dumps

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
    from .export import sidecar_path, verify_onnx
    from .inference import Run

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


def cmd_shards(args: argparse.Namespace) -> None:
    """Pack an imagefolder or csv source, bytes unchanged, into WebDataset-style tar shards."""
    import time

    from .config import load_config
    from .data import SOURCES
    from .data.shards import write_shards

    if (args.config is None) == (args.src is None):
        raise MTLVisionError("shards: give SRC (an image folder) or --config CONFIG.yaml, not both")
    if args.config is not None:
        cfg = load_config(args.config, args.set)
        if cfg.data.sources:
            raise MTLVisionError("shards: the config sets data.sources (multi-input); pack one source at a time")
        spec = cfg.data.source.to_config()
        given = [flag for flag, value in (("--task", args.task), ("--csv", args.csv), ("--tasks", args.tasks),
                                          ("--test-csv", args.test_csv), ("--split-column", args.split_column),
                                          ("--image-column", args.image_column)) if value is not None]
        if given:
            raise MTLVisionError(f"shards: {', '.join(given)} describe SRC; with --config the source is "
                                 "data.source (change it with --set data.source.KEY=VALUE)")
        if args.skip_corrupt:
            spec["skip_corrupt"] = True
    elif args.set:
        raise MTLVisionError("shards: --set needs --config")
    elif args.csv is not None:
        if not args.tasks:
            raise MTLVisionError("shards: --csv needs --tasks COL[,COL...] (the label columns)")
        spec = {"name": "csv", "images": args.src, "csv": args.csv, "tasks": args.tasks.split(","),
                "test_csv": args.test_csv, "split_column": args.split_column, "image_column": args.image_column,
                "skip_corrupt": args.skip_corrupt}
    else:
        spec = {"name": "imagefolder", "path": args.src, "task": args.task, "skip_corrupt": args.skip_corrupt}
    if spec.get("name") not in ("imagefolder", "csv"):
        raise MTLVisionError(f"shards: data.source.name is {spec.get('name')!r}; `mtlvision shards` packs "
                             "imagefolder and csv")
    source = SOURCES.build(SOURCES.spec({k: v for k, v in spec.items() if v is not None}, "data.source"))
    start = time.perf_counter()
    index = write_shards(source, args.out, splits=None if args.split == "all" else [args.split],
                         shard_size=args.shard_size, max_shard_mb=args.max_shard_mb, seed=args.seed,
                         overwrite=args.overwrite)
    seconds = time.perf_counter() - start
    total = sum(v["samples"] for v in index["splits"].values())
    print(f"wrote {args.out}: " + ", ".join(f"{s} {v['samples']} samples in {len(v['shards'])} shard(s)"
                                          for s, v in index["splits"].items())
          + f"; {seconds:.1f} s, {total / seconds:,.0f} images/s"
          + (f"; skipped {len(index['skipped'])} unreadable file(s)" if index["skipped"] else ""))


def cmd_list(args: argparse.Namespace) -> None:
    from .registry import ARCHITECTURES, BACKBONES, HEADS, METHODS, SOURCES

    registries = {"sources": SOURCES, "backbones": BACKBONES, "architectures": ARCHITECTURES,
                  "heads": HEADS, "methods": METHODS}
    if args.timm is not None or args.torchvision or args.pretrained:
        from .errors import ConfigError

        if args.pretrained and args.timm is None:
            raise ConfigError("--pretrained goes with --timm PATTERN")
        if args.kind not in (None, "backbones"):
            raise ConfigError(f"--timm / --torchvision list backbone models, not {args.kind}")
        if args.timm is not None:  # timm's own listing; a tag (name.tag) names pretrained weights
            import timm

            names = timm.list_models(args.timm, pretrained=args.pretrained)
            title = f"timm models matching {args.timm!r}"
        else:
            from torchvision.models import list_models

            names, title = list_models(), "torchvision models"
        table = Table(title=f"{title} ({len(names)}){', pretrained weights' if args.pretrained else ''}")
        table.add_column("model")
        for name in names:
            table.add_row(name)
        Console().print(table)
        return
    for kind in ([args.kind] if args.kind else registries):
        table = Table(title=kind)
        table.add_column("name")
        if kind == "methods":
            table.add_column("cost per step")
        table.add_column("description")
        for e in registries[kind].entries():
            cost = [getattr(e.factory, "cost_class", "")] if kind == "methods" else []
            table.add_row(e.name, *cost, e.description)
        Console().print(table)


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import run_suite

    console = Console(stderr=True)

    def on_run(i: int, n: int, run, action: str) -> None:
        if action == "run" or args.verbose:
            console.print(f"[{i + 1}/{n}] {action} {run.out}", highlight=False)

    out = run_suite(args.suite, args.out, args.set, on_run)
    print((out / "results.md").read_text(), end="")


def cmd_report(args: argparse.Namespace) -> None:
    """Write report.html (self-contained) and report.md (+ PNGs) for a run or bench directory."""
    from .reports import write_report

    paths = write_report(args.path, args.out, device=args.device)
    print(f"wrote {paths['html']} and {paths['markdown']}")


def cmd_archs(args: argparse.Namespace) -> None:
    """Every registered architecture's parameters and forward FLOPs on one backbone and task count."""
    from .models.profile import profile_architectures

    backbone: dict = {"name": args.backbone}
    if args.width is not None:
        backbone["width"] = int(args.width) if args.width.is_integer() else args.width  # smallcnn: int
    rows = profile_architectures(backbone, args.tasks, args.image_size, args.classes, args.channels)
    if args.json:
        print(json.dumps({"backbone": backbone, "tasks": args.tasks, "image_size": args.image_size,
                          "classes": args.classes, "channels": args.channels, "architectures": rows}, indent=2))
        return
    width = f" width {backbone['width']}" if "width" in backbone else ""
    table = Table(title=f"architectures on {args.backbone}{width}, {args.tasks} tasks of {args.classes} classes, "
                        f"{args.image_size}x{args.image_size} images")
    for col in ("architecture", "params", "trunk params", "MFLOPs", "vs hps", "shared size"):
        table.add_column(col, justify="left" if col == "architecture" else "right", no_wrap=True)
    for r in rows:
        if "error" in r:
            table.add_row(r["architecture"], *["n/a"] * 5)
            continue
        rel = f"{r['relative_flops']:.2f}x" if r.get("relative_flops") else "-"
        table.add_row(r["architecture"], f"{r['parameters']:,}", f"{r['shared_parameters']:,}",
                      f"{r['flops'] / 1e6:,.1f}", rel, f"{r['shared_size']:,}")
    console = Console()
    console.print(table)
    for r in rows:
        if "error" in r:
            console.print(f"{r['architecture']}: not buildable here: {r['error']}", highlight=False)
    console.print("trunk params: upstream of the shared representation; shared size: its elements per image "
                  "(what feature-space balancing methods differentiate)", style="dim", highlight=False)


def cmd_affinity(args: argparse.Namespace) -> None:
    from .affinity import run_affinity
    from .config import load_config

    cfg = load_config(args.config, args.set)
    result = run_affinity(cfg, args.out, every=args.every, budgets=args.budget, resume=args.resume,
                          quiet=args.quiet)
    names = result["tasks"]
    table = Table(title=f"task affinity Z(i→j), mean of {result['measurements']} lookahead measurements")
    table.add_column("i steps \\ j changes")
    for n in names:
        table.add_column(n, justify="right")
    for n, row in zip(names, result["affinity"]):
        table.add_row(n, *[f"{v:+.4f}" for v in row])
    groups = Table(title="suggested groupings (each task served by its most helpful group)")
    for col in ("networks", "groups", "total affinity"):
        groups.add_column(col)
    for g in result["groupings"]:
        groups.add_row(str(g["budget"]), "  ".join("{" + ", ".join(x) + "}" for x in g["groups"]),
                       f"{g['score']:+.4f}")
    console = Console()
    console.print(table)
    console.print(groups)


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
    t.add_argument("--out", help="run directory (default: runs/<config name>); under torchrun, a worker that "
                                 "torchrun restarts (--max-restarts) resumes the run found there")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run files (config, metrics, checkpoints, summary, TensorBoard events) "
                        "of an earlier run in --out; without it such a folder is refused")
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
    r.add_argument("--skip-unreadable", action="store_true",
                   help="skip (and list on stderr) images that cannot be read or decoded instead of stopping")
    r.set_defaults(func=cmd_predict)

    x = sub.add_parser("export", help="export a run's best weights to ONNX (uint8 images in, logits per task out)")
    x.add_argument("run_dir")
    x.add_argument("--onnx", required=True, metavar="OUT.onnx",
                   help="output file; a sidecar OUT.onnx.json is written too")
    x.add_argument("--opset", type=int, help="ONNX opset version (default: the exporter's)")
    x.add_argument("--check", action="store_true",
                   help="run the file in ONNX Runtime on random batches and compare with PyTorch (needs onnxruntime)")
    x.set_defaults(func=cmd_export)

    sh = sub.add_parser("shards", help="pack an image folder (or CSV-labelled images) into WebDataset-style tar shards")
    sh.add_argument("src", nargs="?", metavar="SRC",
                    help="ImageFolder root (train/ and test/ folders or .tar.gz), or with --csv the images' folder")
    sh.add_argument("out", metavar="OUT", help="output folder: SPLIT-NNNNN.tar shards, then index.json")
    sh.add_argument("--config", help="pack data.source (imagefolder or csv) of this CONFIG.yaml instead of SRC")
    sh.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override a value of --config (YAML syntax); repeatable")
    sh.add_argument("--task", help="imagefolder: the task's name (default class)")
    sh.add_argument("--csv", metavar="FILE", help="CSV of image paths (relative to SRC) and label columns")
    sh.add_argument("--tasks", metavar="COL[,COL...]", help="csv: the label columns, one task each")
    sh.add_argument("--test-csv", metavar="FILE", help="csv: test rows")
    sh.add_argument("--split-column", metavar="COL", help="csv: column with train/val/test (instead of --test-csv)")
    sh.add_argument("--image-column", help="csv: column of image paths (default image)")
    sh.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images (listed in index.json)")
    sh.add_argument("--shard-size", type=int, metavar="N",
                    help="samples per shard (default 1000 unless --max-shard-mb is given)")
    sh.add_argument("--max-shard-mb", type=float, metavar="M", help="start a new shard before one passes M MiB")
    sh.add_argument("--split", choices=["train", "val", "test", "all"], default="all", help="splits to write")
    sh.add_argument("--seed", type=int, default=0, help="seed of the shuffle that mixes samples across shards")
    sh.add_argument("--overwrite", action="store_true", help="replace a previous `mtlvision shards` output in OUT")
    sh.set_defaults(func=cmd_shards)

    ls = sub.add_parser("list", help="list registered sources, backbones, architectures, heads, methods")
    ls.add_argument("kind", nargs="?", choices=["sources", "backbones", "architectures", "heads", "methods"])
    ls.add_argument("--timm", metavar="PATTERN", help="list timm models matching PATTERN, e.g. 'convnext*' "
                    "(for model.backbone: {name: timm, model: NAME})")
    ls.add_argument("--pretrained", action="store_true", help="with --timm: only models with pretrained weights, "
                    "as name.tag")
    ls.add_argument("--torchvision", action="store_true", help="list torchvision's models (name: torchvision)")
    ls.set_defaults(func=cmd_list)

    b = sub.add_parser("bench", help="run a suite: architectures x methods x seeds plus single-task baselines")
    b.add_argument("suite", help="SUITE.yaml (see configs/bench/)")
    b.add_argument("--out", help="suite directory (default: runs/bench/<suite name>)")
    b.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value in every run, e.g. --set train.epochs=1; repeatable")
    b.add_argument("--verbose", action="store_true", help="also list the finished runs that are skipped")
    b.set_defaults(func=cmd_bench)

    rp = sub.add_parser("report", help="HTML + Markdown report of a run or bench directory (plots, confusion matrices)")
    rp.add_argument("path", metavar="RUN_DIR_OR_BENCH_DIR")
    rp.add_argument("--out", help="output folder (default: RUN_DIR_OR_BENCH_DIR/report)")
    rp.add_argument("--device", default="cpu", help="device for evaluating best.pt on the test split (default cpu)")
    rp.set_defaults(func=cmd_report)

    a = sub.add_parser("archs", help="list architectures with parameter counts and FLOPs relative to hps")
    a.add_argument("--backbone", default="resnet18", help="backbone name (default resnet18)")
    a.add_argument("--width", type=float, help="backbone width (resnet18: multiplier; smallcnn: channels)")
    a.add_argument("--tasks", type=int, default=3, help="number of tasks (default 3)")
    a.add_argument("--classes", type=int, default=10, help="classes per task (default 10)")
    a.add_argument("--image-size", type=int, default=32, help="square input size in pixels (default 32)")
    a.add_argument("--channels", type=int, default=3, help="input channels (default 3)")
    a.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a.set_defaults(func=cmd_archs)

    a = sub.add_parser("affinity", help="train while measuring lookahead task affinity (TAG); suggest groupings")
    a.add_argument("config", help="CONFIG.yaml")
    a.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value, e.g. --set train.epochs=2; repeatable")
    a.add_argument("--out", help="run directory (default: runs/<config name>-affinity)")
    a.add_argument("--every", type=int, default=10, help="measure every N training steps (default 10)")
    a.add_argument("--budget", type=int, action="append", metavar="K",
                   help="number of networks for the suggested grouping; repeatable (default: 1..T)")
    a.add_argument("--resume", action="store_true", help="continue an interrupted measurement in --out")
    a.add_argument("--quiet", action="store_true", help="no progress output")
    a.set_defaults(func=cmd_affinity)

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
