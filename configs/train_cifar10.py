"""Retraining on CIFAR-10 as in the paper (DARTS protocol).

Run (a GPU; CIFAR-10 is fetched by TFDS on first use):

    e2rnas train --config=configs/train_cifar10.py --workdir=runs/c10 \\
        [--genotype=runs/search/genotype.json]

20 cells, C=36, auxiliary head (weight 0.4), batch 96, 600 epochs of SGD
(lr 0.025 cosine to 0, momentum 0.9, weight decay 3e-4, clip 5), cutout 16,
drop-path rising to 0.2. The published E2RNAS genotype has 2.55M parameters
here (DARTS_V2: 3.35M); DARTS reports 97.24% +- 0.09 test accuracy for
DARTS_V2 with this recipe.
"""

from e2rnas_tf import config_lib


def get_config():
    c = config_lib.train_config()
    c.data.name = "cifar10"
    c.lock()
    return c
