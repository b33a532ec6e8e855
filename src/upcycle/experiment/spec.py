"""An experiment YAML, read and checked: its top-level keys, its sections (each checked against the command
it runs) and its sweep points. Imports nothing heavy: ``upcycle run`` refuses a bad file at once.

    name: demo                 # the report's title; default: the file name
    out: runs/demo             # the run folder (RUN); --out overrides it
    data: {...}                # generated data, {data} in the sections below
    seed: {...}                # upcycle pretrain keys: the dense seed model, {seed}
    specialists: {...}         # upcycle pretrain keys + domains: dense models per domain, {specialists.NAME}
    convert: {...}             # upcycle convert keys + variants
    pretrain: {...}            # upcycle pretrain keys + baseline
    extend: {...}              # upcycle extend keys + of
    finetune: {...}            # upcycle finetune keys + settings
    evaluate: {NAME: {...}}    # upcycle evaluate keys + of, per evaluation
    analyze: {routing: {NAME: {...}}, training: {...}, fertility: {...}}
    report: {...}              # upcycle report keys
    sweep: {KEY: [values]}     # a grid (or a list of grids) of runs

The format and every key: docs/experiments.md.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from upcycle.config import ConfigError, check_mapping, field_types, from_dict, load_yaml
from upcycle.experiment.sections import (
    SWEEPABLE,
    AnalyzeSection,
    DataSection,
    check_section,
    section_kinds,
)


@dataclass
class ExperimentFile:
    """The top-level keys of an experiment YAML."""

    name: str | None = None
    """Name of the experiment (the report's title); default: the YAML file's name."""
    description: str | None = None
    """A paragraph saying what the experiment asks; the report prints it under the title."""
    out: str | None = None
    """The run folder RUN (default runs/NAME); `upcycle run --out` overrides it."""
    data: DataSection | None = None
    """Generated data (offline studies), written to RUN/data and referred to as {data}."""
    seed: dict | None = None
    """upcycle pretrain keys: train the dense seed model (e.g. from a model preset); {seed} is its final
    model, and the default source of convert and of the dense baseline."""
    specialists: dict | None = None
    """upcycle pretrain keys and `domains`: dense models specialised per domain, {specialists.NAME}."""
    convert: dict | None = None
    """upcycle convert keys (preset, method, experts, top_k, any MoE field, …) and `variants`."""
    pretrain: dict | None = None
    """upcycle pretrain keys (data, steps, batch_size, …) and `baseline`: continued pretraining of each
    MoE and of the dense baseline, identically."""
    extend: dict | None = None
    """upcycle extend keys (expert, domain_data, …) and `of`: add experts to pretrained MoE models."""
    finetune: dict | None = None
    """upcycle finetune keys and `settings`: each model fine-tuned once per train-language setting."""
    evaluate: dict | None = None
    """NAME: {upcycle evaluate keys and `of`} per evaluation (xnli, lm, lm-eval:TASK)."""
    analyze: AnalyzeSection | None = None
    """routing (NAME: {analyze routing keys and `of`}), training and fertility."""
    report: dict | None = None
    """upcycle report keys (paper, title)."""
    sweep: dict | list | None = None
    """A grid KEY: [values] (or a list of grids, whose points are joined) expanding into one run per
    point; KEY is section.key (convert.ratio) or a key only one section has (ratio); 'a,b': [[1, 2], …]
    varies two keys together."""


@dataclass
class Point:
    """One point of the sweep: the values it sets, by YAML path."""

    values: dict[str, Any] = field(default_factory=dict)
    short: dict[str, str] = field(default_factory=dict)
    """YAML path → the name shown in labels (the key, or the whole path where keys repeat)."""

    def label(self, paths: list[str] | None = None) -> str:
        """'ratio=0.5,top_k=2' over ``paths`` (default: every swept path); '' without a sweep."""
        keys = list(self.values) if paths is None else [p for p in self.values if p in paths]
        return ",".join(f"{self.short[p]}={_show(self.values[p])}" for p in keys)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "+".join(_show(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._:+-]", "_", str(value))


@dataclass
class Experiment:
    """A checked experiment: the raw sections (re-checked per sweep point) and the points."""

    path: str
    name: str
    description: str
    out: str
    raw: dict[str, Any]
    data: DataSection | None
    points: list[Point]

    def sections(self, point: Point) -> dict[str, Any]:
        """The raw sections with ``point``'s values set."""
        raw = copy.deepcopy(self.raw)
        for path, value in point.values.items():
            _set_path(raw, path, value)
        return raw

    def note(self, point: Point) -> str:
        return f" (sweep point {point.label()})" if point.values else ""


def _set_path(raw: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def load_experiment(path: str | os.PathLike, out: str | None = None) -> Experiment:
    """Read and check an experiment YAML; every section is checked for every sweep point."""
    source = str(path)
    raw = {k.replace("-", "_"): v for k, v in load_yaml(path, field="EXPERIMENT").items()}
    top = check_mapping(raw, field_types(ExperimentFile), source=source)
    for name in ("seed", "specialists", "convert", "pretrain", "extend", "finetune", "evaluate", "report"):
        if name in top and top[name] is None:
            top[name] = {}  # `pretrain:` with nothing under it: the command's defaults
    data = from_dict(DataSection, top["data"], where="data", source=source) if top.get("data") else None
    if data is not None:
        data = _data_instances(data, source)
    name = top.get("name") or Path(source).stem
    if not re.fullmatch(r"[\w.+-]+", name):
        raise ConfigError("name", name, "use letters, digits, '.', '_', '+' or '-'", source=source)
    sections = {k: v for k, v in top.items() if k not in ("name", "description", "out", "data", "sweep")}
    if not sections.get("convert") and "convert" not in sections:
        raise ConfigError(
            "convert", None, "an experiment needs a convert section (the MoE to study)", source=source
        )
    points = sweep_points(top.get("sweep"), sections, source)
    experiment = Experiment(
        path=source,
        name=name,
        description=top.get("description") or "",
        out=out or top.get("out") or f"runs/{name}",
        raw=sections,
        data=data,
        points=points,
    )
    for point in points:
        check_sections(experiment, point)
    return experiment


def _data_instances(data: DataSection, source: str) -> DataSection:
    from upcycle.experiment.sections import CorpusData, DomainData, XnliData, located

    for name, cls in (("xnli", XnliData), ("corpus", CorpusData), ("domains", DomainData)):
        value = getattr(data, name)
        if isinstance(value, dict):
            with located(f"data.{name}", source):
                setattr(data, name, cls(**value))
    return data


# ------------------------------------------------------------------------------------------ sweep


def _section_types(name: str) -> dict[str, Any]:
    """The keys a sweepable section takes (for resolving a bare sweep key)."""
    if name == "convert":
        from upcycle.upcycling.cli import _yaml_types

        return _yaml_types()
    return section_kinds()[name].types()


def resolve_key(key: str, sections: dict, source: str) -> str:
    """The YAML path a sweep key sets: section.key as written, or the one section holding a bare key."""
    if "." in key:
        section = key.split(".")[0]
        if section not in SWEEPABLE:
            raise ConfigError(
                f"sweep.{key}", None, f"a sweep varies keys of {', '.join(SWEEPABLE)}", source=source
            )
        if section not in sections:
            raise ConfigError(f"sweep.{key}", None, f"the experiment has no {section} section", source=source)
        return key
    owners = [s for s in SWEEPABLE if s in sections and key in _section_types(s)]
    if len(owners) == 1:
        return f"{owners[0]}.{key}"
    if not owners:
        raise ConfigError(
            f"sweep.{key}",
            None,
            f"no section of this experiment ({', '.join(sections)}) has this key",
            source=source,
        )
    shown = " or ".join(f"{s}.{key}" for s in owners)
    raise ConfigError(f"sweep.{key}", None, f"several sections have it: write {shown}", source=source)


def _grid(grid: Any, sections: dict, source: str) -> list[dict[str, Any]]:
    """The points of one grid, each a mapping YAML path → value."""
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(
            "sweep", grid, "expected a mapping KEY: [values] (or a list of them)", source=source
        )
    axes: list[list[dict[str, Any]]] = []
    for key, values in grid.items():
        if not isinstance(key, str) or not key.strip():
            raise ConfigError("sweep", key, "keys must be option names", source=source)
        names = [k.strip() for k in key.split(",")]
        paths = [resolve_key(n, sections, source) for n in names]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.{key}", values, "expected a non-empty list of values", source=source)
        axis = []
        for value in values:
            items = value if len(paths) > 1 else [value]
            if len(paths) > 1 and (not isinstance(value, list) or len(value) != len(paths)):
                raise ConfigError(
                    f"sweep.{key}",
                    value,
                    f"each value must list {len(paths)} values, one per key",
                    source=source,
                )
            axis.append(dict(zip(paths, items)))
        axes.append(axis)
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)]


