"""A CPU-sized E2RNAS search on the embedded CIFAR-10 subset.

Run (2 cores, about 10 minutes, no network):

    e2rnas search --config=configs/search_demo.py --workdir=runs/demo

Expected: a genotype printed at the end with its expected parameter count,
and genotype.json, metrics and a checkpoint in runs/demo.
"""

from e2rnas_tf import config_lib


def get_config():
    c = config_lib.search_config()
    c.data.name = "embedded"
    c.data.image_size = 16
    c.model.channels = 8
    c.model.layers = 5
    c.batch_size = 32
    c.epochs = 4
    c.objectives = ["acc", "adv", "params"]
    c.resource.params_constraint = "abs"
    c.resource.params_target = 2.0
    c.lock()
    return c
