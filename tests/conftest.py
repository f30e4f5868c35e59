"""Shared pytest fixtures."""

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def subprocess_env():
    """Environment for running the package in a subprocess: small thread
    pools (other jobs share the machine), quiet TF logs, and the checkout
    first on the import path."""
    env = dict(os.environ)
    env.update(
        TF_NUM_INTEROP_THREADS="1",
        TF_NUM_INTRAOP_THREADS="2",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=os.pathsep.join(
            p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
    )
    return env


@pytest.fixture
def eager():
    """Runs tf.functions eagerly for the test (tracing a tiny step costs
    more than running it a few times)."""
    import tensorflow as tf

    tf.config.run_functions_eagerly(True)
    yield
    tf.config.run_functions_eagerly(False)
