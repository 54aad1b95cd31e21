"""Task affinity (TAG): the lookahead measurement against its definition, and the grouping search."""
from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch

from conftest import tiny_config
from mtlvision.affinity import affinity_trainer, best_groupings, lookahead_affinity
from mtlvision.cli import main
from mtlvision.config import load_config
from mtlvision.errors import ConfigError, MTLVisionError
from mtlvision.training import build_trainer


def _brute_force(z, budget):
    t = len(z)
    groups = [g for s in range(1, t + 1) for g in itertools.combinations(range(t), s)]

    def onto(g, j):
        others = [i for i in g if i != j]
        return np.mean([z[i, j] for i in others]) if others else 0.0

    best = -np.inf
    for k in range(1, budget + 1):
        for choice in itertools.combinations(groups, k):
            if set().union(*choice) != set(range(t)):
                continue
            best = max(best, sum(max(onto(g, j) for g in choice if j in g) for j in range(t)))
    return best


def _total(z, groups):
    """The objective of a grouping: every task takes the affinity of its best group."""
    return sum(max(np.mean([z[i, j] for i in g if i != j]) if len(g) > 1 else 0.0 for g in groups if j in g)
               for j in range(len(z)))


def test_grouping_recovers_two_clusters():
    z = np.full((4, 4), -0.05)
    z[0, 1] = z[1, 0] = z[2, 3] = z[3, 2] = 0.1
    np.fill_diagonal(z, 0.2)
    (one, _), (two, score) = best_groupings(z, 2)
    assert one == [(0, 1, 2, 3)]
    assert two == [(0, 1), (2, 3)] and score == pytest.approx(0.4)


def test_a_task_every_group_hurts_gets_its_own_network():
    z = np.full((3, 3), 0.1)
    z[:, 2] = -0.2  # every other task's step raises task 2's loss
    groups, score = best_groupings(z, 2)[1]
    assert groups == [(0, 1), (2,)] and score == pytest.approx(0.2)


@pytest.mark.parametrize("seed", range(6))
def test_grouping_is_the_exhaustive_optimum(seed):
    t = 4 + seed % 2
    z = np.random.default_rng(seed).normal(0, 0.1, (t, t))
    for budget, (groups, score) in enumerate(best_groupings(z, 3 if t == 5 else t), 1):
        assert len(groups) <= budget and set().union(*groups) == set(range(t))
        assert score == pytest.approx(_brute_force(z, budget)) and score == pytest.approx(_total(z, groups))
    with pytest.raises(ConfigError, match="budget"):
        best_groupings(z, t + 1)


def test_grouping_of_twelve_tasks_every_budget():
    z = np.random.default_rng(0).normal(0, 0.1, (12, 12))
    results = best_groupings(z, 12)
    scores = [score for _, score in results]
    assert scores == sorted(scores)  # a larger budget never does worse
    for budget, (groups, score) in enumerate(results, 1):
        assert len(groups) <= budget and set().union(*groups) == set(range(12))
        assert score == pytest.approx(_total(z, groups))
    # with a network per task allowed, every task is served by its best pair-or-larger group or alone
    assert scores[-1] >= sum(max(0.0, max(z[i, j] for i in range(12) if i != j)) for j in range(12)) - 1e-9
    with pytest.raises(MTLVisionError, match="limited to 12 tasks"):
        best_groupings(np.zeros((13, 13)), 2)
    with pytest.raises(MTLVisionError, match="unmeasured"):
        best_groupings(np.full((3, 3), np.nan), 2)


def _cfg(**over):
    return load_config(data=tiny_config(**{"train__epochs": 1, **over}))


