"""The `hf` source (Hugging Face `datasets`) on small parquet / arrow / image files made in tmp_path. No
network: the Hub is met in offline mode or through a stand-in builder."""
from __future__ import annotations

import io
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

datasets = pytest.importorskip("datasets")

from mtlvision.config import load_config  # noqa: E402
from mtlvision.data import SOURCES, build_data  # noqa: E402
from mtlvision.data.sources.hf import HfSource  # noqa: E402
from mtlvision.errors import ConfigError, DataError  # noqa: E402
from mtlvision.training import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NAN = float("nan")
FEATURES = datasets.Features({
    "image": datasets.Image(),
    "smiling": datasets.Value("bool"),
    "age": datasets.ClassLabel(names=["young", "middle", "old"]),
    "colour": datasets.Value("string"),
    "male": datasets.Value("int64"),  # CelebA's -1 / 1
    "glasses": datasets.Value("float64"),  # 0 / 1 with NaN for missing, as pandas writes it
})
TRAIN = {"smiling": [True, False, None, True, False, True], "age": [0, 2, -1, None, 1, 0],
         "colour": ["red", None, "blue", "red", "green", "blue"], "male": [-1, 1, 1, -1, None, 1],
         "glasses": [0.0, 1.0, NAN, None, 1.0, 0.0]}
TEST = {"smiling": [False, True, True], "age": [2, 1, 0], "colour": ["blue", "red", None],
        "male": [1, -1, -1], "glasses": [1.0, 0.0, 0.0]}


@pytest.fixture(autouse=True)
def _caches(tmp_path, monkeypatch):
    """mtlvision's decoded cache and `datasets`' Arrow cache private to each test."""
    monkeypatch.setenv("MTLVISION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def png(value: int, size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write(path: Path, columns: dict, features=FEATURES, images=None) -> Path:
    """A parquet file of `columns` plus an image column (image i is uniformly 10 * i)."""
    n = len(next(iter(columns.values())))
    images = images if images is not None else [{"bytes": png(10 * i), "path": None} for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"image": images, **columns}, features=features).to_parquet(str(path))
    return path


def folder(tmp_path: Path, train=TRAIN, test=TEST, features=FEATURES) -> Path:
    write(tmp_path / "d" / "train.parquet", train, features)
    write(tmp_path / "d" / "test.parquet", test, features)
    return tmp_path / "d"


def load_raw(source: dict, image_size=None):
    """The source on its own: no cache, no validation split carved from train."""
    return SOURCES.build(SOURCES.spec(source, "data.source"), image_size=image_size).load()


def test_label_columns_become_tasks_with_classes_and_missing_labels(tmp_path):
    data = load_raw({"name": "hf", "path": str(folder(tmp_path))})
    classes = {t.name: t.classes for t in data.tasks}
    assert classes == {"smiling": ["false", "true"], "age": ["young", "middle", "old"],
                       "colour": ["blue", "green", "red"], "male": ["-1", "1"], "glasses": ["0", "1"]}
    assert all(t.kind == "binary" for t in data.tasks if t.name != "age" and t.name != "colour")
    expect = {"smiling": [1, 0, -1, 1, 0, 1], "age": [0, 2, -1, -1, 1, 0], "colour": [2, -1, 0, 2, 1, 0],
              "male": [0, 1, 1, 0, -1, 1], "glasses": [0, 1, -1, -1, 1, 0]}
    for name, labels in expect.items():
        assert data.train.labels[name].tolist() == labels, name
    assert data.test.labels["colour"].tolist() == [0, 2, -1] and data.test.labels["male"].tolist() == [1, 0, 0]
    assert data.val is None and data.train.images.shape == (6, 8, 8, 3)
    assert data.train.images[:, 0, 0, 0].tolist() == [0, 10, 20, 30, 40, 50]  # row order kept


def test_declared_classes_set_the_order_and_reject_other_values(tmp_path):
    path = str(folder(tmp_path))
    data = load_raw({"name": "hf", "path": path, "tasks": {
        "hue": {"column": "colour", "classes": ["red", "green", "blue", "purple"], "flip_ok": False}}})
    (task,) = data.tasks
    assert (task.name, task.classes, task.flip_ok) == ("hue", ["red", "green", "blue", "purple"], False)
    assert data.train.labels["hue"].tolist() == [0, -1, 2, 0, 1, 2]
    with pytest.raises(DataError, match=r"tasks\.colour: column 'colour' .*split 'train', row 4\): value "
                                        r"'green' is not a class; expected one of \['red', 'blue'\] \(declared"):
        load_raw({"name": "hf", "path": path, "tasks": {"colour": {"classes": ["red", "blue"]}}})


