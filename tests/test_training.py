import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import mtlvision
from mtlvision.config import load_config
from mtlvision.errors import CheckpointError, TrainingDiverged
from mtlvision.tasks import Task
from mtlvision.training import build_trainer, train

from conftest import tiny_config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    summary = train(load_config(data=tiny_config()), out, quiet=True)
    return out, summary


def test_run_directory_contents(tiny_run):
    out, summary = tiny_run
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt", "best.pt"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1]
    assert set(lines[0]["val"]) == {"shape", "colour", "size", "position"}
    assert lines[0]["images_per_s"] > 0 and lines[1]["wall_time_s"] > lines[0]["wall_time_s"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for task in on_disk["tasks"].values():
        assert 0 <= task["test"]["accuracy"] <= 1 and "accuracy" in task["val"]
    assert on_disk["tasks"]["size"]["test"]["balanced_accuracy"] >= 0
    # model selection: best epoch = highest mean validation accuracy, never test
    scores = [np.mean([m["accuracy"] for m in x["val"].values()]) for x in lines]
    assert on_disk["best_epoch"] == int(np.argmax(scores))
    assert yaml.safe_load((out / "config.yaml").read_text())["name"] == "tiny"


def test_learns_above_chance(tiny_run):
    _, summary = tiny_run
    assert summary["tasks"]["position"]["test"]["accuracy"] > 0.6  # chance 0.25


def test_training_is_deterministic(tmp_path):
    cfg = tiny_config(train__epochs=1)
    a = train(load_config(data=cfg), tmp_path / "a", quiet=True)
    b = train(load_config(data=cfg), tmp_path / "b", quiet=True)
    assert a["tasks"] == b["tasks"]


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    """SIGKILL a CLI run in the middle of epoch 2, resume it, and compare with a straight run."""
    cfg = tiny_config(train__epochs=3, data__source__n_train=1500)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    straight = train(load_config(cfg_path), tmp_path / "straight", quiet=True)

    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}  # as in here
    proc = subprocess.Popen([sys.executable, "-m", "mtlvision", "train", str(cfg_path), "--out", str(run),
                             "--set", "train.log_every=1"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    killed_mid_epoch = False
    for line in proc.stdout:
        if line.startswith("epoch 2/3 step 5/"):  # epoch 1 is checkpointed; epoch 2 is half done
            proc.send_signal(signal.SIGKILL)
            killed_mid_epoch = True
            break
    proc.wait(timeout=60)
    assert killed_mid_epoch and proc.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 0

    resumed = subprocess.run([sys.executable, "-m", "mtlvision", "train", "--resume", str(run), "--quiet"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    final = json.loads((run / "summary.json").read_text())
    assert final["tasks"] == straight["tasks"]
    assert final["best_epoch"] == straight["best_epoch"]
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_existing_run_needs_resume(tiny_run):
    out, _ = tiny_run
    with pytest.raises(CheckpointError, match="already holds a run; use --resume"):
        build_trainer(load_config(data=tiny_config()), out, quiet=True).fit()


def test_resume_with_a_different_config_is_refused(tiny_run, tmp_path):
    out, _ = tiny_run
    changed = tiny_config(model__architecture={"name": "hps"})
    with pytest.raises(CheckpointError, match="does not match the config.*model.architecture"):
        build_trainer(load_config(data=changed), out, resume=True, quiet=True).fit()


def test_nan_loss_stops_names_task_and_keeps_checkpoint(tmp_path, monkeypatch):
    real = Task.loss
    calls = {"n": 0}

    def poisoned(self, logits, labels):
        loss = real(self, logits, labels)
        if self.name == "colour":
            calls["n"] += 1
            if calls["n"] > 12:  # epoch 1 (9 steps) is clean; epoch 2 diverges
                return loss * float("nan")
        return loss

    monkeypatch.setattr(Task, "loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"task .colour.: loss became NaN/inf in epoch 2 at step 4;") as e:
        train(load_config(data=tiny_config(train__epochs=3)), out, quiet=True)
    assert "checkpoint.pt" in str(e.value)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_single_task_baselines_and_delta_m(tmp_path):
    cfg = tiny_config(train__epochs=1, baselines={"single_task": True})
    cfg["tasks"] = {"colour": {"enabled": False}, "shape": {"enabled": False}}
    summary = train(load_config(data=cfg), tmp_path / "mtl", quiet=True)
    stl = summary["single_task"]["test_accuracy"]
    assert set(stl) == {"size", "position"}
    for task in stl:
        run = json.loads((tmp_path / "mtl" / "stl" / task / "summary.json").read_text())
        assert list(run["tasks"]) == [task]
        assert run["epochs"] == 1
    mtl = {t: m["test"]["accuracy"] for t, m in summary["tasks"].items()}
    expect = 100 * np.mean([(mtl[t] - stl[t]) / stl[t] for t in stl])
    assert summary["delta_m"] == pytest.approx(expect, abs=1e-3)
    # pointing a new run at existing baselines gives Δm without retraining them
    cfg2 = dict(cfg, baselines={"runs": {t: str(tmp_path / "mtl" / "stl" / t) for t in stl}}, name="again")
    again = train(load_config(data=cfg2), tmp_path / "again", quiet=True)
    assert "delta_m" in again and again["single_task"]["test_accuracy"] == stl


def test_multi_input_one_batch_per_stream(tmp_path):
    rng = np.random.default_rng(0)
    npz_dir = tmp_path / "digits"
    npz_dir.mkdir()
    for split, n in (("train", 300), ("test", 60)):
        labels = rng.integers(0, 3, n)
        images = np.zeros((n, 16, 16, 1), np.uint8)
        for i, y in enumerate(labels):  # class = which third of the image is bright
            images[i, :, 5 * y:5 * y + 5] = 255
        np.savez(npz_dir / f"{split}-00.npz", images=images, label=labels)
    cfg = tiny_config(train__epochs=2)
    cfg["data"] = {"sources": {"shapes": {"name": "shapes", "n_train": 400, "n_test": 100},
                               "bars": {"name": "npz", "path": str(npz_dir), "tasks": {"bars": {"key": "label"}}}},
                   "image_size": 32, "channels": 3, "batch_size": 32}
    trainer = build_trainer(load_config(data=cfg), tmp_path / "mi", quiet=True)
    assert [s.name for s in trainer.data.groups] == ["shapes", "bars"]
    assert trainer.steps == max(360 // 32, 270 // 32)
    losses, logits, labels, weights, n = trainer.train_step(0, 0)
    assert n == 64 and set(losses) == {"shape", "colour", "size", "position", "bars"}
    assert len(logits["bars"]) == 32 and len(logits["shape"]) == 32
    summary = trainer.fit()
    assert summary["tasks"]["bars"]["test"]["count"] == 60
    assert summary["tasks"]["bars"]["test"]["accuracy"] > 0.6


def test_api_load_and_predict(tiny_run, tmp_path):
    out, summary = tiny_run
    run = mtlvision.load(out)
    assert [t.name for t in run.tasks] == ["shape", "colour", "size", "position"]
    from mtlvision.data.sources.shapes import render
    images, labels = render(20, 32, np.random.default_rng(5))
    preds = run.predict(list(images), top_k=2)
    assert len(preds) == 20 and len(preds[0]["colour"]) == 2
    assert preds[0]["colour"][0][1] >= preds[0]["colour"][1][1]
    from PIL import Image
    f = tmp_path / "img.png"
    Image.fromarray(images[0]).save(f)
    assert run.predict([str(f)])[0]["position"][0][0] == preds[0]["position"][0][0]
    assert run.summary["best_epoch"] == summary["best_epoch"]


def test_resume_without_checkpoint_and_stale_files_are_cleared(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint.pt there"):
        build_trainer(load_config(data=tiny_config()), tmp_path / "none", resume=True, quiet=True)
    out = tmp_path / "stale"
    (out / "tb").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"epoch": 5}\n')
    with pytest.raises(CheckpointError, match=r"already holds a run's files \(metrics.jsonl\).*--overwrite"):
        train(load_config(data=tiny_config(train__epochs=1)), out, quiet=True)  # never replaced silently
    train(load_config(data=tiny_config(train__epochs=1)), out, quiet=True, overwrite=True)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0]


def test_stale_single_task_baseline_is_refused(tmp_path):
    cfg = tiny_config(train__epochs=1, baselines={"single_task": True})
    cfg["tasks"] = {"colour": {"enabled": False}, "shape": {"enabled": False}, "size": {"enabled": False}}
    train(load_config(data=cfg), tmp_path / "mtl", quiet=True)
    cfg["train"]["epochs"] = 2
    from mtlvision.training.run import train_single_task_baselines

    with pytest.raises(mtlvision.MTLVisionError, match=r"different config \(train.epochs\)"):
        train_single_task_baselines(load_config(data=cfg), tmp_path / "mtl", ["position"], True)


def test_task_names_that_clash_with_module_attributes(tmp_path):
    from mtlvision.config import ModelConfig
    from mtlvision.models import build_model

    tasks = [Task("type", ["a", "b"]), Task("train", ["a", "b", "c"])]
    model = build_model(ModelConfig(backbone={"name": "smallcnn", "width": 4, "out_dim": 8}), tasks, (16, 16, 3))
    assert set(model(torch.randn(2, 3, 16, 16)).logits) == {"type", "train"}


def test_predict_rejects_float_arrays_and_bad_top_k(tiny_run):
    run = mtlvision.load(tiny_run[0])
    with pytest.raises(mtlvision.DataError, match="expected a uint8 array"):
        run.predict([np.zeros((32, 32, 3), np.float32)])
    with pytest.raises(mtlvision.DataError, match="top_k must be >= 1"):
        run.predict([np.zeros((32, 32, 3), np.uint8)], top_k=0)
    with pytest.raises(mtlvision.DataError, match="no such image file"):
        run.predict(["/nonexistent.png"])


def test_atomic_writes_get_the_usual_file_permissions(tmp_path):
    import os
    import stat

    from mtlvision.storage import write_text

    write_text(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~mask
