"""Weight files for backbones: reading them safely and loading them with a report.

A file is safetensors or a PyTorch state dict (`.pth`/`.pt`, possibly inside a training checkpoint's
`state_dict` / `model` entry, its EMA weights where it has them), read by timm's `load_state_dict`, which calls
`torch.load(weights_only=True)`: a pickle holding Python objects other than tensors is refused, never
executed. Loading compares the file's tensors with the model's by name and shape: a tensor of another
shape, or a file none of whose names the model has, is an error naming them; missing and unexpected
names are reported (`LoadReport`, also issued as a warning).
"""
from __future__ import annotations

import contextlib
import dataclasses
import pickle
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ...errors import CheckpointError

_SHOWN = 8  # names listed in a message before "... and N more"


def _names(names: list[str]) -> str:
    more = f" ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What loading weights into a backbone did: tensors loaded, the model's tensors the weights lack
    (left at their initialisation) and the weights' tensors the model has no place for (ignored)."""

    source: str
    loaded: int
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()

    def summary(self) -> str:
        text = f"loaded {self.loaded} tensors from {self.source}"
        if self.missing:
            text += f"; {len(self.missing)} missing, left at their initialisation: {_names(list(self.missing))}"
        if self.unexpected:
            text += f"; {len(self.unexpected)} unexpected, ignored: {_names(list(self.unexpected))}"
        return text


def weights_path(value: str, where: str) -> Path:
    """The existing file `value` names (a CheckpointError naming `where` if there is none)."""
    path = Path(value).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{where}: no weights file at {path} (expected safetensors or a .pth/.pt state dict)")
    return path


def _globals(path: Path) -> str:
    """ (the Python objects a pickled checkpoint needs, as torch lists them), or nothing if torch cannot tell."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint (a bare pickle): the listing is a courtesy, the refusal stands
        return ""
    return f" ({', '.join(names)})" if names else ""


def read_state_dict(path: Path, where: str) -> dict[str, torch.Tensor]:
    """The tensors of weights file `path` by name (see the module docstring)."""
    from safetensors import SafetensorError
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path))
    except (pickle.UnpicklingError, SafetensorError, RuntimeError, EOFError, ValueError, OSError) as exc:
        if isinstance(exc, pickle.UnpicklingError) or isinstance(exc.__cause__, pickle.UnpicklingError):
            raise CheckpointError(
                f"{where}: {path} is refused: it is a pickle holding Python objects besides tensors{_globals(path)}, "
                "and unpickling them could run code. torch.load(weights_only=True) stopped before loading any. "
                "Use a file of tensors only: safetensors, or torch.save(model.state_dict(), path)") from exc
        raise CheckpointError(f"{where}: cannot read {path} as safetensors or a PyTorch state dict: "
                              f"{str(exc).splitlines()[0][:300]}") from exc
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)] if isinstance(state, Mapping) else ["(all)"]
    if bad:
        raise CheckpointError(f"{where}: {path} is not a state dict (a mapping of names to tensors): "
                              f"entries that are not tensors: {_names([str(b) for b in bad])}")
    return dict(state)


def check_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, where: str) -> int:
    """The number of `state`'s tensors `model` takes; a CheckpointError if any has another shape than the
    model's tensor of that name, or if none has a name the model has."""
    own = model.state_dict()
    common = sorted(own.keys() & state.keys())
    wrong = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
             for k in common if state[k].shape != own[k].shape]
    if wrong:
        raise CheckpointError(f"{where}: {source} does not fit the model: {len(wrong)} tensor(s) have another "
                              f"shape: {_names(wrong)}")
    if not common:
        raise CheckpointError(
            f"{where}: {source} matches nothing in the model: none of its {len(state)} tensor names is one of the "
            f"model's {len(own)} (file: {_names(sorted(state))}; model: {_names(sorted(own))}). "
            "Are these the weights of another model?")
    return len(common)


def _report(report: LoadReport) -> LoadReport:
    if report.missing or report.unexpected:
        warnings.warn(report.summary(), stacklevel=3)
    return report


def load_checked(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, where: str) -> LoadReport:
    """Load `state` into `model` after `check_state`; missing and unexpected names go into the report."""
    loaded = check_state(model, state, source, where)
    result = model.load_state_dict(state, strict=False)
    return _report(LoadReport(source, loaded, tuple(result.missing_keys), tuple(result.unexpected_keys)))


@contextlib.contextmanager
def watched_load(model: nn.Module, source: str, where: str) -> Iterator[list[LoadReport]]:
    """Within the block, a `load_state_dict` on `model` by library code (e.g. timm's `load_pretrained`, which
    first adapts the file's tensors to the model) is checked as `load_checked` checks it; its report is
    appended to the yielded list."""
    reports: list[LoadReport] = []
    loaded: list[int] = []

    def before(module, state, prefix, *args) -> None:
        if not prefix:
            loaded.append(check_state(module, state, source, where))

    def after(module, result) -> None:
        reports.append(_report(LoadReport(source, loaded[-1], tuple(result.missing_keys),
                                          tuple(result.unexpected_keys))))

    hooks = [model.register_load_state_dict_pre_hook(before), model.register_load_state_dict_post_hook(after)]
    try:
        yield reports
    finally:
        for h in hooks:
            h.remove()


def torchvision_state_dict(weights: Any, where: str) -> dict[str, torch.Tensor]:
    """A torchvision weights enum's state dict, downloaded once into torch's cache by torchvision's own code;
    without network, a CheckpointError saying how to use a local file instead."""
    try:
        return weights.get_state_dict(progress=True)
    except OSError as exc:
        raise CheckpointError(
            f"{where}: cannot download torchvision's {type(weights).__name__}.{weights.name} from {weights.url}: "
            f"{str(exc).splitlines()[0][:300]}. Without network, download that file on a machine with network, copy "
            "it here and give its path as model.backbone.weights (name: torchvision), or copy it into torch's "
            "cache (~/.cache/torch/hub/checkpoints)") from exc
