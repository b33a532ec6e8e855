"""The experiment YAML and the plan, without running anything: every ready experiment plans, unknown keys
and bad references are one-line errors naming the YAML path, sweeps expand and share what they can, and
the hashes say which tasks a change reruns."""

from __future__ import annotations

import json

import pytest

from tests.clitools import assert_one_line_error, files_under, run_cli
from tests.experiment.conftest import EXPERIMENTS, small_demo, write_yaml
from upcycle.experiment.runner import RunOptions, prepare


def plan_of(tmp_path, doc: dict, name: str = "exp.yaml"):
    return prepare(RunOptions(experiment=str(write_yaml(tmp_path / name, doc)), out=str(tmp_path / "run")))


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_ready_experiment_plans_in_a_dry_run(capsys, tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run_cli(capsys, ["run", path, "--dry-run", "--out", tmp_path / "run"])
    assert code == 0, err
    assert "dry run: nothing was written" in out
    for stage in ("convert", "report"):
        assert f"\n{stage} " in out
    assert files_under(tmp_path) == set()  # nothing written, not even the run folder


def test_the_founding_report_plan_is_the_reports_setting(tmp_path):
    plan = prepare(RunOptions(experiment=str(EXPERIMENTS / "founding-report.yaml"), out=str(tmp_path / "r")))
    convert = plan.tasks["convert/moe"].config
    assert (convert.method, convert.ratio, convert.experts, convert.top_k, convert.layers) == (
        "drop",
        0.15,
        8,
        1,
        "every_other",
    )
    assert (convert.aux_loss_weight, convert.jitter, convert.renormalize) == (0.01, 0.01, False)
    for name in ("moe", "dense"):
        cfg = plan.tasks[f"pretrain/{name}"].config
        assert (cfg.data, cfg.steps, cfg.batch_size, cfg.grad_accum, cfg.seed) == (
            "allenai/c4",
            14649,
            64,
            4,
            42,
        )
    assert {t.config.train_languages for t in plan.stage_tasks("finetune")} == {"fr", "en,fr,es"}
    xnli = [t for t in plan.stage_tasks("evaluate") if t.config.task == "xnli"]
    assert {t.setting for t in xnli} == {"fr", "en-fr-es"} and all(t.config.languages == "all" for t in xnli)
    assert list(xnli[0].models) == ["dense", "moe"] and xnli[0].config.baseline == "dense"
    groups = {t.config.group_by for t in plan.stage_tasks("analyze") if t.kind == "routing"}
    assert groups == {"language", "label"}


def test_drop_upcycling_plan_compares_scratch_naive_noise_and_drop(tmp_path):
    plan = prepare(RunOptions(experiment=str(EXPERIMENTS / "drop-upcycling.yaml"), out=str(tmp_path / "r")))
    methods = {t.model: (t.config.method, t.config.ratio) for t in plan.stage_tasks("convert")}
    assert methods == {
        "scratch": ("scratch", 0.5), "naive": ("naive", 0.5), "drop": ("drop", 0.5), "noise": ("noise", 0.5)
    }  # fmt: skip
    noise = plan.tasks["convert/noise"].config  # the paper's noise baseline: N(0, 0.02) on half the units
    assert (noise.noise_mode, noise.noise_std, noise.noise_fraction) == ("units", 0.02, 0.5)
    for task in plan.stage_tasks("convert"):
        assert (task.config.top_k, task.config.experts, task.config.aux_loss_weight) == (2, 8, 0.02)
        assert task.deps == [plan.tasks["seed/seed"]]
    routing = [t for t in plan.stage_tasks("analyze") if t.kind == "routing"]
    assert routing[0].config.group_by == "domain" and list(routing[0].models) == [
        "scratch",
        "naive",
        "drop",
        "noise",
    ]


# ------------------------------------------------------------------------------------- errors


def _refused(capsys, tmp_path, doc, *needles):
    path = write_yaml(tmp_path / "bad.yaml", doc)
    before = files_under(tmp_path)
    code, _, err = run_cli(capsys, ["run", path, "--out", tmp_path / "run"])
    line = assert_one_line_error(err, *needles)
    assert code == 2 and files_under(tmp_path) == before
    return line


def test_an_unknown_key_names_its_yaml_path_and_the_keys_allowed(capsys, tmp_path):
    doc = small_demo(drop=("evaluate",))
    doc["finetune"]["lr_rate"] = 1e-3
    line = _refused(capsys, tmp_path, doc, "bad.yaml", "finetune.lr_rate", "did you mean finetune.lr?")
    assert "known fields are" in line and "max_length" in line


def test_a_missing_or_malformed_experiment_file_names_the_positional_argument(capsys, tmp_path):
    code, _, err = run_cli(capsys, ["run", tmp_path / "nope.yaml", "--out", tmp_path / "run"])
    assert code == 2 and assert_one_line_error(err, "EXPERIMENT=", "nope.yaml", "no such file")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    code, _, err = run_cli(capsys, ["run", tmp_path / "list.yaml", "--out", tmp_path / "run"])
    assert code == 2 and assert_one_line_error(err, "EXPERIMENT=", "must hold a mapping")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (lambda d: d["pretrain"].update(model="gpt2"), ("pretrain.model", "upcycle run chooses it")),
        (lambda d: d["finetune"].update(out="x"), ("finetune.out", "RUN/<stage>/<name>")),
        (lambda d: d["pretrain"].update(data="{seeed}/x"), ("pretrain.data", "unknown reference {seeed}")),
        (lambda d: d["convert"].update(top_k=9), ("convert.top_k", "must be in [1, experts=4]")),
        (lambda d: d["pretrain"].update(warmup=99), ("pretrain.warmup", "must be ≤ steps")),
        (lambda d: d.update(sweep={"lr": [1, 2]}), ("sweep.lr", "pretrain.lr or finetune.lr")),
        (lambda d: d.update(sweep={"ratio": "0.5"}), ("sweep.ratio", "non-empty list")),
        (lambda d: d.update(sweep={"ratio": [0.5, "x"]}), ("convert.ratio", "sweep point ratio=x")),
        (
            lambda d: d["analyze"]["routing"]["label"].update(of="extended"),
            ("analyze.routing.label.of", "no extend"),
        ),
        (lambda d: d.update(evaluat={}), ("evaluat", "did you mean evaluate")),
        (lambda d: d["convert"].update(variants={"dense": {}}), ("convert.variants.dense", "dense baseline")),
    ],
)
def test_mistakes_are_one_line_errors_naming_the_yaml_key(capsys, tmp_path, edit, needles):
    doc = small_demo(drop=("evaluate",))
    edit(doc)
    _refused(capsys, tmp_path, doc, *needles)


