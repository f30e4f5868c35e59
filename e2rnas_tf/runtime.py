"""TensorFlow set-up from a config: precision, graph optimisation,
determinism, seeds (`configured`, restored afterwards), the distribution
strategy, XLA scopes and a multi-worker process's role.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile

import keras
import numpy as np
import tensorflow as tf

# TF has no public switch back from op determinism.
from tensorflow.python.framework import config as _tf_config

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("default", "mirrored", "multi_worker")


def split_cpu(count):
    """Splits the host CPU into ``count`` logical devices.

    A way to run (and test) `tf.distribute.MirroredStrategy` without GPUs:
    ``/cpu:0`` ... ``/cpu:{count-1}`` then act as replicas. It must run
    before TensorFlow initialises its devices (before the first tensor is
    made); afterwards it succeeds only if the split is already in place.

    Args:
        count: number of logical CPU devices, >= 1 (1 leaves the CPU as is).

    Example:

    >>> split_cpu(2)  # doctest: +SKIP
    >>> len(tf.config.list_logical_devices("CPU"))  # doctest: +SKIP
    2
    """
    count = int(count)
    if count < 1:
        raise ValueError(
            f"Expected a CPU device count >= 1. Received: count={count}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == count:
        return
    if current is None and count == 1:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as error:
        # Devices were initialised earlier in this process (some tensor was
        # made): the split can no longer change.
        raise ValueError(
            f"Cannot split the CPU into {count} logical devices: TensorFlow "
            "already initialised its devices in this process; set "
            "config.strategy.cpu_devices in a fresh process") from error


@contextlib.contextmanager
def configured(config):
    """Applies the runtime fields of ``config`` for the duration of a run.

    Sets the Keras precision policy, Grappler's meta-optimiser switch, op
    determinism and every random seed (Python, NumPy, TensorFlow, Keras)
    from ``config``, and restores all of them on exit, so a run leaves the
    process as it found it (a notebook, a test, the next stage of a
    pipeline). Splitting the CPU into logical devices
    (``strategy.cpu_devices``) cannot be undone: TensorFlow fixes its
    devices once per process.

    Args:
        config: a config from `e2rnas_tf.config_lib` (fields
            ``mixed_precision``, ``graph_optimization``, ``deterministic``,
            ``jit_compile``, ``seed``, ``strategy.cpu_devices``).

    Example:

    >>> with configured(config):
    ...     strategy = make_strategy(config)
    ...     ...  # the run
    """
    # First: every call below may initialise TensorFlow's devices.
    cpu_devices = int(config.strategy.get("cpu_devices", 0))
    if cpu_devices:
        split_cpu(cpu_devices)
    if config.mixed_precision not in PRECISIONS:
        raise ValueError(
            f"Expected config.mixed_precision in {list(PRECISIONS)}. "
            f"Received: {config.mixed_precision!r}")
    if config.deterministic and config.jit_compile:
        raise ValueError(
            "Expected at most one of config.deterministic and "
            "config.jit_compile: XLA has no deterministic max-pool gradient. "
            "Received: both True")
    saved = _process_state()
    try:
        keras.mixed_precision.set_global_policy(config.mixed_precision)
        # Grappler's meta optimiser takes seconds per large function on 2
        # cores and bought no step time on the CPU in our measurements
        # (BENCHMARKS.md).
        tf.config.optimizer.set_experimental_options(
            {"disable_meta_optimizer": not config.graph_optimization})
        keras.utils.set_random_seed(int(config.seed))
        _set_op_determinism(bool(config.deterministic))
        yield
    finally:
        _restore_process_state(saved)


@contextlib.contextmanager
def precision_policy(name):
    """The Keras global precision policy ``name`` inside the block, the
    previous one restored after it."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _set_op_determinism(enabled):
    if enabled:
        tf.config.experimental.enable_op_determinism()
    elif _tf_config.is_op_determinism_enabled():
        _tf_config.disable_op_determinism()


def _process_state():
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator
    from keras.src.utils import rng_utils
    from tensorflow.python.eager import context

    return {
        "policy": keras.mixed_precision.global_policy(),
        "optimizer": tf.config.optimizer.get_experimental_options(),
        "determinism": _tf_config.is_op_determinism_enabled(),
        "python_random": random.getstate(),
        "numpy_random": np.random.get_state(),
        "tf_seed": context.global_seed(),
        "keras_seed": global_state.get_global_attribute(
            rng_utils.GLOBAL_RANDOM_SEED),
        "keras_generator": global_state.get_global_attribute(
            seed_generator.GLOBAL_SEED_GENERATOR),
    }


def _restore_process_state(saved):
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator
    from keras.src.utils import rng_utils
    from tensorflow.python.eager import context

    keras.mixed_precision.set_global_policy(saved["policy"])
    tf.config.optimizer.set_experimental_options(saved["optimizer"])
    _set_op_determinism(saved["determinism"])
    random.setstate(saved["python_random"])
    np.random.set_state(saved["numpy_random"])
    context.set_global_seed(saved["tf_seed"])
    global_state.set_global_attribute(rng_utils.GLOBAL_RANDOM_SEED,
                                      saved["keras_seed"])
    global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR,
                                      saved["keras_generator"])