def sweep_points(sweep: Any, sections: dict, source: str) -> list[Point]:
    """The points of ``sweep`` (one grid, or a list of grids joined), duplicates removed, in order."""
    if not sweep:
        return [Point()]
    grids = sweep if isinstance(sweep, list) else [sweep]
    found: list[dict[str, Any]] = []
    for grid in grids:
        for values in _grid(grid, sections, source):
            if values not in found:
                found.append(values)
    paths = list(dict.fromkeys(p for values in found for p in values))
    ends = [p.split(".")[-1] for p in paths]
    short = {p: (e if ends.count(e) == 1 else p) for p, e in zip(paths, ends)}
    return [Point(values, {p: short[p] for p in values}) for values in found]


# ------------------------------------------------------------------------------------------ checks


def check_sections(experiment: Experiment, point: Point) -> dict[str, tuple[dict, dict]]:
    """Every section of ``point`` checked against its command's keys (the configs are built, and so
    validated, when the plan is made). Returns section → (command keys, run-only keys)."""
    try:
        return _check_sections(experiment, point)
    except ConfigError as err:
        if point.values and err.source is not None:
            err.allowed += experiment.note(point)
        raise


def _check_sections(experiment: Experiment, point: Point) -> dict[str, tuple[dict, dict]]:
    kinds = section_kinds()
    raw = experiment.sections(point)
    source = experiment.path
    out: dict[str, tuple[dict, dict]] = {}
    for name in ("seed", "specialists", "pretrain", "extend", "finetune", "report"):
        if name in raw:
            out[name] = check_section(raw[name], kinds[name], name, source)
    if "convert" in raw:
        out["convert"] = check_convert(raw["convert"], source)
    if "evaluate" in raw:
        out["evaluate"] = check_named(raw["evaluate"], "evaluate", kinds, source)
    if "analyze" in raw:
        out["analyze"] = check_analyze(raw["analyze"] or {}, kinds, source)
    return out


