"""A CPU-sized retraining of the published E2RNAS genotype.

Run (2 cores, a few minutes, no network):

    e2rnas train --config=configs/train_demo.py --workdir=runs/train_demo

or, on a search run's result:

    e2rnas train --config=configs/train_demo.py --workdir=runs/train_demo \\
        --genotype=runs/demo/genotype.json

Expected: 8 cells with C=16 on the embedded 2,000-image CIFAR-10 subset at
16x16; test accuracy well above chance (10%) after a few epochs (the
numbers are a smoke test, not a result); model_best.keras, model_last.keras,
metrics.jsonl, checkpoints/ and tb/ in the workdir.
"""

from e2rnas_tf import config_lib


def get_config():
    c = config_lib.train_config()
    c.data.name = "embedded"
    c.data.image_size = 16
    c.data.cutout = 8          # half the image side, as 16 is for 32x32
    c.data.crop_padding = 2
    c.model.layers = 8
    c.model.channels = 16
    c.batch_size = 64
    c.eval_batch_size = 250
    c.epochs = 4
    c.lock()
    return c
