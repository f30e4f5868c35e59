"""Tiny search and training steps under a distribution strategy.

Shared by the distribution tests (tests/test_distributed.py) and the XLA
and precision tests (tests/test_xla_precision.py): tiny configs (3 cells of
2 nodes, 4 channels, 4 candidate ops, 8x8 images, global batch 8), seeded
batches, ghost batches (what the replicas compute, on one device), weight
snapshots, and a few steps of the search or training step.
"""

import os

import numpy as np

from tests.config_util import set_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRIMITIVES = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")
STEPS = 3
BATCH = 8


def _set(config, overrides):
    return set_fields(config, overrides)


def search_config(**overrides):
    from e2rnas_tf import config_lib

    c = config_lib.search_config()
    _set(c, {"model.layers": 3, "model.channels": 4, "model.steps": 2,
             "model.multiplier": 2, "model.primitives": PRIMITIVES,
             "data.image_size": 8, "batch_size": BATCH, "epochs": 2,
             "resource.layers": 5, "resource.channels": 8,
             "objectives": ("acc", "adv", "params"),
             # A deterministic attack: the random start of a replica's half
             # batch is not the matching half of a full-batch draw.
             "attack.random_start": False})
    _set(c, overrides)
    c.lock()
    return c


def train_config(**overrides):
    from e2rnas_tf import config_lib

    c = config_lib.train_config()
    _set(c, {"model.layers": 3, "model.channels": 4,
             "model.auxiliary": False, "model.drop_path": 0.0,
             "data.image_size": 8, "batch_size": BATCH, "epochs": 2})
    _set(c, overrides)
    c.lock()
    return c


def batches(seed, steps=STEPS):
    rng = np.random.default_rng(seed)
    return [(rng.random((BATCH, 8, 8, 3)).astype(np.float32),
             rng.integers(0, 10, BATCH).astype(np.int32))
            for _ in range(steps)]


def ghost(fn, groups):
    """``fn`` applied to ``groups`` equal slices of the batch, concatenated
    (what the replicas compute, on one device)."""
    import tensorflow as tf

    def call(images, *args, **kwargs):
        parts = [fn(x, *args, **kwargs) for x in tf.split(images, groups)]
        if isinstance(parts[0], tuple):
            return tuple(None if p[0] is None else tf.concat(list(p), 0)
                         for p in zip(*parts))
        return tf.concat(parts, 0)
    return call


def _local_path(variable):
    # Without the model's own (uniquified) name.
    return variable.path.split("/", 1)[-1]


def snapshot(model):
    return [(_local_path(v), v.numpy()) for v in model.weights]


def restore(values, model):
    assert len(values) == len(model.weights)
    for (path, value), v in zip(values, model.weights):
        assert path == _local_path(v), (path, v.path)
        v.assign(value)


def local_values(strategy, variable):
    return [v.numpy() for v in
            strategy.experimental_local_results(getattr(variable, "value",
                                                        variable))]


def run_search(strategy, config, ghost_groups, init_from=None, steps=STEPS):
    """Builds a supernet + SearchStep under ``strategy``; runs STEPS steps
    from the initial weights ``init_from`` (a `snapshot`) if given.

    Returns (network, its initial snapshot, per-step metric dicts,
    per-step alphas as [variable][replica] arrays)."""
    import tensorflow as tf

    from e2rnas_tf.search import step as search_step
    from e2rnas_tf.space.search_space import SearchNetwork

    with strategy.scope():
        net = SearchNetwork(cell_impl=config.model.cell_impl,
                            channels=4, num_classes=10, layers=3, steps=2,
                            multiplier=2, primitives=PRIMITIVES, alpha_seed=0)
        net.build((None, 8, 8, 3))
        step = search_step.SearchStep(net, config, num_classes=10,
                                      image_size=8, steps_per_epoch=10,
                                      strategy=strategy)
    if init_from is not None:
        restore(init_from, net)
    init = snapshot(net)
    if ghost_groups > 1:
        step._forward = ghost(step._forward, ghost_groups)
    metrics, alphas = [], []
    for train, valid in zip(batches(1, steps), batches(2, steps)):
        if strategy.num_replicas_in_sync > 1:
            ds = tf.data.Dataset.from_tensors((train, valid))
            train, valid = next(iter(
                strategy.experimental_distribute_dataset(ds)))
        out = step(train, valid)
        metrics.append({k: float(v) for k, v in out.items()})
        alphas.append([local_values(strategy, a)
                       for a in net.arch_variables])
    return net, init, metrics, alphas


def run_train(strategy, config, ghost_groups, init_from=None):
    """A DerivedNetwork trained for STEPS steps by train.make_train_step;
    returns (model, its initial snapshot, per-step metric dicts)."""
    import tensorflow as tf

    from e2rnas_tf import optim
    from e2rnas_tf.space import model as model_lib
    from e2rnas_tf.training import train as train_lib

    with strategy.scope():
        model = model_lib.DerivedNetwork(
            "DARTS_V2", channels=4, num_classes=10, layers=3,
            name="derived_network")
        model.build((None, 8, 8, 3))
        sgd = optim.MomentumSGD(model.trainable_variables,
                                config.optim.momentum,
                                config.optim.weight_decay)
        loss_scale = optim.DynamicLossScale(False)
    if init_from is not None:
        restore(init_from, model)
    init = snapshot(model)
    target = model
    if ghost_groups > 1:
        class Ghost:
            """The model, with call_with_aux on ghost batches."""
            call_with_aux = staticmethod(ghost(model.call_with_aux,
                                               ghost_groups))

            def __getattr__(self, name):
                return getattr(model, name)
        target = Ghost()
    step_fn = train_lib.make_train_step(target, sgd, loss_scale, strategy,
                                        config)
    metrics = []
    for i, (images, labels) in enumerate(batches(3)):
        if strategy.num_replicas_in_sync > 1:
            ds = tf.data.Dataset.from_tensors((images, labels))
            images, labels = next(iter(
                strategy.experimental_distribute_dataset(ds)))
        out = step_fn(images, labels, tf.constant(i, tf.int64),
                      tf.constant(config.optim.lr, tf.float32))
        metrics.append({k: float(v) for k, v in out.items()})
    return model, init, metrics