def check_convert(data: Any, source: str) -> tuple[dict, dict]:
    """convert's keys (as in a convert YAML file, MoE fields included) and `variants`."""
    from upcycle.experiment.sections import ConvertKeys
    from upcycle.upcycling.cli import read_mapping

    if not isinstance(data, dict):
        raise ConfigError("convert", data, "expected a mapping of keys to values", source=source)
    data = dict(data)
    variants = data.pop("variants", None)
    for key in ("out", "overwrite"):
        if key in data:
            raise ConfigError(f"convert.{key}", data[key], "upcycle run sets it; remove it", source=source)
    read_mapping(data, source=source, where="convert")
    extra = check_mapping(
        {"variants": variants or {}}, field_types(ConvertKeys), where="convert", source=source
    )
    for name, values in extra["variants"].items():
        _check_name(f"convert.variants.{name}", name, source)
        if not isinstance(values, dict):
            raise ConfigError(
                f"convert.variants.{name}", values, "expected a mapping of convert keys", source=source
            )
        read_mapping(values, source=source, where=f"convert.variants.{name}")
    return data, extra


def check_named(
    data: Any, where: str, kinds: dict, source: str, kind_name: str | None = None
) -> tuple[dict, dict]:
    """A section of named entries (evaluate: NAME: {...}): each entry checked."""
    kind = kinds.get(kind_name or where)
    if kind is None:
        raise ConfigError(
            where, None, f"upcycle {where} is not available in this installation", source=source
        )
    if not isinstance(data, dict):
        raise ConfigError(where, data, "expected NAME: {keys} entries", source=source)
    entries = {}
    for name, values in data.items():
        _check_name(f"{where}.{name}", name, source)
        if not isinstance(values, dict):
            raise ConfigError(
                f"{where}.{name}",
                values,
                f"expected a mapping of {where} keys (NAME: {{keys}})",
                source=source,
            )
        entries[name] = check_section(values, kind, f"{where}.{name}", source)
    return entries, {}


def check_analyze(data: Any, kinds: dict, source: str) -> tuple[dict, dict]:
    checked = check_mapping(data, field_types(AnalyzeSection), where="analyze", source=source)
    out: dict[str, Any] = {}
    out["routing"] = check_named(
        checked.get("routing") or {}, "analyze.routing", kinds, source, "analyze.routing"
    )[0]
    for name in ("training", "fertility"):
        value = checked.get(name, name == "training")
        if value is True:
            value = {}
        out[name] = (
            None
            if value is False
            else check_section(value, kinds[f"analyze.{name}"], f"analyze.{name}", source)
        )
    return out, {}


def _check_name(where: str, name: Any, source: str) -> None:
    """Names become folder names (RUN/<stage>/<name>)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][\w.+-]*", name):
        raise ConfigError(
            where, name, "names are folder names: letters, digits, '.', '_', '+', '-'", source=source
        )


__all__ = ["Experiment", "ExperimentFile", "Point", "check_sections", "load_experiment", "sweep_points"]
