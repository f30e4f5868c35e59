"""Retraining on SVHN (cropped digits, 73,257 training images).

Run (a GPU; SVHN is fetched by TFDS on first use):

    e2rnas train --config=configs/train_svhn.py --workdir=runs/svhn

The network and optimiser are the CIFAR-10 recipe (20 cells, C=36, SGD lr
0.025 cosine, batch 96, drop-path 0.2, auxiliary 0.4). Choices that differ,
and why:

- no horizontal flip: digits are not mirror-symmetric;
- cutout 20, the size DeVries and Taylor found best on SVHN
  (https://arxiv.org/abs/1708.04552);
- 160 epochs instead of 600: SVHN has 1.5x CIFAR's images and is easier,
  so 160 epochs (~122k steps, 0.4x CIFAR's 313k) is the usual schedule
  (Cutout, WRN); the cosine and drop-path schedules follow `epochs`.
"""

from e2rnas_tf import config_lib


def get_config():
    c = config_lib.train_config()
    c.data.name = "svhn_cropped"
    c.data.flip = False
    c.data.cutout = 20
    c.epochs = 160
    c.lock()
    return c
