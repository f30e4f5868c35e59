"""Times E2RNAS workloads (not a test; the figures go to BENCHMARKS.md).

Workloads (``--workload``), on synthetic 10-class data (no data set needed):

- ``search1``: the search step, first order: alpha by MGDA over acc + adv
  (FGSM, random start) + params (abs constraint), l2-normalised, then the
  weight step (`search_step.SearchStep`).
- ``search2``: the same, second order (DARTS' unrolled step).
- ``train``: one retraining step (`train.make_train_step`) of a derived
  network (``--genotype``, default E2RNAS; auxiliary head, drop-path 0.2,
  SGD with momentum).
- ``pgd``: evaluation under PGD-10 (eps 8/255, step eps/4, random start,
  our in-graph `objectives.pgd`, a `tf.while_loop`) of the same derived
  network in inference mode, plus the prediction on the adversarial batch.
  `e2rnas evaluate` attacks a float32 copy of the model (cleverhans); with
  ``--precision mixed_bfloat16`` this workload times the bf16 model.

Sizes (``--config``): A = 8 cells, C=16, batch 64, 32x32 (the paper's
search step); B = A with ``search2`` (kept for the commands quoted in
BENCHMARKS.md); C = 5 cells, C=8, batch 32, 16x16 (the CPU demo's scale).
The derived network of ``train`` / ``pgd`` has the same cells, channels,
batch and image size.

Execution (as the project's runtime config): ``--xla on`` sets
``config.jit_compile``; ``--precision`` sets ``config.mixed_precision``;
``--devices 2`` splits the CPU into two logical devices
(``strategy.cpu_devices=2``) and replicates with ``strategy.name=mirrored``,
the global batch unchanged; ``--xla on --devices 2`` compiles each
replica's computation (`runtime.jit_scope`). A setting the project refuses
(its ValueError, e.g. an unknown ``--genotype``) is reported as ``refused``
with the project's one-line reason.

Reported per run (one JSON line per run with ``--json out.jsonl``):

- time to first step: the first call (trace + XLA compile if on + one
  step); ``setup_s`` is what came before (network, resource tables);
- seconds per step: median (and min/max) of ``--steps`` steps after
  ``--warmup`` steps; images/s = global batch / median (the authors'
  definition);
- peak memory: the process's peak RSS (``getrusage``) and the peak of
  TensorFlow's CPU allocator (``tf.config.experimental.get_memory_info``;
  one allocator serves all logical CPU devices), both read before the
  matmul below;
- FLOPs of one step counted on the step's traced graph (`count_flops`):
  convolutions, depthwise convolutions and matrix products, forward AND
  their backprop kernels (``Conv2DBackpropInput``/``Filter`` and the
  depthwise ones), 2 FLOPs per multiply-add, only for the ops that run
  (`live_ops`: a tape emits kernels nobody uses, which the runtime
  prunes), loop bodies times their ``maximum_iterations``, the costlier
  branch of a conditional. Checked against hand counts on single layers
  and, for PGD on a derived network, against `e2rnas_tf.space.costs` (tests/
  test_benchmark_tool.py). The count is of the TensorFlow graph, so it is
  the same with and without XLA. Batch norm, activations, pooling,
  element-wise and optimizer arithmetic are not counted: they are
  memory-bound, and TensorFlow's own FLOP registry (pooling and
  element-wise ops; it has no batch norm or ReLU) puts them at 4 % on top
  for the C search step and 9 % for the C train step
  (``flops_other_registered`` in the record). The achieved GFLOP/s is
  thus a slight underestimate of the arithmetic done;
- the machine's measured peak: the best of ``--matmul-reps`` float32
  ``N x N`` matmuls (2 N^3 FLOPs each) in the same process with the same
  thread settings, and the fraction of it the step achieves (under
  ``mixed_bfloat16`` a bfloat16 matmul's peak is reported as well).

Examples::

    python tools/benchmark.py --config C --steps 10 --threads 2 --profile
    python tools/benchmark.py --config A --workload train --xla on \\
        --precision mixed_bfloat16 --devices 1 --json runs/bench.jsonl

``tools/benchmark_matrix.py`` runs a matrix of cells, each in a fresh
process, and writes a markdown table.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = ("A", "B", "C")
WORKLOADS = ("search1", "search2", "train", "pgd")
PRECISIONS = ("float32", "mixed_bfloat16")
XLA = ("on", "off")
DEVICES = (1, 2)
# layers, channels, batch, image size
SIZES = {"A": (8, 16, 64, 32), "B": (8, 16, 64, 32), "C": (5, 8, 32, 16)}
PGD_EPS, PGD_STEPS = 8.0, 10  # /255, iterations
TRAIN_DROP_PATH = 0.2

# Ops whose multiply-adds `count_flops` counts.
_CONV = ("Conv2D", "_FusedConv2D")
_CONV_BACKPROP = ("Conv2DBackpropInput", "Conv2DBackpropFilter")
_DEPTHWISE = ("DepthwiseConv2dNative", "_FusedDepthwiseConv2dNative")
_DEPTHWISE_BACKPROP = ("DepthwiseConv2dNativeBackpropInput",
                       "DepthwiseConv2dNativeBackpropFilter")
_MATMUL = ("MatMul", "_MatMul", "_FusedMatMul")
_BATCH_MATMUL = ("BatchMatMul", "BatchMatMulV2", "BatchMatMulV3")
_CALLS = ("PartitionedCall", "StatefulPartitionedCall")
_WHILES = ("While", "StatelessWhile")
_IFS = ("If", "StatelessIf")
_CASES = ("Case", "StatelessCase")


# ---------------------------------------------------------------------------
# Arguments.



# The runtime set-up of a measurement (precision, seeds, determinism)
# holds until `main` returns, which restores the process (left to the
# interpreter's exit, the restore ran after its modules were gone and
# printed an ImportError).
_PROCESS = contextlib.ExitStack()


def _configure(config):
    from e2rnas_tf import runtime

    _PROCESS.enter_context(runtime.configured(config))

def default_workload(config):
    """The workload a bare ``--config`` meant before ``--workload`` existed."""
    return "search2" if config == "B" else "search1"


def check_args(args):
    """Validates parsed arguments; fills ``args.workload``.

    Args:
        args: an `argparse.Namespace` from `build_parser`.

    Returns:
        ``args``, with ``workload`` resolved from ``config`` if unset.

    Raises:
        ValueError: for a setting out of range or a contradictory one.
    """
    if args.config not in CONFIGS:
        raise ValueError(f"Expected --config in {list(CONFIGS)}. "
                         f"Received: config={args.config!r}")
    if args.workload is None:
        args.workload = default_workload(args.config)
    if args.workload not in WORKLOADS:
        raise ValueError(f"Expected --workload in {list(WORKLOADS)}. "
                         f"Received: workload={args.workload!r}")
    if args.config == "B" and args.workload != "search2":
        raise ValueError(
            "Expected --workload search2 with --config B (B is A searched "
            "second order; use --config A for other workloads). "
            f"Received: workload={args.workload!r}")
    if args.xla not in XLA:
        raise ValueError(f"Expected --xla in {list(XLA)}. "
                         f"Received: xla={args.xla!r}")
    if args.precision not in PRECISIONS:
        raise ValueError(f"Expected --precision in {list(PRECISIONS)}. "
                         f"Received: precision={args.precision!r}")
    if args.devices not in DEVICES:
        raise ValueError(f"Expected --devices in {list(DEVICES)}. "
                         f"Received: devices={args.devices!r}")
    for name, minimum in (("steps", 1), ("warmup", 0), ("threads", 0),
                          ("matmul_size", 1), ("matmul_reps", 1)):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) \
                or value < minimum:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"Expected {flag} to be an integer >= "
                             f"{minimum}. Received: {name}={value!r}")
    batch = SIZES[args.config][2]
    if batch % args.devices:
        raise ValueError(
            f"Expected the batch ({batch}) divisible by --devices. "
            f"Received: devices={args.devices}")
    if args.profile and args.workload not in ("search1", "search2"):
        raise ValueError(
            "Expected --profile only with a search workload. Received: "
            f"workload={args.workload!r}")
    return args


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="C",
                        help="size: A, B (= A, search2) or C")
    parser.add_argument("--workload", default=None,
                        help=f"one of {', '.join(WORKLOADS)} (default "
                        "search1; search2 for --config B)")
    parser.add_argument("--xla", default="off", help="jit_compile: on|off")
    parser.add_argument("--precision", default="float32",
                        help="float32 | mixed_bfloat16")
    parser.add_argument("--devices", type=int, default=1,
                        help="1, or 2 (mirrored over 2 logical CPUs)")
    parser.add_argument("--genotype", default="E2RNAS",
                        help="derived network of train / pgd")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads (0 = TF default)")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--matmul-reps", type=int, default=5)
    parser.add_argument("--json", default="",
                        help="append one JSON line per run to this file")
    parser.add_argument("--profile", action="store_true",
                        help="search only: also time forward / backward / "
                        "attack alone")
    return parser


# ---------------------------------------------------------------------------
# FLOP counting.


def _shape(tensor, op):
    shape = tensor.shape
    if shape.rank is None or None in shape.as_list():
        raise ValueError(
            "Expected static shapes to count FLOPs. Received: "
            f"{op.type} node {op.name!r} with shape {shape}")
    return shape.as_list()


def _positions(shape, op):
    """``N * H * W`` of an image-shaped tensor in the op's data format."""
    fmt = op.get_attr("data_format").decode() \
        if "data_format" in op.node_def.attr else "NHWC"
    if fmt.startswith("NC"):
        return shape[0] * shape[2] * shape[3]
    return shape[0] * shape[1] * shape[2]


