"""Tests for e2rnas_tf.tensorboard, read back with TensorBoard's readers."""

import glob
import io
import math
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hp_metadata
from tensorboard.plugins.hparams import plugin_data_pb2

from e2rnas_tf import tensorboard as tb
from e2rnas_tf.space import genotypes
from e2rnas_tf.space.ops import PRIMITIVES


def _weights(seed, edges=14):
    a = np.random.RandomState(seed).randn(edges, len(PRIMITIVES))
    e = np.exp(a - a.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _accumulator(logdir):
    acc = event_accumulator.EventAccumulator(
        logdir, size_guidance={event_accumulator.IMAGES: 0,
                               event_accumulator.TENSORS: 0,
                               event_accumulator.SCALARS: 0})
    acc.Reload()
    return acc


def test_alpha_entropy_matches_numpy():
    w = _weights(0)
    expected = np.mean(-np.sum(w * np.log(w), axis=1))
    np.testing.assert_allclose(float(tb.alpha_entropy(w)), expected,
                               rtol=1e-5)
    uniform = np.full([14, 8], 1 / 8)
    np.testing.assert_allclose(float(tb.alpha_entropy(uniform)), math.log(8),
                               rtol=1e-6)
    # One-hot rows (with exact zeros) have zero entropy, not NaN.
    assert float(tb.alpha_entropy(np.eye(8)[[0, 3, 5]])) == 0.0
    # Usable inside a compiled function.
    fn = tf.function(tb.alpha_entropy, autograph=False)
    np.testing.assert_allclose(float(fn(tf.constant(w, tf.float32))),
                               expected, rtol=1e-5)


def test_num_skip_connections():
    g = genotypes.PUBLISHED["DARTS_V2"]
    assert tb.num_skip_connections(g) == 2
    assert tb.num_skip_connections(g, "reduce") == 3
    assert tb.num_skip_connections(genotypes.PUBLISHED["E2RNAS"]) == 1
    with pytest.raises(ValueError, match="cell="):
        tb.num_skip_connections(g, "x")


def test_genotype_text_lists_every_edge():
    g = genotypes.PUBLISHED["E2RNAS"]
    text = tb.genotype_text(g)
    rows = [line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| node")]
    assert len(rows) == len(g.normal) + len(g.reduce)
    for row, (op, j) in zip(rows, g.normal + g.reduce):
        assert row.endswith(f"| {op} |")
        assert (f"node {j - 2}" if j >= 2 else "c_{k-") in row
    # The JSON block round-trips to the same genotype.
    block = text.split("```")[1].strip()
    assert genotypes.Genotype.from_json(block) == g


def test_images_are_uint8_rgb():
    image = tb.alpha_heatmap_image(_weights(1), PRIMITIVES, "t")
    assert image.dtype == np.uint8 and image.ndim == 4
    assert image.shape[0] == 1 and image.shape[-1] == 3
    assert image.std() > 10
    diagram = tb.cell_diagram_image(genotypes.PUBLISHED["DARTS_V1"],
                                    "reduce")
    assert diagram.dtype == np.uint8 and diagram.shape[-1] == 3
    # Wider than tall, like the left-to-right diagram.
    assert diagram.shape[2] > diagram.shape[1]
    with pytest.raises(ValueError, match="weights of shape"):
        tb.alpha_heatmap_image(_weights(1)[:, :3], PRIMITIVES)


def test_search_epoch_summaries_read_back(tmp_path):
    logdir = str(tmp_path / "tb")
    writer = tf.summary.create_file_writer(logdir)
    g = genotypes.PUBLISHED["DARTS_V2"]
    steps = (10, 20)
    weights = {s: (_weights(s), _weights(s + 1)) for s in steps}
    for s in steps:
        tags = tb.write_search_epoch_summaries(
            writer, s, weights[s][0], weights[s][1], g, PRIMITIVES)
    writer.close()
    acc = _accumulator(logdir)
    tags_by_kind = acc.Tags()
    image_tags = ("arch/alpha_normal", "arch/alpha_reduce",
                  "arch/cell_normal", "arch/cell_reduce")
    for tag in image_tags:
        # TF2 image summaries are string tensors [width, height, png...]
        # marked for the images plugin.
        assert acc.SummaryMetadata(tag).plugin_data.plugin_name == "images"
        events = acc.Tensors(tag)
        assert [e.step for e in events] == list(steps)
        width, height, png = tf.make_ndarray(events[-1].tensor_proto)
        decoded = Image.open(io.BytesIO(png))
        assert decoded.format == "PNG"
        assert (decoded.width, decoded.height) == (int(width), int(height))
        assert np.asarray(decoded).std() > 10
    # Scalars from tf.summary.scalar are tensors in TF2 event files.
    for s, event in zip(steps, acc.Tensors("arch/entropy_normal")):
        value = float(tf.make_ndarray(event.tensor_proto))
        assert event.step == s and math.isfinite(value)
        w = weights[s][0]
        np.testing.assert_allclose(
            value, np.mean(-np.sum(w * np.log(w), axis=1)), rtol=1e-5)
    skips = [float(tf.make_ndarray(e.tensor_proto))
             for e in acc.Tensors("arch/skip_connect_normal")]
    assert skips == [2.0, 2.0]
    text = acc.Tensors("arch/genotype")
    assert [e.step for e in text] == list(steps)
    body = tf.make_ndarray(text[0].tensor_proto).item().decode()
    assert "dil_conv_3x3" in body
    assert set(tags) <= set(tags_by_kind["tensors"])
    assert sorted(tags) == sorted(
        set(image_tags) | {"arch/entropy_normal",
                                       "arch/entropy_reduce",
                                       "arch/skip_connect_normal",
                                       "arch/genotype"})


def test_write_hparams_read_back(tmp_path):
    config = ml_collections.ConfigDict(dict(
        seed=3, batch_size=64, objectives=["acc", "adv"],
        arch=dict(lr=3e-4, order="first"), adv=dict(enabled=False)))
    flat = tb.flatten_config(config)
    assert flat == {"seed": 3, "batch_size": 64,
                    "objectives": "['acc', 'adv']", "arch.lr": 3e-4,
                    "arch.order": "first", "adv.enabled": False}
    logdir = str(tmp_path / "hp")
    writer = tf.summary.create_file_writer(logdir)
    tb.write_hparams(writer, config)
    writer.close()
    found = None
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == (
                        hp_metadata.PLUGIN_NAME):
                    found = plugin_data_pb2.HParamsPluginData.FromString(
                        value.metadata.plugin_data.content)
    assert found is not None
    hparams = found.session_start_info.hparams
    assert hparams["arch.order"].string_value == "first"
    assert hparams["seed"].number_value == 3
    assert hparams["arch.lr"].number_value == pytest.approx(3e-4)
    assert hparams["adv.enabled"].bool_value is False


def test_parse_profile_steps():
    assert tb.parse_profile_steps("") is None
    assert tb.parse_profile_steps(None) is None
    assert tb.parse_profile_steps("5,8") == (5, 8)
    for bad in ("5", "8,5", "a,b", "1,2,3", "-1,2", "3,3"):
        with pytest.raises(ValueError, match="profile_steps"):
            tb.parse_profile_steps(bad)
    with pytest.raises(ValueError, match="start"):
        tb.profile("/tmp", 3, 2)


def test_profile_writes_a_trace(tmp_path):
    logdir = str(tmp_path / "prof")

    @tf.function(autograph=False)
    def step_fn(x):
        return tf.reduce_sum(tf.matmul(x, x))

    x = tf.random.uniform([32, 32])
    hook = tb.profile(logdir, 2, 4)
    traced = []
    for step in range(6):
        hook(step)
        traced.append(hook.active)
        step_fn(x)
    hook.stop()
    assert traced == [False, False, True, True, False, False]
    files = glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*"))
    assert files, os.listdir(logdir)
    assert any(f.endswith(".xplane.pb") for f in files)
    assert all(os.path.getsize(f) > 0 for f in files)
    # A second stop is harmless, and a finished hook never restarts.
    hook.stop()
    hook(2)
    assert not hook.active


def test_profile_stop_ends_a_short_run(tmp_path):
    logdir = str(tmp_path / "prof2")
    hook = tb.profile(logdir, 0, 100)
    hook(0)
    assert hook.active
    tf.reduce_sum(tf.ones([4]))
    hook.stop()
    assert not hook.active
    assert glob.glob(os.path.join(logdir, "plugins", "profile", "*",
                                  "*.xplane.pb"))
