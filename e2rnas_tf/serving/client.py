"""Classify image files with an E2RNAS model served by TensorFlow Serving.

Usage (a server started as in the README, model name ``e2rnas``)::

    e2rnas-serving-client cat.png ship.jpg --model_name=e2rnas
    e2rnas-serving-client cat.jpg --signature=serving_bytes
    e2rnas-serving-client cat.png --protocol=grpc --top_k=3 \\
        --metadata=/serving/e2rnas/1/assets.extra/e2rnas_metadata.json

REST: ``POST http://HOST:8501/v1/models/NAME[/versions/V|/labels/L]:predict``
with ``{"signature_name": ..., "instances": [{"images": ...}, ...]}`` (row
format) or ``{"inputs": {"images": [...]}}`` (columnar format); the answer
is ``{"predictions": [...]}`` or ``{"outputs": {...}}``. With
``--signature=serving_bytes`` the image files themselves are sent, base64
in JSON (``{"image_bytes": {"b64": "..."}}``), and the server decodes and
resizes them.
gRPC: ``PredictionService/Predict`` on HOST:8500 with a ``PredictRequest``
(needs the ``tensorflow-serving-api`` package).

For pixel signatures the client decodes and resizes the images; the input
size comes from ``--image_size``, else the export's
``e2rnas_metadata.json`` (``--metadata``), else the server's model
metadata (the signature's input shape). Class names come from
``--class_names`` or the export metadata; without either, the name of the
top class comes from the model's ``class_names`` output.

Request building and response parsing are pure functions (no network),
tested against the documented formats; only `post_json`, `get_json`,
`grpc_predict` and `grpc_signature_shape` talk to a server.

Reference:
    https://www.tensorflow.org/tfx/serving/api_rest
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import urllib.error
import urllib.request

import numpy as np

OUTPUT_KEYS = ("logits", "probabilities", "classes", "class_names")
# The input each signature of an e2rnas export takes.
INPUT_NAMES = {"serving_default": "images", "serving_float": "images",
               "serving_bytes": "image_bytes"}
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ServingError(ValueError):
    """The server answered with an error or with an unexpected body."""


# ---------------------------------------------------------------- images


def load_images(paths, image_size):
    """Decodes image files to uint8 ``[N, H, W, 3]`` of one size.

    Args:
        paths: image file paths (anything PIL reads).
        image_size: ``int`` or ``(height, width)``.

    Returns:
        A uint8 array; images are converted to RGB and resized bilinearly.
    """
    from PIL import Image

    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    height, width = (int(s) for s in image_size)
    if height <= 0 or width <= 0:
        raise ValueError(
            f"Expected a positive image size. Received: {image_size!r}")
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if image.size != (width, height):
                    image = image.resize((width, height),
                                         Image.Resampling.BILINEAR)
                arrays.append(np.asarray(image, dtype=np.uint8))
        except OSError as e:
            raise ValueError(f"Cannot read image {path}: {e}") from None
    return np.stack(arrays)


def read_image_files(paths):
    """The bytes to send to ``serving_bytes``, one per file.

    JPEG and PNG files are sent as they are (the server decodes them as the
    training data were decoded); other formats PIL reads are converted to
    RGB and re-encoded as PNG (lossless), since the server takes only JPEG
    and PNG.

    Returns:
        A list of ``bytes``.
    """
    from PIL import Image

    files = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
            if not data.startswith((_JPEG_MAGIC, _PNG_MAGIC)):
                with Image.open(io.BytesIO(data)) as image:
                    buffer = io.BytesIO()
                    image.convert("RGB").save(buffer, "PNG")
                data = buffer.getvalue()
        except OSError as e:
            raise ValueError(f"Cannot read image {path}: {e}") from None
        files.append(data)
    return files


# ------------------------------------------------------------------ REST


def rest_url(host, port, model_name, version=None, verb="predict",
             label=None):
    """``http://HOST:PORT/v1/models/NAME[/versions/V|/labels/L][:verb]``.

    ``verb=None`` gives the status URL, ``"metadata"`` the metadata URL
    (``.../metadata``), anything else ``...:verb``.
    """
    if version is not None and label is not None:
        raise ValueError("Expected a version or a label, not both")
    url = f"http://{host}:{port}/v1/models/{model_name}"
    if version is not None:
        url += f"/versions/{int(version)}"
    elif label is not None:
        url += f"/labels/{label}"
    if verb == "metadata":
        return url + "/metadata"
    return url if verb is None else f"{url}:{verb}"


def build_rest_request(images, signature_name="serving_default",
                       input_name=None, layout="row"):
    """The JSON body of a REST predict request.

    Args:
        images: ``[N, H, W, 3]`` array (uint8 for ``serving_default``,
            float32 in [0, 1] for ``serving_float``), or a list of encoded
            image files (``bytes``, for ``serving_bytes``), sent base64 as
            ``{"b64": ...}``, which TF Serving decodes into a string
            tensor.
        signature_name: the signature to run.
        input_name: the signature's input key (default: the e2rnas
            export's, `INPUT_NAMES`).
        layout: ``"row"`` (``instances``, one object per image) or
            ``"columnar"`` (``inputs``, one batched tensor per input).

    Returns:
        A JSON-ready dict.
    """
    if input_name is None:
        input_name = INPUT_NAMES.get(signature_name, "images")
    if isinstance(images, (list, tuple)) and images and all(
            isinstance(i, bytes) for i in images):
        values = [{"b64": base64.b64encode(i).decode("ascii")}
                  for i in images]
    else:
        images = np.asarray(images)
        if images.ndim != 4:
            raise ValueError(
                "Expected images [N, H, W, C] or a list of image files. "
                f"Received: shape={images.shape}")
        values = [image.tolist() for image in images]
    body = {"signature_name": signature_name}
    if layout == "row":
        body["instances"] = [{input_name: value} for value in values]
    elif layout == "columnar":
        body["inputs"] = {input_name: values}
    else:
        raise ValueError(
            f"Expected layout='row' or 'columnar'. Received: {layout!r}")
    return body


def _as_arrays(outputs):
    arrays = {}
    for key, value in outputs.items():
        array = np.asarray(value)
        if key == "classes":
            array = array.astype(np.int64)
        elif array.dtype.kind in "if":
            array = array.astype(np.float32)
        elif array.dtype.kind in "OS":
            # String tensors: bytes over gRPC, str over REST; str for both.
            array = np.asarray([v.decode() if isinstance(v, bytes) else v
                                for v in array.ravel()]).reshape(array.shape)
        arrays[key] = array
    return arrays


def parse_rest_response(body, output_name="probabilities"):
    """Output arrays from a REST predict response body.

    Args:
        body: the decoded JSON: ``{"predictions": [...]}`` (row format:
            one object per instance, or a bare value per instance when the
            signature has one output), ``{"outputs": {...}}`` or a bare
            ``{"outputs": value}`` (columnar), or ``{"error": "..."}``.
        output_name: the key a single bare output is stored under.

    Returns:
        ``{output name: np.ndarray}`` with the batch as the first axis.
    """
    if not isinstance(body, dict):
        raise ServingError(
            f"Expected a JSON object from the server. Received: "
            f"{type(body).__name__}")
    if "error" in body:
        raise ServingError(f"Server error: {body['error']}")
    if "predictions" in body:
        rows = body["predictions"]
        if not isinstance(rows, list):
            raise ServingError("Expected 'predictions' to be a list")
        if rows and all(isinstance(r, dict) for r in rows):
            keys = rows[0].keys()
            return _as_arrays({k: [r[k] for r in rows] for k in keys})
        return _as_arrays({output_name: rows})
    if "outputs" in body:
        outputs = body["outputs"]
        if isinstance(outputs, dict):
            return _as_arrays(outputs)
        return _as_arrays({output_name: outputs})
    raise ServingError(
        "Expected 'predictions', 'outputs' or 'error' in the response. "
        f"Received keys: {sorted(body)}")


def signature_shape_from_rest_metadata(body,
                                       signature_name="serving_default",
                                       input_name="images"):
    """The input shape of a signature from ``GET .../metadata``.

    Args:
        body: the decoded JSON of TF Serving's model metadata response
            (``metadata.signature_def.signature_def.<sig>.inputs.<name>.
            tensor_shape.dim[].size``, sizes as strings).

    Returns:
        A tuple of ints (``-1`` for unknown dimensions).
    """
    try:
        sig = body["metadata"]["signature_def"]["signature_def"][
            signature_name]
        dims = sig["inputs"][input_name]["tensor_shape"]["dim"]
    except (KeyError, TypeError):
        raise ServingError(
            f"No input {input_name!r} of signature {signature_name!r} in "
            "the model metadata") from None
    return tuple(int(d.get("size", -1)) for d in dims)


def post_json(url, body, timeout=10.0):
    """POSTs `body` as JSON and returns the decoded answer."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"})
    return _open_json(request, timeout)


