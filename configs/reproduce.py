"""`e2rnas reproduce`: DARTS vs E2RNAS vs E2RNAS with equal weights.

Variants (``--config=configs/reproduce.py:<variant>``):

- ``cpu`` (default): CIFAR-10 at a scale a 2-core CPU finishes in about
  1.5-2 hours. Search: 5 cells, C=8, on 16x16 images, a 10,000-image
  subset of the training set split 5,000 (w) / 5,000 (alpha), batch 32,
  4 epochs of which the first trains only w. Retraining: 8 cells, C=16,
  native 32x32, a 20,000-image subset, 5 epochs, batch 64, auxiliary head,
  no cutout or drop-path (too few epochs to need them). Evaluation: clean,
  FGSM and PGD-10 at 2/255 and 8/255 on 1,000 test images. Two seeds.
- ``paper``: the paper's settings (needs a GPU): search 8 cells C=16,
  32x32, batch 64, 50 epochs on the full split; retraining 20 cells C=36,
  600 epochs, batch 96, cutout 16, drop-path 0.2, auxiliary 0.4;
  evaluation on the full test set with PGD-20. Three seeds.
- ``tiny``: a few steps of each stage on the embedded subset (tests).

Run here (the CIFAR-10 JPEG folder extracted from ../shared/data):

    e2rnas reproduce --config=configs/reproduce.py:cpu \\
        --workdir=runs/reproduce --config.data.name=folder \\
        --config.data.root=/path/to/cifar10 \\
        --config.data.cache_dir=/path/to/cache

With network access, the default ``data.name=cifar10`` loads CIFAR-10
through tfds. The results (results.md, results.json, cells/,
tradeoff.png) go to ``<workdir>/results``; the runs to ``<workdir>/runs``.
Stopped and started again with the same command, it continues.
"""

from e2rnas_tf import config_lib

VARIANTS = ("cpu", "paper", "tiny")


def get_config(variant="cpu"):
    if variant not in VARIANTS:
        raise ValueError(f"Expected a variant in {list(VARIANTS)}. "
                         f"Received: {variant!r}")
    c = config_lib.reproduce_config()
    c.variant = variant
    s, t = c.search, c.train
    s.objectives = ("acc", "adv", "params")
    s.resource.params_constraint = "abs"
    s.resource.params_target = 3.0
    ev = t.evaluate
    ev.attacks = ("fgsm", "pgd")
    ev.epsilons = (2.0, 8.0)
    if variant == "paper":
        c.seeds = (0, 1, 2)
        c.data.name = "cifar10"
        t.evaluate.pgd_steps = 20
    elif variant == "cpu":
        c.seeds = (0, 1)
        c.data.name = "cifar10"
        s.data.image_size = 16
        s.data.num_train = 10000
        s.data.num_test = 1000
        s.model.layers, s.model.channels = 5, 8
        s.batch_size, s.eval_batch_size = 32, 250
        s.epochs = 4
        s.arch.warmup_epochs = 1
        t.data.num_train = 20000
        t.data.num_test = 2000
        t.data.cutout = 0
        t.model.layers, t.model.channels = 8, 16
        t.model.drop_path = 0.0
        t.batch_size, t.eval_batch_size = 64, 250
        t.epochs = 5
        ev.num_examples = 1000
        ev.pgd_steps = 10
        ev.batch_size = 250
    else:  # tiny
        c.seeds = (0, 1)
        c.data.name = "embedded"
        s.data.image_size = 8
        s.data.num_train = 64
        s.data.num_test = 16
        s.model.layers, s.model.channels = 3, 4
        s.model.steps, s.model.multiplier = 2, 2
        s.resource.layers, s.resource.channels = 5, 8
        s.resource.params_target = 0.01
        s.batch_size, s.eval_batch_size = 8, 16
        s.epochs, s.steps_per_epoch = 2, 2
        s.arch.warmup_epochs = 1
        s.log_every = 1000
        t.data.image_size = 8
        t.data.num_train = 32
        t.data.num_test = 16
        t.data.cutout = 0
        t.model.layers, t.model.channels = 3, 4
        t.model.drop_path = 0.0
        t.batch_size, t.eval_batch_size = 8, 16
        t.epochs, t.steps_per_epoch = 1, 2
        t.log_every = 1000
        ev.num_examples = 16
        ev.pgd_steps = 2
        ev.batch_size = 16
    c.lock()
    return c
