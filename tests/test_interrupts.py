"""Interrupts and progress: SIGINT/SIGTERM stop a run at a step boundary,
checkpointed; checkpoints on a clock; every worker of a multi-worker run
stops together; progress lines with the fraction done and an ETA."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from e2rnas_tf import cli
from e2rnas_tf.runs import checkpoints as ckpt_lib
from e2rnas_tf.runs import context
from e2rnas_tf.runs import progress as progress_lib
from tests.search_util import tiny_flags

REPO = pathlib.Path(__file__).resolve().parents[1]

# A search of 2 epochs x 5 steps that takes seconds a step at most.
SEARCH_FLAGS = tiny_flags(**{
    "data.num_train": 96, "data.num_test": 16, "eval_batch_size": 8,
    "epochs": 2, "steps_per_epoch": 5, "log_every": 1, "deterministic": True,
    "objectives": ("acc", "params")})


def _search_command(workdir, *extra):
    return [sys.executable, "-m", "e2rnas_tf", "search",
            "--config=search_demo", f"--workdir={workdir}", *SEARCH_FLAGS,
            *extra]


def _manifest_steps(workdir):
    try:
        manifest = json.loads((pathlib.Path(workdir) / "checkpoints" /
                               ckpt_lib.MANIFEST).read_text())
        return [e["step"] for e in manifest["checkpoints"]]
    except (OSError, ValueError, KeyError):
        return []


def _steps_logged(text):
    """The global steps of the progress lines in ``text``."""
    steps = []
    for line in text.splitlines():
        if line.startswith("epoch ") and " step " in line:
            epoch = int(line.split()[1].split("/")[0])
            in_epoch = int(line.split(" step ")[1].split("/")[0])
            steps.append((epoch - 1) * 5 + in_epoch)
    return steps


# ---------------------------------------------------------------------------
# Progress.


def test_progress_lines_say_fraction_and_eta():
    lines = []
    progress = progress_lib.Progress(20, log=lines.append, every=5,
                                     interactive=False)
    progress.begin(10, "epoch 1/2")
    for n in range(1, 11):
        progress.update(n, line=lambda n=n: f"step {n}")
    assert lines[0] == "epoch 1/2"
    assert [line.split(" |")[0] for line in lines[1:]] == ["step 5", "step 10"]
    assert lines[-1].endswith("50% ETA " + progress_lib.format_duration(
        progress.eta()))
    assert progress.eta() is not None and progress.eta() >= 0


def test_progress_of_a_resumed_run_counts_the_done_part():
    lines = []
    progress = progress_lib.Progress(20, done=12, log=lines.append, every=4,
                                     interactive=False)
    progress.begin(10, done=2)              # epoch 2, 2 steps done
    for n in range(3, 11):
        progress.update(n, line=lambda n=n: f"step {n}")
    assert progress.done == 20
    assert [line.split(" ETA")[0] for line in lines] == [
        "step 4 | 70%", "step 8 | 90%", "step 10 | 100%"]


def test_progress_bar_on_a_terminal(capsys):
    progress = progress_lib.Progress(4, log=print, interactive=True)
    progress.begin(4)
    for n in range(1, 5):
        progress.update(n, [("loss", 1.0 / n)], line=lambda: "never")
    out = capsys.readouterr().out
    assert "4/4" in out and "loss" in out
    assert "never" not in out


@pytest.mark.parametrize("seconds,text", [
    (None, "?"), (float("nan"), "?"), (59.4, "0:59"), (61, "1:01"),
    (3723, "1:02:03")])
def test_format_duration(seconds, text):
    assert progress_lib.format_duration(seconds) == text


# ---------------------------------------------------------------------------
# When to checkpoint, when to stop.


class _Config(dict):
    def __getattr__(self, name):
        return self[name]


def _run(tmp_path, **fields):
    config = _Config({"max_consecutive_skips": 3, "checkpoint_every": 0,
                      "checkpoint_minutes": 0.0, "profile_steps": "",
                      **fields})
    return context.Run(str(tmp_path), config, log=lambda line: None)


def test_poll_saves_every_n_steps(tmp_path):
    run = _run(tmp_path, checkpoint_every=3)
    assert [run.poll(s)[0] for s in range(1, 8)] == [
        False, False, True, False, False, True, False]
    assert run.poll()[0] is False          # not after a step: never


def test_poll_saves_on_the_clock(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(context.time, "monotonic", lambda: now[0])
    run = _run(tmp_path, checkpoint_minutes=5.0)
    assert run.poll(1) == (False, False)
    now[0] += 299.0
    assert run.poll(2) == (False, False)
    now[0] += 2.0
    assert run.poll(3) == (True, False)    # 5 minutes since the start
    now[0] += 60.0
    assert run.poll(4) == (False, False)   # the clock restarted
    run.saved()                            # an epoch's own checkpoint
    now[0] += 290.0
    assert run.poll(5) == (False, False)


def test_poll_reports_a_signal_once_the_guard_has_it(tmp_path):
    run = _run(tmp_path)
    with run:
        assert run.poll(1) == (False, False)
        os.kill(os.getpid(), signal.SIGTERM)
        assert run.poll(2) == (False, True)
        assert run.stop_requested == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_poll_follows_the_other_workers(tmp_path):
    """Under multi-worker the flags are all-reduced: a peer's signal stops
    this worker too, and a peer's checkpoint time saves here too."""
    run = _run(tmp_path)
    seen = []

    def agree(flags):
        seen.append(list(flags))
        return [True, False, True]          # a peer: clock and SIGINT

    run._agree = agree
    assert run.poll(7) == (True, True)
    assert seen == [[False, False, False]]
    assert run.stop_requested == "SIGINT"


