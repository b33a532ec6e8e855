"""The report's two renderings: Markdown with relative figure links, and one HTML file that carries its
figures inside (data URIs) and escapes what it shows; and `upcycle report` on a run folder."""

from __future__ import annotations

import base64
import json
import re

import pytest

from tests.clitools import assert_one_line_error, run_cli
from upcycle.report.document import Figure, Heading, Para, Table, to_html, to_markdown


@pytest.fixture
def png(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    path = tmp_path / "figs" / "curve.png"
    path.parent.mkdir()
    fig.savefig(path)
    plt.close(fig)
    return path


def test_markdown_links_figures_and_escapes_table_cells(tmp_path, png):
    blocks = [
        Heading("T", 1),
        Para("a `code` span"),
        Table(["m", "a|b"], [["x", "1"]], ["note"]),
        Figure(png, "cap"),
    ]
    md = to_markdown(blocks, tmp_path)
    assert md.startswith("# T\n") and "| m | a\\|b |" in md and "| :--- | ---: |" in md
    assert "![cap](figs/curve.png)" in md and "note" in md


def test_html_embeds_every_figure_and_loads_nothing(tmp_path, png):
    blocks = [Heading("<T>", 1), Para("x < y & `a<b`"), Table(["m"], [["<script>"]]), Figure(png, "cap")]
    html = to_html(blocks, "title")
    uris = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    assert len(uris) == 1 and base64.b64decode(uris[0]) == png.read_bytes()
    assert "<script>" not in html and "&lt;script&gt;" in html and "<code>a&lt;b</code>" in html
    assert not re.search(r"""(src|href)=["'](?!data:)""", html)
    assert "<img" not in to_html(blocks, "title", embed=False)


def test_report_refuses_a_folder_without_a_plan(capsys, tmp_path):
    code, _, err = run_cli(capsys, ["report", tmp_path / "nope"])
    assert code == 2 and assert_one_line_error(err, "RUN", "no such run folder")
    code, _, err = run_cli(capsys, ["report", tmp_path])
    assert code == 2 and assert_one_line_error(err, "plan.json")
    code, _, err = run_cli(capsys, ["report", tmp_path, "--paper", "fanetal"])
    assert code == 2 and assert_one_line_error(err, "--paper", "founding-report")


def test_report_of_an_empty_run_has_its_title_and_cost_table(capsys, tmp_path):
    plan = {"experiment": "e", "description": "what it asks", "source": "e.yaml", "run": str(tmp_path),
            "created": "now", "points": [""], "report": {"title": "My study"}, "stages": []}  # fmt: skip
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    code, out, err = run_cli(capsys, ["report", tmp_path])
    assert code == 0, err
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# My study\n") and "what it asks" in md and "## Time and tokens per stage" in md
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert json.loads((tmp_path / "report" / "report.json").read_text())["experiment"] == "e"
