"""Data layer: in-memory uint8 arrays and one deterministic `tf.data` pipeline.

Every source (the embedded CIFAR-10 subset shipped with the package, an image
folder, or a TFDS data set) is first turned into `ArrayData`: uint8 images
`[N, H, W, 3]` and int32 labels `[N]` held in memory. A single pipeline,
`batches()`, then shuffles, augments and batches these arrays.

The batch stream is a pure function of `(arrays, seed, epoch)`, so a run can be
resumed mid-epoch with `skip_batches`:

- the shuffle is `np.random.default_rng([seed, epoch]).permutation(N)`;
- the augmentation parameters (crop offsets, flips, cutout centres) are drawn
  once per epoch, for all N positions, from
  `np.random.default_rng([seed, epoch, 1])`; the example at position `p` of the
  epoch always gets parameters `p`, whatever the batch size or the number of
  batches skipped. The TF side only applies them (vectorised over the batch).

Pixels stay float32 in [0, 1]; normalisation belongs to the model, which reads
the per-channel mean/std from `DatasetInfo`.

Reference:
- [Liu et al., 2019. DARTS: Differentiable Architecture Search](
    https://arxiv.org/abs/1806.09055) (search split, augmentation).
- [DeVries and Taylor, 2017. Improved Regularization of Convolutional Neural
    Networks with Cutout](https://arxiv.org/abs/1708.04552).
- [E2RNAS, 2020](https://arxiv.org/abs/2011.09820).
"""

import dataclasses
import hashlib
import importlib.resources
import os
import socket
import tempfile
import threading
import warnings
import zipfile

import numpy as np
import tensorflow as tf

DATASETS = ("embedded", "folder", "cifar10", "cifar100", "svhn_cropped")
TFDS_DATASETS = ("cifar10", "cifar100", "svhn_cropped")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
EMBEDDED_ASSET = ("assets", "cifar10_subset.npz")

# Bump when the folder cache layout or decoding changes, so that old cache
# files are ignored instead of misread.
_CACHE_VERSION = 1
# Constants mixed into seeds so that subset choice, search split and batch
# shuffles never share a random stream (batches use [seed, epoch]).
_SALT_TRAIN_SUBSET = 0x7472_6E73
_SALT_TEST_SUBSET = 0x7465_7374
_SALT_SEARCH_SPLIT = 0x7370_6C74
_RESIZE_CHUNK = 2048
_STATS_CHUNK = 1 << 20  # pixels


class DataError(ValueError):
    """A problem with the data itself (files, folders, labels, split sizes).

    The message is one line and names the offending file, folder or setting.
    """


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and trainer need to know about a loaded data set.

    Attributes:
        name: Data set name, one of `DATASETS`.
        num_classes: Number of classes.
        image_size: Height == width of the arrays (after any resize).
        class_names: Class names, index = label.
        mean: Per-channel mean of the training images, in [0, 1] units.
        std: Per-channel standard deviation of the training images, in
            [0, 1] units (population std; a constant channel gets 1.0).
        num_train: Number of training examples.
        num_test: Number of test examples.
    """

    name: str
    num_classes: int
    image_size: int
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_train: int
    num_test: int


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayData:
    """Images and labels held in memory.

    Attributes:
        images: uint8 array `[N, H, W, 3]`.
        labels: int32 array `[N]`.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        images, labels = self.images, self.labels
        if (
            not isinstance(images, np.ndarray)
            or images.dtype != np.uint8
            or images.ndim != 4
            or images.shape[-1] != 3
        ):
            raise ValueError(
                "Expected images to be a uint8 array of shape [N, H, W, 3]. "
                f"Received: images={_describe_array(images)}"
            )
        if (
            not isinstance(labels, np.ndarray)
            or labels.dtype != np.int32
            or labels.shape != images.shape[:1]
        ):
            raise ValueError(
                "Expected labels to be an int32 array of shape "
                f"[{images.shape[0]}]. "
                f"Received: labels={_describe_array(labels)}"
            )

    def __len__(self):
        return int(self.labels.shape[0])


def _describe_array(x):
    if isinstance(x, np.ndarray):
        return f"ndarray(shape={x.shape}, dtype={x.dtype})"
    return type(x).__name__


# --------------------------------------------------------------------------
# Public entry points.
# --------------------------------------------------------------------------


