"""What a training checkpoint holds, and how a trainer is put back into the state it describes.

checkpoint.pt: epoch, wall time, best epoch so far, config, tasks, input spec, model, optimiser, schedule,
balancer (parameters, buffers and extra state), RNG states, world size and every stateful callback's state.
best.pt: the best epoch's weights with tasks, input spec and config (what evaluate, predict and export load).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointError
from ..rundir import config_differences

if TYPE_CHECKING:
    from .trainer import Trainer

KEYS = ("epoch", "wall_time_s", "best", "config", "tasks", "input", "model", "optimizer", "scheduler", "balancer",
        "balancer_extra", "rng")


def best_state(tr: "Trainer", epoch: int) -> dict[str, Any]:
    return {"model": tr.eval_model.state_dict(), "epoch": epoch, "tasks": [t.to_dict() for t in tr.tasks],
            "input": tr.parts.input_spec, "config": tr.cfg.to_dict()}


def capture(tr: "Trainer", epoch: int, wall: float) -> dict[str, Any]:
    return {
        "epoch": epoch, "wall_time_s": wall, "best": tr.best, "config": tr.cfg.to_dict(),
        "tasks": [t.to_dict() for t in tr.tasks], "input": tr.parts.input_spec,
        "model": tr.model.state_dict(), "optimizer": tr.optimizer.state_dict(),
        "scheduler": tr.scheduler.state_dict(), "balancer": tr.balancer.state_dict(),
        "balancer_extra": tr.balancer.extra_state(), "world_size": tr.dist.world_size,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if tr.device.type == "cuda" else []},
        "callbacks": {cb.key: cb.state_dict() for cb in tr.callbacks if cb.key},
        "finetune": tr.parts.finetune.state_dict(),
    }


def restore(tr: "Trainer") -> None:
    """Load the run directory's checkpoint into the trainer, refusing one that does not match the run."""
    path = tr.run.checkpoint_path
    ckpt = tr.run.load_checkpoint(KEYS)
    diff = config_differences(ckpt["config"], tr.cfg)
    if diff:
        raise CheckpointError(f"{path} does not match the config; differing keys: {', '.join(diff[:12])}")
    if ckpt.get("world_size", 1) != tr.dist.world_size:  # the global batch, steps and schedule would change
        raise CheckpointError(f"{path} was written by a run of {ckpt.get('world_size', 1)} process(es); "
                              f"resume it with as many (this is {tr.dist.world_size})")
    saved = ckpt.get("callbacks", {})
    for cb in tr.callbacks:
        if cb.key and cb.key not in saved:
            raise CheckpointError(f"{path} holds no {cb.key} state to continue from; start it in a new --out")
    try:
        tr.model.load_state_dict(ckpt["model"])
        tr.balancer.load_state_dict(ckpt["balancer"])
        tr.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path} does not match the model: {exc}") from None
    tr.scheduler.load_state_dict(ckpt["scheduler"])
    tr.parts.finetune.load_state_dict(ckpt.get("finetune", {}))
    tr.balancer.load_extra_state(ckpt["balancer_extra"])
    for cb in tr.callbacks:
        if cb.key:
            cb.load_state_dict(saved[cb.key])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    # normalise with the statistics the run started with (its input spec), as predict and export do
    spec = {**tr.parts.input_spec, **ckpt["input"]}
    tr.parts.input_spec = spec
    tr.normalize = tr.parts.normalize = type(tr.normalize)(spec["mean"], spec["std"], tr.device,
                                                           tr.cfg.train.channels_last)
    tr.start_epoch, tr.wall_before, tr.best = ckpt["epoch"] + 1, ckpt["wall_time_s"], ckpt["best"]
    if tr.dist.is_main:
        tr.run.truncate_metrics(ckpt["epoch"])
    tr.progress.message(f"resumed {tr.run.path} after epoch {ckpt['epoch'] + 1}")


def _effective_batches(tr: "Trainer") -> dict[str, int]:
    """Input groups whose batches are smaller than data.batch_size (their training split is smaller)."""
    return {g.name: ld.batch_size for g, ld in zip(tr.data.groups, tr.loaders)
            if ld.batch_size != tr.cfg.data.batch_size}


def run_facts(tr: "Trainer") -> dict[str, Any]:
    """Summary entries that say how the run was set up: normalisation, smaller batches, data warnings."""
    facts: dict[str, Any] = {"normalization": tr.parts.input_spec.get("normalization")}
    smaller = _effective_batches(tr)
    if smaller:
        facts["effective_batch_size"] = smaller
    if tr.data.warnings:
        facts["data_warnings"] = tr.data.warnings
    return facts


def describe(tr: "Trainer") -> str:
    """The run's first lines: tasks with their class counts, sizes, device, and anything adjusted or ignored."""
    groups = tr.data.groups
    tasks = ", ".join(f"{t.name} ({t.num_classes})" for t in tr.tasks)
    n_params = sum(p.numel() for p in tr.model.parameters())
    lines = [f"{len(tr.tasks)} task(s) (classes): {tasks}  |  {n_params / 1e6:.2f}M parameters  |  "
             f"{sum(g.train_size for g in groups)} train{' (streamed)' if groups[0].streamed else ''} / "
             f"{sum(len(g.val) for g in groups)} val / {sum(len(g.test) for g in groups)} test images  |  "
             f"device {tr.device}" + (f" x {tr.dist.world_size} ranks" if tr.dist.active else ""),
             f"input normalisation: {tr.parts.input_spec.get('normalization')}"]
    report = getattr(tr.model.backbone, "weights_report", None)
    if report is not None:
        lines.append(f"backbone weights: {report.summary()}")
    for name, size in _effective_batches(tr).items():
        lines.append(f"note: input {name!r} has fewer training images than data.batch_size "
                     f"{tr.cfg.data.batch_size}: its batches have {size} (recorded in summary.json)")
    lines += [f"note: {w}" for w in tr.data.warnings]
    return "\n".join(lines)
