"""Data-parallel training (torch.distributed, gloo on CPU): 2 ranks x batch B against 1 process x batch 2B.

The equivalence tests drive `Trainer.train_step` on a smallcnn whose BatchNorm layers are put in eval
mode: per-rank BatchNorm normalises each rank's rows with their own statistics, so a training-mode BN
model is NOT the same function on 2 x B rows as on one 2B batch (that is the documented per-rank BN
behaviour). In eval mode BN uses its (initial) running statistics, a per-sample affine map, and the
data-parallel step must then equal the single-process global-batch step up to float rounding.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from mtlvision.config import load_config
from mtlvision.data.arrays import ImageSet
from mtlvision.data.loader import TensorImages, TrainLoader
from mtlvision.errors import CheckpointError
from mtlvision.training import Trainer, build_trainer, train

from conftest import tiny_config

B = 8  # per-rank batch
STEPS = 3
GRADIENT = ["mgda", "pcgrad", "cagrad", "nash_mtl", "upgrad", "gradnorm"]
CASES = ([("equal", {}), ("uw", {}), ("famo", {}), ("gls", {}), ("rlw", {}), ("imtl_l", {}),
          ("graddrop", {}), ("db_mtl", {})]
         + [(m, {"space": s}) for m in GRADIENT for s in ("feature", "parameter")]
         # several shared tensors (the graph is split at each of them)
         + [("mgda", {"space": "feature", "arch": "mtan"}), ("graddrop", {"arch": "mmoe"}),
            # labels missing unevenly across ranks (a rank with none of a task's labels at step 0)
            ("equal", {"missing": True}), ("famo", {"missing": True}),
            ("mgda", {"space": "parameter", "missing": True})])


def _case(method: str, params: dict) -> str:
    return "-".join([method, params.get("space", ""), *[k for k in ("arch", "missing") if k in params]])


def _drop_labels(tr: Trainer) -> None:
    """Task 1 loses labels: step 0 all of rank 1's rows, step 1 three of rank 1's, step 2 five of rank 0's."""
    order, _ = tr.loaders[0]._epoch_plan(0, tr.steps)
    labels = tr.loaders[0].data.labels[tr.tasks[1].name]
    g = 2 * B  # the global batch
    for rows in (order[B:g], order[g + B:g + B + 3], order[2 * g:2 * g + 5]):
        labels[rows] = -1


def _cfg(batch_size: int, balancing: dict, **over) -> dict:
    cfg = tiny_config(**over)
    cfg["data"] = {"source": {"name": "shapes", "n_train": 180, "n_test": 40, "size": 16}, "batch_size": batch_size,
                   "cache": False, "augment": {"crop_padding": 2, "flip": True}}
    cfg["model"] = {"backbone": {"name": "smallcnn", "width": 4, "out_dim": 16},
                    "architecture": {"name": "task-features", "feature_dim": 8}}
    cfg["balancing"] = balancing
    cfg["train"].update(threads=1, device="cpu")
    return cfg


def _steps(batch_size: int, out: Path) -> dict:
    """Every case: STEPS training steps on fresh weights (BatchNorm in eval mode, see the module docstring)."""
    results = {}
    for method, params in CASES:
        cfg = _cfg(batch_size, {"method": method, **{k: v for k, v in params.items() if k == "space"}})
        if "arch" in params:
            cfg["model"]["architecture"] = {"name": params["arch"]}
        tr = build_trainer(load_config(data=cfg), out, quiet=True)
        if params.get("missing"):
            _drop_labels(tr)
        evaluated = tr.evaluate(tr.parts.val_sets) if method == "equal" else None  # on the initial weights
        tr.model.train()
        for m in tr.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        weights = [tr.train_step(0, step)[3] for step in range(STEPS)]
        params_now = torch.cat([p.detach().reshape(-1) for p in [*tr.model.parameters(), *tr.balancer.parameters()]])
        results[_case(method, params)] = {"weights": weights, "params": params_now,
                                                          "eval": evaluated, "steps": tr.steps}
    return results


