"""Search, retrain and evaluate one setting, resumable stage by stage.

`e2rnas reproduce` and `e2rnas sweep` run many settings, each through the
same three stages, in one process:

    <run_dir>/search/       e2rnas search  (genotype.json, ...)
    <run_dir>/train/        e2rnas train   (model_last.keras, ...)
    <run_dir>/evaluation/   e2rnas evaluate (evaluation.json, .md)

Each finished stage leaves ``stage.json`` (its config, its result and its
wall time). A stage whose ``stage.json`` holds the same config is not run
again, so a long command that was stopped continues where it was; a stage
that was interrupted resumes from its own checkpoints (search and train).
A stage directory holding a different config is refused unless
``overwrite``, by the identity rule every run follows (`runs.workdir`).

A process holds ``<run_dir>``'s lock (`runs.workdir.WorkdirLock`) while it
runs that setting's stages, so processes sharing one command's workdir
(seeds or settings started side by side) never run the same setting twice
at once: the second is refused with the lock's one-line error.
"""

from __future__ import annotations

import gc
import os
import platform
import time

import keras

from e2rnas_tf.runs import files
from e2rnas_tf.runs import workdir as workdir_lib

# How long a command waits for another process to finish writing the
# workdir's results (seconds of plotting and JSON) before refusing.
RESULTS_WAIT_SECONDS = 300.0


class PipelineError(ValueError):
    """A stage directory holds a different run, or a stage failed."""


