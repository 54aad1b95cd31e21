"""The run directory: its layout, and every read and write of it.

    RUN/config.yaml      the resolved configuration (every part with every parameter)
    RUN/metrics.jsonl    one JSON line per finished epoch
    RUN/checkpoint.pt    everything needed to resume, written after every epoch
    RUN/best.pt          weights of the best validation epoch, with tasks, input spec and config
    RUN/summary.json     final metrics of the best epoch (single-task baselines add Δm)
    RUN/tb/              TensorBoard event files
    RUN/stl/<task>/      single-task baselines, each a run directory of its own

Guarantees, all here:
* every file is written atomically (`storage.atomic_write`); a killed run leaves the previous version;
* a fresh run refuses a folder that holds run files (naming them) unless told to overwrite, and then
  deletes only the files listed above and TensorBoard event files, never anything else;
* temporaries of interrupted writes (`.checkpoint.pt.*.tmp`, ...) are removed when a run starts there;
* checkpoints load with `weights_only=True`, with errors that say what is wrong with the file;
* a loaded `best.pt` must belong to the run: its config is compared with `config.yaml` (`load_best`);
* summary.json and metrics.jsonl are valid JSON (non-finite numbers become null).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import Config, load_config
from .errors import CheckpointError, ConfigError, MTLVisionError
from .storage import dumps, load_torch, save_torch, stale_temporaries, write_json, write_text

CONFIG, METRICS, CHECKPOINT, BEST, SUMMARY, TB, BASELINES, JOB = (
    "config.yaml", "metrics.jsonl", "checkpoint.pt", "best.pt", "summary.json", "tb", "stl", ".job")
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, BEST, SUMMARY, JOB)
TB_EVENTS = "events.out.tfevents.*"
# Config keys that may change when resuming (they do not alter what is computed).
RESUMABLE_CHANGES = frozenset({"name", "train.log_every", "train.device", "train.threads", "train.compile"})
BEST_KEYS = ("model", "tasks", "input", "epoch", "config")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: d}


def _normalised(config: "Config | dict[str, Any]") -> dict[str, Any]:
    """A config as a mapping with every default filled in (older runs' files list only the given keys)."""
    if isinstance(config, Config):
        return config.to_dict()
    try:
        return load_config(data=config).to_dict()
    except ConfigError:  # a config this version no longer accepts: compare it as written
        return config


def config_differences(a: "Config | dict[str, Any]", b: "Config | dict[str, Any]") -> list[str]:
    """Flattened keys whose values differ, ignoring the keys a resume may change."""
    fa, fb = _flatten(_normalised(a)), _flatten(_normalised(b))
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k) and k not in RESUMABLE_CHANGES)


