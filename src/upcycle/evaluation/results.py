"""The results folder of ``upcycle evaluate``: results.json, results.csv, results.md.

``results.json`` (CONTRACTS.md): top-level keys are model names only. Per model, for xnli /
classification / lm-eval tasks: ``path``, ``task``, ``accuracy`` {language: fraction}, ``n`` {language:
examples}, ``ci95`` {language: [low, high]} (Wilson), ``average`` (the unweighted mean over the
languages, as XNLI papers report it; with XNLI's equal test sizes it equals the pooled accuracy), and for
every model but the baseline ``paired`` {``baseline``, ``test``, ``languages``: {language:
:class:`~upcycle.evaluation.significance.PairedResult`}}. For ``--task lm``: ``path``, ``task``,
``loss``, ``perplexity``, ``accuracy``, ``tokens``.

``results.csv`` and ``results.md``: one row per model, one column per language (XNLI's in the founding
report's order en ar bg de el es fr hi ru sw th tr ur vi zh whatever ``--languages`` lists, others in the
order given) and the average, accuracies in percent like the report's Tables 2 and 3. The Markdown table
marks a language where a model differs from the baseline (exact McNemar test, Holm-adjusted over the
languages: ``*`` p < 0.05, ``**`` p < 0.01) and lists the 95 % intervals below it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from upcycle.evaluation.significance import compare, marks, wilson_interval

PAIRED_TEST = "exact McNemar, Holm-adjusted over languages; paired-bootstrap 95% interval of the difference"


def model_names(paths: Sequence[str], names: Sequence[str] | None = None) -> list[str]:
    """``names`` if given, else each path's folder name, lengthened with parent folders until unique
    (``runs/dense/best`` and ``runs/moe/best`` → ``dense/best``, ``moe/best``); the same path twice gets
    ``#2``."""
    if names is not None:
        return list(names)
    parts = [[p for p in Path(str(path).rstrip("/")).parts if p not in ("/", ".", "..", "~")] or [str(path)]
             for path in paths]  # fmt: skip
    depth = [1] * len(paths)
    while True:
        current = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        # Lengthen a name while another path (not the same one) has it too.
        grow = [
            i
            for i, n in enumerate(current)
            if depth[i] < len(parts[i])
            and any(c == n and parts[j] != parts[i] for j, c in enumerate(current))
        ]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    seen: dict[str, int] = {}
    out = []
    for name in current:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def accuracy_entry(path: str, task: str, correct: dict[str, np.ndarray], **extra) -> dict:
    """A model's results.json entry from its per-language correct flags."""
    n = {lang: int(len(c)) for lang, c in correct.items()}
    hits = {lang: int(np.asarray(c, dtype=bool).sum()) for lang, c in correct.items()}
    accuracy = {lang: hits[lang] / n[lang] if n[lang] else float("nan") for lang in correct}
    return {
        "path": str(path),
        "task": task,
        "accuracy": accuracy,
        "n": n,
        "ci95": {lang: list(wilson_interval(hits[lang], n[lang])) for lang in correct},
        "average": float(np.mean(list(accuracy.values()))) if accuracy else float("nan"),
        **extra,
    }


def add_paired_tests(
    results: dict, correct: dict[str, dict[str, np.ndarray]], baseline: str, resamples: int, seed: int
) -> None:
    """Add ``paired`` to every model's entry but the baseline's: each language against the baseline on
    the same examples (see upcycle.evaluation.significance for the choice of tests)."""
    for name in results:
        if name == baseline:
            continue
        per_lang = compare(correct[baseline], correct[name], resamples=resamples, seed=seed)
        results[name]["paired"] = {
            "baseline": baseline,
            "test": PAIRED_TEST,
            "languages": {lang: r.to_dict() for lang, r in per_lang.items()},
        }


def languages_of(results: dict) -> list[str]:
    """Column order: the languages of the first model with accuracies (all models share them)."""
    for entry in results.values():
        if isinstance(entry.get("accuracy"), dict):
            return list(entry["accuracy"])
    return []


