"""`mtlvision bench`: grid planning, skipping finished runs, aggregation (mean ± std, Δm), errors."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from conftest import tiny_config
from mtlvision import bench
from mtlvision.cli import main
from mtlvision.config import load_config
from mtlvision.errors import ConfigError, MTLVisionError


def _suite(tmp_path, **over):
    base = tiny_config(tasks={"colour": {"enabled": False}, "size": {"enabled": False}})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    suite = {"name": "tiny", "config": "base.yaml", "seeds": [0, 1], "set": ["train.epochs=1"],
             "methods": ["equal", {"method": "cagrad", "c": 0.2}], "architectures": ["hps"], **over}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def _fake_summary(run, acc):
    run.out.mkdir(parents=True)
    tasks = [run.method] if run.kind == "stl" else ["shape", "position"]
    summary = {"tasks": {t: {"test": {"accuracy": acc[t]}} for t in tasks}, "wall_time_s": 10.0, "epochs": 2,
               "train_images_per_s": 100.0 + run.seed, "peak_memory_mb": 500.0 + run.seed, "parameters": 1234}
    (run.out / "summary.json").write_text(json.dumps(summary))


def test_plan_covers_the_grid_with_single_task_baselines_first(tmp_path):
    suite, base = bench.load_suite(_suite(tmp_path))
    runs = bench.plan(suite, base, tmp_path / "out")
    assert [(r.kind, r.arch, r.method, r.seed) for r in runs] == [
        ("stl", "", "shape", 0), ("stl", "", "shape", 1), ("stl", "", "position", 0), ("stl", "", "position", 1),
        ("mtl", "hps", "equal", 0), ("mtl", "hps", "equal", 1),
        ("mtl", "hps", "cagrad(c=0.2)", 0), ("mtl", "hps", "cagrad(c=0.2)", 1)]
    assert "tasks.position.enabled=false" in runs[0].overrides and "seed=1" in runs[1].overrides
    assert all("baselines={}" in r.overrides for r in runs)
    assert "balancing={c: 0.2, method: cagrad}" in runs[-1].overrides
    assert len({r.out for r in runs}) == len(runs)


def test_finished_runs_are_skipped_and_results_aggregate_over_seeds(tmp_path, monkeypatch):
    path = _suite(tmp_path)
    suite, base = bench.load_suite(path)
    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    accs = {}
    for run in bench.plan(suite, base, out):
        acc = {"shape": rng.uniform(0.5, 0.9), "position": rng.uniform(0.5, 0.9)}
        accs[(run.kind, run.method, run.seed)] = acc
        _fake_summary(run, acc)
    monkeypatch.setattr(bench, "run_one", lambda run, base: pytest.fail(f"{run.out} was finished"))
    assert bench.run_suite(path, out) == out
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["architecture"], r["method"]) for r in rows] == [
        ("single-task", "equal"), ("hps", "equal"), ("hps", "cagrad(c=0.2)")]
    stl = {t: np.mean([accs[("stl", t, s)][t] for s in (0, 1)]) for t in ("shape", "position")}
    per_seed = [[accs[("mtl", "cagrad(c=0.2)", s)][t] for t in ("shape", "position")] for s in (0, 1)]
    dm = [100 * np.mean([(a - stl[t]) / stl[t] for a, t in zip(seed, ("shape", "position"))]) for seed in per_seed]
    cag = rows[2]
    assert float(cag["shape_mean"]) == pytest.approx(100 * np.mean([p[0] for p in per_seed]))
    assert float(cag["shape_std"]) == pytest.approx(100 * np.std([p[0] for p in per_seed], ddof=1))
    assert float(cag["delta_m_mean"]) == pytest.approx(np.mean(dm))
    assert float(cag["delta_m_std"]) == pytest.approx(np.std(dm, ddof=1))
    assert float(cag["images_per_s"]) == 100.5 and float(cag["peak_memory_mb"]) == 501.0
    assert float(rows[0]["position_mean"]) == pytest.approx(100 * stl["position"])
    md = (out / "results.md").read_text()
    assert "| hps | cagrad(c=0.2) |" in md and f"{np.mean(dm):+.2f} ± {np.std(dm, ddof=1):.2f}" in md
    assert float(rows[0]["parameters"]) == 2 * 1234  # the two single-task networks together


def test_one_seed_has_no_spread(tmp_path, monkeypatch):
    path = _suite(tmp_path, seeds=[0], methods=["equal"])
    suite, base = bench.load_suite(path)
    out = tmp_path / "out"
    for run in bench.plan(suite, base, out):
        _fake_summary(run, {"shape": 0.8, "position": 0.6})
    monkeypatch.setattr(bench, "run_one", lambda run, base: pytest.fail(f"{run.out} was finished"))
    bench.run_suite(path, out)
    mtl = list(csv.DictReader((out / "results.csv").open()))[1]
    assert float(mtl["shape_mean"]) == pytest.approx(80.0) and mtl["shape_std"] == "" and mtl["delta_m_std"] == ""
    md = (out / "results.md").read_text()
    assert "| hps | equal | 80.00 | 60.00 | +0.00 |" in md and "±" not in md.split("\n", 3)[3]


def test_bench_trains_missing_runs_and_resumes_an_interrupted_one(tmp_path, capsys):
    """Real runs in subprocesses; a run left with a checkpoint but no summary is resumed, not restarted."""
    path = _suite(tmp_path, seeds=[0], methods=["equal"])
    out = tmp_path / "out"
    assert main(["bench", str(path), "--out", str(out)]) == 0
    assert "| hps | equal |" in capsys.readouterr().out
    summary = out / "hps" / "equal" / "seed0" / "summary.json"
    first = json.loads(summary.read_text())
    assert first["epochs"] == 1 and "delta_m" not in first
    summary.unlink()  # as if killed after its last checkpoint
    assert main(["bench", str(path), "--out", str(out)]) == 0
    again = json.loads(summary.read_text())
    assert again["tasks"] == first["tasks"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == ["equal", "equal"] and rows[1]["delta_m_mean"] != ""


def test_a_finished_run_with_another_config_is_not_reused(tmp_path):
    path = _suite(tmp_path, seeds=[0], methods=["equal"])
    suite, base = bench.load_suite(path)
    run = bench.plan(suite, base, tmp_path / "out")[-1]
    run.out.mkdir(parents=True)
    (run.out / "config.yaml").write_text(yaml.safe_dump(load_config(base, [*run.overrides, "train.lr=0.5"]).to_dict()))
    with pytest.raises(MTLVisionError, match=r"hps/equal/seed0: .* different config \(train.lr\)"):
        bench.plan(suite, base, tmp_path / "out")


def test_bad_cells_fail_before_training_and_name_the_cell(tmp_path):
    with pytest.raises(ConfigError, match=r"hps/nope/seed0: .*balancing method"):
        bench.run_suite(_suite(tmp_path, methods=["nope"]), tmp_path / "out")
    with pytest.raises(ConfigError, match="unknown key"):
        bench.load_suite(_suite(tmp_path, method=["equal"]))
    with pytest.raises(ConfigError, match="seeds"):
        bench.load_suite(_suite(tmp_path, seeds=[]))
    with pytest.raises(ConfigError, match=r"hps/equal/seed0: listed twice"):
        bench.run_suite(_suite(tmp_path, methods=["equal", {"method": "equal"}]), tmp_path / "out")


def test_shipped_suites_are_valid():
    from pathlib import Path

    from mtlvision.config import load_config

    suites = sorted((Path(__file__).resolve().parents[1] / "configs" / "bench").glob("*.yaml"))
    assert len(suites) >= 5
    for path in suites:
        suite, base = bench.load_suite(path)
        for method in suite.methods:
            load_config(base, [*suite.set, f"balancing={bench._yaml_flow(bench._label(method, 'method')[1])}"])