def test_a_test_value_never_trained_on_is_an_error(tmp_path):
    path = folder(tmp_path, test={**TEST, "colour": ["blue", "purple", None]})
    with pytest.raises(DataError, match=r"split 'test', row 1\): value 'purple' is not a class"):
        load_raw({"name": "hf", "path": str(path), "tasks": ["colour"]})


def test_a_missing_label_column_lists_the_columns(tmp_path):
    with pytest.raises(DataError, match=r"tasks\.Smiling: column 'Smiling' not in .* split 'train' \(columns: "
                                        r"\['image', 'smiling', 'age', 'colour', 'male', 'glasses'\]\)"):
        load_raw({"name": "hf", "path": str(folder(tmp_path)), "tasks": ["Smiling"]})
    with pytest.raises(ConfigError, match=r"exclude: no column\(s\) \['colur'\]"):
        load_raw({"name": "hf", "path": str(folder(tmp_path)), "exclude": ["colur"]})


def test_columns_that_are_not_labels(tmp_path):
    feats = datasets.Features({"image": datasets.Image(), "score": datasets.Value("float32"),
                               "boxes": datasets.Sequence(datasets.Value("int64"))})
    path = folder(tmp_path, {"score": [1.0, 0.5], "boxes": [[1], [2]]}, {"score": [1.0, 0.0], "boxes": [[], []]},
                  feats)
    with pytest.raises(DataError, match=r"column 'score' .*split 'train', row 1\): value 0.5 is not a label"):
        load_raw({"name": "hf", "path": str(path), "tasks": ["score"]})
    infinite = folder(tmp_path / "inf", {"score": [1.0, float("inf")]}, {"score": [1.0, 0.0]},
                      datasets.Features({"image": datasets.Image(), "score": datasets.Value("float64")}))
    with pytest.raises(DataError, match=r"row 1\): value inf is not a label"):
        load_raw({"name": "hf", "path": str(infinite)})
    with pytest.raises(DataError, match=r"column 'boxes' of .* not a label .*exclude: \[boxes\]"):
        load_raw({"name": "hf", "path": str(path), "exclude": ["score"]})
    many = {"smiling": [True] * 12, "id": list(range(12))}
    feats = datasets.Features({"image": datasets.Image(), "smiling": datasets.Value("bool"),
                               "id": datasets.Value("int64")})
    path = folder(tmp_path / "ids", many, many, feats)
    with pytest.raises(DataError, match=r"column 'id' .* has 12 distinct values, more than "
                                        r"data.source.max_classes \(10\)"):
        load_raw({"name": "hf", "path": str(path), "max_classes": 10})


def test_images_that_do_not_decode_name_the_row_and_file(tmp_path):
    rows = [{"bytes": png(0), "path": None}, {"bytes": png(10), "path": None},
            {"bytes": b"not an image", "path": "face_3.jpg"}, {"bytes": png(30), "path": None}]
    cols = {"smiling": [True, False, True, False]}
    feats = datasets.Features({"image": datasets.Image(), "smiling": datasets.Value("bool")})
    write(tmp_path / "d" / "train.parquet", cols, feats, rows)
    write(tmp_path / "d" / "test.parquet", cols, feats)
    src = {"name": "hf", "path": str(tmp_path / "d")}
    with pytest.raises(DataError, match=r"split 'train' row 2 \(face_3.jpg\): cannot decode image"):
        load_raw(src)
    data = load_raw({**src, "skip_corrupt": True})
    assert len(data.skipped) == 1 and "row 2" in data.skipped[0]
    assert data.train.labels["smiling"].tolist() == [1, 0, 0]  # the labels of the rows kept
    assert data.train.images[:, 0, 0, 0].tolist() == [0, 10, 30]


def test_image_paths_column_relative_to_the_folder(tmp_path):
    root = tmp_path / "d"
    (root / "img").mkdir(parents=True)
    for i in range(3):
        (root / "img" / f"{i}.png").write_bytes(png(10 * i, (12, 10)))
    feats = datasets.Features({"file": datasets.Value("string"), "smiling": datasets.Value("bool")})
    for split, files in (("train", ["img/0.png", "img/1.png"]), ("test", ["img/2.png", "img/missing.png"])):
        datasets.Dataset.from_dict({"file": files, "smiling": [True, False]}, features=feats).to_parquet(
            str(root / f"{split}.parquet"))
    src = {"name": "hf", "path": str(root), "image_column": "file", "tasks": ["smiling"]}
    with pytest.raises(DataError, match=r"split 'test' row 1 \(img/missing.png\): cannot read file"):
        load_raw(src)
    data = load_raw({**src, "test": "test[:1]"}, image_size=8)
    assert data.train.images.shape == (2, 8, 8, 3) and data.test.images[0, 0, 0, 0] == 20


