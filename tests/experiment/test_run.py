"""`upcycle run` end to end on the demo experiment at the smallest size, as a two-point sweep: every stage
runs through the commands' own entry points, the plan matches what ran, the report holds every table and
figure (and renders in a real browser), a rerun skips everything, a changed fine-tuning key reruns only
fine-tuning and what follows, and a SIGKILL during pretraining is resumed to the same results."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.clitools import subprocess_env
from tests.experiment.conftest import small_demo, write_yaml
from upcycle.cli import main

EXECUTED = re.compile(r"^== \[\d+/\d+\] (\S+): ", re.M)


def run_upcycle(argv: list) -> tuple[int, str, str]:
    """``upcycle ARGV`` in this process, one intra-op thread (as the subprocess below)."""
    out, err = io.StringIO(), io.StringIO()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
    finally:
        torch.set_num_threads(n)
    return code, out.getvalue(), err.getvalue()


def records(run: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(run / "state").with_suffix("")): json.loads(p.read_text())
        for p in (run / "state").rglob("*.json")
    }


def plan_tasks(run: Path) -> dict[str, dict]:
    plan = json.loads((run / "plan.json").read_text())
    return {t["key"]: t for stage in plan["stages"] for t in stage["tasks"]}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The demo experiment at the smallest size, swept over two drop ratios, run once for the module."""
    root = tmp_path_factory.mktemp("sweep")
    yaml_path = write_yaml(root / "demo-small.yaml", small_demo(sweep=[0.15, 0.5]))
    code, out, err = run_upcycle(["run", yaml_path, "--out", root / "run"])
    assert code == 0, err[-3000:]
    return {"root": root, "yaml": yaml_path, "run": root / "run", "out": out}


def test_the_sweep_runs_every_stage_end_to_end(sweep):
    run, out = sweep["run"], sweep["out"]
    tasks = plan_tasks(run)
    assert {t["key"].split("/")[0] for t in tasks.values()} == {
        "data", "seed", "convert", "pretrain", "finetune", "evaluate", "analyze", "report"
    }  # fmt: skip
    state = records(run)
    assert all(state[k]["status"] == "complete" and state[k]["hash"] == t["hash"] for k, t in tasks.items())
    # Two MoE models (one per point) and one dense baseline, each fine-tuned in both settings.
    assert sorted(k for k in tasks if k.startswith("pretrain/")) == [
        "pretrain/dense", "pretrain/moe@ratio=0.15", "pretrain/moe@ratio=0.5"
    ]  # fmt: skip
    assert len([k for k in tasks if k.startswith("finetune/")]) == 6
    for setting in ("fr", "en-fr-es"):
        results = json.loads((run / "evaluate" / "xnli" / setting / "results.json").read_text())
        assert list(results) == ["dense", "moe@ratio=0.15", "moe@ratio=0.5"]
        assert len(results["moe@ratio=0.5"]["accuracy"]) == 15  # all 15 XNLI languages
        assert results["moe@ratio=0.5"]["paired"]["baseline"] == "dense"
    # The converted models differ as their ratios say (the sweep reached the command).
    for ratio in ("0.15", "0.5"):
        upcycling = json.loads((run / "convert" / f"moe@ratio={ratio}" / "upcycling.json").read_text())
        assert upcycling["options"]["ratio"] == float(ratio)
    assert out.index("stage ") < out.index("== [1/"), "the plan is printed before anything starts"
    assert "report: " in out and str(run / "report.html") in out and "average" in out  # the headline table


def test_the_plan_matches_the_stages_executed(sweep):
    tasks, out = plan_tasks(sweep["run"]), sweep["out"]
    planned = [k for k, t in tasks.items() if t["status"] in ("run", "resume")]
    assert EXECUTED.findall(out) == planned  # the same tasks, in the plan's order
    assert len(planned) == len(tasks)
    printed = out.split("== [1/")[0]
    for key, task in tasks.items():
        stage, name = key.split("/", 1)  # every task is a row of the printed plan
        assert re.search(rf"^{stage} +{re.escape(name)} ", printed, re.M), key
        if task["kind"] in ("pretrain", "finetune"):
            record = records(sweep["run"])[key]
            assert record["tokens"] == task["estimate"]["tokens"] or task["kind"] == "finetune"


def test_the_report_holds_every_table_and_figure(sweep):
    run = sweep["run"]
    md = (run / "report.md").read_text()
    for heading in ("## Setup", "## Continued pretraining", "## Tokenizer fertility", "## Evaluation",
                    "## Fine-tuning", "## Routing", "## Time and tokens per stage"):  # fmt: skip
        assert heading in md, heading
    for model in ("dense", "moe@ratio=0.15", "moe@ratio=0.5"):
        assert f"| {model} |" in md
    # Accuracy tables per setting with all 15 languages, intervals, significance legend, published tables.
    assert (
        md.count(
            "| model | en | ar | bg | de | el | es | fr | hi | ru | sw | th | tr | ur | vi | zh | average |"
        )
        == 2
    )
    assert "95 % confidence intervals" in md and "exact McNemar" in md
    assert (
        "Table 2 (fine-tuned on French)" in md and "Table 3 (fine-tuned on English, French and Spanish)" in md
    )
    assert "| MoE (report) | 56.01 |" in md and "| GPT2 (report) | 76.51 |" in md and "difference" in md
    assert "| founding report, Table 1 | 1.11 |" in md
    # Every figure the analyses drew is in the report, and each exists.
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    drawn = {str(p.relative_to(run)) for p in (run / "analyze").rglob("*.png")}
    wanted = {f for f in drawn if not Path(f).name.startswith("heatmap-") and "experts-dense" not in f}
    assert wanted <= set(figures), sorted(wanted - set(figures))
    assert all((run / f).is_file() for f in figures)
    html = (run / "report.html").read_text()
    assert html.count('<img src="data:image/png;base64,') == len(figures)
    assert not re.search(r"""(src|href)=["'](?!data:)""", html), "report.html must not load anything"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="needs headless Chromium (Debian package 'chromium')")
