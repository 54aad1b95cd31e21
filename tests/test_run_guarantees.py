"""Run-level guarantees (README "Guarantees"): nothing lost, nothing silently wrong in a run directory.

Each test is a regression test for a case a hostile try-out found (issue 17): earlier results are never
replaced or deleted by a fresh run, names cannot escape runs/, diverged epochs are never saved, a best.pt
from another run is refused, interrupted writes leave no litter, a full disk is named, checkpoint errors
say what is wrong, JSON output is always valid, a finished run is left as it was.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mtlvision import storage
from mtlvision.cli import main
from mtlvision.config import load_config
from mtlvision.errors import CheckpointError, ConfigError, MTLVisionError, TrainingDiverged
from mtlvision.training import build_trainer, train

from conftest import tiny_config


def _strict_json(text: str):
    """json.loads that refuses NaN / Infinity tokens (which are not JSON)."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("g") / "run"
    summary = train(load_config(data=tiny_config(train__epochs=1)), out, quiet=True)
    return out, summary


def _copy(run, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


# 1: a fresh run never replaces an earlier run's files, and --overwrite deletes only mtlvision's own
def test_fresh_run_refuses_a_folder_with_best_pt_but_no_checkpoint(finished, tmp_path):
    run = _copy(finished[0], tmp_path)
    (run / "checkpoint.pt").unlink()  # people delete the largest file and keep best.pt
    (run / "tb" / "notes.txt").write_text("mine")
    (run / "mine.csv").write_text("a,b\n")
    best = (run / "best.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"already holds a run's files \(config.yaml, metrics.jsonl, "
                                              r"best.pt, summary.json, tb/.*--overwrite"):
        train(load_config(data=tiny_config(train__epochs=1)), run, quiet=True)
    assert (run / "best.pt").read_bytes() == best and (run / "tb" / "notes.txt").is_file()
    train(load_config(data=tiny_config(train__epochs=1, seed=1)), run, quiet=True, overwrite=True)
    assert (run / "tb" / "notes.txt").read_text() == "mine" and (run / "mine.csv").is_file()
    assert (run / "best.pt").read_bytes() != best


def test_cli_overwrite_flag(finished, tmp_path, capsys):
    import yaml

    run = _copy(finished[0], tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(train__epochs=1)))
    assert main(["train", str(cfg), "--out", str(run), "--quiet"]) == 2
    assert "already holds a run; use --resume" in capsys.readouterr().err
    assert main(["train", str(cfg), "--out", str(run), "--quiet", "--overwrite", "--resume", str(run)]) == 2
    assert main(["train", str(cfg), "--out", str(run), "--quiet", "--overwrite"]) == 0


# 2: a run name is one folder name
@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", "..", ".", "x\x00y"])
def test_run_names_cannot_escape_runs(name):
    with pytest.raises(ConfigError, match="name: .* is not allowed: a run name is one folder name"):
        load_config(data={"name": name})


def test_a_name_from_an_environment_variable_is_checked_too(monkeypatch):
    monkeypatch.setenv("HOME", "/root")
    with pytest.raises(ConfigError, match="'/root' is not allowed"):
        load_config(data={"name": "${HOME}"})


# 5: divergence is caught before anything of the epoch is written, and the message says what exists
def test_divergence_in_the_first_epoch_promises_no_checkpoint(tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match="No checkpoint was written"):
        train(load_config(data=tiny_config(train__epochs=2, train__lr=1e30, train__schedule="constant")), out,
              quiet=True)
    assert not (out / "checkpoint.pt").exists() and not (out / "best.pt").exists()


