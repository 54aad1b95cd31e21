"""A report as plain data (sections of text, tables, figures), written as report.html and report.md.

Builders (run_report, bench_report) produce a `Report`; `reports.write_report` renders it twice: a
self-contained HTML page with the PNGs inlined (html.py), and Markdown that references PNG files beside it
(`render_markdown`, here).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Union



@dataclasses.dataclass
class Text:
    """A paragraph; `note` paragraphs (what was skipped and why) are highlighted."""

    text: str
    note: bool = False


@dataclasses.dataclass
class Link:
    text: str
    href: str


Cell = Union[str, Link, list[Link]]


@dataclasses.dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]
    caption: str = ""


@dataclasses.dataclass
class Figure:
    """A PNG; `name` is the file stem it gets next to report.md (made unique on writing)."""

    name: str
    png: bytes
    caption: str


@dataclasses.dataclass
class Code:
    text: str


@dataclasses.dataclass
class Heading:
    """A sub-heading inside a section (e.g. one per task)."""

    text: str


Block = Union[Text, Table, Figure, Code, Heading]


@dataclasses.dataclass
class Section:
    title: str
    blocks: list[Block]

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


@dataclasses.dataclass
class Report:
    title: str
    subtitle: str
    sections: list[Section]
    notes: list[str] = dataclasses.field(default_factory=list)  # shown first: skipped parts and why

    def figures(self) -> list[Figure]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Figure)]


def figure_files(report: Report) -> dict[int, str]:
    """id(figure) -> a unique, filesystem-safe PNG file name."""
    names: dict[int, str] = {}
    used: set[str] = set()
    for fig in report.figures():
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", fig.name).strip("_.") or "figure"
        name, i = f"{stem}.png", 2
        while name in used:
            name, i = f"{stem}_{i}.png", i + 1
        used.add(name)
        names[id(fig)] = name
    return names


def _md_cell(cell: Cell) -> str:
    if isinstance(cell, Link):
        cell = [cell]
    if isinstance(cell, list):
        return " ".join(f"[{_md_escape(c.text)}]({c.href.replace(' ', '%20')})" for c in cell)
    return _md_escape(cell)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report, files: dict[int, str]) -> str:
    lines = [f"# {report.title}", "", report.subtitle, ""]
    for note in report.notes:
        lines += [f"> **Note:** {note}", ""]
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        for b in section.blocks:
            if isinstance(b, Heading):
                lines += [f"### {b.text}", ""]
            elif isinstance(b, Text):
                lines += [f"> **Note:** {b.text}" if b.note else b.text, ""]
            elif isinstance(b, Code):
                lines += ["```", b.text.rstrip("\n"), "```", ""]
            elif isinstance(b, Figure):
                lines += [f"![{_md_escape(b.caption)}]({files[id(b)]})", "", f"*{b.caption}*", ""]
            else:
                lines += ["| " + " | ".join(map(_md_escape, b.header)) + " |", "|" + "---|" * len(b.header)]
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
                lines += ["", f"*{b.caption}*", ""] if b.caption else [""]
    return "\n".join(lines)