def get_json(url, timeout=10.0):
    """GETs `url` and returns the decoded JSON answer."""
    return _open_json(urllib.request.Request(url), timeout)


def _open_json(request, timeout):
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read().decode())
    except urllib.error.HTTPError as e:
        # TF Serving puts {"error": ...} in the body of 4xx/5xx answers.
        try:
            return json.loads(e.read().decode())
        except ValueError:
            raise ServingError(f"HTTP {e.code} from {request.full_url}"
                               ) from None
    except urllib.error.URLError as e:
        raise ServingError(
            f"Cannot reach {request.full_url}: {e.reason}") from None


# ------------------------------------------------------------------ gRPC


def _serving_apis():
    try:
        from tensorflow_serving.apis import (
            get_model_metadata_pb2,
            predict_pb2,
            prediction_service_pb2_grpc,
        )
    except ImportError:
        raise ServingError(
            "gRPC needs the tensorflow-serving-api package "
            "(pip install tensorflow-serving-api==2.21.0); use "
            "--protocol=rest without it") from None
    return predict_pb2, get_model_metadata_pb2, prediction_service_pb2_grpc


def build_grpc_request(images, model_name, signature_name="serving_default",
                       version=None, input_name=None, label=None):
    """A ``PredictRequest`` proto carrying `images`.

    `images` as in `build_rest_request`: a pixel array (dtype kept) or a
    list of image files (a string tensor ``[N]``; gRPC carries bytes, no
    base64).
    """
    import tensorflow as tf

    predict_pb2, _, _ = _serving_apis()
    if input_name is None:
        input_name = INPUT_NAMES.get(signature_name, "images")
    if version is not None and label is not None:
        raise ValueError("Expected a version or a label, not both")
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = int(version)
    elif label is not None:
        request.model_spec.version_label = label
    if isinstance(images, (list, tuple)) and images and all(
            isinstance(i, bytes) for i in images):
        # dtype=object: numpy's fixed-width bytes would drop trailing NULs.
        tensor = tf.make_tensor_proto(np.array(images, dtype=object))
    else:
        tensor = tf.make_tensor_proto(np.asarray(images))
    request.inputs[input_name].CopyFrom(tensor)
    return request