def _einsum_macs(op):
    equation = op.get_attr("equation").decode().replace(" ", "")
    inputs = equation.split("->")[0].split(",")
    if "..." in equation or len(inputs) != len(op.inputs):
        raise ValueError(f"Expected an einsum without ellipsis. Received: "
                         f"equation={equation!r} in node {op.name!r}")
    sizes = {}
    for letters, tensor in zip(inputs, op.inputs):
        sizes.update(zip(letters, _shape(tensor, op)))
    total = 1
    for size in sizes.values():
        total *= size
    return total


def node_macs(op):
    """Multiply-adds of one graph node; 0 for nodes that are not counted.

    Forward and backprop kernels of a convolution cost the same
    ``N * H_out * W_out * kh * kw * C_in * C_out`` (depthwise:
    ``... * C_in * multiplier``): each pairs every filter tap with every
    output position once.

    Args:
        op: a `tf.Operation` with static shapes.

    Returns:
        An int.
    """
    t = op.type
    if t in _CONV or t in _DEPTHWISE:
        kh, kw, cin, cout = _shape(op.inputs[1], op)
        return _positions(_shape(op.outputs[0], op), op) * kh * kw * cin * cout
    if t in _CONV_BACKPROP or t in _DEPTHWISE_BACKPROP:
        # Inputs: (input or input_sizes, filter or filter_sizes, grad_out).
        out = _shape(op.inputs[2], op)
        if t.endswith("Input"):
            kernel = _shape(op.inputs[1], op)
        else:
            kernel = _shape(op.outputs[0], op)
        kh, kw, cin, cout = kernel
        return _positions(out, op) * kh * kw * cin * cout
    if t in _MATMUL:
        a = _shape(op.inputs[0], op)
        m, n = _shape(op.outputs[0], op)
        k = a[0] if op.get_attr("transpose_a") else a[1]
        return m * k * n
    if t in _BATCH_MATMUL:
        a = _shape(op.inputs[0], op)
        out = _shape(op.outputs[0], op)
        k = a[-2] if op.get_attr("adj_x") else a[-1]
        total = k
        for size in out:
            total *= size
        return total
    if t == "Einsum":
        return _einsum_macs(op)
    return 0