def test_a_non_finite_update_in_the_last_step_is_never_saved(tmp_path, monkeypatch):
    """The update of an epoch's last step is not seen by the loss check: the parameter check catches it."""
    tr = build_trainer(load_config(data=tiny_config(train__epochs=2)), tmp_path / "last", quiet=True)
    real = tr.optimizer.step
    calls = {"n": 0}

    def step(*a, **k):
        real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2 * tr.steps:  # the last step of the second epoch
            with torch.no_grad():
                next(tr.model.parameters()).fill_(float("nan"))

    monkeypatch.setattr(tr.optimizer, "step", step)
    with pytest.raises(TrainingDiverged, match=r"the model's parameters became NaN/inf in epoch 2.*The last good "
                                               r"checkpoint is kept"):
        tr.fit()
    ckpt = torch.load(tmp_path / "last" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert torch.load(tmp_path / "last" / "best.pt", weights_only=True)["epoch"] == 0


def test_json_outputs_stay_valid_with_non_finite_numbers(finished, tmp_path, capsys):
    run = _copy(finished[0], tmp_path)
    best = torch.load(run / "best.pt", weights_only=True)
    best["model"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in best["model"].items()}
    torch.save(best, run / "best.pt")  # a diverged model (as older versions could save)
    assert main(["evaluate", str(run), "--json"]) == 0
    result = _strict_json(capsys.readouterr().out)
    assert result["tasks"]["shape"]["loss"] is None
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    assert main(["predict", str(run), str(img), "--format", "json"]) == 0
    _strict_json(capsys.readouterr().out)
    assert storage.dumps({"a": float("nan"), "b": [float("inf")]}) == '{\n  "a": null,\n  "b": [\n    null\n  ]\n}'


# 6: a best.pt from another run is refused wherever a run is loaded
def test_best_pt_from_another_run_is_refused(finished, tmp_path, capsys):
    run = _copy(finished[0], tmp_path)
    other = tmp_path / "other"
    train(load_config(data=tiny_config(train__epochs=1, model__backbone__width=4)), other, quiet=True)
    shutil.copy(other / "best.pt", run / "best.pt")
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    for argv in (["predict", str(run), str(img)], ["export", str(run), "--onnx", str(tmp_path / "m.onnx")],
                 ["evaluate", str(run)]):
        assert main(argv) == 2
        assert "does not belong to this run" in capsys.readouterr().err


# 8: temporaries of interrupted writes are removed on the next start, nothing else
def test_stale_temporaries_are_removed_on_the_next_start(finished, tmp_path):
    run = _copy(finished[0], tmp_path)
    (run / ".checkpoint.pt.k3j2x9.tmp").write_bytes(b"x" * 1000)
    (run / ".best.pt.abc.tmp").write_bytes(b"x")
    (run / ".mine.tmp").write_text("keep")
    train(load_config(data=tiny_config(train__epochs=1)), run, resume=True, quiet=True)
    assert not list(run.glob(".checkpoint.pt.*.tmp")) and not list(run.glob(".best.pt.*.tmp"))
    assert (run / ".mine.tmp").read_text() == "keep"


# 9: a full disk is named as such and the previous file stays intact
def test_disk_full_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    storage.save_torch(target, {"a": torch.zeros(3)})
    before = target.read_bytes()
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(storage.os, "fdopen", lambda fd, mode, **kw: Full(real_fdopen(fd, mode, **kw)))
    with pytest.raises(MTLVisionError, match=r"checkpoint.pt: cannot write it, the disk is full.*previous version "
                                             r"is unchanged"):
        storage.save_torch(target, {"a": torch.ones(10000)})
    assert target.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


# 11-14: messages that used to mislead
def test_numeric_strings_and_ranges():
    assert load_config(data={"train": {"lr": "1e-3"}}).train.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string
    with pytest.raises(ConfigError, match=r"train.lr: expected > 0 \(and at most 3.4e38, float32\)"):
        load_config(data={"train": {"lr": 1.0e300}})
    with pytest.raises(ConfigError, match="train.lr: expected a finite number"):
        load_config(data={"train": {"lr": "nan"}})
    with pytest.raises(ConfigError, match=r"^top level of the config: unknown key\(s\) nmae; valid keys:"):
        load_config(data={"nmae": "x"})


def test_a_batch_larger_than_the_training_split_is_recorded(tmp_path, capsys):
    cfg = tiny_config(train__epochs=1, data__batch_size=1000)
    summary = train(load_config(data=cfg), tmp_path / "big", quiet=False)
    assert summary["effective_batch_size"] == {"main": 540}
    err = capsys.readouterr().err
    assert "fewer training images than data.batch_size 1000: its batches have 540" in err
    assert "shape (4), colour (5), size (2), position (4)" in err  # class counts per task, in the first lines


# 17: checkpoint files that cannot be used say why (and never suggest weights_only=False)
def test_empty_truncated_and_pickled_checkpoints(finished, tmp_path, capsys):
    run = _copy(finished[0], tmp_path)
    (run / "best.pt").write_bytes(b"")
    assert main(["predict", str(run), str(run / "config.yaml")]) == 2
    assert "the file is empty (0 bytes)" in capsys.readouterr().err
    (run / "best.pt").write_bytes((finished[0] / "best.pt").read_bytes()[:5000])
    assert main(["evaluate", str(run)]) == 2
    assert "truncated or not a PyTorch checkpoint" in capsys.readouterr().err

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(run / "best.pt", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert "refused (loading them could run code" in err and "weights_only" not in err


# 18: one unreadable entry does not abort predict when asked, and is named either way
def test_predict_names_or_skips_unreadable_images(finished, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "a.png")
    (folder / "b.png").symlink_to(tmp_path / "missing.png")
    assert main(["predict", str(finished[0]), str(folder), "--format", "json"]) == 2
    assert "b.png: a broken link" in capsys.readouterr().err
    assert main(["predict", str(finished[0]), str(folder), "--format", "json", "--skip-unreadable"]) == 0
    captured = capsys.readouterr()
    assert [r["image"] for r in _strict_json(captured.out)] == [str(folder / "a.png")]
    assert "skipped 1 unreadable image(s) of 2" in captured.err


# 19: resuming a finished run leaves its summary as it was
def test_resuming_a_finished_run_leaves_its_summary(finished, tmp_path, capsys):
    run = _copy(finished[0], tmp_path)
    before = (run / "summary.json").read_text()
    assert main(["train", "--resume", str(run)]) == 0
    assert (run / "summary.json").read_text() == before
    assert "is finished: all 1 epochs ran; its summary is left as it was" in capsys.readouterr().err
    assert json.loads(before)["train_images_per_s"] is not None


def test_yaml_tags_are_refused(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
