"""Using a trained run: load its best weights and predict every task for new images."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from .config import load_config
from .data import build_data
from .data.decode import decode
from .data.loader import Normalize, TensorImages
from .data.sources.folder import IMAGE_EXTS
from .errors import CheckpointError, DataError
from .models import build_model
from .tasks import Task
from .training.trainer import load_checkpoint, resolve_device


def image_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of image files."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTS and q.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return out


class Run:
    """A finished (or interrupted) run directory: config, summary and best weights."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu") -> None:
        self.path = Path(path)
        if not (self.path / "best.pt").is_file() or not (self.path / "config.yaml").is_file():
            raise CheckpointError(f"{self.path}: not a run directory (needs best.pt and config.yaml)")
        self.config = load_config(self.path / "config.yaml")
        best = load_checkpoint(self.path / "best.pt", ("model", "tasks", "input", "epoch"))
        self.tasks = [Task.from_dict(t) for t in best["tasks"]]
        self.input = best["input"]
        self.best_epoch = best["epoch"]
        self.device = resolve_device(device)
        self.model = build_model(self.config.model, self.tasks, tuple(self.input["image_shape"]), load_weights=False)
        try:
            self.model.load_state_dict(best["model"])
        except RuntimeError as exc:
            raise CheckpointError(
                f"{self.path / 'best.pt'} does not match {self.path / 'config.yaml'}: {exc}") from None
        self.model.to(self.device).eval()
        self.normalize = Normalize(self.input["mean"], self.input["std"], self.device, channels_last=False)

    @property
    def summary(self) -> Optional[dict[str, Any]]:
        p = self.path / "summary.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def _prepare(self, images: Sequence[Any]) -> torch.Tensor:
        h, w, c = self.input["image_shape"]
        arrays = []
        for i, im in enumerate(images):
            if isinstance(im, (str, os.PathLike)):
                if not Path(im).is_file():
                    raise DataError(f"{im}: no such image file")
                arr = decode(Path(im).read_bytes(), h, c, str(im))
            else:
                arr = np.asarray(im)
                if arr.dtype != np.uint8:
                    raise DataError(f"image {i}: expected a uint8 array (0..255), got {arr.dtype}")
                if arr.ndim == 2:
                    arr = arr[..., None]
                if arr.shape[-1] != c and c == 3 and arr.shape[-1] == 1:
                    arr = np.repeat(arr, 3, -1)
                if arr.shape != (h, w, c):
                    raise DataError(f"image {i}: array shape {arr.shape}, expected {(h, w, c)} (or pass a file)")
            arrays.append(arr)
        return torch.from_numpy(np.stack(arrays)).to(self.device)

    @torch.no_grad()
    def predict(self, images: Sequence[Any], top_k: int = 1, batch_size: int = 256) -> list[dict[str, list]]:
        """For each image (file path or HxWxC uint8 array): {task: [(class, probability), ...top_k]}."""
        if top_k < 1:
            raise DataError(f"top_k must be >= 1, got {top_k}")
        results: list[dict[str, list]] = []
        for s in range(0, len(images), batch_size):
            x = self.normalize(self._prepare(images[s:s + batch_size]))
            logits = self.model(x).logits
            probs = {t.name: logits[t.name].float().softmax(1).cpu() for t in self.tasks}
            for i in range(len(x)):
                row = {}
                for t in self.tasks:
                    p, idx = probs[t.name][i].topk(min(top_k, t.num_classes))
                    row[t.name] = [(t.classes[j], float(q)) for q, j in zip(p.tolist(), idx.tolist())]
                results.append(row)
        return results

    def load_split(self, split: str = "test") -> list[tuple[TensorImages, list[str]]]:
        """Rebuild a split of the run's data from its config, as (images, task names) per input stream;
        a DataError when the data now gives other tasks or classes than the checkpoint was trained on."""
        data = build_data(self.config)
        if [(t.name, t.classes) for t in data.tasks] != [(t.name, t.classes) for t in self.tasks]:
            raise DataError(f"{self.path}: the data now gives tasks/classes that differ from the checkpoint")
        return [(TensorImages(s.split(split), self.device), s.tasks) for s in data.streams]

    def export_onnx(self, path: str | os.PathLike, opset: Optional[int] = None) -> dict[str, Any]:
        """Write an ONNX graph (uint8 NHWC images in, logits per task out) and its JSON sidecar; see export.py."""
        from .export import export_onnx

        return export_onnx(self, path, opset)


def load(run_dir: str | os.PathLike, device: str = "cpu") -> Run:
    """Load a run directory for prediction: `mtlvision.load(run_dir).predict(images)`."""
    return Run(run_dir, device)