def _function_graph(graphs, name):
    """The `FuncGraph` of the function ``name`` called from ``graphs``."""
    for graph in graphs:
        # Private, but the only way to reach a called function's graph
        # with its static shapes (a FunctionDef has none).
        fn = graph._get_function(name)  # pylint: disable=protected-access
        if fn is not None:
            return fn.graph
    raise ValueError(f"Expected the function {name!r} in the graph's "
                     "library. Received: not found")


def registry_flops(op):
    """TensorFlow's own FLOP estimate of a node not counted by `node_macs`.

    TF registers FLOP statistics for pooling and many element-wise ops
    (not for batch norm, ReLU or the depthwise backprops); used only for
    the ``other`` figure next to the main count.
    """
    from tensorflow.python.framework import ops as tf_ops

    if node_macs(op):
        return 0
    try:
        stats = tf_ops.get_stats_for_node_def(op.graph, op.node_def, "flops")
    except Exception:  # pylint: disable=broad-except
        # TF's statistic functions raise assorted errors on shapes they
        # cannot read; a secondary figure must not fail a long run.
        return 0
    return int(stats.value or 0)


def count_flops(graph, _outer=(), _node=None):
    """FLOPs of one execution of a graph, by op type (see module docs).

    Counts 2 FLOPs per multiply-add of convolutions, depthwise
    convolutions, matrix products and einsums, forward and backprop
    kernels alike, over the ops that run (`live_ops`), recursing into
    called functions; a ``While`` body
    counts ``maximum_iterations`` times (an upper bound, exact for
    fixed-count loops such as PGD's), a conditional its costlier branch.
    Element-wise ops, batch norm and pooling are not counted.

    Args:
        graph: a `tf.Graph`, e.g. ``concrete_function.graph``, with static
            shapes on the counted nodes.

    Returns:
        A `collections.Counter` mapping op type to FLOPs; ``sum(...values())``
        is the total.

    Raises:
        ValueError: a counted node has a dynamic shape, or a loop has no
            static ``maximum_iterations``.

    Example:

    >>> f = tf.function(lambda x: tf.nn.conv2d(x, tf.ones([3, 3, 3, 4]), 1,
    ...                                        "SAME"))
    >>> count_flops(f.get_concrete_function(
    ...     tf.TensorSpec([1, 8, 8, 3])).graph)["Conv2D"]  # 2*64*3*3*3*4
    13824
    """
    graphs = (graph,) + tuple(_outer)
    totals = collections.Counter()
    for op in live_ops(graph):
        flops = 2 * node_macs(op) if _node is None else _node(op)
        if flops:
            totals[op.type] += flops
        if op.type in _CALLS:
            totals.update(count_flops(
                _function_graph(graphs, op.get_attr("f").name), graphs,
                _node))
        elif op.type in _WHILES:
            # while_v2 loop variables: (counter, maximum_iterations, ...).
            trips = _static_int(op.inputs[1])
            if trips is None or trips < 0:
                raise ValueError(
                    f"Expected a loop with a static maximum_iterations to "
                    f"count FLOPs. Received: {op.type} node {op.name!r}")
            body = count_flops(
                _function_graph(graphs, op.get_attr("body").name), graphs,
                _node)
            totals.update({k: v * trips for k, v in body.items()})
        elif op.type in _IFS or op.type in _CASES:
            names = ([op.get_attr("then_branch").name,
                      op.get_attr("else_branch").name] if op.type in _IFS
                     else [f.name for f in op.get_attr("branches")])
            branches = [count_flops(_function_graph(graphs, n), graphs,
                                    _node) for n in names]
            totals.update(max(branches, key=lambda c: sum(c.values())))
    return totals