def _worker(rank: int, world: int, store: str, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = _steps(B, Path(tmp) / "unused")
        results["fit"] = train(_cfg(B, {"method": "famo"}, train__epochs=2), Path(tmp) / "fit", quiet=True)
        torch.save(results, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(rank 0, rank 1, single process) results: the 2-rank job runs once for every test here."""
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, str(tmp / "store"), str(tmp)), nprocs=2)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return ranks[0], ranks[1], _steps(2 * B, tmp / "unused"), tmp


@pytest.mark.parametrize("case", [_case(m, p) for m, p in CASES])
def test_ranks_agree_and_equal_one_process_on_the_global_batch(runs, case):
    r0, r1, single, _ = runs
    a, b, ref = r0[case], r1[case], single[case]
    assert a["steps"] == ref["steps"] == 180 * 9 // 10 // (2 * B)  # steps of the global batch
    assert a["weights"] == b["weights"]  # identical task weights on every rank, every step
    assert torch.equal(a["params"], b["params"])  # identical replicas
    for got, want in zip(a["weights"], ref["weights"]):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    tol = 1e-5 if case == "equal-" else 1e-4
    torch.testing.assert_close(a["params"], ref["params"], atol=tol, rtol=tol)


def test_sharded_evaluation_equals_one_process(runs):
    r0, r1, single, _ = runs
    for task, m in single["equal-"]["eval"].items():
        for got in (r0["equal-"]["eval"][task], r1["equal-"]["eval"][task]):
            assert got["count"] == m["count"] and got["accuracy"] == m["accuracy"]
            assert got["loss"] == pytest.approx(m["loss"], rel=1e-5)


def test_fit_writes_once_from_rank_zero(runs):
    r0, r1, _, tmp = runs
    out = tmp / "fit"
    for key in ("tasks", "best_epoch", "world_size"):  # the same results on every rank (timings are per rank)
        assert r0["fit"][key] == r1["fit"][key]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["world_size"] == 2 and on_disk["tasks"] == r0["fit"]["tasks"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1]  # one writer: no duplicated lines
    assert lines[-1]["step"] == 2 * (180 * 9 // 10 // (2 * B))
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
    with pytest.raises(CheckpointError, match="written by a run of 2 process"):  # one process cannot resume it
        build_trainer(load_config(data=_cfg(B, {"method": "famo"}, train__epochs=2)), out, resume=True, quiet=True).fit()


def test_rank_slices_make_up_the_global_batch():
    """Rank r's batch is the r-th slice of the batch one process takes with world x B rows, per stream."""
    rng = torch.Generator().manual_seed(0)
    for n in (50, 37):  # two streams of different sizes
        data = TensorImages(ImageSet(torch.randint(0, 256, (n, 4, 4, 3), generator=rng, dtype=torch.uint8).numpy(),
                                     {"t": torch.arange(n).numpy()}), torch.device("cpu"))
        one = TrainLoader(data, 2 * B, seed=3, stream=n, augment=None)
        ranks = [TrainLoader(data, B, seed=3, stream=n, augment=None, rank=r, world_size=2) for r in range(2)]
        assert ranks[0].natural_steps == one.natural_steps == n // (2 * B)
        for step in range(4):  # past one pass: the order cycles the same way
            whole = one.batch(1, step, 4)[1]["t"]
            parts = [ld.batch(1, step, 4)[1]["t"] for ld in ranks]
            assert torch.equal(torch.cat(parts), whole)
            if step < one.natural_steps:  # within one pass over the stream the ranks' rows are disjoint
                assert not set(parts[0].tolist()) & set(parts[1].tolist())


def test_torchrun_restart_resumes_when_a_checkpoint_exists(tmp_path, monkeypatch):
    cfg = load_config(data=_cfg(B, {"method": "equal"}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert build_trainer(cfg, tmp_path / "run", quiet=True).resume
    assert not build_trainer(cfg, tmp_path / "fresh", quiet=True).resume  # died before its first checkpoint
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(CheckpointError, match="already holds a run"):
        build_trainer(cfg, tmp_path / "run", quiet=True)


def test_a_restarted_worker_replaces_the_folder_its_job_started_before_any_checkpoint(tmp_path, monkeypatch):
    """A torchrun job whose first attempt died before its first checkpoint left its own files: the restart
    starts afresh there. Files of another job are refused."""
    from mtlvision.training import distributed

    cfg = load_config(data=_cfg(B, {"method": "equal"}, train__epochs=1))
    monkeypatch.setattr(distributed, "job_id", lambda: "host:123:job-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    build_trainer(cfg, tmp_path / "run", quiet=True).fit()
    for name in ("checkpoint.pt", "summary.json"):  # as if it had died before its first checkpoint
        (tmp_path / "run" / name).unlink()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert not build_trainer(cfg, tmp_path / "run", quiet=True).resume
    monkeypatch.setattr(distributed, "job_id", lambda: "host:456:job-b")
    with pytest.raises(CheckpointError, match="already holds a run's files"):
        build_trainer(cfg, tmp_path / "run", quiet=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cfg_path: Path, out: Path, restarts: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
         f"--max-restarts={restarts}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
         "--monitor-interval=0.2", "-m", "mtlvision", "train", str(cfg_path), "--out", str(out),
         "--set", "train.log_every=1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _rank_pid(agent: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank (the workers are the agent's children)."""
    for pid in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
        if f"RANK={rank}\0" in Path(f"/proc/{pid}/environ").read_text():
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} under pid {agent}")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker pid through /proc")
def test_killed_worker_is_restarted_by_torchrun_and_matches_the_uninterrupted_run(tmp_path):
    """SIGKILL rank 1 in the middle of epoch 2 under `torchrun --max-restarts=1`: torchrun restarts both
    workers, they resume from the epoch-1 checkpoint and finish with the uninterrupted run's metrics."""
    cfg = _cfg(B, {"method": "famo"}, train__epochs=3)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    straight = _torchrun(cfg_path, tmp_path / "straight", restarts=0)
    log_straight = straight.communicate(timeout=300)[0]
    assert straight.returncode == 0, log_straight

    proc = _torchrun(cfg_path, tmp_path / "killed", restarts=1)
    lines, killed = [], False
    for line in proc.stdout:
        lines.append(line)
        if not killed and re.match(r"epoch 2/3 step 4/", line):  # epoch 1 is checkpointed
            os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
            killed = True
    proc.wait(timeout=300)
    log = "".join(lines)
    assert killed and proc.returncode == 0, log
    assert "resumed" in log
    final = json.loads((tmp_path / "killed" / "summary.json").read_text())
    expect = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert final["tasks"] == expect["tasks"] and final["best_epoch"] == expect["best_epoch"]
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]
