"""Omniglot as 50 tasks: the `npz` source's group_by (one task per alphabet), merged file prefixes and a
train / val / test split by drawer, on tiny files in Omniglot's schema made in tmp_path; training with
many tasks that each batch labels only a few rows of; and (marked slow) the real data."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlvision.config import load_config
from mtlvision.data import SOURCES, build_data
from mtlvision.errors import ConfigError, DataError
from mtlvision.tasks import MISSING
from mtlvision.training import build_trainer, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALPHABETS = ["Latin", "Greek", "Runic", "Braille", "Tengwar"]
CHARS = [3, 2, 4, 2, 3]  # characters per alphabet; the first 3 alphabets are the background set


def make_omniglot(root: Path, chars=CHARS, names=ALPHABETS, background: int = 3, drawers: int = 5,
                  size: int = 12, meta: bool = True) -> dict[str, np.ndarray]:
    """background-00.npz / evaluation-00.npz in Omniglot's schema (rows character-major, drawer-minor;
    each image's pixels are its row number in the two files together, to trace rows). Returns the columns."""
    root.mkdir(parents=True, exist_ok=True)
    cols: dict[str, list[int]] = {"alphabet": [], "character": [], "character_in_alphabet": [], "drawer": []}
    for a, n in enumerate(chars):
        for c in range(n):
            for d in range(drawers):
                cols["alphabet"].append(a)
                cols["character"].append(sum(chars[:a]) + c)
                cols["character_in_alphabet"].append(c)
                cols["drawer"].append(d)
    table = {k: np.asarray(v, np.int16) for k, v in cols.items()}
    n_bg = sum(chars[:background]) * drawers
    images = np.broadcast_to((np.arange(len(table["drawer"])) % 256).astype(np.uint8)[:, None, None, None],
                             (len(table["drawer"]), size, size, 1))
    for name, rows in (("background", slice(0, n_bg)), ("evaluation", slice(n_bg, None))):
        np.savez(root / f"{name}-00.npz", images=images[rows], **{k: v[rows] for k, v in table.items()})
    if meta:
        (root / "meta.json").write_text(json.dumps({"label_kinds": {
            "alphabet": {"num_classes": len(names), "names": names},
            "character": {"num_classes": sum(chars)},
            "character_in_alphabet": {"note": "0-based index of the character inside its alphabet"},
            "drawer": {"num_classes": drawers}}}))
    return table


def source(root: Path, **over) -> dict:
    """Both sets, one task per alphabet, drawers 0-2 train, 3 val, 4 test, and the drawer itself as a task."""
    return {"name": "npz", "path": str(root), "train_split": ["background", "evaluation"], "fold_key": "drawer",
            "val_folds": [3], "test_folds": [4],
            "tasks": {"character": {"key": "character_in_alphabet", "group_by": "alphabet", "flip_ok": False},
                      "drawer": {}}} | over


def load_raw(spec: dict):
    return SOURCES.build(SOURCES.spec(spec, "data.source"), image_size=None).load()


def rows_of(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, 0].astype(np.int64)


def test_one_task_per_alphabet_labelled_only_in_its_own_rows(tmp_path):
    table = make_omniglot(tmp_path)
    raw = load_raw(source(tmp_path))
    assert [t.name for t in raw.tasks] == ALPHABETS + ["drawer"]
    for task, n in zip(raw.tasks, CHARS):
        assert task.classes == [str(c) for c in range(n)] and not task.flip_ok
    assert raw.warnings == []
    for split, drawers in (("train", [0, 1, 2]), ("val", [3]), ("test", [4])):
        s = getattr(raw, split)
        rows = rows_of(s.images)  # background then evaluation rows, in file order
        assert rows.tolist() == np.flatnonzero(np.isin(table["drawer"], drawers)).tolist()
        np.testing.assert_array_equal(s.labels["drawer"], table["drawer"][rows])
        labelled = np.stack([s.labels[a] != MISSING for a in ALPHABETS])
        assert (labelled.sum(0) == 1).all()  # every image is labelled for exactly one task: its alphabet's
        for a, name in enumerate(ALPHABETS):
            mine = table["alphabet"][rows] == a
            np.testing.assert_array_equal(labelled[a], mine)
            np.testing.assert_array_equal(s.labels[name][mine], table["character_in_alphabet"][rows][mine])


