"""Export a trained network as a TensorFlow Serving SavedModel.

The export is inference only: the Keras model is traced into three
signatures and written with `keras.export.ExportArchive`.

- ``serving_default``: ``images`` uint8 ``[N, H, W, 3]`` (raw pixels; scaled
  to ``[0, 1]`` inside, the network normalises itself).
- ``serving_float``: ``images`` float32 ``[N, H, W, 3]`` already in
  ``[0, 1]``.
- ``serving_bytes``: ``image_bytes`` string ``[N]``, JPEG or PNG files
  (REST clients send ``{"b64": ...}``), decoded and resized to the model's
  size inside the graph as the training data were, then as
  ``serving_default``.

All return ``logits`` (float32 ``[N, classes]``), ``probabilities``
(softmax of the logits), ``classes`` (int64 ``[N]``, the arg max) and
``class_names`` (string ``[N]``, the name of that class).

Versions follow the TF Serving layout ``<base>/<model_name>/<version>/``:
a new export gets the largest existing integer version plus one, is
written into a hidden temporary directory beside the versions and renamed
into place only when complete, so a server polling the directory never
sees a half-written version and an existing version is never replaced.
``<base>/models.config`` lists every model under the base for
``tensorflow_model_server --model_config_file``, each serving all its
exported versions (a ``specific`` version policy) with optional version
labels. Extra information (genotype, size, accuracies, class names,
config, versions) goes to ``<version>/assets.extra/e2rnas_metadata.json``,
where TF Serving keeps files it does not read.

Reference:
    Yue, Lin, Huang, Zhang. E2RNAS. https://arxiv.org/abs/2011.09820
    TF Serving model configuration:
    https://www.tensorflow.org/tfx/serving/serving_config
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import tempfile

import keras
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from e2rnas_tf.runs import checkpoints as ckpt_lib
from e2rnas_tf.runs import files
from e2rnas_tf.space import costs

__all__ = [
    "ExportError", "export", "main", "next_version", "served_versions",
    "serve_command", "update_model_config", "METADATA_PATH", "SERVING_ROOT",
]

METADATA_PATH = os.path.join("assets.extra", "e2rnas_metadata.json")
MODEL_CONFIG = "models.config"
# Where the official docker image mounts the export base (`-v BASE:/models`);
# models.config must name base paths as the server sees them (the default
# of `e2rnas export --serving_base_path`).
SERVING_ROOT = "/models"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_LABEL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


class ExportError(ValueError):
    """The checkpoint, export base or model name cannot be exported."""


def check_model_name(model_name):
    """Raises ExportError unless ``model_name`` is a safe served name."""
    if (not isinstance(model_name, str) or not model_name
            or not _NAME_RE.match(model_name)):
        raise ExportError(
            "Expected a model name made of letters, digits, '_', '-' and "
            "'.', without path separators, not starting with '.'. "
            f"Received: model_name={model_name!r}")


def next_version(model_dir):
    """The next TF Serving version number in `model_dir`.

    Args:
        model_dir: ``<base>/<model_name>``; may not exist yet.

    Returns:
        One more than the largest integer-named entry, or 1.
    """
    if not os.path.isdir(model_dir):
        return 1
    versions = [int(n) for n in os.listdir(model_dir) if n.isdigit()]
    return max(versions, default=0) + 1


def _image_shape(model, image_size):
    if image_size is not None:
        if isinstance(image_size, int):
            return (image_size, image_size)
        if len(image_size) != 2:
            raise ExportError(
                "Expected image_size to be an int or (height, width). "
                f"Received: image_size={image_size!r}")
        return tuple(image_size)
    shape = None
    try:
        shape = model.input_shape
    except (AttributeError, ValueError):
        # Subclassed models have no input layer; they remember the shape
        # they were built with.
        shapes = getattr(model, "_build_shapes_dict", None) or {}
        shape = next(iter(shapes.values()), None)
    if shape is None or len(shape) != 4:
        return (None, None)
    return tuple(shape[1:3])


_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_class_names(class_names):
    """``class_names`` as a tuple of non-empty strings (None stays None)."""
    if class_names is None:
        return None
    if isinstance(class_names, str) or not class_names or not all(
            isinstance(n, str) and n for n in class_names):
        raise ExportError(
            "Expected class names to be a list of non-empty strings. "
            f"Received: class_names={class_names!r}")
    return tuple(class_names)


def check_version_labels(labels):
    """Raises ExportError unless every label is a usable TF Serving label."""
    for label in labels:
        if not isinstance(label, str) or not _LABEL_RE.match(label):
            raise ExportError(
                "Expected version labels made of letters, digits, '_', '-' "
                f"and '.', starting with a letter. Received: {label!r}")


def _decode_image_bytes(image_bytes, height, width):
    """JPEG/PNG strings ``[N]`` -> uint8 ``[N, H, W, 3]``, in the graph.

    Decoded as the training data were (`data._decode_image`: JPEGs with the
    accurate integer IDCT, which matches PIL), converted to RGB (grayscale
    repeated, alpha dropped, as PIL's ``convert("RGB")``), and, when the
    model has a fixed size, resized to it as `data.resize_images` resizes
    odd-sized training images (bilinear, antialiased, rounded to uint8).
    A model of any size gets no resize: then one request's images must
    share one size.
    """

    resize = height is not None and width is not None

    def decode(index, data):
        is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), _JPEG_MAGIC)
        is_png = tf.equal(tf.strings.substr(data, 0, 8), _PNG_MAGIC)
        known = tf.debugging.Assert(
            tf.logical_or(is_jpeg, is_png),
            [tf.strings.format(
                "Expected JPEG or PNG files in image_bytes. Received: "
                "image_bytes[{}] is neither", [index])])
        with tf.control_dependencies([known]):
            image = tf.cond(
                is_jpeg,
                lambda: tf.io.decode_jpeg(data, channels=3,
                                          dct_method="INTEGER_ACCURATE"),
                lambda: tf.io.decode_png(data, channels=3))
        return image

    def to_size(index, data, first_shape):
        image = decode(index, data)
        if resize:
            same = tf.reduce_all(tf.equal(tf.shape(image)[:2],
                                          [height, width]))
            image = tf.cond(
                same, lambda: image,
                lambda: tf.cast(tf.clip_by_value(tf.round(tf.image.resize(
                    image, (height, width), method="bilinear",
                    antialias=True)), 0, 255), tf.uint8))
            return tf.ensure_shape(image, [height, width, 3])
        same = tf.debugging.Assert(
            tf.reduce_all(tf.equal(tf.shape(image)[:2], first_shape)),
            [tf.strings.format(
                "Expected images of one size (the model takes any size, so "
                "they are not resized). Received: image_bytes[{}] is {}x{}, "
                "image_bytes[0] is {}x{}",
                [index, tf.shape(image)[0], tf.shape(image)[1],
                 first_shape[0], first_shape[1]])])
        with tf.control_dependencies([same]):
            return tf.identity(image)

    count = tf.shape(image_bytes)[0]
    nonempty = tf.debugging.assert_positive(
        count, message="Expected at least one image. Received: an empty batch")
    with tf.control_dependencies([nonempty]):
        indices = tf.range(count)
        first_shape = (tf.constant([0, 0]) if resize
                       else tf.shape(decode(0, image_bytes[0]))[:2])
    return tf.map_fn(
        lambda args: to_size(args[0], args[1], first_shape),
        (indices, image_bytes),
        fn_output_signature=tf.TensorSpec([height, width, 3], tf.uint8))


def _signature_fns(model, height, width, class_names=None):
    """The serving functions and their input signatures.

    Returns:
        ``(functions, resolved)``: ``functions`` maps each signature name
        to ``(function, input TensorSpec)``; ``resolved["class_names"]`` is
        set when the functions are traced (the number of classes is the
        logits' static width): `class_names`, or ``"0"``, ``"1"``, ... when
        it is None.
    """

    resolved = {}

    def checked(images):
        # A serving request of the wrong shape must fail with a message a
        # client can act on: without these checks a wrong size fails deep
        # inside a convolution, an empty batch inside batch norm, and a
        # rank-3 tensor aborts the whole TensorFlow process.
        images = tf.ensure_shape(images, [None, height, width, 3])
        nonempty = tf.debugging.assert_positive(
            tf.shape(images)[0],
            message="Expected at least one image. Received: an empty batch")
        with tf.control_dependencies([nonempty]):
            return tf.identity(images)

    def outputs(logits):
        logits = tf.cast(logits, tf.float32)
        num_classes = logits.shape[-1]
        names = class_names or tuple(str(i) for i in range(num_classes))
        if len(names) != num_classes:
            raise ExportError(
                f"Expected {num_classes} class names (the model has "
                f"{num_classes} outputs). Received: {len(names)} names")
        resolved["class_names"] = list(names)
        classes = tf.argmax(logits, axis=-1, output_type=tf.int64)
        return {
            "logits": logits,
            "probabilities": tf.nn.softmax(logits, axis=-1),
            "classes": classes,
            "class_names": tf.gather(tf.constant(names, tf.string), classes),
        }

    def serve_uint8(images):
        # Same scaling as the training pipeline: pixels / 255 in float32.
        x = tf.cast(checked(images), tf.float32) / 255.0
        return outputs(model(x, training=False))

    def serve_float(images):
        return outputs(model(checked(images), training=False))

    def serve_bytes(image_bytes):
        # One file per image: a scalar would fail deep inside map_fn.
        image_bytes = tf.ensure_shape(image_bytes, [None])
        return serve_uint8(_decode_image_bytes(image_bytes, height, width))

    pixels = [None, height, width, 3]
    functions = {
        "serving_default": (serve_uint8, tf.TensorSpec(pixels, tf.uint8,
                                                       name="images")),
        "serving_float": (serve_float, tf.TensorSpec(pixels, tf.float32,
                                                     name="images")),
        "serving_bytes": (serve_bytes, tf.TensorSpec([None], tf.string,
                                                     name="image_bytes")),
    }
    return functions, resolved


def _write_savedmodel(model, path, height, width, class_names=None):
    """Writes the SavedModel; returns the class names its outputs use."""

    archive = keras.export.ExportArchive()
    archive.track(model)
    functions, resolved = _signature_fns(model, height, width, class_names)
    for name, (function, spec) in functions.items():
        archive.add_endpoint(name, function, input_signature=[spec])
    archive.write_out(path, verbose=False)
    return resolved["class_names"]


def _read_model_config(path):

    config = model_server_config_pb2.ModelServerConfig()
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
        try:
            text_format.Parse(text, config)
        except text_format.ParseError as e:
            raise ExportError(
                f"{path} is not a valid TF Serving model config: {e}"
            ) from None
    return config


def served_versions(model_dir):
    """The version numbers in `model_dir` that hold a SavedModel, sorted."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(
        int(n) for n in os.listdir(model_dir) if n.isdigit() and any(
            os.path.isfile(os.path.join(model_dir, n, f))
            for f in ("saved_model.pb", "saved_model.pbtxt")))


def update_model_config(export_base, model_name, base_path=None, *,
                        labels=None):
    """Adds or updates one model in ``<export_base>/models.config``.

    The model's entry serves every version under
    ``<export_base>/<model_name>`` that holds a SavedModel
    (``model_version_policy { specific { versions: ... } }``; without a
    policy TF Serving serves only the latest). Its version labels are kept
    while their versions exist, and `labels` adds or moves labels. Other
    models' entries (and their fields) are kept as they are. The file is
    replaced atomically.

    Args:
        export_base: directory holding ``models.config``.
        model_name: the served model name.
        base_path: the model's directory as the server sees it; None keeps
            the entry's base path (``SERVING_ROOT/<model_name>`` for a new
            entry).
        labels: ``{label: version}`` to set (e.g. ``{"stable": 2}``).

    Returns:
        The path of the config file.

    Raises:
        ExportError: the file is not a valid TF Serving model config, a
            label is malformed, or names a version that is not served.
    """

    path = os.path.join(export_base, MODEL_CONFIG)
    config = _read_model_config(path)
    labels = dict(labels or {})
    check_version_labels(labels)
    versions = served_versions(os.path.join(export_base, model_name))
    missing = {k: v for k, v in labels.items() if v not in versions}
    if missing:
        raise ExportError(
            f"Expected version labels to name served versions of "
            f"{model_name} ({versions}). Received: {missing}")
    entries = config.model_config_list.config
    entry = next((c for c in entries if c.name == model_name), None)
    if entry is None:
        entry = entries.add()
        entry.name = model_name
        entry.base_path = f"{SERVING_ROOT}/{model_name}"
    if base_path is not None:
        entry.base_path = base_path
    entry.model_platform = "tensorflow"
    entry.model_version_policy.Clear()
    entry.model_version_policy.specific.versions.extend(versions)
    kept = {k: v for k, v in entry.version_labels.items() if v in versions}
    kept.update(labels)
    entry.ClearField("version_labels")
    for label in sorted(kept):
        entry.version_labels[label] = kept[label]
    files.write_text(path, text_format.MessageToString(config))
    return path


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


def _signature_descriptions(height, width):
    size = (f"{height}x{width}" if height is not None and width is not None
            else "one size per request (the model takes any size)")
    resize = ("resized to " + size if "x" in size else size)
    return {
        "serving_default": "images uint8 [N,H,W,3] 0..255",
        "serving_float": "images float32 [N,H,W,3] in [0,1]",
        "serving_bytes": ("image_bytes string [N]: JPEG or PNG files "
                          "(REST: {\"b64\": ...}), decoded to RGB, "
                          f"{resize}"),
        "outputs": ["logits", "probabilities", "classes", "class_names"],
    }


def export(model, export_base, model_name, *, metadata=None,
           image_size=None, serving_root=SERVING_ROOT, class_names=None,
           version_labels=()):
    """Writes `model` as the next version of a TF Serving model.

    Args:
        model: a Keras model mapping float32 images in ``[0, 1]``
            ``[N, H, W, 3]`` to logits (``call(x, training=False)``).
        export_base: the TF Serving base directory (created if missing).
        model_name: served name; the directory ``<export_base>/<name>``.
        metadata: JSON-ready dict stored as
            ``<version>/assets.extra/e2rnas_metadata.json`` (the version,
            signatures, class names, export time and library versions are
            added).
        image_size: ``int`` or ``(height, width)`` of the signature inputs;
            default: the shape the model was built with, else any size.
        serving_root: the export base as the server sees it, used for
            base paths in ``models.config``; ``None`` writes the absolute
            local path (for a server running on this machine).
        class_names: one name per class, index = class: the signatures'
            ``class_names`` output and the metadata's ``class_names``.
            None: ``"0"``, ``"1"``, ... and a ``class_names_note`` in the
            metadata saying that no names were known.
        version_labels: TF Serving version labels (e.g. ``("stable",)``)
            pointed at the new version in ``models.config``.

    Returns:
        The new version directory.

    Raises:
        ExportError: a bad model name, export base, class names (not one
            per class), version label or an unreadable ``models.config``;
            nothing is written then.

    Example:

    >>> version_dir = export(model, "/tmp/serving", "e2rnas",
    ...                      metadata={"genotype": g.to_dict()},
    ...                      class_names=["airplane", ...])
    """

    check_model_name(model_name)
    class_names = check_class_names(class_names)
    check_version_labels(version_labels)
    if serving_root is not None and (not isinstance(serving_root, str)
                                     or not serving_root):
        raise ExportError(
            "Expected the serving base path (the export base as the model "
            f"server sees it, e.g. {SERVING_ROOT}). Received: "
            f"{serving_root!r}")
    if not isinstance(export_base, (str, os.PathLike)) or not str(export_base):
        raise ExportError(
            f"Expected an export base directory. Received: "
            f"export_base={export_base!r}")
    export_base = os.path.abspath(os.fspath(export_base))
    if os.path.exists(export_base) and not os.path.isdir(export_base):
        raise ExportError(f"Export base {export_base} is not a directory")
    # A damaged models.config fails now, before a version is written.
    _read_model_config(os.path.join(export_base, MODEL_CONFIG))
    model_dir = os.path.join(export_base, model_name)
    try:
        os.makedirs(model_dir, exist_ok=True)
        tmp_dir = tempfile.mkdtemp(prefix=".tmp-export-", dir=model_dir)
    except OSError as e:
        raise OSError(
            f"Cannot write to export base {export_base}: {e.strerror}"
        ) from None
    height, width = _image_shape(model, image_size)
    try:
        names = _write_savedmodel(model, tmp_dir, height, width, class_names)
        version = next_version(model_dir)
        info = dict(metadata or {})
        info.update({
            "model_name": model_name,
            "version": version,
            "image_size": [height, width],
            "signatures": _signature_descriptions(height, width),
            "class_names": names,
            "export_time": datetime.datetime.now(
                datetime.timezone.utc).isoformat(timespec="seconds"),
            "tensorflow_version": tf.__version__,
            "keras_version": keras.__version__,
        })
        if class_names is None:
            info["class_names_note"] = (
                "no class names were known at export; these are the class "
                "indices")
        else:
            info.pop("class_names_note", None)
        os.makedirs(os.path.join(tmp_dir, "assets.extra"), exist_ok=True)
        with open(os.path.join(tmp_dir, METADATA_PATH), "w") as f:
            json.dump(info, f, indent=2, default=_json_default)
        # Another export may have claimed the number meanwhile; rename
        # fails rather than replace a non-empty directory, so retry with
        # the next number, and never replace anything that exists.
        while True:
            version_dir = os.path.join(model_dir, str(version))
            if not os.path.lexists(version_dir):
                try:
                    os.rename(tmp_dir, version_dir)
                    break
                except OSError:
                    if not os.path.lexists(version_dir):
                        raise
            version = next_version(model_dir)
            info["version"] = version
            with open(os.path.join(tmp_dir, METADATA_PATH), "w") as f:
                json.dump(info, f, indent=2, default=_json_default)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    base_path = (model_dir if serving_root is None
                 else f"{serving_root.rstrip('/')}/{model_name}")
    update_model_config(export_base, model_name, base_path,
                        labels={label: version for label in version_labels})
    return version_dir


def _read_json(path):
    try:
        return files.read_json(path)
    except ValueError as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from None


def checkpoint_metadata(model_path, model):
    """Metadata from the files a training run keeps beside its model.

    Reads, if present in the directory of `model_path`: ``config.json``
    (stored as ``config``), ``genotype.json`` (``genotype``; else the
    model's own genotype), ``summary.json`` from ``e2rnas train``
    (``summary``) and ``evaluation.json`` from ``e2rnas evaluate``
    (``evaluation``). The headline figures ``params``, ``flops``,
    ``clean_accuracy``, ``robust_accuracy`` and ``class_names`` are lifted
    to the top level from evaluation (first) or summary (``macs`` counts
    as ``flops``, ``best_accuracy`` as ``clean_accuracy``);
    ``class_names_from`` names the file the class names came from.

    Returns:
        A JSON-ready dict.
    """
    run_dir = os.path.dirname(os.path.abspath(model_path))
    info = {"checkpoint": os.path.abspath(model_path)}
    sources = {}
    for name in ("config", "genotype", "summary", "evaluation"):
        value = _read_json(os.path.join(run_dir, f"{name}.json"))
        if value is not None:
            info[name] = value
            sources[name] = value
    if "genotype" not in info and hasattr(model, "genotype"):
        info["genotype"] = model.genotype.to_dict()
    aliases = {
        "params": ("params",),
        "flops": ("flops", "macs"),
        "clean_accuracy": ("clean_accuracy", "best_accuracy"),
        "robust_accuracy": ("robust_accuracy",),
        "class_names": ("class_names",),
        "num_classes": ("num_classes",),
    }
    for key, names in aliases.items():
        for source in ("evaluation", "summary"):
            record = sources.get(source)
            if not isinstance(record, dict):
                continue
            value = next((record[n] for n in names if n in record), None)
            if value is not None:
                info[key] = value
                if key == "class_names":
                    info["class_names_from"] = f"{source}.json"
                break
    if "params" not in info:
        info["params"] = costs.count_params(model)
    return info


def serve_command(export_base, serving_root=SERVING_ROOT):
    """How to start TF Serving on ``export_base`` (one line, for humans)."""
    config = _read_model_config(os.path.join(export_base, MODEL_CONFIG))
    flags = f"--model_config_file={serving_root.rstrip('/')}/{MODEL_CONFIG}"
    if any(c.version_labels for c in config.model_config_list.config):
        # Labels naming versions that are not loaded yet (all of them, at
        # start-up) are refused without this flag.
        flags += " --allow_version_labels_for_unavailable_models=true"
    if serving_root.startswith("/"):
        return (f"docker run -p 8501:8501 -p 8500:8500 "
                f"-v {os.path.abspath(export_base)}:{serving_root} "
                f"-t tensorflow/serving {flags}")
    return f"tensorflow_model_server {flags}"


def main(config, args):
    """``e2rnas export --checkpoint=... --export_base=... --model_name=...
    [--serving_base_path=/models]``."""
    del config  # The run's own config.json travels with the checkpoint.
    check_model_name(args.model_name)
    if not args.export_base:
        raise ExportError(
            "Expected --export_base=<TF Serving base directory>. "
            "Received: nothing")
    path = ckpt_lib.resolve_model_file(args.checkpoint)
    model = ckpt_lib.load_model_file(path)
    metadata = checkpoint_metadata(path, model)
    version_dir = export(model, args.export_base, args.model_name,
                         metadata=metadata,
                         serving_root=args.serving_base_path,
                         class_names=metadata.get("class_names"))
    print(f"exported {path} -> {version_dir}")
    print(f"serve: {serve_command(args.export_base, args.serving_base_path)}")
    return 0