def load(data_cfg):
    """Loads a data set into memory as uint8 arrays.

    Args:
        data_cfg: Any object with attributes (an `ml_collections.ConfigDict`
            in practice). Read: `name` (one of `DATASETS`), `root` (image
            folder, for `name="folder"`), `data_dir` (TFDS directory, '' =
            TFDS default), `image_size` (0 = native size; otherwise resize
            once, antialiased bilinear, to `image_size x image_size`),
            `num_train` / `num_test` (0 = all; otherwise a seeded,
            class-balanced subset), `cache_dir` ('' = no cache; folder only)
            and `seed` (for the subsets; 0 if absent). Missing attributes
            take these defaults, except `name`.

    Returns:
        `(train, test, info)`: two `ArrayData` and a `DatasetInfo` whose
        mean/std are computed from the returned training images.

    Raises:
        DataError: for any problem with the data (see the message), among
            them data that cannot train a classifier: fewer than 2 classes,
            or a class without training or test images (after the
            `num_train` / `num_test` subsets).

    Example:

    >>> import types
    >>> cfg = types.SimpleNamespace(name="embedded", image_size=0)
    >>> train, test, info = load(cfg)
    >>> train.images.shape, info.num_classes
    ((2000, 32, 32, 3), 10)
    """
    name = getattr(data_cfg, "name", None)
    if name not in DATASETS:
        raise DataError(
            f"Unknown dataset name {name!r}; valid names: {', '.join(DATASETS)}"
        )
    image_size = _non_negative_int(data_cfg, "image_size")
    num_train = _non_negative_int(data_cfg, "num_train")
    num_test = _non_negative_int(data_cfg, "num_test")
    seed = int(getattr(data_cfg, "seed", 0) or 0)

    if name == "embedded":
        train, test, class_names = read_embedded()
    elif name == "folder":
        train, test, class_names = read_folder(
            str(getattr(data_cfg, "root", "") or ""),
            image_size=image_size,
            cache_dir=str(getattr(data_cfg, "cache_dir", "") or ""),
        )
    else:
        train, test, class_names = read_tfds(
            name, str(getattr(data_cfg, "data_dir", "") or "")
        )
    num_classes = len(class_names)
    if num_classes < 2:
        raise DataError(
            f"Dataset {name!r} has {num_classes} class(es) {list(class_names)}"
            "; a classifier needs at least 2 classes")
    _check_labels(train, num_classes, "train")
    _check_labels(test, num_classes, "test")

    train = _balanced_subset(train, num_train, seed, _SALT_TRAIN_SUBSET,
                             "num_train")
    test = _balanced_subset(test, num_test, seed, _SALT_TEST_SUBSET,
                            "num_test")
    _check_every_class(train, class_names, "train", num_train)
    _check_every_class(test, class_names, "test", num_test)
    if image_size:
        train = ArrayData(resize_images(train.images, image_size),
                          train.labels)
        test = ArrayData(resize_images(test.images, image_size), test.labels)
    for split, data in (("train", train), ("test", test)):
        if len(data) == 0:
            raise DataError(f"The {split} split of {name!r} is empty")
        height, width = data.images.shape[1:3]
        if height != width:
            raise DataError(
                f"{split} images are {height}x{width}, not square; "
                "set data.image_size to resize them"
            )
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(
            f"train images are {train.images.shape[1:3]} but test images are "
            f"{test.images.shape[1:3]}; set data.image_size to resize them"
        )
    mean, std = channel_stats(train.images)
    info = DatasetInfo(
        name=name,
        num_classes=num_classes,
        image_size=int(train.images.shape[1]),
        class_names=tuple(class_names),
        mean=mean,
        std=std,
        num_train=len(train),
        num_test=len(test),
    )
    return train, test, info


def search_split(train, train_portion, seed):
    """Splits the training set into weight-training and arch-validation parts.

    As in DARTS, the supernet weights are trained on one part and the
    architecture parameters on the other. The split is stratified by class
    (each class is cut in the same proportion, up to rounding), disjoint,
    covers the whole set and depends only on `(labels, train_portion, seed)`.

    Args:
        train: `ArrayData`, the training set.
        train_portion: Fraction in (0, 1) of examples for weight training.
        seed: Integer seed.

    Returns:
        `(weight_train, arch_valid)`, two `ArrayData`, each in the original
        example order.

    Raises:
        DataError: if either part would be empty.

    Example:

    >>> data = ArrayData(np.zeros((10, 4, 4, 3), np.uint8),
    ...                  np.arange(10, dtype=np.int32) % 2)
    >>> a, b = search_split(data, 0.5, seed=0)
    >>> len(a), len(b)
    (5, 5)

    Reference:
    - [Liu et al., 2019](https://arxiv.org/abs/1806.09055), section 3.
    """
    train_portion = float(train_portion)
    if not 0.0 <= train_portion <= 1.0:
        raise ValueError(
            "Expected train_portion in [0, 1]. "
            f"Received: train_portion={train_portion}"
        )
    first, second = split_indices(train.labels, train_portion, seed)
    if first.size == 0 or second.size == 0:
        raise DataError(
            f"train_portion={train_portion} of {len(train)} examples leaves "
            f"an empty split ({first.size} weight-training, {second.size} "
            "architecture-validation)"
        )
    return _take(train, first), _take(train, second)


