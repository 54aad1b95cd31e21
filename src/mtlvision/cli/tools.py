"""Commands around runs: shards, list, bench, report, archs, affinity."""
from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from ..errors import MTLVisionError


def cmd_shards(args: argparse.Namespace) -> None:
    """Pack an imagefolder or csv source, bytes unchanged, into WebDataset-style tar shards."""
    import time

    from ..config import load_config
    from ..data import SOURCES
    from ..data.shards import write_shards

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
    from ..registry import ARCHITECTURES, BACKBONES, HEADS, METHODS, SOURCES

    registries = {"sources": SOURCES, "backbones": BACKBONES, "architectures": ARCHITECTURES,
                  "heads": HEADS, "methods": METHODS}
    if args.timm is not None or args.torchvision or args.pretrained:
        from ..errors import ConfigError

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
    from ..bench import run_suite

    console = Console(stderr=True)

    def on_run(i: int, n: int, run, action: str) -> None:
        if action == "run" or args.verbose:
            console.print(f"[{i + 1}/{n}] {action} {run.out}", highlight=False)

    out = run_suite(args.suite, args.out, args.set, on_run)
    print((out / "results.md").read_text(), end="")


def cmd_report(args: argparse.Namespace) -> None:
    """Write report.html (self-contained) and report.md (+ PNGs) for a run or bench directory."""
    from ..reports import write_report

    paths = write_report(args.path, args.out, device=args.device)
    print(f"wrote {paths['html']} and {paths['markdown']}")


def cmd_archs(args: argparse.Namespace) -> None:
    """Every registered architecture's parameters and forward FLOPs on one backbone and task count."""
    from ..models.profile import profile_architectures

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
    from ..affinity import run_affinity
    from ..config import load_config

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
