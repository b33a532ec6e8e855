"""Document sources: a Hugging Face hub dataset or local JSON lines / Parquet / plain text, streamed.

Everything goes through ``datasets.load_dataset(..., streaming=True)``, so C4 (hundreds of GB) and a test
file behave alike, and the stream position is datasets' own ``state_dict()`` (shard index + example index
in the shard). :class:`DocumentStream` adds what a training run needs on top: endless epochs, a per-epoch
seeded order of local files, skipping of empty documents, a count of documents read, and a JSON-ready
state from which it continues with the next unread document (issue 4: resume "without re-reading what
was consumed"; datasets may still scan a compressed shard up to the position, but yields nothing twice).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from upcycle.config import ConfigError, UserError, first_line
from upcycle.io import expand_path, looks_like_path

#: File suffixes → datasets builder. Compressed variants are read transparently by datasets.
SUFFIX_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".jsonl.zst": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".txt.gz": "text",
}


def _suffix_builder(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted(SUFFIX_BUILDERS, key=len, reverse=True):
        if name.endswith(suffix):
            return SUFFIX_BUILDERS[suffix]
    return None


def looks_local(name: str) -> bool:
    """A path that exists, or a spelling that can only be a path (./x, /x, ~/x, a/b/c, x.jsonl)."""
    return looks_like_path(name) or _suffix_builder(Path(name)) is not None


def _has_no_documents(path: Path) -> bool:
    """An empty file, or a small uncompressed one holding only blank space (a large file is not read)."""
    size = path.stat().st_size
    if size == 0:
        return True
    if size > 1 << 16 or path.name.lower().endswith((".gz", ".zst", ".parquet")):
        return False
    try:
        return not path.read_bytes().strip()
    except OSError:
        return False


@dataclass(frozen=True)
class SourceSpec:
    """Where documents come from. ``files`` is set for local data (sorted), None for a hub dataset."""

    name: str
    config: str | None
    split: str
    text_field: str
    builder: str | None = None
    files: tuple[str, ...] | None = None

    @property
    def is_local(self) -> bool:
        return self.files is not None

    def describe(self) -> str:
        if self.is_local:
            n = len(self.files or ())
            return f"{self.name} ({self.builder}, {n} file{'s' if n != 1 else ''})"
        return f"{self.name}" + (f" ({self.config}, {self.split})" if self.config else f" ({self.split})")


def resolve_source(
    name: str, config: str | None, split: str, text_field: str, *, field: str = "data"
) -> SourceSpec:
    """Resolve ``--data`` (or ``--eval-data``): a local file or folder, else a hub dataset id."""
    if not looks_local(name):
        return SourceSpec(name, config, split, text_field)
    path = expand_path(name)
    if not path.exists():
        raise ConfigError(field, name, "no such file or folder")
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix_builder(p) is not None)
        if not files:
            known = ", ".join(sorted(SUFFIX_BUILDERS))
            raise ConfigError(field, name, f"the folder holds no data files (known suffixes: {known})")
    builders = {_suffix_builder(p) for p in files}
    if None in builders:
        known = ", ".join(sorted(SUFFIX_BUILDERS))
        raise ConfigError(field, name, f"unknown file type; known suffixes are {known}")
    if len(builders) > 1:
        raise ConfigError(field, name, f"mixes file types ({', '.join(sorted(builders))}); use one kind")
    if all(_has_no_documents(p) for p in files):
        raise ConfigError(
            field, name, "the file has no documents" if path.is_file() else "its files have no documents"
        )
    return SourceSpec(name, None, split, text_field, builders.pop(), tuple(str(p) for p in files))


#: One ``load_dataset`` at a time in this process: the training data thread and the main thread (the
#: evaluation stream) open sources concurrently, and datasets is not thread-safe there (see below).
_open_lock = threading.Lock()


def _keep_tqdm_lock() -> None:
    """Create tqdm's class-level lock once, for good.

    ``load_dataset`` resolves data files with ``tqdm.contrib.concurrent.thread_map``, whose
    ``ensure_lock`` deletes ``tqdm._lock`` on exit when it had to create it. A progress bar in another
    thread then fails with "type object 'tqdm' has no attribute '_lock'" (seen when a rank opened its
    evaluation stream while its data thread opened the training stream). With the lock in place before
    any ``thread_map``, ``ensure_lock`` finds it and restores rather than deletes it.
    """
    from tqdm import tqdm

    tqdm.get_lock()


def open_stream(spec: SourceSpec, file_order: list[str] | None = None, attempts: int = 4):
    """A streaming ``datasets.IterableDataset`` of the source (local files in ``file_order``).

    Several processes (ranks of one run, or runs sharing a cache) open the same source at once, and
    datasets coordinates them through lock files in its cache, a step known to race (huggingface/datasets
    #543, #2187): file-system errors are retried a few times with a short random back-off. Within one
    process, calls are serialised and tqdm's lock is kept (:func:`_keep_tqdm_lock`).
    """
    _keep_tqdm_lock()
    with _open_lock:
        return _open_stream(spec, file_order, attempts)


def _open_stream(spec: SourceSpec, file_order: list[str] | None, attempts: int):
    import random
    import time

    from datasets import load_dataset

    for attempt in range(attempts):
        try:
            if spec.is_local:
                # One shard per file; "line" samples make each line of a text file one document.
                files = list(file_order or spec.files or ())
                return load_dataset(spec.builder, data_files={"train": files}, split="train", streaming=True)
            return load_dataset(spec.name, spec.config, split=spec.split, streaming=True)
        except OSError:
            if attempt + 1 < attempts and spec.is_local:  # the Hub client retries on its own
                time.sleep(0.2 * 2**attempt * (1 + random.random()))
                continue
            error = sys.exc_info()[1]
        except StopIteration:  # datasets infers the columns from the first example: there is none
            raise UserError(f"{spec.describe()}: the file has no documents") from None
        except Exception as exc:  # unknown dataset or config, unreadable file
            error = exc
        first = first_line(error)
        raise UserError(
            f"cannot open dataset {spec.describe()}: {first}"
            + ("" if spec.is_local else " (offline? pass a local folder or file with --data / --eval-data)")
        ) from error
    raise AssertionError("unreachable")


class DocumentStream:
    """Documents (strings) of a source, epoch after epoch, with a resumable position.

    ``loop=False`` gives a single pass (evaluation). Local files are read in a seeded order that changes
    each epoch, so a multi-file corpus is not seen in the same file order twice.
    """

    def __init__(self, spec: SourceSpec, seed: int = 0, loop: bool = True, field: str = "data"):
        self.spec = spec
        self.seed = seed
        self.loop = loop
        self.field = field
        self.epoch = 0
        self.documents = 0  # documents taken from the source since the start of the run (all epochs)
        self.session_documents = 0  # documents read by this process (proves resume does not re-read)
        self._source_state: dict | None = None
        self._ds = None
        self._iter = None
        self._nonempty_in_epoch: int | None = 0
        self.finished = False  # a single pass (loop=False) has ended

    # ------------------------------------------------------------------ iteration
    def _file_order(self) -> list[str] | None:
        if not self.spec.is_local:
            return None
        files = list(self.spec.files or ())
        if len(files) > 1:
            rng = np.random.default_rng([self.seed, self.epoch])
            files = [files[i] for i in rng.permutation(len(files))]
        return files

    def _open(self) -> None:
        self._ds = open_stream(self.spec, self._file_order())
        if self._source_state is not None:
            self._ds.load_state_dict(self._source_state)
        self._iter = iter(self._ds)

    def _text(self, example: dict) -> str:
        field = self.spec.text_field
        if field not in example:
            raise ConfigError(
                "text_field",
                field,
                f"not a column of {self.spec.describe()}; columns are {', '.join(example)}",
            )
        text = example[field]
        if not isinstance(text, str):
            raise ConfigError("text_field", field, f"column holds {type(text).__name__} values, not text")
        return text

    def take(self, n: int) -> list[str]:
        """Up to ``n`` non-empty documents (fewer only at the end of a single pass)."""
        out: list[str] = []
        while len(out) < n and not self.finished:
            if self._iter is None:
                self._open()
            try:
                example = next(self._iter)
            except StopIteration:
                if self._nonempty_in_epoch == 0:
                    raise UserError(f"{self.spec.describe()} holds no non-empty documents") from None
                self._source_state, self._iter = None, None
                if not self.loop:
                    self.finished = True
                    break
                self.epoch += 1
                self._nonempty_in_epoch = 0
                continue
            except (ConfigError, UserError):
                raise
            except Exception as exc:  # a malformed file surfaces here, mid-stream
                raise UserError(f"error reading {self.spec.describe()}: {first_line(exc)}") from exc
            self.documents += 1
            self.session_documents += 1
            text = self._text(example)
            if text.strip():
                out.append(text)
                if self._nonempty_in_epoch is not None:
                    self._nonempty_in_epoch += 1
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """JSON-ready position: epoch, datasets' stream state (None at an epoch start), documents read."""
        import copy

        # datasets' state is that of the latest example yielded, i.e. everything this stream has taken.
        source = self._ds.state_dict() if self._iter is not None else copy.deepcopy(self._source_state)
        return {"epoch": self.epoch, "source": source, "documents": self.documents}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self._source_state = state.get("source")
        self.documents = int(state.get("documents", 0))
        self._iter = None
        self._nonempty_in_epoch = None  # unknown: the epoch began before the checkpoint
