"""Using a trained run: load its best weights and predict every task for new images."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from .data import build_data
from .data.decode import decode
from .data.files import SizeLimit, read_file
from .data.loader import Normalize, TensorImages
from .data.sources.folder import IMAGE_EXTS
from .device import resolve_device
from .errors import CheckpointError, DataError
from .models import build_model
from .rundir import RunDir
from .tasks import Task


def image_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of image files; links are listed as found
    (a broken one fails when read, naming it)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTS
                              and (q.is_symlink() or q.is_file())))
        elif p.is_file():
            out.append(p)
        elif p.is_symlink():
            raise DataError(f"{p}: a broken link (it points to {os.readlink(p)!r}, which does not exist)")
        else:
            raise DataError(f"{p}: no such file or folder")
    return out


class Run:
    """A finished (or interrupted) run directory: config, summary and best weights."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu") -> None:
        self.dir = RunDir(path)
        self.path = self.dir.path
        best = self.dir.load_best()  # refuses a best.pt that belongs to another run
        self.config = self.dir.read_config()
        self.tasks = [Task.from_dict(t) for t in best["tasks"]]
        self.input = best["input"]
        self.best_epoch = best["epoch"]
        self.device = resolve_device(device, "--device")
        self.model = build_model(self.config.model, self.tasks, tuple(self.input["image_shape"]), load_weights=False)
        try:
            self.model.load_state_dict(best["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"{self.dir.best_path} does not match {self.dir / 'config.yaml'}: {exc}") from None
        self.model.to(self.device).eval()
        self.normalize = Normalize(self.input["mean"], self.input["std"], self.device, channels_last=False)

    @property
    def summary(self) -> Optional[dict[str, Any]]:
        return self.dir.read_summary()

    def read_image(self, image: Any, index: int = 0) -> np.ndarray:
        """A file path (decoded, resized and centre-cropped as the training images were) or an HxWxC uint8
        array of the run's image size, as the (H, W, C) uint8 array the model takes."""
        h, w, c = self.input["image_shape"]
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            if not path.is_file():
                what = "a broken link" if path.is_symlink() else "no such image file"
                raise DataError(f"{path}: {what}")
            try:
                data = read_file(path, SizeLimit())
            except OSError as exc:  # permissions, I/O errors
                raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
            return decode(data, h, c, str(path))
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise DataError(f"image {index}: expected a uint8 array (0..255), got {arr.dtype}")
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.shape[-1] != c and c == 3 and arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, -1)
        if arr.shape != (h, w, c):
            raise DataError(f"image {index}: array shape {arr.shape}, expected {(h, w, c)} (or pass a file)")
        return arr

    def read_images(self, images: Sequence[Any], skip_unreadable: bool = False,
                    ) -> tuple[list[np.ndarray], list[int], list[tuple[str, str]]]:
        """`read_image` of each: (arrays, indices read, [(image, reason)] of those skipped). Without
        `skip_unreadable` the first unreadable image raises a DataError naming it."""
        arrays, kept, skipped = [], [], []
        for i, im in enumerate(images):
            try:
                arrays.append(self.read_image(im, i))
                kept.append(i)
            except DataError as exc:
                if not skip_unreadable:
                    raise
                skipped.append((str(im) if isinstance(im, (str, os.PathLike)) else f"image {i}", str(exc)))
        return arrays, kept, skipped

    @torch.no_grad()
    def predict(self, images: Sequence[Any], top_k: int = 1, batch_size: int = 256) -> list[dict[str, list]]:
        """For each image (file path or HxWxC uint8 array): {task: [(class, probability), ...top_k]}."""
        if top_k < 1:
            raise DataError(f"top_k must be >= 1, got {top_k}")
        results: list[dict[str, list]] = []
        for s in range(0, len(images), batch_size):
            chunk = [self.read_image(im, s + i) for i, im in enumerate(images[s:s + batch_size])]
            x = self.normalize(torch.from_numpy(np.stack(chunk)).to(self.device))
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
        """Rebuild a split of the run's data from its config, as (images, task names) per input group;
        a DataError when the data now gives other tasks or classes than the checkpoint was trained on."""
        data = build_data(self.config)
        if [(t.name, t.classes) for t in data.tasks] != [(t.name, t.classes) for t in self.tasks]:
            raise DataError(f"{self.path}: the data now gives tasks/classes that differ from the checkpoint")
        return [(TensorImages(g.split(split), self.device), g.tasks) for g in data.groups]

    def export_onnx(self, path: str | os.PathLike, opset: Optional[int] = None) -> dict[str, Any]:
        """Write an ONNX graph (uint8 NHWC images in, logits per task out) and its JSON sidecar; see export.py."""
        from .export import export_model

        source = {"run": self.config.name, "best_epoch": self.best_epoch,
                  "backbone": self.config.model.backbone.name, "architecture": self.config.model.architecture.name}
        return export_model(self.model, self.tasks, self.input, path, opset, source)


def load(run_dir: str | os.PathLike, device: str = "cpu") -> Run:
    """Load a run directory for prediction: `mtlvision.load(run_dir).predict(images)`."""
    return Run(run_dir, device)