def test_group_names_without_meta_classes_from_meta_and_values_that_skip(tmp_path):
    make_omniglot(tmp_path, meta=False)
    raw = load_raw(source(tmp_path, tasks={"char": {"key": "character_in_alphabet", "group_by": "alphabet"}}))
    assert [t.name for t in raw.tasks] == [f"char_{a}" for a in range(5)]

    table = make_omniglot(tmp_path)
    kinds = json.loads((tmp_path / "meta.json").read_text())
    kinds["label_kinds"]["character_in_alphabet"]["names"] = ["a", "b", "c", "d"]
    (tmp_path / "meta.json").write_text(json.dumps(kinds))
    # Latin's character 1 dropped: its classes are the values its rows have, 0 and 2 -> classes 0 and 1
    for f in ("background", "evaluation"):
        z = dict(np.load(tmp_path / f"{f}-00.npz"))
        z["gone"] = (z["alphabet"] == 0) & (z["character_in_alphabet"] == 1)
        np.savez(tmp_path / f"{f}-00.npz", **z)
    raw = load_raw(source(tmp_path, drop_key="gone"))
    assert raw.tasks[0].classes == ["a", "c"] and raw.tasks[2].classes == ["a", "b", "c", "d"]
    rows = rows_of(raw.train.images)
    latin = table["alphabet"][rows] == 0
    np.testing.assert_array_equal(raw.train.labels["Latin"][latin], table["character_in_alphabet"][rows][latin] // 2)


def test_groups_picks_alphabets_by_name_or_value(tmp_path):
    table = make_omniglot(tmp_path)
    raw = load_raw(source(tmp_path, tasks={"character": {"key": "character_in_alphabet", "group_by": "alphabet",
                                                         "groups": ["Tengwar", 1]}}))
    assert [(t.name, t.num_classes) for t in raw.tasks] == [("Tengwar", 3), ("Greek", 2)]
    alphabet = table["alphabet"][rows_of(raw.test.images)]
    np.testing.assert_array_equal(raw.test.labels["Tengwar"] != MISSING, alphabet == 4)
    np.testing.assert_array_equal(raw.test.labels["Greek"] != MISSING, alphabet == 1)


def test_build_data_takes_the_validation_split_from_val_folds(tmp_path):
    make_omniglot(tmp_path)
    data = build_data(load_config(data={"data": {"source": source(tmp_path), "val_fraction": 0.5}}))
    g = data.groups[0]
    assert (len(g.train), len(g.val), len(g.test)) == (3 * 14, 14, 14) and not g.flip
    assert set(g.val.labels["drawer"].tolist()) == {3}


def test_train_folds_and_single_prefix(tmp_path):
    make_omniglot(tmp_path)
    raw = load_raw(source(tmp_path, train_split="evaluation", train_folds=[0], val_folds=[1, 2]))
    assert [t.name for t in raw.tasks] == ["Braille", "Tengwar", "drawer"]  # the groups the rows have
    assert (len(raw.train), len(raw.val), len(raw.test)) == (5, 10, 5)


@pytest.mark.parametrize("over, error, message", [
    ({"tasks": {"c": {"key": "character_in_alphabet", "group_by": "script"}}}, DataError,
     r"data\.source\.tasks\.c\.group_by: 'script' is not a key of .*\{background,evaluation\}-\*\.npz "
     r"\(keys: \['alphabet', 'character'"),
    ({"tasks": {"c": {"key": "character_in_alphabet", "group_by": "alphabet", "groups": ["Latin", "Klingon"]}}},
     DataError, r"tasks\.c\.groups: 'Klingon' is not a value of 'alphabet' \(values: 0 Latin, 1 Greek"),
    ({"tasks": {"c": {"key": "character_in_alphabet", "group_by": "alphabet", "groups": [7]}}},
     DataError, r"tasks\.c\.groups: 7 is not a value of 'alphabet'"),
    ({"tasks": {"c": {"key": "character_in_alphabet", "group_by": "alphabet", "groups": [0, "Latin"]}}},
     DataError, r"tasks\.c\.groups: 'Latin' is named twice"),
    ({"tasks": {"c": {"key": "glyph", "group_by": "alphabet"}}}, DataError, r"tasks\.c: key 'glyph' not in"),
    ({"tasks": {"c": {"key": "character_in_alphabet", "group_by": "alphabet", "num_classes": 4}}}, ConfigError,
     r"tasks\.c\.num_classes: not used with group_by"),
    ({"tasks": {"c": {"key": "character_in_alphabet", "groups": ["Latin"]}}}, ConfigError,
     r"tasks\.c\.groups: needs group_by"),
    ({"tasks": {"Latin": {"key": "drawer"}, "c": {"key": "character_in_alphabet", "group_by": "alphabet"}}},
     ConfigError, r"tasks\.c: makes task 'Latin', which data\.source\.tasks\.Latin makes too"),
    ({"val_folds": [3, 9]}, DataError,
     r"data\.source\.val_folds: 'drawer' has no row with value 9 in .*\{background,evaluation\}-\*\.npz "
     r"\(values: 0, 1, 2, 3, 4\)"),
    ({"val_folds": [3], "test_folds": [3, 4]}, ConfigError,
     r"data\.source\.test_folds and data\.source\.val_folds both name fold\(s\) \[3\]"),
    ({"train_folds": []}, DataError, r"data\.source: the train split \(train_folds \[\]\) has no rows"),
    ({"val_folds": [], "test_folds": [0, 1, 2, 3, 4]}, DataError,
     r"the train split \(the fold values in neither test_folds nor val_folds\) has no rows"),
    ({"fold_key": None}, ConfigError, r"data\.source\.val_folds: needs fold_key"),
    ({"fold_key": "pen"}, DataError, r"fold_key 'pen' is not a key"),
    ({"train_split": ["background", "extra"]}, DataError, r"no files extra-\*\.npz"),
])
def test_errors_name_the_key_and_value(tmp_path, over, error, message):
    make_omniglot(tmp_path)
    with pytest.raises(error, match=message):
        load_raw(source(tmp_path, **over))


def test_data_errors_name_file_row_and_group(tmp_path):
    make_omniglot(tmp_path)
    z = dict(np.load(tmp_path / "evaluation-00.npz"))
    z["character_in_alphabet"] = z["character_in_alphabet"].astype(np.float32)
    z["character_in_alphabet"][7] = 1.5
    np.savez(tmp_path / "evaluation-00.npz", **z)
    with pytest.raises(DataError, match=r"label 1\.5 at row 7 of .*evaluation-00\.npz is not an integer"):
        load_raw(source(tmp_path))

    make_omniglot(tmp_path, chars=[3, 1, 4, 2, 3])  # Greek has one character: no task to learn
    with pytest.raises(DataError, match=r"group 'Greek' \(alphabet = 1\) has 1 value\(s\) of "
                                        r"'character_in_alphabet' \(\[0\]\); a task needs at least 2"):
        load_raw(source(tmp_path))

    make_omniglot(tmp_path)
    for f in ("background", "evaluation"):  # every drawer-3 image dropped: the validation split is empty
        z = dict(np.load(tmp_path / f"{f}-00.npz"))
        z["dup"] = z["drawer"] == 3
        np.savez(tmp_path / f"{f}-00.npz", **z)
    with pytest.raises(DataError, match=r"the val split \(val_folds \[3\]\) has no rows once drop_key 'dup'"):
        load_raw(source(tmp_path, drop_key="dup"))

    make_omniglot(tmp_path, names=ALPHABETS[:4])
    with pytest.raises(DataError, match=r"tasks\.character\.group_by 'alphabet': value 4 has no name in "
                                        r"meta\.json \(4 names\)"):
        load_raw(source(tmp_path))


# -- training with many tasks, few labelled rows per task in each batch ----------------------------------

MANY = 50


@pytest.fixture(scope="module")
def many_tasks(tmp_path_factory) -> Path:
    """50 alphabets of 2 characters, 4 drawers (2 train, 1 val, 1 test): a batch of 16 labels at most 16 tasks."""
    root = tmp_path_factory.mktemp("omniglot50")
    make_omniglot(root, chars=[2] * MANY, names=[f"script{a}" for a in range(MANY)], background=30, drawers=4)
    return root


def many_config(root: Path, method: dict, out: Path | None = None) -> dict:
    return {"name": "many", "data": {"source": {"name": "npz", "path": str(root),
                                                "train_split": ["background", "evaluation"], "fold_key": "drawer",
                                                "val_folds": [2], "test_folds": [3],
                                                "tasks": {"c": {"key": "character_in_alphabet",
                                                                "group_by": "alphabet", "flip_ok": False}}},
                                     "batch_size": 16, "augment": {"crop_padding": 0, "flip": False}},
            "model": {"backbone": {"name": "smallcnn", "width": 4, "out_dim": 16}, "architecture": {"name": "hps"}},
            "train": {"epochs": 1, "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0, "log_every": 1},
            "balancing": method}


FAMILIES = [{"method": "equal"}, {"method": "uw"}, {"method": "famo"},  # one backward
            {"method": "imtl_g"}, {"method": "pcgrad"},  # feature-space Gramian methods (an absent task: a zero row)
            {"method": "upgrad", "space": "parameter"}]
ZERO_ROW_STOPS = [{"method": "mgda"}, {"method": "cagrad"}]


def _step_with_absent_tasks(root: Path, method: dict, out: Path) -> tuple[float, dict[str, float]]:
    """One step on the first batch (which leaves most tasks unlabelled): how far the trunk moved, task weights."""
    cfg = load_config(data=many_config(root, method))
    trainer = build_trainer(cfg, out, quiet=True)
    x, labels, rows = trainer.next_batch(0, 0)
    absent = [t for t, y in labels.items() if not (y >= 0).any()]
    assert len(absent) >= MANY - 16
    trunk = trainer.model.backbone
    before = [p.detach().clone() for p in trunk.parameters()]
    losses, _, weights = trainer.step_on(x, labels, rows, 0, 0)
    assert all(float(losses[t].detach()) == 0.0 for t in absent)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(trunk.parameters(), before))
    return moved, weights


@pytest.mark.parametrize("method", FAMILIES, ids=lambda m: "-".join(map(str, m.values())))
def test_fifty_tasks_with_absent_tasks_train(many_tasks, tmp_path, method):
    moved, weights = _step_with_absent_tasks(many_tasks, method, tmp_path / "step")
    assert moved > 0 and all(math.isfinite(w) for w in weights.values())
    summary = train(many_config(many_tasks, method), tmp_path / "run", quiet=True)
    assert len(summary["tasks"]) == MANY
    assert all(math.isfinite(t["test"]["loss"]) for t in summary["tasks"].values())


# an absent task is a zero row of the Gramian: left in, MGDA's min-norm point and CAGrad's worst-case
# direction would be 0 and the trunk would get no update; both leave such tasks out
@pytest.mark.parametrize("method", ZERO_ROW_STOPS, ids=lambda m: m["method"])
def test_min_norm_methods_move_the_trunk_when_a_task_is_absent(many_tasks, tmp_path, method):
    moved, _ = _step_with_absent_tasks(many_tasks, method, tmp_path / "step")
    assert moved > 0


# -- the real data -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_omniglot_as_50_tasks(shared_data, tmp_path):
    root = shared_data / "omniglot"
    cfg = load_config(CONFIGS / "omniglot50.yaml", overrides=[
        f"data.source.path={root}", "data.source.tasks.drawer={}", "data.limit_train=512", "data.limit_test=512",
        "train.epochs=1", "model.backbone.width=8"])
    meta = json.loads((root / "meta.json").read_text())
    names = meta["label_kinds"]["alphabet"]["names"]
    raw = load_raw(cfg.to_dict()["data"]["source"])
    assert [t.name for t in raw.tasks] == names + ["drawer"]
    for task in raw.tasks[:-1]:  # each alphabet's classes: its characters (meta.json's file id ranges)
        lo, hi = meta["alphabet_id_ranges"][task.name]
        assert task.classes == [str(c) for c in range(hi - lo + 1)]
    assert sum(t.num_classes for t in raw.tasks[:-1]) == 1623
    drawers = {}
    for split, n in (("train", 14), ("val", 2), ("test", 4)):
        s = getattr(raw, split)
        assert len(s) == 1623 * n
        labelled = np.stack([s.labels[a] != MISSING for a in names])
        assert (labelled.sum(0) == 1).all()  # every image is labelled for exactly one task
        drawers[split] = set(s.labels["drawer"].tolist())
    assert drawers == {"train": set(range(14)), "val": {14, 15}, "test": {16, 17, 18, 19}}

    cfg = load_config(CONFIGS / "omniglot50.yaml", overrides=[
        f"data.source.path={root}", "data.limit_train=512", "data.limit_test=256", "train.epochs=1",
        "model.backbone.width=8"])
    summary = train(cfg, tmp_path / "om50", quiet=True)
    assert len(summary["tasks"]) == 50
    assert all(math.isfinite(t["test"]["loss"]) for t in summary["tasks"].values())


def test_drop_unlabelled_keeps_a_single_task_run_to_its_own_rows(tmp_path):
    make_omniglot(tmp_path / "o")
    spec = source(tmp_path / "o", tasks={"character": {"key": "character_in_alphabet", "group_by": "alphabet"}})
    tasks = {name: {"enabled": name == "Greek"} for name in ALPHABETS}
    whole = build_data(load_config(data={"data": {"source": spec}, "tasks": tasks}))
    only = build_data(load_config(data={"data": {"source": spec, "drop_unlabelled": True}, "tasks": tasks}))
    g_whole, g_only = whole.groups[0], only.groups[0]
    for split in ("train", "val", "test"):
        labels = getattr(g_whole, split).labels["Greek"]
        kept = getattr(g_only, split).labels["Greek"]
        assert (labels == MISSING).any() and (kept != MISSING).all()  # Greek's rows only, all of them
        assert len(kept) == (labels != MISSING).sum()
    streamed = {"source": {"name": "shards", "path": str(tmp_path), "stream": True}, "drop_unlabelled": True}
    with pytest.raises(ConfigError, match="data.drop_unlabelled: not available with data.source.stream: true"):
        build_data(load_config(data={"data": streamed}))
