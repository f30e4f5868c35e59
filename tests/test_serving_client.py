"""Tests for tools/serving_client.py against the documented formats.

No model server runs here (the binary is not installable on this machine):
request building and response parsing are checked against TF Serving's
documented REST JSON and against the real gRPC protos, with tensors taken
from a real exported SavedModel.
"""

import importlib.util
import json
import os
import socket

import keras
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import json_format
from PIL import Image
from tensorflow.core.protobuf import saved_model_pb2

from e2rnas_tf import export as export_lib

_PATH = os.path.join(os.path.dirname(__file__), "..", "tools",
                     "serving_client.py")
_spec = importlib.util.spec_from_file_location("serving_client", _PATH)
sc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sc)

get_model_metadata_pb2 = pytest.importorskip(
    "tensorflow_serving.apis.get_model_metadata_pb2")
predict_pb2 = pytest.importorskip("tensorflow_serving.apis.predict_pb2")

SIZE = 8


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(5),
    ])
    model.build((None, SIZE, SIZE, 3))
    base = tmp_path_factory.mktemp("serving")
    version_dir = export_lib.export(model, str(base), "m")
    return model, version_dir


def _signature_defs(version_dir):
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(version_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    return proto.meta_graphs[0].signature_def


def _metadata_response(version_dir):
    """What the server answers to GetModelMetadata for this export."""
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    for name, sig in _signature_defs(version_dir).items():
        sig_map.signature_def[name].CopyFrom(sig)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = "m"
    response.model_spec.version.value = 1
    response.metadata["signature_def"].Pack(sig_map)
    return response


def test_load_images(tmp_path):
    rng = np.random.RandomState(0)
    exact = rng.randint(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)
    Image.fromarray(exact).save(tmp_path / "a.png")
    big = rng.randint(0, 256, (20, 12, 4)).astype(np.uint8)
    Image.fromarray(big, "RGBA").save(tmp_path / "b.png")
    gray = rng.randint(0, 256, (SIZE, SIZE)).astype(np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "c.png")
    images = sc.load_images(
        [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"], SIZE)
    assert images.shape == (3, SIZE, SIZE, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], exact)
    expected = np.asarray(Image.fromarray(big, "RGBA").convert("RGB").resize(
        (SIZE, SIZE), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(images[1], expected)
    np.testing.assert_array_equal(images[2], np.repeat(gray[..., None], 3,
                                                       axis=-1))
    assert sc.load_images([tmp_path / "b.png"], (6, 10)).shape == (1, 6, 10,
                                                                    3)
    (tmp_path / "bad.png").write_text("no image")
    with pytest.raises(ValueError, match="Cannot read image"):
        sc.load_images([tmp_path / "bad.png"], SIZE)


def test_rest_urls():
    assert (sc.rest_url("localhost", 8501, "e2rnas")
            == "http://localhost:8501/v1/models/e2rnas:predict")
    assert (sc.rest_url("h", 1, "m", version=3)
            == "http://h:1/v1/models/m/versions/3:predict")
    assert (sc.rest_url("h", 1, "m", verb="metadata")
            == "http://h:1/v1/models/m/metadata")
    assert sc.rest_url("h", 1, "m", verb=None) == "http://h:1/v1/models/m"


def test_build_rest_request_row_and_columnar():
    images = np.arange(2 * 2 * 3 * 3, dtype=np.uint8).reshape(2, 2, 3, 3)
    row = json.loads(json.dumps(sc.build_rest_request(images)))
    assert row["signature_name"] == "serving_default"
    assert len(row["instances"]) == 2
    np.testing.assert_array_equal(
        np.asarray([r["images"] for r in row["instances"]]), images)
    col = json.loads(json.dumps(sc.build_rest_request(
        images.astype(np.float32) / 255, "serving_float",
        layout="columnar")))
    assert set(col) == {"signature_name", "inputs"}
    np.testing.assert_allclose(np.asarray(col["inputs"]["images"]),
                               images / 255, rtol=1e-6)
    with pytest.raises(ValueError, match="layout"):
        sc.build_rest_request(images, layout="csv")
    with pytest.raises(ValueError, match="N, H, W, C"):
        sc.build_rest_request(images[0])


def test_parse_rest_response_documented_formats():
    # Row format, several named outputs: one object per instance.
    body = {"predictions": [
        {"classes": 1, "logits": [0.0, 2.0], "probabilities": [0.12, 0.88]},
        {"classes": 0, "logits": [1.0, -1.0], "probabilities": [0.88, 0.12]},
    ]}
    out = sc.parse_rest_response(body)
    np.testing.assert_array_equal(out["classes"], [1, 0])
    assert out["classes"].dtype == np.int64
    np.testing.assert_allclose(out["probabilities"], [[0.12, 0.88],
                                                      [0.88, 0.12]])
    assert out["logits"].dtype == np.float32
    # Row format, one output: bare values.
    out = sc.parse_rest_response({"predictions": [[0.3, 0.7]]})
    np.testing.assert_allclose(out["probabilities"], [[0.3, 0.7]])
    # Columnar, named and bare.
    out = sc.parse_rest_response({"outputs": {"logits": [[1.0, 2.0]],
                                              "classes": [1]}})
    np.testing.assert_array_equal(out["classes"], [1])
    out = sc.parse_rest_response({"outputs": [[0.5, 0.5]]},
                                 output_name="logits")
    assert list(out) == ["logits"]
    with pytest.raises(sc.ServingError, match="Server error: bad input"):
        sc.parse_rest_response({"error": "bad input"})
    with pytest.raises(sc.ServingError, match="Received keys"):
        sc.parse_rest_response({"result": 1})
    with pytest.raises(sc.ServingError, match="JSON object"):
        sc.parse_rest_response([1, 2])


def test_rest_metadata_shape_from_real_signature(exported):
    _, version_dir = exported
    # TF Serving answers GET .../metadata with the proto's JSON mapping,
    # keeping the proto field names (as in its REST API documentation).
    body = json_format.MessageToDict(_metadata_response(version_dir),
                                     preserving_proto_field_name=True)
    assert body["model_spec"]["version"] == "1"
    assert sc.signature_shape_from_rest_metadata(body) == (-1, SIZE, SIZE, 3)
    assert sc.signature_shape_from_rest_metadata(
        body, "serving_float") == (-1, SIZE, SIZE, 3)
    with pytest.raises(sc.ServingError, match="serving_other"):
        sc.signature_shape_from_rest_metadata(body, "serving_other")
    assert sc.image_size_from_shape((-1, SIZE, 6, 3)) == (SIZE, 6)
    with pytest.raises(sc.ServingError, match="--image_size"):
        sc.image_size_from_shape((-1, -1, -1, 3))


def test_grpc_request_runs_on_the_export(exported):
    model, version_dir = exported
    images = np.random.RandomState(1).randint(
        0, 256, (3, SIZE, SIZE, 3)).astype(np.uint8)
    request = sc.build_grpc_request(images, "m", version=2)
    assert isinstance(request, predict_pb2.PredictRequest)
    assert request.model_spec.name == "m"
    assert request.model_spec.signature_name == "serving_default"
    assert request.model_spec.version.value == 2
    # The request survives the wire and its tensor is what the signature
    # takes.
    wire = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    loaded = tf.saved_model.load(version_dir)
    signature = loaded.signatures[wire.model_spec.signature_name]
    feed = {k: tf.constant(tf.make_ndarray(v)) for k, v in wire.inputs.items()}
    assert feed["images"].dtype == tf.uint8
    outputs = signature(**feed)
    response = predict_pb2.PredictResponse()
    for key, value in outputs.items():
        response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
    parsed = sc.parse_grpc_response(predict_pb2.PredictResponse.FromString(
        response.SerializeToString()))
    logits = model(images.astype(np.float32) / 255).numpy()
    np.testing.assert_allclose(parsed["logits"], logits, atol=1e-5)
    np.testing.assert_array_equal(parsed["classes"], logits.argmax(-1))
    best = [r[0][0] for r in sc.top_k(parsed, 1)]
    assert best == list(logits.argmax(-1))


def test_grpc_metadata(exported):
    _, version_dir = exported
    request = sc.build_grpc_metadata_request("m", version=1)
    assert list(request.metadata_field) == ["signature_def"]
    assert request.model_spec.version.value == 1
    response = _metadata_response(version_dir)
    assert sc.signature_shape_from_grpc_metadata(response) == (
        -1, SIZE, SIZE, 3)
    with pytest.raises(sc.ServingError, match="signature_def"):
        sc.signature_shape_from_grpc_metadata(
            get_model_metadata_pb2.GetModelMetadataResponse())


def test_top_k_and_format():
    probs = np.array([[0.1, 0.6, 0.3], [0.25, 0.25, 0.5]])
    result = sc.top_k({"probabilities": probs}, 2, ["cat", "dog", "ship"])
    assert result == [[(1, "dog", 0.6), (2, "ship", 0.3)],
                      [(2, "ship", 0.5), (0, "cat", 0.25)]]
    logits = np.log(probs)
    from_logits = sc.top_k({"logits": logits}, 5)
    assert [[c for c, _, _ in r] for r in from_logits] == [[1, 2, 0],
                                                           [2, 0, 1]]
    np.testing.assert_allclose([p for _, _, p in from_logits[0]],
                               [0.6, 0.3, 0.1])
    text = sc.format_results(["a.png", "b.png"], result)
    assert text.splitlines()[0] == "a.png"
    assert "1. dog (1)" in text and "0.6000" in text
    with pytest.raises(ValueError, match="class names"):
        sc.top_k({"probabilities": probs}, 1, ["x"])
    with pytest.raises(sc.ServingError, match="probabilities"):
        sc.top_k({"classes": np.array([1])})


def test_read_class_names(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("cat\ndog\n\n")
    assert sc.read_class_names(str(path)) == ["cat", "dog"]
    assert sc.read_class_names("a, b,c") == ["a", "b", "c"]
    assert sc.read_class_names(None) is None


def test_cli_reports_an_unreachable_server(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(image)
    # A loopback port nobody listens on.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = sc.main([str(image), "--host=127.0.0.1", f"--rest_port={port}",
                    "--image_size=4", "--timeout=2"])
    assert code == 2
    assert "Cannot reach http://127.0.0.1" in capsys.readouterr().err