def split_indices(labels, train_portion, seed):
    """Stratified, seeded split of `range(len(labels))` into two index sets.

    Each class's examples are put in a random order; an example at rank `r`
    of a class of size `n_c` gets the key `(r + 0.5) / n_c`, and the
    `round(train_portion * N)` smallest keys (random tie-break) go to the
    first part. Every class is so cut in proportion, up to rounding.

    Args:
        labels: int array `[N]`.
        train_portion: Fraction of examples for the first part.
        seed: Integer seed.

    Returns:
        Two sorted int64 index arrays, disjoint, together `range(N)`.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    rng = np.random.default_rng([int(seed), _SALT_SEARCH_SPLIT])
    perm = rng.permutation(n)
    rank, class_size = _rank_within_class(labels[perm])
    key = (rank + 0.5) / np.maximum(class_size, 1)
    tie = rng.permutation(n)
    order = perm[np.lexsort((tie, key))]
    n_first = int(round(train_portion * n))
    return np.sort(order[:n_first]), np.sort(order[n_first:])


def steps_per_epoch(num_examples, batch_size, training):
    """Number of batches `batches()` yields per epoch.

    Args:
        num_examples: Size of the split.
        batch_size: Batch size.
        training: `True` drops the last partial batch, `False` keeps it.

    Returns:
        `num_examples // batch_size` when training, else the ceiling.

    Example:

    >>> steps_per_epoch(10, 4, training=True), steps_per_epoch(10, 4, False)
    (2, 3)
    """
    if int(batch_size) <= 0:
        raise ValueError(
            f"Expected batch_size > 0. Received: batch_size={batch_size}"
        )
    if int(num_examples) < 0:
        raise ValueError(
            f"Expected num_examples >= 0. Received: num_examples={num_examples}"
        )
    if training:
        return int(num_examples) // int(batch_size)
    return -(-int(num_examples) // int(batch_size))


def check_batch_fits(batch_size, sizes, where=""):
    """Refuses training splits smaller than one batch, naming the numbers.

    Training drops the last partial batch (static shapes), so such a split
    would train on nothing. Called by search (both halves of the search
    split) and train (the training set) before anything is written.

    Args:
        batch_size: The global batch size.
        sizes: `{name: number of images}` of the training splits, in the
            order to report them.
        where: Optional words after "one batch", e.g. which split.

    Raises:
        DataError: if any split holds fewer than `batch_size` images.

    Example:

    >>> check_batch_fits(16, {"weight-training": 20, "architecture": 20})
    >>> try:
    ...     check_batch_fits(16, {"training": 8})
    ... except DataError as e:
    ...     print(str(e).split(";")[0])
    Fewer training images than one batch: 8 training images, batch_size=16
    """
    batch_size = int(batch_size)
    if all(int(n) >= batch_size for n in sizes.values()):
        return
    counts = " / ".join(f"{int(n)} {name}" for name, n in sizes.items())
    raise DataError(
        f"Fewer training images than one batch{where}: {counts} images, "
        f"batch_size={batch_size}; lower config.batch_size or train on more "
        "images (data.num_train, 0 = all)")


def batches(data, batch_size, *, seed, epoch, training, crop_padding=4,
            flip=True, cutout=0, skip_batches=0):
    """One epoch of batches as a prefetched `tf.data.Dataset`.

    Training: the examples are shuffled by
    `np.random.default_rng([seed, epoch]).permutation(N)`, then augmented
    (random crop from the zero-padded image, horizontal flip, cutout) and
    batched with the last partial batch dropped, so the batch shape is
    static. Evaluation: fixed order, no augmentation, last batch kept.

    The stream is a pure function of `(data, seed, epoch)` and the
    arguments; `skip_batches=k` yields exactly the batches after the first
    `k`, without reading or augmenting the skipped examples.

    Args:
        data: `ArrayData`.
        batch_size: Examples per batch.
        seed: Integer seed of the run.
        epoch: Epoch number (changes the shuffle and augmentation).
        training: Whether to shuffle, augment and drop the remainder.
        crop_padding: Zero padding on each side before the random crop
            (0 = no crop). Training only.
        flip: Random horizontal flip with probability 1/2. Training only.
        cutout: Side of the square zeroed by cutout (0 = off). The square is
            centred at a uniform random pixel, rows
            `[cy - cutout // 2, cy - cutout // 2 + cutout)` (same for
            columns), clipped to the image. Training only.
        skip_batches: Number of leading batches of the epoch to skip.

    Returns:
        A `tf.data.Dataset` of `(images, labels)`: float32
        `[B, H, W, 3]` in [0, 1] and int32 `[B]`.

    Raises:
        DataError: if the split is empty or, when training, smaller than one
            batch.

    Example:

    >>> data = ArrayData(np.zeros((10, 8, 8, 3), np.uint8),
    ...                  np.zeros(10, np.int32))
    >>> ds = batches(data, 4, seed=0, epoch=0, training=True)
    >>> [tuple(x.shape) for x, _ in ds]
    [(4, 8, 8, 3), (4, 8, 8, 3)]

    Reference:
    - [DeVries and Taylor, 2017](https://arxiv.org/abs/1708.04552) (cutout).
    """
    for arg_name, value, minimum in (
        ("batch_size", batch_size, 1),
        ("crop_padding", crop_padding, 0),
        ("cutout", cutout, 0),
        ("skip_batches", skip_batches, 0),
    ):
        if int(value) != value or value < minimum:
            raise ValueError(
                f"Expected {arg_name} to be an integer >= {minimum}. "
                f"Received: {arg_name}={value}"
            )
    batch_size, crop_padding = int(batch_size), int(crop_padding)
    cutout, skip_batches = int(cutout), int(skip_batches)
    n = len(data)
    num_batches = steps_per_epoch(n, batch_size, training)
    if n == 0:
        raise DataError("Cannot make batches from an empty split (0 examples)")
    if num_batches == 0:
        raise DataError(
            f"The split has {n} examples, fewer than batch_size={batch_size}; "
            "training drops partial batches, so it would yield nothing"
        )
    if skip_batches > num_batches:
        raise ValueError(
            f"Expected skip_batches <= {num_batches} (batches per epoch). "
            f"Received: skip_batches={skip_batches}"
        )

    height, width = data.images.shape[1:3]
    start = skip_batches * batch_size
    if training:
        order = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
        params = augment_params(n, height, width, crop_padding, seed, epoch)
        end = num_batches * batch_size
        slices = (order[start:end],) + tuple(p[start:end] for p in params)
    else:
        slices = (np.arange(start, n),)

    images = tf.convert_to_tensor(data.images)
    labels = tf.convert_to_tensor(data.labels)

    def make_batch(index, *aug):
        x = tf.gather(images, index)
        if training:
            x = augment_batch(x, *aug, crop_padding=crop_padding, flip=flip,
                              cutout=cutout)
        x = tf.cast(x, tf.float32) / 255.0
        return x, tf.gather(labels, index)

    ds = tf.data.Dataset.from_tensor_slices(slices)
    ds = ds.batch(batch_size, drop_remainder=training)
    ds = ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def augment_params(n, height, width, crop_padding, seed, epoch):
    """Per-position augmentation parameters of one epoch.

    All five arrays are always drawn, in this order, for all `n` positions,
    so switching flip/cutout on or off, or changing the batch size, does not
    change the other parameters.

    Args:
        n: Number of positions (examples) in the epoch.
        height: Image height.
        width: Image width.
        crop_padding: Padding of the random crop.
        seed: Integer seed of the run.
        epoch: Epoch number.

    Returns:
        Tuple of int32 arrays `[n]`: crop row offset and column offset in
        `[0, 2 * crop_padding]`, flip flag in {0, 1}, cutout centre row in
        `[0, height)` and column in `[0, width)`.
    """
    rng = np.random.default_rng([int(seed), int(epoch), 1])
    span = 2 * int(crop_padding) + 1
    offset_y = rng.integers(0, span, size=n, dtype=np.int32)
    offset_x = rng.integers(0, span, size=n, dtype=np.int32)
    do_flip = rng.integers(0, 2, size=n, dtype=np.int32)
    centre_y = rng.integers(0, height, size=n, dtype=np.int32)
    centre_x = rng.integers(0, width, size=n, dtype=np.int32)
    return offset_y, offset_x, do_flip, centre_y, centre_x


def augment_batch(images, offset_y, offset_x, do_flip, centre_y, centre_x, *,
                  crop_padding, flip, cutout):
    """Applies crop, flip and cutout to a batch with given parameters.

    Vectorised over the batch: the crop and the flip are one pair of
    `tf.gather` calls on the padded batch, and cutout is one mask.

    Args:
        images: `[B, H, W, C]` tensor (any dtype).
        offset_y: int32 `[B]`, crop row offsets in `[0, 2 * crop_padding]`.
        offset_x: int32 `[B]`, crop column offsets.
        do_flip: int32 `[B]`, 1 = flip horizontally (ignored if not `flip`).
        centre_y: int32 `[B]`, cutout centre rows.
        centre_x: int32 `[B]`, cutout centre columns.
        crop_padding: Zero padding on each side before cropping.
        flip: Whether to apply `do_flip`.
        cutout: Side of the zeroed square, 0 = off.

    Returns:
        Tensor of the same shape and dtype as `images`.
    """
    shape = tf.shape(images)
    height, width = shape[1], shape[2]
    rows = tf.range(height)
    cols = tf.range(width)
    if crop_padding:
        pad = crop_padding
        images = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        row_index = offset_y[:, None] + rows[None, :]
        images = tf.gather(images, row_index, axis=1, batch_dims=1)
        col_index = offset_x[:, None] + cols[None, :]
    else:
        col_index = tf.broadcast_to(cols[None, :], [shape[0], width])
    if flip:
        # Flipping the crop = reading its columns right to left.
        start = col_index[:, :1]
        flipped = start + (width - 1) - (col_index - start)
        col_index = tf.where(do_flip[:, None] > 0, flipped, col_index)
    if crop_padding or flip:
        images = tf.gather(images, col_index, axis=2, batch_dims=1)
    if cutout:
        top = centre_y[:, None] - cutout // 2
        left = centre_x[:, None] - cutout // 2
        in_rows = (rows[None, :] >= top) & (rows[None, :] < top + cutout)
        in_cols = (cols[None, :] >= left) & (cols[None, :] < left + cutout)
        hole = in_rows[:, :, None] & in_cols[:, None, :]
        images = tf.where(hole[..., None], tf.zeros_like(images), images)
    return images


def resize_images(images, image_size):
    """Resizes uint8 images to `image_size x image_size` (antialiased).

    Bilinear with antialiasing (a proper low-pass when shrinking), rounded
    back to uint8. A no-op when the size already matches.

    Args:
        images: uint8 array `[N, H, W, 3]`.
        image_size: Target height and width, > 0.

    Returns:
        uint8 array `[N, image_size, image_size, 3]`.
    """
    if image_size <= 0:
        raise ValueError(
            f"Expected image_size > 0. Received: image_size={image_size}"
        )
    if images.shape[1:3] == (image_size, image_size):
        return images
    out = np.empty((images.shape[0], image_size, image_size, 3), np.uint8)
    for i in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = tf.image.resize(images[i:i + _RESIZE_CHUNK],
                                (image_size, image_size), method="bilinear",
                                antialias=True)
        out[i:i + _RESIZE_CHUNK] = np.clip(np.round(chunk.numpy()), 0, 255)
    return out


def channel_stats(images):
    """Per-channel mean and population std of uint8 images, in [0, 1] units.

    Args:
        images: uint8 array `[N, H, W, 3]`.

    Returns:
        `(mean, std)`, two tuples of 3 Python floats. A channel with zero
        variance gets std 1.0 so that normalising by it is safe.
    """
    # Exact integer moments from per-channel histograms: fast on uint8 and
    # free of float round-off whatever N is. One bincount per chunk, with the
    # channel folded into the bin index (contiguous access, bounded memory).
    flat = images.reshape(-1, 3)
    count = flat.shape[0]
    channel_base = np.array([0, 256, 512], np.uint16)
    hist = np.zeros(768, np.int64)
    for i in range(0, count, _STATS_CHUNK):
        index = flat[i:i + _STATS_CHUNK].astype(np.uint16) + channel_base
        hist += np.bincount(index.ravel(), minlength=768)
    hist = hist.reshape(3, 256)
    values = np.arange(256, dtype=np.int64)
    mean, std = [], []
    for c in range(3):
        s1 = int(hist[c] @ values)
        s2 = int(hist[c] @ (values * values))
        if count == 0:
            mean.append(0.0)
            std.append(1.0)
            continue
        variance = (count * s2 - s1 * s1) / (count * count)
        mean.append(s1 / count / 255.0)
        std.append(float(np.sqrt(variance)) / 255.0 if variance > 0 else 1.0)
    return tuple(mean), tuple(std)


# --------------------------------------------------------------------------
# Sources.
# --------------------------------------------------------------------------


def embedded_path():
    """Location of the embedded CIFAR-10 subset inside the installed package.

    Returns:
        An `importlib.resources` traversable (a `pathlib.Path` for a normal
        install).
    """
    return importlib.resources.files(__package__ or "e2rnas_tf").joinpath(
        *EMBEDDED_ASSET)


def read_embedded(path=None):
    """Reads and decodes the embedded JPEG subset.

    The file is an `.npz` (no pickle) holding, for `split` in train/test,
    `{split}_jpeg` (uint8, concatenated original JPEG bytes),
    `{split}_offsets` (int64 `[N + 1]`), `{split}_labels` (int32 `[N]`) and
    `class_names`; see `tools/build_embedded_data.py`.

    Args:
        path: File to read; default: the one shipped in the package.

    Returns:
        `(train, test, class_names)`.
    """
    source = embedded_path() if path is None else path
    try:
        handle = source.open("rb") if hasattr(source, "open") else open(
            source, "rb")
    except OSError as e:
        raise DataError(
            f"Cannot open embedded data {source} ({e.strerror}); rebuild it "
            "with tools/build_embedded_data.py"
        ) from None
    with handle:
        try:
            with np.load(handle, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise DataError(
                f"Embedded data {source} is corrupt: {_one_line(e)}") from None
    required = ["class_names"] + [
        f"{split}_{kind}" for split in ("train", "test")
        for kind in ("jpeg", "offsets", "labels")]
    missing = [key for key in required if key not in arrays]
    if missing:
        raise DataError(
            f"Embedded data {source} lacks arrays {', '.join(missing)}")
    class_names = tuple(str(c) for c in arrays["class_names"])
    splits = []
    for split in ("train", "test"):
        blob = arrays[f"{split}_jpeg"]
        offsets = arrays[f"{split}_offsets"].astype(np.int64)
        labels = arrays[f"{split}_labels"]
        if (offsets.ndim != 1 or offsets.size != labels.size + 1
                or offsets[0] != 0 or offsets[-1] != blob.size
                or np.any(np.diff(offsets) <= 0)):
            raise DataError(
                f"Embedded data {source}: {split}_offsets do not match "
                f"{split}_jpeg and {split}_labels")
        blob = blob.tobytes()
        images = [
            _decode_image(blob[offsets[i]:offsets[i + 1]],
                          f"{source}[{split}_jpeg #{i}]")
            for i in range(labels.size)
        ]
        images, _ = _stack_same_size(
            images, [f"{split} #{i}" for i in range(labels.size)], 0)
        splits.append(ArrayData(images, labels.astype(np.int32)))
        _check_labels(splits[-1], len(class_names), f"embedded {split}")
    return splits[0], splits[1], class_names


def list_folder(root):
    """Lists an image folder `<root>/{train,test}/<class>/*.{jpg,jpeg,png}`.

    Classes are the sorted sub-folder names of `train/`; `test/` must have
    the same ones. Files are taken in sorted name order; hidden files and
    other extensions are ignored.

    Args:
        root: Folder path.

    Returns:
        `(class_names, files)` where `files[split]` is a list of
        `(path, label)`.
    """
    if not root:
        raise DataError("data.root is empty; set it to the image folder")
    if not os.path.isdir(root):
        raise DataError(f"Data root {root} does not exist or is not a folder")
    class_sets = {}
    for split in ("train", "test"):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise DataError(
                f"Missing {split} folder {split_dir} (expected "
                "<root>/train/<class>/ and <root>/test/<class>/)")
        classes = sorted(
            entry.name for entry in os.scandir(split_dir)
            if entry.is_dir() and not entry.name.startswith("."))
        if not classes:
            raise DataError(f"No class folders in {split_dir}")
        class_sets[split] = classes
    if class_sets["train"] != class_sets["test"]:
        only_train = sorted(set(class_sets["train"]) - set(class_sets["test"]))
        only_test = sorted(set(class_sets["test"]) - set(class_sets["train"]))
        raise DataError(
            "Train/test class mismatch in {}: only in train: {}; only in "
            "test: {}".format(root, only_train or "none", only_test or "none"))
    class_names = tuple(class_sets["train"])
    if len(class_names) < 2:
        raise DataError(
            f"Only 1 class folder in {os.path.join(root, 'train')} "
            f"({class_names[0]}); a classifier needs at least 2 classes")
    files = {}
    for split in ("train", "test"):
        files[split] = []
        for label, name in enumerate(class_names):
            class_dir = os.path.join(root, split, name)
            found = sorted(
                entry.name for entry in os.scandir(class_dir)
                if entry.is_file() and not entry.name.startswith(".")
                and entry.name.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise DataError(
                    f"Class folder {class_dir} has no images "
                    f"({'/'.join(IMAGE_EXTENSIONS)})")
            files[split].extend(
                (os.path.join(class_dir, f), label) for f in found)
    return class_names, files


def read_folder(root, *, image_size=0, cache_dir=""):
    """Decodes an image folder into arrays, optionally through a disk cache.

    Images must be RGB JPEG or PNG (grayscale, grayscale+alpha and RGBA are
    refused rather than converted, so that data problems are not hidden).
    Without `image_size`, all images must have one size; with it, images of
    other sizes are resized one by one to `image_size x image_size`.

    The cache (off by default: `cache_dir=''`) stores the decoded arrays in
    `<cache_dir>/folder-<key>.npz`, where the key hashes the absolute root,
    every file's relative path, label, size and mtime and a format version;
    so any change to the folder makes a new entry. Same-size images are
    cached at their native size (any `image_size` reuses the entry); folders
    of mixed sizes are cached after resizing, in `folder-<key>-<size>.npz`.
    An entry is written to a temporary file in `cache_dir` and renamed, so a
    crash never leaves a half-written entry under the final name. Old
    entries are not deleted.

    Args:
        root: Folder with `train/` and `test/` (see `list_folder`).
        image_size: 0 or the size to which odd-sized images are resized.
        cache_dir: Cache folder ('' = no cache; `~` is expanded).

    Returns:
        `(train, test, class_names)`.
    """
    class_names, files = list_folder(root)
    native_path = resized_path = None
    if cache_dir:
        cache_dir = os.path.expanduser(cache_dir)
        key = _folder_cache_key(root, files)
        native_path = os.path.join(cache_dir, f"folder-{key}.npz")
        if image_size:
            resized_path = os.path.join(cache_dir,
                                        f"folder-{key}-{image_size}.npz")
        for path in (native_path, resized_path):
            cached = _read_cache(path, class_names) if path else None
            if cached is not None:
                return cached[0], cached[1], class_names
    splits = []
    any_resized = False
    for split in ("train", "test"):
        paths = [p for p, _ in files[split]]
        labels = np.array([lab for _, lab in files[split]], np.int32)
        images = [_decode_image(_read_bytes(p), p) for p in paths]
        images, resized = _stack_same_size(images, paths, image_size)
        any_resized = any_resized or resized
        splits.append(ArrayData(images, labels))
    if native_path is not None:
        # Same-size images are cached at native size, shared by every
        # image_size; mixed sizes only exist resized, so key on the size.
        path = resized_path if any_resized else native_path
        _write_cache(path, splits[0], splits[1], class_names)
    return splits[0], splits[1], class_names


def read_tfds(name, data_dir=""):
    """Loads a TFDS image classification data set (train and test splits).

    Data already prepared in `data_dir` is read without any network access.
    Otherwise the data set must be downloaded: first each download host (or
    the proxy `requests` would use) is probed with one TCP connection, so
    that a machine without network fails at once with the remedies, instead
    of spending minutes in TFDS's download retries. If the download itself
    fails, the temporary files TFDS left in `data_dir` by this call
    (`*.tmp*`, `incomplete.*`, and folders it created that end up empty)
    are removed; nothing that was there before is touched.

    Args:
        name: One of `TFDS_DATASETS`.
        data_dir: TFDS data directory ('' = TFDS default).

    Returns:
        `(train, test, class_names)`.

    Raises:
        DataError: the data set is not prepared and cannot be downloaded, or
            cannot be read.
    """
    if name not in TFDS_DATASETS:
        raise DataError(
            f"Unknown TFDS dataset name {name!r}; valid names: "
            f"{', '.join(TFDS_DATASETS)}")
    # Imported here: it is heavy and only this source needs it.
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # noqa: BLE001 - any failure means "not loadable".
        raise DataError(
            f"Cannot load TFDS dataset {name!r} (data_dir="
            f"{data_dir or 'TFDS default'}): {type(e).__name__}: "
            f"{_one_line(e)}") from e
    if not os.path.exists(builder.data_dir):
        _download_tfds(builder, name)
    elif not os.path.exists(os.path.join(builder.data_dir,
                                         "dataset_info.json")):
        raise DataError(
            f"{builder.data_dir} holds no dataset_info.json: an incomplete "
            f"TFDS preparation of {name!r}; delete that folder to prepare it "
            f"again, or {_TFDS_REMEDY}")
    try:
        train, test = builder.as_dataset(
            split=["train", "test"], batch_size=-1, as_supervised=True)
        splits = [tuple(tfds.as_numpy(ds)) for ds in (train, test)]
        class_names = tuple(builder.info.features["label"].names)
    except Exception as e:  # noqa: BLE001 - any failure means "not loadable".
        raise DataError(
            f"Cannot load TFDS dataset {name!r} from {builder.data_dir}: "
            f"{type(e).__name__}: {_one_line(e)}") from e
    out = []
    for split, (images, labels) in zip(("train", "test"), splits):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(
                f"TFDS {name} {split} images have shape {images.shape[1:]}; "
                "expected [H, W, 3]")
        out.append(ArrayData(images.astype(np.uint8, copy=False),
                             labels.astype(np.int32)))
    return out[0], out[1], class_names


_TFDS_REMEDY = (
    "set --config.data.data_dir=<dir with prepared tfds data> or use "
    "--config.data.name=folder --config.data.root=<image folder>")
# Seconds for the whole reachability probe (name lookup and TCP connect of
# every download host); TFDS's own retries of an unreachable host take
# minutes (10 retries with exponential back-off).
_PROBE_SECONDS = 10.0
_DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21}


def _download_tfds(builder, name):
    """Downloads and prepares `builder`'s data set, or raises `DataError`.

    Refuses before TFDS starts if a download host cannot be reached, and
    removes the temporary files of a download that fails.
    """
    root = os.fspath(builder.data_dir_root)
    unreachable = _unreachable_host(sorted(builder.url_infos or ()))
    if unreachable:
        raise DataError(
            f"TFDS dataset {name!r} is not prepared in {root} and cannot be "
            f"downloaded ({unreachable}); {_TFDS_REMEDY}")
    before = _tree(root)
    try:
        builder.download_and_prepare()
    except BaseException as e:
        _remove_new_temporaries(root, before)
        if not isinstance(e, Exception):
            raise
        raise DataError(
            f"Cannot download TFDS dataset {name!r} into {root}: "
            f"{type(e).__name__}: {_one_line(e)}; {_TFDS_REMEDY}") from e


def _unreachable_host(urls, timeout=_PROBE_SECONDS):
    """Probes the hosts that downloading `urls` would connect to.

    Each distinct host (or the proxy that `requests`, TFDS's HTTP client,
    would use for the URL) gets one TCP connection attempt; all of them
    together are bounded by `timeout` seconds (a name lookup that hangs is
    given up on; its thread is a daemon).

    Returns:
        '' if every host answered, else a short reason naming the first
        host that did not.
    """
    import urllib.parse

    import requests

    targets = []
    for url in urls:
        parsed = urllib.parse.urlparse(url)
        proxy = requests.utils.get_environ_proxies(url)
        proxy = proxy.get(parsed.scheme) or proxy.get("all")
        via = urllib.parse.urlparse(proxy) if proxy else parsed
        target = (via.hostname, via.port or _DEFAULT_PORTS.get(via.scheme,
                                                               443))
        label = f"proxy {target[0]}:{target[1]}" if proxy else target[0]
        if via.hostname and (target, label) not in targets:
            targets.append((target, label))
    result = {}

    def probe():
        for target, label in targets:
            try:
                socket.create_connection(target, timeout=timeout).close()
            except OSError as e:
                result["error"] = f"{label} is unreachable: {_one_line(e)}"
                return
        result["error"] = ""

    thread = threading.Thread(target=probe, daemon=True,
                              name="e2rnas-tfds-probe")
    thread.start()
    thread.join(timeout)
    if "error" not in result:
        return f"no answer from {targets[0][1]} within {timeout:g} s"
    return result["error"]


def _tree(root):
    """Every path under `root` (and `root` itself, if it exists)."""
    paths = set()
    if os.path.exists(root):
        paths.add(root)
    for dirpath, dirnames, filenames in os.walk(root):
        paths.update(os.path.join(dirpath, n) for n in dirnames + filenames)
    return paths


def _remove_new_temporaries(root, before):
    """Removes what a failed TFDS download left under `root` that was not in
    `before`: temporary files and folders (`*.tmp*`, `incomplete.*`), then
    new folders left empty. Completed downloads stay (a retry reuses them).
    """
    import shutil

    new = sorted(_tree(root) - before, key=len)
    for path in new:
        base = os.path.basename(path)
        if ".tmp" in base or base.startswith("incomplete."):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.remove(path)
    for path in sorted(new, key=len, reverse=True):
        if os.path.isdir(path) and not os.path.islink(path):
            try:
                os.rmdir(path)  # only if empty
            except OSError:
                pass


# --------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------


def _non_negative_int(cfg, name):
    value = getattr(cfg, name, 0) or 0
    if int(value) != value or value < 0:
        raise ValueError(
            f"Expected data.{name} to be an integer >= 0. "
            f"Received: {name}={value}")
    return int(value)


def _one_line(error):
    text = getattr(error, "message", None) or str(error) or repr(error)
    return " ".join(text.split())[:300]


def _read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"Cannot read image {path}: {e.strerror}") from None


_CHANNEL_KINDS = {1: "grayscale", 2: "grayscale+alpha", 4: "RGBA"}


def _decode_image(data, name):
    """Decodes JPEG/PNG bytes to uint8 `[H, W, 3]`, refusing non-RGB images.

    JPEGs are decoded with the accurate integer IDCT, which matches PIL
    (libjpeg's default) bit for bit; TF's default fast IDCT does not.
    """
    try:
        if data[:2] == b"\xff\xd8":
            image = tf.io.decode_jpeg(data, channels=0,
                                      dct_method="INTEGER_ACCURATE")
        elif data[:8] == b"\x89PNG\r\n\x1a\n":
            image = tf.io.decode_png(data, channels=0)
        else:
            raise DataError(
                f"Unreadable image {name}: not a JPEG or PNG file")
    except tf.errors.OpError as e:
        raise DataError(
            f"Corrupt image {name}: {_one_line(e)}") from None
    channels = int(image.shape[-1])
    if channels != 3:
        kind = _CHANNEL_KINDS.get(channels, f"{channels}-channel")
        raise DataError(
            f"Image {name} is {kind} ({channels} channels); only 3-channel RGB "
            "images are accepted, convert it to RGB")
    return image.numpy()


def _stack_same_size(images, names, image_size):
    """Stacks decoded images; returns `(array, resized)`.

    Same-size images are stacked as they are. Otherwise, with `image_size`
    each image is resized to it (`resized=True`); without, it is an error.
    """
    if not images:
        return np.zeros((0, 1, 1, 3), np.uint8), False
    first = images[0].shape
    odd = [i for i, im in enumerate(images) if im.shape != first]
    if not odd:
        return np.stack(images), False
    if not image_size:
        i = odd[0]
        raise DataError(
            f"Images have different sizes: {names[i]} is "
            f"{images[i].shape[0]}x{images[i].shape[1]} but {names[0]} is "
            f"{first[0]}x{first[1]}; set data.image_size to resize them")
    return np.concatenate(
        [resize_images(im[None], image_size) for im in images]), True


def _check_labels(data, num_classes, split):
    if len(data) and (data.labels.min() < 0
                      or data.labels.max() >= num_classes):
        bad = data.labels[(data.labels < 0) | (data.labels >= num_classes)]
        raise DataError(
            f"{split} labels out of range: found {int(bad[0])}, expected "
            f"0..{num_classes - 1} for {num_classes} classes")


def _check_every_class(data, class_names, split, count):
    """Every class must have images in `split` (after the subset of
    `count` examples, 0 = all): a class without test images cannot be
    scored, one without training images cannot be learned."""
    if not len(data):
        return  # load() reports the empty split itself.
    seen = np.bincount(data.labels, minlength=len(class_names)) > 0
    missing = [class_names[i] for i in np.flatnonzero(~seen)]
    if not missing:
        return
    n = len(class_names)
    shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
    if 0 < count < n:
        hint = (f"data.num_{split}={count} is fewer than the {n} classes; "
                f"set it to at least {n} (0 = all)")
    else:
        hint = "every class needs training and test images"
    raise DataError(
        f"The {split} split has no images of {len(missing)} of the {n} "
        f"classes ({shown}); {hint}")


def _rank_within_class(labels):
    """Rank of each element among equal labels (in array order) and the
    size of its class."""
    n = labels.shape[0]
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    new_group = sorted_labels[1:] != sorted_labels[:-1]
    starts = np.flatnonzero(np.r_[True, new_group])
    sizes = np.diff(np.r_[starts, n])
    group = np.repeat(np.arange(starts.size), sizes)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - starts[group]
    class_size = np.empty(n, np.int64)
    class_size[order] = sizes[group]
    return rank, class_size


def _balanced_subset(data, count, seed, salt, what):
    """Seeded subset of `count` examples, as class-balanced as possible:
    classes take turns (in random order) until `count` are chosen."""
    n = len(data)
    if count == 0 or count == n:
        return data
    if count > n:
        raise DataError(
            f"data.{what}={count} exceeds the {n} available examples")
    rng = np.random.default_rng([int(seed), salt])
    perm = rng.permutation(n)
    rank, _ = _rank_within_class(data.labels[perm])
    chosen = perm[np.lexsort((np.arange(n), rank))[:count]]
    return _take(data, np.sort(chosen))


def _take(data, index):
    return ArrayData(data.images[index], data.labels[index])


def _folder_cache_key(root, files):
    digest = hashlib.sha256()
    digest.update(f"v{_CACHE_VERSION}\n{os.path.abspath(root)}\n".encode())
    for split in ("train", "test"):
        for path, label in files[split]:
            stat = os.stat(path)
            # list_folder builds every path as os.path.join(root, ...).
            rel = path[len(os.path.join(root, "")):]
            digest.update(
                f"{split}\t{label}\t{rel}\t{stat.st_size}\t"
                f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _read_cache(path, class_names):
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if tuple(str(c) for c in npz["class_names"]) != class_names:
                return None
            return (ArrayData(npz["train_images"], npz["train_labels"]),
                    ArrayData(npz["test_images"], npz["test_labels"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        warnings.warn(f"Ignoring unreadable data cache {path}: {_one_line(e)}")
        return None


def _write_cache(path, train, test, class_names):
    directory = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".folder-",
                                   suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, train_images=train.images, train_labels=train.labels,
                     test_images=test.images, test_labels=test.labels,
                     class_names=np.array(class_names))
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        # The cache only saves time; failing to write it must not stop a run.
        warnings.warn(f"Could not write data cache {path}: {_one_line(e)}")
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
