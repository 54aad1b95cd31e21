import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from mtlvision.cli import build_parser, main

from conftest import tiny_config


def run_cli(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "mtlvision", *args], capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def _subcommands() -> list[str]:
    import argparse

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(action.choices)


def test_the_subcommand_list_is_complete():
    assert set(_subcommands()) >= {"demo", "train", "evaluate", "predict", "list", "methods", "archs", "export",
                                   "shards", "report", "affinity", "bench"}


@pytest.mark.parametrize("cmd", _subcommands())
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: mtlvision " + cmd in capsys.readouterr().out


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config()))
    p = run_cli("train", str(cfg), "--out", str(root / "run"), "--set", "train.epochs=1")
    assert "Results (test split" in p.stdout and "position" in p.stdout
    return root


def test_train_writes_run_with_override(cli_run):
    assert yaml.safe_load((cli_run / "run" / "config.yaml").read_text())["train"]["epochs"] == 1
    assert json.loads((cli_run / "run" / "summary.json").read_text())["epochs"] == 1


def test_evaluate_matches_summary(cli_run):
    out = json.loads(run_cli("evaluate", str(cli_run / "run"), "--json").stdout)
    summary = json.loads((cli_run / "run" / "summary.json").read_text())
    for task, m in out["tasks"].items():
        assert m["accuracy"] == pytest.approx(summary["tasks"][task]["test"]["accuracy"])
    assert "test split" in run_cli("evaluate", str(cli_run / "run")).stdout


def test_predict_formats(cli_run):
    from mtlvision.data.sources.shapes import render

    imgs, _ = render(3, 32, np.random.default_rng(1))
    folder = cli_run / "imgs"
    folder.mkdir(exist_ok=True)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f"{i}.png")
    js = json.loads(run_cli("predict", str(cli_run / "run"), str(folder), "--format", "json", "--top-k", "2").stdout)
    assert len(js) == 3 and set(js[0]["predictions"]) == {"shape", "colour", "size", "position"}
    assert len(js[0]["predictions"]["shape"]) == 2
    assert 0 <= js[0]["predictions"]["shape"][0]["probability"] <= 1
    rows = list(csv.DictReader(io.StringIO(run_cli("predict", str(cli_run / "run"), str(folder / "0.png"),
                                                   "--format", "csv").stdout)))
    assert [r["task"] for r in rows] == ["shape", "colour", "size", "position"]
    assert rows[0]["class"] == js[0]["predictions"]["shape"][0]["class"]
    assert "shape" in run_cli("predict", str(cli_run / "run"), str(folder)).stdout


def test_errors_exit_2_with_message(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochz: 1}\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) epochz" in err and "epochs" in err
    assert main(["predict", str(tmp_path), "x.png"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"data": {"source": {"name": "npz", "path": str(tmp_path / "nope"),
                                                           "tasks": ["label"]}}}))
    assert main(["train", str(missing), "--out", str(tmp_path / "r")]) == 2
    assert "data.source.path" in capsys.readouterr().err


def test_list_shows_registries():
    out = run_cli("list").stdout
    for name in ("shapes", "imagefolder", "csv", "npz", "cifar100", "multimnist", "resnet18", "smallcnn",
                 "task-features", "hps", "equal", "fixed"):
        assert name in out


def test_demo_runs_offline(tmp_path):
    p = run_cli("demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--quiet")
    assert "Results (test split" in p.stdout
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["tasks"]) == {"shape", "colour", "size", "position"}
    assert summary["tasks"]["position"]["test"]["accuracy"] > 0.9


def test_methods_command_lists_every_method_with_its_cost(capsys):
    from mtlvision.registry import METHODS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in METHODS.names()) and "cost per step" in out
