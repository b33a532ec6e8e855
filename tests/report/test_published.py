"""The published numbers the report prints are the papers' own: checked cell by cell against the text of
the papers in shared/papers/ where they are available (the transcription is in upcycle.report.published)."""

from __future__ import annotations

from pathlib import Path

import pytest

from upcycle.report.published import (
    DROP_UPCYCLING,
    FOUNDING_REPORT,
    XNLI_ORDER,
    drop_upcycling_row,
    drop_upcycling_scores,
)

PAPERS = Path(__file__).resolve().parents[3] / "shared" / "papers"
if not PAPERS.is_dir():
    PAPERS = Path("/work/shared/papers")


def _lines(name: str) -> list[str]:
    path = PAPERS / name
    if not path.is_file():
        pytest.skip(f"{name} is not available here")
    return path.read_text(encoding="utf-8").splitlines()


def _numbers(line: str) -> list[float]:
    return [float(x) for x in line.split("\t")[1:] if x.strip()]


def test_founding_report_tables_match_the_report_text():
    lines = _lines("founding-report-gpt2-moe-xnli.txt")
    header = next(i for i, line in enumerate(lines) if line.strip().split() == list(XNLI_ORDER))
    fertility = next(line for line in lines[header:] if line.startswith("Fertility Score"))
    assert _numbers(fertility) == [FOUNDING_REPORT["table1_fertility"][lang] for lang in XNLI_ORDER]
    moe_rows = [line for line in lines if line.startswith("MoE\t")]
    gpt2_rows = [line for line in lines if line.startswith("GPT2\t")]
    assert len(moe_rows) == len(gpt2_rows) == 2  # Table 2, then Table 3
    for table, moe, gpt2 in zip(FOUNDING_REPORT["tables"].values(), moe_rows, gpt2_rows):
        assert _numbers(moe) == [table["MoE"][lang] for lang in XNLI_ORDER], table["name"]
        assert _numbers(gpt2) == [table["GPT2"][lang] for lang in XNLI_ORDER], table["name"]
    assert list(FOUNDING_REPORT["tables"]) == [frozenset({"fr"}), frozenset({"en", "fr", "es"})]
    text = "\n".join(lines)
    assert "accuracy of 38.23%" in text and "validation loss of 3.4" in text and "14649" in text


def test_drop_upcycling_table_1_matches_the_paper_text():
    lines = _lines("drop-upcycling.txt")
    start = next(i for i, line in enumerate(lines) if line.startswith("1\tDense\t"))
    rows = lines[start : start + 6]  # models 1-6: dense 152M → MoE 8×152M
    for line, name in zip(rows, DROP_UPCYCLING["rows"]):
        cells = line.split("\t")
        assert [float(x) for x in cells[3:]] == list(drop_upcycling_scores(name).values()), name
    assert "MoE 8×152M\t190M / 417M" in "\n".join(lines)


def test_our_models_map_to_the_papers_rows():
    assert drop_upcycling_row(None, None, "dense") == "Dense"
    assert drop_upcycling_row("naive", 0.5, "moe") == "NU"
    assert drop_upcycling_row("drop", 0.5, "moe") == "DU (r=0.5)"
    assert drop_upcycling_row("scratch", 0.5, "moe") == "DU (r=1.0)"  # the same construction
    assert drop_upcycling_row("drop", 0.15, "moe") is None  # no published row to compare with
