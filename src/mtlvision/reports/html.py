"""Page assembly: one self-contained HTML file (inline CSS, PNGs as base64 data URIs, no scripts).

Every piece of text goes through html.escape, so task, class and run names cannot inject markup.
"""
from __future__ import annotations

import base64
from html import escape

from .document import Block, Cell, Code, Figure, Heading, Link, Report, Table, Text

STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Helvetica, Arial, sans-serif;
       color: #1f2328; background: #fff; margin: 0; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 1.7em; margin: 0 0 4px; }
h2 { font-size: 1.3em; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; margin-top: 36px; }
h3 { font-size: 1.05em; margin: 22px 0 8px; }
.subtitle { color: #59636e; margin: 0 0 16px; }
nav { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 6px; padding: 8px 14px; }
nav a { margin-right: 16px; color: #0969da; text-decoration: none; white-space: nowrap; }
.note { background: #fff8c5; border-left: 4px solid #d4a72c; padding: 8px 12px; margin: 12px 0; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; vertical-align: top; white-space: nowrap; }
td.links { white-space: normal; }
th { background: #f6f8fa; }
.tablewrap { overflow-x: auto; }
.figs { display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: flex-start; }
figure { margin: 12px 0 20px; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption, .caption { color: #59636e; font-size: 0.88em; margin-top: 4px; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; padding: 10px; overflow-x: auto; font-size: 0.85em; }
a { color: #0969da; }
"""


def _cell(cell: Cell) -> str:
    links = [cell] if isinstance(cell, Link) else cell if isinstance(cell, list) else None
    if links is None:
        return escape(str(cell))
    return " ".join(f'<a href="{escape(x.href, quote=True)}">{escape(x.text)}</a>' for x in links)


def _table(t: Table) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(("<td>" if not isinstance(c, list) else '<td class="links">') + _cell(c) + "</td>"
                                    for c in row) + "</tr>" for row in t.rows)
    caption = f'<div class="caption">{escape(t.caption)}</div>' if t.caption else ""
    return f'<div class="tablewrap"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{caption}'


def _figure(f: Figure) -> str:
    data = base64.b64encode(f.png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(f.caption, quote=True)}">'
            f"<figcaption>{escape(f.caption)}</figcaption></figure>")


def _block(b: Block) -> str:
    if isinstance(b, Heading):
        return f"<h3>{escape(b.text)}</h3>"
    if isinstance(b, Text):
        return f'<p class="note">{escape(b.text)}</p>' if b.note else f"<p>{escape(b.text)}</p>"
    if isinstance(b, Code):
        return f"<pre>{escape(b.text)}</pre>"
    if isinstance(b, Figure):
        return _figure(b)
    if isinstance(b, Table):
        return _table(b)
    raise TypeError(f"unknown report block {type(b).__name__}")


def render_html(report: Report) -> str:
    nav = "".join(f'<a href="#{s.anchor}">{escape(s.title)}</a>' for s in report.sections)
    parts = [f"<h1>{escape(report.title)}</h1>", f'<p class="subtitle">{escape(report.subtitle)}</p>',
             f"<nav>{nav}</nav>"]
    parts += [f'<p class="note"><b>Note:</b> {escape(n)}</p>' for n in report.notes]
    for s in report.sections:
        parts.append(f'<section id="{s.anchor}"><h2>{escape(s.title)}</h2>')
        for i, b in enumerate(s.blocks):  # runs of figures share a wrapping row (side by side when they fit)
            first = isinstance(b, Figure) and (i == 0 or not isinstance(s.blocks[i - 1], Figure))
            last = isinstance(b, Figure) and (i + 1 == len(s.blocks) or not isinstance(s.blocks[i + 1], Figure))
            parts.append(('<div class="figs">' if first else "") + _block(b) + ("</div>" if last else ""))
        parts.append("</section>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(report.title)}</title>\n<style>{STYLE}</style>\n</head>\n"
            f"<body><main>\n{body}\n</main></body>\n</html>\n")
