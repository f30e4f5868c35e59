"""Tests for e2rnas_tf.plots: files, plotted data and diagram readability."""

import collections
import itertools
import json
import os

import numpy as np
import pytest
from matplotlib import patches
from PIL import Image

from e2rnas_tf import cli, plots
from e2rnas_tf.space import genotypes
from e2rnas_tf.space.ops import PRIMITIVES

# The Agg backend, as the library selects it: no display needed.
plt = plots._pyplot()


def _args(**kw):
    base = dict(command="plot", workdir=None, overwrite=False, genotype=None,
                checkpoint=None, export_base=None, model_name="e2rnas",
                output=None, extra=())
    base.update(kw)
    return cli.Args(**base)


def _edge_texts(fig):
    ax = fig.axes[0]
    return [t for t in ax.texts if t.get_text() in PRIMITIVES]


@pytest.mark.parametrize("name", sorted(genotypes.PUBLISHED))
@pytest.mark.parametrize("cell", ["normal", "reduce"])
def test_cell_figure_structure_and_readability(name, cell):
    genotype = genotypes.PUBLISHED[name]
    fig = plots.cell_figure(genotype, cell)
    try:
        ax = fig.axes[0]
        edges = getattr(genotype, cell)
        concat = getattr(genotype, f"{cell}_concat")
        arrows = [p for p in ax.patches
                  if isinstance(p, patches.FancyArrowPatch)]
        assert len(arrows) == len(edges) + len(concat)
        labels = _edge_texts(fig)
        assert (collections.Counter(t.get_text() for t in labels)
                == collections.Counter(op for op, _ in edges))
        names = {t.get_text() for t in ax.texts}
        assert {"$c_{k-2}$", "$c_{k-1}$", "$c_{k}$"} <= names
        assert {str(i) for i in range(genotype.steps)} <= names
        # Readability: no two edge labels overlap, and no label covers a
        # node box.
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        label_boxes = [t.get_bbox_patch().get_window_extent(renderer)
                       for t in labels]
        for a, b in itertools.combinations(label_boxes, 2):
            assert not a.overlaps(b), (a, b)
        node_boxes = [p.get_window_extent(renderer) for p in ax.patches
                      if isinstance(p, patches.FancyBboxPatch)]
        assert len(node_boxes) == genotype.steps + 3
        for a, b in itertools.product(label_boxes, node_boxes):
            assert not a.overlaps(b), (a, b)
        # Everything stays inside the figure.
        fig_box = fig.bbox
        for box in label_boxes + node_boxes:
            assert fig_box.x0 <= box.x0 and box.x1 <= fig_box.x1
            assert fig_box.y0 <= box.y0 and box.y1 <= fig_box.y1
    finally:
        plt.close(fig)


def test_layout_is_layered_left_to_right():
    genotype = genotypes.PUBLISHED["DARTS_V2"]
    pos = plots._layout(genotype.normal, genotype.normal_concat, 4)
    assert pos[0][0] == pos[1][0] == 0
    for k, (_, j) in enumerate(genotype.normal):
        assert pos[j][0] < pos[k // 2 + 2][0]
    assert pos["out"][0] > max(pos[s][0] for s in range(6))
    # Node 3 of DARTS_V2 reads node 0, so it sits one layer further right.
    assert pos[5][0] > pos[2][0] == pos[3][0] == pos[4][0]


def test_plot_genotype_writes_png_and_svg(tmp_path):
    genotype = genotypes.PUBLISHED["E2RNAS"]
    paths = plots.plot_genotype(genotype, str(tmp_path), "e2")
    assert sorted(os.path.basename(p) for p in paths) == [
        "e2_normal.png", "e2_normal.svg", "e2_reduce.png", "e2_reduce.svg"]
    image = Image.open(tmp_path / "e2_normal.png")
    assert image.format == "PNG" and image.width > 600
    pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 10  # not blank
    svg = (tmp_path / "e2_reduce.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    # Text stays text in the SVG: every op label of the cell is there.
    for op, _ in genotype.reduce:
        assert f">{op}<" in svg


def test_the_same_figure_gives_the_same_bytes(tmp_path):
    # No date or random ids: a repeated or resumed run writes identical
    # files (tools/killpoints.py compares them byte for byte).
    genotype = genotypes.PUBLISHED["E2RNAS"]
    first = plots.plot_genotype(genotype, str(tmp_path / "a"), "e2")
    second = plots.plot_genotype(genotype, str(tmp_path / "b"), "e2")
    for a, b in zip(first, second):
        assert open(a, "rb").read() == open(b, "rb").read(), a


def test_bad_cell_name():
    with pytest.raises(ValueError, match="cell="):
        plots.cell_figure(genotypes.PUBLISHED["E2RNAS"], "other")


def test_alpha_history_plots_softmax_per_edge():
    rng = np.random.RandomState(0)
    history = rng.randn(3, 14, len(PRIMITIVES))
    fig = plots.alpha_history_figure(history, PRIMITIVES)
    try:
        e = np.exp(history - history.max(-1, keepdims=True))
        expected = e / e.sum(-1, keepdims=True)
        axes = fig.axes
        for edge in (0, 5, 13):
            lines = axes[edge].get_lines()
            assert [l.get_label() for l in lines] == list(PRIMITIVES)
            for p, line in enumerate(lines):
                np.testing.assert_allclose(line.get_ydata(),
                                           expected[:, edge, p], rtol=1e-12)
                np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3])
        assert "node 3" in axes[13].get_title()
        assert "2" in axes[13].get_title()
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match="alpha_history"):
        plots.alpha_history_figure(history[0], PRIMITIVES)


