"""The ``e2rnas`` command line: ``e2rnas <command> --config=... --workdir=...``.

Commands are thin: they parse flags, resolve the config and call a library
function. A user error (bad config, genotype, path, data) ends with one
line on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from e2rnas_tf import tf_startup
from e2rnas_tf import usage

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config: a packaged name (search_demo, reproduce:cpu, "
    "...) or a file, configs/<name>.py[:variant]; default: the command's "
    "defaults. Fields can be overridden with --config.<field>=<value>.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory for outputs.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Allow reusing a workdir that holds a different run.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show tracebacks of user errors.")
_GENOTYPE = flags.DEFINE_string(
    "genotype", None, "A published genotype name or a genotype JSON file.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A training workdir or checkpoint to load.")
_EXPORT_BASE = flags.DEFINE_string(
    "export_base", None, "TF Serving model base directory.")
_MODEL_NAME = flags.DEFINE_string("model_name", "e2rnas", "Served model name.")
_SERVING_BASE_PATH = flags.DEFINE_string(
    "serving_base_path", "/models", "The --export_base directory as the "
    "model server sees it, for base paths in models.config (e2rnas export; "
    "/models: the docker image's mount).")
_OUTPUT = flags.DEFINE_string("output", None, "Output file or directory.")


@dataclasses.dataclass(frozen=True)
class Args:
    """The command-line values a command receives (no global flag reads)."""

    command: str
    workdir: str | None
    overwrite: bool
    genotype: str | None
    checkpoint: str | None
    export_base: str | None
    model_name: str
    output: str | None
    extra: tuple[str, ...]
    serving_base_path: str = "/models"
    # The whole command line as typed (flags included), for the records a
    # command writes (reproduce, sweep).
    command_line: tuple[str, ...] = ()


# name -> ("module:function", default config factory in config_lib, help).
COMMANDS = {
    "info": ("e2rnas_tf.search.info:main", "search_config",
             "Print the supernet, the dataset and where the resource "
             "objectives push."),
    "search": ("e2rnas_tf.search.run:main", "search_config",
               "Run the E2RNAS architecture search."),
    "train": ("e2rnas_tf.training.train:main", "train_config",
              "Retrain a genotype as a deep network."),
    "evaluate": ("e2rnas_tf.training.evaluate:main", "train_config",
                 "Clean and adversarial accuracy of a trained network."),
    "export": ("e2rnas_tf.serving.export:main", "train_config",
               "Export a trained network as a TF Serving SavedModel."),
    "plot": ("e2rnas_tf.plots:main", "search_config",
             "Draw cell diagrams of a genotype or plots of a run."),
    "reproduce": ("e2rnas_tf.experiments.reproduce:main", "reproduce_config",
                  "The paper's comparison (DARTS vs E2RNAS, its variants "
                  "and ablation): search, retrain, evaluate, tabulate."),
    "sweep": ("e2rnas_tf.experiments.sweep:main", "sweep_config",
              "Search over resource targets; Pareto front; export it."),
}


class UsageError(ValueError):
    """The command line itself is wrong."""


def _usage():
    lines = ["usage: e2rnas <command> [--config=NAME|configs/X.py[:variant]] "
             "[--workdir=DIR] [--config.FIELD=VALUE ...]",
             "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "e2rnas <command> --help: the command's flags and config "
              "fields."]
    return "\n".join(lines)


def _load_config(argv):
    """The config a prepared ``argv`` names, without its overrides."""
    value = next(a.split("=", 1)[1] for a in argv
                 if a.startswith("--config="))
    path, _, variant = value.partition(":")
    spec = importlib.util.spec_from_file_location("_e2rnas_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def _command_help(command, argv):
    """``e2rnas <command> --help``: purpose, flags and config fields."""
    function, _ = _resolve(command)
    flag_help = {name: flags.FLAGS[name].help
                 for name in ("config", "workdir", "overwrite", "debug",
                              "genotype", "checkpoint", "export_base",
                              "model_name", "serving_base_path", "output")}
    return usage.command_help(command, COMMANDS[command][2], function.__doc__,
                              _load_config(argv), flag_help)


def _resolve(command):
    target, factory, _ = COMMANDS[command]
    module_name, function = target.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, function), factory


def _lines(text):
    return [line.strip() for line in str(text).splitlines() if line.strip()]


def _config_load_error(error):
    """One line from ml_collections' "earlier failure to load" error: the
    last line of the original error names the file and the reason."""
    lines = _lines(error.__cause__ or error) or [repr(error)]
    return f"cannot load the --config file: {lines[-1]}"


def _flag_error(error, argv):
    """One line describing an exception raised while parsing ``argv``."""
    if isinstance(error, OSError):
        return _config_load_error(error)
    if isinstance(error, (AttributeError, KeyError)):
        # A locked config rejecting --config.<field>: ConfigDict's KeyError
        # (with its "did you mean") hides in the exception chain.
        while error.__context__ is not None and not isinstance(error,
                                                               KeyError):
            error = error.__context__
        detail = _lines(error.args[0] if error.args else error)
        overrides = [a.split("=")[0] for a in argv[1:]
                     if a.lstrip("-").startswith("config.")]
        return (f"unknown config field {detail[0] if detail else ''} in "
                f"{' '.join(overrides)}" + "".join(f"; {d}" for d in detail[1:]))
    lines = _lines(error) or [repr(error)]
    if not isinstance(error, flags.Error):
        lines[0] = f"{type(error).__name__}: {lines[0]}"
    # Config files that raise are reported with a traceback in the message:
    # its last line is the exception itself.
    return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


def _parse_flags(argv):
    """absl's flag parsing, with a bad flag, config file or config override
    reported on one line (exit code 2) rather than as a traceback."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - any failure here is a user error
        if "--debug" in argv:
            raise
        command = argv[1] if len(argv) > 1 and not argv[1].startswith("-") \
            else ""
        print(f"e2rnas {command}: error: {_flag_error(e, argv)}".replace(
            "  ", " "), file=sys.stderr)
        sys.exit(2)


