"""Tests for e2rnas_tf.data (sources, search split, batch pipeline, errors).

All data is made by the tests in `tmp_path`, except the embedded subset
(shipped in the package) and the optional pixel check against the shared
CIFAR-10 tarball. The TFDS tests write TFDS's real on-disk format: the real
`cifar10` / `cifar100` / `svhn_cropped` builders run `download_and_prepare`
on fake "downloaded" files (CIFAR binary records, SVHN `.mat`) made here, with
only the download step patched; `data.load` then reads the prepared files
with name lookups failing and TFDS's `download_and_prepare` a spy. The
offline tests make every name lookup fail (`socket.getaddrinfo`), the layer
the download probe and `requests` share. No network is used.
"""

import contextlib
import importlib
import importlib.resources
import importlib.util
import io
import os
import pathlib
import sys
import tarfile
import types
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from e2rnas_tf import data
from tests.tool_util import load_tool

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_TARBALLS = [
    pathlib.Path("/work/shared/data/cifar10-jpeg.tar.gz"),
    REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz",
]


def cfg(**kwargs):
    return types.SimpleNamespace(**kwargs)


def save_image(path, array, fmt=None):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = {2: "L", 3: "RGB"}[array.ndim] if array.ndim == 2 or (
        array.shape[-1] == 3) else "RGBA"
    image = Image.fromarray(array, mode=mode)
    if fmt == "JPEG" or path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, format="JPEG", quality=95)
    else:
        image.save(path, format="PNG")


def pil_decode(path_or_bytes):
    """Independent reference decoder."""
    source = (io.BytesIO(path_or_bytes)
              if isinstance(path_or_bytes, bytes) else path_or_bytes)
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB"))


def make_folder(root, classes=("cat", "ant", "bee"), n_train=3, n_test=2,
                size=16, seed=0):
    """Writes root/{train,test}/<class>/ with PNG, .jpg and .JPEG files."""
    rng = np.random.default_rng(seed)
    exts = [".png", ".jpg", ".JPEG"]
    for split, count in (("train", n_train), ("test", n_test)):
        for cls in classes:
            for i in range(count):
                image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                save_image(root / split / cls / f"{i:03d}{exts[i % 3]}", image)
    (root / "train" / classes[0] / "notes.txt").write_text("not an image")
    return root


def to_uint8(x):
    return np.round(np.asarray(x) * 255.0).astype(np.uint8)


