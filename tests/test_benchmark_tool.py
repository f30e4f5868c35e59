"""Tests for the pure helpers of tools/benchmark.py and benchmark_matrix.py.

FLOP counts are checked against hand formulas on single layers; the table
writer and argument validation on given inputs. No timing assertions.
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from e2rnas_tf.search import objectives
from e2rnas_tf.space import costs
from tests.tool_util import load_tool

bench = load_tool("benchmark")
matrix = load_tool("benchmark_matrix")


def _graph(fn, *shapes):
    specs = [tf.TensorSpec(s, tf.float32) for s in shapes]
    return tf.function(fn, autograph=False).get_concrete_function(
        *specs).graph


def _conv_macs(n, h_out, w_out, kh, kw, c_in, c_out):
    return n * h_out * w_out * kh * kw * c_in * c_out


# ---------------------------------------------------------------------------
# FLOP counting.


def test_single_conv_layer_forward_matches_hand_count():
    # 9x9 input, stride 2, SAME: 5x5 outputs.
    conv = keras.layers.Conv2D(4, 3, strides=2, padding="same")
    conv.build((2, 9, 9, 3))
    counts = bench.count_flops(_graph(conv, (2, 9, 9, 3)))
    assert dict(counts) == {"Conv2D": 2 * _conv_macs(2, 5, 5, 3, 3, 3, 4)}


def test_conv_training_step_counts_forward_and_both_backprops():
    kernel = tf.Variable(tf.ones([3, 3, 3, 4]))

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.nn.conv2d(x, kernel, 1, "SAME"))
        # The loss is returned: otherwise the forward conv is dead (the
        # gradient of a sum of a linear map does not need its value).
        return loss, tape.gradient(loss, [x, kernel])

    one = 2 * _conv_macs(2, 8, 8, 3, 3, 3, 4)
    counts = bench.count_flops(_graph(step, (2, 8, 8, 3)))
    assert dict(counts) == {"Conv2D": one, "Conv2DBackpropInput": one,
                            "Conv2DBackpropFilter": one}


def test_input_gradient_counts_only_the_kernels_that_run():
    # An attack's gradient w.r.t. the input: the tape also emits the
    # filter backprop, which nothing uses and the runtime prunes.
    kernel = tf.Variable(tf.ones([3, 3, 3, 4]))

    def grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            # The ReLU needs the conv's value for the gradient.
            loss = tf.reduce_sum(tf.nn.relu(
                tf.nn.conv2d(x, kernel, 1, "SAME")))
        return tape.gradient(loss, x)

    graph = _graph(grad, (2, 8, 8, 3))
    assert "Conv2DBackpropFilter" in [op.type for op in graph.get_operations()]
    one = 2 * _conv_macs(2, 8, 8, 3, 3, 3, 4)
    assert dict(bench.count_flops(graph)) == {
        "Conv2D": one, "Conv2DBackpropInput": one}


def test_depthwise_and_dense_with_gradients():
    dw_kernel = tf.Variable(tf.ones([5, 5, 6, 1]))
    dense = tf.Variable(tf.ones([6, 10]))

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            h = tf.nn.depthwise_conv2d(x, dw_kernel, [1, 1, 1, 1], "SAME",
                                       dilations=[1, 1])
            logits = tf.matmul(tf.reduce_mean(h, [1, 2]), dense)
            loss = tf.reduce_sum(logits)
        return loss, tape.gradient(loss, [x, dw_kernel, dense])

    counts = bench.count_flops(_graph(step, (3, 7, 7, 6)))
    dw = 2 * _conv_macs(3, 7, 7, 5, 5, 6, 1)
    matmul = 2 * 3 * 6 * 10
    assert counts["DepthwiseConv2dNative"] == dw
    assert counts["DepthwiseConv2dNativeBackpropInput"] == dw
    assert counts["DepthwiseConv2dNativeBackpropFilter"] == dw
    # Forward, d/dinput and d/dweights are one m*k*n product each.
    assert counts["MatMul"] == 3 * matmul
    assert sum(counts.values()) == 3 * dw + 3 * matmul


def test_pgd_loop_body_counts_once_per_step():
    kernel = tf.Variable(tf.ones([3, 3, 3, 4]) * 0.1)
    dense = tf.Variable(tf.ones([4, 10]) * 0.1)

    def model_fn(x):
        h = tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME"))
        return tf.matmul(tf.reduce_mean(h, [1, 2]), dense)

    def attack(x):
        return objectives.pgd(model_fn, x, tf.zeros([2], tf.int32),
                              eps=0.03, step_size=0.01, steps=4,
                              seed=tf.constant([0, 1]))

    counts = bench.count_flops(_graph(attack, (2, 6, 6, 3)))
    conv = 2 * _conv_macs(2, 6, 6, 3, 3, 3, 4)
    matmul = 2 * 2 * 4 * 10
    # Each step: forward, and the input gradient (no weight gradients).
    assert dict(counts) == {"Conv2D": 4 * conv,
                            "Conv2DBackpropInput": 4 * conv,
                            "MatMul": 4 * 2 * matmul}


def test_pgd_on_a_derived_network_matches_the_library_mac_count():
    # An independent count: e2rnas_tf.space.costs reads forward multiply-adds of
    # one image off its own trace. PGD-k = k forwards and k input
    # gradients, each costing one forward's multiply-adds.
    from e2rnas_tf.space import model as model_lib

    net = model_lib.DerivedNetwork("E2RNAS", channels=4, num_classes=10,
                                   layers=3)
    net.build((None, 8, 8, 3))
    macs = costs.count_inference_macs(net, 8)

    def attack(x):
        return objectives.pgd(lambda z: net(z, training=False), x,
                              tf.zeros([2], tf.int32), eps=0.03,
                              step_size=0.01, steps=3,
                              seed=tf.constant([0, 1]))

    counts = bench.count_flops(_graph(attack, (2, 8, 8, 3)))
    assert sum(counts.values()) == 2 * 2 * 3 * 2 * macs


def test_conditional_counts_its_costlier_branch():
    small, big = tf.ones([2, 3]), tf.ones([2, 30])

    def fn(x):
        return tf.cond(tf.reduce_sum(x) > 0,
                       lambda: tf.reduce_sum(tf.matmul(x, small)),
                       lambda: tf.reduce_sum(tf.matmul(x, big)))

    counts = bench.count_flops(_graph(fn, (4, 2)))
    assert dict(counts) == {"MatMul": 2 * 4 * 2 * 30}


def test_other_flops_are_tfs_registry_for_the_uncounted_ops():
    kernel = tf.ones([1, 1, 3, 3])

    def fn(x):
        pooled = tf.nn.avg_pool2d(x, 2, 2, "VALID")
        return tf.nn.conv2d(pooled, kernel, 1, "SAME")

    graph = _graph(fn, (1, 4, 4, 3))
    assert dict(bench.count_flops(graph)) == {"Conv2D": 2 * 2 * 2 * 3 * 3}
    # TF's registry: one FLOP per window element per output (2x2 windows,
    # 1x2x2x3 outputs); the conv is not counted twice.
    assert dict(bench.count_other_flops(graph)) == {"AvgPool": 4 * 12}


def test_dynamic_shape_is_refused():
    kernel = tf.ones([3, 3, 3, 4])
    graph = _graph(lambda x: tf.nn.conv2d(x, kernel, 1, "SAME"),
                   (None, 8, 8, 3))
    with pytest.raises(ValueError, match="static shapes"):
        bench.count_flops(graph)


# ---------------------------------------------------------------------------
# The markdown table.


def _ok_record(**overrides):
    record = dict(
        config="C", workload="search1", xla="off", precision="float32",
        devices=1, status="ok", reason="", step_s=0.8123, step_s_min=0.7,
        steps=10,
        images_per_s=39.41, first_step_s=12.84, peak_rss_gib=1.664,
        tf_peak_gib=0.2, flops_per_step=11.8e9, gflops_per_s=14.53,
        peak_fraction=0.0516, load_start=0.5, load_end=1.25)
    record.update(overrides)
    return record


def test_table_has_one_row_per_record_whatever_its_status():
    records = [
        _ok_record(note="bf16 model"),
        dict(config="C", workload="pgd", xla="on", precision="float32",
             devices=2, status="refused", reason="Expected a|b", load_start=0,
             load_end=0),
        dict(config="A", workload="search2", xla="on", precision="float32",
             devices=1, status="timeout",
             reason="killed after the 900 s timeout, in the first step"),
    ]
    lines = matrix.format_table(records).splitlines()
    assert lines[0].startswith("| config | workload | XLA |")
    assert len(lines) == 2 + len(records)
    cells = [[c.strip() for c in line.strip("|").split(" | ")]
             for line in lines[2:]]
    assert all(len(row) == len(cells[0]) for row in cells)
    ok, refused, timeout = cells
    assert ok[:6] == ["C", "search1", "off", "float32", "1", "ok"]
    assert ok[6:14] == ["0.812 (0.700) n=10", "39.41", "12.8", "1.66",
                        "0.200", "11.80", "14.53", "5.2"]
    assert ok[14:] == ["0.5/1.2", "bf16 model"]
    # Failed rows carry their reason, escaped, and no figures.
    assert refused[5] == "refused" and refused[-1] == "Expected a\\|b"
    assert set(refused[6:14]) == {""}
    assert timeout[5] == "timeout" and "900 s" in timeout[-1]
    assert timeout[14] == ""


def test_matrix_cells_cover_the_product_xla_off_first():
    cells = matrix.cells(["C", "A"], bench.WORKLOADS, ["on", "off"],
                         bench.PRECISIONS, [1, 2])
    assert len(cells) == 2 * 4 * 2 * 2 * 2
    assert len({matrix.cell_key(c) for c in cells}) == len(cells)
    assert [c["xla"] for c in cells[:16]] == ["off"] * 16
    assert cells[0]["config"] == "C" and cells[-1]["config"] == "A"
    with pytest.raises(ValueError, match="B is A"):
        matrix.cells(["B"], ["search1"], ["off"], ["float32"], [1])


def test_table_rows_keep_the_latest_record_per_cell_in_matrix_order():
    a = _ok_record(config="A", step_s=5.0)
    c_old = _ok_record(step_s=2.0)
    c_new = _ok_record(step_s=1.0)
    c_pgd = _ok_record(workload="pgd")
    rows = matrix.table_rows([a, c_old, c_pgd, c_new])
    assert rows == [c_new, c_pgd, a]


def test_failure_reason_helpers(tmp_path):
    log = tmp_path / "cell.log"
    log.write_text("config C: ...\nset-up: 1.0 s\n"
                   "I0000 00:00:1 x.cc:1] noise\n")
    assert matrix._stage(str(log)) == "in the first step (trace + compile)"
    assert matrix._last_line(str(log)) == "set-up: 1.0 s"


# ---------------------------------------------------------------------------
# Arguments.


def _args(*argv):
    return bench.check_args(bench.build_parser().parse_args(list(argv)))


def test_arguments_default_and_legacy_config():
    assert _args().workload == "search1"
    assert _args("--config", "B").workload == "search2"
    args = _args("--config", "A", "--workload", "pgd", "--xla", "on",
                 "--precision", "mixed_bfloat16", "--devices", "2")
    assert (args.workload, args.xla, args.precision, args.devices) == (
        "pgd", "on", "mixed_bfloat16", 2)


@pytest.mark.parametrize("argv, match", [
    (("--config", "D"), "--config"),
    (("--workload", "infer"), "--workload"),
    (("--config", "B", "--workload", "train"), "search2"),
    (("--xla", "yes"), "--xla"),
    (("--precision", "mixed_float16"), "--precision"),
    (("--devices", "3"), "--devices"),
    (("--steps", "0"), "--steps"),
    (("--warmup", "-1"), "--warmup"),
    (("--workload", "train", "--profile"), "--profile"),
])
def test_bad_arguments_are_refused(argv, match):
    with pytest.raises(ValueError, match=match):
        _args(*argv)


def test_command_lines_exit_2_on_bad_arguments(capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(["--devices", "3"])
    assert info.value.code == 2
    assert "Expected --devices" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        matrix.parse_args(["--configs", "A,B"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        matrix.parse_args(["--timeout", "0"])


def test_json_lines_append(tmp_path):
    path = str(tmp_path / "sub" / "out.jsonl")
    bench.append_json(path, {"a": 1})
    bench.append_json(path, {"a": 2})
    assert matrix.read_records(path) == [{"a": 1}, {"a": 2}]


def test_refused_cell_gets_a_row_with_the_projects_reason(tmp_path):
    # A genotype the project cannot resolve: its ValueError comes before
    # any model is built, so this runs one short subprocess.
    out = str(tmp_path / "m")
    assert matrix.main(["--out", out, "--configs", "C", "--workloads",
                        "pgd", "--xla", "off", "--precision", "float32",
                        "--devices", "1", "--steps", "1", "--warmup",
                        "0", "--genotype", "NO_SUCH_GENOTYPE"]) == 0
    [record] = matrix.read_records(os.path.join(out, "results.jsonl"))
    assert record["status"] == "refused"
    assert "'NO_SUCH_GENOTYPE' is neither a published name" in \
        record["reason"]
    table = open(os.path.join(out, "table.md")).read()
    assert "| refused |" in table and "NO_SUCH_GENOTYPE" in table
    assert json.dumps(record)  # JSON-ready
    assert np.isfinite(record["load_start"])
