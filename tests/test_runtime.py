"""Process-wide settings follow the config exactly (runtime.configure)."""

import pytest
from tensorflow.python.framework import config as tf_config

from e2rnas_tf import config_lib
from e2rnas_tf import runtime


def _config(**fields):
    c = config_lib.search_config()
    c.update(fields)
    return c


def test_op_determinism_is_set_to_what_the_config_says():
    runtime.configure(_config(deterministic=True))
    assert tf_config.is_op_determinism_enabled()
    # A later run in the same process that does not ask for it.
    runtime.configure(_config(deterministic=False))
    assert not tf_config.is_op_determinism_enabled()


def test_determinism_with_xla_is_refused():
    with pytest.raises(ValueError, match="deterministic and config.jit"):
        runtime.configure(_config(deterministic=True, jit_compile=True))