def epoch_arrays(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def synthetic(n=24, size=8, seed=0, num_classes=4):
    rng = np.random.default_rng(seed)
    images = rng.integers(1, 256, (n, size, size, 3), dtype=np.uint8)
    labels = (np.arange(n) % num_classes).astype(np.int32)
    return data.ArrayData(images, labels)


# --------------------------------------------------------------------------
# Image folder.
# --------------------------------------------------------------------------


def test_folder_shapes_labels_classes_and_pixels(tmp_path):
    root = make_folder(tmp_path / "imgs")
    train, test, info = data.load(cfg(name="folder", root=str(root)))

    assert info.class_names == ("ant", "bee", "cat")  # sorted folder names
    assert info.num_classes == 3 and info.image_size == 16
    assert (info.num_train, info.num_test) == (9, 6)
    assert train.images.shape == (9, 16, 16, 3)
    assert test.images.shape == (6, 16, 16, 3)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
    np.testing.assert_array_equal(train.labels, np.repeat([0, 1, 2], 3))
    np.testing.assert_array_equal(test.labels, np.repeat([0, 1, 2], 2))

    # Pixels agree with PIL, file by file in sorted order (PNG is lossless;
    # JPEG decoding with the accurate IDCT matches PIL exactly).
    files = sorted((root / "train" / "bee").iterdir())
    for k, path in enumerate(files):
        np.testing.assert_array_equal(train.images[3 + k], pil_decode(path))

    # Stats in [0, 1] units from the training arrays.
    ref = train.images.reshape(-1, 3).astype(np.float64) / 255.0
    np.testing.assert_allclose(info.mean, ref.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(info.std, ref.std(axis=0), rtol=1e-10)


def test_folder_resize_and_mixed_sizes(tmp_path):
    root = make_folder(tmp_path / "imgs", classes=("a", "b"), size=16)
    # One odd-sized image of a constant colour: resized alone, it stays
    # that colour.
    save_image(root / "train" / "b" / "zzz.png",
               np.full((20, 12, 3), (10, 200, 30), np.uint8))
    train, test, info = data.load(
        cfg(name="folder", root=str(root), image_size=8))
    assert train.images.shape == (7, 8, 8, 3)
    assert test.images.shape == (4, 8, 8, 3)
    assert info.image_size == 8
    np.testing.assert_array_equal(train.images[-1],
                                  np.full((8, 8, 3), (10, 200, 30)))
    # Antialiased bilinear agrees with PIL's bilinear (which widens its
    # filter when shrinking) up to rounding, shrinking and enlarging.
    image = pil_decode(sorted((root / "train" / "a").iterdir())[0])
    for size in (8, 12, 24):
        ours = data.resize_images(image[None], size)[0].astype(int)
        ref = np.asarray(Image.fromarray(image).resize((size, size),
                                                       Image.BILINEAR))
        assert np.abs(ours - ref.astype(int)).max() <= 1


def test_folder_cache_roundtrip_and_invalidation(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", classes=("a", "b"))
    cache = tmp_path / "cache"
    first = data.load(cfg(name="folder", root=str(root), cache_dir=str(cache)))
    entries = sorted(os.listdir(cache))
    assert len(entries) == 1 and entries[0].endswith(".npz")

    def no_decode(*args):
        raise AssertionError("decoded although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(data, "_decode_image", no_decode)
        second = data.load(
            cfg(name="folder", root=str(root), cache_dir=str(cache)))
        # A native-size entry also serves other image sizes.
        resized = data.load(cfg(name="folder", root=str(root),
                                cache_dir=str(cache), image_size=8))
    for a, b in zip(first[:2], second[:2]):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
    assert first[2] == second[2]
    assert resized[0].images.shape[1:] == (8, 8, 3)

    # Changing one file changes the key: new entry, new pixels.
    path = root / "test" / "b" / "001.jpg"
    new_pixels = np.full((16, 16, 3), 7, np.uint8)
    path.unlink()
    save_image(path.with_suffix(".png"), new_pixels)
    third = data.load(cfg(name="folder", root=str(root), cache_dir=str(cache)))
    assert len(os.listdir(cache)) == 2  # no temporary files left behind
    np.testing.assert_array_equal(third[1].images[3], new_pixels)


# --------------------------------------------------------------------------
# Embedded subset and its build tool.
# --------------------------------------------------------------------------


def test_embedded_default_is_shipped_and_balanced():
    asset = importlib.resources.files("e2rnas_tf").joinpath(
        "assets", "cifar10_subset.npz")
    assert asset.is_file()
    assert asset.stat().st_size < 1_500_000  # JPEG bytes, not raw pixels

    train, test, info = data.load(cfg(name="embedded"))
    assert train.images.shape == (2000, 32, 32, 3)
    assert test.images.shape == (500, 32, 32, 3)
    assert info.num_classes == 10 and info.image_size == 32
    assert info.class_names[:3] == ("airplane", "automobile", "bird")
    np.testing.assert_array_equal(np.bincount(train.labels), [200] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [50] * 10)
    assert all(0.3 < m < 0.6 for m in info.mean)
    assert all(0.15 < s < 0.35 for s in info.std)


def test_embedded_matches_shared_tarball():
    tarball = next((p for p in SHARED_TARBALLS if p.exists()), None)
    if tarball is None:
        pytest.skip("shared CIFAR-10 tarball not found in /work/shared/data "
                    "or ../shared/data; pixel check skipped")
    train, test, info = data.load(cfg(name="embedded"))
    with np.load(data.embedded_path().open("rb"), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    # The deterministic choice: the first 200 / 50 files by name per class.
    assert arrays["train_files"][200].endswith("train/automobile/0000.jpg")
    assert arrays["train_files"][399].endswith("train/automobile/0199.jpg")
    assert arrays["test_files"][-1].endswith("test/truck/0049.jpg")
    picks = [("train", train, 0), ("train", train, 1234),
             ("test", test, 499)]
    with tarfile.open(tarball, "r:gz") as tar:
        for split, split_data, i in picks:
            name = str(arrays[f"{split}_files"][i])
            raw = tar.extractfile(name).read()
            lo, hi = arrays[f"{split}_offsets"][i:i + 2]
            assert arrays[f"{split}_jpeg"][lo:hi].tobytes() == raw
            np.testing.assert_array_equal(split_data.images[i],
                                          pil_decode(raw))
            cls = name.split("/")[-2]
            assert info.class_names[split_data.labels[i]] == cls


def make_jpeg_tarball(path, classes=("b_cls", "a_cls"), n_train=3, n_test=2):
    rng = np.random.default_rng(1)
    with tarfile.open(path, "w:gz") as tar:
        for split, count in (("train", n_train), ("test", n_test)):
            for cls in classes:
                # Reverse write order: the tool must sort names itself.
                for i in reversed(range(count)):
                    buffer = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (8, 8, 3),
                                                 dtype=np.uint8)).save(
                        buffer, format="JPEG")
                    info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.jpg")
                    info.size = buffer.tell()
                    buffer.seek(0)
                    tar.addfile(info, buffer)
    return path


def test_build_tool_keeps_bytes_and_is_reproducible(tmp_path):
    tool = load_tool("build_embedded_data")
    tarball = make_jpeg_tarball(tmp_path / "mini.tar.gz")
    out1, out2 = tmp_path / "a.npz", tmp_path / "b.npz"
    per_class = {"train": 2, "test": 1}
    tool.build(str(tarball), str(out1), per_class)
    tool.build(str(tarball), str(out2), per_class)
    assert out1.read_bytes() == out2.read_bytes()

    train, test, class_names = data.read_embedded(str(out1))
    assert class_names == ("a_cls", "b_cls")
    np.testing.assert_array_equal(train.labels, [0, 0, 1, 1])
    np.testing.assert_array_equal(test.labels, [0, 1])
    with tarfile.open(tarball) as tar:
        for k, name in enumerate(["train/a_cls/0000.jpg",
                                  "train/a_cls/0001.jpg",
                                  "train/b_cls/0000.jpg"]):
            raw = tar.extractfile(name).read()
            np.testing.assert_array_equal(train.images[k], pil_decode(raw))
    with np.load(out1, allow_pickle=False) as npz:
        assert npz["train_offsets"].dtype == np.int64
        assert npz["train_jpeg"].dtype == np.uint8


# --------------------------------------------------------------------------
# Subsets and search split.
# --------------------------------------------------------------------------


def test_num_train_num_test_subsets_are_balanced_and_seeded():
    base = cfg(name="embedded", num_train=105, num_test=20, seed=3)
    train, test, info = data.load(base)
    assert (len(train), len(test)) == (105, 20)
    assert (info.num_train, info.num_test) == (105, 20)
    counts = np.bincount(train.labels, minlength=10)
    assert counts.min() == 10 and counts.max() == 11
    np.testing.assert_array_equal(np.bincount(test.labels), [2] * 10)
    again, _, _ = data.load(base)
    np.testing.assert_array_equal(again.images, train.images)
    other, _, _ = data.load(cfg(name="embedded", num_train=105, num_test=20,
                                seed=4))
    assert not np.array_equal(other.images, train.images)


def test_search_split_disjoint_covering_deterministic():
    full = synthetic(n=100, num_classes=5)
    full = data.ArrayData(full.images, np.arange(100, dtype=np.int32) % 5)
    ids = full.images.reshape(100, -1)[:, :8]  # row fingerprints

    a, b = data.search_split(full, 0.5, seed=0)
    assert (len(a), len(b)) == (50, 50)
    ia, _ = data.split_indices(full.labels, 0.5, seed=0)
    np.testing.assert_array_equal(a.images, full.images[ia])
    both = np.concatenate([a.images, b.images]).reshape(100, -1)[:, :8]
    assert sorted(map(bytes, both)) == sorted(map(bytes, ids))
    assert not set(map(bytes, a.images.reshape(50, -1))) & set(
        map(bytes, b.images.reshape(50, -1)))
    np.testing.assert_array_equal(np.bincount(a.labels), [10] * 5)

    a2, _ = data.search_split(full, 0.5, seed=0)
    np.testing.assert_array_equal(a2.images, a.images)
    a3, _ = data.search_split(full, 0.5, seed=1)
    assert not np.array_equal(a3.images, a.images)

    c, d = data.search_split(full, 0.3, seed=0)
    assert (len(c), len(d)) == (30, 70)


# --------------------------------------------------------------------------
# Batch pipeline.
# --------------------------------------------------------------------------


def test_steps_per_epoch():
    assert data.steps_per_epoch(10, 4, training=True) == 2
    assert data.steps_per_epoch(10, 4, training=False) == 3
    assert data.steps_per_epoch(8, 4, training=False) == 2


def test_batches_deterministic_resumable_and_in_range():
    d = synthetic(n=24)
    kwargs = dict(seed=5, training=True, cutout=4)
    x1, y1 = epoch_arrays(data.batches(d, 4, epoch=2, **kwargs))
    x2, y2 = epoch_arrays(data.batches(d, 4, epoch=2, **kwargs))
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    x3, _ = epoch_arrays(data.batches(d, 4, epoch=3, **kwargs))
    assert not np.array_equal(x1, x3)
    assert x1.dtype == np.float32 and x1.min() >= 0.0 and x1.max() <= 1.0
    assert x1.max() > 0.5

    # Resume: skip_batches=k == the same epoch without its first k batches.
    xs, ys = epoch_arrays(data.batches(d, 4, epoch=2, skip_batches=2,
                                       **kwargs))
    np.testing.assert_array_equal(xs, x1[8:])
    np.testing.assert_array_equal(ys, y1[8:])
    assert len(list(data.batches(d, 4, epoch=2, skip_batches=6,
                                 **kwargs))) == 0

    # The example at position p gets the same augmentation whatever the
    # batch size.
    x8, _ = epoch_arrays(data.batches(d, 8, epoch=2, **kwargs))
    np.testing.assert_array_equal(x8, x1)


def test_batches_shapes_and_remainder():
    d = synthetic(n=10)
    train_ds = data.batches(d, 4, seed=0, epoch=0, training=True)
    assert train_ds.element_spec[0].shape.as_list() == [4, 8, 8, 3]
    assert train_ds.element_spec[1].dtype == tf.int32
    assert [int(y.shape[0]) for _, y in train_ds] == [4, 4]

    eval_ds = data.batches(d, 4, seed=0, epoch=0, training=False)
    sizes = [int(y.shape[0]) for _, y in eval_ds]
    assert sizes == [4, 4, 2]
    x, y = epoch_arrays(eval_ds)
    np.testing.assert_array_equal(to_uint8(x), d.images)  # fixed order
    np.testing.assert_array_equal(y, d.labels)
    xs, _ = epoch_arrays(data.batches(d, 4, seed=0, epoch=0, training=False,
                                      skip_batches=2))
    np.testing.assert_array_equal(to_uint8(xs), d.images[8:])


def test_training_without_augmentation_is_a_permutation():
    d = synthetic(n=12)
    d = data.ArrayData(d.images, np.arange(12, dtype=np.int32))
    x, y = epoch_arrays(data.batches(d, 4, seed=1, epoch=0, training=True,
                                     crop_padding=0, flip=False))
    assert sorted(y) == list(range(12)) and list(y) != list(range(12))
    np.testing.assert_array_equal(to_uint8(x), d.images[y])  # labels follow


def find_crop(out, src, pad):
    """All (dy, dx, flipped) with out == crop of zero-padded src."""
    h, w = src.shape[:2]
    padded = np.pad(src, ((pad, pad), (pad, pad), (0, 0)))
    found = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            window = padded[dy:dy + h, dx:dx + w]
            if np.array_equal(out, window):
                found.append((dy, dx, False))
            if np.array_equal(out, window[:, ::-1]):
                found.append((dy, dx, True))
    return found


@pytest.mark.parametrize("flip", [True, False])
def test_crop_and_flip_match_numpy_reference(flip):
    n, pad = 32, 2
    d = synthetic(n=n, size=8)
    d = data.ArrayData(d.images, np.arange(n, dtype=np.int32))
    x, y = epoch_arrays(data.batches(d, 8, seed=0, epoch=0, training=True,
                                     crop_padding=pad, flip=flip))
    seen = set()
    for out, label in zip(to_uint8(x), y):
        found = find_crop(out, d.images[label], pad)
        assert len(found) == 1, found
        seen.add(found[0])
    flips = {f for _, _, f in seen}
    assert flips == ({True, False} if flip else {False})
    assert len({(dy, dx) for dy, dx, _ in seen}) > 5  # offsets vary


def test_cutout_zeroes_a_square_of_the_right_size():
    n, length = 40, 4
    d = data.ArrayData(np.full((n, 10, 10, 3), 200, np.uint8),
                       np.zeros(n, np.int32))
    x, _ = epoch_arrays(data.batches(d, 8, seed=0, epoch=0, training=True,
                                     crop_padding=0, flip=False,
                                     cutout=length))
    x = to_uint8(x)
    full_squares = 0
    for image in x:
        zero = (image == 0).all(-1)
        assert ((image == 0) | (image == 200)).all()
        rows, cols = np.flatnonzero(zero.any(1)), np.flatnonzero(zero.any(0))
        assert rows.size and cols.size  # the centre is always inside
        # The zeros form one axis-aligned rectangle ...
        assert zero[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
        assert zero.sum() == rows.size * cols.size
        # ... of side `length`, clipped only at the border.
        for idx, size in ((rows, 10), (cols, 10)):
            assert idx.size <= length
            if idx[0] > 0 and idx[-1] < size - 1:
                assert idx.size == length
        full_squares += rows.size == length and cols.size == length
    assert full_squares > 0
    plain, _ = epoch_arrays(data.batches(d, 8, seed=0, epoch=0, training=True,
                                         crop_padding=0, flip=False))
    assert (to_uint8(plain) == 200).all()


# --------------------------------------------------------------------------
# TFDS (real builders, fake downloads, no network).
# --------------------------------------------------------------------------


def _tfds():
    tfds = pytest.importorskip("tensorflow_datasets")
    return tfds


def fake_cifar(download_dir, name, rng):
    """Writes CIFAR binary records; returns {split: (images, labels)}."""
    if name == "cifar10":
        folder, files = "cifar-10-batches-bin", {
            "train": [f"data_batch_{i}.bin" for i in range(1, 6)],
            "test": ["test_batch.bin"]}
        label_files = {"batches.meta.txt": [f"c{i}" for i in range(10)]}
        num_classes, per_file = 10, {"train": 4, "test": 10}
    else:
        folder, files = "cifar-100-binary", {"train": ["train.bin"],
                                             "test": ["test.bin"]}
        label_files = {"coarse_label_names.txt": [f"k{i}" for i in range(20)],
                       "fine_label_names.txt": [f"f{i}" for i in range(100)]}
        num_classes, per_file = 100, {"train": 100, "test": 100}
    base = download_dir / folder
    base.mkdir(parents=True)
    for fname, names in label_files.items():
        (base / fname).write_text("\n".join(names) + "\n")
    expected = {}
    for split, fnames in files.items():
        all_images, all_labels = [], []
        # Every class in both splits (data.load refuses a class without
        # images), in random order.
        split_labels = rng.permutation(
            np.arange(per_file[split] * len(fnames)) % num_classes)
        for k, fname in enumerate(fnames):
            n = per_file[split]
            labels = split_labels[k * n:(k + 1) * n].astype(np.uint8)
            images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            with open(base / fname, "wb") as f:
                for label, image in zip(labels, images):
                    if name == "cifar100":
                        f.write(bytes([label // 5]))  # coarse label first
                    f.write(bytes([label]))
                    f.write(image.transpose(2, 0, 1).tobytes())
            all_images.append(images)
            all_labels.append(labels)
        expected[split] = (np.concatenate(all_images),
                           np.concatenate(all_labels))
    return expected, num_classes


def fake_svhn(download_dir, rng):
    scipy_io = pytest.importorskip("scipy.io")
    download_dir.mkdir(parents=True)
    expected, paths = {}, {}
    for split, n in (("train", 12), ("test", 10), ("extra", 1)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        digits = rng.permutation(np.arange(n) % 10)  # every class
        # SVHN stores X as [32, 32, 3, N] and digit 0 as label 10.
        scipy_io.savemat(download_dir / f"{split}.mat", {
            "X": np.moveaxis(images, 0, -1),
            "y": np.where(digits == 0, 10, digits).reshape(-1, 1)})
        expected[split] = (images, digits)
        paths[split] = str(download_dir / f"{split}.mat")
    return expected, paths


@contextlib.contextmanager
def no_network_and_no_preparing(monkeypatch):
    """Within: name lookups fail and TFDS's `download_and_prepare` is a
    spy; yields (looked-up hosts, spy)."""
    import socket

    tfds = _tfds()
    looked_up = []

    def getaddrinfo(host, *args, **kwargs):
        looked_up.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    spy = mock.Mock(side_effect=AssertionError("download_and_prepare ran"))
    with monkeypatch.context() as m:
        m.setattr(socket, "getaddrinfo", getaddrinfo)
        m.setattr(tfds.core.DatasetBuilder, "download_and_prepare", spy)
        yield looked_up, spy


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn_cropped"])
def test_tfds_sources_on_prepared_data(tmp_path, name, monkeypatch):
    tfds = _tfds()
    if importlib.util.find_spec("importlib_resources") is None:
        # tensorflow-datasets 4.9.x needs it to prepare data on Python >= 3.9
        # but does not declare it (tensorflow/datasets#11212); the stdlib
        # module provides the one attribute it uses.
        monkeypatch.setitem(sys.modules, "importlib_resources",
                            importlib.resources)
    rng = np.random.default_rng(0)
    download_dir = tmp_path / "downloads"
    manager = tfds.download.DownloadManager
    if name == "svhn_cropped":
        expected, paths = fake_svhn(download_dir, rng)
        num_classes = 10
        patch = mock.patch.object(manager, "download",
                                  lambda self, urls: paths)
    else:
        expected, num_classes = fake_cifar(download_dir, name, rng)
        patch = mock.patch.object(manager, "download_and_extract",
                                  lambda self, url: str(download_dir))
    data_dir = tmp_path / "tfds"
    with patch:
        tfds.builder(name, data_dir=str(data_dir)).download_and_prepare()

    with no_network_and_no_preparing(monkeypatch) as (looked_up, spy):
        train, test, info = data.load(cfg(name=name,
                                          data_dir=str(data_dir)))
    assert looked_up == [] and spy.call_count == 0
    assert info.num_classes == num_classes
    assert len(info.class_names) == num_classes
    if name == "cifar10":
        assert info.class_names[3] == "c3"
    for split, got in (("train", train), ("test", test)):
        images, labels = expected[split]
        assert got.images.shape == images.shape and got.images.dtype == np.uint8
        assert got.labels.dtype == np.int32
        # TFDS shuffles the records; match every example by its pixels.
        key = {img.tobytes(): int(lab) for img, lab in zip(images, labels)}
        assert len(key) == len(images)
        for img, lab in zip(got.images, got.labels):
            assert key[img.tobytes()] == lab


def snapshot(root):
    """{relative path: bytes or None for a folder} of everything under
    `root`."""
    out = {}
    for path in sorted(pathlib.Path(root).rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = None if path.is_dir() else path.read_bytes()
    return out


def user_tfds_dir(root):
    """A TFDS data_dir that already holds the user's files, among them the
    debris of an earlier failed download (not ours to delete)."""
    (root / "downloads" / "manual").mkdir(parents=True)
    (root / "downloads" / "manual" / "keep.bin").write_bytes(b"mine")
    (root / "downloads" / "old.tar.gz.tmp.0123").mkdir()
    (root / "notes.txt").write_text("user notes")
    return root


def test_tfds_offline_refuses_before_downloading(tmp_path, monkeypatch):
    data_dir = user_tfds_dir(tmp_path / "tfds")
    before = snapshot(data_dir)
    with no_network_and_no_preparing(monkeypatch) as (looked_up, spy):
        message = assert_data_error(
            lambda: data.load(cfg(name="cifar10", data_dir=str(data_dir))),
            "'cifar10' is not prepared in " + str(data_dir),
            "www.cs.toronto.edu is unreachable",
            "--config.data.data_dir=<dir with prepared tfds data>",
            "--config.data.name=folder --config.data.root=<image folder>")
    # The mechanism that makes it fast: one look-up of the one download
    # host, and TFDS (whose download retries for minutes) never started.
    assert looked_up == ["www.cs.toronto.edu"], message
    assert spy.call_count == 0
    assert snapshot(data_dir) == before


def test_tfds_probe_goes_through_the_proxy_requests_would_use(tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    for name in ("NO_PROXY", "no_proxy", "https_proxy", "ALL_PROXY",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with no_network_and_no_preparing(monkeypatch) as (looked_up, spy):
        assert_data_error(
            lambda: data.read_tfds("cifar10", str(tmp_path / "tfds")),
            "proxy proxy.example:3128 is unreachable",
            "--config.data.data_dir=")
    assert looked_up == ["proxy.example"] and spy.call_count == 0
    assert not (tmp_path / "tfds").exists()


def test_tfds_incomplete_preparation_is_named(tmp_path, monkeypatch):
    # A version folder without dataset_info.json (e.g. copied in part):
    # TFDS would "reuse" it and fail later; it is refused with its path.
    version_dir = pathlib.Path(_tfds().builder(
        "cifar10", data_dir=str(tmp_path / "tfds")).data_dir)
    version_dir.mkdir(parents=True)
    with no_network_and_no_preparing(monkeypatch) as (looked_up, spy):
        assert_data_error(
            lambda: data.read_tfds("cifar10", str(tmp_path / "tfds")),
            f"{version_dir} holds no dataset_info.json",
            "delete that folder", "--config.data.data_dir=")
    assert looked_up == [] and spy.call_count == 0


def test_tfds_failed_download_removes_only_its_temporaries(tmp_path,
                                                           monkeypatch):
    """The hosts answer but the download fails: TFDS's temporary files of
    this call are removed, the user's files (even old debris) stay."""
    import socket

    _tfds()
    downloader = importlib.import_module(
        "tensorflow_datasets.core.download.downloader")
    data_dir = user_tfds_dir(tmp_path / "tfds")
    before = snapshot(data_dir)
    monkeypatch.setattr(socket, "create_connection",
                        lambda *a, **k: mock.Mock())  # the probe succeeds
    seen = []

    def dropped(url, **kwargs):
        seen.append(sorted(str(p.relative_to(data_dir))
                           for p in data_dir.rglob("*.tmp.*")))
        raise ConnectionError(f"connection to {url} dropped")

    monkeypatch.setattr(downloader, "_open_url", dropped)
    assert_data_error(
        lambda: data.read_tfds("cifar10", str(data_dir)),
        "Cannot download TFDS dataset 'cifar10' into " + str(data_dir),
        "ConnectionError", "--config.data.data_dir=")
    # TFDS did start, once, with a temporary download folder; it is gone.
    assert len(seen) == 1, seen
    assert [p for p in seen[0] if "old.tar.gz" not in p], seen
    assert snapshot(data_dir) == before


# --------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------


def assert_data_error(fn, *fragments):
    with pytest.raises(data.DataError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_error_unknown_dataset_name():
    assert_data_error(lambda: data.load(cfg(name="imagenet")), "'imagenet'",
                      *data.DATASETS)


def test_errors_folder_layout(tmp_path):
    def load(root, **kw):
        return lambda: data.load(cfg(name="folder", root=str(root), **kw))

    assert_data_error(load(tmp_path / "nope"), "does not exist",
                      str(tmp_path / "nope"))
    root = tmp_path / "r"
    (root / "test" / "a").mkdir(parents=True)
    assert_data_error(load(root), "Missing train folder")
    (root / "train").mkdir()
    assert_data_error(load(root), "No class folders", "train")
    (root / "train" / "a").mkdir()
    (root / "train" / "b").mkdir()
    save_image(root / "train" / "a" / "0.png", np.zeros((4, 4, 3), np.uint8))
    save_image(root / "test" / "a" / "0.png", np.zeros((4, 4, 3), np.uint8))
    assert_data_error(load(root), "class mismatch", "only in train: ['b']")
    (root / "test" / "b").mkdir()
    save_image(root / "test" / "b" / "0.png", np.zeros((4, 4, 3), np.uint8))
    (root / "train" / "b" / "readme.txt").write_text("x")
    assert_data_error(load(root), "has no images", str(root / "train" / "b"))
    no_test = tmp_path / "r2"
    (no_test / "train" / "a").mkdir(parents=True)
    assert_data_error(load(no_test), "Missing test folder")


@pytest.fixture
def good_folder(tmp_path):
    return make_folder(tmp_path / "imgs", classes=("a", "b"), size=8)


def test_error_corrupt_and_unreadable_images(good_folder):
    bad = good_folder / "train" / "a" / "001.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG
    assert_data_error(
        lambda: data.load(cfg(name="folder", root=str(good_folder))),
        "Corrupt image", str(bad))
    bad.write_bytes(b"this is not an image at all")
    assert_data_error(
        lambda: data.load(cfg(name="folder", root=str(good_folder))),
        "not a JPEG or PNG", str(bad))


@pytest.mark.parametrize("array,fname,kind", [
    (np.zeros((8, 8), np.uint8), "gray.png", "grayscale"),
    (np.zeros((8, 8), np.uint8), "gray.jpg", "grayscale"),
    (np.zeros((8, 8, 4), np.uint8), "rgba.png", "RGBA"),
])
def test_error_non_rgb_images(good_folder, array, fname, kind):
    path = good_folder / "test" / "b" / fname
    save_image(path, array)
    assert_data_error(
        lambda: data.load(cfg(name="folder", root=str(good_folder))),
        str(path), kind, "3-channel")


def test_error_mixed_sizes_without_image_size(good_folder):
    path = good_folder / "train" / "b" / "zz_big.png"
    save_image(path, np.ones((12, 12, 3), np.uint8))
    assert_data_error(
        lambda: data.load(cfg(name="folder", root=str(good_folder))),
        str(path), "12x12", "data.image_size")
    train, _, _ = data.load(cfg(name="folder", root=str(good_folder),
                                image_size=8))
    assert train.images.shape[1:] == (8, 8, 3)


def test_error_labels_out_of_range(tmp_path):
    tool = load_tool("build_embedded_data")
    tarball = make_jpeg_tarball(tmp_path / "mini.tar.gz")
    out = tmp_path / "bad.npz"
    arrays = tool.build(str(tarball), str(out), {"train": 2, "test": 1})
    arrays["train_labels"] = np.array([0, 1, 2, 1], np.int32)  # 2 classes
    tool.write_npz(str(out), arrays)
    assert_data_error(lambda: data.read_embedded(str(out)),
                      "labels out of range", "found 2", "0..1")


def test_error_empty_splits_and_small_batches():
    d = synthetic(n=6)
    assert_data_error(lambda: data.search_split(d, 0.0, seed=0),
                      "train_portion=0.0", "empty split")
    assert_data_error(lambda: data.search_split(d, 1.0, seed=0),
                      "empty split")
    assert_data_error(
        lambda: data.batches(d, 8, seed=0, epoch=0, training=True),
        "6 examples", "batch_size=8")
    # Evaluation keeps the remainder, so a small split is fine there.
    assert len(list(data.batches(d, 8, seed=0, epoch=0, training=False))) == 1
    empty = data.ArrayData(np.zeros((0, 8, 8, 3), np.uint8),
                           np.zeros(0, np.int32))
    assert_data_error(
        lambda: data.batches(empty, 2, seed=0, epoch=0, training=False),
        "empty split")
    assert_data_error(lambda: data.load(cfg(name="embedded",
                                            num_train=5000)),
                      "num_train=5000", "2000")


def test_error_data_that_cannot_train_a_classifier(tmp_path, monkeypatch):
    one = make_folder(tmp_path / "one", classes=("a",), size=8)
    assert_data_error(lambda: data.load(cfg(name="folder", root=str(one))),
                      f"Only 1 class folder in {one / 'train'} (a)",
                      "a classifier needs at least 2 classes")
    # Any other source with one class (here an embedded file).
    tool = load_tool("build_embedded_data")
    path = tmp_path / "one.npz"
    arrays = tool.build(str(make_jpeg_tarball(tmp_path / "one.tar.gz",
                                              classes=("a_cls",))),
                        str(path), {"train": 2, "test": 1})
    monkeypatch.setattr(data, "embedded_path", lambda: path)
    assert_data_error(lambda: data.load(cfg(name="embedded")),
                      "Dataset 'embedded' has 1 class(es) ['a_cls']",
                      "at least 2 classes")
    # A class without test images in the data itself.
    arrays = tool.build(str(make_jpeg_tarball(tmp_path / "two.tar.gz")),
                        str(path), {"train": 2, "test": 1})
    arrays["test_labels"][:] = 0
    tool.write_npz(str(path), arrays)
    assert_data_error(lambda: data.load(cfg(name="embedded")),
                      "The test split has no images of 1 of the 2 classes "
                      "(b_cls)", "every class needs training and test images")


def test_error_subsets_that_leave_classes_out():
    # The shipped subset: 10 classes, balanced subsets.
    assert_data_error(lambda: data.load(cfg(name="embedded", num_test=5)),
                      "The test split has no images of 5 of the 10 classes",
                      "data.num_test=5 is fewer than the 10 classes",
                      "at least 10 (0 = all)")
    assert_data_error(lambda: data.load(cfg(name="embedded", num_train=3)),
                      "The train split has no images of 7 of the 10 classes",
                      ", ...);", "data.num_train=3")
    train, test, _ = data.load(cfg(name="embedded", num_train=10,
                                   num_test=10))
    assert sorted(train.labels) == sorted(test.labels) == list(range(10))


def test_check_batch_fits_names_the_numbers():
    data.check_batch_fits(8, {"training": 8})  # one full batch is enough
    assert_data_error(lambda: data.check_batch_fits(16, {"training": 8}),
                      "Fewer training images than one batch: 8 training "
                      "images, batch_size=16", "lower config.batch_size",
                      "data.num_train")
    assert_data_error(
        lambda: data.check_batch_fits(
            16, {"weight-training": 20, "architecture": 12},
            " in a search split"),
        "one batch in a search split: 20 weight-training / 12 architecture "
        "images, batch_size=16")


def test_array_data_validates_its_arrays():
    with pytest.raises(ValueError, match="uint8"):
        data.ArrayData(np.zeros((2, 4, 4, 3), np.float32),
                       np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="int32"):
        data.ArrayData(np.zeros((2, 4, 4, 3), np.uint8),
                       np.zeros(3, np.int32))