def _write_metrics(path):
    """Records shaped like e2rnas search's metrics.jsonl."""
    records = []
    for step in range(0, 50, 10):
        records.append({"kind": "step", "step": step,
                        "objective/acc": 2.0 - step / 100,
                        "objective/adv": float("nan") if step == 20 else 3.0,
                        "weight/acc": 0.25, "weight/adv": 0.75,
                        "lr": 0.1, "note": "text"})
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        # Epoch lines carry no step and are not plotted.
        f.write(json.dumps({"kind": "epoch", "epoch": 1,
                            "objective/acc": 99.0}) + "\n")
        f.write("\n")
    return records


def test_metrics_figure_reads_prefixed_keys(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = _write_metrics(path)
    fig = plots.metrics_figure(str(path))
    try:
        top, bottom = fig.axes[:2]
        lines = {l.get_label(): l for l in top.get_lines()}
        assert sorted(lines) == ["objective/acc", "objective/adv"]
        np.testing.assert_allclose(lines["objective/acc"].get_ydata(),
                                   [r["objective/acc"] for r in records])
        # The NaN record is left out of objective/adv.
        np.testing.assert_array_equal(lines["objective/adv"].get_xdata(),
                                      [0, 10, 30, 40])
        assert sorted(l.get_label() for l in bottom.get_lines()) == [
            "weight/acc", "weight/adv"]
    finally:
        plt.close(fig)
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        plots.read_metrics(str(tmp_path / "bad.jsonl"))
    only_lr = tmp_path / "lr.jsonl"
    only_lr.write_text('{"step": 0, "lr": 0.1}\n')
    # The short prefixes are read too; without a step the index counts.
    short = tmp_path / "short.jsonl"
    short.write_text('{"obj/a": 1.0, "mgda/a": 1.0}\n{"obj/a": 0.5}\n')
    fig = plots.metrics_figure(str(short))
    try:
        (line,) = fig.axes[0].get_lines()
        assert line.get_label() == "obj/a"
        np.testing.assert_array_equal(line.get_xdata(), [0, 1])
        assert [l.get_label() for l in fig.axes[1].get_lines()] == ["mgda/a"]
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match="objective/"):
        plots.plot_metrics(str(only_lr), str(tmp_path / "x.png"))


def test_tradeoff_from_records_and_run_dirs(tmp_path):
    run = tmp_path / "run_a"
    run.mkdir()
    (run / "evaluation.json").write_text(json.dumps(
        {"params": 2.5e6, "clean_accuracy": 0.9,
         "robust_accuracy": {"fgsm": {"2": 0.5, "8": 0.45},
                             "pgd": {"2": 0.42, "8": 0.4}}}))
    out = plots.plot_tradeoff(
        [str(run), {"name": "b", "params": 3.0e6, "clean_accuracy": 0.92,
                    "robust_accuracy": 0.45}], str(tmp_path / "t.png"))
    assert Image.open(out).format == "PNG"
    name, values = plots._tradeoff_record(str(run))
    assert name == "run_a"
    assert values == {"params": 2.5e6, "clean": 0.9, "robust": 0.4}
    with pytest.raises(ValueError, match="clean_accuracy"):
        plots.plot_tradeoff([{"name": "x", "params": 1}],
                            str(tmp_path / "u.png"))


def test_main_genotype_and_workdir(tmp_path):
    out = tmp_path / "cells"
    assert plots.main(None, _args(genotype="DARTS_V1", output=str(out))) == 0
    assert sorted(os.listdir(out)) == [
        "DARTS_V1_normal.png", "DARTS_V1_normal.svg",
        "DARTS_V1_reduce.png", "DARTS_V1_reduce.svg"]

    run = tmp_path / "run"
    run.mkdir()
    genotypes.PUBLISHED["E2RNAS"].save(str(run / "genotype.json"))
    rng = np.random.RandomState(1)
    # As e2rnas search writes them: raw alphas, op names in config.json.
    np.savez(run / "alpha_history.npz", alpha_normal=rng.randn(2, 14, 3),
             alpha_reduce=rng.randn(2, 14, 3))
    (run / "config.json").write_text(json.dumps(
        {"model": {"primitives": ["none", "skip_connect", "max_pool_3x3"]}}))
    _write_metrics(run / "metrics.jsonl")
    assert plots.main(None, _args(workdir=str(run))) == 0
    assert sorted(os.listdir(run / "plots")) == [
        "alpha_normal.png", "alpha_reduce.png", "genotype_normal.png",
        "genotype_normal.svg", "genotype_reduce.png", "genotype_reduce.svg",
        "metrics.png"]
    # Without op names and with a non-default op count: a clear error.
    for name in ("config.json", "genotype.json", "metrics.jsonl"):
        os.remove(run / name)
    with pytest.raises(ValueError, match="primitives"):
        plots.main(None, _args(workdir=str(run)))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="none of"):
        plots.main(None, _args(workdir=str(empty)))
    with pytest.raises(ValueError, match="--genotype"):
        plots.main(None, _args())
    with pytest.raises(ValueError, match="neither a published name"):
        plots.main(None, _args(genotype="NOPE", output=str(out)))
