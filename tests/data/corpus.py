"""A small, learnable local corpus written by the tests (the Hub is not reachable in CI)."""

from __future__ import annotations

import json
import random
from pathlib import Path

ADJ = ["red", "blue", "green", "small", "big", "old", "new", "quiet", "happy", "dark"]
NOUN = ["cat", "dog", "bird", "house", "car", "tree", "river", "park", "city", "child"]
VERB = ["sees", "likes", "finds", "follows", "paints", "builds", "watches", "takes"]


def make_texts(n_docs: int = 300, seed: int = 0) -> list[str]:
    """Documents of 1–6 template sentences ("the red cat sees the old tree."): a model learns their
    distribution within a few dozen steps, so "loss falls" is a quick, robust check."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        sentences = [
            f"the {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(VERB)} the {rng.choice(ADJ)} {rng.choice(NOUN)}."
            for _ in range(rng.randint(1, 6))
        ]
        docs.append(f"Story {i}: " + " ".join(sentences))
    return docs


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({field: t, "id": len(t)}) + "\n")
    return path


def write_corpus(root: Path, n_docs: int = 300, seed: int = 0) -> dict[str, Path]:
    """train.jsonl and a held-out eval.jsonl (different seed)."""
    root.mkdir(parents=True, exist_ok=True)
    return {
        "train": write_jsonl(root / "train.jsonl", make_texts(n_docs, seed)),
        "eval": write_jsonl(root / "eval.jsonl", make_texts(60, seed + 1000)),
    }
