"""ONNX export: every architecture, dynamic batch, uint8 input with normalisation in the graph, CLI, errors."""
import importlib.util
import json
import shutil
import sys

import numpy as np
import pytest
import torch

import mtlvision
from mtlvision.cli import build_parser, main
from mtlvision.config import load_config
from mtlvision.data.loader import Normalize
from mtlvision.errors import MTLVisionError
from mtlvision.export import export_model, sidecar_path, verify_onnx
from mtlvision.models import ARCHITECTURES, build_model
from mtlvision.tasks import Task

from conftest import tiny_config

needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="ONNX export tests need onnx, onnxscript and onnxruntime: pip install 'mtlvision[dev]'")

# "type" would clash with nn.ModuleDict attributes; "colour" has 7 classes, "type" is binary
TASKS = [Task("shape", ["circle", "square", "triangle"]), Task("type", ["a", "b"]), Task("colour", list("rgbcmyk"))]
SPEC = {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3], "image_shape": [16, 16, 3]}


def tiny_model(arch: str, tasks=TASKS, spec=SPEC, backbone=None, head=None):
    """An untrained 16 px model whose weights and batch-norm statistics are perturbed away from their init
    (zero-initialised layers would hide wrong exports), returned in train mode (export must switch to eval)."""
    cfg = load_config(data=tiny_config(model__backbone=backbone or {"name": "smallcnn", "width": 4, "out_dim": 16},
                                       model__architecture={"name": arch}, model__head=head or {"name": "linear"}))
    torch.manual_seed(0)
    model = build_model(cfg.model, tasks, tuple(spec["image_shape"]), load_weights=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return model.train()


def onnx_session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_export(model, tasks, spec, path) -> dict[str, float]:
    """Export, then compare ONNX Runtime with the eval-mode model fed as `predict` feeds it, batches 1 and 5."""
    sidecar = export_model(model, tasks, spec, path)
    assert model.training, "export must not change the caller's model"
    h, w, c = spec["image_shape"]
    session = onnx_session(path)
    (inp,) = session.get_inputs()
    assert (inp.name, inp.type, inp.shape) == (sidecar["input"]["name"], "tensor(uint8)", ["batch", h, w, c])
    assert [(o.name, o.shape) for o in session.get_outputs()] == [(t.name, ["batch", t.num_classes]) for t in tasks]
    assert [(o["name"], o["classes"]) for o in sidecar["outputs"]] == [(t.name, t.classes) for t in tasks]
    assert json.loads(sidecar_path(path).read_text()) == sidecar
    reference = model.eval()
    normalize = Normalize(spec["mean"], spec["std"], torch.device("cpu"), channels_last=False)
    rng = np.random.default_rng(1)
    diffs = {t.name: 0.0 for t in tasks}
    for batch in (1, 5):
        x = rng.integers(0, 256, (batch, h, w, c), dtype=np.uint8)
        got = session.run(None, {inp.name: x})
        with torch.no_grad():
            want = reference(normalize(torch.from_numpy(x))).logits
        for t, g in zip(tasks, got):
            assert g.shape == (batch, t.num_classes) and g.dtype == np.float32
            diffs[t.name] = max(diffs[t.name], float(np.abs(g - want[t.name].numpy()).max()))
    assert max(diffs.values()) < 1e-4, diffs
    verified = verify_onnx(path, model, tasks, spec)
    assert max(verified.values()) < 1e-4, verified
    return diffs


@needs_onnx
@pytest.mark.parametrize("arch", ARCHITECTURES.names())
def test_every_architecture_exports(arch, tmp_path):
    diffs = check_export(tiny_model(arch), TASKS, SPEC, tmp_path / f"{arch}.onnx")
    print(f"{arch}: max abs diff {max(diffs.values()):.2e}")


@needs_onnx
def test_resnet_grayscale_mlp_head_and_task_named_images(tmp_path):
    tasks = [Task("images", ["x", "y", "z"]), Task("digit", [str(i) for i in range(10)])]
    spec = {"mean": [0.45], "std": [0.22], "image_shape": [16, 16, 1]}
    model = tiny_model("hps", tasks, spec, backbone={"name": "resnet18", "width": 0.125},
                       head={"name": "mlp", "hidden": 8, "dropout": 0.5})
    check_export(model, tasks, spec, tmp_path / "r.onnx")
    sidecar = json.loads(sidecar_path(tmp_path / "r.onnx").read_text())
    assert sidecar["input"]["name"] == "images_uint8" and sidecar["input"]["channel_order"] == "grayscale"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    mtlvision.train(tiny_config(train__epochs=1), out_dir=out, quiet=True)
    return out


@needs_onnx
def test_run_export_matches_predict_with_sidecar_only(trained_run, tmp_path):
    from mtlvision.data.sources.shapes import render

    run = mtlvision.load(trained_run)
    path = tmp_path / "model.onnx"
    run.export_onnx(path)
    images, _ = render(5, 32, np.random.default_rng(3))
    preds = run.predict(list(images), top_k=1)
    # what a user without mtlvision does: read the sidecar, feed uint8 NHWC, softmax the logits
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["input"]["shape"] == ["batch", 32, 32, 3] and meta["input"]["dtype"] == "uint8"
    session = onnx_session(path)
    for batch in (images[:1], images):
        logits = session.run(None, {meta["input"]["name"]: np.ascontiguousarray(batch)})
        for out, z in zip(meta["outputs"], logits):
            probs = np.exp(z - z.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
            for i, row in enumerate(probs):
                cls, p = preds[i][out["name"]][0]
                assert out["classes"][int(row.argmax())] == cls and row.max() == pytest.approx(p, abs=1e-5)


@needs_onnx
def test_cli_export_with_check_and_opset(trained_run, tmp_path, capsys):
    out = tmp_path / "sub" / "m.onnx"
    assert main(["export", str(trained_run), "--onnx", str(out), "--opset", "18", "--check"]) == 0
    text = capsys.readouterr().out
    assert "max abs diff" in text and "shape" in text and "uint8" in text
    assert json.loads(sidecar_path(out).read_text())["opset"] == 18
    overall = float(text.rsplit("overall ", 1)[1].split()[0])
    print(f"CLI --check overall max abs diff {overall:.2e}")
    assert overall < 1e-4


@needs_onnx
def test_unsupported_opset_keeps_existing_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    with pytest.raises(MTLVisionError, match="opset 17"):
        export_model(tiny_model("hps"), TASKS, SPEC, path, opset=17)
    assert path.read_bytes() == b"old" and not sidecar_path(path).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@needs_onnx
def test_batch_fixed_by_the_model_is_an_error(tmp_path):
    model = tiny_model("hps")

    class ReadsBatchAsInt(type(model)):
        def decode(self, shared):
            return super().decode(shared.view(len(shared), -1))  # len(): torch.export pins the batch silently

    model.__class__ = ReadsBatchAsInt
    with pytest.raises(MTLVisionError, match="fixes the batch size"):
        export_model(model, TASKS, SPEC, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_missing_extra_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # find_spec() is None: as if not installed
    with pytest.raises(MTLVisionError, match=r"pip install 'mtlvision\[export\]'"):
        export_model(tiny_model("hps"), TASKS, SPEC, tmp_path / "m.onnx")


def test_export_errors_exit_2(trained_run, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "nope"), "--onnx", str(out)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(trained_run / "config.yaml", partial / "config.yaml")
    assert main(["export", str(partial), "--onnx", str(out)]) == 2
    assert "needs best.pt" in capsys.readouterr().err
    (partial / "best.pt").write_bytes(b"truncated")
    assert main(["export", str(partial), "--onnx", str(out)]) == 2
    assert "cannot load checkpoint" in capsys.readouterr().err
    assert not out.exists()


def test_export_help(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["export", "--help"])
    assert e.value.code == 0
    assert "usage: mtlvision export" in capsys.readouterr().out