def test_the_html_report_renders_in_a_real_browser(sweep, tmp_path):
    """Open report.html in headless Chromium as a reader would: every embedded figure decodes to an image
    with a width, and every table is there (a small script, added to a copy, writes what the page sees)."""
    probe = """<script>window.addEventListener('load', () => {
      const imgs = [...document.images];
      const out = document.createElement('div'); out.id = 'render-check';
      out.dataset.images = imgs.length;
      out.dataset.decoded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
      out.dataset.tables = document.querySelectorAll('table').length;
      out.dataset.rows = document.querySelectorAll('tbody tr').length;
      document.body.appendChild(out);
    });</script></body>"""
    page = tmp_path / "report.html"
    page.write_text((sweep["run"] / "report.html").read_text().replace("</body>", probe))
    command = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000", "--dump-dom", page.as_uri(),
    ]  # fmt: skip
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    found = re.search(
        r'id="render-check" data-images="(\d+)" data-decoded="(\d+)" data-tables="(\d+)" data-rows="(\d+)"',
        dom,
    )
    assert found, dom[-2000:]
    images, decoded, tables, rows = map(int, found.groups())
    md = (sweep["run"] / "report.md").read_text()
    assert images == len(re.findall(r"!\[", md)) > 10 and decoded == images
    assert tables == md.count("\n| :---") and rows > 50


def test_a_rerun_skips_every_stage(sweep):
    run = sweep["run"]
    before = records(run)
    stamp = (run / "report.html").stat().st_mtime_ns
    code, out, err = run_upcycle(["run", sweep["yaml"], "--out", run])
    assert code == 0, err
    assert EXECUTED.findall(out) == [] and f"{len(before)} tasks, 0 to run" in out
    assert records(run) == before and (run / "report.html").stat().st_mtime_ns == stamp


def test_a_changed_fine_tuning_key_reruns_only_fine_tuning_and_what_follows(sweep, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sweep["run"], run, symlinks=True)
    doc = small_demo(sweep=[0.15, 0.5])
    doc["finetune"]["lr"] = 3e-4
    code, out, err = run_upcycle(["run", write_yaml(tmp_path / "changed.yaml", doc), "--out", run])
    assert code == 0, err[-3000:]
    ran = EXECUTED.findall(out)
    assert {k.split("/")[0] for k in ran} == {"finetune", "evaluate", "analyze", "report"}
    assert all(
        k in ran for k in plan_tasks(run) if k.startswith(("finetune/", "evaluate/", "analyze/routing"))
    )
    assert "analyze/fertility" not in ran and "analyze/training/pretrain" not in ran
    assert "lr: 0.0003" in (run / "finetune" / "fr" / "dense" / "config.yaml").read_text()

    # --only runs one stage again; --from a stage and everything after it (the dry run says which).
    changed = tmp_path / "changed.yaml"
    code, out, err = run_upcycle(["run", changed, "--out", run, "--only", "report"])
    assert code == 0 and EXECUTED.findall(out) == ["report/report"], err
    code, out, _ = run_upcycle(["run", changed, "--out", run, "--from", "evaluate", "--dry-run"])
    rows = re.findall(r"^(\w+) +\S+ .*?  (run|done, skip)$", out, re.M)
    assert code == 0 and {stage for stage, status in rows if status == "run"} == {
        "evaluate",
        "analyze",
        "report",
    }
    assert {stage for stage, status in rows if status != "run"} == {
        "data",
        "seed",
        "convert",
        "pretrain",
        "finetune",
    }


def _safetensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _losses(run_dir: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["kind"], r["step"], r["loss"]) for r in rows]


def test_a_sigkill_during_pretraining_resumes_to_the_same_results(sweep, tmp_path):
    """Kill `upcycle run` (SIGKILL: no handler runs) after the MoE's first pretraining checkpoint; the same
    command continues from that checkpoint and ends with what the uninterrupted run made."""
    run = tmp_path / "run"
    doc = small_demo(sweep=None, drop=("finetune", "evaluate", "analyze"))
    doc["convert"]["ratio"] = 0.15  # the first point of the sweep: the same tasks, by hash
    yaml_path = write_yaml(tmp_path / "kill.yaml", doc)
    env = subprocess_env(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "upcycle", "run", str(yaml_path), "--out", str(run)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    checkpoint = run / "pretrain" / "moe" / "checkpoints" / "step-2"
    deadline = time.monotonic() + 300
    while not checkpoint.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.is_dir() and not (run / "pretrain" / "moe" / "final").exists(), "killed too late"
    assert records(run)["pretrain/moe"]["status"] == "running"

    code, out, err = run_upcycle(["run", yaml_path, "--out", run])
    assert code == 0, err[-3000:]
    assert "pretrain/moe: " in out and "(continuing from its newest checkpoint)" in out
    assert "seed/seed" not in EXECUTED.findall(out)  # finished before the kill: not run again
    ours, theirs = plan_tasks(run), plan_tasks(sweep["run"])
    by_hash = {t["hash"]: t for t in theirs.values()}
    for key in ("pretrain/moe", "pretrain/dense"):
        other = Path(by_hash[ours[key]["hash"]]["out"])  # the same task in the uninterrupted run
        assert _losses(run / "pretrain" / key.split("/")[1]) == _losses(other)
        mine, reference = _safetensors(Path(ours[key]["out"]) / "final"), _safetensors(other / "final")
        assert mine.keys() == reference.keys()
        assert all(torch.equal(mine[k], reference[k]) for k in mine), key
