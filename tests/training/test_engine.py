"""Units of the shared engine: ownership-aware pruning, the package's import cost, the module layout."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.training.test_resilience import subprocess_env
from upcycle.training import checkpoint as ckpt

SRC = Path(__file__).resolve().parents[2] / "src" / "upcycle" / "training"


def checkpoint(root: Path, step: int, run_id: str | None, manifest: bool = True) -> Path:
    folder = root / f"step-{step}"
    (folder / ckpt.STATE_DIR).mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / ckpt.STATE_DIR / ckpt.TRAINER_STATE).write_text(json.dumps({"step": step, "run_id": run_id}))
    if manifest:
        ckpt.write_manifest(folder, step)
    return folder


def test_prune_deletes_only_this_runs_complete_checkpoints(tmp_path):
    checkpoint(tmp_path, 2, "other")  # another run's
    for s in (4, 6, 8, 14):
        checkpoint(tmp_path, s, "me")
    checkpoint(tmp_path, 10, "me", manifest=False)  # cut short: nobody's to delete
    checkpoint(tmp_path, 12, None)  # written before checkpoints recorded run ids: anyone's
    removed = ckpt.prune(tmp_path, keep_last=1, current_step=8, run_id="me", protect=(4,))
    # Kept: the other run's 2, the protected best 4, the newest 8, the incomplete 10; gone: 6, and the
    # abandoned futures 12 and 14.
    assert sorted(p.name for p in removed) == ["step-12", "step-14", "step-6"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4, 8, 10]
    foreign = {f.name: why for f, why in ckpt.foreign_checkpoints(tmp_path, "me")}
    assert foreign == {"step-2": "run other", "step-10": "incomplete: no manifest.json"}
    moved = ckpt.set_aside(tmp_path / "step-10")
    assert moved.name == "step-10.set-aside" and (moved / "config.json").is_file()
    assert ckpt.set_aside(checkpoint(tmp_path, 10, "x", manifest=False)).name == "step-10.set-aside-2"


def test_importing_the_package_loads_no_engine():
    code = (
        "import sys, upcycle.training as t; t.FinetuneConfig(); t.PretrainConfig();"
        "print(sorted(m for m in ('datasets', 'upcycle.training.loop', 'upcycle.data.packing') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_no_engine_function_is_over_100_lines():
    for path in SRC.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 100, f"{path.name}: {node.name}"
