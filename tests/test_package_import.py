"""`import e2rnas_tf` is all a fresh process needs to load a `.keras` file.

Keras rebuilds custom classes only if they were registered in the loading
process; these tests check that the package import registers every one of
them, without the heavy optional modules, each in a fresh subprocess.
"""

import json
import subprocess
import sys

import keras
import numpy as np

from e2rnas_tf.space import model as model_lib

LOAD = r"""
import sys
import numpy as np
import e2rnas_tf, keras

model = keras.saving.load_model(sys.argv[1])
images = np.load(sys.argv[2])
np.save(sys.argv[3], keras.ops.convert_to_numpy(model(images, training=False)))
print(type(model).__name__)
"""

REGISTERED = r"""
import importlib, inspect, json, pkgutil, sys
import keras

import e2rnas_tf

at_import = set(keras.saving.get_custom_objects())
loaded = sorted(m for m in sys.modules
                if m.split(".")[0] in ("tensorflow_datasets", "cleverhans")
                or m in ("e2rnas_tf.cli", "e2rnas_tf.plots", "e2rnas_tf.data",
                         "e2rnas_tf.training.train", "e2rnas_tf.search.run"))
# Now every module of the package: which of its Keras classes are
# registered at all, and were they registered by the package import alone?
for info in pkgutil.iter_modules(e2rnas_tf.__path__):
    if info.name != "__main__":  # that one runs the command line
        importlib.import_module(f"e2rnas_tf.{info.name}")
registered = {}
for name, obj in keras.saving.get_custom_objects().items():
    if (inspect.isclass(obj) and obj.__module__.startswith("e2rnas_tf.")):
        registered[name] = obj.__module__
print(json.dumps({"loaded": loaded,
                  "missing": sorted(set(registered) - at_import),
                  "registered": registered}))
"""


def test_fresh_process_loads_a_derived_network(tmp_path, subprocess_env):
    keras.utils.set_random_seed(0)
    net = model_lib.DerivedNetwork(
        "E2RNAS", channels=4, num_classes=3, layers=3, auxiliary=True,
        mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    net.build((None, 8, 8, 3))
    images = np.random.RandomState(0).uniform(
        size=(4, 8, 8, 3)).astype(np.float32)
    # Batch statistics different from the initial ones: inference mode
    # after loading must use the saved moving averages.
    net(images, training=True)
    expected = keras.ops.convert_to_numpy(net(images, training=False))
    path = tmp_path / "model_best.keras"
    net.save(str(path))
    np.save(tmp_path / "images.npy", images)

    result = subprocess.run(
        [sys.executable, "-c", LOAD, str(path), str(tmp_path / "images.npy"),
         str(tmp_path / "out.npy")],
        cwd=tmp_path, env=subprocess_env, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "DerivedNetwork"
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected,
                               rtol=1e-5, atol=1e-5)


def test_package_import_registers_every_layer_and_nothing_heavy(
        subprocess_env, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", REGISTERED], cwd=tmp_path, env=subprocess_env,
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["missing"] == [], report
    assert report["loaded"] == [], report
    # The check above means something only if it saw the package's layers.
    assert {"e2rnas_tf>DerivedNetwork", "e2rnas_tf>SearchNetwork",
            "e2rnas_tf>FusedSearchCell", "e2rnas_tf>SepConv"} <= set(
                report["registered"])
