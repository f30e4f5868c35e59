"""What ``e2rnas`` tells a user about itself: per-command help, config
fields with their comments, packaged configs by name, nearest names.

- ``e2rnas <command> --help`` (or ``-h``): the command's purpose, its
  flags, and every field of its config (the one ``--config`` names, else
  the command's default) with its value and the comment `config_lib`
  gives it.
- ``--config=NAME[:variant]``: a config shipped in the package
  (``e2rnas_tf.configs``, the checkout's ``configs/``) by name, when no file
  of that name exists; without ``--config``, the command's defaults
  (``configs/defaults.py``), so ``--config.FIELD=VALUE`` always works.
"""

from __future__ import annotations

import ast
import difflib
import importlib.resources
import inspect
import io
import os
import tokenize

from e2rnas_tf import config_lib

__all__ = ["command_help", "field_comments", "packaged_config",
           "prepare_argv", "suggest"]

# The command-line flags each command reads (besides --config, --debug).
COMMAND_FLAGS = {
    "info": (),
    "search": ("workdir", "overwrite"),
    "train": ("workdir", "overwrite", "genotype"),
    "evaluate": ("checkpoint", "workdir", "overwrite"),
    "export": ("checkpoint", "export_base", "model_name",
               "serving_base_path"),
    "plot": ("genotype", "workdir", "output"),
    "reproduce": ("workdir", "overwrite"),
    "sweep": ("workdir", "overwrite", "export_base", "model_name"),
}
# The default config of each command (configs/defaults.py variants).
DEFAULT_VARIANT = {"info": "search", "search": "search", "plot": "search",
                   "train": "train", "evaluate": "train", "export": "train",
                   "reproduce": "reproduce", "sweep": "sweep"}


def suggest(name, choices):
    """``"; did you mean 'X'?"`` for the nearest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def packaged_config(name):
    """The path of the packaged config ``name`` (``search_demo`` or
    ``search_demo.py``), or None."""
    stem = name[:-3] if name.endswith(".py") else name
    if not stem.isidentifier():
        return None
    path = importlib.resources.files("e2rnas_tf.configs") / f"{stem}.py"
    return str(path) if path.is_file() else None


def packaged_names():
    """The names of the packaged configs."""
    root = importlib.resources.files("e2rnas_tf.configs")
    return sorted(p.name[:-3] for p in root.iterdir()
                  if p.name.endswith(".py") and not p.name.startswith("_"))


def prepare_argv(argv):
    """``argv`` with ``--config`` resolved: a packaged name becomes its
    path, and a command without ``--config`` gets its defaults.

    Raises:
        ValueError: ``--config`` names neither a file nor a packaged config
            (with the nearest packaged name).
    """
    argv = list(argv)
    command = argv[1] if len(argv) > 1 and not argv[1].startswith("-") \
        else None
    seen = False
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            seen = True
            value = arg.split("=", 1)[1]
            path, sep, variant = value.partition(":")
            if path and not os.path.exists(path):
                found = packaged_config(path)
                if found:
                    argv[i] = f"--config={found}{sep}{variant}"
                elif os.sep not in path and not path.endswith(".py"):
                    raise ValueError(
                        f"--config={value}: no such file, nor a packaged "
                        f"config (packaged: {', '.join(packaged_names())})"
                        + suggest(path, packaged_names()))
        elif arg == "--config":
            seen = True
    if not seen and command in DEFAULT_VARIANT:
        argv.insert(2, f"--config={packaged_config('defaults')}:"
                       f"{DEFAULT_VARIANT[command]}")
    return argv


def _source_comments(source):
    """``{line: comment}`` for every comment in ``source``."""
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    return comments


def field_comments():
    """``{dotted field: comment}`` from `config_lib`'s source: the comment
    on a field's line, else the comment lines right above it."""
    source = inspect.getsource(config_lib)
    tree = ast.parse(source)
    comments = _source_comments(source)
    lines = source.splitlines()
    functions = {f.name: f for f in tree.body
                 if isinstance(f, ast.FunctionDef)}

    def text(lineno):
        if lineno in comments and not lines[lineno - 1].lstrip().startswith(
                "#"):
            return comments[lineno]
        above, k = [], lineno - 1
        while k >= 1 and lines[k - 1].lstrip().startswith("#"):
            above.insert(0, comments[k])
            k -= 1
        return " ".join(above)

    def target_path(node):
        parts = []
        while isinstance(node, ast.Attribute):
            parts.insert(0, node.attr)
            node = node.value
        return ".".join(parts) if isinstance(node, ast.Name) else None

    out = {}

    def walk(function, prefix, depth=0):
        if depth > 4:
            return
        for stmt in ast.walk(function):
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
                call = stmt.value
                if isinstance(call.func, ast.Name) and \
                        call.func.id in functions and call.args:
                    walk(functions[call.func.id], prefix, depth + 1)
            if not isinstance(stmt, ast.Assign) or len(stmt.targets) != 1:
                continue
            path = target_path(stmt.targets[0])
            if not path:
                continue
            name = prefix + path
            out.setdefault(name, text(stmt.lineno))
            value = stmt.value
            if isinstance(value, ast.Call) and isinstance(value.func,
                                                          ast.Name) \
                    and value.func.id in functions:
                walk(functions[value.func.id], name + ".", depth + 1)
            for call in (n for n in ast.walk(value)
                         if isinstance(n, ast.Call)):
                for kw in call.keywords:
                    if kw.arg:
                        out.setdefault(f"{name}.{kw.arg}",
                                       text(kw.value.lineno))

    for name in ("search_config", "train_config", "reproduce_config",
                 "sweep_config"):
        walk(functions[name], "")
    return {k: v for k, v in out.items() if v}


def _flatten(config, prefix=""):
    for key, value in config.items():
        path = f"{prefix}{key}"
        if hasattr(value, "items"):
            yield from _flatten(value, path + ".")
        else:
            yield path, value


def command_help(command, summary, doc, config, flag_help):
    """The text of ``e2rnas <command> --help``.

    Args:
        command: the command's name.
        summary: its one-line purpose.
        doc: its main function's docstring (the usage line).
        config: the config it would run with.
        flag_help: ``{flag: help}`` of the command-line flags.
    """
    lines = [f"e2rnas {command}: {summary}", ""]
    if doc:
        lines += [line.rstrip() for line in inspect.cleandoc(doc).splitlines()]
        lines.append("")
    lines.append("flags:")
    names = ("config",) + COMMAND_FLAGS.get(command, ()) + ("debug",)
    for name in names:
        lines.append(f"  --{name:<18} {flag_help.get(name, '')}")
    comments = field_comments()
    lines += ["", "config fields (override with --config.FIELD=VALUE):"]
    for path, value in _flatten(config):
        comment = comments.get(path) or comments.get(path.split(".")[-1], "")
        entry = f"  {path} = {value!r}"
        lines.append(f"{entry:<44} {comment}" if comment else entry)
    return "\n".join(lines) + "\n"
