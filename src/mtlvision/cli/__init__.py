"""Command-line interface: `mtlvision` and its subcommands (train, evaluate, predict, bench, report, ...)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from rich.console import Console

from ..errors import MTLVisionError
from .run import cmd_demo, cmd_evaluate, cmd_export, cmd_predict, cmd_train
from .tools import cmd_affinity, cmd_archs, cmd_bench, cmd_list, cmd_report, cmd_shards


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

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
    m.set_defaults(func=cmd_list, kind="methods", timm=None, torchvision=False, pretrained=False)
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
