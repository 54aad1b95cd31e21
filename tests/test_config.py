import pytest

from mtlvision.config import load_config
from mtlvision.errors import ConfigError


def test_defaults_and_overrides():
    cfg = load_config(data={"train": {"epochs": 3}}, overrides=["train.lr=0.2", "data.batch_size=32",
                                                                "model.backbone.width=0.5"])
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.2 and cfg.data.batch_size == 32
    assert cfg.model.backbone.to_config(full=False) == {"name": "resnet18", "width": 0.5}


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
    assert cfg.data.source.params.path == "/data/x/mnist"
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
    with pytest.raises(ConfigError, match=expect):  # at load time, before any data is read
        load_config(data=data)
    # the builders validate too (a Config can be built in code without load_config)
    cfg = load_config()
    owner = {"model.backbone": cfg.model, "model.architecture": cfg.model, "balancing": cfg,
             "data.source": cfg.data}[section]
    setattr(owner, last, spec)
    tasks = [Task("a", ["x", "y"])]
    with pytest.raises(ConfigError, match=expect):
        if section.startswith("model"):
            build_model(cfg.model, tasks, (32, 32, 3))
        elif section == "balancing":
            build_balancer(cfg.balancing, tasks)
        else:
            build_data(cfg)


@pytest.mark.parametrize("override,expect", [
    ("data.batch_size=0", r"data.batch_size: expected > 0, got 0"),
    ("data.val_fraction=1.5", r"data.val_fraction: expected a value in \(0, 1\)"),
    ("data.augment.crop_padding=-1", r"data.augment.crop_padding: expected >= 0"),
    ("train.epochs=0", r"train.epochs: expected >= 1"),
    ("train.lr=-0.1", r"train.lr: expected > 0"),
    ("tasks.a.label_smoothing=1.5", r"label_smoothing: expected in \[0, 1\)"),
    ("data.eval_batch_size=0", r"data.eval_batch_size: expected > 0"),
    ("train.grad_clip=0", r"train.grad_clip: expected > 0 or null"),
])
def test_value_ranges_are_checked(override, expect):
    with pytest.raises(ConfigError, match=expect):
        load_config(overrides=[override])


def test_components_are_validated_at_load_time():
    """Bad component parameters fail before any data is decoded."""
    with pytest.raises(ConfigError, match=r"model.head: unknown key\(s\) hiden"):
        load_config(data={"model": {"head": {"name": "mlp", "hiden": 3}}})
    with pytest.raises(ConfigError, match=r"balancing.weights: expected mapping of float"):
        load_config(data={"balancing": {"method": "fixed", "weights": [1, 2]}})


def test_nested_union_errors_name_the_inner_key():
    with pytest.raises(ConfigError, match=r"data.source.tasks.age.bin.*unknown key|unknown key\(s\) bin"):
        load_config(data={"data": {"source": {"name": "npz", "path": ".", "tasks": {"age": {"bin": [0, 1]}}}}})


def test_set_creates_multi_input_sources_and_bad_yaml_value():
    cfg = load_config(overrides=["data.sources.a.name=shapes", "data.sources.b.name=shapes"])
    assert set(cfg.data.sources) == {"a", "b"}
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(overrides=["train.lr=[1,"])


def test_device_is_validated():
    from mtlvision.device import resolve_device

    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="train.device: expected auto, cpu, cuda or cuda:N, got 'gpu'"):
        resolve_device("gpu")
