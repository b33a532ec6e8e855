"""Opening sources from several threads of one process (the data thread and the evaluation stream)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import datasets

from tests.data.corpus import make_texts, write_jsonl
from upcycle.data.sources import open_stream, resolve_source


def test_sources_open_one_at_a_time_across_threads(tmp_path, monkeypatch):
    """datasets' load_dataset is not thread-safe (tqdm lock, cache lock files): concurrent openers queue."""
    spec = resolve_source(
        str(write_jsonl(tmp_path / "d.jsonl", make_texts(4, seed=0))), None, "train", "text"
    )
    inside, most = [0], [0]
    guard = threading.Lock()

    def slow_load(*args, **kwargs):
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.05)
        with guard:
            inside[0] -= 1
        return "stream"

    monkeypatch.setattr(datasets, "load_dataset", slow_load)
    threads = [threading.Thread(target=open_stream, args=(spec,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1


def test_opening_a_source_keeps_tqdm_lock_for_other_threads(tmp_path):
    """The CI failure "cannot open dataset ...: type object 'tqdm' has no attribute '_lock'": load_dataset's
    thread_map deletes tqdm's class lock on exit when it had to create it, while a progress bar another
    thread opened meanwhile is still to close. Replayed deterministically inside a stand-in load_dataset, in
    a fresh interpreter (tqdm's lock is process state that earlier tests may have created)."""
    path = write_jsonl(tmp_path / "d.jsonl", make_texts(4, seed=0))
    code = f"""
import io
import datasets
from tqdm.contrib.concurrent import ensure_lock
from datasets.utils.tqdm import tqdm as hf_tqdm
from upcycle.data.sources import open_stream, resolve_source

def load_dataset(*args, **kwargs):
    with ensure_lock(hf_tqdm):  # load_dataset's thread_map resolving data files
        bar = hf_tqdm(total=1, file=io.StringIO(), disable=False)  # another thread's bar
    bar.close()  # after the thread_map ended
    return "stream"

datasets.load_dataset = load_dataset
print(open_stream(resolve_source({str(path)!r}, None, "train", "text")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "stream", out.stderr[-2000:]
