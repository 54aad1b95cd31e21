"""The index of a shards folder (`index.json`, see `shards.py` for the format): what a reader checks before it
opens a shard: format and version, every listed shard present with its recorded size, and inside the folder."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..tasks import Task

FORMAT = "mtlvision-shards"
VERSION = 1
INDEX = "index.json"
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    file: str
    samples: int
    bytes: int


@dataclasses.dataclass
class ShardIndex:
    """A complete shards folder: its tasks and, per split, its shards in written order."""

    root: Path
    tasks: list[Task]
    splits: dict[str, list[ShardInfo]]

    @classmethod
    def load(cls, root: str | os.PathLike) -> "ShardIndex":
        """Read `root/index.json` and check that every shard it lists is there with its recorded size."""
        root = Path(os.path.expanduser(root))
        if not root.is_dir():
            raise DataError(f"{root}: no such folder of shards (resolved to {root.resolve()})")
        path = root / INDEX
        if not path.is_file():
            n = len(list(root.glob("*.tar")))
            raise DataError(f"{root}: incomplete shards: no {INDEX} ({n} .tar file(s)); the writer did not finish "
                            "or this is not a `mtlvision shards` output; run `mtlvision shards ... --overwrite`")
        try:
            meta = json.loads(path.read_text())
            if meta.get("format") != FORMAT or meta.get("version") != VERSION:
                raise DataError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; "
                                f"expected {FORMAT!r} version {VERSION}")
            tasks = [Task.from_dict(t) for t in meta["tasks"]]
            splits = {s: [ShardInfo(**x) for x in v["shards"]] for s, v in meta["splits"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{path}: not a valid shards index ({type(exc).__name__}: {exc})") from None
        for shards in splits.values():
            for s in shards:
                f = _shard_path(root, s.file)
                size = f.stat().st_size if f.is_file() else None
                if size != s.bytes:
                    found = "is missing" if size is None else f"is {size} bytes"
                    raise DataError(f"{f} {found}, but {INDEX} says {s.bytes} bytes: incomplete shards or "
                                    "a modified folder; run `mtlvision shards ... --overwrite` again")
        return cls(root, tasks, splits)

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            raise DataError(f"{self.root}: no {split!r} split; it has {sorted(self.splits)}")
        return self.splits[split]


def _shard_path(root: Path, file: Any) -> Path:
    """`root/file` for a shard named in the index; a name leading out of `root` (absolute, with folders or
    `..`, or a link to a file elsewhere) is refused."""
    if not isinstance(file, str) or Path(file).is_absolute() or len(Path(file).parts) != 1 or file in (".", ".."):
        raise DataError(f"{root / INDEX}: shard {file!r} is not a file name in {root}; expected a name like "
                        "train-00000.tar (no folders, no '..', not absolute)")
    f = root / file
    real = f.resolve()
    if not real.is_relative_to(root.resolve()):
        raise DataError(f"{root / INDEX}: shard {file!r} is a link to {real}, outside {root}; shards must be in "
                        "the folder")
    return f
