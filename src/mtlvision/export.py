"""Export a trained model to ONNX: raw uint8 pixels in, one logits output per task, plus a JSON sidecar.

The graph takes what `Run.predict` takes for arrays, so a deployment needs no mtlvision and no
preprocessing code beyond decoding and resizing: a uint8 tensor (batch, H, W, C), channels last, RGB
(C = 3) or grayscale (C = 1), values 0..255, at the run's image size. The per-channel normalisation
(x / 255 - mean) / std and the NHWC -> NCHW transpose are part of the graph; the batch dimension is
dynamic. Outputs are float32 logits (batch, num_classes), named after the tasks; softmax gives the
probabilities `predict` reports. `OUT.onnx.json` lists tasks, classes and this input spec.
"""
from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ._version import __version__
from .data.loader import Normalize
from .errors import MTLVisionError
from .models import Architecture
from .storage import atomic_write, write_json
from .tasks import Task

SIDECAR_SUFFIX = ".json"
MIN_OPSET = 18  # the torch.export-based exporter's lowest opset; below it, it silently falls back to 18
RTOL = ATOL = 1e-4  # ONNX Runtime vs PyTorch tolerance of `verify_onnx` (fp32 kernels differ by ~1e-6)


class OnnxGraph(nn.Module):
    """What is exported: uint8 NHWC images -> normalised float NCHW -> the model's logits, in task order."""

    def __init__(self, model: Architecture, tasks: Sequence[Task], input_spec: dict[str, Any]) -> None:
        super().__init__()
        # a CPU copy in eval mode (dropout off, batch-norm running statistics): the caller's model is untouched
        self.model = copy.deepcopy(model).cpu().eval()
        self.task_names = [t.name for t in tasks]
        # the normalisation `predict` applies (data.loader.Normalize), inside the graph
        self.normalize = Normalize(input_spec["mean"], input_spec["std"], torch.device("cpu"), channels_last=False)
        self.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.model(self.normalize(images)).logits
        return tuple(logits[name] for name in self.task_names)


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MTLVisionError(f"ONNX export needs {', '.join(missing)}: pip install 'mtlvision[export]'")


def input_name(tasks: Sequence[Task]) -> str:
    """`images`, unless a task (hence an output) already has that name."""
    return "images_uint8" if any(t.name == "images" for t in tasks) else "images"


def sidecar_path(onnx_path: str | os.PathLike) -> Path:
    """The JSON sidecar next to an ONNX file: model.onnx -> model.onnx.json (never clashes with other JSON)."""
    return Path(f"{onnx_path}{SIDECAR_SUFFIX}")


def export_model(model: Architecture, tasks: Sequence[Task], input_spec: dict[str, Any], path: str | os.PathLike,
                 opset: Optional[int] = None, source: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Write `path` (ONNX) and `path`.json (sidecar) atomically; returns the sidecar's content.

    Uses the torch.export-based exporter (`dynamo=True`, needs onnxscript): it is PyTorch's default and
    maintained path since 2.9, while the TorchScript exporter is deprecated and warns on every call. It
    also gives the batch dimension a symbolic name ("batch") carried into the ONNX input and outputs.
    """
    _require("onnx", "onnxscript")
    if opset is not None and opset < MIN_OPSET:
        raise MTLVisionError(f"opset {opset}: the ONNX exporter supports opset {MIN_OPSET} and above")
    h, w, c = (int(v) for v in input_spec["image_shape"])
    graph = OnnxGraph(model, tasks, input_spec)
    name = input_name(tasks)
    # batch 2 in the example: torch.export specialises sizes 0 and 1, which would pin the batch dimension
    example = torch.zeros(2, h, w, c, dtype=torch.uint8)
    try:
        with torch.no_grad():
            program = torch.onnx.export(graph, (example,), dynamo=True, input_names=[name],
                                        output_names=graph.task_names, opset_version=opset,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    except Exception as exc:  # the exporter raises many types (OnnxExporterError, torch.export's, onnxscript's)
        raise MTLVisionError(f"ONNX export failed ({type(exc).__name__}): {exc}") from None
    proto = program.model_proto
    got = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and got != opset:
        raise MTLVisionError(f"opset {opset}: the exporter produced opset {got} (it supports {MIN_OPSET} and above)")
    # torch.export silently specialises the batch when the model reads it as a Python int (len(x) in a .view())
    fixed = [v.name for v in [*proto.graph.input, *proto.graph.output] if not v.type.tensor_type.shape.dim[0].dim_param]
    if fixed:
        raise MTLVisionError(f"ONNX export: the traced graph fixes the batch size of {', '.join(fixed)} (the model "
                             "reads the batch size as a Python int, e.g. len(x) in a .view(); use x.shape[0] or -1)")
    data = proto.SerializeToString()
    atomic_write(path, lambda f: f.write(data))
    spec = {
        "format": "mtlvision-onnx",
        "mtlvision_version": __version__,
        "onnx_file": Path(path).name,
        "opset": got,
        "input": {
            "name": name, "dtype": "uint8", "layout": "NHWC", "shape": ["batch", h, w, c],
            "channel_order": "RGB" if c == 3 else "grayscale", "value_range": [0, 255],
            "resize": f"short side to {h} px (bilinear), then centre-crop {h}x{w}, as `mtlvision predict` does",
            "normalization": {"in_graph": True, "formula": "(x / 255 - mean) / std, per channel",
                              "mean": list(input_spec["mean"]), "std": list(input_spec["std"])},
        },
        "outputs": [{"name": t.name, "task": t.name, "dtype": "float32", "shape": ["batch", t.num_classes],
                     "kind": t.kind, "classes": list(t.classes)} for t in tasks],
        "output_meaning": "logits; softmax over the last axis gives class probabilities",
        "source": source or {},
    }
    write_json(sidecar_path(path), spec)
    return spec


def verify_onnx(path: str | os.PathLike, model: Architecture, tasks: Sequence[Task], input_spec: dict[str, Any],
                batch_sizes: Sequence[int] = (1, 5), seed: int = 0) -> dict[str, float]:
    """Run the ONNX file in ONNX Runtime on random uint8 batches and compare with PyTorch.

    Returns each task's max abs logit difference over all batches; raises if any output is not
    within rtol = atol = 1e-4 of PyTorch's (or has the wrong shape).
    """
    _require("onnxruntime")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    graph = OnnxGraph(model, tasks, input_spec)
    h, w, c = (int(v) for v in input_spec["image_shape"])
    rng = np.random.default_rng(seed)
    diffs = {t.name: 0.0 for t in tasks}
    bad = []
    for b in batch_sizes:
        x = rng.integers(0, 256, (b, h, w, c), dtype=np.uint8)
        got = session.run(graph.task_names, {input_name(tasks): x})
        with torch.no_grad():
            want = [t.numpy() for t in graph(torch.from_numpy(x))]
        for name, g, e in zip(graph.task_names, got, want):
            if g.shape != e.shape:
                raise MTLVisionError(f"{path}: output {name!r} has shape {g.shape} for batch {b}, expected {e.shape}")
            diffs[name] = max(diffs[name], float(np.abs(g - e).max()))
            if not np.allclose(g, e, rtol=RTOL, atol=ATOL):
                bad.append(f"{name} (batch {b})")
    if bad:
        detail = ", ".join(f"{k}: {v:.3g}" for k, v in diffs.items())
        raise MTLVisionError(f"{path}: ONNX Runtime differs from PyTorch beyond {ATOL:g} for {', '.join(bad)}; "
                             f"max abs diffs {detail}")
    return diffs
