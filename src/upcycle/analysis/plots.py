"""Figures of the analysis commands, built as matplotlib ``Figure`` objects (no pyplot state, no display
needed) and saved as PNG and SVG.

Routing (``upcycle analyze routing``, from a routing.json model record):

1. :func:`expert_share_figure`: the founding report's view (its Figures 1–4): for each expert, the share of
   its tokens that came from each group, stacked to 1, one panel per MoE layer.
2. :func:`group_fraction_figure`: Drop-Upcycling's view (its Figure 5 and Appendix C.2): for each group,
   the fraction of its tokens routed to each expert, grouped bars per expert with the uniform k/E line
   (1/E for top-1 counts), MoE layers as rows and models side by side.
3. :func:`heatmap_figure`: a layer × expert heatmap of p(expert | group), one panel per group.

Training (``upcycle analyze training``) and fertility (``upcycle fertility``) figures follow.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from upcycle.analysis.metrics import expert_shares, group_fractions

PANEL_W, PANEL_H = 4.2, 2.6


def save_figure(fig: Figure, folder: Path, stem: str) -> list[str]:
    """Write ``folder/stem.png`` and ``.svg``; returns the file names."""
    names = []
    for ext in ("png", "svg"):
        name = f"{stem}.{ext}"
        fig.savefig(folder / name, dpi=120 if ext == "png" else None, bbox_inches="tight")
        names.append(name)
    return names


def file_stem(name: str) -> str:
    """A file-name-safe version of a model, run or tokenizer name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def _grid(n: int, ncols: int) -> tuple[int, int]:
    ncols = max(1, min(ncols, n))
    return -(-n // ncols), ncols


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _legend(fig: Figure, handles: list, labels: list) -> None:
    """One legend for all panels, below them (clear of the title however many entries it has)."""
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 8), fontsize="small")


def _counts(record: dict, layer: str, choice: str) -> np.ndarray:
    return np.asarray(record["layers"][layer][choice], dtype=np.float64)


# --------------------------------------------------------------------------- routing views


