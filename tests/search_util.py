"""The tiny search every search test starts from.

3 cells of 2 nodes, 4 channels, 4 candidate ops, 8x8 images, batch 8, the
resource counted at 5 cells, C=8: as config (`tiny_config`), as command-line
flags (`tiny_flags`), and as one supernet with its compiled step
(`make_step`), with seeded batches.
"""

import keras
import numpy as np
import tensorflow as tf

from e2rnas_tf import config_lib
from e2rnas_tf.search import step as step_lib
from e2rnas_tf.space.search_space import SearchNetwork
from tests.config_util import set_fields

PRIMITIVES = ["none", "max_pool_3x3", "skip_connect", "sep_conv_3x3"]


def tiny_flags(**overrides):
    """The tiny search as ``--config.*`` flags, with dotted ``overrides``
    (``tiny_flags(epochs=2, **{"data.num_train": 96})``) added or
    replacing the defaults."""
    fields = {"model.layers": 3, "model.channels": 4, "model.steps": 2,
              "model.multiplier": 2,
              "model.primitives": tuple(PRIMITIVES),
              "data.image_size": 8, "batch_size": 8,
              "data.num_train": 200, "data.num_test": 40,
              "eval_batch_size": 16, "resource.layers": 5,
              "resource.channels": 8}
    fields.update(overrides)
    return [f"--config.{k}={v!r}" if isinstance(v, (tuple, list))
            else f"--config.{k}={v}" for k, v in fields.items()]


def tiny_config(**overrides):
    c = config_lib.search_config()
    c.model.layers = 3
    c.model.channels = 4
    c.model.steps = 2
    c.model.multiplier = 2
    c.model.primitives = list(PRIMITIVES)
    c.data.image_size = 8
    c.data.num_train = 200
    c.data.num_test = 40
    c.batch_size = 8
    c.eval_batch_size = 16
    c.epochs = 2
    c.resource.layers = 5
    c.resource.channels = 8
    c.resource.params_constraint = "none"
    c.objectives = ["acc"]
    c.log_every = 1000
    set_fields(c, overrides)
    c.lock()
    return c


def make_step(config, seed=0):
    keras.utils.set_random_seed(seed)
    net = SearchNetwork(channels=4, num_classes=10, layers=3, steps=2,
                        multiplier=2, primitives=PRIMITIVES, alpha_seed=seed)
    net.build((None, 8, 8, 3))
    # A visible alpha, so the softmax is not uniform and every op counts.
    rng = np.random.default_rng(seed + 7)
    for a in net.arch_variables:
        a.assign(rng.normal(0.0, 0.5, a.shape).astype(np.float32))
    step = step_lib.SearchStep(net, config, num_classes=10, image_size=8,
                               steps_per_epoch=10)
    return net, step


def batch(seed):
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.random((8, 8, 8, 3)), tf.float32),
            tf.constant(rng.integers(0, 10, 8), tf.int32))


def values(variables):
    return [np.array(v.numpy()) for v in variables]