def live_ops(graph):
    """The ops of a function graph that run, in graph order.

    A gradient tape emits both backprop kernels of a convolution even when
    only one is used (e.g. the input gradient of an attack); the function
    runtime prunes what neither reaches an output nor has side effects, as
    TensorFlow's ``PruneFunctionBody`` does: seeds are the outputs, the
    control outputs, stateful ops (but not placeholders) and control flow,
    and everything they depend on is kept.

    Args:
        graph: a `tf.Graph`; a `FuncGraph`'s ``outputs`` and
            ``control_outputs`` are seeds.

    Returns:
        A list of `tf.Operation`.
    """
    ops = graph.get_operations()
    seeds = [t.op for t in getattr(graph, "outputs", [])]
    seeds += list(getattr(graph, "control_outputs", []))
    seeds += [op for op in ops if op.type not in ("Placeholder",) and (
        op.op_def.is_stateful or op.type in _WHILES + _IFS + _CASES)]
    if not getattr(graph, "outputs", None) and not seeds:
        return ops  # a plain graph with no declared outputs: keep all
    live, stack = set(), list(seeds)
    while stack:
        op = stack.pop()
        if op.name in live:
            continue
        live.add(op.name)
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    return [op for op in ops if op.name in live]


def count_other_flops(graph):
    """`count_flops` of the nodes it leaves out, by TF's registry
    (`registry_flops`): pooling and element-wise ops, a lower bound."""
    return count_flops(graph, _node=registry_flops)


