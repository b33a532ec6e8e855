"""Tokenise on the fly, pack documents into fixed-length blocks, shuffle them with a seeded buffer.

    documents ──tokenise──▶ ids + EOS ──pack──▶ blocks of seq_len ──shuffle buffer──▶ global block stream
                                                                                         │ round of W·B blocks
                                                                                         ▼ rank r keeps its B

The block stream is *global*: every process runs the same pipeline from the same seed and keeps the
r-th micro-batch of each round of ``world_size`` micro-batches. Two processes with accumulation A
therefore see exactly the micro-batches of one process with accumulation 2A (issue 4's equivalence
test), and a run can resume with another process count. The price is that every process tokenises the
whole stream (fast tokenizers release the GIL and run in the prefetch thread, off the training loop).

Its state at a round boundary (stream position, packer leftover tokens, shuffle-buffer contents, shuffle
RNG) goes into every checkpoint, so resume continues with the next block without reading any document
again (the design notes' pitfall: "streaming-dataset resume that re-reads everything already consumed").

Shape legend: B micro-batch (sequences per process), S sequence length, W processes.
"""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from upcycle.config import UserError
from upcycle.data.sources import DocumentStream

#: Documents tokenised per call: large enough for the fast tokenizer's batch encoding to pay off.
TOKENIZE_BATCH = 64
STATE_VERSION = 1


class PackedBlocks:
    """An endless (or, for evaluation, finite) stream of ``seq_len``-token blocks.

    Each document is tokenised with the model's tokenizer (its own special tokens, e.g. Llama's BOS), an
    EOS is appended unless already there, and documents are concatenated and cut into blocks, so no
    token is padding and a document may span two blocks (GPT-2's and nanoGPT's packing). With
    ``shuffle_buffer`` > 1, blocks go through a buffer of that many blocks: each new block replaces a
    uniformly drawn one, which is emitted (datasets' and tf.data's buffer shuffle), from a numpy PCG64
    generator seeded with ``seed`` whose state is checkpointed.
    """

    def __init__(
        self,
        docs: DocumentStream,
        tokenizer,
        seq_len: int,
        shuffle_buffer: int = 0,
        seed: int = 0,
    ):
        eos = tokenizer.eos_token_id
        if eos is None:
            raise UserError("the tokenizer has no EOS token to separate packed documents")
        self.docs = docs
        self.tokenizer = tokenizer
        self.eos = int(eos)
        self.seq_len = int(seq_len)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.leftover = np.zeros(0, dtype=np.int32)  # tokenised, not yet in a block
        self.buffer: list[np.ndarray] = []  # shuffle buffer of (S,) blocks
        self.blocks = 0  # blocks emitted since the start of the run
        self.exhausted = False

    # ------------------------------------------------------------------ producing blocks
    def _tokenise(self, texts: list[str]) -> np.ndarray:
        # verbose=False: long documents are expected here (they are cut into blocks), no length warning.
        ids = self.tokenizer(texts, return_attention_mask=False, verbose=False)["input_ids"]
        parts = [self.leftover]
        for doc in ids:
            if not doc or doc[-1] != self.eos:
                doc = [*doc, self.eos]
            parts.append(np.asarray(doc, dtype=np.int32))
        return np.concatenate(parts)

    def _next_packed(self) -> np.ndarray | None:
        """The next block in document order, or None when a single pass is over."""
        while self.leftover.shape[0] < self.seq_len:
            texts = self.docs.take(TOKENIZE_BATCH)
            if not texts:
                return None  # end of a single pass: the partial last block is dropped
            self.leftover = self._tokenise(texts)
        block = self.leftover[: self.seq_len].copy()
        self.leftover = self.leftover[self.seq_len :]
        return block

    def next_block(self) -> np.ndarray | None:
        """The next (S,) int32 block of the stream, or None when a finite stream is exhausted."""
        if self.shuffle_buffer <= 1:
            block = self._next_packed()
        else:
            block = None
            while block is None:
                new = None if self.exhausted else self._next_packed()
                if new is None:
                    # Finite stream: drain the buffer in random order.
                    self.exhausted = True
                    if not self.buffer:
                        return None
                    block = self.buffer.pop(int(self.rng.integers(len(self.buffer))))
                elif len(self.buffer) < self.shuffle_buffer:
                    self.buffer.append(new)  # still filling
                else:
                    i = int(self.rng.integers(len(self.buffer)))
                    block, self.buffer[i] = self.buffer[i], new
        if block is not None:
            self.blocks += 1
        return block

    def next_round(self, micro_batch: int, world_size: int = 1, rank: int = 0) -> np.ndarray | None:
        """One round of ``world_size`` micro-batches; returns this rank's (B, S) share, or None at the end.

        Rank r takes blocks [r·B, (r+1)·B) of the round, so the union over ranks of one round equals
        ``world_size`` consecutive micro-batches of a single process.
        """
        blocks = []
        for _ in range(micro_batch * world_size):
            block = self.next_block()
            if block is None:
                return None
            blocks.append(block)
        return np.stack(blocks[rank * micro_batch : (rank + 1) * micro_batch])

    # ------------------------------------------------------------------ state
    def snapshot(self) -> PipelineState:
        """The state now, cheaply: blocks are never modified in place, so shallow copies suffice."""
        return PipelineState(
            meta={
                "version": STATE_VERSION,
                "seq_len": self.seq_len,
                "shuffle_buffer": self.shuffle_buffer,
                "seed": self.seed,
                "eos": self.eos,
                "blocks": self.blocks,
                "exhausted": self.exhausted,
                "docs": self.docs.state_dict(),
                "rng": self.rng.bit_generator.state,
            },
            leftover=self.leftover,
            buffer=list(self.buffer),
        )

    def restore(self, state: PipelineState) -> None:
        meta = state.meta
        for key in ("seq_len", "shuffle_buffer", "seed", "eos"):
            if meta[key] != getattr(self, key):
                raise UserError(
                    f"the checkpoint's data stream was built with {key}={meta[key]}, this run has "
                    f"{getattr(self, key)}; resume with the run's original setting"
                )
        self.blocks = int(meta["blocks"])
        self.exhausted = bool(meta.get("exhausted", False))
        self.docs.load_state_dict(meta["docs"])
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = meta["rng"]
        self.leftover = np.asarray(state.leftover, dtype=np.int32)
        self.buffer = [np.asarray(b, dtype=np.int32) for b in state.buffer]


