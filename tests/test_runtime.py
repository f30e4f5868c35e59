"""runtime.configured: a run's process-wide settings follow its config
inside the block and are restored after it."""

import random

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

from e2rnas_tf import config_lib, runtime


def _config(**fields):
    c = config_lib.search_config()
    c.update(fields)
    return c


def test_op_determinism_follows_the_config_and_is_restored():
    assert not tf_config.is_op_determinism_enabled()
    with runtime.configured(_config(deterministic=True)):
        assert tf_config.is_op_determinism_enabled()
        # A nested run that does not ask for it (a pipeline's next stage).
        with runtime.configured(_config(deterministic=False)):
            assert not tf_config.is_op_determinism_enabled()
        assert tf_config.is_op_determinism_enabled()
    assert not tf_config.is_op_determinism_enabled()


def test_policy_and_seeds_are_restored():
    keras.mixed_precision.set_global_policy("float32")
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    with runtime.configured(_config(mixed_precision="mixed_bfloat16",
                                    seed=7)):
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        inside = np.random.rand()
        np.random.seed(7)
        assert inside == np.random.rand()  # seeded from the config
    assert keras.mixed_precision.global_policy().name == "float32"
    # The caller's random streams continue as if the run never happened.
    assert (random.random(), np.random.rand()) == expected
    with runtime.precision_policy("mixed_float16"):
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
    assert keras.mixed_precision.global_policy().name == "float32"
    assert tf.config.optimizer.get_experimental_options().get(
        "disable_meta_optimizer") in (None, False)


def test_determinism_with_xla_is_refused():
    with pytest.raises(ValueError, match="deterministic and config.jit"):
        with runtime.configured(_config(deterministic=True,
                                        jit_compile=True)):
            pass
