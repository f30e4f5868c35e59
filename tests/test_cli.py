"""Smoke tests of the ``e2rnas`` command line, run as a user would
(``python -m e2rnas_tf ...`` in a subprocess, from the checkout)."""

import os
import pathlib
import re
import socket
import subprocess
import sys
import zipfile

import pytest
from layer_test_util import search_network_counts

from e2rnas_tf import tf_startup
from e2rnas_tf import usage
from e2rnas_tf.space.ops import PRIMITIVES

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(subprocess_env, *args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "e2rnas_tf", *args], cwd=REPO,
        env=subprocess_env, capture_output=True, text=True, timeout=timeout)


def user_stderr(result):
    """Every non-blank stderr line (TensorFlow's start-up lines are gone:
    `tf_startup`)."""
    return [line for line in result.stderr.splitlines() if line.strip()]


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


# --------------------------------------------------------------------------
# TensorFlow's start-up lines (tf_startup).
# --------------------------------------------------------------------------


@pytest.fixture
def user_env(subprocess_env):
    """The environment of a user who set no TensorFlow log variable."""
    env = dict(subprocess_env)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args,fragment", [
    (["train", "--config=configs/train_demo.py"], "Expected --workdir"),
    (["train", "--config=configs/train_demo.py", "--workdir={tmp}/w",
      "--config.data.name=folder", "--config.data.root=/nonexistent/data"],
     "Data root /nonexistent/data does not exist"),
    (["train", "--config=configs/train_demo.py", "--workdir={tmp}/w",
      "--config.data.name=cifar10", "--config.data.data_dir={tmp}/tfds"],
     "'cifar10' is not prepared in"),
], ids=["no_workdir", "bad_data_root", "tfds_offline"])
def test_user_error_is_the_only_stderr_line(user_env, tmp_path, args,
                                            fragment):
    # No network for the TFDS case, whatever this machine has: the probe
    # and the download go through a proxy nobody listens on.
    user_env.update(HTTPS_PROXY=f"http://127.0.0.1:{_closed_port()}",
                    NO_PROXY="", no_proxy="")
    args = [a.format(tmp=tmp_path) for a in args]
    result = run(user_env, *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("e2rnas train: error: ")
    assert fragment in lines[0]
    assert not (tmp_path / "w").exists()


PROBE = """
import os, sys
import e2rnas_tf
print(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "unset"),
      "tensorflow" in sys.modules)
"""


def _records(stderr):
    """absl records with time and thread id removed, and the banner."""
    return sorted(re.sub(r"^([IWEF])\d{4} [\d:.]+ +\d+ ", r"\1 ", line)
                  for line in stderr.splitlines()
                  if re.match(r"^[IWEF]\d{4} ", line)
                  or line == tf_startup.ABSL_BANNER)


def test_package_import_is_quiet_and_leaves_the_environment(user_env):
    def probe(**env):
        result = subprocess.run(
            [sys.executable, "-c", PROBE], cwd=REPO, text=True,
            capture_output=True, env=dict(user_env, **env), timeout=300)
        assert result.returncode == 0, result.stderr
        return result

    quiet = probe()
    # TensorFlow imported, its INFO start-up lines gone, no variable set.
    assert quiet.stdout.split() == ["unset", "True"]
    assert quiet.stderr == ""
    # A user's own level is honoured; 0 shows what a plain import shows.
    loud = probe(TF_CPP_MIN_LOG_LEVEL="0")
    assert loud.stdout.split() == ["0", "True"]
    plain = subprocess.run(
        [sys.executable, "-c", "import tensorflow"], text=True,
        capture_output=True, env=dict(user_env, TF_CPP_MIN_LOG_LEVEL="0"),
        timeout=300)
    assert _records(loud.stderr) == _records(plain.stderr)
    assert _records(loud.stderr)


STARTUP = (
    tf_startup.ABSL_BANNER + "\n"
    "I0000 00:00:1796100230.297574    4924 port.cc:153] oneDNN custom "
    "operations are on.\n"
    "I0000 00:00:1796100230.297580    4924 cpu_feature_guard.cc:227] This "
    "TensorFlow binary is optimized\n"
    "To enable the following instructions: AVX2 FMA, rebuild TensorFlow\n"
    "W0000 00:00:1796100230.298364    4924 some.cc:31] a warning\n"
    "/x/y.py:3: DeprecationWarning: a Python warning\n"
    "E0000 00:00:1796100232.900550    4924 cuda_platform.cc:52] failed call "
    "to cuInit\n"
    "F0000 00:00:1796100232.900551    4924 x.cc:1] fatal\n")


@pytest.mark.parametrize("level,kept", [
    (0, "IICWPEF"), (1, "WPEF"), (2, "PEF"), (3, "PF")])
def test_drop_startup_lines(level, kept):
    # C: the continuation line of the CPU-feature record, dropped with it;
    # P: a Python warning, never dropped.
    out = tf_startup.drop_startup_lines(STARTUP, level).splitlines()
    assert [line[0] if line[0] in "IWEF" else
            ("C" if line.startswith("To enable") else "P") for line in out
            if line != tf_startup.ABSL_BANNER] == list(kept)
    assert (tf_startup.ABSL_BANNER in out) == (level == 0)


def test_stderr_capture_restores_fd2_and_replays_on_failure(capfd):
    with tf_startup._stderr_captured() as captured:
        os.write(2, b"native line\n")
    assert captured == ["native line\n"]
    assert capfd.readouterr().err == ""
    with pytest.raises(RuntimeError):
        with tf_startup._stderr_captured():
            os.write(2, b"why the import failed\n")
            raise RuntimeError("import failed")
    assert capfd.readouterr().err == "why the import failed\n"
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"


# --------------------------------------------------------------------------
# Help, packaged configs, nearest names.
# --------------------------------------------------------------------------


def test_command_help_lists_flags_and_commented_fields(subprocess_env):
    result = run(subprocess_env, "search", "--help")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("e2rnas search: Run the E2RNAS architecture search.")
    assert "  --workdir" in out and "  --overwrite" in out
    assert "  --checkpoint" not in out  # not a search flag
    fields = {line.split(" = ")[0].strip(): line for line in out.splitlines()
              if " = " in line}
    assert "first | second (unrolled)" in fields["arch.order"]
    assert "embedded | folder" in fields["data.name"]
    assert "derived" in fields["resource.estimate"]
    # -h with a config: that config's values.
    result = run(subprocess_env, "search", "-h",
                 "--config=search_demo")
    assert result.returncode == 0
    assert "model.layers = 5" in result.stdout
    assert "resource.estimate = 'derived'" in result.stdout
    result = run(subprocess_env, "-h")
    assert result.returncode == 0 and "commands:" in result.stdout


def test_misspelt_command_and_config_name_suggest_the_nearest(subprocess_env):
    for args in (("serach",), ("serach", "--help")):
        result = run(subprocess_env, *args)
        assert result.returncode == 2
        assert result.stderr.strip().endswith("did you mean 'search'?"), \
            result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    result = run(subprocess_env, "info", "--config=search_dmo")
    assert_one_line_error(result, "--config=search_dmo: no such file, nor a "
                          "packaged config", "did you mean 'search_demo'?")


def test_packaged_configs_and_defaults(subprocess_env, tmp_path):
    # By name, from any directory (what a wheel install has).
    result = subprocess.run(
        [sys.executable, "-m", "e2rnas_tf", "info",
         "--config=search_e2rnas_published:cpu"], cwd=str(tmp_path),
        env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "params: authors cost model" in result.stdout
    # Overrides without --config start from the command's defaults.
    result = run(subprocess_env, "info", "--config.model.layers=3",
                 "--config.model.channels=4")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^supernet\s+3 cells, C=4,", result.stdout, re.M)


def test_field_comments_come_from_config_lib():
    comments = usage.field_comments()
    assert comments["checkpoint_every"].startswith("steps between")
    assert "tfds name" in comments["ood"]
    assert usage.suggest("evalute", ["evaluate", "export"]) == \
        "; did you mean 'evaluate'?"
    assert usage.suggest("zzz", ["evaluate"]) == ""


def test_a_wheel_ships_the_configs_and_the_client(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
         str(tmp_path), str(REPO)], capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("e2rnas_tf-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names
                            if n.endswith("entry_points.txt"))
    assert "e2rnas_tf/configs/search_demo.py" in names
    assert "e2rnas_tf/configs/defaults.py" in names
    assert "e2rnas_tf/serving/client.py" in names
    assert "e2rnas_tf/assets/cifar10_subset.npz" in names
    assert "e2rnas = e2rnas_tf.cli:run" in entry_points
    assert "e2rnas-serving-client = e2rnas_tf.serving.client:main" in \
        entry_points
