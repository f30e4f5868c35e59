"""Tests for e2rnas_tf.serving.client (`e2rnas-serving-client`) against
the documented formats.

No model server runs here (the binary is not installable on this machine):
request building and response parsing are checked against TF Serving's
documented REST JSON and against the real gRPC protos, with tensors taken
from a real exported SavedModel.
"""

import base64
import io
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

from e2rnas_tf.serving import client as sc
from e2rnas_tf.serving import export as export_lib

get_model_metadata_pb2 = pytest.importorskip(
    "tensorflow_serving.apis.get_model_metadata_pb2")
predict_pb2 = pytest.importorskip("tensorflow_serving.apis.predict_pb2")

SIZE = 8
NAMES = ["airplane", "bird", "cat", "deer", "ship"]


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
    version_dir = export_lib.export(model, str(base), "m",
                                    class_names=NAMES)
    return model, version_dir


def _png(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def _b64_decode_like_tf_serving(value):
    """What TF Serving's REST layer does with a DT_STRING input value."""
    assert set(value) == {"b64"}, value
    return base64.b64decode(value["b64"], validate=True)


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


def test_read_image_files(tmp_path):
    rng = np.random.RandomState(0)
    image = rng.randint(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(image).save(tmp_path / "b.jpg", quality=90)
    Image.fromarray(image).save(tmp_path / "c.bmp")
    files = sc.read_image_files(
        [tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.bmp"])
    # JPEG and PNG go as they are; a BMP becomes a lossless PNG.
    assert files[0] == (tmp_path / "a.png").read_bytes()
    assert files[1] == (tmp_path / "b.jpg").read_bytes()
    assert files[2].startswith(b"\x89PNG\r\n\x1a\n")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(
        files[2]))), image)
    (tmp_path / "bad.png").write_text("no image")
    with pytest.raises(ValueError, match="Cannot read image"):
        sc.read_image_files([tmp_path / "bad.png"])


def test_rest_urls():
    assert (sc.rest_url("localhost", 8501, "e2rnas")
            == "http://localhost:8501/v1/models/e2rnas:predict")
    assert (sc.rest_url("h", 1, "m", version=3)
            == "http://h:1/v1/models/m/versions/3:predict")
    assert (sc.rest_url("h", 1, "m", label="stable")
            == "http://h:1/v1/models/m/labels/stable:predict")
    assert (sc.rest_url("h", 1, "m", verb="metadata", label="stable")
            == "http://h:1/v1/models/m/labels/stable/metadata")
    with pytest.raises(ValueError, match="not both"):
        sc.rest_url("h", 1, "m", version=1, label="stable")
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


def test_rest_bytes_request_runs_on_the_export(exported):
    """The b64 body, decoded as TF Serving decodes it, is what
    serving_bytes takes, and gives what the pixels give."""
    model, version_dir = exported
    rng = np.random.RandomState(3)
    images = rng.randint(0, 256, (3, SIZE, SIZE, 3)).astype(np.uint8)
    files = [_png(image) for image in images]
    row = json.loads(json.dumps(sc.build_rest_request(files,
                                                      "serving_bytes")))
    assert row["signature_name"] == "serving_bytes"
    assert [list(r) for r in row["instances"]] == [["image_bytes"]] * 3
    assert [_b64_decode_like_tf_serving(r["image_bytes"])
            for r in row["instances"]] == files
    col = json.loads(json.dumps(sc.build_rest_request(
        files, "serving_bytes", layout="columnar")))
    assert [_b64_decode_like_tf_serving(v)
            for v in col["inputs"]["image_bytes"]] == files

    signature = tf.saved_model.load(version_dir).signatures["serving_bytes"]
    out = signature(image_bytes=tf.constant(
        [_b64_decode_like_tf_serving(r["image_bytes"])
         for r in row["instances"]]))
    # The server answers in the row format: one object per instance, the
    # string output as a plain JSON string.
    body = {"predictions": [
        {k: (v.numpy()[i].decode() if v.dtype == tf.string
             else v.numpy()[i].tolist()) for k, v in out.items()}
        for i in range(3)]}
    parsed = sc.parse_rest_response(json.loads(json.dumps(body)))
    logits = model(images.astype(np.float32) / 255).numpy()
    np.testing.assert_allclose(parsed["logits"], logits, atol=1e-5)
    assert list(parsed["class_names"]) == [NAMES[c] for c in
                                           logits.argmax(-1)]
    # No names at hand: the top class is named from the response.
    best = [r[0] for r in sc.top_k(parsed, 2)]
    assert best == [(int(c), NAMES[c], pytest.approx(float(p[c]), abs=1e-5))
                    for c, p in zip(logits.argmax(-1),
                                    parsed["probabilities"])]
    assert all(r[1][1] is None for r in sc.top_k(parsed, 2))


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
    # String tensors arrive as bytes over gRPC; the client gives str.
    assert list(parsed["class_names"]) == [NAMES[c] for c in best]


def test_grpc_bytes_request_runs_on_the_export(exported):
    model, version_dir = exported
    images = np.random.RandomState(4).randint(
        0, 256, (2, SIZE, SIZE, 3)).astype(np.uint8)
    files = [_png(image) for image in images]
    request = sc.build_grpc_request(files, "m", "serving_bytes",
                                    label="stable")
    assert request.model_spec.version_label == "stable"
    assert not request.model_spec.HasField("version")
    wire = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    tensor = wire.inputs["image_bytes"]
    assert tensor.dtype == tf.string.as_datatype_enum
    assert list(tensor.string_val) == files
    signature = tf.saved_model.load(version_dir).signatures["serving_bytes"]
    out = signature(image_bytes=tf.constant(tf.make_ndarray(tensor)))
    logits = model(images.astype(np.float32) / 255).numpy()
    np.testing.assert_allclose(out["logits"].numpy(), logits, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        sc.build_grpc_request(files, "m", "serving_bytes", version=1,
                              label="stable")


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
    served = {"probabilities": probs, "classes": np.array([1, 2]),
              "class_names": np.array(["dog", "ship"])}
    assert sc.top_k(served, 2) == [[(1, "dog", 0.6), (2, None, 0.3)],
                                   [(2, "ship", 0.5), (0, None, 0.25)]]
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


def test_cli_sends_files_with_b64_and_prints_served_names(tmp_path, capsys):
    """`--signature=serving_bytes`: the files go as they are, base64, to
    the label's URL, and the answer's class names are printed. The server
    is a local stand-in that records the request."""
    import http.server
    import threading

    image = tmp_path / "x.jpg"
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(image)
    seen = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            seen["path"] = self.path
            seen["body"] = json.loads(self.rfile.read(
                int(self.headers["Content-Length"])))
            answer = json.dumps({"predictions": [{
                "logits": [0.0, 1.0, 3.0], "classes": 2,
                "probabilities": [0.04, 0.11, 0.85],
                "class_names": "cat"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code = sc.main([str(image), "--host=127.0.0.1",
                        f"--rest_port={server.server_address[1]}",
                        "--model_name=m", "--version_label=stable",
                        "--signature=serving_bytes", "--top_k=2",
                        "--timeout=10"])
    finally:
        server.shutdown()
        server.server_close()
    assert code == 0, capsys.readouterr().err
    assert seen["path"] == "/v1/models/m/labels/stable:predict"
    assert seen["body"]["signature_name"] == "serving_bytes"
    (instance,) = seen["body"]["instances"]
    assert _b64_decode_like_tf_serving(instance["image_bytes"]) == \
        image.read_bytes()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(image)
    assert out[1].split() == ["1.", "cat", "(2)", "0.8500"]
    assert out[2].split() == ["2.", "1", "0.1100"]
