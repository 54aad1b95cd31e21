"""Files written whole or not at all, JSON that is always valid, and checkpoints loaded safely.

* `atomic_write` writes a temp file `.NAME.XXXXXXXX.tmp` beside the target, fsyncs it and renames it over the
  target: a crash leaves the previous file intact (and at worst a temp file, which `stale_temporaries`
  finds by that pattern). A full disk is reported as such, naming the file.
* JSON is written with `allow_nan=False` after non-finite floats become null: no NaN/Infinity tokens.
* `load_torch` reads with `weights_only=True` and turns torch's many failure types into one-line errors
  that say what is wrong with the file (empty, truncated, not a checkpoint, holding code).
"""
from __future__ import annotations

import errno
import json
import math
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .errors import CheckpointError, MTLVisionError

_FULL = (errno.ENOSPC, errno.EDQUOT)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


class _Recorder:
    """A file wrapper that remembers the OSError a write raised (torch.save reports it as a bare RuntimeError)."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def temp_pattern(name: str) -> str:
    """The glob of the temp files `atomic_write` makes for a target named `name`."""
    return f".{name}.*.tmp"


def stale_temporaries(folder: Path, names: list[str]) -> list[Path]:
    """Temp files left in `folder` by interrupted atomic writes of the files called `names`."""
    return sorted(p for n in names for p in folder.glob(temp_pattern(n)) if p.is_file())


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call `write(fileobj)` on a temp file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    recorder: Optional[_Recorder] = None
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; written files get the usual permissions
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            recorder = _Recorder(f)
            write(recorder)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = recorder.error if recorder is not None and recorder.error is not None else exc
        if isinstance(cause, OSError) and cause.errno in _FULL:
            kept = "the previous version is unchanged" if path.exists() else "nothing was written"
            raise MTLVisionError(f"{path}: cannot write it, the disk is full ({os.strerror(cause.errno)}); "
                                 f"{kept}. Free some space and resume.") from None
        raise


def json_safe(data: Any) -> Any:
    """`data` with every non-finite float (NaN, ±inf) replaced by None, so that it is valid JSON."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    return data


def dumps(data: Any, indent: Optional[int] = 2) -> str:
    """JSON text of `data`; non-finite floats become null (never NaN/Infinity, which JSON does not have)."""
    return json.dumps(json_safe(data), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write(path, lambda f: f.write(dumps(data) + "\n"), "w")


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), "w")


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def load_torch(path: Path, keys: tuple[str, ...] = (), what: str = "an mtlvision checkpoint") -> Any:
    """torch.load(weights_only=True) of `path` (to the CPU), with a CheckpointError naming the problem:
    missing, empty, truncated or not a torch file, holding pickled code (refused, never run), or (a dict)
    lacking one of `keys`."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: cannot load checkpoint: the file is empty (0 bytes), it was not written "
                              "completely")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message suggests weights_only=False, which would run whatever code the file holds
        raise CheckpointError(f"{path}: cannot load checkpoint: it holds pickled Python objects other than tensors "
                              "and plain data, refused (loading them could run code; mtlvision's own checkpoints "
                              "hold none)") from None
    except Exception as exc:  # torch raises many types for truncated or foreign files
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM):
            raise CheckpointError(f"{path}: cannot load checkpoint: {exc.strerror}") from None
        detail = (str(exc).splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path}: cannot load checkpoint: the file is truncated or not a PyTorch checkpoint "
                              f"({size} bytes; {type(exc).__name__}: {detail})") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise CheckpointError(f"{path}: not {what} (missing {', '.join(missing)})")
    return obj
