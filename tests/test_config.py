import pytest

from mtlvision.config import load_config
from mtlvision.errors import ConfigError


def test_defaults_and_overrides():
    cfg = load_config(data={"train": {"epochs": 3}}, overrides=["train.lr=0.2", "data.batch_size=32",
                                                                "model.backbone.width=0.5"])
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.2 and cfg.data.batch_size == 32
    assert cfg.model.backbone == {"name": "resnet18", "width": 0.5}


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(data={"train": {"epoch": 3}})
    msg = str(e.value)
    assert "train" in msg and "epoch" in msg and "epochs" in msg and "lr" in msg


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"train\.epochs: expected int, got 'ten'"):
        load_config(data={"train": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match=r"train\.optimizer: expected one of 'sgd' \| 'adamw'"):
        load_config(data={"train": {"optimizer": "lamb"}})


def test_yaml_file_and_env_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_DATA", "/data/x")
    p = tmp_path / "c.yaml"
    p.write_text("name: a\ndata:\n  source: {name: npz, path: '${MY_DATA}/mnist', tasks: [label]}\n"
                 "  cache_dir: ${UNSET_VAR_123:-/tmp/c}\n")
    cfg = load_config(p)
    assert cfg.data.source["path"] == "/data/x/mnist"
    assert cfg.data.cache_dir == "/tmp/c"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(overrides=["train.epochs"])


@pytest.mark.parametrize("section,spec,expect", [
    ("model.backbone", {"name": "resnet99"}, "unknown backbone 'resnet99'.*valid: resnet18, smallcnn"),
    ("model.backbone", {"name": "resnet18", "depth": 3}, r"model.backbone: unknown key\(s\) depth"),
    ("model.architecture", {"name": "task-features", "feature_dim": "x"}, "feature_dim: expected int"),
    ("balancing", {"method": "nope"}, "unknown balancing method 'nope'"),
    ("data.source", {"name": "shapes", "n_trian": 5}, r"unknown key\(s\) n_trian; valid keys: n_test, n_train"),
    ("data.source", {"name": "nosuch"}, "unknown data source 'nosuch'"),
])
def test_component_validation(tmp_path, section, spec, expect):
    from mtlvision.balancing import build_balancer
    from mtlvision.data import build_data
    from mtlvision.models import build_model
    from mtlvision.tasks import Task

    data = {}
    node = data
    *path, last = section.split(".")
    for k in path:
        node = node.setdefault(k, {})
    node[last] = spec
    cfg = load_config(data=data)
    tasks = [Task("a", ["x", "y"])]
    with pytest.raises(ConfigError, match=expect):
        if section.startswith("model"):
            build_model(cfg.model, tasks, (32, 32, 3))
        elif section == "balancing":
            build_balancer(cfg.balancing, tasks)
        else:
            build_data(cfg)
