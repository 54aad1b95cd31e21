"""Every script under benchmarks/ runs: each in its smoke mode (--smoke, or DRY_RUN=1 for the shell
scripts), as a subprocess with this checkout's src/ first on PYTHONPATH, and prints its JSON with the
fields the README quotes. A smoke run measures nothing, so no number is checked; the timing statistics
that decide a benchmark's verdict are tested on known inputs at the end. Parts that need a GPU or the
real datasets are skipped with the reason.

Each subprocess spends most of its few seconds importing torch, so the smoke runs of the selected tests
start together, two at a time, when the first of them asks for its result (`smoke_runs`)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: int = 300,
        base_env: dict[str, str] | None = None) -> tuple[dict, str]:
    """Run `cmd` from the repository root with this checkout's src/ first; its JSON output and stderr.
    `base_env`: the environment to start from (default: this process's, read now)."""
    full_env = {**(base_env if base_env is not None else os.environ), **(env or {}),
                "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    assert "{" in proc.stdout, f"{' '.join(cmd)} printed no JSON:\n{proc.stdout[-2000:]}"
    return json.loads(proc.stdout[proc.stdout.index("{"):]), proc.stderr


def _script(name: str, *extra: str) -> tuple[list[str], dict[str, str]]:
    return [sys.executable, str(BENCH / name), "--smoke", "--json", *extra], {}


def _dry(name: str, *extra: str) -> tuple[list[str], dict[str, str]]:
    return ["bash", str(BENCH / name), *extra], {"DRY_RUN": "1"}


# test name -> the command whose output it checks
COMMANDS = {
    "test_balancing_overhead_smoke": _script("balancing_overhead.py"),
    "test_balancing_memory_smoke": _script("balancing_memory.py"),
    "test_step_time_smoke": _script("step_time.py"),
    "test_arch_step_time_smoke": _script("arch_step_time.py"),
    "test_data_pipeline_smoke": _script("data_pipeline.py"),
    "test_ddp_scaling_smoke": _script("ddp_scaling.py"),
    "test_cifar10_reference_smoke": ([sys.executable, str(BENCH / "cifar10_reference.py"), "--smoke"], {}),
    "test_vs_torchjd_smoke": _script("vs_torchjd.py"),
    "test_vs_torchjd_memory_smoke": _script("vs_torchjd.py", "--memory", "--methods", "pcgrad"),
    "test_finetune_step_smoke": _script("finetune_step.py"),
    "test_shell_benchmarks_dry_run[gpu_cifar10.sh]": _dry("gpu_cifar10.sh", "--set", "train.epochs=50"),
    "test_shell_benchmarks_dry_run[methods_multimnist.sh]": _dry("methods_multimnist.sh", "equal", "pcgrad", "db_mtl"),
    "test_shell_benchmarks_dry_run[reference_ab.sh]": _dry("reference_ab.sh", "5"),
}


@pytest.fixture(scope="module")
def smoke_runs(request):
    """Futures of the commands of the selected tests, run two at a time from the first request on."""
    selected = {item.name for item in request.session.items}
    base_env = dict(os.environ)  # read here: the threads must not iterate os.environ while tests patch it
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(run, *cmd, base_env=base_env) for name, cmd in COMMANDS.items() if name in selected}
    yield futures
    pool.shutdown(cancel_futures=True)


def smoke(futures: dict[str, Future], request) -> dict:
    return futures[request.node.name].result()[0]


def has_keys(d: dict, *keys: str) -> None:
    missing = [k for k in keys if k not in d]
    assert not missing, f"missing {missing} in {sorted(d)}"


RATIO_FIELDS = ("ratio", "ratio_ci", "ci_coverage", "ratio_iqr", "cycles", "verdict")


def test_balancing_overhead_smoke(smoke_runs, request):
    out = smoke(smoke_runs, request)
    has_keys(out, "rows", "resolved_3pct", "env", "args")
    kinds = {r["kind"] for r in out["rows"]}
    assert kinds == {"loss", "gradient/feature", "gradient/parameter", "loss+probe", "gradient/parameter+probe"}
    assert {r["input"] for r in out["rows"]} == {"single", "multi"}
    assert all(r["goal"] is None for r in out["rows"] if r["kind"].endswith("+probe"))  # extra batches by design
    for r in out["rows"]:
        has_keys(r, "tasks", "method", "ms_per_step", "goal", "j_mib", "peak_cuda_mib", *RATIO_FIELDS)
        assert r["verdict"] in ({"pass", "fail", "inconclusive"} if r["goal"] else {None})
    assert all("resolved" in r for r in out["rows"] if r["method"] == "fixed")


def test_balancing_memory_smoke(smoke_runs, request):
    out = smoke(smoke_runs, request)
    assert [r["method"] for r in out["rows"]] == ["equal", "pcgrad"]
    for r in out["rows"]:
        has_keys(r, "kind", "j_mib", "peak_rss_mib", "rss_over_ew_mib", "peak_cuda_mib")


def test_step_time_smoke(smoke_runs, request):
    out = smoke(smoke_runs, request)
    has_keys(out, "ms_per_step", "ratio_mtlvision_over_plain", "verdict", "pass", "goal", *RATIO_FIELDS)
    has_keys(out["ms_per_step"], "mtlvision", "plain")
    has_keys(out["ratio_mtlvision_over_plain"], "median", "ci", "coverage", "min", "max")


def test_arch_step_time_smoke(smoke_runs, request):
    out = smoke(smoke_runs, request)
    assert [r["architecture"] for r in out["rows"]] == ["hps", "task-features", "mtan"]
    for r in out["rows"]:
        has_keys(r, "step_ratio", "ratio_ci", "ms_per_step", "images_per_s", "parameters", "flops_ratio")


def test_data_pipeline_smoke(smoke_runs, request):
    out = smoke(smoke_runs, request)
    has_keys(out, "verdict", "img_per_s", "loader_ms_per_batch", "ratio_pipeline_over_in_memory", "cache",
             *RATIO_FIELDS)
    has_keys(out["cache"], "build_s", "reload_s", "images")
    assert out["cache"]["images"] == 100  # the synthetic 10 x (8 + 2) JPEGs


@pytest.mark.slow
def test_data_pipeline_on_the_real_cifar10(tmp_path):
    data = SHARED_DATA / "cifar10"
    if not (data / "train.tar.gz").is_file():
        pytest.skip(f"real CIFAR-10 not found at {data} (set MTLVISION_DATA)")
    out = run(_script("data_pipeline.py", "--data-root", str(data), "--cache-dir", str(tmp_path))[0])[0]
    assert out["cache"]["images"] == 60000 and out["cache"]["build_s"] > 0


def test_ddp_scaling_smoke(smoke_runs, request):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    out = smoke(smoke_runs, request)
    has_keys(out, "images_per_s", "ratio_2p_over", "comm_share_2p", "ms_per_step")
    has_keys(out["images_per_s"], "2p", "1p-all", "1p-half")
    has_keys(out["ratio_2p_over"]["1p-half"], "median", "ci", "coverage")


def test_cifar10_reference_smoke(smoke_runs, request):
    out = smoke(smoke_runs, request)
    has_keys(out, "test_accuracy", "train_images_per_s", "train_wall_s", "epochs")
    assert out["smoke"] and out["train_images"] == 80


def test_finetune_step_smoke(smoke_runs, request):
    out = smoke(smoke_runs, request)
    has_keys(out, "model", "ms_per_step", "ratios", "verdicts")
    assert set(out["ms_per_step"]) == {"plain", "mtl-equal", "mtl-pcgrad", "mtl-mgda"}
    for fields in out["ratios"].values():
        has_keys(fields, *RATIO_FIELDS)


def test_vs_torchjd_smoke(smoke_runs, request):
    pytest.importorskip("torchjd", reason="TorchJD is not installed (a test dependency: pip install -e .[dev])")
    out = smoke(smoke_runs, request)
    has_keys(out, "rows", "agreement_pass")
    variants = {(r["method"], r["variant"]) for r in out["rows"]}
    assert variants == {("equal", "ew")} | {(m, k) for m in ("upgrad", "mgda", "pcgrad")
                                              for k in ("mtl-feature", "mtl-parameter", "jd-autojac", "jd-autogram")}
    for r in out["rows"]:
        has_keys(r, "tasks", "ms_per_step", "peak_mib")
        if r["variant"] != "ew":
            has_keys(r, "vs_ew", "peak_over_ew_mib", *RATIO_FIELDS)
        if r["variant"] == "mtl-parameter":
            has_keys(r["agreement"], "gramian", "weights", "update", "heads", "pass")
    # the parameter-space updates agree with TorchJD's (same weights, same batch, solvers set alike)
    assert out["agreement_pass"], [r["agreement"] for r in out["rows"] if "agreement" in r]


@pytest.mark.parametrize("script,count", [("gpu_cifar10.sh", 1), ("methods_multimnist.sh", 3), ("reference_ab.sh", 8)],
                         ids=["gpu_cifar10.sh", "methods_multimnist.sh", "reference_ab.sh"])
def test_shell_benchmarks_dry_run(script, count, smoke_runs, request):
    if shutil.which("bash") is None:
        pytest.skip("bash is not available")
    out = smoke(smoke_runs, request)
    assert out["dry_run"] and out["valid"], out
    assert len(out["commands"]) == count


def test_dry_run_checker_names_what_is_wrong(timing):
    import _smoke

    bad = _smoke.check_command("python -m mtlvision train configs/cifar10_gpu.yaml --out x --set train.nope=1")
    assert not bad["valid"] and "unknown key(s) nope" in bad["error"]
    bad = _smoke.check_command("python benchmarks/cifar10_reference.py --epochs many")
    assert not bad["valid"] and "bad arguments" in bad["error"]
    assert _smoke.check_command("python benchmarks/cifar10_reference.py --epochs 2 --width 0.25")["valid"]
    assert not _smoke.check_command("python benchmarks/unknown.py")["valid"]


@pytest.mark.slow
def test_gpu_cifar10_one_epoch(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("gpu_cifar10.sh needs a CUDA GPU")
    if not (SHARED_DATA / "cifar10" / "train.tar.gz").is_file():
        pytest.skip(f"real CIFAR-10 not found at {SHARED_DATA / 'cifar10'} (set MTLVISION_DATA)")
    out = run(["bash", str(BENCH / "gpu_cifar10.sh"), "--set", "train.epochs=1"],
              env={"MTLVISION_DATA": str(SHARED_DATA), "RUN_DIR": str(tmp_path / "run")}, timeout=900)[0]
    has_keys(out, "test_accuracy", "train_images_per_s", "train_wall_time_s")


# -- the timing statistics (benchmarks/_timing.py) on known inputs -------------------------------

@pytest.fixture
def timing():
    sys.path.insert(0, str(BENCH))
    try:
        import _timing
        yield _timing
    finally:
        sys.path.remove(str(BENCH))


def test_cycle_order_rotates_and_alternates(timing):
    names = ["a", "b", "c"]
    orders = [timing.cycle_order(names, c) for c in range(6)]
    assert orders[:3] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert orders[3] == ["c", "b", "a"]  # the next block runs the other way round
    for name in names:  # over 2n cycles every variant takes every position twice
        assert sorted(o.index(name) for o in orders) == [0, 0, 1, 1, 2, 2]


def test_interleave_pairs_cycles_and_discards_warmup(timing):
    calls = []
    times = timing.interleave({"x": lambda: calls.append("x"), "y": lambda: calls.append("y")}, cycles=4, warmup=2)
    assert len(calls) == 12 and {k: len(v) for k, v in times.items()} == {"x": 4, "y": 4}


def test_median_interval_coverage_is_the_sign_test_one(timing):
    lo, hi, cov = timing.median_ci([5, 1, 4, 2, 3])  # n = 5: only [min, max], 1 - 2/32
    assert (lo, hi) == (1, 5) and cov == pytest.approx(0.9375)
    lo, hi, cov = timing.median_ci(list(range(1, 10)))  # n = 9: [x_2, x_8], 1 - 2 (1 + 9)/512
    assert (lo, hi) == (2, 8) and cov == pytest.approx(1 - 20 / 512)
    assert timing.median_ci(list(range(20)))[2] >= 0.95


def test_verdict_needs_the_whole_interval_on_one_side(timing):
    def stats(values):
        return timing.ratio_stats(values, [1.0] * len(values))

    assert timing.verdict(stats([1.00, 1.01, 1.02, 0.99, 1.00, 1.01, 1.00]), 1.05) == "pass"
    assert timing.verdict(stats([1.10, 1.08, 1.12, 1.09, 1.11, 1.10, 1.07]), 1.05) == "fail"
    assert timing.verdict(stats([1.00, 1.10, 1.02, 1.08, 1.04, 1.06, 1.05]), 1.05) == "inconclusive"
    assert timing.verdict(stats([1.0, 1.0, 1.0]), 1.05) == "inconclusive"  # 3 cycles: 75% coverage
    assert timing.verdict(stats([0.97, 0.98, 0.99, 0.97, 0.98, 0.99, 0.98]), 0.95, higher_is_better=True) == "pass"
    assert timing.within(stats([1.00, 1.01, 0.99, 1.02, 0.98, 1.00, 1.01]))
    assert not timing.within(stats([1.00, 1.05, 0.99, 1.06, 0.98, 1.04, 1.01]))


def test_vs_torchjd_memory_smoke(smoke_runs, request):
    """--memory: every variant (EW and the four kinds of a method) stepped in its own process."""
    pytest.importorskip("torchjd", reason="TorchJD is not installed (a test dependency: pip install -e .[dev])")
    out = smoke(smoke_runs, request)
    peaks = {r["variant"]: r["peak_mib"] for r in out["rows"]}
    assert set(peaks) == {"ew", "mtl-feature", "mtl-parameter", "jd-autojac", "jd-autogram"}
    assert all(v is not None and v > 0 for v in peaks.values()), peaks
