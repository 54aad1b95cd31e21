"""`mtlvision report`: run and bench reports (self-contained HTML, Markdown + PNGs), confusion matrices
checked against independently computed accuracies, graceful skips and errors, and a browser render."""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

import mtlvision
from conftest import tiny_config
from mtlvision import bench
from mtlvision.cli import build_parser, main
from mtlvision.config import load_config
from mtlvision.errors import MTLVisionError
from mtlvision.reports import run_report, write_report
from mtlvision.reports.document import Figure, Link, Report, Section, Table, Text
from mtlvision.reports.html import render_html
from mtlvision.tasks import Task
from mtlvision.training import train

RUN_SECTIONS = ["Summary", "Learning curves", "Task weights", "Gradients", "Test-set evaluation", "Test images",
                "Configuration"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA_PNG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
MD_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-epoch MGDA run (gradient telemetry), reported once into RUN/report."""
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:  # module fixtures run before the autouse cache fixture
        mp.setenv("MTLVISION_CACHE", str(root / "cache"))
        train(load_config(data=tiny_config(balancing={"method": "mgda"})), root / "run", quiet=True)
        write_report(root / "run")
    return root / "run"


def test_run_report_html_is_one_self_contained_page(run_dir):
    html = (run_dir / "report" / "report.html").read_text()
    for title in RUN_SECTIONS:
        assert f"<h2>{title}</h2>" in html, title
    sources = re.findall(r"""src\s*=\s*["']?([^"' >]*)""", html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in html and "<script" not in html and "url(" not in html
    pngs = [base64.b64decode(p) for p in DATA_PNG.findall(html)]
    # 4 learning curves, task weights, gradient cosines, gradient norms, 4 confusion matrices,
    # 4 per-class accuracy bar charts, 1 test image grid
    assert len(pngs) == 16 and all(p.startswith(PNG_MAGIC) for p in pngs)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"{100 * summary['tasks']['position']['test']['accuracy']:.2f}%" in html


def test_run_report_markdown_references_png_files_beside_it(run_dir):
    folder = run_dir / "report"
    md = (folder / "report.md").read_text()
    refs = MD_IMAGE.findall(md)
    assert len(refs) == 16 and len(set(refs)) == 16
    assert sorted(refs) == sorted(p.name for p in folder.glob("*.png"))
    html_pngs = [base64.b64decode(p) for p in DATA_PNG.findall((folder / "report.html").read_text())]
    assert [(folder / r).read_bytes() for r in refs] == html_pngs  # same figures, same order
    for title in RUN_SECTIONS:
        assert f"## {title}" in md


def test_confusion_matrices_are_row_normalised_and_match_independent_accuracy(run_dir):
    run = mtlvision.load(run_dir)
    splits = run.load_split("test")
    evals = run_report.evaluate_test(run, splits)
    data = splits[0][0]
    preds = run.predict(list(data.images.numpy()))
    summary = json.loads((run_dir / "summary.json").read_text())
    for name, ev in evals.items():
        rows = ev.normalised.sum(1)
        np.testing.assert_allclose(rows[ev.support > 0], 1.0)
        truth = data.labels[name].numpy()
        guess = np.array([ev.task.classes.index(p[name][0][0]) for p in preds])
        assert ev.confusion.sum() == len(truth)
        assert np.trace(ev.confusion) / ev.confusion.sum() == pytest.approx(np.mean(guess == truth))
        assert np.mean(guess == truth) == pytest.approx(summary["tasks"][name]["test"]["accuracy"])
        for c in range(ev.task.num_classes):
            if (truth == c).any():
                assert ev.per_class_accuracy[c] == pytest.approx(np.mean(guess[truth == c] == c))


def test_many_classes_get_a_top_confusions_table_instead_of_a_matrix():
    task = Task("fine", [f"class{i}" for i in range(40)])
    cm = np.diag(np.full(40, 10))
    cm[3, 7], cm[5, 1] = 6, 2
    ev = run_report.TaskEvaluation(task, cm, {"accuracy": 0.98})
    blocks = run_report._evaluation_section({"fine": ev}, 1).blocks
    names = [b.name for b in blocks if isinstance(b, Figure)]
    assert names == ["per_class_fine"]
    table = next(b for b in blocks if isinstance(b, Table))
    assert table.rows[:2] == [["class3", "class7", "6", "37.5%"], ["class5", "class1", "2", "16.7%"]]
    assert len(table.rows) == 2  # only actual confusions


def test_run_without_best_pt_reports_what_is_there(run_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial, ignore=shutil.ignore_patterns("best.pt", "checkpoint.pt", "summary.json",
                                                                    "report"))
    paths = write_report(partial, tmp_path / "out")
    html = paths["html"].read_text()
    assert "best.pt is missing" in html and "summary.json is missing" in html
    assert "<h2>Test-set evaluation</h2>" not in html and "<h2>Test images</h2>" not in html
    assert "<h2>Learning curves</h2>" in html and "<h2>Gradients</h2>" in html
    assert len(DATA_PNG.findall(html)) == 7  # 4 curves, weights, cosines, norms
    assert "best.pt is missing" in paths["markdown"].read_text()


def test_not_a_run_or_bench_dir_names_the_missing_files(tmp_path):
    with pytest.raises(MTLVisionError, match=r"no config\.yaml.*no results\.csv"):
        write_report(tmp_path)
    with pytest.raises(MTLVisionError, match="no such directory"):
        write_report(tmp_path / "nope")
    (tmp_path / "config.yaml").write_text("name: x\n")
    with pytest.raises(MTLVisionError, match=r"no metrics\.jsonl and no best\.pt"):
        write_report(tmp_path)


def _fake_bench(root):
    """A bench dir as `mtlvision bench` leaves it: results.csv/md via bench.write_results, suite.json, run dirs."""
    rows = [
        {"architecture": "single-task", "method": "equal", "seeds": 2, "delta_m": (0.0, 0.0),
         "tasks": {"shape": (90.0, 1.0), "position": (95.0, 0.5)}, "images_per_s": 100.0, "s_per_epoch": 5.0,
         "peak_memory_mb": 500.0, "parameters": 1000},
        {"architecture": "hps", "method": "equal", "seeds": 2, "delta_m": (1.5, 0.4),
         "tasks": {"shape": (91.0, 0.8), "position": (96.5, 0.2)}, "images_per_s": 110.0, "s_per_epoch": 4.5,
         "peak_memory_mb": 520.0, "parameters": 1200},
        {"architecture": "hps", "method": "cagrad(c=0.2)", "seeds": 2, "delta_m": (-0.7, 0.9),
         "tasks": {"shape": (89.0, 1.5), "position": (95.2, 0.3)}, "images_per_s": 90.0, "s_per_epoch": 6.0,
         "peak_memory_mb": 530.0, "parameters": 1200},
    ]
    bench.write_results(rows, root, "# tiny")
    runs = [root / "stl" / t / f"seed{s}" for t in ("shape", "position") for s in (0, 1)]
    runs += [root / "hps" / m / f"seed{s}" for m in ("equal", "cagrad_c=0.2") for s in (0, 1)]
    for r in runs:
        r.mkdir(parents=True)
        (r / "config.yaml").write_text("name: x\n")
    suite = {"name": "tiny", "config": "base.yaml", "seeds": [0, 1], "set": ["train.epochs=1"]}
    (root / "suite.json").write_text(json.dumps({"suite": suite, "config": "base.yaml", "set": [],
                                                 "runs": [str(r) for r in runs]}))


def test_bench_report_table_charts_and_run_links(tmp_path):
    _fake_bench(tmp_path)
    paths = write_report(tmp_path)
    html, md = paths["html"].read_text(), paths["markdown"].read_text()
    for title in ("Results", "Δm", "Per-task accuracy", "Suite"):
        assert f"<h2>{title}</h2>" in html and f"## {title}" in md
    assert len(DATA_PNG.findall(html)) == 3  # Δm, shape, position
    assert "+1.50 ± 0.40" in html and "-0.70 ± 0.90" in html and "91.00 ± 0.80" in html
    assert 'href="../hps/cagrad_c=0.2/seed1/"' in html and 'href="../stl/position/seed0/"' in html
    for ref in MD_IMAGE.findall(md):
        assert (tmp_path / "report" / ref).read_bytes().startswith(PNG_MAGIC)
    links = re.findall(r"\]\((\.\./[^)]+)\)", md)
    assert len(links) == 8 and all((tmp_path / "report" / link).is_dir() for link in links)


def test_bench_dir_without_rows_is_an_error(tmp_path):
    bench.write_results([], tmp_path, "# empty")
    with pytest.raises(MTLVisionError, match="no result rows"):
        write_report(tmp_path)


def test_text_is_escaped():
    nasty = '<img src=x onerror="alert(1)">'
    section = Section("s", [Text(nasty), Table([nasty], [[nasty, Link(nasty, nasty)]])])
    html = render_html(Report(nasty, nasty, [section], [nasty]))
    assert "<img" not in html and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html


def test_cli_report(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["report", "--help"])
    assert e.value.code == 0 and "usage: mtlvision report" in capsys.readouterr().out
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r")]) == 0
    assert str(tmp_path / "r" / "report.html") in capsys.readouterr().out
    assert (tmp_path / "r" / "report.md").is_file()
    assert main(["report", str(tmp_path / "r")]) == 2
    assert "no config.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not on PATH (Debian: apt-get install -y chromium)")
    from PIL import Image

    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'prof'}",
                    f"--screenshot={shot}", "--window-size=1280,4000",
                    (run_dir / "report" / "report.html").resolve().as_uri()],
                   capture_output=True, timeout=180)
    assert shot.is_file(), "chromium wrote no screenshot"
    im = Image.open(shot).convert("RGB")
    assert im.size == (1280, 4000)
    colours = im.getcolors(maxcolors=1 << 24)
    assert len(colours) > 100  # text, tables and plots, not a blank page
    assert dict((c, n) for n, c in colours).get((255, 255, 255), 0) < 0.95 * im.width * im.height
