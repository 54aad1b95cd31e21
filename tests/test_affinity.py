"""Task affinity (TAG): the lookahead measurement against its definition, and the grouping search."""
from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch

from conftest import tiny_config
from mtlvision.affinity import AffinityTrainer, best_grouping, lookahead_affinity
from mtlvision.cli import main
from mtlvision.config import load_config
from mtlvision.errors import ConfigError
from mtlvision.training.trainer import Trainer


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


def test_grouping_recovers_two_clusters():
    z = np.full((4, 4), -0.05)
    z[0, 1] = z[1, 0] = z[2, 3] = z[3, 2] = 0.1
    np.fill_diagonal(z, 0.2)
    assert best_grouping(z, 1)[0] == [(0, 1, 2, 3)]
    groups, score = best_grouping(z, 2)
    assert sorted(groups) == [(0, 1), (2, 3)] and score == pytest.approx(0.4)


@pytest.mark.parametrize("seed", range(4))
def test_grouping_is_the_exhaustive_optimum(seed):
    z = np.random.default_rng(seed).normal(0, 0.1, (4, 4))
    for budget in range(1, 5):
        groups, score = best_grouping(z, budget)
        assert len(groups) <= budget and set().union(*groups) == {0, 1, 2, 3}
        assert score == pytest.approx(_brute_force(z, budget))
    with pytest.raises(ConfigError, match="budget"):
        best_grouping(z, 5)


def _cfg(**over):
    return load_config(data=tiny_config(**{"train__epochs": 1, **over}))


def test_lookahead_matches_its_definition_and_leaves_the_model_untouched(tmp_path):
    trainer = Trainer(_cfg(), tmp_path / "a", quiet=True)
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


def test_measuring_does_not_change_training(tmp_path):
    """Same final weights with and without measurement (feature-space method: the split graph is handled)."""
    cfg = _cfg(balancing={"method": "mgda"}, model__backbone__dropout=0.2)
    plain = Trainer(cfg, tmp_path / "plain", quiet=True)  # seeds the global RNG (dropout draws) itself
    for step in range(6):
        plain.train_step(0, step)
    measured = AffinityTrainer(cfg, tmp_path / "measured", every=3, quiet=True)
    for step in range(6):
        measured.train_step(0, step)
    assert sum(measured.counts.values()) == 2 and np.abs(measured.matrix()).sum() > 0
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
