"""Generated experiment YAMLs and flag values thrown at `upcycle run` (dry runs: cheap): never a traceback,
always one `error:` line with exit status 2, or a valid plan with exit status 0, and nothing written.

The documents start from the demo experiment and are mutated the way people get YAML wrong: values of
another type or out of range, misspelt and unknown keys, keys moved to another section, references that
do not exist, sections that are not mappings, sweeps over keys that are ambiguous or do not exist.
"""

from __future__ import annotations

import copy

import yaml
from hypothesis import given
from hypothesis import strategies as st

from tests.clitools import files_under
from tests.experiment.conftest import small_demo
from tests.test_cli_fuzz import FUZZ, TRICKY, YAML_VALUE, _check

SECTIONS = ("data", "seed", "convert", "pretrain", "finetune", "evaluate", "analyze", "report", "sweep")
KEYS = ["steps", "lr", "ratio", "top_k", "experts", "method", "data", "model", "seq_len", "batch_size", "settings",
        "train_languages", "variants", "baseline", "of", "task", "languages", "group_by", "max_tokens", "paper",
        "routing_unit", "router_mode", "preset", "out", "resume", "lr_rate", "stepz", "xnli", "routing", "training",
        "fertility", "domains", "name", "sweep", "{seed}", "evaluate.xnli.limit", "convert.ratio"]  # fmt: skip
REFERENCES = st.sampled_from(["{data}/xnli", "{seed}", "{specialists.x}", "{run}", "{nope}", "{data", "{}"])
VALUE = st.one_of(YAML_VALUE, REFERENCES, st.lists(st.one_of(TRICKY, st.floats(0, 1)), max_size=3))


def _paths(doc, prefix=()) -> list[tuple]:
    out = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            out.append((*prefix, key))
            out += _paths(value, (*prefix, key))
    return out


@st.composite
def documents(draw) -> str:
    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(doc)
        action = draw(st.sampled_from(["set", "set", "add", "delete", "sweep", "section"]))
        if action in ("set", "delete") and paths:
            path = draw(st.sampled_from(paths))
            node = doc
            for part in path[:-1]:
                node = node[part]
            if action == "delete":
                node.pop(path[-1], None)
            else:
                node[path[-1]] = draw(VALUE)
        elif action == "add" and paths:
            section = draw(st.sampled_from([p for p in paths if len(p) == 1]))
            if isinstance(doc.get(section[0]), dict):
                doc[section[0]][draw(st.sampled_from(KEYS))] = draw(VALUE)
        elif action == "sweep":
            doc["sweep"] = draw(st.one_of(
                st.dictionaries(st.sampled_from(KEYS), st.one_of(st.lists(VALUE, max_size=3), VALUE), max_size=2),
                st.lists(st.dictionaries(st.sampled_from(KEYS), st.lists(VALUE, min_size=1, max_size=2)), max_size=2),
                VALUE,
            ))  # fmt: skip
        else:
            doc[draw(st.sampled_from(SECTIONS))] = draw(VALUE)
    return yaml.safe_dump(doc, allow_unicode=True)


BASE = small_demo(sweep=[0.15, 0.5])
FLAGS = st.lists(
    st.one_of(
        st.tuples(st.just("--only"), st.sampled_from(["finetune", "report", "seed", "x", ""])),
        st.tuples(st.just("--from"), st.sampled_from(["evaluate", "data", "analyze", "pretrain", "y"])),
    ),
    max_size=2,
)


def test_generated_experiments_never_end_in_a_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "exp.yaml"

    @FUZZ
    @given(documents(), FLAGS)
    def fuzz(document, flags):
        path.write_text(document)
        argv = ["run", str(path), "--dry-run", "--out", str(tmp_path / "run")]
        _check(argv + [part for flag in flags for part in flag])

    fuzz()
    assert files_under(tmp_path) == {"exp.yaml"}  # dry runs write nothing


def test_the_unmutated_document_plans(capsys, tmp_path):
    from tests.clitools import run_cli

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(BASE))
    code, out, err = run_cli(capsys, ["run", path, "--dry-run", "--out", tmp_path / "run"])
    assert code == 0 and "25 tasks, 25 to run" in out, err
