"""Smoke-run helpers for the benchmark scripts (not a public API): a tiny synthetic CIFAR-10 for the
scripts that read real JPEGs, and `--dry-run` checking of the commands the shell benchmarks would run.

Imports nothing of mtlvision at module level: cifar10_reference.py, which shares no code with mtlvision,
uses the data helper too.

    python benchmarks/_smoke.py < commands.txt     (one shell-quoted command per line)

checks each command without running it: `python -m mtlvision train CONFIG [--set K=V ...] ...` by loading
CONFIG with the overrides (every key, value and name the config validator knows), and
`python benchmarks/cifar10_reference.py ...` by parsing its arguments; prints one JSON object and exits 2
if any command is invalid.
"""
from __future__ import annotations

import io
import json
import shlex
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_tiny_cifar10(root: Path, train_per_class: int = 8, test_per_class: int = 2, seed: int = 0) -> Path:
    """train.tar.gz and test.tar.gz in CIFAR-10's ImageFolder layout (split/class/n.jpg) of random
    32x32 JPEGs: what a smoke run reads where the real data are absent or too slow to decode."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        with tarfile.open(root / f"{split}.tar.gz", "w:gz") as tf:
            for cls in CIFAR10_CLASSES:
                for i in range(n):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
                    info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tf.addfile(info, buf)
    return root


def check_command(line: str) -> dict[str, Any]:
    """{"command", "valid", "error"} for one shell-quoted command line."""
    argv = shlex.split(line)
    out: dict[str, Any] = {"command": line, "valid": True, "error": None}
    try:
        if argv[1:4] == ["-m", "mtlvision", "train"]:
            from mtlvision.config import load_config

            rest, config, sets = argv[4:], None, []
            while rest:
                arg = rest.pop(0)
                if arg == "--set":
                    sets.append(rest.pop(0))
                elif arg in ("--out", "--resume"):
                    rest.pop(0)
                elif not arg.startswith("-") and config is None:
                    config = arg
            if config is None:
                raise ValueError("no CONFIG.yaml")
            load_config(config, sets)
        elif len(argv) > 1 and argv[1].endswith("cifar10_reference.py"):
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from cifar10_reference import build_parser

            build_parser().parse_args(argv[2:])
        else:
            raise ValueError("not a command this checker knows")
    except SystemExit as exc:  # argparse
        out.update(valid=False, error=f"bad arguments (exit {exc.code})")
    except Exception as exc:  # a config error names the key at fault
        out.update(valid=False, error=f"{type(exc).__name__}: {exc}")
    return out


def main() -> int:
    lines = [line for line in sys.stdin.read().splitlines() if line.strip()]
    checks = [check_command(line) for line in lines]
    ok = bool(checks) and all(c["valid"] for c in checks)
    json.dump({"dry_run": True, "valid": ok, "commands": checks}, sys.stdout, indent=2)
    print()
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
