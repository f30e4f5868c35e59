"""A CPU-sized E2RNAS search on the embedded CIFAR-10 subset.

acc + adv + params with MGDA on the embedded 2000-image CIFAR-10 subset, at
the scale of benchmark config C: 5 cells, C=8, 16x16 images, batch 32 (31
steps per epoch), 6 epochs. The params objective holds the network one
would retrain (20 cells, C=36) at 2.5M parameters with the ``derived``
estimate: its value is the size of the genotype the DARTS rule derives
from the current alpha, its gradient that of the softmax-expected size
(docs/effective_search.md). ``abs`` pulls from both sides, so the derived
size settles near the target and the accuracy objectives choose which
edges carry the parameters. (With the paper's expected estimate the
uniform-alpha value, 3.73M, lies above any target below it and the search
collapses to the parameter-free cell; `e2rnas info` warns of that.)

Run (2 cores, no network; about 20 s to compile the step, then about
1 min per epoch):

    e2rnas search --config=configs/search_demo.py --workdir=runs/demo

Expected: a progress line every 10 steps with the three objectives, their
MGDA weights and the derived genotype's size (near 2.5M after the first
epoch); per epoch the supernet's test accuracy (rising from 0.2 towards
0.33); at the end a genotype with parameterised ops on most normal edges
and runs/demo holding genotype.json, genotypes/, metrics.jsonl,
alpha_history.npz, checkpoints/ and tb/.
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
    c.objectives = ("acc", "adv", "params")
    c.resource.estimate = "derived"
    c.resource.params_constraint = "abs"
    c.resource.params_target = 2.5
    c.lock()
    return c
