"""`e2rnas reproduce`: DARTS vs E2RNAS vs E2RNAS with equal weights.

Variants (``--config=configs/reproduce.py:<variant>``):

- ``cpu`` (default): CIFAR-10 at a scale a 2-core CPU finishes in about
  1.5-2 hours. Search: 5 cells, C=8, on 16x16 images, a 10,000-image
  subset of the training set split 5,000 (w) / 5,000 (alpha), batch 32,
  4 epochs of which the first trains only w. Retraining: 8 cells, C=16,
  native 32x32, the same 10,000 images, 3 epochs, batch 64, auxiliary
  head, no cutout or drop-path (too few epochs to need them). Evaluation: clean,
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

def get_config(variant="cpu"):
    c = config_lib.reproduce_config()
    config_lib.set_pipeline_scale(c, variant)
    c.seeds = (0, 1, 2) if variant == "paper" else (0, 1)
    c.search.objectives = ("acc", "adv", "params")
    c.search.resource.params_constraint = "abs"
    c.search.resource.params_target = (
        0.01 if variant == "tiny" else 3.0)
    c.lock()
    return c
