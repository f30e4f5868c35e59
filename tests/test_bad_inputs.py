"""Bad inputs give one clear line, exit code 2 and leave outputs intact.

The command-line cases run through the real ``e2rnas`` entry point
(`cli._parse_flags` + `cli.main`, exactly what ``python -m e2rnas_tf``
runs) inside ONE subprocess (`DRIVER`), so TensorFlow is imported once for
~40 cases. For each case the driver records the exit code, stderr and a
hash of the directories that must not change. The table of inputs and
messages is in /work/notes/bad_inputs.md.
"""

import hashlib
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from e2rnas_tf import data as data_lib
from tests.search_util import tiny_flags

REPO = pathlib.Path(__file__).resolve().parents[1]

DRIVER = r'''
import contextlib, hashlib, importlib, io, json, os, sys, traceback
from absl import flags
from e2rnas_tf import cli

OWN = ("config", "workdir", "overwrite", "debug", "genotype", "checkpoint",
       "export_base", "model_name", "output", "serving_base_path")

cases = json.load(open(sys.argv[1]))
watch = sys.argv[2:]


def tree_hash():
    h = hashlib.sha256()
    for root in watch:
        for dirpath, dirnames, filenames in sorted(os.walk(root)):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                h.update(path.encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


results = []
for case in cases:
    argv = ["e2rnas"] + case["argv"]
    before = tree_hash()
    err, out = io.StringIO(), io.StringIO()
    # A fresh set of e2rnas flags per case: ml_collections finds the
    # --config.<field> overrides in sys.argv when --config is defined.
    sys.argv = argv
    # Some cases need an environment of their own (e.g. an unreachable
    # proxy); it is restored after the case.
    saved_env = {k: os.environ.get(k) for k in case["env"]}
    os.environ.update(case["env"])
    for name in list(flags.FLAGS):
        if name in OWN or name.startswith("config."):
            delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
    cli = importlib.reload(cli)
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = cli.main(cli._parse_flags(argv))
        except SystemExit as e:
            code = e.code
        except BaseException:
            code = "traceback"
            traceback.print_exc(file=err)
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    results.append({"name": case["name"], "code": code,
                    "stderr": err.getvalue(), "stdout": out.getvalue()[-500:],
                    "intact": before == tree_hash()})
json.dump(results, sys.stdout)
'''

TRAIN_CONFIG = '''
from e2rnas_tf import config_lib


def get_config():
    c = config_lib.train_config()
    c.genotype = "DARTS_V2"
    c.data.image_size = 8
    c.data.num_train = 32
    c.data.num_test = 16
    c.model.layers = 3
    c.model.channels = 4
    c.batch_size = 16
    c.eval_batch_size = 16
    c.epochs = 1
    c.steps_per_epoch = 1
    c.evaluate.attacks = ("fgsm",)
    c.evaluate.epsilons = (2.0,)
    c.evaluate.num_examples = 8
    c.lock()
    return c
'''

SEARCH_FLAGS = tiny_flags(**{"data.num_train": 64, "data.num_test": 16})


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_png(array).numpy())


