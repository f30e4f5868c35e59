"""Retraining on CIFAR-100 with the CIFAR-10 recipe (DARTS protocol).

Run (a GPU; CIFAR-100 is fetched by TFDS on first use):

    e2rnas train --config=configs/train_cifar100.py --workdir=runs/c100

Everything as configs/train_cifar10.py (20 cells, C=36, 600 epochs, batch
96, cutout 16, drop-path 0.2, auxiliary 0.4) except the data: a cell found
on CIFAR-10 is transferred unchanged, as DARTS-family papers do; only the
classifiers grow to 100 outputs (+0.03M parameters).
"""

from e2rnas_tf import config_lib


def get_config():
    c = config_lib.train_config()
    c.data.name = "cifar100"
    c.lock()
    return c
