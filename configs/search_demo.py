"""A CPU-sized E2RNAS search on the embedded CIFAR-10 subset.

The paper's objectives and optimisers on the embedded 2000-image CIFAR-10
subset, at the scale of benchmark config C: 5 cells, C=8, 16x16 images,
batch 32 (31 steps per epoch), 6 epochs. The parameter objective refers to
the 20-cell, C=36 evaluation network, as in configs/search_cifar10.py.

Run (2 cores, no network; about 1.5 min to compile the step, then about
1 min per epoch: 7-8 minutes in all):

    e2rnas search --config=configs/search_demo.py --workdir=runs/demo

Expected: a progress line every 10 steps with the three objectives and
their MGDA weights; per epoch the supernet's test accuracy (rising from
0.1 towards 0.3) and the derived genotype's size; at the end the genotype,
its parameter count in millions and runs/demo holding genotype.json,
genotypes/, metrics.jsonl, alpha_history.npz, checkpoints/ and tb/.
"""

from e2rnas_tf import config_lib


def get_config():
    c = config_lib.search_config()
    c.data.name = "embedded"
    c.data.image_size = 16
    c.model.channels = 8
    c.model.layers = 5
    c.batch_size = 32
    c.epochs = 6
    c.objectives = ["acc", "adv", "params"]
    c.resource.params_constraint = "abs"
    c.resource.params_target = 3.0
    c.lock()
    return c
