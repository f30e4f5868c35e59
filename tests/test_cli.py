"""Smoke tests of the ``e2rnas`` command line, run as a user would
(``python -m e2rnas_tf ...`` in a subprocess, from the checkout)."""

import pathlib
import re
import subprocess
import sys

import pytest

from e2rnas_tf.ops import PRIMITIVES
from layer_test_util import search_network_counts

REPO = pathlib.Path(__file__).resolve().parents[1]

# What TensorFlow's native runtime prints on import whatever the log level
# (it logs before absl logging is initialised).
_TF_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog"
    r"|[IWEF]\d{4} [\d:. ]+\d+ \S+:\d+\])")


def run(subprocess_env, *args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "e2rnas_tf", *args], cwd=REPO,
        env=subprocess_env, capture_output=True, text=True, timeout=timeout)


def user_stderr(result):
    """stderr lines that are not TF's start-up chatter."""
    return [line for line in result.stderr.splitlines()
            if line.strip() and not _TF_NOISE.match(line)]


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = user_stderr(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith("e2rnas ")
    assert ": error: " in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def parse_int(text, label):
    match = re.search(rf"^{label}\s+([\d,]+) parameters", text, re.M)
    assert match, text
    return int(match.group(1).replace(",", ""))


@pytest.mark.parametrize("overrides,layers", [((), 5),
                                               (("--config.model.layers=3",),
                                                3)])
def test_info(subprocess_env, overrides, layers):
    result = run(subprocess_env, "info", "--config=configs/search_demo.py",
                 *overrides)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = result.stdout
    assert re.search(r"^dataset\s+embedded: \d+ train / \d+ test, 10 classes,"
                     r" 16x16x3$", out, re.M), out
    assert re.search(rf"^supernet\s+{layers} cells, C=8, 4 nodes, 8 ops$",
                     out, re.M), out
    cells = re.findall(r"^  cell_(\d+)\s+(normal|reduce)\s+C=(\d+)", out,
                       re.M)
    reductions = {layers // 3, 2 * layers // 3}
    assert [(int(i), kind) for i, kind, _ in cells] == [
        (i, "reduce" if i in reductions else "normal") for i in range(layers)]
    weights, _, arch = search_network_counts(8, layers, 10, PRIMITIVES)
    assert parse_int(out, "weights") == weights
    assert parse_int(out, "architecture") == arch == 224
    if layers == 5:
        assert weights == 394210  # pinned: search_demo.py's supernet


def test_unknown_command(subprocess_env):
    assert_one_line_error(run(subprocess_env, "serach"),
                          "unknown command 'serach'", "'search'")


def test_no_command_prints_usage(subprocess_env):
    result = run(subprocess_env)
    assert result.returncode == 2
    assert "usage: e2rnas <command>" in result.stdout
    assert run(subprocess_env, "help").returncode == 0


def test_unknown_config_field(subprocess_env):
    result = run(subprocess_env, "info", "--config=configs/search_demo.py",
                 "--config.nope=1")
    assert result.returncode != 0
    assert_one_line_error(result, "unknown config field 'nope'",
                          "--config.nope")
    result = run(subprocess_env, "info", "--config=configs/search_demo.py",
                 "--config.modle.layers=3")
    assert_one_line_error(result, "'modle'", 'Did you mean "model"')


def test_missing_config_file(subprocess_env):
    result = run(subprocess_env, "info", "--config=configs/no_such.py")
    assert result.returncode != 0
    assert_one_line_error(result, "cannot load the --config file",
                          "No such file or directory", "configs/no_such.py")


def test_unknown_flag(subprocess_env):
    assert_one_line_error(run(subprocess_env, "info", "--wrokdir=x"),
                          "Unknown command line flag 'wrokdir'")


def test_config_file_that_raises(subprocess_env, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config():\n    raise ValueError('bad field x')\n")
    assert_one_line_error(run(subprocess_env, "info", f"--config={bad}"),
                          "ValueError: bad field x")