def parse_grpc_response(response):
    """``{output name: np.ndarray}`` from a ``PredictResponse`` proto."""
    import tensorflow as tf

    return _as_arrays({key: tf.make_ndarray(proto)
                       for key, proto in response.outputs.items()})


def build_grpc_metadata_request(model_name, version=None, label=None):
    """A ``GetModelMetadataRequest`` asking for the signature defs."""
    _, metadata_pb2, _ = _serving_apis()
    request = metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = model_name
    if version is not None:
        request.model_spec.version.value = int(version)
    elif label is not None:
        request.model_spec.version_label = label
    request.metadata_field.append("signature_def")
    return request


def signature_shape_from_grpc_metadata(response,
                                       signature_name="serving_default",
                                       input_name="images"):
    """The input shape of a signature from a ``GetModelMetadataResponse``."""
    _, metadata_pb2, _ = _serving_apis()
    signatures = metadata_pb2.SignatureDefMap()
    if ("signature_def" not in response.metadata
            or not response.metadata["signature_def"].Unpack(signatures)):
        raise ServingError("No signature_def in the model metadata")
    sig = signatures.signature_def.get(signature_name)
    if sig is None or input_name not in sig.inputs:
        raise ServingError(
            f"No input {input_name!r} of signature {signature_name!r} in "
            "the model metadata")
    return tuple(d.size for d in sig.inputs[input_name].tensor_shape.dim)


