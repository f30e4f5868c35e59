"""`e2rnas sweep`: E2RNAS at several parameter targets, and the front.

Variants (``--config=configs/sweep.py:<variant>``), at the scales of
configs/reproduce.py (`config_lib.set_pipeline_scale`):

- ``cpu`` (default): targets 2.0, 2.75 and 3.5 M parameters (of the
  20-cell, C=36 network, ``abs`` constraint), acc + adv + params with
  MGDA, seed 0: three search-retrain-evaluate runs, roughly an hour on
  2 cores (estimated from the stage times of the reproduce run in
  docs/reproduce_cpu; the tests run the ``tiny`` variant).
- ``paper``: targets 1.5-3.5 M at the paper's settings (needs a GPU).
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
    c.search.objectives = ("acc", "adv", "params")
    c.targets = {"cpu": (2.0, 2.75, 3.5), "paper": (1.5, 2.0, 2.5, 3.0, 3.5),
                 "tiny": (0.005, 0.05)}[variant]
    c.lock()
    return c
