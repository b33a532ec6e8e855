"""The sections of the report, each ``(files, paper) -> (blocks, numbers)`` (see upcycle.report.build)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from upcycle.report.build import RunFiles, num, pct, read_json
from upcycle.report.document import Block, Figure, Heading, Para, Table
from upcycle.report.published import (
    DROP_UPCYCLING,
    FOUNDING_REPORT,
    PUBLISHED,
    drop_upcycling_row,
    drop_upcycling_scores,
)


def header(files: RunFiles) -> list[Block]:
    plan = files.plan
    blocks: list[Block] = []
    if plan.get("description"):
        blocks.append(Para(plan["description"]))
    points = [p for p in plan.get("points", []) if p]
    swept = f" Sweep: {len(points)} points ({'; '.join(points)})." if points else ""
    blocks.append(
        Para(
            f"Run folder `{plan['run']}`, from `{plan['source']}` (plan of {plan['created']}).{swept} "
            f"Reproduce with `upcycle run {plan['source']} --out {plan['run']}`."
        )
    )
    return blocks


# ------------------------------------------------------------------------------------------ setup


def _inspect(path: str, seq_len: int | None) -> dict | None:
    from upcycle.analysis.inspect import inspect_checkpoint

    with contextlib.suppress(Exception):  # a hub model not in the local cache: shown as '–'
        return inspect_checkpoint(path, seq_len=seq_len)
    return None


def _models(files: RunFiles) -> list[tuple[str, dict, str]]:
    """(name, the task that makes it, its folder) of the models the run compares: the trained models,
    else the converted ones."""
    trained = [t for t in files.of("pretrain") if t["role"] in ("moe", "dense")]
    if trained:
        models = [(t["model"], t, str(Path(t["out"]) / "final")) for t in trained]
    else:
        models = [(t["model"], t, t["out"]) for t in files.of("convert")]
    # After `upcycle extend`, named as the evaluations and analyses name them (nexus+math).
    return models + [(f"{t['model']}+{'+'.join(_added(t))}", t, t["out"]) for t in files.of("extend")]


def _added(task: dict) -> list[str]:
    from upcycle.upcycling.options import parse_named

    return list(parse_named(task["config"].get("expert") or [], "expert"))


def _construction(files: RunFiles, task: dict) -> tuple[str, dict | None]:
    """How a model was made, and its function-preservation record (its conversion's; an extended model's:
    its extension's)."""
    convert = next(
        (t for t in files.tasks if t["kind"] == "convert" and t["key"] in _upstream(files, task)), None
    )
    if task["kind"] == "convert":
        convert = task
    if convert is None:
        return "dense", None
    c = convert["config"]
    what = f"{c['method']}, {c['experts']} experts, top-{c['top_k']}, layers {c['layers']}"
    if c["method"] == "drop":
        what += f", r = {c['ratio']}"
    if task["kind"] == "extend":  # its record's top level holds the extension's figures
        upcycling = read_json(Path(task["out"]) / "upcycling.json") or {}
        router = ((upcycling.get("extensions") or [{}])[-1]).get("router")
        what += f"; extended by {', '.join(_added(task))}" + (
            f" (new router entry: {router})" if router else ""
        )
        return what, upcycling.get("function_preservation")
    upcycling = read_json(Path(convert["out"]) / "upcycling.json") or {}
    return what, upcycling.get("conversion_function_preservation") or upcycling.get("function_preservation")


def _upstream(files: RunFiles, task: dict) -> set[str]:
    by_key = {t["key"]: t for t in files.tasks}
    seen, stack = set(), list(task["deps"])
    while stack:
        key = stack.pop()
        if key not in seen:
            seen.add(key)
            stack += by_key.get(key, {}).get("deps", [])
    return seen


def setup(files: RunFiles, paper: str) -> tuple[list[Block], dict]:
    rows, numbers = [], {}
    seq_len = next(
        (t["config"].get("seq_len") for t in files.of("pretrain") if t["role"] in ("moe", "dense")), None
    )
    models = _models(files)
    if not models:
        return [], {}
    for name, task, path in models:
        info = _inspect(path, seq_len) if Path(path).exists() else None
        seq_len = seq_len or (info or {}).get("flops_seq_len")
        what, fp = _construction(files, task)
        params = (info or {}).get("parameters", {})
        flops = (info or {}).get("flops_per_token", {}).get("forward")
        preserved = f"{fp['max_abs_logit_diff']:.3g} / {fp['mean_kl']:.3g}" if fp else "–"
        rows.append([name, what, num(params.get("total")), num(params.get("active")), _si(flops), preserved])
        numbers[name] = {
            "construction": what,
            "parameters": params,
            "flops_per_token": flops,
            "function_preservation": fp,
        }
    notes = [
        f"FLOPs per token: forward pass at sequence length {seq_len} "
        "(Drop-Upcycling's Table 3 accounting). Function preservation: max |Δlogits| / mean KL between the dense "
        "source and the MoE right after conversion (extended models: between the MoE before and after "
        "`upcycle extend`), on a fixed probe batch."
    ]
    if paper == "drop-upcycling":
        published = DROP_UPCYCLING["parameters"]
        notes.append(
            "Published (Drop-Upcycling Table 4): "
            + "; ".join(
                f"{k}: {num(a / 1e6, 3)}M active / {num(t / 1e6, 3)}M total"
                for k, (a, t) in published.items()
            )
            + " (their vocabulary has 99,574 tokens; GPT-2's tokenizer has 50,257)."
        )
    header = [
        "model",
        "construction",
        "parameters",
        "active parameters",
        "FLOPs per token",
        "max |Δlogits| / KL",
    ]
    return [Heading("Setup"), Table(header, rows, notes, align_left=2)], numbers


# ------------------------------------------------------------------------------------ pretraining


def pretraining(files: RunFiles, paper: str) -> tuple[list[Block], dict]:
    task = next((t for t in files.of("training") if t["name"] == "training/pretrain"), None)
    runs = [t for t in files.of("pretrain") if t["role"] in ("moe", "dense")]
    if not runs:
        return [], {}
    blocks: list[Block] = [Heading("Continued pretraining")]
    rows, numbers = [], {}
    for run in runs:
        summary = files.record(run).get("summary") or {}
        last = summary.get("last_eval") or {}
        rows.append([run["model"], num(summary.get("step")), num(summary.get("tokens")), num(last.get("loss")),
                     num(last.get("perplexity")), pct(last.get("accuracy"))])  # fmt: skip
        numbers[run["model"]] = {k: last.get(k) for k in ("loss", "perplexity", "accuracy")}
    notes = ["Held-out loss, perplexity and next-token accuracy at the end of training; MoE and dense models get "
             "identical data, steps, batch and seed."]  # fmt: skip
    if paper == "founding-report":
        pub = FOUNDING_REPORT["pretraining"]
        rows.append(
            [
                "MoE (founding report)",
                num(pub["steps"]),
                num(pub["tokens"]),
                num(pub["loss"]),
                "–",
                pct(pub["accuracy"]),
            ]
        )
        notes.append(
            "The founding report's MoE after 14,649 steps on C4 (§3.3); it trained no dense baseline."
        )
    header = ["model", "steps", "tokens", "held-out loss", "perplexity", "next-token accuracy (%)"]
    blocks.append(Table(header, rows, notes))
    if task is not None:
        for stem, caption in (("loss", "Training and held-out loss, MoE vs dense"),):
            if files.figure(task, stem):
                blocks.append(Figure(files.figure(task, stem), caption))
        for run in runs:
            path = files.figure(task, f"experts-{_stem(run['model'])}")
            if path:
                blocks.append(Figure(path, f"Expert shares over training: {run['model']} (collapses marked)"))
    return blocks, numbers


def _si(value) -> str:
    from upcycle.experiment.display import count

    return "–" if not value else count(value)


def _stem(name: str) -> str:
    from upcycle.analysis.plots import file_stem

    return file_stem(name)


# -------------------------------------------------------------------------------------- fertility


def fertility(files: RunFiles, paper: str) -> tuple[list[Block], dict]:
    task = next(iter(files.of("fertility")), None)
    doc = read_json(files.out(task) / "fertility.json") if task else None
    if not doc:
        return [], {}
    langs = doc["data"]["languages"]
    rows = []
    for name, entry in doc["tokenizers"].items():
        stats = entry["languages"]
        rows.append([f"{name}: tokens per word"] + [num(stats[lang].get("fertility"), 3) for lang in langs])
        rows.append(
            [f"{name}: premium vs {doc['data']['reference']}"]
            + [num(stats[lang].get("premium"), 3) for lang in langs]
        )
    notes = [f"Words: {doc['data']['words']}; data: {doc['data']['data']} ({doc['data']['split']})."]
    if paper == "founding-report":
        pub = FOUNDING_REPORT["table1_fertility"]
        rows.append(["founding report, Table 1"] + [num(pub.get(lang), 3) for lang in langs])
        first = next(iter(doc["tokenizers"].values()))["languages"]
        rows.append(
            ["difference (ours − report)"]
            + [_diff(first[lang].get("fertility"), pub.get(lang)) for lang in langs]
        )
        notes.append("The report's Table 1 counts GPT-2 tokens per whitespace word on XNLI-MT.")
    blocks: list[Block] = [Heading("Tokenizer fertility"), Table(["", *langs], rows, notes)]
    if files.figure(task, "fertility"):
        blocks.append(Figure(files.figure(task, "fertility"), "Tokenizer fertility per language"))
    return blocks, doc["tokenizers"]


def _diff(ours, theirs, scale: float = 1.0) -> str:
    if ours is None or theirs is None:
        return "–"
    return f"{scale * ours - theirs:+.2f}"


# ------------------------------------------------------------------------------------ evaluations


def evaluations(files: RunFiles, paper: str) -> tuple[list[Block], dict]:
    blocks: list[Block] = []
    numbers = {}
    for task in files.of("evaluate"):
        results = read_json(files.out(task) / "results.json")
        if not results:
            continue
        numbers[task["name"]] = results
        blocks += _evaluation_blocks(files, task, results, paper)
    return ([Heading("Evaluation"), *blocks] if blocks else []), numbers


def _evaluation_blocks(files: RunFiles, task: dict, results: dict, paper: str) -> list[Block]:
    config = task["config"]
    langs = next((list(r["accuracy"]) for r in results.values() if isinstance(r.get("accuracy"), dict)), [])
    title = f"{task['name']}: {config.get('task')} on {config.get('data') or 'the default data'}"
    if not langs:
        header = ["model", "loss", "perplexity", "next-token accuracy (%)", "tokens"]
        rows = [[n, num(r.get("loss")), num(r.get("perplexity")), pct(r.get("accuracy")), num(r.get("tokens"))]
                for n, r in results.items()]  # fmt: skip
        return [Heading(title, 3), Table(header, rows)]
    rows = []
    for name, r in results.items():
        paired = (r.get("paired") or {}).get("languages", {})
        rows.append(
            [name]
            + [pct(r["accuracy"].get(lang)) + _marks(paired.get(lang, {}).get("p_holm")) for lang in langs]
            + [pct(r.get("average"))]
        )
    baseline = next((r["paired"]["baseline"] for r in results.values() if r.get("paired")), None)
    sizes = sorted({n for r in results.values() for n in (r.get("n") or {}).values()})
    notes = [f"Accuracy in %; examples per language: {', '.join(map(str, sizes))}."]
    if baseline:
        notes.append(
            f"`*` p < 0.05, `**` p < 0.01 (exact McNemar, Holm-adjusted over languages): differs from `{baseline}` on the same examples."
        )
    blocks: list[Block] = [Heading(title, 3), Table(["model", *langs, "average"], rows, notes)]
    ci_rows = [
        [n] + [f"{pct(r['ci95'][lang][0])}–{pct(r['ci95'][lang][1])}" for lang in langs]
        for n, r in results.items()
        if r.get("ci95")
    ]
    if ci_rows:
        blocks += [Para("95 % confidence intervals (Wilson):"), Table(["model", *langs], ci_rows)]
    if paper == "founding-report":
        blocks += _founding_comparison(files, task, results, langs)
    if paper == "drop-upcycling":
        blocks += _drop_comparison(files, results, langs)
    return blocks


def _marks(p) -> str:
    if p is None:
        return ""
    try:
        from upcycle.evaluation.significance import marks

        return marks(p)
    except ImportError:  # pragma: no cover - evaluate is part of the package
        return "**" if p < 0.01 else "*" if p < 0.05 else ""


def _founding_comparison(files: RunFiles, task: dict, results: dict, langs: list[str]) -> list[Block]:
    from upcycle.report.build import _train_languages

    table = FOUNDING_REPORT["tables"].get(frozenset(_train_languages(files, task)))
    if table is None:
        return []
    rows = []
    for name, r in results.items():
        theirs = table["GPT2"] if name == "dense" else table["MoE"]
        label = "GPT2" if name == "dense" else "MoE"
        rows.append([f"{name} (ours)"] + [pct(r["accuracy"].get(lang)) for lang in langs])
        rows.append([f"{label} (report)"] + [num(theirs.get(lang), 4) for lang in langs])
        rows.append(
            ["difference"] + [_diff(r["accuracy"].get(lang), theirs.get(lang), 100) for lang in langs]
        )
    notes = [
        f"Published: the founding report's {table['name']}. Its GPT2 had no continued pretraining; our dense model had the same as the MoE."
    ]
    return [Para(f"Beside the founding report ({table['name']}):"), Table(["model", *langs], rows, notes)]


def _drop_comparison(files: RunFiles, results: dict, langs: list[str]) -> list[Block]:
    tasks = DROP_UPCYCLING["lm_eval_tasks"]
    shown = [lang for lang in langs if lang in tasks]
    if not shown:
        return []
    rows = []
    for name, r in results.items():
        model_task = next((t for t in files.of("pretrain") if t["model"] == name), None)
        construction = next(
            (t["config"] for t in files.of("convert") if model_task and t["key"] in model_task["deps"]), {}
        )
        row = drop_upcycling_row(
            construction.get("method"), construction.get("ratio"), model_task and model_task["role"]
        )
        if row is None:
            continue
        scores = drop_upcycling_scores(row)
        rows.append([f"{name} (ours)"] + [pct(r["accuracy"].get(t)) for t in shown])
        rows.append([f"{row} (paper)"] + [num(scores[tasks[t]], 3) for t in shown])
        rows.append(["difference"] + [_diff(r["accuracy"].get(t), scores[tasks[t]], 100) for t in shown])
    if not rows:
        return []
    notes = [
        "Published: Drop-Upcycling's Table 1, 8×152M (after 500B tokens). Our scratch keeps the seed's attention and embeddings, the construction of its r = 1.0 row."
    ]
    return [Table(["model", *[tasks[t] for t in shown]], rows, notes)]


# ------------------------------------------------------------------------------------- finetuning


def finetuning(files: RunFiles, paper: str) -> tuple[list[Block], dict]:
    blocks: list[Block] = []
    for task in files.of("training"):
        if task["name"] == "training/pretrain":
            continue
        setting = task["name"].split("/", 1)[1]
        for stem, caption in (("accuracy", f"Validation accuracy during fine-tuning ({setting})"),
                              ("loss", f"Fine-tuning loss ({setting})")):  # fmt: skip
            if files.figure(task, stem):
                blocks.append(Figure(files.figure(task, stem), caption))
        for model in task["models"]:
            path = files.figure(task, f"experts-{_stem(model)}")
            if path:
                blocks.append(Figure(path, f"Expert shares during fine-tuning ({setting}): {model}"))
    return ([Heading("Fine-tuning"), *blocks] if blocks else []), {}


# ---------------------------------------------------------------------------------------- routing


def routing(files: RunFiles, paper: str) -> tuple[list[Block], dict]:
    blocks: list[Block] = []
    numbers = {}
    for task in files.of("routing"):
        doc = read_json(files.out(task) / "routing.json")
        if not doc:
            continue
        numbers[task["name"]] = {
            m: {layer: e["metrics"] for layer, e in r["layers"].items()} for m, r in doc["models"].items()
        }
        blocks.append(
            Heading(f"{task['name']}: routing by {doc['group_by']} ({', '.join(doc['groups'])})", 3)
        )
        rows = []
        for model, record in doc["models"].items():
            for layer, entry in record["layers"].items():
                k = entry["metrics"]["topk"]
                rows.append(
                    [
                        model,
                        layer,
                        num(k.get("balance"), 3),
                        num(k.get("max_over_mean"), 3),
                        num(k.get("specialisation"), 3),
                    ]
                )
        notes = [
            "balance: normalised entropy of the expert load (1 = even); specialisation: I(group; expert) / H(group)."
        ]
        blocks.append(
            Table(["model", "layer", "balance", "max / mean", "specialisation"], rows, notes, align_left=2)
        )
        if doc["group_by"] == "domain" and any(_added_experts(m, r) for m, r in doc["models"].items()):
            blocks += _new_expert_table(doc)
        if files.figure(task, "group_fractions"):
            blocks.append(
                Figure(
                    files.figure(task, "group_fractions"),
                    f"Each {doc['group_by']}'s tokens by expert, per layer and model",
                )
            )
        for model in doc["models"]:
            path = files.figure(task, f"expert_shares-{_stem(model)}")
            if path:
                blocks.append(Figure(path, f"Each expert's tokens by {doc['group_by']}: {model}"))
    return ([Heading("Routing"), *blocks] if blocks else []), numbers


def _added_experts(model: str, record: dict) -> dict[str, int]:
    """Name → index of the experts `upcycle extend` added to ``model``: as routing.json records them, else
    (a file written before it did) read from the name the run gives it, nexus+math+law: the last two."""
    if "added_experts" in record:
        return record["added_experts"]
    added = model.split("+")[1:]
    first = record["num_experts"] - len(added)
    return {name: first + j for j, name in enumerate(added)}


def _new_expert_table(doc: dict) -> list[Block]:
    """After `upcycle extend`: the share of each domain's tokens whose first choice is each added expert."""
    rows = []
    for model, record in doc["models"].items():
        added = _added_experts(model, record)
        for layer, entry in record["layers"].items():
            for name, e in added.items():
                shares = [row[e] / max(1, sum(row)) for row in entry["top1"]]
                rows.append([model, layer, f"{name} ({e})"] + [pct(s) for s in shares])
    notes = [
        "Share (%) of each domain's tokens whose first choice is the expert (index) added by `upcycle extend`, "
        "one row per added expert."
    ]
    return [
        Para("Do the new domain's tokens reach the new expert?"),
        Table(["model", "layer", "new expert", *doc["groups"]], rows, notes, align_left=3),
    ]


# ------------------------------------------------------------------------------------------- cost


def cost(files: RunFiles, paper: str) -> tuple[list[Block], dict]:
    rows, numbers = [], {}
    for stage in files.plan["stages"]:
        if stage["stage"] == "report":
            continue  # being written
        records = [files.record(t) for t in stage["tasks"]]
        seconds = sum(r.get("seconds") or 0 for r in records)
        cpu = sum(r.get("cpu_seconds") or 0 for r in records)
        tokens = sum(r.get("tokens") or 0 for r in records)
        done = sum(1 for t in stage["tasks"] if files.complete(t))
        numbers[stage["stage"]] = {
            "seconds": seconds,
            "cpu_seconds": cpu,
            "tokens": tokens,
            "tasks": len(records),
        }
        rows.append([stage["stage"], f"{done}/{len(records)}", f"{seconds:.1f}", f"{cpu:.1f}", num(tokens) if tokens else "–",
                     _si(stage.get("flops") or None)])  # fmt: skip
    notes = ["Wall and CPU seconds summed over each stage's tasks (an interrupted and resumed task counts both attempts); "
             "tokens: training tokens; FLOPs: the plan's estimate."]  # fmt: skip
    header = ["stage", "tasks complete", "wall s", "CPU s", "tokens", "estimated FLOPs"]
    return [Heading("Time and tokens per stage"), Table(header, rows, notes)], numbers


__all__ = [
    "PUBLISHED",
    "cost",
    "evaluations",
    "fertility",
    "finetuning",
    "header",
    "pretraining",
    "routing",
    "setup",
]