def _main(argv, command_line):
    if len(argv) < 2 or argv[1] in ("help", "-h"):
        print(_usage())
        return 0 if len(argv) >= 2 else 2
    command = argv[1]
    if command not in COMMANDS:
        raise UsageError(
            f"unknown command {command!r}; expected one of {list(COMMANDS)}"
            + usage.suggest(command, COMMANDS))
    config = _CONFIG.value
    if config is not None:
        try:
            # ml_collections defers a file-loading error to the first field
            # access; surface it before any command module is imported.
            config.get  # noqa: B018
        except OSError as e:
            raise UsageError(_config_load_error(e)) from None
    function, factory = _resolve(command)
    if config is None:
        from e2rnas_tf import config_lib
        config = getattr(config_lib, factory)()
        config.lock()
    args = Args(command=command, workdir=_WORKDIR.value,
                overwrite=_OVERWRITE.value, genotype=_GENOTYPE.value,
                checkpoint=_CHECKPOINT.value, export_base=_EXPORT_BASE.value,
                model_name=_MODEL_NAME.value, output=_OUTPUT.value,
                extra=tuple(argv[2:]),
                serving_base_path=_SERVING_BASE_PATH.value,
                command_line=tuple(command_line))
    return function(config, args) or 0


def main(argv, command_line=()):
    """Runs the command in ``argv`` (absl's, flags parsed);
    ``command_line`` is the command as typed, for the records."""
    try:
        return _main(argv, command_line or ("e2rnas", *argv[1:]))
    except KeyboardInterrupt:
        # A Ctrl-C before a run could stop cleanly (loading data, building)
        # or a second one, which forces: no traceback, the shell's code.
        if _DEBUG.value:
            raise
        command = argv[1] if len(argv) > 1 else ""
        print(f"e2rnas {command}: interrupted; checkpoints already written "
              "are kept: rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        # Library code raises ValueError subclasses with complete, specific
        # messages for every bad input; anything else is a bug and keeps its
        # traceback.
        if _DEBUG.value:
            raise
        command = argv[1] if len(argv) > 1 else ""
        message = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        print(f"e2rnas {command}: error: {message}".replace("  ", " "),
              file=sys.stderr)
        return 2


def _quiet_logs():
    # absl INFO lines (one per checkpoint save) drown the progress output;
    # warnings and errors still show. TF 2.21's own start-up lines come
    # from C++ before any setting can reach them: see tf_startup (the
    # package import drops the import's, this entry point the CUDA
    # probe's).
    absl_logging.set_verbosity(absl_logging.WARNING)


_HELP = ("-h", "--help", "--helpshort", "--helpfull", "-?")


def run():
    """Console-script entry point."""
    _quiet_logs()
    tf_startup.initialize_devices_quietly()
    command_line = ("e2rnas", *sys.argv[1:])
    try:
        argv = usage.prepare_argv(sys.argv)
    except ValueError as e:
        command = sys.argv[1] if len(sys.argv) > 1 else ""
        print(f"e2rnas {command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    if any(a in _HELP for a in argv[1:]):
        command = argv[1] if len(argv) > 1 else ""
        if command in COMMANDS:
            print(_command_help(command, argv), end="")
            sys.exit(0)
        if command and command not in _HELP:
            print(f"e2rnas: error: unknown command {command!r}"
                  + usage.suggest(command, COMMANDS), file=sys.stderr)
            sys.exit(2)
        print(_usage())
        sys.exit(0)
    app.run(lambda argv: sys.exit(main(argv, command_line)), argv=argv,
            flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