def _pct(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def render_csv(results: dict) -> str:
    """One row per model; accuracy per language and average in percent (``--task lm``: its figures)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    langs = languages_of(results)
    if langs:
        writer.writerow(["model", *langs, "average"])
        for name, r in results.items():
            writer.writerow([name, *(_pct(r["accuracy"].get(lang)) for lang in langs), _pct(r["average"])])
    else:
        writer.writerow(["model", "loss", "perplexity", "accuracy", "tokens"])
        for name, r in results.items():
            writer.writerow(
                [name, f"{r['loss']:.4f}", f"{r['perplexity']:.3f}", _pct(r["accuracy"]), r["tokens"]]
            )
    return buf.getvalue()


def render_markdown(results: dict, title: str = "", intervals: bool = True) -> str:
    """The accuracy table (significance marks against the baseline) and the 95 % intervals."""
    langs = languages_of(results)
    lines = [f"# {title}", ""] if title else []
    if not langs:
        lines += ["| model | loss | perplexity | next-token accuracy | tokens |", "|---|---:|---:|---:|---:|"]
        for name, r in results.items():
            lines.append(
                f"| {name} | {r['loss']:.4f} | {r['perplexity']:.3f} | {_pct(r['accuracy'])} | {r['tokens']:,} |"
            )
        return "\n".join(lines) + "\n"
    lines += [f"| model | {' | '.join(langs)} | average |", "|---|" + "---:|" * (len(langs) + 1)]
    for name, r in results.items():
        paired = (r.get("paired") or {}).get("languages", {})
        cells = [
            _pct(r["accuracy"].get(lang)) + marks(paired.get(lang, {}).get("p_holm", 1.0)) for lang in langs
        ]
        lines.append(f"| {name} | {' | '.join(cells)} | {_pct(r['average'])} |")
    n = {lang: {r["n"].get(lang) for r in results.values()} for lang in langs}
    sizes = sorted({x for v in n.values() for x in v if x is not None})
    lines += ["", f"Accuracy in %; examples per language: {', '.join(map(str, sizes))}."]
    baseline = next((r["paired"]["baseline"] for r in results.values() if r.get("paired")), None)
    if baseline is not None:
        lines.append(
            f"`*` p < 0.05, `**` p < 0.01: differs from `{baseline}` on the same examples ({PAIRED_TEST})."
        )
    if not intervals:
        return "\n".join(lines) + "\n"
    lines += _paired_section(results, langs)
    lines += [
        "",
        "95% intervals (Wilson):",
        "",
        f"| model | {' | '.join(langs)} |",
        "|---|" + "---:|" * len(langs),
    ]
    for name, r in results.items():
        cells = [f"{_pct(r['ci95'][lang][0])}–{_pct(r['ci95'][lang][1])}" for lang in langs]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def _paired_section(results: dict, langs: list[str]) -> list[str]:
    """Each comparison, language by language: the difference, its interval, the discordant counts and
    both p-values."""
    paired = {name: r["paired"] for name, r in results.items() if r.get("paired")}
    if not paired:
        return []
    lines = [
        "",
        "Paired tests (same examples): difference in points, paired-bootstrap 95% interval, examples only "
        "the baseline / only the model gets right, exact McNemar p, Holm-adjusted p:",
        "",
        "| model | vs | language | difference | 95% interval | only baseline | only model | p | p (Holm) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, comp in paired.items():
        for lang in langs:
            t = comp["languages"].get(lang)
            if t is None:
                continue
            low, high = t["ci95"]
            lines.append(
                f"| {name} | {comp['baseline']} | {lang} | {100 * t['difference']:+.2f} | "
                f"{100 * low:+.2f} to {100 * high:+.2f} | {t['only_baseline']} | {t['only_model']} | "
                f"{t['p_value']:.3g} | {t['p_holm']:.3g}{marks(t['p_holm'])} |"
            )
    return lines


def write_results(out: str | Path, results: dict, *, overwrite: bool, title: str = "") -> Path:
    """Write the three files into ``out`` atomically (all three or none; an old folder survives until the
    new one is complete)."""
    from upcycle.io import atomic_output_dir

    with atomic_output_dir(out, overwrite=overwrite, flag="out") as tmp:
        (tmp / "results.json").write_text(
            json.dumps(results, indent=1, allow_nan=True) + "\n", encoding="utf-8"
        )
        (tmp / "results.csv").write_text(render_csv(results), encoding="utf-8")
        (tmp / "results.md").write_text(render_markdown(results, title), encoding="utf-8")
    return Path(out)


__all__ = [
    "PAIRED_TEST",
    "accuracy_entry",
    "add_paired_tests",
    "languages_of",
    "model_names",
    "render_csv",
    "render_markdown",
    "write_results",
]