def test_lookahead_matches_its_definition_and_leaves_the_model_untouched(tmp_path):
    trainer = build_trainer(_cfg(), tmp_path / "a", quiet=True)
    x, labels, rows = trainer.next_batch(0, 0)
    model = trainer.model
    before = copy.deepcopy(model.state_dict())
    z = lookahead_affinity(trainer, x, labels, rows)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    lr = trainer.optimizer.param_groups[0]["lr"]
    tasks = trainer.tasks

    def losses(m):
        out = m(x)
        return torch.stack([t.loss(out.logits[t.name], labels[t.name]) for t in tasks])

    ref_model = copy.deepcopy(model)
    base = losses(ref_model)
    shared = ref_model.shared_parameters()
    for i in range(len(tasks)):
        step = copy.deepcopy(ref_model)
        grads = torch.autograd.grad(losses(ref_model)[i], shared, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(step.shared_parameters(), grads):
                if g is not None:
                    p -= lr * g
        expect = (1 - losses(step) / base).detach().numpy()
        np.testing.assert_allclose(z[i], expect, rtol=1e-4, atol=1e-6)
    assert np.all(np.diag(z) > 0)  # a step on a task's own gradient lowers its own loss


def test_every_forward_of_a_measurement_draws_the_same_dropout(tmp_path):
    trainer = build_trainer(_cfg(model__backbone__dropout=0.5), tmp_path / "d", quiet=True)
    x, labels, rows = trainer.next_batch(0, 0)
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.0  # the lookahead step moves nothing: only different dropout masks could change a loss
    np.testing.assert_array_equal(lookahead_affinity(trainer, x, labels, rows), 0.0)


def test_tasks_without_labels_in_a_batch_are_left_out_of_the_average(tmp_path):
    trainer, measure = affinity_trainer(_cfg(), tmp_path / "p", every=1, quiet=True)
    x, labels, rows = trainer.next_batch(0, 0)
    z = lookahead_affinity(trainer, x, {**labels, "size": torch.full_like(labels["size"], -1)}, rows)
    size = [t.name for t in trainer.tasks].index("size")
    assert np.isnan(z[size]).all() and np.isnan(z[:, size]).all()
    others = np.delete(np.delete(z, size, 0), size, 1)
    assert np.isfinite(others).all()
    # one measurement without the task's labels, one with them: its pairs average the one that has them
    real = trainer.next_batch

    def next_batch(epoch, step):
        xb, yb, rb = real(epoch, step)
        return xb, ({**yb, "size": torch.full_like(yb["size"], -1)} if step == 0 else yb), rb

    trainer.next_batch = next_batch
    trainer.train_step(0, 0)
    trainer.train_step(0, 1)
    m = measure.matrix()
    assert np.isfinite(m).all() and measure.pair_counts[0][size, size] == 1 and measure.pair_counts[0][0, 1] == 2


def test_measuring_does_not_change_training(tmp_path):
    """Same final weights with and without measurement (feature-space method: the split graph is handled)."""
    cfg = _cfg(balancing={"method": "mgda"}, model__backbone__dropout=0.2)
    plain = build_trainer(cfg, tmp_path / "plain", quiet=True)  # seeds the global RNG (dropout draws) itself
    for step in range(6):
        plain.train_step(0, step)
    measured, measure = affinity_trainer(cfg, tmp_path / "measured", every=3, quiet=True)
    for step in range(6):
        measured.train_step(0, step)
    assert sum(measure.counts.values()) == 2 and np.abs(measure.matrix()).sum() > 0
    for a, b in zip(plain.model.state_dict().values(), measured.model.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_cli_writes_matrix_heatmap_and_groupings(tmp_path, capsys):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config(train__epochs=1)))
    out = tmp_path / "aff"
    assert main(["affinity", str(path), "--out", str(out), "--every", "3", "--budget", "2", "--quiet"]) == 0
    result = json.loads((out / "affinity.json").read_text())
    assert result["tasks"] == ["shape", "colour", "size", "position"] and result["measurements"] == 3
    assert np.asarray(result["affinity"]).shape == (4, 4)
    assert [g["budget"] for g in result["groupings"]] == [2]
    assert (out / "affinity.png").stat().st_size > 1000 and (out / "summary.json").is_file()
    assert "suggested groupings" in capsys.readouterr().out


def test_resume_restores_the_measurements(tmp_path):
    from mtlvision.affinity import run_affinity

    cfg = tiny_config(train__epochs=1)
    first = run_affinity(cfg, tmp_path / "r", every=4, budgets=[2], quiet=True)
    again = run_affinity(cfg, tmp_path / "r", every=4, budgets=[2], resume=True, quiet=True)  # nothing left to train
    assert again["measurements"] == first["measurements"] > 0
    np.testing.assert_allclose(again["affinity"], first["affinity"])
    with pytest.raises(ConfigError, match="budget: expected 1..4"):
        run_affinity(cfg, tmp_path / "b", budgets=[5], quiet=True)
    assert not (tmp_path / "b" / "checkpoint.pt").exists()  # refused before training
