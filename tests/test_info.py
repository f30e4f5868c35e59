"""`e2rnas info`: where each resource objective starts and which way it
pushes, for the authors' presets and for a target below uniform."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from e2rnas_tf import config_lib
from e2rnas_tf.search import info
from tests.conftest import REPO

SCALE = dict(num_classes=10, image_size=16)
UNIFORM = np.zeros((14, 8), np.float32)


def _preset(name, variant):
    spec = importlib.util.spec_from_file_location(
        name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def test_published_preset_starts_below_its_target():
    config = _preset("search_e2rnas_published", "cpu")
    reports = {r.kind: r for r in info.resource_reports(
        config, SCALE, UNIFORM, UNIFORM)}
    params = reports["params"]
    # The authors' numbers: 2.358 at uniform alpha (8 cells, C=16), 6.863
    # with every edge sep_conv_5x5, target abs 4.
    assert params.uniform == pytest.approx(2.358, abs=5e-4)
    assert params.costliest == pytest.approx(6.863, abs=5e-4)
    assert params.target == 4.0 and params.constraint == "abs"
    assert params.push == "toward parameterised ops"
    assert not params.below_uniform
    assert reports["flops"].push == "toward costlier ops"
    lines = info.format_report(params, config.resource)
    assert "x1e5" in lines[0] and "8 cells, C=16" in lines[0]
    assert not any("warning" in line for line in lines)


def test_v1_preset_lower_bound_is_inactive_at_uniform():
    config = _preset("search_e2rnas_v1", "cpu")
    (params,) = info.resource_reports(config, SCALE, UNIFORM, UNIFORM)
    assert params.uniform == pytest.approx(1831168.0)
    assert params.slope == 0.0 and params.push.startswith("nowhere")
    assert not params.below_uniform
    assert "1,831,168" in info.format_report(params, config.resource)[1]


def test_a_target_below_uniform_is_warned():
    config = config_lib.search_config()
    config.resource.update(layers=5, channels=8, params_target=0.05,
                           params_constraint="abs")
    (params,) = info.resource_reports(config, SCALE, UNIFORM, UNIFORM)
    assert params.target < params.uniform
    assert params.push == "toward parameter-free ops"
    assert params.below_uniform
    assert params.cheapest < params.uniform < params.costliest
    lines = info.format_report(params, config.resource)
    assert lines[-1].startswith("  warning: the target lies below")
    # The derived estimate starts at the derived genotype's size instead.
    config.resource.estimate = "derived"
    (derived,) = info.resource_reports(config, SCALE, UNIFORM, UNIFORM)
    assert derived.uniform < params.uniform


def test_info_command_prints_the_resource_lines(subprocess_env):
    result = subprocess.run(
        [sys.executable, "-m", "e2rnas_tf", "info",
         "--config=configs/search_e2rnas_published.py:cpu"],
        cwd=str(REPO), env=subprocess_env, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "params: authors cost model at 8 cells, C=16" in out
    assert "uniform 2.358" in out and "costliest 6.863" in out
    assert "abs target 4.000: pushes toward parameterised ops" in out
