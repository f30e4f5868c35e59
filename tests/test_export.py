"""Tests for e2rnas_tf.serving.export: the SavedModel as TF Serving would load it."""

import base64
import io
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from PIL import Image
from tensorflow_serving.config import model_server_config_pb2

from e2rnas_tf import cli
from e2rnas_tf import data as data_lib
from e2rnas_tf.runs import checkpoints as ckpt_lib
from e2rnas_tf.serving import export as export_lib
from e2rnas_tf.space import costs, genotypes
from e2rnas_tf.space import model as model_lib

SIZE = 8
CLASSES = 3


def _tiny_model(seed=0):
    """A tiny DerivedNetwork: [0, 1] images -> logits, normalised inside."""
    keras.utils.set_random_seed(seed)
    model = model_lib.DerivedNetwork(
        "DARTS_V2", channels=4, num_classes=CLASSES, layers=3,
        auxiliary=True, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    model.build((None, SIZE, SIZE, 3))
    # Non-trivial batch-norm statistics, so inference mode matters.
    model(tf.random.uniform([8, SIZE, SIZE, 3], seed=seed), training=True)
    return model


def _images(n=4, seed=1):
    rng = np.random.RandomState(seed)
    return rng.randint(0, 256, size=(n, SIZE, SIZE, 3)).astype(np.uint8)


def _encode(image, fmt, **kwargs):
    """uint8 pixels -> the bytes of an image file, encoded by PIL."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny():
    """One model shared by the tests that do not depend on its weights."""
    return _tiny_model()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny):
    """One export shared by the loading tests (tracing dominates cost)."""
    base = tmp_path_factory.mktemp("serving")
    model = tiny
    version_dir = export_lib.export(
        model, str(base), "tiny", metadata={"genotype": "test"})
    return model, str(base), version_dir


def _model_config(base):
    """models.config parsed with TF Serving's own proto: {name: entry}."""
    with open(os.path.join(base, "models.config")) as f:
        config = text_format.Parse(
            f.read(), model_server_config_pb2.ModelServerConfig())
    return {c.name: c for c in config.model_config_list.config}


def _policy(entry):
    assert entry.model_version_policy.WhichOneof("policy_choice") == \
        "specific"
    return list(entry.model_version_policy.specific.versions)


def _reference(model, images_uint8):
    logits = model(images_uint8.astype(np.float32) / 255.0).numpy()
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return logits, e / e.sum(-1, keepdims=True), logits.argmax(-1)


def test_layout_metadata_and_model_config(exported):
    _, base, version_dir = exported
    assert version_dir == os.path.join(base, "tiny", "1")
    assert os.path.isfile(os.path.join(version_dir, "saved_model.pb"))
    assert os.path.isdir(os.path.join(version_dir, "variables"))
    # No temporary directory is left beside the version.
    assert sorted(os.listdir(os.path.join(base, "tiny"))) == ["1"]
    with open(os.path.join(version_dir, export_lib.METADATA_PATH)) as f:
        meta = json.load(f)
    assert meta["genotype"] == "test"
    assert meta["version"] == 1
    assert meta["image_size"] == [SIZE, SIZE]
    assert meta["tensorflow_version"] == tf.__version__
    assert meta["keras_version"] == keras.__version__
    # No class names known: the indices, and the metadata says so.
    assert meta["class_names"] == ["0", "1", "2"]
    assert "no class names" in meta["class_names_note"]
    assert set(meta["signatures"]) == {"serving_default", "serving_float",
                                       "serving_bytes", "outputs"}
    entries = _model_config(base)
    assert list(entries) == ["tiny"]
    assert entries["tiny"].base_path == "/models/tiny"
    assert entries["tiny"].model_platform == "tensorflow"
    assert _policy(entries["tiny"]) == [1]
    assert dict(entries["tiny"].version_labels) == {}


def test_tf2_load_matches_keras(exported):
    model, _, version_dir = exported
    images = _images()
    logits, probs, classes = _reference(model, images)
    loaded = tf.saved_model.load(version_dir)
    assert set(loaded.signatures) == {"serving_default", "serving_float",
                                      "serving_bytes"}
    out = loaded.signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(out["logits"].numpy(), logits, atol=1e-5)
    np.testing.assert_allclose(out["probabilities"].numpy(), probs,
                               atol=1e-5)
    assert out["classes"].dtype == tf.int64
    np.testing.assert_array_equal(out["classes"].numpy(), classes)
    assert out["class_names"].dtype == tf.string
    assert [n.decode() for n in out["class_names"].numpy()] == \
        [str(c) for c in classes]
    out = loaded.signatures["serving_float"](
        images=tf.constant(images.astype(np.float32) / 255.0))
    np.testing.assert_allclose(out["logits"].numpy(), logits, atol=1e-5)


def test_tf1_session_loader_matches_keras(exported):
    """The loading path of tensorflow_model_server (a TF1 session)."""
    model, _, version_dir = exported
    images = _images(n=3, seed=2)
    logits, probs, classes = _reference(model, images)
    with tf.compat.v1.Session(graph=tf.Graph()) as sess:
        meta_graph = tf.compat.v1.saved_model.loader.load(
            sess, ["serve"], version_dir)
        sig = meta_graph.signature_def["serving_default"]
        fetches = {k: v.name for k, v in sig.outputs.items()}
        result = sess.run(fetches,
                          feed_dict={sig.inputs["images"].name: images})
        sig_f = meta_graph.signature_def["serving_float"]
        result_f = sess.run(
            sig_f.outputs["logits"].name,
            feed_dict={sig_f.inputs["images"].name:
                       images.astype(np.float32) / 255.0})
        sig_b = meta_graph.signature_def["serving_bytes"]
        result_b = sess.run(
            {k: v.name for k, v in sig_b.outputs.items()},
            feed_dict={sig_b.inputs["image_bytes"].name:
                       [_encode(image, "PNG") for image in images]})
    np.testing.assert_allclose(result["logits"], logits, atol=1e-5)
    np.testing.assert_allclose(result["probabilities"], probs, atol=1e-5)
    np.testing.assert_array_equal(result["classes"], classes)
    np.testing.assert_allclose(result_f, logits, atol=1e-5)
    np.testing.assert_allclose(result_b["logits"], logits, atol=1e-5)
    assert list(result_b["class_names"]) == [str(c).encode()
                                             for c in classes]


def test_saved_model_cli_shows_signatures(exported):
    _, _, version_dir = exported
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if not os.path.exists(cli):
        pytest.skip("saved_model_cli is not installed next to python")
    # One call (each start-up imports TensorFlow): the --all listing.
    out = subprocess.run(
        [cli, "show", "--dir", version_dir, "--all"],
        capture_output=True, text=True, check=True).stdout
    blocks = out.split("signature_def['")
    sigs = {b.split("']")[0]: b for b in blocks[1:]}
    assert {"serving_default", "serving_float", "serving_bytes"} <= set(sigs)
    for name, key, dtype, shape in (
            ("serving_default", "images", "DT_UINT8", f"(-1, {SIZE}, {SIZE}, 3)"),
            ("serving_float", "images", "DT_FLOAT", f"(-1, {SIZE}, {SIZE}, 3)"),
            ("serving_bytes", "image_bytes", "DT_STRING", "(-1)")):
        inputs, outputs = sigs[name].split("output(s):")
        assert f"inputs['{key}']" in inputs
        assert dtype in inputs
        assert shape in inputs
        assert f"name: {name}_{key}:0" in inputs
        for key, out_dtype, shape in (
                ("logits", "DT_FLOAT", f"(-1, {CLASSES})"),
                ("probabilities", "DT_FLOAT", f"(-1, {CLASSES})"),
                ("classes", "DT_INT64", "(-1)"),
                ("class_names", "DT_STRING", "(-1)")):
            block = outputs.split(f"outputs['{key}']")[1].split("name:")[0]
            assert out_dtype in block and shape in block, (name, key, block)
        assert "tensorflow/serving/predict" in outputs


SERVE_BYTES = r"""
import base64, json, sys
import numpy as np
import tensorflow as tf

signatures = tf.saved_model.load(sys.argv[1]).signatures
with open(sys.argv[2]) as f:
    request = json.load(f)
files = [base64.b64decode(b) for b in request["files"]]
pixels = np.asarray(request["pixels"], np.uint8)
out_b = signatures["serving_bytes"](image_bytes=tf.constant(files))
out_u = signatures["serving_default"](images=tf.constant(pixels))
print(json.dumps({
    name: {k: (v.numpy().astype(str) if v.dtype == tf.string
               else v.numpy()).tolist() for k, v in out.items()}
    for name, out in (("bytes", out_b), ("uint8", out_u))}))
"""


def test_bytes_signature_equals_uint8_on_jpeg_and_png(exported, tmp_path,
                                                      subprocess_env):
    """serving_bytes on real JPEG/PNG files, in a fresh process, computes
    what serving_default computes on the pixels PIL decodes from them (the
    training data's decoding) and, for other sizes, on the pixels resized
    as the training data are (data.resize_images)."""
    _, _, version_dir = exported
    rng = np.random.RandomState(7)
    exact = rng.randint(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)
    # A smooth image, so that JPEG keeps it recognisable.
    ramp = np.linspace(0, 255, SIZE * SIZE * 3).reshape(SIZE, SIZE, 3)
    large = rng.randint(0, 256, (13, 11, 3)).astype(np.uint8)
    gray = rng.randint(0, 256, (SIZE, SIZE)).astype(np.uint8)
    rgba = rng.randint(0, 256, (SIZE, SIZE, 4)).astype(np.uint8)
    files = [
        _encode(exact, "PNG"),
        _encode(ramp.astype(np.uint8), "JPEG", quality=90),
        _encode(exact, "JPEG", quality=75, subsampling=2),
        _encode(large, "PNG"),
        _encode(large, "JPEG", quality=95),
        _encode(gray, "PNG"),
        _encode(rgba, "PNG"),
    ]
    pixels = []
    for data in files:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))
        pixels.append(data_lib.resize_images(array[None], SIZE)[0])
    request = tmp_path / "request.json"
    request.write_text(json.dumps({
        "files": [base64.b64encode(f).decode() for f in files],
        "pixels": np.stack(pixels).tolist()}))
    result = subprocess.run(
        [sys.executable, "-c", SERVE_BYTES, version_dir, str(request)],
        env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(out["bytes"]) == {"logits", "probabilities", "classes",
                                 "class_names"}
    np.testing.assert_allclose(out["bytes"]["logits"], out["uint8"]["logits"],
                               atol=1e-5)
    np.testing.assert_allclose(out["bytes"]["probabilities"],
                               out["uint8"]["probabilities"], atol=1e-6)
    assert out["bytes"]["classes"] == out["uint8"]["classes"]
    assert out["bytes"]["class_names"] == [str(c) for c in
                                           out["uint8"]["classes"]]


def test_versions_increment_and_existing_untouched(tmp_path, tiny):
    base = tmp_path / "base"
    model_dir = base / "tiny"
    # A version someone else wrote, with a file we can check is untouched.
    (model_dir / "7").mkdir(parents=True)
    (model_dir / "7" / "marker").write_text("keep")
    (model_dir / "not_a_version").mkdir()
    model = tiny
    first = export_lib.export(model, str(base), "tiny")
    second = export_lib.export(model, str(base), "tiny")
    assert os.path.basename(first) == "8"
    assert os.path.basename(second) == "9"
    assert (model_dir / "7" / "marker").read_text() == "keep"
    assert sorted(os.listdir(model_dir)) == ["7", "8", "9", "not_a_version"]
    # Served: the versions holding a SavedModel, not "7" (no saved_model.pb).
    assert _policy(_model_config(base)["tiny"]) == [8, 9]


def test_fresh_base_starts_at_one_then_two(tmp_path, tiny):
    model = tiny
    v1 = export_lib.export(model, str(tmp_path), "m")
    v2 = export_lib.export(model, str(tmp_path), "m")
    assert [os.path.basename(v) for v in (v1, v2)] == ["1", "2"]
    assert export_lib.next_version(str(tmp_path / "m")) == 3
    # Both versions are served, not only the latest (TF Serving's default).
    assert _policy(_model_config(tmp_path)["m"]) == [1, 2]


def test_failure_mid_export_leaves_no_partial_version(tmp_path, tiny,
                                                      monkeypatch):
    base = tmp_path / "base"
    model = tiny
    export_lib.export(model, str(base), "tiny")
    before = sorted(os.listdir(base / "tiny"))
    config_before = (base / "models.config").read_text()

    def failing_write(model, path, *args):
        # Half a SavedModel on disk, then a crash.
        with open(os.path.join(path, "saved_model.pb"), "wb") as f:
            f.write(b"partial")
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(export_lib, "_write_savedmodel", failing_write)
    with pytest.raises(RuntimeError, match="simulated"):
        export_lib.export(model, str(base), "tiny")
    assert sorted(os.listdir(base / "tiny")) == before == ["1"]
    assert (base / "models.config").read_text() == config_before


def _fake_versions(model_dir, *versions):
    for v in versions:
        (model_dir / str(v)).mkdir(parents=True, exist_ok=True)
        (model_dir / str(v) / "saved_model.pb").write_bytes(b"")


def test_models_config_keeps_other_models(tmp_path):
    base = tmp_path
    _fake_versions(base / "tiny", 1)
    (base / "models.config").write_text(
        "model_config_list {\n"
        "  config {\n"
        "    name: 'other'\n"
        "    base_path: '/models/other'\n"
        "    model_platform: 'tensorflow'\n"
        "    model_version_policy { specific { versions: 3 } }\n"
        "  }\n"
        "}\n")
    export_lib.update_model_config(str(base), "tiny", "/models/tiny")
    export_lib.update_model_config(str(base), "tiny", "/models/tiny")

    entries = _model_config(base)
    assert sorted(entries) == ["other", "tiny"]
    assert entries["other"].base_path == "/models/other"
    assert list(entries["other"].model_version_policy.specific.versions) == [3]
    assert entries["tiny"].base_path == "/models/tiny"
    assert entries["tiny"].model_platform == "tensorflow"
    assert _policy(entries["tiny"]) == [1]


def test_version_labels(tmp_path):
    base = tmp_path
    _fake_versions(base / "m", 1, 2)
    export_lib.update_model_config(
        str(base), "m", "/models/m", labels={"stable": 1, "canary": 2})
    entry = _model_config(base)["m"]
    assert _policy(entry) == [1, 2]
    assert dict(entry.version_labels) == {"stable": 1, "canary": 2}
    # A new version: labels kept; moving one label leaves the others; the
    # base path is kept when not given.
    _fake_versions(base / "m", 3)
    export_lib.update_model_config(str(base), "m", labels={"canary": 3})
    entry = _model_config(base)["m"]
    assert _policy(entry) == [1, 2, 3]
    assert dict(entry.version_labels) == {"stable": 1, "canary": 3}
    assert entry.base_path == "/models/m"
    # A label must name a served version, and be a usable name; the file
    # is left as it was.
    before = (base / "models.config").read_text()
    with pytest.raises(export_lib.ExportError, match="served versions"):
        export_lib.update_model_config(str(base), "m", labels={"x": 9})
    for bad in ("1st", "a/b", "a:b", ""):
        with pytest.raises(export_lib.ExportError, match="version labels"):
            export_lib.update_model_config(str(base), "m", labels={bad: 1})
    assert (base / "models.config").read_text() == before


def test_export_labels_the_new_version(tmp_path, tiny):
    export_lib.export(tiny, str(tmp_path), "m", version_labels=["stable"])
    export_lib.export(tiny, str(tmp_path), "m", version_labels=["canary"])
    entry = _model_config(tmp_path)["m"]
    assert _policy(entry) == [1, 2]
    assert dict(entry.version_labels) == {"stable": 1, "canary": 2}
    with pytest.raises(export_lib.ExportError, match="version labels"):
        export_lib.export(tiny, str(tmp_path), "m", version_labels=["a b"])
    assert sorted(os.listdir(tmp_path / "m")) == ["1", "2"]


def test_serving_root(tmp_path, tiny):
    export_lib.export(tiny, str(tmp_path), "a", serving_root="/srv/tf/")
    export_lib.export(tiny, str(tmp_path), "b", serving_root=None)
    entries = _model_config(tmp_path)
    assert entries["a"].base_path == "/srv/tf/a"
    assert entries["b"].base_path == str(tmp_path / "b")
    with pytest.raises(export_lib.ExportError, match="serving base path"):
        export_lib.export(tiny, str(tmp_path), "c", serving_root="")
    assert not (tmp_path / "c").exists()


def test_class_names(tmp_path, tiny):
    version_dir = export_lib.export(tiny, str(tmp_path), "m",
                                    class_names=["cat", "dog", "ship"])
    meta = json.loads(open(os.path.join(
        version_dir, export_lib.METADATA_PATH)).read())
    assert meta["class_names"] == ["cat", "dog", "ship"]
    assert "class_names_note" not in meta
    images = _images(n=6, seed=4)
    _, _, classes = _reference(tiny, images)
    out = tf.saved_model.load(version_dir).signatures["serving_default"](
        images=tf.constant(images))
    assert [n.decode() for n in out["class_names"].numpy()] == [
        ["cat", "dog", "ship"][c] for c in classes]
    # Not one name per class: refused, nothing written.
    config_before = (tmp_path / "models.config").read_text()
    with pytest.raises(export_lib.ExportError,
                       match="Expected 3 class names"):
        export_lib.export(tiny, str(tmp_path), "m", class_names=["a", "b"])
    for bad in ("abc", [], ["a", "", "c"], ["a", 2, "c"]):
        with pytest.raises(export_lib.ExportError,
                           match="non-empty strings"):
            export_lib.export(tiny, str(tmp_path), "m", class_names=bad)
    assert sorted(os.listdir(tmp_path / "m")) == ["1"]
    assert (tmp_path / "models.config").read_text() == config_before


def test_damaged_models_config_refused_before_writing(tmp_path, tiny):
    (tmp_path / "models.config").write_text("model_config_list { oops")
    with pytest.raises(export_lib.ExportError,
                       match="not a valid TF Serving model config"):
        export_lib.export(tiny, str(tmp_path), "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("name", ["", "a/b", "../x", ".hidden", "a\\b"])
def test_bad_model_name(tmp_path, tiny, name):
    with pytest.raises(ValueError, match="model name"):
        export_lib.export(tiny, str(tmp_path), name)


def test_unwritable_export_base(tmp_path, tiny):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError):
        export_lib.export(tiny, str(blocker / "sub"), "m")
    with pytest.raises(ValueError, match="not a directory"):
        export_lib.export(tiny, str(blocker), "m")


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ckpt_lib.resolve_model_file(str(tmp_path / "missing.keras"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="Expected a .keras"):
        ckpt_lib.resolve_model_file(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="model_best.keras"):
        ckpt_lib.resolve_model_file(str(tmp_path))
    (tmp_path / "broken.keras").write_text("not a zip")
    with pytest.raises(ValueError, match="not a loadable"):
        ckpt_lib.load_model_file(str(tmp_path / "broken.keras"))


def _args(**kw):
    base = dict(command="export", workdir=None, overwrite=False,
                genotype=None, checkpoint=None, export_base=None,
                model_name="e2rnas", output=None, extra=(),
                serving_base_path="/models")
    base.update(kw)
    return cli.Args(**base)


def test_main_exports_a_training_workdir(tmp_path, capsys):
    run = tmp_path / "train_run"
    run.mkdir()
    model = _tiny_model(seed=3)
    model.save(str(run / "model_best.keras"))
    genotypes.PUBLISHED["DARTS_V2"].save(str(run / "genotype.json"))
    (run / "config.json").write_text(json.dumps({"seed": 0, "epochs": 1}))
    (run / "summary.json").write_text(json.dumps(
        {"params": 1234, "macs": 5678, "best_accuracy": 0.5,
         "class_names": ["cat", "dog", "ship"]}))
    (run / "evaluation.json").write_text(json.dumps(
        {"clean_accuracy": 0.6, "robust_accuracy": {"fgsm@2": 0.3}}))
    base = tmp_path / "serving"
    code = export_lib.main(None, _args(checkpoint=str(run),
                                       export_base=str(base),
                                       model_name="cifar",
                                       serving_base_path="/srv/models"))
    assert code == 0
    out = capsys.readouterr().out
    assert (f"docker run -p 8501:8501 -p 8500:8500 -v {base}:/srv/models "
            "-t tensorflow/serving "
            "--model_config_file=/srv/models/models.config") in out
    assert _model_config(base)["cifar"].base_path == "/srv/models/cifar"
    version_dir = base / "cifar" / "1"
    meta = json.loads((version_dir / export_lib.METADATA_PATH).read_text())
    # The training run's class names (summary.json) name the outputs.
    assert meta["class_names"] == ["cat", "dog", "ship"]
    assert meta["class_names_from"] == "summary.json"
    assert "class_names_note" not in meta
    assert meta["genotype"] == genotypes.PUBLISHED["DARTS_V2"].to_dict()
    assert meta["config"] == {"seed": 0, "epochs": 1}
    assert meta["params"] == 1234 and meta["flops"] == 5678
    # evaluation.json wins over summary.json for the accuracy.
    assert meta["clean_accuracy"] == 0.6
    assert meta["robust_accuracy"] == {"fgsm@2": 0.3}
    assert meta["checkpoint"] == str(run / "model_best.keras")
    # The export of the reloaded checkpoint computes what the model did.
    images = _images(n=2, seed=5)
    logits, _, _ = _reference(model, images)
    loaded = tf.saved_model.load(str(version_dir))
    out = loaded.signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(out["logits"].numpy(), logits, atol=1e-5)
    assert [n.decode() for n in out["class_names"].numpy()] == [
        ["cat", "dog", "ship"][c] for c in logits.argmax(-1)]


def test_serve_command_names_the_label_flag(tmp_path):
    _fake_versions(tmp_path / "m", 1)
    export_lib.update_model_config(str(tmp_path), "m", "/models/m")
    command = export_lib.serve_command(str(tmp_path))
    assert command.endswith("--model_config_file=/models/models.config")
    # TF Serving refuses labels of versions not yet loaded (all of them at
    # start-up) unless told otherwise.
    export_lib.update_model_config(str(tmp_path), "m", labels={"stable": 1})
    assert export_lib.serve_command(str(tmp_path)).endswith(
        " --allow_version_labels_for_unavailable_models=true")
    assert export_lib.serve_command(str(tmp_path), "gs://b/m").startswith(
        "tensorflow_model_server --model_config_file=gs://b/m/models.config")


def test_params_without_run_files_exclude_aux_head(tmp_path, tiny):
    model = tiny
    path = tmp_path / "m.keras"
    meta = export_lib.checkpoint_metadata(str(path), model)
    assert meta["params"] == costs.count_params(model)
    assert meta["params"] < sum(int(np.prod(v.shape))
                                for v in model.trainable_variables)
    assert meta["genotype"] == model.genotype.to_dict()


def test_main_errors(tmp_path):
    with pytest.raises(ValueError, match="--export_base"):
        export_lib.main(None, _args(checkpoint=str(tmp_path)))
    with pytest.raises(ValueError, match="--checkpoint"):
        export_lib.main(None, _args(export_base=str(tmp_path)))
    with pytest.raises(ValueError, match="model name"):
        export_lib.main(None, _args(checkpoint=str(tmp_path),
                                    export_base=str(tmp_path),
                                    model_name="a/b"))
