"""`e2rnas sweep`: E2RNAS at several parameter targets, and the front.

Variants (``--config=configs/sweep.py:<variant>``), at the scales of
configs/reproduce.py (`config_lib.set_pipeline_scale`):

- ``cpu`` (default): ours, acc + adv + params with MGDA and the ``derived``
  estimate (the parameter count of the genotype the DARTS rule derives,
  held with ``abs``) at 2.0, 3.0 and 4.0 M parameters of the 20-cell,
  C=36 network, seed 0: three search-retrain-evaluate runs on 2 cores.
  The derived sizes should rise with the target and land near it.
- ``paper``: the authors' published run (configs/search_e2rnas_published.py)
  at their targets 2, 3, 4, 5 and 6 (x1e5 parameters of their 8-cell, C=16
  supernet; their abs20..abs60 runs), at the paper's scale with their
  evaluation (needs a GPU).
- ``tiny``: a few steps of each stage (tests).

Run here (the CIFAR-10 JPEG folder extracted from ../shared/data):

    e2rnas sweep --config=configs/sweep.py:cpu --workdir=runs/sweep \\
        --export_base=runs/serving --model_name=e2rnas_pareto \\
        --config.data.name=folder --config.data.root=/path/to/cifar10

Results in ``<workdir>/results`` (sweep.md, sweep.json, pareto.png,
cells/); each Pareto-optimal model is a version of
``<export_base>/<model_name>`` with its figures in
``assets.extra/e2rnas_metadata.json``, and ``models.config`` serves it.
"""

from e2rnas_tf import config_lib


def get_config(variant="cpu"):
    c = config_lib.sweep_config()
    config_lib.set_pipeline_scale(c, variant)
    s = c.search
    c.constraint = "abs"
    if variant == "paper":
        config_lib.set_e2rnas_published(s)
        s.ood.name = "svhn_cropped"
        c.objective_sets = (tuple(s.objectives),)
        c.targets = (2.0, 3.0, 4.0, 5.0, 6.0)
        config_lib.set_authors_evaluation(c.train.evaluate)
    else:
        s.objectives = ("acc", "adv", "params")
        c.objective_sets = (("acc", "adv", "params"),)
        s.resource.estimate = "derived"
        c.targets = {"cpu": (2.0, 3.0, 4.0), "tiny": (0.005, 0.05)}[variant]
    c.lock()
    return c