def _static_int(tensor):
    """The constant value of a scalar tensor, following Identity nodes."""
    import tensorflow as tf

    value = tf.get_static_value(tensor)
    while value is None and tensor.op.type == "Identity":
        tensor = tensor.op.inputs[0]
        value = tf.get_static_value(tensor)
    return None if value is None else int(value)


# ---------------------------------------------------------------------------
# Machine peak and memory.


def matmul_peak(size=2048, reps=5, dtype="float32"):
    """Best GFLOP/s of a ``size x size`` matmul over ``reps`` timed calls.

    Runs in the calling process with its thread settings; one untimed call
    first (kernel selection, allocations). Each call is synchronised by
    reading one element of the result.

    Args:
        size: matrix side.
        reps: timed calls; the fastest counts.
        dtype: ``float32`` or ``bfloat16``.

    Returns:
        A float, 2 * size^3 / best seconds / 1e9.
    """
    import tensorflow as tf

    a = tf.random.uniform([size, size], dtype=tf.float32, seed=1)
    b = tf.random.uniform([size, size], dtype=tf.float32, seed=2)
    a, b = tf.cast(a, dtype), tf.cast(b, dtype)
    fn = tf.function(tf.linalg.matmul, autograph=False)
    fn(a, b)[0, 0].numpy()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn(a, b)[0, 0].numpy()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best / 1e9


def peak_rss_gib():
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def tf_allocator_peak_gib():
    """Peak of TensorFlow's CPU allocator (GiB), or None if not tracked.

    One process-wide allocator serves every logical CPU device (measured:
    a tensor placed on ``CPU:1`` shows in ``CPU:0``'s figures and vice
    versa), so ``CPU:0``'s figure is the whole process's.
    """
    import tensorflow as tf

    try:
        info = tf.config.experimental.get_memory_info("CPU:0")
    except (ValueError, tf.errors.OpError):
        return None  # not tracked by this build's CPU allocator
    return info["peak"] / 2 ** 30


# ---------------------------------------------------------------------------
# Workloads.


def make_config(name, order=None):
    """The search config of size ``name`` (A, B, C); ``order`` overrides
    the config's order (B: second, else first)."""
    from e2rnas_tf import config_lib

    if name not in CONFIGS:
        raise ValueError(f"Expected --config in {list(CONFIGS)}. "
                         f"Received: {name!r}")
    c = config_lib.search_config()
    c.objectives = ["acc", "adv", "params"]
    c.attack.name = "fgsm"
    c.resource.params_constraint = "abs"
    c.resource.params_target = 2.0
    c.combine.method = "mgda"
    c.combine.normalization = "l2"
    c.model.layers, c.model.channels, c.batch_size, size = SIZES[name]
    c.arch.order = order or ("second" if name == "B" else "first")
    c.lock()
    return c, size


def make_train_config(name, genotype):
    """The retraining config of size ``name`` (A or C)."""
    from e2rnas_tf import config_lib

    c = config_lib.train_config()
    c.model.layers, c.model.channels, c.batch_size, size = SIZES[name]
    c.genotype = genotype
    c.model.drop_path = TRAIN_DROP_PATH
    c.lock()
    return c, size


def _runtime_fields(config, args):
    config.jit_compile = args.xla == "on"
    config.mixed_precision = args.precision
    if args.devices > 1:
        config.strategy.name = "mirrored"
        config.strategy.cpu_devices = args.devices