def test_image_bytes_column(tmp_path):
    feats = datasets.Features({"jpeg": datasets.Value("binary"), "age": datasets.ClassLabel(names=["a", "b"])})
    for split, ages in (("train", [0, 1, 1]), ("test", [1, -1])):
        datasets.Dataset.from_dict({"jpeg": [png(10 * i) for i in range(len(ages))], "age": ages},
                                   features=feats).to_parquet(str(tmp_path / "d" / f"{split}.parquet"))
    data = load_raw({"name": "hf", "path": str(tmp_path / "d"), "image_column": "jpeg"})
    assert data.train.images[:, 0, 0, 0].tolist() == [0, 10, 20] and data.train.labels["age"].tolist() == [0, 1, 1]
    assert data.test.labels["age"].tolist() == [1, -1]


def test_split_names_slices_and_empty_splits(tmp_path):
    path = str(write(tmp_path / "all.parquet", TRAIN))  # one file: the split `train`
    data = load_raw({"name": "hf", "path": path, "train": "train[:4]", "val": "train[4:5]",
                     "test": "train[5:]", "tasks": ["smiling"]})
    assert [len(data.train), len(data.val), len(data.test)] == [4, 1, 1]
    with pytest.raises(ConfigError, match=r"data.source.val: split 'valid' of .*Unknown split \"valid\". "
                                          r"Should be one of \['train'\]"):
        load_raw({"name": "hf", "path": path, "val": "valid", "test": "train"})
    with pytest.raises(DataError, match=r"data.source.test: split 'train\[6:\]' of .* has no rows"):
        load_raw({"name": "hf", "path": path, "test": "train[6:]"})


def test_save_to_disk_arrow_files_and_imagefolder(tmp_path):
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict(
        {"image": [{"bytes": png(10 * i), "path": None} for i in range(len(c["age"]))], **c}, features=FEATURES)
        for s, c in (("train", TRAIN), ("test", TEST))})
    dd.save_to_disk(str(tmp_path / "saved"))
    a = load_raw({"name": "hf", "path": str(tmp_path / "saved"), "tasks": ["age", "colour"]})
    b = load_raw({"name": "hf", "path": "arrow", "tasks": ["age", "colour"], "data_files": {
        "train": str(tmp_path / "saved" / "train" / "*.arrow"), "test": str(tmp_path / "saved" / "test" / "*.arrow")}})
    for x in (a, b):
        assert x.train.labels["age"].tolist() == [0, 2, -1, -1, 1, 0] and x.tasks[1].classes == ["blue", "green", "red"]
    with pytest.raises(ConfigError, match="data.source.subset: not used with a save_to_disk folder"):
        load_raw({"name": "hf", "path": str(tmp_path / "saved"), "subset": "x"})
    for split, names in (("train", ["cat", "dog", "dog"]), ("test", ["cat", "dog"])):
        for i, c in enumerate(names):
            (tmp_path / "folder" / split / c).mkdir(parents=True, exist_ok=True)
            (tmp_path / "folder" / split / c / f"{i}.png").write_bytes(png(10 * i))
    data = load_raw({"name": "hf", "path": str(tmp_path / "folder")})
    assert [(t.name, t.classes) for t in data.tasks] == [("label", ["cat", "dog"])]
    assert sorted(data.train.labels["label"].tolist()) == [0, 1, 1]


