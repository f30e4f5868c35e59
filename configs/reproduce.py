"""`e2rnas reproduce`: the paper's comparison, DARTS against E2RNAS.

Methods (`e2rnas_tf.experiments.reproduce.METHODS`, each a change of the
search config; results.md lists each method's settings):

- ``darts``: accuracy only, as DARTS;
- ``published``: E2RNAS as its authors ran it for the published genotype
  (configs/search_e2rnas_published.py: acc + adv + params + ood + flops,
  second order, their cost model and target, weights on the raw losses);
- ``e2rnas``: ours, ``config.search``: acc + adv + params, MGDA, with the
  ``derived`` estimate (the parameter count of the genotype the DARTS rule
  derives, straight-through) held at a target with ``abs``;
- ``nomgda``: ``published`` with weight 1 on every loss (the authors'
  ablation).

Variants (``--config=configs/reproduce.py:<variant>``):

- ``cpu`` (default): CIFAR-10 at a scale 2 CPU cores finish in a few hours.
  Search: 5 cells, C=8, 16x16, a 10,000-image subset split 5,000 (w) /
  5,000 (alpha), batch 32, 4 epochs of which the first trains only w; the
  authors' methods use uniform noise as the out-of-distribution source
  (offline). Retraining: 8 cells, C=16, 32x32, the same 10,000 images, 3
  epochs, batch 64, auxiliary head, no cutout or drop-path. Evaluation:
  the authors' protocol (FGSM and PGD-10 without random start at 1/255 and
  2/255, configs/evaluate_authors.py) on 1,000 test images. Two seeds.
- ``paper``: the paper's settings (needs a GPU): search 8 cells C=16, 32x32,
  batch 64, 50 epochs, SVHN as OOD; retraining 20 cells C=36, 600 epochs,
  batch 96, cutout 16, drop-path 0.2, auxiliary 0.4; the authors'
  evaluation on the full test set. Three seeds.
- ``tiny``: a few steps of each stage on the embedded subset (tests), with
  the methods darts, e2rnas and equal.

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

# Ours: the derived network held at this many million parameters (20 cells,
# C=36): between the parameter-free cell (1.37M) and DARTS' (3.35M).
DERIVED_TARGET = 2.5


def get_config(variant="cpu"):
    c = config_lib.reproduce_config()
    config_lib.set_pipeline_scale(c, variant)
    c.seeds = (0, 1, 2) if variant == "paper" else (0, 1)
    s = c.search
    s.objectives = ("acc", "adv", "params")
    if variant == "tiny":
        c.methods = ("darts", "e2rnas", "equal")
        s.resource.params_constraint = "abs"
        s.resource.params_target = 0.01
    else:
        c.methods = ("darts", "published", "e2rnas", "nomgda")
        s.resource.estimate = "derived"
        s.resource.params_constraint = "abs"
        s.resource.params_target = DERIVED_TARGET
        s.ood.name = "noise" if variant == "cpu" else "svhn_cropped"
        config_lib.set_authors_evaluation(c.train.evaluate)
        if variant == "cpu":
            c.train.evaluate.num_examples = 1000
    c.lock()
    return c