def jsonable(value):
    """``value`` with tuples as lists, ConfigDicts and genotypes as dicts
    and NumPy scalars as numbers: ready for `runs.files.write_json`."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "item") and callable(value.item):
        return value.item()          # NumPy scalars
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def check_robust(config, error=PipelineError):
    """``config.robust`` must name an attack and eps that are evaluated."""
    ev = config.train.evaluate
    eps = tuple(float(e) for e in ev.epsilons)
    if config.robust.attack not in tuple(ev.attacks) \
            or float(config.robust.eps) not in eps:
        raise error(
            "Expected config.robust to name an evaluated attack and eps "
            f"({list(ev.attacks)} at {list(eps)}). "
            f"Received: {config.robust.attack} at {config.robust.eps}")


def set_data_source(stage_config, data):
    """Copies a pipeline's data source (name, root, data_dir, cache_dir)
    into a stage config (unlocked by the caller)."""
    for key in ("name", "root", "data_dir", "cache_dir"):
        stage_config.data[key] = data[key]


def describe_machine():
    """One line: CPU architecture and cores, OS, Python and TF versions."""
    import tensorflow as tf
    gpus = len(tf.config.list_physical_devices("GPU"))
    return (f"{platform.machine()}, {os.cpu_count()} cores, {gpus} GPUs, "
            f"{platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, TensorFlow {tf.__version__}")


def run_stage(stage_dir, config, fn, *, overwrite=False, log=print):
    """Runs ``fn()`` once for ``config`` in ``stage_dir``.

    Args:
        stage_dir: the stage's directory (``fn`` writes its outputs there).
        config: the stage's ConfigDict; identifies the stage's work.
        fn: a callable returning the stage's result (a JSON-able dict).
        overwrite: run again even if ``stage.json`` holds another config.
        log: a print-like callable.

    Returns:
        The result, from ``stage.json`` if the stage had finished before.
    """
    marker = os.path.join(stage_dir, "stage.json")
    config_dict = jsonable(config.to_dict())
    claim = workdir_lib.claim(
        stage_dir, config_dict, record="stage.json",
        read=lambda path: files.read_json(path)["config"],
        overwrite=overwrite, what="finished stage")
    if claim.resume:
        done = files.read_json(marker)
        log(f"{stage_dir}: done before ({done.get('seconds', 0):.0f} s),"
            " reusing its result")
        return done["result"]
    workdir_lib.clear(stage_dir, claim.stale)
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    files.write_json(marker, jsonable({"config": config_dict,
                                       "result": result,
                                       "seconds": round(seconds, 1)}),
                     sort_keys=False)
    # Each stage builds its own models and compiled steps; drop them before
    # the next one so that a long command's memory does not grow.
    keras.backend.clear_session()
    gc.collect()
    return files.read_json(marker)["result"]


def stage_seconds(stage_dir):
    """Wall seconds the stage took (0 if it has not finished)."""
    done = files.read_json(os.path.join(stage_dir, "stage.json"))
    return float(done.get("seconds", 0.0)) if done else 0.0


def search_stage(config, stage_dir, *, overwrite=False, log=print):
    """`search.search` as a stage; returns genotype, its size and timings."""
    from e2rnas_tf.search import run as search_lib

    def fn():
        result = search_lib.search(config, stage_dir, overwrite=overwrite,
                                   log=log)
        if result.get("stopped"):
            raise PipelineError(
                f"search in {stage_dir} stopped by {result['stopped']}; "
                "run the same command again to resume")
        last = result["epochs"][-1] if result.get("epochs") else {}
        return {"genotype": result["genotype"].to_dict(),
                "genotype_path": os.path.join(stage_dir, "genotype.json"),
                "genotype_params_m": float(result["genotype_params"]),
                "steps": int(result["steps"]),
                "compile_seconds": result.get("compile_seconds"),
                "last_epoch": jsonable(last)}

    return run_stage(stage_dir, config, fn, overwrite=overwrite, log=log)


def train_stage(config, stage_dir, *, overwrite=False, log=print):
    """`train.train` as a stage; returns size, accuracy and the model path."""
    from e2rnas_tf.training import train as train_lib

    def fn():
        summary = train_lib.train(config, stage_dir, overwrite=overwrite)
        if summary.get("stopped"):
            raise PipelineError(
                f"training in {stage_dir} stopped by {summary['stopped']};"
                " run the same command again to resume")
        keep = ("params", "macs", "best_accuracy", "last_accuracy", "epochs",
                "steps", "image_size", "num_classes")
        result = {k: jsonable(summary[k]) for k in keep if k in summary}
        # The last epoch's model is evaluated: choosing the best epoch by
        # test accuracy would select on the test set.
        result["model_path"] = os.path.join(stage_dir, "model_last.keras")
        return result

    return run_stage(stage_dir, config, fn, overwrite=overwrite, log=log)


def evaluate_stage(config, model_path, stage_dir, *, overwrite=False,
                   log=print):
    """`e2rnas evaluate` of ``model_path`` as a stage; returns the report."""
    from e2rnas_tf.training import evaluate as evaluate_lib

    def fn():
        report = evaluate_lib.evaluate(config, model_path, stage_dir,
                                       overwrite=overwrite, log=log)
        keep = ("num_examples", "clean_accuracy", "robust_accuracy",
                "params", "flops", "sanity", "seconds")
        return {k: jsonable(report[k]) for k in keep if k in report}

    return run_stage(stage_dir, config, fn, overwrite=overwrite, log=log)


def search_train_evaluate(search_config, train_config, run_dir, *,
                          overwrite=False, log=print):
    """The three stages for one setting in ``run_dir``.

    ``train_config.genotype`` is replaced by the searched genotype's file.

    Returns:
        A dict with the ``search``, ``train`` and ``evaluation`` results and
        ``seconds`` (the three stages' wall time).

    Raises:
        runs.workdir.WorkdirBusyError: another process is running this
            setting.
    """
    with workdir_lib.WorkdirLock(run_dir):
        return _search_train_evaluate(search_config, train_config, run_dir,
                                      overwrite=overwrite, log=log)


def _search_train_evaluate(search_config, train_config, run_dir, *,
                           overwrite, log):
    search_dir = os.path.join(run_dir, "search")
    train_dir = os.path.join(run_dir, "train")
    eval_dir = os.path.join(run_dir, "evaluation")
    searched = search_stage(search_config, search_dir, overwrite=overwrite,
                            log=log)
    train_config = train_config.copy_and_resolve_references()
    with train_config.unlocked():
        train_config.genotype = os.path.abspath(searched["genotype_path"])
    train_config.lock()
    trained = train_stage(train_config, train_dir, overwrite=overwrite,
                          log=log)
    evaluated = evaluate_stage(train_config, trained["model_path"], eval_dir,
                               overwrite=overwrite, log=log)
    seconds = sum(stage_seconds(d) for d in (search_dir, train_dir, eval_dir))
    return {"search": searched, "train": trained, "evaluation": evaluated,
            "seconds": seconds}
