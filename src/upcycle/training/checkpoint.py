"""Checkpoints that survive crashes: atomic writes, a checksummed manifest, fallback to the previous one.

Layout of ``RUN_DIR/checkpoints/step-N/``:

    config.json, model*.safetensors, tokenizer files   a Hugging Face folder: from_pretrained() loads it
    training_state/                                     Accelerate's optimizer, scaler, RNG states and the
                                                        LR scheduler; our data-stream and trainer state
    manifest.json                                       size and SHA-256 of every file above, written last

The folder is written under a temporary name and renamed into place when complete (``upcycle.io``), so a
crash while saving leaves the previous checkpoint as the newest one. A folder whose manifest is missing or
does not match its files (a copy cut short, a flipped bit) is reported by name and skipped on resume.
Old checkpoints are pruned only after a new one is complete, and renamed out of the way before deletion
so a crash mid-deletion cannot leave a half-deleted folder that looks like a checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from upcycle.io import atomic_output_dir

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STATE_DIR = "training_state"
TRAINER_STATE = "trainer_state.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every ``step-N`` folder under ``root``, oldest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _STEP_RE.match(entry.name)
        if m and entry.is_dir():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: str | os.PathLike, step: int) -> None:
    """Record size and SHA-256 of every file; written last, so its presence means "complete"."""
    folder = Path(folder)
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in _files(folder)
    }
    (folder / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))


def verify_checkpoint(folder: str | os.PathLike) -> str | None:
    """None if the checkpoint is complete and intact, else why not (one line)."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "incomplete: no manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return "corrupted manifest.json"
    for required in ("config.json", f"{STATE_DIR}/{TRAINER_STATE}"):
        if required not in files:
            return f"incomplete: manifest lists no {required}"
    for rel, meta in files.items():
        path = folder / rel
        if not path.is_file():
            return f"incomplete: {rel} is missing"
        if path.stat().st_size != meta["size"]:
            return f"corrupted: {rel} has {path.stat().st_size} bytes, expected {meta['size']}"
        if sha256_file(path) != meta["sha256"]:
            return f"corrupted: {rel} does not match its checksum"
    return None


def find_resumable(
    run_dir: str | os.PathLike, warn: Callable[[str], None] = print
) -> tuple[int, Path] | None:
    """The newest intact checkpoint; each newer broken one is reported by name and skipped."""
    for step, folder in reversed(list_checkpoints(Path(run_dir) / CHECKPOINTS)):
        problem = verify_checkpoint(folder)
        if problem is None:
            return step, folder
        warn(f"checkpoint {folder} is unusable ({problem}); trying the previous one")
    return None


def clean_temporaries(root: str | os.PathLike) -> list[Path]:
    """Remove leftovers of interrupted saves and deletions (hidden ``.step-N.*`` folders)."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(".step-") and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def remove_checkpoint(folder: Path) -> None:
    """Rename out of the way first: a crash during rmtree then leaves a hidden temporary, not a
    half-deleted ``step-N`` that --resume would have to reject."""
    doomed = folder.with_name(f".{folder.name}.deleting-{os.getpid()}")
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def checkpoint_owner(folder: Path) -> str | None:
    """Why a checkpoint folder may not be ours to delete: None if it is complete (has its manifest) and
    records a run id, else the reason; see :func:`owned_by`."""
    if not (folder / MANIFEST).is_file():
        return "incomplete: no manifest.json"
    try:
        run_id = json.loads((folder / STATE_DIR / TRAINER_STATE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return f"unreadable {STATE_DIR}/{TRAINER_STATE}"
    return None if run_id is None else f"run {run_id}"


def owned_by(folder: Path, run_id: str | None) -> bool:
    """A complete checkpoint written by the run ``run_id`` (any run's when ``run_id`` is None)."""
    reason = checkpoint_owner(folder)
    return reason is None or (reason.startswith("run ") and (run_id is None or reason == f"run {run_id}"))


def foreign_checkpoints(root: str | os.PathLike, run_id: str | None) -> list[tuple[Path, str]]:
    """(folder, why) of every ``step-N`` folder that the run ``run_id`` did not write completely: pruning
    never deletes these (issue 11), and a save of the same step sets them aside first."""
    return [(f, checkpoint_owner(f) or "") for _, f in list_checkpoints(root) if not owned_by(f, run_id)]


def set_aside(folder: Path) -> Path:
    """Rename a checkpoint folder this run must not delete out of the way of a new save of its step."""
    n, target = 1, folder.with_name(f"{folder.name}.set-aside")
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.set-aside-{n}")
    os.replace(folder, target)
    return target


def prune(
    root: str | os.PathLike,
    keep_last: int,
    current_step: int,
    run_id: str | None = None,
    protect: tuple[int, ...] = (),
) -> list[Path]:
    """After ``step-<current_step>`` is complete: of the checkpoints the run ``run_id`` wrote, drop all but
    the newest ``keep_last`` (0 keeps all) and any numbered after the current step (an abandoned future
    of a resumed run), but never a ``protect``ed step (the best one). Folders the run did not write
    completely (:func:`foreign_checkpoints`) are never deleted."""
    checkpoints = [(s, f) for s, f in list_checkpoints(root) if owned_by(f, run_id)]
    doomed = [folder for step, folder in checkpoints if step > current_step and step not in protect]
    kept = [(s, f) for s, f in checkpoints if s <= current_step]
    if keep_last > 0 and len(kept) > keep_last:
        doomed += [folder for step, folder in kept[:-keep_last] if step not in protect]
    for folder in doomed:
        remove_checkpoint(folder)
    return doomed


def save_checkpoint(
    accelerator,
    model,
    tokenizer,
    folder: Path,
    step: int,
    write_extra: Callable[[Path], None],
) -> Path:
    """Write a complete checkpoint atomically; every process must call this (FSDP/DeepSpeed gather).

    ``write_extra(state_dir)`` writes the data-stream and trainer state (main process only).
    """
    from accelerate.utils import broadcast_object_list

    main = accelerator.is_main_process
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_output_dir(folder, overwrite=True)) if main else None
        # All processes write into the main process's temporary folder (shared file system).
        tmp = Path(broadcast_object_list([str(tmp) if main else None])[0])
        save_model(accelerator, model, tokenizer, tmp)
        accelerator.save_state(str(tmp / STATE_DIR))
        if main:
            write_extra(tmp / STATE_DIR)
        accelerator.wait_for_everyone()
        if main:
            write_manifest(tmp, step)
    accelerator.wait_for_everyone()
    return folder


def save_model(accelerator, model, tokenizer, folder: Path) -> None:
    """The model as a Hugging Face folder (+ tokenizer). Under FSDP/DeepSpeed the full state dict is
    gathered on every process first."""
    from accelerate.utils import DistributedType

    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    state_dict = accelerator.get_state_dict(model) if sharded else None
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)


def read_trainer_state(folder: Path) -> dict:
    return json.loads((Path(folder) / STATE_DIR / TRAINER_STATE).read_text())
