"""Report sections on hand-made run files: the new-expert table of an MoE extended by several experts
shows every added expert, and the setup lists an extended model with its extension's preservation."""

from __future__ import annotations

import json

from tests.report.test_comparisons import _task
from upcycle.report.build import RunFiles
from upcycle.report.document import Table
from upcycle.report.sections import _new_expert_table, routing, setup


def _layer(top1: list[list[int]]) -> dict:
    return {"top1": top1, "topk": top1, "metrics": {"topk": {}, "top1": {}}}


#: Two MoE layers of a 2-expert MoE extended by 'math' (expert 2) and 'law' (expert 3); rows: domains.
EXTENDED = {
    "num_experts": 4,
    "added_experts": {"math": 2, "law": 3},
    "layers": {
        "1": _layer([[6, 2, 1, 1], [1, 1, 7, 1], [0, 2, 3, 5]]),
        "3": _layer([[8, 0, 2, 0], [2, 2, 4, 2], [1, 1, 0, 8]]),
    },
}
DOMAINS = ["prose", "math", "law"]


def test_the_new_expert_table_shows_every_added_expert():
    doc = {"group_by": "domain", "groups": DOMAINS, "models": {"nexus+math+law": EXTENDED}}
    table = next(b for b in _new_expert_table(doc) if isinstance(b, Table))
    assert table.header == ["model", "layer", "new expert", "prose", "math", "law"]
    assert table.rows == [
        ["nexus+math+law", "1", "math (2)", "10.00", "70.00", "30.00"],
        ["nexus+math+law", "1", "law (3)", "10.00", "10.00", "50.00"],
        ["nexus+math+law", "3", "math (2)", "20.00", "40.00", "0.00"],
        ["nexus+math+law", "3", "law (3)", "0.00", "20.00", "80.00"],
    ]
    # A routing.json written before it recorded the added experts: read from the run's model name.
    old = {k: v for k, v in EXTENDED.items() if k != "added_experts"}
    doc["models"] = {"nexus+math+law": old}
    assert next(b for b in _new_expert_table(doc) if isinstance(b, Table)).rows == table.rows


def test_routing_shows_the_table_only_for_extended_models(tmp_path):
    (tmp_path / "routing").mkdir()
    plain = {"num_experts": 2, "added_experts": {}, "layers": {"1": _layer([[5, 5], [2, 8], [9, 1]])}}
    doc = {"group_by": "domain", "groups": DOMAINS, "models": {"moe@top_k=1+2": plain}}
    task = _task("analyze/routing-x", "routing", tmp_path / "routing")
    plan = {"run": str(tmp_path), "stages": [{"stage": "analyze", "tasks": [task]}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "routing" / "routing.json").write_text(json.dumps(doc))
    blocks, _ = routing(RunFiles(tmp_path), "none")
    assert not any(isinstance(b, Table) and "new expert" in b.header for b in blocks)
    doc["models"]["nexus+math+law"] = EXTENDED
    (tmp_path / "routing" / "routing.json").write_text(json.dumps(doc))
    blocks, _ = routing(RunFiles(tmp_path), "none")
    new = [b for b in blocks if isinstance(b, Table) and "new expert" in b.header]
    assert len(new) == 1 and {r[0] for r in new[0].rows} == {"nexus+math+law"}


def test_the_setup_lists_an_extended_model_with_its_extensions_preservation(tmp_path):
    def fp(diff: float, **extra) -> dict:
        return {"max_abs_logit_diff": diff, "mean_kl": diff / 10, **extra}

    convert, extend = tmp_path / "convert" / "nexus", tmp_path / "extend" / "nexus"
    convert.mkdir(parents=True)
    extend.mkdir(parents=True)
    (convert / "upcycling.json").write_text(json.dumps({"function_preservation": fp(0.5)}))
    (extend / "upcycling.json").write_text(json.dumps({
        "function_preservation": fp(0.25, after_extension=1), "conversion_function_preservation": fp(0.5),
        "extensions": [{"experts": {"math": "m"}, "router": "projection of the domain embedding"}],
    }))  # fmt: skip
    config = {"method": "nexus", "experts": 2, "top_k": 1, "layers": "every_other"}
    tasks = [
        _task("convert/nexus", "convert", convert, model="nexus", role="moe", config=config),
        _task("extend/nexus", "extend", extend, model="nexus", role="extended", deps=["convert/nexus"],
              config={"expert": ["math=m"]}),
    ]  # fmt: skip
    (tmp_path / "plan.json").write_text(json.dumps({"run": str(tmp_path), "stages": [{"tasks": tasks}]}))
    blocks, numbers = setup(RunFiles(tmp_path), "none")
    rows = {r[0]: r for r in blocks[1].rows}
    assert (
        rows["nexus"][1] == "nexus, 2 experts, top-1, layers every_other"
        and rows["nexus"][-1] == "0.5 / 0.05"
    )
    assert rows["nexus+math"][1].endswith(
        "extended by math (new router entry: projection of the domain embedding)"
    )
    assert rows["nexus+math"][-1] == "0.25 / 0.025"
    assert numbers["nexus+math"]["function_preservation"]["after_extension"] == 1