def test_bad_stage_flags_and_missing_files_are_one_line_errors(capsys, tmp_path):
    path = write_yaml(tmp_path / "x.yaml", small_demo(drop=("evaluate",)))
    code, _, err = run_cli(capsys, ["run", path, "--only", "finetun"])
    assert code == 2 and "did you mean 'finetune'" in assert_one_line_error(err, "--only")
    code, _, err = run_cli(capsys, ["run", tmp_path / "missing.yaml"])
    assert code == 2 and assert_one_line_error(err, "missing.yaml", "no such file")
    code, _, err = run_cli(capsys, ["run", path, "--only", "finetune", "--out", tmp_path / "r"])
    assert code == 2 and assert_one_line_error(err, "--only", "is not complete")


# ------------------------------------------------------------------------------ sweeps, hashes


def test_a_sweep_runs_one_moe_per_point_and_shares_the_rest(tmp_path):
    plan = plan_of(tmp_path, small_demo(sweep=[0.15, 0.5], drop=("evaluate",)))
    names = {stage: sorted(t.name for t in plan.stage_tasks(stage)) for stage in plan.stages}
    assert names["seed"] == ["seed"] and names["data"] == ["corpus", "xnli"]
    assert names["convert"] == ["moe@ratio=0.15", "moe@ratio=0.5"]
    assert names["pretrain"] == ["dense", "moe@ratio=0.15", "moe@ratio=0.5"]  # one dense baseline
    assert "fr/dense" in names["finetune"] and len(names["finetune"]) == 6
    assert [t.config.ratio for t in plan.stage_tasks("convert")] == [0.15, 0.5]
    dense = plan.tasks["pretrain/dense"]
    assert dense.points == ["ratio=0.15", "ratio=0.5"] and plan.tasks["seed/seed"] in dense.deps
    assert not any(t.stage == "convert" for t in dense.deps)
    # Evaluations and routing compare every model of every point side by side.
    routing = plan.tasks["analyze/routing-language/fr"]
    assert list(routing.models) == ["moe@ratio=0.15", "moe@ratio=0.5"]
    assert "analyze/fertility" in plan.tasks


def test_a_list_of_grids_joins_their_points_and_equal_points_are_one_task(tmp_path):
    doc = small_demo(drop=("evaluate", "finetune", "analyze"))
    doc["sweep"] = [{"top_k": [1, 2]}, {"top_k": [2], "router_mode": ["learned", "frozen"]}]
    plan = plan_of(tmp_path, doc)
    assert len(plan.experiment.points) == 4
    # top_k=2 and (top_k=2, router_mode=learned) are the same conversion: made once.
    assert len(plan.stage_tasks("convert")) == 3
    learned = next(t for t in plan.stage_tasks("convert") if t.config.top_k == 2 and not t.config.moe)
    assert learned.points == ["top_k=2", "top_k=2,router_mode=learned"]