def mirrored_devices(config):
    """The devices a ``mirrored`` strategy replicates over.

    ``config.strategy.devices`` if given; else every GPU; else, with the
    CPU split into logical devices (``config.strategy.cpu_devices``), every
    logical CPU; else None (TensorFlow's choice: the CPU alone).
    """
    devices = list(config.strategy.devices)
    if devices:
        return devices
    if tf.config.list_logical_devices("GPU"):
        return None
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    return cpus if len(cpus) > 1 else None


def make_strategy(config):
    """The `tf.distribute.Strategy` named by ``config.strategy``.

    ``default``: no distribution. ``mirrored``: synchronous replicas on the
    local devices of `mirrored_devices`. ``multi_worker``:
    `tf.distribute.MultiWorkerMirroredStrategy`, the cluster read from the
    ``TF_CONFIG`` environment variable (each worker replicates over its
    GPUs, or its CPU). Call it right after `configure`, before any other
    TensorFlow op: the multi-worker strategy configures collective ops,
    which TensorFlow allows only at program start.

    ``config.jit_compile`` works with every strategy: see `jit_scope` for
    what XLA compiles when there are several replicas.
    """
    name = config.strategy.name
    if name not in STRATEGIES:
        raise ValueError(
            f"Expected config.strategy.name in {list(STRATEGIES)}. "
            f"Received: {name!r}")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices=mirrored_devices(config))
    return tf.distribute.MultiWorkerMirroredStrategy()


JIT_SCOPES = ("none", "step", "replica")


def jit_scope(jit_compile, num_replicas):
    """What XLA compiles in a step: ``none``, ``step`` or ``replica``.

    ``step`` (one replica): the whole step, updates included, one XLA
    program. ``replica`` (several replicas, local or across workers): an
    XLA program runs on one device and XLA:CPU has no collectives, so only
    each replica's own computation is compiled (its forward and backward
    passes and attacks, once per device); the all-reduces between the
    replicas, the MGDA solve and the variable updates run as TensorFlow ops
    around those programs. Both give the results of the uncompiled step to
    float32 rounding (tests/test_xla_precision.py, test_distributed.py).

    Args:
        jit_compile: ``config.jit_compile``.
        num_replicas: ``strategy.num_replicas_in_sync``.

    Returns:
        One of `JIT_SCOPES`.
    """
    if not jit_compile:
        return "none"
    return "step" if int(num_replicas) == 1 else "replica"


def per_replica_xla(fn):
    """``fn`` as an XLA program on the device of the replica calling it.

    For the ``replica`` `jit_scope`: ``tf.function(fn, jit_compile=True)``
    is traced and compiled once per device. It is returned inside a plain
    function because `tf.distribute.Strategy.run`, handed a `tf.function`
    itself, wraps it around every replica: XLA would then get one program
    reading every device's variables, and fail.

    Args:
        fn: a function of tensors, run in a replica context.

    Returns:
        A plain function with ``fn``'s signature.
    """
    compiled = tf.function(fn, autograph=False, jit_compile=True)

    def call(*args, **kwargs):
        return compiled(*args, **kwargs)

    return call


def task(config=None):
    """``(task_type, task_id, is_chief)`` of this process in its cluster.

    Read from the ``TF_CONFIG`` environment variable under the
    ``multi_worker`` strategy (as `tf.distribute.MultiWorkerMirroredStrategy`
    decides: the ``chief`` task if the cluster has one, else worker 0);
    ``("worker", 0, True)`` otherwise.

    Args:
        config: a config with ``strategy.name``; None reads ``TF_CONFIG``
            whatever the strategy.

    Example:

    >>> os.environ["TF_CONFIG"] = json.dumps({
    ...     "cluster": {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]},
    ...     "task": {"type": "worker", "index": 1}})
    >>> task()
    ('worker', 1, False)
    """
    if config is not None and config.strategy.name != "multi_worker":
        return "worker", 0, True
    text = os.environ.get("TF_CONFIG", "")
    if not text:
        return "worker", 0, True
    try:
        tf_config = json.loads(text)
    except ValueError as error:
        raise ValueError(
            f"Expected TF_CONFIG to hold JSON. Received: {text!r}") from error
    cluster = tf_config.get("cluster", {})
    info = tf_config.get("task", {})
    task_type = info.get("type", "worker")
    task_id = int(info.get("index", 0))
    if "chief" in cluster:
        chief = task_type == "chief"
    else:
        chief = task_type == "worker" and task_id == 0
    return task_type, task_id, chief


def output_dir(config, workdir):
    """Where this process writes a run's outputs.

    Every worker of a multi-worker run executes the same program, but only
    the chief's outputs are the run's: the chief writes to ``workdir``,
    any other task to a fresh temporary directory of its own (checkpoint
    saving is collective, so every worker still saves, as TensorFlow's
    multi-worker guide does). The caller may delete it when done
    (`is_temporary`).

    Args:
        config: a config with ``strategy.name``.
        workdir: the run's directory.

    Returns:
        A directory path.
    """
    task_type, task_id, chief = task(config)
    if chief:
        return workdir
    return tempfile.mkdtemp(prefix=f"e2rnas-{task_type}{task_id}-")


def is_temporary(config, path, workdir):
    """Whether ``path`` is a non-chief scratch directory of `output_dir`."""
    return not task(config)[2] and os.path.abspath(path) != \
        os.path.abspath(workdir)