class RunDir:
    """One run directory (see the module docstring). Nothing is created until something is written."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def best_path(self) -> Path:
        return self.path / BEST

    @property
    def tb_path(self) -> Path:
        return self.path / TB

    def baseline(self, task: str) -> "RunDir":
        """The run directory of `task`'s single-task baseline."""
        return RunDir(self.path / BASELINES / task)

    # -- state of the folder ----------------------------------------------------------------------
    def has_checkpoint(self) -> bool:
        return (self.path / CHECKPOINT).is_file()

    def is_finished(self) -> bool:
        return (self.path / SUMMARY).is_file()

    def run_files(self) -> list[str]:
        """The files of a run found here (what a fresh run would replace)."""
        found = [n for n in RUN_FILES if (self.path / n).exists()]
        if self.tb_path.is_dir() and any(self.tb_path.glob(TB_EVENTS)):
            found.append(f"{TB}/{TB_EVENTS}")
        return found

    def refuse_if_used(self) -> None:
        """A fresh run may not replace another run's files without being told to (`--overwrite`)."""
        found = ", ".join(n for n in self.run_files() if n != JOB)
        if found and self.has_checkpoint():
            raise CheckpointError(f"{self.path} already holds a run; use --resume {self.path} or another --out "
                                  f"(or --overwrite to replace its files: {found})")
        if found:
            raise CheckpointError(f"{self.path} already holds a run's files ({found}); use another --out, or "
                                  "--overwrite to replace them")

    def start_fresh(self, job: Optional[str]) -> None:
        """Delete a previous run's files (those listed in the module docstring and TensorBoard event files,
        nothing else) and record which torchrun job (`distributed.job_id`, None outside torchrun) now writes
        here. `job` has no default: a caller that forgot it would leave a restarted worker refused its own
        folder."""
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        if self.tb_path.is_dir():
            for event in self.tb_path.glob(TB_EVENTS):
                event.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        if job is not None:
            write_text(self.path / JOB, job + "\n")

    def written_by(self, job: Optional[str]) -> bool:
        """True when torchrun job `job` started the run found here (a restarted worker may then replace it)."""
        path = self.path / JOB
        return job is not None and path.is_file() and path.read_text().strip() == job

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temp files interrupted atomic writes left here; returns them."""
        stale = stale_temporaries(self.path, list(RUN_FILES)) if self.path.is_dir() else []
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    # -- config -----------------------------------------------------------------------------------
    def write_config(self, cfg: Config) -> None:
        write_text(self.path / CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def is_run(self) -> bool:
        return (self.path / CONFIG).is_file()

    def has_best(self) -> bool:
        return (self.path / BEST).is_file()

    def config_text(self) -> str:
        """config.yaml as written (a report shows it verbatim)."""
        return (self.path / CONFIG).read_text()

    def read_config(self, overrides: Optional[list[str]] = None) -> Config:
        path = self.path / CONFIG
        if not path.is_file():
            raise CheckpointError(f"{self.path}: not a run directory (no {CONFIG})")
        return load_config(path, overrides)

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        save_torch(self.path / CHECKPOINT, state)

    def load_checkpoint(self, keys: tuple[str, ...] = ()) -> dict[str, Any]:
        return load_torch(self.path / CHECKPOINT, keys)

    def save_best(self, state: dict[str, Any]) -> None:
        save_torch(self.path / BEST, state)

    def load_best(self) -> dict[str, Any]:
        """best.pt, checked to belong to this run: same config as config.yaml, and the tasks of the run's
        summary (or checkpoint) when there is one."""
        if not (self.path / BEST).is_file() or not (self.path / CONFIG).is_file():
            raise CheckpointError(f"{self.path}: not a run directory (needs {BEST} and {CONFIG})")
        best = load_torch(self.path / BEST, BEST_KEYS)
        diff = config_differences(best["config"], self.read_config())
        if diff:
            raise CheckpointError(f"{self.path / BEST} does not belong to this run: its config differs from "
                                  f"{self.path / CONFIG} in {', '.join(diff[:8])}")
        tasks = [(t["name"], t["classes"]) for t in best["tasks"]]
        summary = self.read_summary()
        if summary is not None:
            expected = [(n, s.get("classes")) for n, s in summary["tasks"].items()]
            if tasks != expected:
                raise CheckpointError(f"{self.path / BEST} does not belong to this run: its tasks "
                                      f"{[n for n, _ in tasks]} differ from {SUMMARY}'s {[n for n, _ in expected]}")
        return best

    # -- metrics.jsonl ----------------------------------------------------------------------------
    def append_metrics(self, line: dict[str, Any]) -> None:
        with (self.path / METRICS).open("a") as f:
            f.write(dumps(line, indent=None) + "\n")

    def read_metrics(self) -> tuple[list[dict[str, Any]], int]:
        """The epoch lines (none when the file is absent) and how many unreadable lines were skipped (a crash
        can leave a torn last line)."""
        path = self.path / METRICS
        out, bad = [], 0
        for line in (path.read_text().splitlines() if path.is_file() else []):
            try:
                out.append(json.loads(line))
            except ValueError:
                bad += 1
        return out, bad

    def metrics(self) -> list[dict[str, Any]]:
        return self.read_metrics()[0]

    def truncate_metrics(self, last_epoch: int) -> None:
        """Keep the lines up to `last_epoch` (a crash can leave a later or a torn line)."""
        path = self.path / METRICS
        if path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["epoch"] <= last_epoch:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue
            write_text(path, "".join(x + "\n" for x in kept))

    # -- summary.json -----------------------------------------------------------------------------
    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.path / SUMMARY, summary)

    def read_summary(self) -> Optional[dict[str, Any]]:
        path = self.path / SUMMARY
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise MTLVisionError(f"{path}: not valid JSON ({exc})") from None