def test_points_differing_only_in_an_option_their_method_ignores_share_one_conversion(tmp_path):
    from upcycle.experiment.estimate import estimate_plan
    from upcycle.experiment.runner import plan_document

    doc = small_demo(drop=("evaluate",))
    doc["sweep"] = {"method": ["naive", "drop"], "ratio": [0.15, 0.5]}
    plan = plan_of(tmp_path, doc)
    # ratio is drop's only: the two naive points are one conversion, and one MoE downstream of it.
    names = {stage: sorted(t.name for t in plan.stage_tasks(stage)) for stage in plan.stages}
    assert names["convert"] == ["moe@method=drop,ratio=0.15", "moe@method=drop,ratio=0.5", "moe@method=naive"]
    assert names["pretrain"] == ["dense", *names["convert"]]
    assert len(names["finetune"]) == 2 * 4
    naive = plan.tasks["convert/moe@method=naive"]
    assert naive.points == ["method=naive,ratio=0.15", "method=naive,ratio=0.5"]
    assert plan.tasks["finetune/fr/moe@method=naive"].points == naive.points
    routing = plan.tasks["analyze/routing-language/fr"]
    assert list(routing.models) == [
        "moe@method=naive",
        "moe@method=drop,ratio=0.15",
        "moe@method=drop,ratio=0.5",
    ]
    # plan.json still lists every sweep point, and which tasks each one uses.
    estimate_plan(plan)
    listed = json.loads(json.dumps(plan_document(plan, dict.fromkeys(plan.tasks, "run")), default=str))
    assert len(listed["points"]) == 4
    used = {
        p
        for s in listed["stages"]
        for t in s["tasks"]
        if t["key"].startswith("convert/")
        for p in t["points"]
    }
    assert used == set(listed["points"])


def _hashes(plan) -> dict[str, str]:
    return {key: task.hash for key, task in plan.tasks.items()}


def test_a_changed_key_changes_the_hash_of_its_stage_and_everything_downstream_only(tmp_path):
    doc = small_demo(drop=("evaluate",))
    before = _hashes(plan_of(tmp_path, doc))
    doc["finetune"]["lr"] = 3e-4
    after = _hashes(plan_of(tmp_path, doc, "exp2.yaml"))
    changed = {k for k in before if before[k] != after[k]}
    stages = {k.split("/")[0] for k in changed}
    assert stages == {"finetune", "analyze", "report"}
    assert "analyze/fertility" not in changed and "analyze/training/pretrain" not in changed
    assert all(k in changed for k in before if k.startswith(("finetune/", "analyze/routing")))
    # The output folder and the display switches are not part of what a task computes.
    doc["finetune"]["lr"] = 5e-4
    a = _hashes(
        prepare(RunOptions(experiment=str(write_yaml(tmp_path / "a.yaml", doc)), out=str(tmp_path / "A")))
    )
    doc["finetune"]["progress"] = "lines"
    b = _hashes(
        prepare(RunOptions(experiment=str(write_yaml(tmp_path / "b.yaml", doc)), out=str(tmp_path / "B")))
    )
    assert a == b


def test_plan_json_lists_every_task_with_its_estimate(tmp_path):
    from upcycle.experiment.estimate import estimate_plan
    from upcycle.experiment.runner import plan_document

    plan = plan_of(tmp_path, small_demo(drop=("evaluate",)))
    estimate_plan(plan)
    doc = json.loads(json.dumps(plan_document(plan, dict.fromkeys(plan.tasks, "run")), default=str))
    tasks = {t["key"]: t for s in doc["stages"] for t in s["tasks"]}
    assert set(tasks) == set(plan.tasks)
    seed = tasks["seed/seed"]["estimate"]
    assert seed["steps"] == 2 and seed["tokens"] == 2 * 2 * 16 and seed["flops"] > 0
    assert tasks["convert/moe"]["estimate"]["params"] > tasks["convert/moe"]["estimate"]["active"]


def test_nexus_extends_btx_with_a_mean_router_row_and_nexus_through_its_projection(tmp_path):
    plan = prepare(RunOptions(experiment=str(EXPERIMENTS / "nexus.yaml"), out=str(tmp_path / "r")))
    extend = {t.name: t.config for t in plan.stage_tasks("extend")}
    # router_init is read by linear routers only (`upcycle extend` refuses it for an embedding router).
    assert extend["btx"].router_init == "mean" and extend["nexus"].router_init is None
    assert extend["btx"].expert == extend["nexus"].expert