def _stub(target):
    import grpc

    _, _, service = _serving_apis()
    return service.PredictionServiceStub(grpc.insecure_channel(target))


def grpc_predict(target, request, timeout=10.0):
    """Sends a ``PredictRequest`` to ``host:port``; returns the response."""
    import grpc

    try:
        return _stub(target).Predict(request, timeout)
    except grpc.RpcError as e:
        raise ServingError(f"gRPC {e.code().name}: {e.details()}") from None


def grpc_signature_shape(target, model_name, signature_name, version=None,
                         timeout=10.0, label=None):
    """The served signature's input shape, asked over gRPC."""
    import grpc

    request = build_grpc_metadata_request(model_name, version, label)
    try:
        response = _stub(target).GetModelMetadata(request, timeout)
    except grpc.RpcError as e:
        raise ServingError(f"gRPC {e.code().name}: {e.details()}") from None
    return signature_shape_from_grpc_metadata(response, signature_name)


# --------------------------------------------------------------- results


def _softmax(logits):
    logits = np.asarray(logits, dtype=np.float64)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_k(outputs, k=5, class_names=None):
    """The `k` most probable classes of every image.

    Args:
        outputs: parsed outputs holding ``probabilities`` or ``logits``
            (and, from an e2rnas export, ``classes`` / ``class_names``:
            the top class and its name).
        k: classes per image (capped at the number of classes).
        class_names: optional names, index = class. Without them, the top
            class is named from the ``class_names`` output if present.

    Returns:
        Per image, a list of ``(class_index, name_or_None, probability)``
        sorted by decreasing probability (ties: lower index first).
    """
    if "probabilities" in outputs:
        probs = np.asarray(outputs["probabilities"], dtype=np.float64)
    elif "logits" in outputs:
        probs = _softmax(outputs["logits"])
    else:
        raise ServingError(
            "Expected 'probabilities' or 'logits' in the outputs. "
            f"Received: {sorted(outputs)}")
    if probs.ndim != 2:
        raise ServingError(
            f"Expected [N, classes] probabilities. Received: {probs.shape}")
    if class_names is not None and len(class_names) != probs.shape[1]:
        raise ValueError(
            f"Expected {probs.shape[1]} class names. Received: "
            f"{len(class_names)}")
    k = max(1, min(int(k), probs.shape[1]))
    # Without a list of names, an e2rnas export still names its top class.
    top = None
    if class_names is None and {"classes", "class_names"} <= set(outputs):
        top = list(zip(np.asarray(outputs["classes"]).ravel(),
                       np.asarray(outputs["class_names"]).ravel()))

    def name(i, c):
        if class_names is not None:
            return class_names[c]
        if top is not None and int(top[i][0]) == c:
            return str(top[i][1])
        return None

    results = []
    for i, row in enumerate(probs):
        order = np.argsort(-row, kind="stable")[:k]
        results.append([(int(c), name(i, int(c)), float(row[c]))
                        for c in order])
    return results


def format_results(paths, results):
    """Human-readable lines: the file, then ``rank. name (index) prob``."""
    lines = []
    for path, result in zip(paths, results):
        lines.append(str(path))
        for rank, (index, name, prob) in enumerate(result, 1):
            label = f"{name} ({index})" if name is not None else str(index)
            lines.append(f"  {rank}. {label:<24} {prob:.4f}")
    return "\n".join(lines)