def _folder(root, classes=("a", "b"), size=8, per_class=2):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            for i in range(per_class):
                _png(root / split / c / f"{i}.png",
                     rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    return root


def _cases(tmp):
    """``(name, argv, expected stderr substring)``; the first is a good
    run that creates ``good`` (a train workdir) for the later cases."""
    cfg = tmp / "train_tiny.py"
    cfg.write_text(TRAIN_CONFIG)
    (tmp / "syntax.py").write_text("def get_config(:\n")
    (tmp / "bad.json").write_text("{not json")
    (tmp / "badop.json").write_text(json.dumps({
        "normal": [["conv_9x9", 0], ["skip_connect", 1]] * 4,
        "normal_concat": [2, 3, 4, 5],
        "reduce": [["max_pool_3x3", 0], ["skip_connect", 1]] * 4,
        "reduce_concat": [2, 3, 4, 5]}))
    (tmp / "nofield.json").write_text(json.dumps({"normal": []}))
    (tmp / "model.txt").write_text("x")
    (tmp / "corrupt.keras").write_bytes(b"PK\x03\x04 not a zip")
    (tmp / "afile").write_text("x")
    (tmp / "nomodel").mkdir()

    good = _folder(tmp / "data_good")
    no_test = _folder(tmp / "data_no_test")
    for p in sorted((no_test / "test").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (no_test / "test").rmdir()
    empty_class = _folder(tmp / "data_empty_class")
    for p in (empty_class / "train" / "b").iterdir():
        p.unlink()
    mismatch = _folder(tmp / "data_mismatch")
    (mismatch / "test" / "b").rename(mismatch / "test" / "c")
    corrupt = _folder(tmp / "data_corrupt")
    (corrupt / "train" / "a" / "0.png").write_bytes(b"\x89PNG garbage")
    gray = _folder(tmp / "data_gray")
    _png(gray / "train" / "a" / "0.png",
         np.zeros((8, 8, 1), np.uint8))
    rgba = _folder(tmp / "data_rgba")
    _png(rgba / "train" / "a" / "0.png", np.zeros((8, 8, 4), np.uint8))
    sizes = _folder(tmp / "data_sizes")
    _png(sizes / "train" / "a" / "0.png", np.zeros((12, 8, 3), np.uint8))
    nonsquare = _folder(tmp / "data_nonsquare", size=8)
    for p in nonsquare.rglob("*.png"):
        _png(p, np.zeros((8, 6, 3), np.uint8))
    notimage = _folder(tmp / "data_notimage")
    (notimage / "train" / "a" / "0.png").write_text("hello")
    # Enough images to train a batch: one class used to train, exit 0.
    one_class = _folder(tmp / "data_one_class", classes=("a",), per_class=16)
    no_test_images = _folder(tmp / "data_no_test_images")
    for p in (no_test_images / "test" / "b").iterdir():
        p.unlink()
    # A TFDS data_dir holding the user's files but not the data set, and a
    # proxy nobody listens on: a machine without network, whatever this
    # one has (the download goes through the proxy, and so does the probe).
    tfds_dir = tmp / "tfds_user"
    (tfds_dir / "downloads" / "manual").mkdir(parents=True)
    (tfds_dir / "downloads" / "manual" / "keep.bin").write_bytes(b"mine")
    no_network = {"HTTPS_PROXY": f"http://127.0.0.1:{_closed_port()}",
                  "HTTP_PROXY": f"http://127.0.0.1:{_closed_port()}",
                  "NO_PROXY": "", "no_proxy": ""}
    del good

    train = ["train", f"--config={cfg}"]
    SEARCH = ["--config=configs/search_demo.py"] + SEARCH_FLAGS
    new = f"--workdir={tmp / 'new'}"
    # A search workdir of its own (search and train runs differ).
    new_s = f"--workdir={tmp / 'new_search'}"
    folder = "--config.data.name=folder"
    return [
        ("good train run (setup)", train + [f"--workdir={tmp / 'good'}"],
         None),
        # Command line.
        ("unknown command", ["frobnicate"], "unknown command 'frobnicate'"),
        ("unknown flag", train + [new, "--nosuchflag"],
         "Unknown command line flag 'nosuchflag'"),
        ("missing config file", ["train", "--config=/nonexistent/c.py", new],
         "cannot load the --config file"),
        ("config file with a syntax error",
         ["train", f"--config={tmp / 'syntax.py'}", new],
         "SyntaxError: invalid syntax (syntax.py, line 1)"),
        ("unknown config field", train + [new, "--config.nosuch=1"],
         "unknown config field"),
        ("config value of the wrong type",
         train + [new, "--config.epochs=abc"], "epochs"),
        ("train without --workdir", train, "Expected --workdir"),
        ("search without --workdir", ["search"] + SEARCH,
         "Expected --workdir"),
        # Config values.
        ("epochs = 0", train + [new, "--config.epochs=0"],
         "Expected config.epochs to be an integer >= 1"),
        ("negative batch size", train + [new, "--config.batch_size=-4"],
         "Expected config.batch_size to be an integer >= 1"),
        ("adversarial ratio > 1",
         train + [new, "--config.adv_train.ratio=2.0"],
         "Expected config.adv_train.ratio in [0, 1]"),
        ("unknown precision",
         train + [new, "--config.mixed_precision=float8"],
         "Expected config.mixed_precision in"),
        ("unknown strategy", train + [new, "--config.strategy.name=tpu"],
         "Expected config.strategy.name in"),
        ("steps_per_epoch beyond the data",
         train + [new, "--config.steps_per_epoch=999"],
         "Expected config.steps_per_epoch <="),
        ("unknown dataset", train + [new, "--config.data.name=imagenet"],
         "Unknown dataset name 'imagenet'"),
        ("negative num_train", train + [new, "--config.data.num_train=-1"],
         "Expected data.num_train to be an integer >= 0"),
        ("unknown search objective",
         ["search", new_s] + SEARCH +
         ["--config.objectives=('acc','speed')"],
         "Expected objectives among"),
        ("duplicate search objectives",
         ["search", new_s] + SEARCH +
         ["--config.objectives=('acc','acc')"],
         "Expected distinct objectives"),
        ("unknown eval split", ["search", new_s] + SEARCH +
         ["--config.eval_on=train"], "Expected config.eval_on in"),
        ("search batch larger than the split",
         ["search", new_s] + SEARCH + ["--config.batch_size=4096"],
         "32 weight-training / 32 architecture images, batch_size=4096"),
        # Genotypes.
        ("unknown genotype name", train + [new, "--genotype=NOPE"],
         "NOPE"),
        ("genotype file: invalid JSON",
         train + [new, f"--genotype={tmp / 'bad.json'}"], "not valid JSON"),
        ("genotype file: unknown operation",
         train + [new, f"--genotype={tmp / 'badop.json'}"], "conv_9x9"),
        ("genotype file: missing fields",
         train + [new, f"--genotype={tmp / 'nofield.json'}"],
         "missing field"),
        # Data folders.
        ("folder dataset without root", train + [new, folder],
         "data.root is empty"),
        ("data root missing",
         train + [new, folder, "--config.data.root=/nonexistent/data"],
         "does not exist or is not a folder"),
        ("data: no test folder",
         train + [new, folder, f"--config.data.root={no_test}"],
         "Missing test folder"),
        ("data: empty class folder",
         train + [new, folder, f"--config.data.root={empty_class}"],
         "has no images"),
        ("data: train/test classes differ",
         train + [new, folder, f"--config.data.root={mismatch}"],
         "Train/test class mismatch"),
        ("data: corrupt PNG",
         train + [new, folder, f"--config.data.root={corrupt}"],
         "0.png"),
        ("data: not an image at all",
         train + [new, folder, f"--config.data.root={notimage}"],
         "not a JPEG or PNG"),
        ("data: grayscale image",
         train + [new, folder, f"--config.data.root={gray}"],
         "only 3-channel RGB"),
        ("data: RGBA image",
         train + [new, folder, f"--config.data.root={rgba}"],
         "only 3-channel RGB"),
        ("data: images of different sizes",
         train + [new, folder, f"--config.data.root={sizes}",
                  "--config.data.image_size=0"],
         "Images have different sizes"),
        ("data: one class",
         train + [new, folder, f"--config.data.root={one_class}",
                  "--config.data.num_train=0", "--config.data.num_test=0"],
         "a classifier needs at least 2 classes"),
        ("data: a class with no test images",
         train + [new, folder, f"--config.data.root={no_test_images}"],
         "test/b has no images"),
        ("num_test leaves classes without test images",
         train + [new, "--config.data.num_test=5"],
         "The test split has no images of 5 of the 10 classes"),
        ("num_train leaves classes without training images",
         train + [new, "--config.data.num_train=5"],
         "The train split has no images of 5 of the 10 classes"),
        ("train: fewer training images than one batch",
         train + [new, "--config.data.num_train=10"],
         "Fewer training images than one batch: 10 training images, "
         "batch_size=16"),
        ("search: num_train too small for a batch in each half",
         ["search", new_s] + SEARCH + ["--config.data.num_train=12"],
         "Fewer training images than one batch in a search split "
         "(data.train_portion=0.5): 6 weight-training / 6 architecture "
         "images, batch_size=8"),
        ("tfds data set not prepared, no network",
         train + [new, "--config.data.name=cifar10",
                  f"--config.data.data_dir={tfds_dir}"],
         f"'cifar10' is not prepared in {tfds_dir} and cannot be downloaded",
         no_network),
        ("data: non-square images",
         train + [new, folder, f"--config.data.root={nonsquare}",
                  "--config.data.image_size=0", "--config.data.num_train=0",
                  "--config.data.num_test=0"],
         "not square"),
        # Workdirs of other runs.
        ("train into another run's workdir",
         train + [f"--workdir={tmp / 'good'}", "--config.optim.lr=0.5"],
         "holds another run (optim.lr:"),
        ("search into a train workdir",
         ["search", f"--workdir={tmp / 'good'}"] + SEARCH,
         "holds another run ("),
        ("workdir is a file", ["search", f"--workdir={tmp / 'afile'}"]
         + SEARCH, "is not a directory"),
        # Checkpoints.
        ("evaluate: checkpoint missing",
         ["evaluate", f"--config={cfg}", "--checkpoint=/nonexistent/run"],
         "does not exist"),
        ("evaluate: no --checkpoint", ["evaluate", f"--config={cfg}"],
         "Expected --checkpoint"),
        ("evaluate: directory without a model",
         ["evaluate", f"--config={cfg}", f"--checkpoint={tmp / 'nomodel'}"],
         "holds no model_best.keras"),
        ("evaluate: corrupt .keras file",
         ["evaluate", f"--config={cfg}",
          f"--checkpoint={tmp / 'corrupt.keras'}"],
         "is not a loadable Keras model file"),
        ("evaluate: unknown attack",
         ["evaluate", f"--config={cfg}", f"--checkpoint={tmp / 'good'}",
          "--config.evaluate.attacks=('fgsm','cw')"], "cw"),
        ("evaluate: negative epsilon",
         ["evaluate", f"--config={cfg}", f"--checkpoint={tmp / 'good'}",
          "--config.evaluate.epsilons=(-1.0,)"], "-1.0"),
        ("export: not a .keras file",
         ["export", f"--checkpoint={tmp / 'model.txt'}",
          f"--export_base={tmp / 'serving'}"], "Expected a .keras"),
        ("export: no --export_base",
         ["export", f"--checkpoint={tmp / 'good'}"],
         "Expected --export_base"),
        ("export: bad model name",
         ["export", f"--checkpoint={tmp / 'good'}",
          f"--export_base={tmp / 'serving'}", "--model_name=../up"],
         "model_name"),
        ("export: export base is a file",
         ["export", f"--checkpoint={tmp / 'good'}",
          f"--export_base={tmp / 'afile'}"], "is not a directory"),
        ("export: unwritable export base",
         ["export", f"--checkpoint={tmp / 'good'}",
          f"--export_base={tmp / 'afile' / 'sub'}"],
         "Cannot write to export base"),
        ("export: empty --serving_base_path",
         ["export", f"--checkpoint={tmp / 'good'}",
          f"--export_base={tmp / 'serving'}", "--serving_base_path="],
         "Expected the serving base path"),
    ]


def _closed_port():
    """A local TCP port nothing listens on (connecting is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _damage_checkpoints(tmp):
    """The train checkpoints of ``good`` all truncated (for the resume
    case run after the driver's first pass)."""
    for path in (tmp / "good" / "checkpoints").glob("ckpt-*.data-*"):
        raw = path.read_bytes()
        path.write_bytes(raw[:len(raw) // 2])


def _run_driver(tmp, cases, watch):
    (tmp / "driver.py").write_text(DRIVER)
    spec = tmp / "cases.json"
    spec.write_text(json.dumps([
        {"name": n, "argv": a, "env": env[0] if env else {}}
        for n, a, _, *env in cases]))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               TF_NUM_INTEROP_THREADS="1", TF_NUM_INTRAOP_THREADS="2",
               PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, str(tmp / "driver.py"), str(spec)]
        + [str(w) for w in watch], capture_output=True, text=True, env=env,
        cwd=str(REPO), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout[result.stdout.index("[{"):])


def _check(results, cases):
    problems = []
    for (name, _, expected, *_), r in zip(cases, results):
        # Warnings (a damaged checkpoint) may precede the error line.
        lines = [line for line in r["stderr"].splitlines()
                 if line.strip() and not line.startswith("WARNING:")]
        if expected is None:
            if r["code"] != 0:
                problems.append(f"{name}: setup failed: {r['stderr'][-800:]}")
            continue
        if r["code"] != 2:
            problems.append(f"{name}: exit {r['code']}: {r['stderr'][-800:]}")
        elif len(lines) != 1 or not lines[0].startswith("e2rnas "):
            problems.append(f"{name}: not one line: {r['stderr'][-800:]}")
        elif expected not in lines[0]:
            problems.append(f"{name}: {expected!r} not in {lines[0]!r}")
        if not r["intact"]:
            problems.append(f"{name}: the watched outputs changed")
    return problems


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    cases = _cases(tmp)
    # The first (setup) case writes `good`; watch it from the second on.
    (tmp / "good").mkdir()
    cases += [("train resume: every checkpoint damaged",
               ["train", f"--config={tmp / 'train_tiny.py'}",
                f"--workdir={tmp / 'good'}"], "no intact checkpoint")]
    results = _run_driver(tmp, cases[:1], [])
    _damage_checkpoints(tmp)
    results += _run_driver(tmp, cases[1:], [tmp / "good",
                                            tmp / "tfds_user"])
    if os.environ.get("E2RNAS_BAD_INPUTS_TABLE"):
        with open(os.environ["E2RNAS_BAD_INPUTS_TABLE"], "w") as f:
            for (name, *_), r in zip(cases, results):
                line = r["stderr"].strip().splitlines()
                f.write(f"| {name} | {r['code']} | "
                        f"{line[-1] if line else ''} |\n")
    return cases, results, tmp


def test_bad_command_lines_fail_in_one_line(cli_results):
    cases, results, _ = cli_results
    assert len(cases) >= 45
    problems = _check(results, cases)
    assert not problems, "\n".join(problems)


def test_damaged_checkpoint_warns_for_each_one(cli_results):
    cases, results, tmp = cli_results
    last = results[-1]
    assert "WARNING: checkpoint" not in last["stderr"].splitlines()[-1]
    assert "ckpt-1" in last["stderr"]
    # Nothing was written: the run's files are as the good run left them.
    assert (tmp / "good" / "summary.json").is_file()


def test_labels_out_of_range_are_refused():
    data = data_lib.ArrayData(np.zeros((3, 8, 8, 3), np.uint8),
                              np.array([0, 12, 1], np.int32))
    with pytest.raises(data_lib.DataError,
                       match=r"labels out of range: found 12, expected 0\.\.9"):
        data_lib._check_labels(data, 10, "train")


# ---------------------------------------------------------------------------
# Serving signatures of an exported SavedModel.


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from e2rnas_tf.serving import export as export_lib
    from e2rnas_tf.space import model as model_lib

    tmp = tmp_path_factory.mktemp("serving")
    net = model_lib.DerivedNetwork("DARTS_V2", channels=4, layers=3,
                                   num_classes=10, auxiliary=False)
    net.build((None, 8, 8, 3))
    first = export_lib.export(net, str(tmp), "m")
    files = {p: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in pathlib.Path(first).rglob("*") if p.is_file()}
    second = export_lib.export(net, str(tmp), "m")
    return tf.saved_model.load(second), first, second, files


def test_export_never_replaces_an_existing_version(exported):
    _, first, second, files = exported
    assert pathlib.Path(first).name == "1" and pathlib.Path(second).name == "2"
    for path, digest in files.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


SERVE = r"""
import json, sys
import numpy as np
import tensorflow as tf

fn = tf.saved_model.load(sys.argv[1]).signatures[sys.argv[2]]
value = np.zeros(json.loads(sys.argv[3]), sys.argv[4])
try:
    out = fn(images=tf.constant(value))
    print(json.dumps({k: list(v.shape) for k, v in out.items()}))
except Exception as e:  # noqa: BLE001 - the error is what we record
    print(json.dumps({"error": type(e).__name__,
                      "message": " ".join(str(e).split())[:400]}))
"""


def _serve(version_dir, signature, shape, dtype):
    """Calls a signature of the export in a fresh process (some bad inputs
    abort TensorFlow's C++ runtime) and returns its JSON line."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               TF_NUM_INTEROP_THREADS="1", TF_NUM_INTRAOP_THREADS="2")
    result = subprocess.run(
        [sys.executable, "-c", SERVE, version_dir, signature,
         json.dumps(shape), dtype], capture_output=True, text=True,
        env=env, timeout=300)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        return {"crash": result.returncode,
                "stderr": result.stderr[-1500:]}
    return json.loads(lines[-1])


# The serving functions check shape and batch size before the network runs
# (export._signature_fns); a wrong dtype is refused by the signature itself.
@pytest.mark.parametrize("signature,shape,dtype,message", [
    ("serving_default", [2, 8, 8, 3], "float32",
     "was expected to be a uint8 tensor but is a float tensor"),
    ("serving_default", [2, 9, 8, 3], "uint8",
     "is not compatible with expected shape [?,8,8,3]"),
    ("serving_float", [2, 8, 8, 1], "float32",
     "is not compatible with expected shape [?,8,8,3]"),
    ("serving_default", [0, 8, 8, 3], "uint8",
     "Expected at least one image. Received: an empty batch"),
    ("serving_default", [8, 8, 3], "uint8",
     "is not compatible with expected shape [?,8,8,3]"),
], ids=["wrong_dtype", "wrong_size", "wrong_channels", "empty_batch",
        "wrong_rank"])
def test_serving_signature_bad_inputs_raise(exported, signature, shape,
                                            dtype, message):
    result = _serve(exported[2], signature, shape, dtype)
    assert result.get("error") == "InvalidArgumentError", result
    assert message in result["message"]


def test_serving_signature_good_input_still_serves(exported):
    result = _serve(exported[2], "serving_default", [3, 8, 8, 3], "uint8")
    assert result == {"logits": [3, 10], "probabilities": [3, 10],
                      "classes": [3], "class_names": [3]}, result


# The encoded-image signature (serving_bytes): JPEG / PNG files.
SERVE_BYTES = r"""
import base64, json, sys
import tensorflow as tf

fn = tf.saved_model.load(sys.argv[1]).signatures["serving_bytes"]
files = [base64.b64decode(b) for b in json.loads(sys.argv[2])]
if sys.argv[3] == "uint8":
    value = tf.zeros([1, 8, 8, 3], tf.uint8)
else:
    value = tf.constant(files[0] if sys.argv[3] == "scalar" else files,
                        tf.string)
try:
    out = fn(image_bytes=value)
    print(json.dumps({k: list(v.shape) for k, v in out.items()}))
except Exception as e:  # noqa: BLE001 - the error is what we record
    print(json.dumps({"error": type(e).__name__,
                      "message": " ".join(str(e).split())[:600]}))
"""


def _image_file(height, width, fmt):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exported_any_size(tmp_path_factory):
    """A model that takes any image size: its serving_bytes cannot resize."""
    import keras

    from e2rnas_tf.serving import export as export_lib

    net = keras.Sequential([keras.Input((None, None, 3)),
                            keras.layers.Conv2D(2, 3),
                            keras.layers.GlobalAveragePooling2D(),
                            keras.layers.Dense(4)])
    return export_lib.export(net, str(tmp_path_factory.mktemp("any")), "any")


def _serve_bytes(version_dir, files, form="batch"):
    import base64

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               TF_NUM_INTEROP_THREADS="1", TF_NUM_INTRAOP_THREADS="2")
    result = subprocess.run(
        [sys.executable, "-c", SERVE_BYTES, version_dir,
         json.dumps([base64.b64encode(f).decode() for f in files]), form],
        capture_output=True, text=True, env=env, timeout=300)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        return {"crash": result.returncode,
                "stderr": result.stderr[-1500:]}
    return json.loads(lines[-1])


@pytest.mark.parametrize("files,form,message", [
    ([b"hello"], "batch",
     "Expected JPEG or PNG files in image_bytes. Received: image_bytes[0] "
     "is neither"),
    ("png_then_gif", "batch",
     "Expected JPEG or PNG files in image_bytes. Received: image_bytes[1] "
     "is neither"),
    ("truncated_jpeg", "batch", "Invalid JPEG data"),
    ("truncated_png", "batch", "Invalid PNG"),
    ([], "batch", "Expected at least one image. Received: an empty batch"),
    ("one_png", "scalar",
     "Shape of tensor image_bytes [] is not compatible with expected shape "
     "[?]"),
    ([], "uint8", "was expected to be a string tensor but is a uint8 tensor"),
], ids=["not_an_image", "gif", "truncated_jpeg", "truncated_png",
        "empty_batch", "scalar", "pixels"])
def test_serving_bytes_bad_inputs_raise(exported, files, form, message):
    if files == "truncated_jpeg":
        files = [_image_file(8, 8, "PNG"), _image_file(8, 8, "JPEG")[:40]]
    elif files == "truncated_png":
        files = [_image_file(8, 8, "PNG")[:30]]
    elif files == "png_then_gif":
        files = [_image_file(8, 8, "PNG"), _image_file(8, 8, "GIF")]
    elif files == "one_png":
        files = [_image_file(8, 8, "PNG")]
    result = _serve_bytes(exported[2], files, form)
    assert result.get("error") == "InvalidArgumentError", result
    assert message in result["message"], result


def test_serving_bytes_sizes(exported, exported_any_size):
    # A fixed-size model resizes other sizes.
    files = [_image_file(8, 8, "PNG"), _image_file(9, 8, "JPEG"),
             _image_file(3, 20, "PNG")]
    assert _serve_bytes(exported[2], files) == {
        "logits": [3, 10], "probabilities": [3, 10], "classes": [3],
        "class_names": [3]}
    # A model of any size cannot resize: one size per request.
    assert _serve_bytes(exported_any_size, files[:1] * 2)["logits"] == [2, 4]
    result = _serve_bytes(exported_any_size, files)
    assert result.get("error") == "InvalidArgumentError", result
    assert ("Expected images of one size (the model takes any size, so they "
            "are not resized). Received: image_bytes[1] is 9x8, "
            "image_bytes[0] is 8x8") in result["message"], result
