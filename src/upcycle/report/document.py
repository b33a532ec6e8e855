"""A report as a list of blocks (headings, paragraphs, tables, figures) rendered twice: Markdown with
figures linked by relative path, and one self-contained HTML file with every figure embedded as a data
URI (no network, no external file: it can be mailed or attached as it is)."""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str
    """Plain text; `code` spans are kept as code in both renderings."""


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    align_left: int = 1
    """How many leading columns hold names (left-aligned); the others hold numbers."""


@dataclass
class Figure:
    path: Path
    caption: str


Block = Heading | Para | Table | Figure


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block], base: Path) -> str:
    """Markdown; figure links relative to ``base`` (the folder of report.md)."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Para):
            out += [block.text, ""]
        elif isinstance(block, Table):
            aligns = [":---" if i < block.align_left else "---:" for i in range(len(block.header))]
            out.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
            out.append("| " + " | ".join(aligns) + " |")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            out.append("")
            out += [note + "  " for note in block.notes] + ([""] if block.notes else [])
        elif isinstance(block, Figure):
            rel = os.path.relpath(block.path, base)
            out += [f"![{block.caption}]({rel})", "", f"*{block.caption}*", ""]
    return "\n".join(out).rstrip() + "\n"


_CODE = re.compile(r"`([^`]+)`")


def _inline(text: str) -> str:
    """HTML of a paragraph or cell: escaped, `code` spans as <code>."""
    parts = _CODE.split(str(text))
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


def data_uri(path: Path) -> str:
    kind = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg"}.get(
        path.suffix.lower(), "image/png"
    )
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 72rem;
       margin: 2rem auto; padding: 0 1rem; color: #1a1a1a; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .2rem; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .88rem; }
th, td { border: 1px solid #d0d0d0; padding: .25rem .5rem; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
p.note { font-size: .82rem; color: #555; margin: .1rem 0; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .85rem; color: #444; }
code { background: #f4f4f4; padding: 0 .2rem; border-radius: 3px; }
"""


def to_html(blocks: list[Block], title: str, embed: bool = True) -> str:
    """One HTML document; figures embedded as data URIs (``embed``) or left out."""
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            body.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Table):
            body.append(_html_table(block))
        elif isinstance(block, Figure) and embed and block.path.is_file():
            body.append(
                f'<figure><img src="{data_uri(block.path)}" alt="{html.escape(block.caption)}">'
                f"<figcaption>{_inline(block.caption)}</figcaption></figure>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{_inline(h)}</th>" for h in table.header)
    rows = []
    for row in table.rows:
        cells = "".join(
            f"<td>{_inline(c)}</td>" if i < table.align_left else f'<td class="num">{_inline(c)}</td>'
            for i, c in enumerate(row)
        )
        rows.append(f"<tr>{cells}</tr>")
    notes = "".join(f'<p class="note">{_inline(n)}</p>' for n in table.notes)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{notes}"


__all__ = ["Block", "Figure", "Heading", "Para", "Table", "data_uri", "to_html", "to_markdown"]
