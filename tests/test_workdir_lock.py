"""One process per work directory (runs.workdir.WorkdirLock)."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from e2rnas_tf.runs import workdir as workdir_lib
from tests.conftest import REPO

HOLD = """
import sys, time
from e2rnas_tf.runs import workdir as workdir_lib
lock = workdir_lib.WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _holder(workdir, env):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, workdir], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_lock_in_the_same_process_is_refused(tmp_path):
    first = workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    with pytest.raises(workdir_lib.WorkdirBusyError,
                       match=f"pid {os.getpid()}"):
        workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    first.release()
    lock_file = tmp_path / workdir_lib.WorkdirLock.FILENAME
    assert not lock_file.exists()   # removed on release
    with workdir_lib.WorkdirLock(str(tmp_path)):
        assert lock_file.read_text().strip() == str(os.getpid())
    assert not lock_file.exists()


def test_a_waiting_lock_takes_over_when_the_owner_releases(tmp_path):
    first = workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    # Not released within the wait: refused, after waiting.
    start = time.monotonic()
    with pytest.raises(workdir_lib.WorkdirBusyError,
                       match=f"pid {os.getpid()}"):
        workdir_lib.WorkdirLock(str(tmp_path), wait=0.3).acquire()
    assert time.monotonic() - start >= 0.3
    # Released during the wait: taken.
    timer = threading.Timer(0.3, first.release)
    timer.start()
    try:
        with workdir_lib.WorkdirLock(str(tmp_path), wait=30):
            assert first._fd is None
            assert (tmp_path / workdir_lib.WorkdirLock.FILENAME) \
                .read_text().strip() == str(os.getpid())
    finally:
        timer.join()


def test_lock_of_a_killed_process_is_free_again(tmp_path, subprocess_env):
    proc = _holder(str(tmp_path), subprocess_env)
    try:
        with pytest.raises(workdir_lib.WorkdirBusyError) as info:
            workdir_lib.WorkdirLock(str(tmp_path)).acquire()
        assert f"pid {proc.pid}" in str(info.value)
        assert "in use by another e2rnas process" in str(info.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # SIGKILL leaves the file but not the lock.
    assert os.path.exists(tmp_path / workdir_lib.WorkdirLock.FILENAME)
    workdir_lib.WorkdirLock(str(tmp_path)).acquire().release()


def _search_cmd(workdir):
    return [sys.executable, "-m", "e2rnas_tf", "search",
            "--config=configs/search_demo.py", f"--workdir={workdir}",
            "--config.epochs=1", "--config.steps_per_epoch=1",
            "--config.model.layers=3", "--config.model.channels=4",
            "--config.data.image_size=8", "--config.data.num_train=64",
            "--config.data.num_test=16", "--config.batch_size=8",
            "--config.eval_batch_size=16"]


def test_search_into_a_busy_workdir_is_refused(tmp_path, subprocess_env):
    workdir = str(tmp_path / "run")
    proc = _holder(workdir, subprocess_env)
    try:
        result = subprocess.run(_search_cmd(workdir), cwd=str(REPO),
                                env=subprocess_env, capture_output=True,
                                text=True, timeout=600)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"e2rnas search: error: {workdir} is in use by another "
                    f"e2rnas process (pid {proc.pid}); wait for it to "
                    "finish or use another --workdir")
    # Nothing of the search was written.
    assert os.listdir(workdir) == [workdir_lib.WorkdirLock.FILENAME]
