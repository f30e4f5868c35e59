"""Out-of-distribution images for the search: where they come from, and
their batches.

The E2RNAS authors' published run adds an out-of-distribution term to both
levels (`objectives.ood_kl` on SVHN images while searching on CIFAR-10).
`load` turns ``config.ood`` into images at the search's resolution;
`batches` gives one search epoch of them, a pure function of the seed,
the epoch and the steps already taken, so a resumed search draws the
same images as an uninterrupted one.

Sources (``config.ood.name``):

- a tfds name (``svhn_cropped``, the authors' choice; ``cifar100``, ...)
  or ``folder`` (``root/train/<class>/*.jpg``, the layout `data.load`
  reads): the training split's images;
- ``noise``: uniform random images, seeded: the offline fallback (no
  download), a weaker and different out-of-distribution signal than
  natural images of other classes.

No augmentation is applied (the authors' "woOodAug" runs), and no labels
are used.

Reference:
    https://arxiv.org/abs/2011.09820; the authors' DARTS/train_search.py
    at commit 9b66e4d, lines 155-162 (SVHN train split, test transform).
"""

from __future__ import annotations

import types

import numpy as np
import tensorflow as tf

from e2rnas_tf import data as data_lib

NOISE = "noise"
SOURCES = data_lib.DATASETS + (NOISE,)
# Images of the `noise` source when config.ood.num_images is 0.
_NOISE_IMAGES = 10000


def load(ood_cfg, image_size, seed):
    """The out-of-distribution images of ``ood_cfg`` (``config.ood``).

    Args:
        ood_cfg: has ``name`` (one of `SOURCES`), ``root``, ``data_dir``,
            ``cache_dir`` and ``num_images`` (0: all; ``noise``: 10,000).
        image_size: the search's image size; images are resized to it.
        seed: seeds the ``noise`` images and the ``num_images`` subset.

    Returns:
        `data.ArrayData` with uint8 images ``[N, S, S, 3]`` (labels 0).

    Raises:
        data.DataError: an unknown source or unreadable data.
    """
    name = ood_cfg.name
    if name not in SOURCES:
        raise data_lib.DataError(
            f"Unknown config.ood.name {name!r}; valid names: "
            f"{', '.join(SOURCES)}")
    count = int(ood_cfg.num_images)
    if count < 0:
        raise data_lib.DataError(
            "Expected config.ood.num_images to be an integer >= 0. "
            f"Received: {count}")
    if name == NOISE:
        rng = np.random.default_rng([int(seed), 1])
        images = rng.integers(0, 256, (count or _NOISE_IMAGES, image_size,
                                       image_size, 3), dtype=np.uint8)
        return data_lib.ArrayData(images, np.zeros(len(images), np.int32))
    cfg = types.SimpleNamespace(
        name=name, root=ood_cfg.root, data_dir=ood_cfg.data_dir,
        cache_dir=ood_cfg.cache_dir, image_size=image_size, num_train=count,
        num_test=0, seed=int(seed))
    train, _, _ = data_lib.load(cfg)
    return data_lib.ArrayData(train.images, np.zeros(len(train), np.int32))


def batches(ood, batch_size, *, seed, epoch, steps, skip_batches=0):
    """One search epoch of out-of-distribution image batches.

    ``steps`` batches of ``batch_size`` images after the first
    ``skip_batches``: shuffled passes over ``ood`` (each pass a seeded
    permutation, no augmentation) as many as the epoch needs.

    Args:
        ood: `data.ArrayData` from `load`.
        batch_size: images per batch.
        seed: the run's seed.
        epoch: the search epoch.
        steps: steps in the search epoch.
        skip_batches: leading batches of the epoch already used.

    Returns:
        A `tf.data.Dataset` of float32 ``[batch_size, S, S, 3]`` in [0, 1].
    """
    per_pass = data_lib.steps_per_epoch(len(ood), batch_size, True)
    if per_pass == 0:
        raise data_lib.DataError(
            f"The out-of-distribution set has {len(ood)} images, fewer than "
            f"batch_size={batch_size}")
    passes = -(-int(steps) // per_pass)
    ds = None
    for p in range(passes):
        part = data_lib.batches(
            ood, batch_size, seed=int(seed) + 2, epoch=int(epoch) * passes + p,
            training=True, crop_padding=0, flip=False, cutout=0)
        ds = part if ds is None else ds.concatenate(part)
    return ds.skip(int(skip_batches)).take(int(steps) - int(skip_batches)).map(
        lambda images, labels: images).prefetch(tf.data.AUTOTUNE)
