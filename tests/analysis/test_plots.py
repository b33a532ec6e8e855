"""The figures hold the expected panels and series (checked on the matplotlib objects, not on pixels)."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.container import BarContainer
from matplotlib.image import AxesImage

from upcycle.analysis import plots
from upcycle.analysis.training import Run

GROUPS = ["en", "fr", "th"]


def record(layers=(1, 3), top_k=2, seed=0):
    """A routing.json model record: 3 groups × 4 experts, top-2, rows summing to K × tokens."""
    rng = np.random.default_rng(seed)
    tokens = [40, 40, 20]
    out = {"num_experts": 4, "top_k": top_k, "tokens": tokens, "layers": {}}
    for layer in layers:
        topk, top1 = [], []
        for n in tokens:
            top1.append(rng.multinomial(n, [0.1, 0.2, 0.3, 0.4]).tolist())
            topk.append((np.array(top1[-1]) + rng.multinomial(n, [0.4, 0.3, 0.2, 0.1])).tolist())
        out["layers"][str(layer)] = {"topk": topk, "top1": top1}
    return out


def visible(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.axison and ax.get_label() != "<colorbar>"]


def bars(ax):
    return [c for c in ax.containers if isinstance(c, BarContainer)]


def test_expert_share_figure_one_panel_per_layer_stacked_to_one():
    rec = record(layers=(0, 2, 4, 6, 8))
    fig = plots.expert_share_figure("moe", rec, GROUPS)
    axes = visible(fig)
    assert [ax.get_title() for ax in axes] == ["layer 0", "layer 2", "layer 4", "layer 6", "layer 8"]
    for ax, layer in zip(axes, rec["layers"]):
        containers = bars(ax)
        assert [c.get_label() for c in containers] == GROUPS
        heights = np.array([[p.get_height() for p in c.patches] for c in containers])  # G × E
        assert heights.shape == (3, 4)
        np.testing.assert_allclose(heights.sum(0), 1.0)
        counts = np.array(rec["layers"][layer]["topk"], dtype=float)
        frac = counts / np.array(rec["tokens"])[:, None]
        np.testing.assert_allclose(heights, frac / frac.sum(0))
        # Stacked: each group's bar starts where the previous one ended.
        np.testing.assert_allclose([p.get_y() for p in containers[1].patches], heights[0])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == GROUPS


@pytest.mark.parametrize("choice,uniform", [("topk", 2 / 4), ("top1", 1 / 4)])
def test_group_fraction_figure_layers_by_models_with_uniform_line(choice, uniform):
    naive, drop = record(seed=1), record(layers=(1,), seed=2)
    fig = plots.group_fraction_figure({"naive": naive, "drop": drop}, GROUPS, choice)
    grid = np.array(fig.axes[:4]).reshape(2, 2)  # rows = layers 1, 3; columns = models
    assert [ax.get_title() for ax in grid[:, 0]] == ["naive: layer 1", "naive: layer 3"]
    assert grid[0, 1].get_title() == "drop: layer 1"
    assert not grid[1, 1].axison  # drop has no MoE layer 3
    for ax, rec, layer in ((grid[0, 0], naive, "1"), (grid[1, 0], naive, "3"), (grid[0, 1], drop, "1")):
        containers = bars(ax)
        assert [c.get_label() for c in containers] == GROUPS
        heights = np.array([[p.get_height() for p in c.patches] for c in containers])
        want = np.array(rec["layers"][layer][choice]) / np.array(rec["tokens"])[:, None]
        np.testing.assert_allclose(heights, want)
        np.testing.assert_allclose(heights.sum(1), 2.0 if choice == "topk" else 1.0)
        [line] = [ln for ln in ax.get_lines() if ln.get_label() == "uniform k/E"]
        np.testing.assert_allclose(line.get_ydata(), uniform)


def test_heatmap_figure_one_layer_by_expert_image_per_group():
    rec = record(layers=(1, 3, 5))
    fig = plots.heatmap_figure("moe", rec, GROUPS)
    axes = [ax for ax in visible(fig) if ax.get_images()]
    assert [ax.get_title() for ax in axes] == GROUPS
    for g, ax in enumerate(axes):
        [image] = [im for im in ax.get_images() if isinstance(im, AxesImage)]
        data = np.asarray(image.get_array())
        assert data.shape == (3, 4)  # layers × experts
        want = [np.array(rec["layers"][layer]["topk"][g]) / rec["tokens"][g] for layer in rec["layers"]]
        np.testing.assert_allclose(data, want)
        assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "3", "5"]


def test_training_figures():
    steps = [1, 2, 3, 4, 5, 6]
    run = Run(
        "moe", "runs/moe", "finetune", "task_loss", steps, [3, 2.5, 2.2, 2, 1.9, 1.8], [3, 6], [2.4, 1.9]
    )
    run.routing = {
        "1": (steps, [[0.25] * 4] * 2 + [[0.3, 0.3, 0.39, 0.01]] * 4),
        "3": (steps, [[0.25] * 4] * 6),
    }
    run.accuracy = {"fr": ([3, 6], [0.4, 0.6]), "es": ([3, 6], [0.5, 0.7]), "mean": ([3, 6], [0.45, 0.65])}
    found = [{"layer": "1", "expert": 3, "from_step": 3, "to_step": 6, "records": 4, "min_share": 0.01}]

    fig = plots.expert_activation_figure(run, found, 0.1)
    axes = visible(fig)
    assert [ax.get_title() for ax in axes] == ["layer 1", "layer 3"]
    lines = [ln for ln in axes[0].get_lines() if ln.get_label().startswith("expert")]
    assert [ln.get_label() for ln in lines] == [f"expert {e}" for e in range(4)]
    np.testing.assert_allclose(lines[3].get_ydata(), [0.25, 0.25, 0.01, 0.01, 0.01, 0.01])
    [collapse] = [ln for ln in axes[0].get_lines() if ln.get_gid() == "collapse"]
    assert list(collapse.get_xdata()) == [3, 4, 5, 6]
    assert [ln.get_gid() for ln in axes[1].get_lines()].count("collapse") == 0

    dense = Run(
        "dense", "runs/dense", "pretrain", "loss", steps, [3, 2.6, 2.3, 2.1, 2, 1.95], [3, 6], [2.5, 2.0]
    )
    [ax] = plots.loss_figure([run, dense]).axes
    labels = [ln.get_label() for ln in ax.get_lines()]
    assert labels == ["moe train (task_loss)", "moe held-out", "dense train (loss)", "dense held-out"]
    assert list(ax.get_lines()[3].get_ydata()) == [2.5, 2.0]

    [ax] = visible(plots.accuracy_figure([run]))
    assert [ln.get_label() for ln in ax.get_lines()] == ["fr", "es", "mean"]


def test_fertility_figure_one_panel_per_measure_one_series_per_tokenizer():
    stats = lambda f: {"fertility": f, "premium": f / 2}  # noqa: E731
    doc = {
        "data": {"languages": ["en", "th"], "words": "whitespace", "data": "x", "split": "test"},
        "tokenizers": {
            "gpt2": {"languages": {"en": stats(1.1), "th": stats(9.5)}},
            "other": {"languages": {"en": stats(1.2), "th": {"fertility": 3.0, "premium": None}}},
        },
    }
    fig = plots.fertility_figure(doc, [("fertility", "tokens per word"), ("premium", "premium")])
    axes = visible(fig)
    assert [ax.get_title() for ax in axes] == ["tokens per word", "premium"]
    assert [c.get_label() for c in bars(axes[0])] == ["gpt2", "other"]
    assert [p.get_height() for p in bars(axes[0])[1].patches] == [1.2, 3.0]
    assert np.isnan(bars(axes[1])[1].patches[1].get_height())  # no premium: no bar
