"""One label key split into one task per group (`group_by`): e.g. Omniglot's `character_in_alphabet` grouped
by `alphabet` gives one task per alphabet, each classifying the characters of its own alphabet.

A group's task is named after the group key's class name in meta.json (`Latin`), else `NAME_VALUE`; its
classes are the key's values that occur in the group's rows of any split, in increasing order, named by
meta.json where it names the key's classes, else by the values themselves. Rows of other groups (and rows
whose group or key is -1) are missing (-1) for the task.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import numpy as np

from ...errors import ConfigError, DataError
from ...tasks import MISSING, Task
from ..arrays import check_labels
from . import listing
from .npz_files import Split


def _names(values: np.ndarray, info: dict, what: str) -> Optional[list[str]]:
    """meta.json's names of `values` (None when it names none), refusing a value it has no name for."""
    names = info.get("names")
    if not names:
        return None
    if len(values) and (values.min() < 0 or values.max() >= len(names)):
        bad = values[(values < 0) | (values >= len(names))]
        raise DataError(f"{what}: value {int(bad[0])} has no name in meta.json ({len(names)} names)")
    return [str(names[v]) for v in values]


def _pick(values: np.ndarray, names: list[str], wanted: Optional[list[Union[int, str]]], key: str,
          group_by: str) -> list[int]:
    """Positions in `values` of the groups named by `groups` (values or names), in the order given."""
    if wanted is None:
        return list(range(len(values)))
    picked: list[int] = []
    for g in wanted:
        hits = np.flatnonzero(values == g) if isinstance(g, int) else [names.index(g)] if g in names else []
        if not len(hits):
            raise DataError(f"{key}.groups: {g!r} is not a value of {group_by!r} "
                            f"(values: {listing([f'{v} {n}' for v, n in zip(values.tolist(), names)], 8)})")
        if int(hits[0]) in picked:
            raise DataError(f"{key}.groups: {g!r} is named twice ({values[hits[0]]} {names[hits[0]]})")
        picked.append(int(hits[0]))
    return picked


def grouped_tasks(name: str, spec, key: str, meta: dict[str, dict], splits: dict[str, Split], where: str,
                  warn: Callable[[str], None]) -> list[tuple[Task, dict[str, np.ndarray]]]:
    """The tasks of one `group_by` spec and each one's labels per split. `key` is the label key, `where`
    the spec's config key (`data.source.tasks.NAME`)."""
    for opt in ("bins", "classes", "num_classes"):
        if getattr(spec, opt) is not None:
            raise ConfigError(f"{where}.{opt}: not used with group_by (each group's classes are the values of "
                              f"{key!r} its rows have)")
    if spec.group_by not in splits["train"].raw:
        raise DataError(f"{where}.group_by: {spec.group_by!r} is not a key of {splits['train'].where} "
                        f"(keys: {sorted(k for k in splits['train'].raw if k != 'images')})")
    at = f"{where}, key {key!r}"
    keys, groups = {}, {}
    for s, sp in splits.items():
        if spec.group_by not in sp.raw:
            raise DataError(f"{where}.group_by: {spec.group_by!r} is in {splits['train'].where} but not in "
                            f"{sp.where}")
        keys[s] = check_labels(sp.raw[key], None, name, at, sp.rows)
        groups[s] = check_labels(sp.raw[spec.group_by], None, name, f"{where}.group_by {spec.group_by!r}", sp.rows)
    values = np.unique(np.concatenate(list(groups.values())))
    values = values[values != MISSING]
    names = _names(values, meta.get(spec.group_by, {}), f"{where}.group_by {spec.group_by!r}") or [
        f"{name}_{v}" for v in values.tolist()]
    out = []
    for i in _pick(values, names, spec.groups, where, spec.group_by):
        g, task_name = values[i], names[i]
        member = {s: (groups[s] == g) & (keys[s] != MISSING) for s in splits}
        classes = np.unique(np.concatenate([keys[s][member[s]] for s in splits]))
        if len(classes) < 2:
            raise DataError(f"{at}: group {task_name!r} ({spec.group_by} = {g}) has {len(classes)} value(s) of "
                            f"{key!r} ({classes.tolist()}); a task needs at least 2 classes")
        labels = {}
        for s in splits:
            lab = np.full(len(keys[s]), MISSING, np.int64)
            lab[member[s]] = np.searchsorted(classes, keys[s][member[s]])
            labels[s] = lab
        unseen = np.setdiff1d(np.arange(len(classes)), labels["train"])
        if len(unseen):
            warn(f"{at}: task {task_name!r} has {len(unseen)} class(es) with no training row: "
                 f"{listing([str(c) for c in classes[unseen].tolist()], 10)}")
        class_names = _names(classes, meta.get(key, {}), at) or [str(c) for c in classes.tolist()]
        try:
            task = Task(task_name, class_names, flip_ok=spec.flip_ok)
        except DataError as exc:
            raise DataError(f"{at}: group {g}: {exc}") from None
        out.append((task, labels))
    return out
