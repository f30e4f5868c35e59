"""The DARTS baseline: the same search with the clean objective only.

With ``objectives=["acc"]`` MGDA has one gradient and gives it weight 1 (no
normalisation), so each step is DARTS' first-order step: Adam on the
validation cross-entropy gradient for alpha, SGD-momentum for w.

Run (needs a GPU to finish in reasonable time; tfds downloads CIFAR-10):

    e2rnas search --config=configs/search_darts.py --workdir=runs/darts

Second order (DARTS "V2"): add ``--config.arch.order=second``.
Expected: a genotype.json after 50 epochs; DARTS reports cells of
~3.3M parameters at the 20-cell evaluation scale, with more parameter-free
ops than E2RNAS finds under its parameter objective.
"""

from e2rnas_tf import config_lib


def get_config():
    c = config_lib.search_config()
    c.data.name = "cifar10"
    c.objectives = ["acc"]
    c.lock()
    return c
