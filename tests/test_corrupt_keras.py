"""Damaged ``.keras`` files given to ``e2rnas evaluate`` / ``e2rnas export``
(`runs.checkpoints.load_model_file`) fail with one line that says what is wrong with
the file (Keras itself says "File not found" for most of them)."""

import io
import os
import zipfile

import keras
import numpy as np
import pytest

from e2rnas_tf import cli, config_lib
from e2rnas_tf.runs import checkpoints as ckpt_lib
from e2rnas_tf.serving import export as export_lib
from e2rnas_tf.training import evaluate


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A small model saved by Keras, and the bytes of its file."""
    path = tmp_path_factory.mktemp("keras") / "good.keras"
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    model.save(path)
    return path, path.read_bytes(), model


def _rezip(raw, change):
    """The archive ``raw`` with its members passed through ``change(name,
    data)`` (None drops a member)."""
    source = zipfile.ZipFile(io.BytesIO(raw))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name in source.namelist():
            data = change(name, source.read(name))
            if data is not None:
                archive.writestr(name, data)
    return out.getvalue()


def _flip_weight_bytes(raw):
    """The archive with bytes inside the stored weights inverted (the zip
    structure intact, so only the CRC tells)."""
    start = raw.index(b"\x89HDF")
    damaged = bytearray(raw)
    for i in range(start + 200, start + 400):
        damaged[i] ^= 0xFF
    return bytes(damaged)


CASES = {
    "empty": (lambda raw: b"", "the file is empty"),
    "truncated": (lambda raw: raw[:len(raw) // 2],
                  "a truncated or damaged zip archive"),
    "zip_magic_garbage": (lambda raw: b"PK\x03\x04 not a zip",
                          "a truncated or damaged zip archive (14 bytes, no "
                          "zip directory at its end)"),
    "not_a_zip": (lambda raw: b"hello, I am a text file\n",
                  "not a zip archive (24 bytes; `model.save` writes .keras "
                  "files as zip archives)"),
    "zip_without_config": (
        lambda raw: _rezip(raw, lambda n, d: None if n == "config.json"
                           else d),
        "the zip archive holds no config.json, so Keras did not write it"),
    "zip_without_weights": (
        lambda raw: _rezip(raw, lambda n, d: None if n.startswith(
            "model.weights") else d),
        "the zip archive holds no model.weights.h5"),
    "config_not_json": (
        lambda raw: _rezip(raw, lambda n, d: b"{not json" if n ==
                           "config.json" else d),
        "its config.json is not valid JSON: Expecting property name"),
    "weights_crc_mismatch": (_flip_weight_bytes,
                             "model.weights.h5 in the zip archive is damaged "
                             "(CRC mismatch)"),
    "weights_not_hdf5": (
        lambda raw: _rezip(raw, lambda n, d: b"garbage" * 10 if
                           n.startswith("model.weights") else d),
        "its weights file cannot be read: Unable to synchronously open "
        "file (file signature not found)"),
    "unknown_layer_class": (
        lambda raw: _rezip(raw, lambda n, d: d.replace(
            b'"Sequential"', b'"NoSuchModel"') if n == "config.json"
            else d),
        "Could not deserialize 'keras.NoSuchModel'"),
}


def test_the_good_file_loads(good):
    path, _, model = good
    loaded = ckpt_lib.load_model_file(str(path))
    x = np.random.default_rng(0).random((2, 4, 4, 3)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_keras_file_gets_a_specific_line(good, tmp_path, case):
    _, raw, _ = good
    damage, reason = CASES[case]
    path = tmp_path / f"{case}.keras"
    path.write_bytes(damage(raw))
    with pytest.raises(ckpt_lib.ModelFileError) as error:
        ckpt_lib.load_model_file(str(path))
    message = str(error.value)
    assert message.startswith(f"{path} is not a loadable Keras model file: ")
    assert reason in message, message
    assert "\n" not in message and "File not found" not in message


def _args(**kwargs):
    fields = dict(command="evaluate", workdir=None, overwrite=False,
                  genotype=None, checkpoint=None, export_base=None,
                  model_name="e2rnas", output=None, extra=())
    fields.update(kwargs)
    return cli.Args(**fields)


def test_evaluate_and_export_refuse_a_truncated_file(good, tmp_path):
    # Both commands go through load_checkpoint, before writing anything.
    _, raw, _ = good
    path = tmp_path / "run" / "model_best.keras"
    path.parent.mkdir()
    path.write_bytes(raw[:len(raw) // 3])
    config = config_lib.train_config()
    config.data.image_size = 4
    config.lock()
    expected = (f"{path} is not a loadable Keras model file: a truncated or "
                "damaged zip archive")
    with pytest.raises(ValueError, match="^" + expected):
        evaluate.main(config, _args(checkpoint=str(path.parent),
                                    workdir=str(tmp_path / "out")))
    with pytest.raises(ValueError, match="^" + expected):
        export_lib.main(config, _args(command="export",
                                      checkpoint=str(path),
                                      export_base=str(tmp_path / "serving")))
    assert not os.path.exists(tmp_path / "out" / "evaluation.json")
    assert not os.path.exists(tmp_path / "serving" / "e2rnas")
    assert sorted(os.listdir(path.parent)) == ["model_best.keras"]