def expert_share_figure(name: str, record: dict, groups: Sequence[str], choice: str = "topk") -> Figure:
    """The report's view: per expert, the share of its tokens from each group (stacked bars)."""
    layers = list(record["layers"])
    rows, cols = _grid(len(layers), 4)
    fig = Figure(figsize=(PANEL_W * cols, PANEL_H * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    tokens = np.asarray(record["tokens"], dtype=np.float64)
    colors = _colors(len(groups))
    for ax, layer in zip(axes, layers):
        shares = expert_shares(_counts(record, layer, choice), tokens)
        x = np.arange(shares.shape[1])
        bottom = np.zeros(shares.shape[1])
        for g, group in enumerate(groups):
            ax.bar(x, shares[g], bottom=bottom, color=colors[g], label=group, width=0.8)
            bottom += shares[g]
        ax.set_title(f"layer {layer}")
        ax.set_xticks(x)
        ax.set_xlabel("expert")
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of the expert's tokens")
    for ax in axes[len(layers) :]:
        ax.set_visible(False)
    _legend(fig, *axes[0].get_legend_handles_labels())
    fig.suptitle(f"{name}: where each expert's tokens come from ({_choice_text(choice)})")
    return fig


def _choice_text(choice: str) -> str:
    return "all top-k choices" if choice == "topk" else "top-1 choice"


def uniform_fraction(record: dict, choice: str) -> float:
    """Fraction of a group's tokens each expert gets under perfectly even routing: k/E (1/E for top-1)."""
    k = record["top_k"] if choice == "topk" else 1
    return k / record["num_experts"]


def group_fraction_figure(records: dict[str, dict], groups: Sequence[str], choice: str = "topk") -> Figure:
    """Drop-Upcycling's view: MoE layers as rows, models as columns; per panel, for each group the
    fraction of its tokens routed to each expert (grouped bars) and the uniform k/E line."""
    names = list(records)
    layers = sorted({int(layer) for r in records.values() for layer in r["layers"]})
    fig = Figure(figsize=(PANEL_W * len(names), PANEL_H * len(layers) + 0.6), layout="constrained")
    axes = fig.subplots(len(layers), len(names), squeeze=False, sharey="row")
    colors = _colors(len(groups))
    width = 0.8 / len(groups)
    for col, name in enumerate(names):
        record = records[name]
        for row, layer in enumerate(layers):
            ax = axes[row, col]
            if str(layer) not in record["layers"]:
                ax.set_axis_off()
                ax.set_title(f"{name}: layer {layer} is dense")
                continue
            frac = group_fractions(_counts(record, str(layer), choice), np.asarray(record["tokens"]))
            x = np.arange(frac.shape[1])
            for g, group in enumerate(groups):
                ax.bar(x + (g - (len(groups) - 1) / 2) * width, frac[g], width, color=colors[g], label=group)
            ax.axhline(
                uniform_fraction(record, choice),
                color="black",
                linestyle="--",
                linewidth=1,
                label="uniform k/E",
            )
            ax.set_title(f"{name}: layer {layer}")
            ax.set_xticks(x)
            ax.set_xlabel("expert")
            ax.set_ylabel("fraction of the group's tokens")
    handles, labels = next(ax for ax in axes.ravel() if ax.axison).get_legend_handles_labels()
    _legend(fig, handles, labels)
    fig.suptitle(f"tokens of each group routed to each expert ({_choice_text(choice)})")
    return fig


def heatmap_figure(name: str, record: dict, groups: Sequence[str], choice: str = "topk") -> Figure:
    """One panel per group: MoE layers × experts, colour = fraction of the group's tokens."""
    layers = list(record["layers"])
    tokens = np.asarray(record["tokens"], dtype=np.float64)
    frac_GLE = np.stack([group_fractions(_counts(record, layer, choice), tokens) for layer in layers], axis=1)
    rows, cols = _grid(len(groups), 4)
    fig = Figure(figsize=(3.4 * cols + 1, 0.45 * len(layers) * rows + 1.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    vmax = float(frac_GLE.max()) or 1.0
    image = None
    for ax, group, frac_LE in zip(axes, groups, frac_GLE):
        image = ax.imshow(frac_LE, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(group)
        ax.set_xticks(np.arange(frac_LE.shape[1]))
        ax.set_yticks(np.arange(len(layers)), labels=layers)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes[: len(groups)].tolist(), label="fraction of the group's tokens")
    fig.suptitle(f"{name}: routing per layer and expert ({_choice_text(choice)})")
    return fig


# --------------------------------------------------------------------------- fertility


def fertility_figure(doc: dict, measures: Sequence[tuple[str, str]]) -> Figure:
    """One panel per measure; per language, one bar per tokenizer."""
    langs = doc["data"]["languages"]
    names = list(doc["tokenizers"])
    fig = Figure(
        figsize=(max(6.0, 0.55 * len(langs) * max(1, len(names)) + 2), 2.4 * len(measures) + 0.6),
        layout="constrained",
    )
    axes = fig.subplots(len(measures), 1, squeeze=False).ravel()
    colors = _colors(len(names))
    width = 0.8 / len(names)
    x = np.arange(len(langs))
    for ax, (key, title) in zip(axes, measures):
        for t, name in enumerate(names):
            stats = doc["tokenizers"][name]["languages"]
            values = [np.nan if stats[lang][key] is None else stats[lang][key] for lang in langs]
            ax.bar(x + (t - (len(names) - 1) / 2) * width, values, width, color=colors[t], label=name)
        ax.set_title(title)
        ax.set_xticks(x, labels=langs)
    _legend(fig, *axes[0].get_legend_handles_labels())
    fig.suptitle(
        f"tokenizer fertility ({doc['data']['words']} words, {doc['data']['data']} {doc['data']['split']})"
    )
    return fig


# --------------------------------------------------------------------------- training


def loss_figure(runs: Sequence) -> Figure:
    """Training (solid) and held-out (dashed, dots) loss of every run on one set of axes."""
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for color, run in zip(_colors(len(runs)), runs):
        ax.plot(
            run.train_steps,
            run.train_loss,
            color=color,
            linewidth=1.2,
            label=f"{run.name} train ({run.loss_key})",
        )
        if run.eval_steps:
            ax.plot(
                run.eval_steps,
                run.eval_loss,
                color=color,
                linestyle="--",
                marker="o",
                markersize=3,
                label=f"{run.name} held-out",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training and held-out loss")
    ax.legend(fontsize="small")
    return fig


def expert_activation_figure(run, found: Sequence[dict], collapse_share: float) -> Figure:
    """Fan et al.'s expert activation: per MoE layer, each expert's share over steps; collapses marked."""
    layers = list(run.routing)
    rows, cols = _grid(len(layers), 3)
    fig = Figure(figsize=(PANEL_W * cols, PANEL_H * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, layer in zip(axes, layers):
        steps, fractions = run.routing[layer]
        share_RE = np.asarray(fractions, dtype=np.float64)
        E = share_RE.shape[1]
        colors = _colors(E)
        for e in range(E):
            ax.plot(steps, share_RE[:, e], color=colors[e], linewidth=1, label=f"expert {e}")
        ax.axhline(1 / E, color="black", linestyle="--", linewidth=0.8, label="even 1/E")
        ax.axhline(collapse_share / E, color="grey", linestyle=":", linewidth=0.8, label="collapse threshold")
        for c in (c for c in found if c["layer"] == layer):
            i0, i1 = steps.index(c["from_step"]), steps.index(c["to_step"]) + 1
            e = c["expert"]
            ax.plot(
                steps[i0:i1], share_RE[i0:i1, e], color=colors[e], linewidth=5, alpha=0.35, gid="collapse"
            )
            ax.plot(
                [steps[i0]],
                [share_RE[i0, e]],
                marker="v",
                color=colors[e],
                markersize=8,
                gid="collapse-start",
            )
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("step")
        ax.set_ylabel("share of assignments")
        ax.set_ylim(bottom=0)
    for ax in axes[len(layers) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    _legend(fig, handles, labels)
    fig.suptitle(f"{run.name}: expert activation over training")
    return fig


def accuracy_figure(runs: Sequence) -> Figure:
    """Validation accuracy per language over steps, one panel per fine-tuning run, the mean in black."""
    rows, cols = _grid(len(runs), 2)
    fig = Figure(figsize=(6 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, run in zip(axes, runs):
        langs = [lang for lang in run.accuracy if lang != "mean"]
        for color, lang in zip(_colors(len(langs)), langs):
            steps, values = run.accuracy[lang]
            ax.plot(steps, values, color=color, marker=".", label=lang)
        if "mean" in run.accuracy:
            steps, values = run.accuracy["mean"]
            ax.plot(steps, values, color="black", linewidth=2, label="mean")
        ax.set_title(f"{run.name}: validation accuracy")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize="small", ncols=2)
    for ax in axes[len(runs) :]:
        ax.set_visible(False)
    return fig
