"""Sources, packing, the shuffle buffer, process rounds, and exact resume without re-reading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.data.corpus import make_texts, write_jsonl
from upcycle.config import ConfigError, UserError
from upcycle.data.packing import PackedBlocks, PipelineState, Prefetcher
from upcycle.data.sources import DocumentStream, SourceSpec, resolve_source
from upcycle.data.tokenizers import gpt2_tokenizer_offline

EOS = 50256


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer_offline()


@pytest.fixture(scope="module")
def texts():
    return make_texts(120, seed=3)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory, texts):
    return write_jsonl(tmp_path_factory.mktemp("d") / "docs.jsonl", texts)


def stream(path, tok, seq_len=16, shuffle=0, seed=0, loop=True, **kw):
    spec = resolve_source(str(path), None, "train", kw.pop("text_field", "text"))
    return PackedBlocks(DocumentStream(spec, seed=seed, loop=loop), tok, seq_len, shuffle, seed)


def take(blocks, n):
    return [blocks.next_block() for _ in range(n)]


def drain(blocks) -> list:
    out = []
    while (b := blocks.next_block()) is not None:
        out.append(b)
    return out


def test_packing_keeps_every_token_in_order_with_eos_between_documents(jsonl, texts, tok):
    out = drain(stream(jsonl, tok, seq_len=16, loop=False))
    assert all(b.shape == (16,) and b.dtype == np.int32 for b in out)
    expected = np.concatenate([np.asarray([*ids, EOS]) for ids in tok(texts)["input_ids"]])
    got = np.concatenate(out)
    # Everything but the final partial block, in document order, one EOS after each document.
    assert len(got) == len(expected) // 16 * 16
    np.testing.assert_array_equal(got, expected[: len(got)])


def test_shuffle_buffer_is_a_seeded_permutation(jsonl, tok):
    plain = [b.tobytes() for b in take(stream(jsonl, tok, loop=False), 100)]
    shuffled = [b.tobytes() for b in take(stream(jsonl, tok, shuffle=8, seed=1, loop=False), 100)]
    again = [b.tobytes() for b in take(stream(jsonl, tok, shuffle=8, seed=1, loop=False), 100)]
    other = [b.tobytes() for b in take(stream(jsonl, tok, shuffle=8, seed=2, loop=False), 100)]
    assert shuffled == again and shuffled != other and shuffled != plain
    # A buffer of 8 delays a block by a bounded amount and never drops or repeats one.
    full = [b.tobytes() for b in drain(stream(jsonl, tok, shuffle=8, seed=1, loop=False))]
    plain_full = [b.tobytes() for b in drain(stream(jsonl, tok, loop=False))]
    assert sorted(full) == sorted(plain_full)


def test_rounds_split_consecutive_micro_batches_across_processes(jsonl, tok):
    single = stream(jsonl, tok, shuffle=8, seed=4)
    ranks = [stream(jsonl, tok, shuffle=8, seed=4) for _ in range(2)]
    for _ in range(5):
        mb0, mb1 = single.next_round(3), single.next_round(3)
        np.testing.assert_array_equal(ranks[0].next_round(3, world_size=2, rank=0), mb0)
        np.testing.assert_array_equal(ranks[1].next_round(3, world_size=2, rank=1), mb1)


def test_resume_continues_exactly_without_rereading(tmp_path, tok):
    """Across epochs and files (seeded file order per epoch), with a shuffle buffer: the restored
    pipeline yields the same blocks and reads exactly the documents the original read after the save."""
    folder = tmp_path / "corpus"
    for i in range(3):
        write_jsonl(folder / f"part-{i}.jsonl", make_texts(25, seed=10 + i))
    reference = stream(folder, tok, shuffle=8, seed=7)
    expected = [reference.next_round(2) for _ in range(150)]  # > 1 epoch
    assert reference.docs.epoch >= 1

    first = stream(folder, tok, shuffle=8, seed=7)
    head = [first.next_round(2) for _ in range(53)]
    first.snapshot().save(tmp_path, "state")
    read_before = first.docs.documents

    resumed = stream(folder, tok, shuffle=8, seed=7)
    resumed.restore(PipelineState.load(tmp_path, "state"))
    tail = [resumed.next_round(2) for _ in range(97)]
    for a, b in zip(head + tail, expected):
        np.testing.assert_array_equal(a, b)
    assert resumed.docs.session_documents == reference.docs.documents - read_before
    assert json.loads((tmp_path / "state.json").read_text())["docs"]["documents"] == read_before


def test_restore_rejects_a_different_stream(jsonl, tok, tmp_path):
    s = stream(jsonl, tok, seq_len=16)
    s.next_block()
    s.snapshot().save(tmp_path)
    with pytest.raises(UserError, match="seq_len=16"):
        stream(jsonl, tok, seq_len=32).restore(PipelineState.load(tmp_path))


def test_prefetcher_gives_the_same_batches_and_their_states(jsonl, tok):
    direct = stream(jsonl, tok, shuffle=4, seed=1)
    pf = Prefetcher(stream(jsonl, tok, shuffle=4, seed=1), micro_batch=2, max_rounds=10)
    try:
        for _ in range(10):
            batch = pf.next()
            assert batch.dtype == torch.int64 and batch.shape == (2, 16)
            np.testing.assert_array_equal(batch.numpy(), direct.next_round(2))
            assert pf.state.meta["blocks"] == direct.blocks
        with pytest.raises(UserError, match="past the end"):
            pf.next()
    finally:
        pf.close()


@pytest.mark.parametrize("kind", ["parquet", "text"])
def test_parquet_and_plain_text_sources(tmp_path, texts, tok, kind):
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "docs.parquet"
        pq.write_table(pa.table({"text": texts[:20]}), path)
    else:
        path = tmp_path / "docs.txt"
        path.write_text("\n".join(texts[:20]) + "\n\n")  # one document per line; blank lines skipped
    docs = DocumentStream(resolve_source(str(path), None, "train", "text"), loop=False)
    assert docs.take(100) == texts[:20]


def test_source_errors_name_the_flag(tmp_path, jsonl, tok):
    with pytest.raises(ConfigError) as err:
        resolve_source(str(tmp_path / "missing.jsonl"), None, "train", "text")
    assert err.value.field == "data"
    (tmp_path / "mixed").mkdir()
    write_jsonl(tmp_path / "mixed" / "a.jsonl", ["x"])
    (tmp_path / "mixed" / "b.txt").write_text("y\n")
    with pytest.raises(ConfigError, match="mixes file types"):
        resolve_source(str(tmp_path / "mixed"), None, "train", "text", field="eval_data")
    with pytest.raises(ConfigError) as err:
        DocumentStream(resolve_source(str(jsonl), None, "train", "body")).take(1)
    assert err.value.field == "text_field" and "text, id" in err.value.allowed
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    # Refused when resolved (before a run writes anything), and by the stream for files too large or
    # compressed to look into first.
    with pytest.raises(ConfigError, match="the file has no documents"):
        resolve_source(str(empty), None, "train", "text")
    with pytest.raises(UserError, match="no non-empty documents"):
        DocumentStream(SourceSpec(str(empty), None, "train", "text", "text", (str(empty),))).take(1)
    # A hub id is not resolved locally (opened lazily, streamed).
    spec = resolve_source("allenai/c4", "en", "validation", "text")
    assert not spec.is_local and spec.describe() == "allenai/c4 (en, validation)"
