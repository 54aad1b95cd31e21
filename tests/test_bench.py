"""`mtlvision bench`: grid planning, skipping finished runs, aggregation (mean ± std, Δm and its spread
including the single-task seeds, confidence interval), errors; the Δm statistics on known inputs."""
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
from mtlvision.evaluation.delta_m import delta_m_from_summary, delta_m_stats, t_quantile


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


def test_single_task_runs_take_a_budget_of_their_own_beside_the_same_epoch_ones(tmp_path, monkeypatch):
    path = _suite(tmp_path, seeds=[0], methods=["equal"], single_task_set=["train.epochs=3"])
    suite, base = bench.load_suite(path)
    out = tmp_path / "out"
    runs = bench.plan(suite, base, out, ["train.lr=0.2"])
    stl, mtl = [r for r in runs if r.kind == "stl"], [r for r in runs if r.kind == "mtl"]
    assert [r.out.relative_to(out).as_posix() for r in stl] == ["stl-train.epochs=3/shape/seed0",
                                                                "stl-train.epochs=3/position/seed0"]
    cfg = load_config(base, stl[0].overrides)
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.2  # after the suite's `set`, before the command line
    assert load_config(base, mtl[0].overrides).train.epochs == 1  # the multi-task runs keep the shared budget
    # the same-epoch baselines of a suite without single_task_set share the multi-task runs
    (tmp_path / "plain").mkdir()
    plain_suite = _suite(tmp_path / "plain", seeds=[0], methods=["equal"])
    plain = bench.plan(bench.load_suite(plain_suite)[0], base, out)
    assert {r.out for r in plain if r.kind == "mtl"} == {r.out for r in mtl}
    assert {r.out.parent.parent.name for r in plain if r.kind == "stl"} == {"stl"}
    for run in runs:
        _fake_summary(run, {"shape": 0.8, "position": 0.6})
    monkeypatch.setattr(bench, "run_one", lambda run, base: pytest.fail(f"{run.out} was finished"))
    bench.run_suite(path, out)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["architecture"] for r in rows] == ["single-task (train.epochs=3)", "hps"]
    with pytest.raises(ConfigError, match="single_task_set: given, but single_task is false"):
        bench.load_suite(_suite(tmp_path / "plain", single_task=False, single_task_set=["train.epochs=3"]))


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
    assert float(cag["delta_m_std_mtl"]) == pytest.approx(np.std(dm, ddof=1))  # the multi-task seeds alone
    # the spread adds each baseline's seed variance, propagated: c_t = 100 m_t / (T s_t^2)
    m = {t: np.mean([accs[("mtl", "cagrad(c=0.2)", s)][t] for s in (0, 1)]) for t in ("shape", "position")}
    sd_stl = {t: np.std([accs[("stl", t, s)][t] for s in (0, 1)], ddof=1) for t in ("shape", "position")}
    extra = sum((100 * m[t] / (2 * stl[t] ** 2) * sd_stl[t]) ** 2 for t in m)
    assert float(cag["delta_m_std"]) == pytest.approx(np.sqrt(np.std(dm, ddof=1) ** 2 + extra))
    assert cag["delta_m_ci_low"] == "" and cag["delta_m_ci_high"] == ""  # 2 seeds: no interval
    assert float(cag["images_per_s"]) == 100.5 and float(cag["peak_memory_mb"]) == 501.0
    assert float(rows[0]["position_mean"]) == pytest.approx(100 * stl["position"])
    md = (out / "results.md").read_text()
    assert "| hps | cagrad(c=0.2) |" in md and f"{np.mean(dm):+.2f} ± {float(cag['delta_m_std']):.2f} | - |" in md
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
        load_config(base, [*suite.set, *suite.single_task_set])


# -- Δm statistics on known inputs ---------------------------------------------------------------