def test_decoded_once_then_reused_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    path = folder(tmp_path)
    calls = []
    original = HfSource.load
    monkeypatch.setattr(HfSource, "load", lambda self: calls.append(1) or original(self))
    cfg = load_config(data={"data": {"source": {"name": "hf", "path": str(path), "tasks": ["smiling"]},
                                     "val_fraction": 0.2}})
    first, second = build_data(cfg), build_data(cfg)
    assert len(calls) == 1 and len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 1
    assert np.array_equal(first.groups[0].test.labels["smiling"], second.groups[0].test.labels["smiling"])
    write(path / "test.parquet", {**TEST, "smiling": [True, True, False]})
    st = (path / "test.parquet").stat()
    os.utime(path / "test.parquet", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later mtime
    third = build_data(cfg)
    assert len(calls) == 2 and len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 2
    assert third.groups[0].test.labels["smiling"].tolist() == [1, 1, 0]


def test_without_datasets_installed_the_error_says_what_to_install(tmp_path, monkeypatch):
    path = str(folder(tmp_path))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(DataError, match=r"pip install 'mtlvision\[hf\]'"):
        build_data(load_config(data={"data": {"source": {"name": "hf", "path": path}}}))


def test_hub_without_network_says_how_to_use_local_files(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # what no network looks like, at once
    with pytest.raises(DataError, match=r"no local .*someone/faces, and cannot reach 'someone/faces' on the "
                                        r"Hugging Face Hub .*huggingface-cli "
                                        r"download someone/faces --repo-type dataset --local-dir DIR"):
        load_raw({"name": "hf", "path": "someone/faces"})
    with pytest.raises(DataError, match=r"'\./faces' does not exist .*not a Hugging Face Hub id"):
        load_raw({"name": "hf", "path": "./faces"})


def test_hub_fingerprint_is_the_commit_datasets_resolved(monkeypatch):
    seen = []

    def builder(path, name, data_files=None, revision=None):
        seen.append((path, name, data_files, revision))
        return types.SimpleNamespace(cache_dir=f"/hf/someone___faces/{name}/0.0.0/{commit}")

    monkeypatch.setattr(datasets, "load_dataset_builder", builder)
    params = SOURCES.spec({"name": "hf", "path": "someone/faces", "subset": "attrs", "revision": "main"}, "s").params
    commit = "a" * 40
    first = HfSource(params).fingerprint()
    commit = "b" * 40  # main moved on
    second = HfSource(params).fingerprint()
    assert first != second and first["hub"] == ["attrs", "0.0.0", "a" * 40]
    assert seen[0] == ("someone/faces", "attrs", None, "main")


def test_parameters_are_checked_by_key():
    with pytest.raises(ConfigError, match=r"data.source: unknown key\(s\) name_; valid keys: .*subset"):
        load_config(data={"data": {"source": {"name": "hf", "path": "x", "name_": "attrs"}}})
    with pytest.raises(ConfigError, match=r"data.source.tasks: expected 'all' \| list of str \| mapping"):
        load_config(data={"data": {"source": {"name": "hf", "path": "x", "tasks": "some"}}})
    with pytest.raises(ConfigError, match=r"data.source.revision: only for Hub datasets"):
        load_raw({"name": "hf", "path": str(REPO), "revision": "main"})


CELEBA_ATTRIBUTES = [
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young"]


def celeba_mirror(root: Path) -> Path:
    """A tiny local copy laid out like the Hub repository flwrlabs/celeba: a card declaring the subset
    `img_align+identity+attr` with splits train / valid / test, and its parquet files, in its schema."""
    subset = "img_align+identity+attr"
    feats = datasets.Features({"image": datasets.Image(), "celeb_id": datasets.Value("int64"),
                               **{a: datasets.Value("bool") for a in CELEBA_ATTRIBUTES}})
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("valid", 8), ("test", 8)):
        cols = {"celeb_id": rng.integers(1, 10178, n).tolist(),
                **{a: (rng.random(n) < 0.4).tolist() for a in CELEBA_ATTRIBUTES}}
        images = [{"bytes": png(int(v), (18, 22)), "path": None} for v in rng.integers(0, 256, n)]
        write(root / subset / f"{split}-00000-of-00001.parquet", cols, feats, images)
    card = {"configs": [{"config_name": subset, "data_files": [
        {"split": s, "path": f"{subset}/{s}-*"} for s in ("train", "valid", "test")]}]}
    (root / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n# CelebA (test copy)\n")
    return root


def test_celeba_config_validates_and_trains_on_a_local_copy(tmp_path):
    cfg = load_config(REPO / "configs" / "celeba.yaml")
    assert cfg.data.source["path"] == "flwrlabs/celeba" and cfg.data.image_size == 64
    root = celeba_mirror(tmp_path / "celeba")
    cfg = load_config(REPO / "configs" / "celeba.yaml", overrides=[
        f"data.source.path={root}", "data.source.revision=null", "data.image_size=16", "data.batch_size=16",
        "data.eval_batch_size=64", "model.backbone={name: smallcnn, width: 4, out_dim: 16}",
        "train.epochs=1", "train.log_every=1"])
    bundle = build_data(cfg)
    assert [t.name for t in bundle.tasks] == CELEBA_ATTRIBUTES  # celeb_id excluded
    assert all(t.classes == ["false", "true"] for t in bundle.tasks)
    s = bundle.groups[0]
    assert (len(s.train), len(s.val), len(s.test)) == (40, 8, 8) and s.train.images.shape[1:] == (16, 16, 3)
    summary = train(cfg, tmp_path / "run", quiet=True)
    assert sorted(summary["tasks"]) == sorted(CELEBA_ATTRIBUTES)