@dataclass
class PipelineState:
    """A data-stream state: JSON metadata plus the token arrays (leftover (L,), shuffle buffer (N, S))."""

    meta: dict[str, Any]
    leftover: np.ndarray
    buffer: list[np.ndarray]

    def save(self, folder: str | Path, prefix: str = "data_state") -> list[Path]:
        """``<prefix>.json`` + ``<prefix>.safetensors`` (no pickle: the state is plain ints)."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        seq_len = int(self.meta["seq_len"])
        buffer_NS = np.stack(self.buffer) if self.buffer else np.zeros((0, seq_len), dtype=np.int32)
        arrays = {
            "leftover": np.ascontiguousarray(self.leftover, dtype=np.int32),
            "buffer": np.ascontiguousarray(buffer_NS, dtype=np.int32),
        }
        paths = [folder / f"{prefix}.json", folder / f"{prefix}.safetensors"]
        paths[0].write_text(json.dumps(self.meta, indent=1))
        save_file(arrays, str(paths[1]))
        return paths

    @classmethod
    def load(cls, folder: str | Path, prefix: str = "data_state") -> PipelineState:
        from safetensors.numpy import load_file

        folder = Path(folder)
        meta = json.loads((folder / f"{prefix}.json").read_text())
        arrays = load_file(str(folder / f"{prefix}.safetensors"))
        return cls(meta, arrays["leftover"], list(arrays["buffer"]))


_PAST_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetcher:
    """Builds this rank's micro-batches in a background thread, each tagged with the pipeline state
    after it, so the training loop never waits on tokenisation and a checkpoint records exactly the
    state after the last micro-batch it consumed.

    ``next()`` returns a (B, S) int64 tensor; ``state`` is the :class:`PipelineState` after it.
    ``max_rounds`` (the micro-batches the run still needs) keeps the thread from reading past the end of
    the run, so the documents a process reads are exactly those it trains on.
    """

    def __init__(
        self,
        blocks: PackedBlocks,
        micro_batch: int,
        world_size: int = 1,
        rank: int = 0,
        depth: int = 4,
        max_rounds: int | None = None,
    ):
        self.blocks = blocks
        self.max_rounds = max_rounds
        self.micro_batch = micro_batch
        self.world_size = world_size
        self.rank = rank
        self.state: PipelineState = blocks.snapshot()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="upcycle-data", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            rounds = 0
            while not self._stop.is_set():
                if self.max_rounds is not None and rounds >= self.max_rounds:
                    self._put(_PAST_END)
                    return
                rounds += 1
                batch_BS = self.blocks.next_round(self.micro_batch, self.world_size, self.rank)
                if batch_BS is None:
                    self._put(None)
                    return
                if not self._put((torch.from_numpy(batch_BS).long(), self.blocks.snapshot())):
                    return
        except BaseException as exc:  # surfaced in the training loop, with its traceback
            self._put(_Failure(exc))

    def next(self) -> torch.Tensor:
        item = self._queue.get()
        if item is _PAST_END:
            self._put(_PAST_END)  # stays at the end for further calls
            raise UserError("the training data stream was read past the end of the run")
        if item is None:
            raise UserError("the training data stream ended unexpectedly")
        if isinstance(item, _Failure):
            raise item.exc
        batch, self.state = item
        return batch

    @property
    def session_documents(self) -> int:
        return self.blocks.docs.session_documents

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
