"""Classification examples in memory and the batches ``upcycle finetune`` trains and validates on.

Examples are encoded once with :func:`upcycle.data.xnli.encode_examples` (the pair format documented
there) and kept as one flat int32 token array with row offsets, so XNLI's 392,702 English pairs (or all
15 languages) cost a few bytes per token instead of a Python list per row.

Training batches (:class:`TrainBatches`) are a pure function of (seed, epoch, micro-batch size): each
epoch is a seeded permutation of the examples; with length grouping, every run of 50 micro-batches of
it is sorted by length and cut into micro-batches, whose order is shuffled again (the idea of Hugging
Face's ``LengthGroupedSampler``), so each micro-batch holds similar lengths and is padded only to its own
longest row. The stream of micro-batches does not depend on the number of processes: round r of W
processes gives process p micro-batch r·W + p, so 2 processes × 2 accumulation steps train on exactly
the micro-batches of 1 process × 4. Each epoch uses the whole effective batches it holds (the remainder,
a different one every epoch, waits for the next). The position is two integers (epoch, micro-batch), so a
resumed run continues exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Micro-batches per length-sorted group (Hugging Face's LengthGroupedSampler uses mega-batches of 50).
GROUP = 50


@dataclass
class EncodedExamples:
    """Token ids of N examples (flat, with offsets), their labels and the index of their language."""

    tokens: np.ndarray
    """(total,) int32: every row's ids, one after another."""
    offsets: np.ndarray
    """(N + 1,) int64: row i is tokens[offsets[i]:offsets[i + 1]]."""
    labels: np.ndarray
    """(N,) int64 label ids."""
    language: np.ndarray
    """(N,) int16 index into ``languages``."""
    languages: list[str]

    @classmethod
    def from_rows(cls, rows: Sequence[list[int]], labels: Sequence[int], language: str) -> EncodedExamples:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(offsets[-1]))
        return cls(
            flat,
            offsets,
            np.asarray(labels, dtype=np.int64),
            np.zeros(len(rows), dtype=np.int16),
            [language],
        )

    @classmethod
    def concat(cls, parts: Sequence[EncodedExamples]) -> EncodedExamples:
        languages: list[str] = []
        tokens, offsets, labels, language = [], [np.zeros(1, dtype=np.int64)], [], []
        base = 0
        for part in parts:
            shift = len(languages)
            languages += part.languages
            tokens.append(part.tokens)
            offsets.append(part.offsets[1:] + base)
            base += int(part.offsets[-1])
            labels.append(part.labels)
            language.append(part.language + shift)
        return cls(
            np.concatenate(tokens) if tokens else np.zeros(0, np.int32),
            np.concatenate(offsets),
            np.concatenate(labels) if labels else np.zeros(0, np.int64),
            np.concatenate(language).astype(np.int16) if language else np.zeros(0, np.int16),
            languages,
        )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> list[int]:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]].tolist()

    def batch(self, indices: Sequence[int], pad_id: int, side: str = "right") -> dict:
        """{input_ids, attention_mask, labels, language} of these rows, padded to the longest of them."""
        import torch

        from upcycle.data.xnli import pad_batch

        ids, mask = pad_batch([self.row(int(i)) for i in indices], pad_id, side)
        idx = np.asarray(indices, dtype=np.int64)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.from_numpy(self.labels[idx].copy()),
            "language": torch.from_numpy(self.language[idx].astype(np.int64)),
        }


def epoch_micro_batches(
    lengths: np.ndarray, micro_batch: int, seed: int, epoch: int, group: bool
) -> np.ndarray:
    """(M, micro_batch) example indices of one epoch, M = N // micro_batch (see the module docstring)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    m = len(order) // micro_batch
    order = order[: m * micro_batch]
    if group and m > 1:
        chunk = GROUP * micro_batch
        parts = []
        for start in range(0, len(order), chunk):
            part = order[start : start + chunk]
            parts.append(part[np.argsort(-lengths[part], kind="stable")])
        order = np.concatenate(parts)
    batches = order.reshape(m, micro_batch)
    return batches[rng.permutation(m)] if group else batches


class TrainBatches:
    """This process's micro-batches of the global stream (module docstring); resumable by position."""

    STATE_FILE = "classification_data.json"

    def __init__(self, examples: EncodedExamples, micro_batch: int, per_step: int, seed: int, group: bool):
        """``per_step``: micro-batches per optimizer step over all processes (grad-accum × processes)."""
        self.examples, self.micro_batch, self.seed, self.group = examples, micro_batch, seed, group
        self.per_step = per_step
        self.epoch, self.index = 0, 0
        self.consumed = 0
        """Micro-batches of the global stream trained on so far (all processes)."""
        self._order: np.ndarray | None = None
        if self.steps_per_epoch == 0:
            from upcycle.config import UserError

            raise UserError(
                f"the training data has {len(examples)} examples, fewer than one optimizer step takes "
                f"({micro_batch * per_step} = batch size × accumulation × processes)"
            )

    @property
    def steps_per_epoch(self) -> int:
        return len(self.examples) // self.micro_batch // self.per_step

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            lengths = self.examples.lengths
            self._order = epoch_micro_batches(lengths, self.micro_batch, self.seed, self.epoch, self.group)
        return self._order

    def next_step(self, rank: int, world: int) -> list[np.ndarray]:
        """The index arrays of this process's micro-batches for one optimizer step."""
        if self.index + self.per_step > self.steps_per_epoch * self.per_step:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        order = self._epoch_order()
        mine = [order[self.index + j] for j in range(rank, self.per_step, world)]
        self.index += self.per_step
        self.consumed += self.per_step
        return mine

    @property
    def epoch_progress(self) -> float:
        """Epochs completed, as a fraction (2.5 = halfway through the third epoch)."""
        return self.epoch + self.index / max(1, self.steps_per_epoch * self.per_step)

    def save(self, folder: str | Path) -> None:
        state = {
            "epoch": self.epoch,
            "index": self.index,
            "consumed": self.consumed,
            "examples": len(self.examples),
        }
        (Path(folder) / self.STATE_FILE).write_text(json.dumps(state))

    def restore(self, folder: str | Path) -> None:
        state = json.loads((Path(folder) / self.STATE_FILE).read_text())
        if int(state["examples"]) != len(self.examples):
            from upcycle.config import UserError

            raise UserError(
                f"the checkpoint was trained on {state['examples']} examples, the data now has "
                f"{len(self.examples)}: the training data changed since the run started"
            )
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None
        self.consumed = int(state["consumed"])


def eval_batches(examples: EncodedExamples, batch_size: int) -> list[np.ndarray]:
    """Index arrays of length-sorted evaluation batches (longest first: the first batch allocates the
    most memory, so a too-large batch fails at once)."""
    order = np.argsort(-examples.lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


__all__ = ["GROUP", "EncodedExamples", "TrainBatches", "epoch_micro_batches", "eval_batches"]
