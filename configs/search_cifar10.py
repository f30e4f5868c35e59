"""The paper's CIFAR-10 search: 8 cells, C=16, batch 64, 50 epochs.

Run (needs a GPU to finish in reasonable time; tfds downloads CIFAR-10):

    e2rnas search --config=configs/search_cifar10.py --workdir=runs/search

Expected: a genotype.json in the workdir after 50 epochs; the authors
report architectures of ~2-3M parameters at the 20-cell evaluation scale.
With the image folder from a CIFAR-10 JPEG copy instead of tfds:

    e2rnas search --config=configs/search_cifar10.py --workdir=runs/search \\
        --config.data.name=folder --config.data.root=/path/to/cifar10
"""

from e2rnas_tf import config_lib


def get_config():
    c = config_lib.search_config()
    c.data.name = "cifar10"
    c.objectives = ["acc", "adv", "params"]
    c.resource.params_constraint = "abs"
    c.resource.params_target = 2.0
    c.lock()
    return c
