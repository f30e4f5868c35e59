"""E2RNAS as the first version's code ran it (arXiv v1, November 2020).

The authors' ``DARTS_LBJ/fgsm_nop_min.sh`` at commit 98da776 ("after
CVPR2021") of github.com/yuezhixiong/NAS-Benchmark
(`config_lib.set_e2rnas_v1`; docs/fidelity.md):

- upper level: acc + params, MGDA (their solver) on unnormalised gradients
  applied to the raw losses, with their accumulated gradients (MGDA sees
  ``[g_acc, g_acc + g_params]``, the step is ``(1 + c_1) g_acc + (1 + c_2)
  g_params``), second order;
- params: the first version's formula (raw counts, supernet scale 8 cells
  C=16) with ``min`` = ``max(1e6 - params, 1)``, a lower bound the uniform
  supernet (1.83e6) already satisfies;
- lower level: FGSM adversarial training only (2/255, gradient at the
  clean image, random start); search data with cutout 16; seed 2.

Variants: ``paper`` (default; CIFAR-10 through tfds, needs a GPU) and
``cpu`` (5 cells, C=8, 16x16, batch 32, 6 epochs, embedded subset).

Run:

    e2rnas search --config=configs/search_e2rnas_v1.py:cpu --workdir=runs/v1

Expected: ``e2rnas info`` prints params 1,831,168 at uniform alpha against
the lower bound 1e6 ("no push": the constraint is inactive).
"""

from e2rnas_tf import config_lib

VARIANTS = ("paper", "cpu")


def get_config(variant="paper"):
    if variant not in VARIANTS:
        raise ValueError(f"Expected a variant in {list(VARIANTS)}. "
                         f"Received: {variant!r}")
    c = config_lib.search_config()
    config_lib.set_e2rnas_v1(c)
    c.seed = 2
    if variant == "paper":
        c.data.name = "cifar10"
    else:
        c.data.name = "embedded"
        c.data.image_size = 16
        c.model.channels, c.model.layers = 8, 5
        c.batch_size = 32
        c.epochs = 6
    c.lock()
    return c