def test_a_keyboard_interrupt_outside_a_run_is_one_line_and_130(
        monkeypatch, capsys):
    """A Ctrl-C before the run can stop cleanly (loading data), or a
    second one: no traceback, exit 130."""
    def interrupted(argv, command_line):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_main", interrupted)
    monkeypatch.setattr(cli, "_DEBUG", type("Flag", (), {"value": False}))
    assert cli.main(["e2rnas", "search"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("e2rnas search: interrupted")
    assert "rerun the same command to resume" in err


# ---------------------------------------------------------------------------
# Real processes.


def _wait_for(proc, ready, deadline=300):
    end = time.time() + deadline
    while not ready():
        if proc.poll() is not None or time.time() > end:
            out, err = proc.communicate()
            pytest.fail(f"run ended before the signal:\n{out[-2000:]}\n"
                        f"{err[-2000:]}")
        time.sleep(0.02)


@pytest.mark.slow
def test_sigint_stops_at_the_next_step_saves_and_exits_130(subprocess_env,
                                                           tmp_path):
    workdir = tmp_path / "run"
    command = _search_command(workdir)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=subprocess_env, cwd=str(REPO))
    log = workdir / "metrics.jsonl"
    try:
        # Once step 2's metrics are written: the process is between steps
        # or in step 3.
        _wait_for(proc, lambda: log.exists()
                  and len(log.read_text().splitlines()) >= 2)
        sent_after = len(log.read_text().splitlines())
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert "stopped by SIGINT" in out
    assert "Resume by running the same command again" in out
    # It finished the step it was in, no more, and saved it.
    stopped = _manifest_steps(workdir)[-1]
    assert sent_after <= stopped <= sent_after + 1
    assert max(_steps_logged(out)) == stopped

    result = subprocess.run(command, capture_output=True, text=True,
                            env=subprocess_env, cwd=str(REPO), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming {workdir} at epoch 1, step {stopped}" in result.stdout
    assert (workdir / "genotype.json").exists()
    # Progress lines: the fraction of the whole run and an ETA; the
    # compilation and the evaluations are announced.
    assert "compiling the search step" in result.stdout
    assert "epoch 1: evaluating the supernet on 16 test images" \
        in result.stdout
    assert "| 100% ETA 0:00" in result.stdout
    assert sorted(_steps_logged(result.stdout)) == list(
        range(stopped + 1, 11))


@pytest.mark.slow
def test_a_signal_to_one_worker_stops_every_worker(subprocess_env,
                                                   tmp_path):
    """Two workers; SIGTERM to the non-chief one. Both stop at the same
    step (neither waits forever in a collective), the chief's checkpoint
    holds that step, and the same command resumes to the end."""
    sys.path.insert(0, str(REPO / "tools"))
    import multiworker_launch

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    workdir = tmp_path / "run"
    env = dict(subprocess_env, TMPDIR=str(scratch))
    command = _search_command(workdir, "--config.strategy.name=multi_worker")
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = []
    try:
        for i, tf_config in enumerate(multiworker_launch.tf_configs(2)):
            with open(logs[i], "w") as f:
                procs.append(subprocess.Popen(
                    command, env=dict(env, TF_CONFIG=tf_config), stdout=f,
                    stderr=subprocess.STDOUT, cwd=str(REPO)))
        metrics = workdir / "metrics.jsonl"
        _wait_for(procs[1], lambda: metrics.exists()
                  and len(metrics.read_text().splitlines()) >= 2)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
    assert "another worker received SIGTERM: stopping with it" in texts[0]
    assert "stopped by SIGTERM" in texts[0] and "stopped by SIGTERM" \
        in texts[1]
    stopped = _manifest_steps(workdir)[-1]
    assert max(_steps_logged(texts[0])) == stopped \
        == max(_steps_logged(texts[1]))
    assert stopped < 10

    codes = multiworker_launch.launch(command, 2, str(tmp_path / "resume"),
                                      env=env, timeout=600)
    texts = [(tmp_path / "resume" / f"worker{i}.log").read_text()
             for i in range(2)]
    assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
    assert f"at epoch 1, step {stopped}" in texts[0] or \
        f"at epoch 2, step {stopped}" in texts[0]
    assert (workdir / "genotype.json").exists()


def test_a_profiled_run_says_where_its_trace_is(tmp_path):
    lines = []
    config = _Config({"max_consecutive_skips": 3, "checkpoint_every": 0,
                      "checkpoint_minutes": 0.0, "profile_steps": "2,5"})
    config.to_dict = lambda: dict(config)
    with context.Run(str(tmp_path), config, log=lines.append) as run:
        run.open()
    tb = os.path.join(str(tmp_path), "tb")
    assert lines == [
        f"profiling steps 2-4: the trace goes to "
        f"{os.path.join(tb, 'plugins', 'profile')}; view it with "
        f"`pip install xprof && tensorboard --logdir {tb}`, PROFILE tab "
        "(step times: Input Pipeline Analysis)"]