def read_class_names(value):
    """Class names from a file (one per line) or a comma-separated list."""
    if not value:
        return None
    try:
        with open(value) as f:
            names = [line.strip() for line in f if line.strip()]
    except OSError:
        names = [v.strip() for v in value.split(",") if v.strip()]
    return names or None


def image_size_from_shape(shape):
    """``(height, width)`` from a signature's ``[N, H, W, 3]`` shape."""
    if len(shape) != 4 or shape[1] is None or shape[2] is None \
            or shape[1] <= 0 or shape[2] <= 0:
        raise ServingError(
            f"The model takes any image size (input shape {list(shape)}); "
            "pass --image_size")
    return int(shape[1]), int(shape[2])


# ------------------------------------------------------------------- CLI


def _parser():
    p = argparse.ArgumentParser(
        prog="e2rnas-serving-client",
        description="Classify images with a TF Serving E2RNAS model.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--host", default="localhost")
    p.add_argument("--protocol", choices=("rest", "grpc"), default="rest")
    p.add_argument("--rest_port", type=int, default=8501)
    p.add_argument("--grpc_port", type=int, default=8500)
    p.add_argument("--model_name", default="e2rnas")
    p.add_argument("--version", type=int, default=None,
                   help="model version (default: the server's latest)")
    p.add_argument("--version_label", default=None,
                   help="a version label of models.config (e.g. stable)")
    p.add_argument("--signature", default="serving_default",
                   choices=tuple(INPUT_NAMES),
                   help="serving_bytes sends the image files themselves "
                   "(base64 over REST); the others send decoded pixels")
    p.add_argument("--layout", choices=("row", "columnar"), default="row",
                   help="REST request format")
    p.add_argument("--image_size", type=int, default=None)
    p.add_argument("--metadata", default=None,
                   help="the export's assets.extra/e2rnas_metadata.json")
    p.add_argument("--class_names", default=None,
                   help="file with one name per line, or a,b,c")
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--timeout", type=float, default=10.0)
    return p


def run(argv=None):
    """Runs the client; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.version is not None and args.version_label is not None:
        raise ValueError("Expected --version or --version_label, not both")
    meta = {}
    if args.metadata:
        with open(args.metadata) as f:
            meta = json.load(f)
    class_names = read_class_names(args.class_names) or meta.get(
        "class_names")
    if args.signature == "serving_bytes":
        size = None  # the server decodes and resizes
    elif args.image_size:
        size = (args.image_size, args.image_size)
    elif meta.get("image_size") and None not in meta["image_size"]:
        size = tuple(meta["image_size"])
    elif args.protocol == "rest":
        body = get_json(rest_url(args.host, args.rest_port, args.model_name,
                                 args.version, "metadata",
                                 label=args.version_label), args.timeout)
        if "error" in body:
            raise ServingError(f"Server error: {body['error']}")
        size = image_size_from_shape(signature_shape_from_rest_metadata(
            body, args.signature))
    else:
        size = image_size_from_shape(grpc_signature_shape(
            f"{args.host}:{args.grpc_port}", args.model_name,
            args.signature, args.version, args.timeout, args.version_label))
    if size is None:
        images = read_image_files(args.images)
    else:
        images = load_images(args.images, size)
    if args.signature == "serving_float":
        images = images.astype(np.float32) / 255.0
    if args.protocol == "rest":
        body = build_rest_request(images, args.signature, layout=args.layout)
        outputs = parse_rest_response(post_json(
            rest_url(args.host, args.rest_port, args.model_name,
                     args.version, label=args.version_label), body,
            args.timeout))
    else:
        request = build_grpc_request(images, args.model_name, args.signature,
                                     args.version, label=args.version_label)
        outputs = parse_grpc_response(grpc_predict(
            f"{args.host}:{args.grpc_port}", request, args.timeout))
    print(format_results(args.images, top_k(outputs, args.top_k,
                                            class_names)))
    return 0


def main(argv=None):
    """The ``e2rnas-serving-client`` console script."""
    try:
        return run(argv)
    except (ValueError, OSError) as e:
        print(f"e2rnas-serving-client: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
