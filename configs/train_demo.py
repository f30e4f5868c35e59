"""A CPU-sized retraining of the published E2RNAS genotype.

Run (2 cores, a few minutes, no network):

    e2rnas train --config=configs/train_demo.py --workdir=runs/train_demo

or, on a search run's result:

    e2rnas train --config=configs/train_demo.py --workdir=runs/train_demo \\
        --genotype=runs/demo/genotype.json

Expected: 8 cells with C=16 (0.19M parameters) on the embedded 2,000-image
CIFAR-10 subset at its native 32x32, 10 epochs; test accuracy well above
chance (10%) at the end (a smoke test on 2,000 images, not a result);
model_best.keras, model_last.keras, metrics.jsonl, checkpoints/ and tb/ in
the workdir.
"""

from e2rnas_tf import config_lib


def get_config():
    c = config_lib.train_config()
    c.data.name = "embedded"
    c.data.image_size = 0      # native 32x32: the aux head sees 8x8
    c.model.layers = 8
    c.model.channels = 16
    c.batch_size = 64
    c.eval_batch_size = 250
    c.epochs = 10
    c.lock()
    return c