def _synthetic(strategy, batch, size, seed):
    """A fixed ``(images, labels)`` batch, distributed if replicated."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    images = rng.random((batch, size, size, 3), dtype=np.float32)
    labels = rng.integers(0, 10, batch).astype(np.int32)
    if strategy.num_replicas_in_sync == 1:
        return tf.constant(images), tf.constant(labels)
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)
    return next(iter(strategy.experimental_distribute_dataset(ds)))


def _search_workload(args, record):
    from e2rnas_tf import runtime
    from e2rnas_tf.search import step as step_lib
    from e2rnas_tf.space.costs import count_params
    from e2rnas_tf.space.search_space import SearchNetwork

    order = "second" if args.workload == "search2" else "first"
    config, size = make_config(args.config, order)
    with config.unlocked():
        _runtime_fields(config, args)
    _configure(config)
    strategy = runtime.make_strategy(config)
    m = config.model
    with strategy.scope():
        net = SearchNetwork(channels=m.channels, num_classes=10,
                            layers=m.layers, alpha_seed=0,
                            cell_impl=m.cell_impl)
        net.build((None, size, size, 3))
        step = step_lib.SearchStep(net, config, num_classes=10,
                                   image_size=size, steps_per_epoch=1000,
                                   strategy=strategy)
    train = _synthetic(strategy, config.batch_size, size, 0)
    valid = _synthetic(strategy, config.batch_size, size, 1)
    record.update(order=order, objectives=list(config.objectives),
                  weights=count_params(net.weight_variables))
    print(f"config {args.config}: {m.layers} cells C={m.channels} batch "
          f"{config.batch_size} {size}x{size}, {order} order, objectives "
          f"{list(config.objectives)}; {record['weights']:,} weights; "
          f"threads {args.threads or 'default'}", flush=True)

    def run():
        return float(step(train, valid)["train/loss"])

    def graph():
        return step.concrete_function(train, valid).graph

    return run, graph, dict(net=net, config=config, valid=valid,
                            strategy=strategy)


def _derived_model(config, size, auxiliary):
    from e2rnas_tf.space import genotypes as genotypes_lib
    from e2rnas_tf.space import model as model_lib

    model = model_lib.DerivedNetwork(
        genotypes_lib.get(config.genotype), channels=config.model.channels,
        num_classes=10, layers=config.model.layers, auxiliary=auxiliary,
        drop_path=TRAIN_DROP_PATH if auxiliary else 0.0)
    model.build((None, size, size, 3))
    return model


def _train_workload(args, record):
    import tensorflow as tf

    from e2rnas_tf import optim, runtime
    from e2rnas_tf.space import costs
    from e2rnas_tf.training import train as train_lib

    config, size = make_train_config(args.config, args.genotype)
    with config.unlocked():
        _runtime_fields(config, args)
    _configure(config)
    strategy = runtime.make_strategy(config)
    with strategy.scope():
        model = _derived_model(config, size, auxiliary=True)
        sgd = optim.MomentumSGD(model.trainable_variables,
                                config.optim.momentum,
                                config.optim.weight_decay)
        loss_scale = optim.DynamicLossScale(
            config.mixed_precision == "mixed_float16")
    step_fn = train_lib.make_train_step(model, sgd, loss_scale, strategy,
                                        config)
    lr = tf.constant(config.optim.lr, tf.float32)
    images, labels = _synthetic(strategy, config.batch_size, size, 0)
    counter = tf.constant(0, tf.int64)
    record.update(genotype=args.genotype, auxiliary=True,
                  drop_path=TRAIN_DROP_PATH,
                  weights=costs.count_params(model.trainable_variables))
    print(f"train {args.config}: {args.genotype} {config.model.layers} "
          f"cells C={config.model.channels} batch {config.batch_size} "
          f"{size}x{size}, auxiliary head, drop-path {TRAIN_DROP_PATH}; "
          f"{record['weights']:,} weights; threads "
          f"{args.threads or 'default'}", flush=True)

    def run():
        return float(step_fn(images, labels, counter, lr)["loss"])

    def graph():
        return step_fn.get_concrete_function(images, labels, counter,
                                             lr).graph

    return run, graph, {}


def _pgd_workload(args, record):
    import tensorflow as tf

    from e2rnas_tf import config_lib, runtime
    from e2rnas_tf.search import objectives as obj_lib
    from e2rnas_tf.space import costs

    config, size = make_train_config(args.config, args.genotype)
    with config.unlocked():
        _runtime_fields(config, args)
    _configure(config)
    strategy = runtime.make_strategy(config)
    with strategy.scope():
        model = _derived_model(config, size, auxiliary=False)
    attack_cfg = config_lib.attack_config(name="pgd", eps=PGD_EPS,
                                          steps=PGD_STEPS, random_start=True)

    def model_fn(x):
        return model(x, training=False)

    def replica_fn(x, y, seed):
        adv = obj_lib.attack(model_fn, x, y, attack_cfg, seed)
        hits = tf.equal(tf.argmax(model_fn(adv), -1, output_type=tf.int32), y)
        return tf.reduce_sum(tf.cast(hits, tf.float32))

    # As the project's steps: with several replicas XLA compiles each
    # replica's attack, the reduction stays outside.
    scope = runtime.jit_scope(config.jit_compile,
                              strategy.num_replicas_in_sync)
    if scope == "replica":
        replica_fn = runtime.per_replica_xla(replica_fn)

    def step_fn(x, y, seed):
        out = strategy.run(replica_fn, args=(x, y, seed))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, out, axis=None)

    compiled = tf.function(step_fn, autograph=False,
                           jit_compile=scope == "step")
    images, labels = _synthetic(strategy, config.batch_size, size, 0)
    seed = tf.constant([0, 1], tf.int32)
    record.update(genotype=args.genotype, attack=f"pgd-{PGD_STEPS} eps "
                  f"{PGD_EPS:g}/255 random start, inference mode",
                  weights=costs.count_params(model))
    if args.precision != "float32":
        record["note"] = ("bf16 model under attack; e2rnas evaluate attacks "
                          "a float32 copy")
    print(f"pgd {args.config}: {args.genotype} {config.model.layers} cells "
          f"C={config.model.channels} batch {config.batch_size} "
          f"{size}x{size}, PGD-{PGD_STEPS} eps {PGD_EPS:g}/255 + predict; "
          f"{record['weights']:,} weights; threads "
          f"{args.threads or 'default'}", flush=True)

    def run():
        return float(compiled(images, labels, seed))

    def graph():
        return compiled.get_concrete_function(images, labels, seed).graph

    return run, graph, {}


WORKLOAD_FNS = {"search1": _search_workload, "search2": _search_workload,
                "train": _train_workload, "pgd": _pgd_workload}


# ---------------------------------------------------------------------------
# Running.


def _profile(args, parts):
    """Times the search step's parts as separate compiled functions."""
    import tensorflow as tf

    from e2rnas_tf.search import objectives as obj_lib

    net, config, valid = parts["net"], parts["config"], parts["valid"]
    if parts["strategy"].num_replicas_in_sync > 1:
        print("--profile: skipped with several devices", flush=True)
        return
    alpha = [a.value for a in net.arch_variables]
    w_vars = [v.value for v in net.weight_variables]

    def forward(x, y):
        return obj_lib.cross_entropy(net(x, training=True), y)

    def backward(sources):
        def fn(x, y):
            with tf.GradientTape() as tape:
                loss = forward(x, y)
            return tape.gradient(loss, sources)
        return fn

    def attack(x, y):
        return obj_lib.attack(lambda z: net(z, training=True), x, y,
                              config.attack, tf.constant([0, 0]))

    fns = {"forward": forward, "forward+backward(alpha)": backward(alpha),
           "forward+backward(w)": backward(w_vars),
           "forward+backward(alpha+w)": backward(alpha + w_vars),
           "fgsm attack": attack}
    for name, fn in fns.items():
        compiled = tf.function(fn, autograph=False)
        t0 = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), compiled(*valid))
        trace = time.perf_counter() - t0
        ts = []
        for _ in range(max(3, args.steps // 2)):
            t0 = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy(), compiled(*valid))
            ts.append(time.perf_counter() - t0)
        print(f"  {name:<28} {statistics.median(ts):.3f} s "
              f"(first call {trace:.1f} s)", flush=True)


def _base_record(args, argv):
    layers, channels, batch, size = SIZES[args.config]
    return dict(
        workload=args.workload, config=args.config, xla=args.xla,
        precision=args.precision, devices=args.devices, layers=layers,
        channels=channels, batch=batch, image_size=size, steps=args.steps,
        warmup=args.warmup, threads=args.threads, status="failed",
        reason="", command="python tools/benchmark.py " + " ".join(argv),
        started=datetime.datetime.now().isoformat(timespec="seconds"),
        host=platform.node(), cpus=os.cpu_count(),
        load_start=round(os.getloadavg()[0], 2))


def measure(args, record):
    """Runs the workload of ``args``; fills ``record`` (see module docs)."""
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    record["tf_version"] = tf.__version__
    start = time.perf_counter()
    try:
        run, graph_fn, parts = WORKLOAD_FNS[args.workload](args, record)
    except ValueError as error:
        # The project refuses this setting (its ValueError convention).
        record["status"] = "refused"
        record["reason"] = _one_line(error)
        return record
    record["setup_s"] = time.perf_counter() - start
    print(f"set-up: {record['setup_s']:.1f} s", flush=True)
    start = time.perf_counter()
    run()
    record["first_step_s"] = time.perf_counter() - start
    print(f"time to first step: {record['first_step_s']:.1f} s (trace + "
          f"compile + step)", flush=True)
    for _ in range(args.warmup):
        run()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    med = statistics.median(times)
    record.update(step_s=med, step_s_min=min(times), step_s_max=max(times),
                  images_per_s=record["batch"] / med,
                  peak_rss_gib=peak_rss_gib())
    record["tf_peak_gib"] = tf_allocator_peak_gib()
    print(f"s/step: median {med:.3f} (min {min(times):.3f}, max "
          f"{max(times):.3f}, n={len(times)}); images/s "
          f"{record['images_per_s']:.2f}; peak RSS "
          f"{record['peak_rss_gib']:.2f} GiB", flush=True)
    if record["tf_peak_gib"] is not None:
        print(f"TF CPU memory info: peak {record['tf_peak_gib']:.3f} GiB",
              flush=True)

    graph = graph_fn()
    record["graph_ops"] = len(graph.get_operations())
    by_type = count_flops(graph)
    flops = int(sum(by_type.values()))
    other = count_other_flops(graph)
    record.update(flops_per_step=flops, flops_by_type=dict(by_type),
                  gflops_per_s=flops / med / 1e9,
                  flops_other_registered=int(sum(other.values())))
    record["matmul_peak_gflops"] = matmul_peak(args.matmul_size,
                                               args.matmul_reps)
    record["peak_fraction"] = (record["gflops_per_s"]
                               / record["matmul_peak_gflops"])
    record["matmul"] = (f"{args.matmul_size}^2 float32, best of "
                        f"{args.matmul_reps}")
    print(f"FLOPs/step {flops / 1e9:.2f} G (conv/matmul fwd+bwd; other "
          f"ops TF's registry knows: "
          f"{record['flops_other_registered'] / 1e9:.2f} G; "
          f"{record['graph_ops']:,} graph ops); achieved "
          f"{record['gflops_per_s']:.2f} GFLOP/s = "
          f"{100 * record['peak_fraction']:.1f} % of the float32 matmul peak "
          f"{record['matmul_peak_gflops']:.1f} GFLOP/s "
          f"({record['matmul']})", flush=True)
    if args.precision == "mixed_bfloat16":
        record["matmul_peak_bf16_gflops"] = matmul_peak(
            args.matmul_size, args.matmul_reps, "bfloat16")
        print(f"bfloat16 matmul peak "
              f"{record['matmul_peak_bf16_gflops']:.1f} GFLOP/s", flush=True)
    record["status"] = "ok"
    if args.profile:
        _profile(args, parts)
    return record


def _one_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def append_json(path, record):
    """Appends ``record`` as one JSON line to ``path`` (parents created)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as error:
        parser.error(str(error))
    record = _base_record(args, argv)
    try:
        measure(args, record)
    except Exception as error:  # reported, then re-raised for the trace
        record["status"] = "failed"
        record["reason"] = f"{type(error).__name__}: {_one_line(error)}"
        raise
    finally:
        _PROCESS.close()
        record["load_end"] = round(os.getloadavg()[0], 2)
        if args.json:
            append_json(args.json, record)
    if record["status"] == "refused":
        print(f"refused: {record['reason']}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