def test_student_t_quantiles_match_tables():
    for df, q in [(1, 12.7062047), (2, 4.3026527), (3, 3.1824463), (4, 2.7764451), (10, 2.2281389),
                  (30, 2.0422725), (1e6, 1.9599655)]:
        assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-6)
    assert t_quantile(0.025, 5) == pytest.approx(-t_quantile(0.975, 5))
    assert t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_delta_m_spread_with_exact_baselines_is_the_multi_task_spread():
    """Single-task runs that agree to the last digit add no variance: the spread is the old one, the
    interval the plain one-sample t interval of the per-seed Δm."""
    mtl = [{"a": 0.82, "b": 0.60}, {"a": 0.80, "b": 0.62}, {"a": 0.84, "b": 0.61}]
    st = delta_m_stats(mtl, {"a": [0.80] * 3, "b": [0.60] * 3})
    per_seed = [100 * ((r["a"] - 0.8) / 0.8 + (r["b"] - 0.6) / 0.6) / 2 for r in mtl]
    sd = np.std(per_seed, ddof=1)
    assert st.mean == pytest.approx(np.mean(per_seed)) and st.sd == pytest.approx(sd) == st.sd_mtl
    assert st.se == pytest.approx(sd / np.sqrt(3)) and st.df == pytest.approx(2)
    half = 4.3026527 * sd / np.sqrt(3)
    assert st.ci == pytest.approx((np.mean(per_seed) - half, np.mean(per_seed) + half), abs=1e-6)


def test_delta_m_spread_propagates_baseline_variance():
    """Hand-computed: one task, MTL 80% ± 0 (identical seeds), STL 78/80/82 (mean 80, sd 2): Δm = 0,
    c = 100 · 80 / 80² = 1.25 per point, sd = 1.25 · 2 = 2.5, se = 2.5/√3, ν = 2 (the STL side)."""
    st = delta_m_stats([{"a": 80.0}] * 3, {"a": [78.0, 80.0, 82.0]})
    assert st.mean == pytest.approx(0.0) and st.sd_mtl == pytest.approx(0.0)
    assert st.sd == pytest.approx(2.5) and st.se == pytest.approx(2.5 / np.sqrt(3)) and st.df == pytest.approx(2.0)
    assert st.ci == pytest.approx((-4.3026527 * 2.5 / np.sqrt(3), 4.3026527 * 2.5 / np.sqrt(3)), abs=1e-6)


def test_delta_m_welch_degrees_of_freedom_and_the_summary_form():
    """One task, 3 MTL seeds with per-seed Δm sd 1 (variance part 1/3, 2 degrees of freedom) and 5 STL seeds
    with sd 2·sqrt(5/3) at s = m = 50 (c = 100 · 50 / 50² = 2: part (2 · 2·sqrt(5/3))² / 5 = 16/3, 4 degrees
    of freedom): ν = (1/3 + 16/3)² / ((1/3)²/2 + (16/3)²/4). The summary form (means and stds only) gives
    the same numbers as the per-run form."""
    summary = delta_m_from_summary({"a": 50.0}, 1.0, 3, {"a": 50.0}, {"a": 2.0 * np.sqrt(5 / 3)}, {"a": 5})
    v_mtl, v_stl = 1.0 / 3, 16.0 / 3
    assert summary.se == pytest.approx(np.sqrt(v_mtl + v_stl))
    assert summary.df == pytest.approx((v_mtl + v_stl) ** 2 / (v_mtl ** 2 / 2 + v_stl ** 2 / 4))
    rng = np.random.default_rng(3)
    mtl = [{"x": float(a), "y": float(b)} for a, b in rng.uniform(60, 90, (4, 2))]
    stl = {"x": list(rng.uniform(60, 90, 3)), "y": list(rng.uniform(60, 90, 5))}
    full = delta_m_stats(mtl, stl)
    again = delta_m_from_summary({t: np.mean([r[t] for r in mtl]) for t in "xy"}, full.sd_mtl, 4,
                                 {t: np.mean(v) for t, v in stl.items()},
                                 {t: np.std(v, ddof=1) for t, v in stl.items()}, {"x": 3, "y": 5})
    assert (again.mean, again.sd, again.se, again.df) == pytest.approx((full.mean, full.sd, full.se, full.df))
    assert again.ci == pytest.approx(full.ci)


def test_delta_m_spread_needs_two_seeds_and_the_interval_three():
    one = delta_m_stats([{"a": 0.9}], {"a": [0.8, 0.82, 0.81]})
    assert one.mean == pytest.approx(100 * (0.9 - 0.81) / 0.81) and one.sd is None and one.ci is None
    two = delta_m_stats([{"a": 0.9}, {"a": 0.91}], {"a": [0.8, 0.82]})
    assert two.sd is not None and two.ci is None
    with pytest.raises(MTLVisionError, match="no single-task run"):
        delta_m_stats([{"a": 0.9}], {"a": []})
