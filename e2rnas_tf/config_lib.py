"""Default configurations: every field, its meaning and its paper value.

The files under ``configs/`` start from these functions and change what
their setting needs; the CLI selects one with ``--config=configs/X.py`` and
overrides single fields with ``--config.a.b=value``. Configs are locked, so
a misspelt field is an error rather than a silently ignored setting.
"""

from __future__ import annotations

import ml_collections

from e2rnas_tf.space.ops import PRIMITIVES


def data_config(**overrides):
    """Where images come from and how they are prepared (`e2rnas_tf.data`)."""
    c = ml_collections.ConfigDict()
    # embedded | folder | cifar10 | cifar100 | svhn_cropped
    c.name = "embedded"
    c.seed = 0          # seed of the num_train/num_test subsets
    c.root = ""         # image folder root, for name=folder
    c.data_dir = ""     # tfds data_dir ('' = tfds default)
    c.cache_dir = ""    # decoded-array cache for image folders ('' = none)
    c.image_size = 0    # resize to S x S once, before augmentation; 0 = native
    c.num_train = 0     # use a seeded subset of the training set; 0 = all
    c.num_test = 0      # likewise for the test set
    c.train_portion = 0.5  # search: share of train used for w; rest for alpha
    c.crop_padding = 4
    c.flip = True
    c.cutout = 0        # cutout square side in pixels; 0 = off
    c.update(overrides)
    return c


def attack_config(**overrides):
    """An L-inf attack in [0, 1] pixel space; eps in /255 units."""
    c = ml_collections.ConfigDict()
    c.name = "fgsm"        # fgsm | pgd
    c.eps = 2.0            # /255
    c.step_size = 0.0      # /255; 0 = 1.25 * eps for fgsm, eps / 4 for pgd
    c.steps = 1            # pgd iterations
    c.random_start = True  # uniform start in the eps-ball
    # fgsm: input gradient at the random start (Wong et al.) | at the clean
    # image, the random start added afterwards (the authors' code).
    c.gradient_at = "start"
    c.update(overrides)
    return c


def runtime_config(c):
    """Execution fields shared by every command."""
    c.jit_compile = False          # XLA for the compiled steps
    # float32 | mixed_bfloat16 (CPU/TPU) | mixed_float16 (GPU, loss scaled)
    c.mixed_precision = "float32"
    c.strategy = ml_collections.ConfigDict()
    c.strategy.name = "default"    # default | mirrored | multi_worker
    c.strategy.devices = []        # mirrored: device names; [] = all GPUs
    # Split the CPU into N logical devices (N > 1: `mirrored` without GPUs
    # replicates over them; for testing distribution on one machine).
    c.strategy.cpu_devices = 0
    # Grappler graph optimisation. Off by default: on the CPU it costs more
    # start-up time than it saves (BENCHMARKS.md).
    c.graph_optimization = False
    c.deterministic = False        # TF op determinism + seeded everything
    c.log_every = 10               # steps between metric lines
    c.checkpoint_every = 0         # steps between checkpoints (0: none)
    # Wall-clock minutes between checkpoints (0: none); every epoch's end is
    # checkpointed too. A hard kill loses at most this much work.
    c.checkpoint_minutes = 5.0
    c.profile_steps = ""           # "START,END": TF profiler trace
    return c


def search_config():
    """The paper's CIFAR-10 search setting (Yue et al. 2020, DARTS 2018)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = data_config()
    c.model = ml_collections.ConfigDict(dict(
        channels=16, layers=8, steps=4, multiplier=4, stem_multiplier=3,
        primitives=tuple(PRIMITIVES),
        # fused | reference: the same supernet; fused traces and runs
        # faster (search_space.SearchNetwork, BENCHMARKS.md).
        cell_impl="fused"))
    c.batch_size = 64
    c.eval_batch_size = 256
    c.epochs = 50
    c.steps_per_epoch = 0      # 0 = one pass over the smaller search split
    # Supernet accuracy at the end of each epoch on: test (the held-out
    # test set) | valid (the architecture-validation split).
    c.eval_on = "test"
    # Stop with an error after this many consecutive skipped steps (a step
    # with a NaN/Inf objective or gradient is skipped, nothing applied).
    c.max_consecutive_skips = 10
    # Lower level: network weights.
    c.optim = ml_collections.ConfigDict(dict(
        lr=0.025, lr_min=0.001, momentum=0.9, weight_decay=3e-4,
        grad_clip=5.0))
    c.adv_train = ml_collections.ConfigDict(dict(enabled=False))
    c.adv_train.attack = attack_config()
    # Upper level: architecture.
    c.arch = ml_collections.ConfigDict(dict(
        lr=3e-4, beta1=0.5, beta2=0.999, weight_decay=1e-3,
        order="first",           # first | second (unrolled)
        unrolled_eps=0.01,       # finite-difference radius, second order
        # Epochs at the start during which only w is trained (alpha and
        # its optimizer state stay as they are). 0 = the paper (and DARTS):
        # alpha moves from the first step. Short searches use a warm-up so
        # that alpha is not steered by untrained weights, which favour
        # parameter-free ops (PC-DARTS, Xu et al. 2020, warm up 15 of 50).
        warmup_epochs=0))
    # Any of acc, adv, params, flops, ood. Tuples (here and below) so that
    # the command line can override them:
    # --config.objectives="('acc','params')".
    c.objectives = ("acc", "adv", "params")
    # The epoch (0-based) from which each objective joins the upper level
    # (the authors' adv_later / nop_later); 0 = from the start.
    c.objective_start = ml_collections.ConfigDict(dict(
        acc=0, adv=0, params=0, flops=0, ood=0))
    c.combine = ml_collections.ConfigDict(dict(
        # mgda | sum (1/K each) | ones (1 each: the authors' noMGDA) | fixed
        method="mgda",
        normalization="l2",      # none | l2 | loss | loss+
        weights=(),              # for method=fixed, one per objective
        # normalized | raw: which gradients the weights multiply (the
        # authors: raw, their weights multiply the losses themselves).
        apply_to="normalized",
        # exact (every support solved) | authors (their MinNormSolver,
        # with its 0.999/0.001 vertex clamps), docs/fidelity.md.
        solver="exact",
        # The first version's accumulated .grad: MGDA on prefix sums of
        # the gradients, weights 1 + c_k (mgda.combine).
        accumulate=False))
    c.attack = attack_config()
    # Resource objectives (docs/fidelity.md, e2rnas_tf/resources.py).
    c.resource = ml_collections.ConfigDict(dict(
        # The network the costs refer to, whatever the supernet's scale.
        layers=20, channels=36,
        # measured: every op built and counted at that scale, millions
        # (ours) | authors: their closed forms, params /1e5, flops /1e8
        # (the published run, with layers=8 channels=16) | authors_v1: the
        # first version's parameter formula, raw counts.
        cost_model="measured",
        # expected: softmax-weighted over all edges (the paper) | derived:
        # the value of the genotype the DARTS rule derives now, gradient of
        # the expected one (ours) | gumbel: hard Gumbel-softmax sample.
        estimate="expected",
        gumbel_tau=0.1,
        # Targets in the cost model's units; constraints: none | abs | max
        # | floor | authors_max | authors_both (uses *_target_max) |
        # authors_v1_min (resources.constrain).
        params_target=0.0, params_target_max=0.0, params_constraint="none",
        flops_target=0.0, flops_target_max=0.0, flops_constraint="none"))
    # Out-of-distribution images: the `ood` objective (upper level) and a
    # weighted term of the weights' loss (lower level), both
    # objectives.ood_kl. Source: a tfds name (svhn_cropped, the authors'),
    # `folder` (root/train/<class>/ images) or `noise` (uniform random
    # images, offline); resized to the search's image size, no
    # augmentation (the authors' "woOodAug").
    c.ood = ml_collections.ConfigDict(dict(
        name="svhn_cropped", root="", data_dir="", cache_dir="",
        num_images=0,        # 0 = all (noise: 10,000)
        upper_scale=10.0,    # the `ood` objective is upper_scale * KL
        lower_weight=0.0,    # weights' loss: CE + lower_weight * KL
        # lower_weight * epoch / epochs instead (0-based epoch): the
        # authors' "oodS" runs (docs/fidelity.md).
        lower_ramp=False))
    runtime_config(c)
    return c


# The authors' runs, as presets that set the algorithm and leave the scale
# (cells, channels, image size, batch, epochs, data) to the caller: the
# defaults of `search_config` are the paper's scale. Every choice is
# documented, with its source line, in docs/fidelity.md.
AUTHORS_REPOSITORY = "github.com/yuezhixiong/NAS-Benchmark"
# The commit whose DARTS/ code produced the published E2RNAS genotype
# (woOodAug_LL_acc1_ood1_UL_adv_nop_ood_flp_mgda_abs40_gnl2, committed to
# DARTS/genotypes.py on 2021-03-05 in 9b66e4d; its .ini on 2021-03-04).
AUTHORS_PUBLISHED_COMMIT = "9b66e4d"
# The first version's code (DARTS_LBJ/, "after CVPR2021", 2020-11-17).
AUTHORS_V1_COMMIT = "98da776"


def set_e2rnas_published(c):
    """The algorithm of the authors' run behind the published genotype.

    ``DARTS/models/woOodAug_LL_acc1_ood1_UL_adv_nop_ood_flp_mgda_abs40_gnl2
    .ini`` run by ``DARTS/auto.py`` (``train_search.py --unrolled --cutout``)
    at commit 9b66e4d. Upper level: acc + adv + nop + ood + flp, MGDA (their
    solver) on l2-normalised gradients, the weights applied to the raw
    losses; nop and flp their closed forms at the supernet scale (8 cells,
    C=16) with ``abs`` and target 4 (``constrain_min = 4``: 4e5
    parameters, 4e8 FLOPs); adv: FGSM at 2/255, step 1.25 eps, random start,
    gradient at the clean image; ood: 10 x KL on SVHN (not augmented).
    Lower level: clean CE + 1 x KL on the SVHN batch. Second order, cutout
    16 on the search data. Leaves ``c.ood.name`` (the OOD source) as it is:
    ``svhn_cropped`` by default, ``noise`` offline.

    Args:
        c: a `search_config()`; changed in place and returned.
    """
    c.objectives = ("acc", "adv", "params", "ood", "flops")
    for name in c.objective_start:
        c.objective_start[name] = 0
    c.combine.method = "mgda"
    c.combine.normalization = "l2"
    c.combine.apply_to = "raw"
    c.combine.solver = "authors"
    c.arch.order = "second"
    c.data.cutout = 16
    c.attack.update(name="fgsm", eps=2.0, step_size=0.0, steps=1,
                    random_start=True, gradient_at="clean")
    c.adv_train.enabled = False
    c.resource.update(
        layers=8, channels=16, cost_model="authors", estimate="expected",
        params_target=4.0, params_constraint="abs",
        flops_target=4.0, flops_constraint="abs")
    c.ood.upper_scale = 10.0
    c.ood.lower_weight = 1.0
    # Constant: the ramp of their code of 03-04..03-09 belongs to the
    # "oodS" runs (docs/fidelity.md, "Which code").
    c.ood.lower_ramp = False
    c.arch.warmup_epochs = 0
    # Their end-of-epoch accuracy is on the architecture split.
    c.eval_on = "valid"
    return c


def set_e2rnas_v1(c):
    """The algorithm of the first version's code (arXiv v1, Nov 2020).

    ``DARTS_LBJ/fgsm_nop_min.sh`` at commit 98da776: ``train_search.py
    --unrolled --cutout --adv FGSM --nop --MGDA --constrain min``. Upper
    level: acc + nop, MGDA (their solver) on unnormalised gradients
    (``--grad_norm`` off), applied to the raw losses, with their
    accumulated ``.grad`` (MGDA sees ``[g_acc, g_acc + g_nop]``, the
    direction is ``(1 + c_1) g_acc + (1 + c_2) g_nop``); nop their first
    formula (raw counts) with ``min`` = ``max(T - nop, 1)`` and the default
    ``T = 1e6``: a lower bound that the uniform supernet (1.83e6) is above,
    so nop starts with a zero gradient and the direction is 1.999 g_acc.
    Lower level: FGSM adversarial training
    only (eps 2/255, step 1.25 eps, random start, gradient at the clean
    image). Second order, cutout 16.

    Args:
        c: a `search_config()`; changed in place and returned.
    """
    c.objectives = ("acc", "params")
    for name in c.objective_start:
        c.objective_start[name] = 0
    c.combine.method = "mgda"
    c.combine.normalization = "none"
    c.combine.apply_to = "raw"
    c.combine.solver = "authors"
    c.combine.accumulate = True
    c.arch.order = "second"
    c.arch.warmup_epochs = 0
    c.data.cutout = 16
    c.adv_train.enabled = True
    c.adv_train.attack.update(name="fgsm", eps=2.0, step_size=0.0, steps=1,
                              random_start=True, gradient_at="clean")
    c.resource.update(
        layers=8, channels=16, cost_model="authors_v1", estimate="expected",
        params_target=1e6, params_constraint="authors_v1_min")
    c.ood.lower_weight = 0.0
    c.eval_on = "valid"
    return c


def set_authors_evaluation(ev):
    """The authors' robustness evaluation (DARTS/test_adv.py at 9b66e4d):
    FGSM (one step of eps) and PGD-10 (step eps/4), both without random
    start, at eps 1/255 and 2/255, on the whole test set.

    Args:
        ev: a `train_config().evaluate`; changed in place and returned.
    """
    ev.update(attacks=("fgsm", "pgd"), epsilons=(1.0, 2.0), pgd_steps=10,
              step_size=0.0, restarts=1, random_start=False, num_examples=0)
    return ev


def train_config():
    """The paper's CIFAR-10 retraining setting (DARTS protocol)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = data_config(cutout=16)
    c.genotype = "E2RNAS"      # a published name or a genotype JSON path
    # drop_path: final drop-path rate; it rises linearly from 0 (epoch 0)
    # towards it, as in DARTS. auxiliary_weight: weight of the auxiliary
    # head's cross-entropy (the head is dropped at inference).
    c.model = ml_collections.ConfigDict(dict(
        channels=36, layers=20, auxiliary=True, auxiliary_weight=0.4,
        drop_path=0.2))
    c.batch_size = 96          # global batch, split across replicas
    c.eval_batch_size = 256
    c.epochs = 600
    c.steps_per_epoch = 0      # 0 = one pass over the training set
    # SGD with momentum; lr follows a per-epoch cosine from lr to lr_min;
    # weight_decay is L2 added to the (clipped) gradient, as torch SGD.
    c.optim = ml_collections.ConfigDict(dict(
        lr=0.025, lr_min=0.0, momentum=0.9, weight_decay=3e-4,
        grad_clip=5.0))
    # Adversarial training: the first round(ratio * batch) examples of each
    # batch are replaced by adversarial examples made by `attack` against
    # the current weights (ratio=1: pure adversarial training, e.g. "fast
    # AT" with fgsm + random start; ratio=0.5: equal clean and adversarial
    # loss, as Goodfellow et al.'s mixed objective).
    c.adv_train = ml_collections.ConfigDict(dict(enabled=False, ratio=1.0))
    c.adv_train.attack = attack_config(name="fgsm", eps=8.0,
                                       random_start=True)
    # `e2rnas evaluate`: cleverhans L-inf attacks (fgsm | pgd | bim | mim),
    # eps and step_size in /255 (step 0 = eps / 4); PGD restarts from
    # random starts count an example robust only if it survives all;
    # num_examples > 0 evaluates a seeded subset of the test split. seed
    # picks that subset and the PGD random starts; -1: the run's seed.
    # Tuples, so that the command line can override them:
    # --config.evaluate.epsilons='(2.0, 8.0)'.
    c.evaluate = ml_collections.ConfigDict(dict(
        attacks=("fgsm", "pgd", "mim"), epsilons=(1.0, 2.0, 8.0),
        pgd_steps=10, step_size=0.0, restarts=1, random_start=True,
        num_examples=0, batch_size=256, seed=-1))
    # Non-finite steps are skipped; this many in a row stop the run.
    c.max_consecutive_skips = 10
    runtime_config(c)
    return c


def _data_source():
    """Where the images come from, shared by every stage of a pipeline."""
    return ml_collections.ConfigDict(dict(
        name="cifar10", root="", data_dir="", cache_dir=""))


def reproduce_config():
    """`e2rnas reproduce`: methods x seeds, each searched, retrained and
    evaluated (`e2rnas_tf.experiments.reproduce`); configs/reproduce.py sets the scale."""
    c = ml_collections.ConfigDict()
    c.variant = "paper"
    # darts (acc only) | e2rnas (search.objectives, MGDA) | equal
    # (search.objectives, equal weights 1/K: the paper's ablation).
    c.methods = ("darts", "e2rnas", "equal")
    c.seeds = (0, 1)           # search and retraining seed of each run
    # name/root/data_dir/cache_dir replace those of search.data and
    # train.data, so the data source is given once.
    c.data = _data_source()
    c.search = search_config()
    c.train = train_config()
    # The robust accuracy that the trade-off plot shows.
    c.robust = ml_collections.ConfigDict(dict(attack="pgd", eps=2.0))
    return c


def sweep_config():
    """`e2rnas sweep`: one search per resource target (and objective set),
    each retrained and evaluated (`e2rnas_tf.experiments.sweep`)."""
    c = ml_collections.ConfigDict()
    c.variant = "paper"
    c.resource = "params"      # params | flops: the swept resource
    c.constraint = "abs"       # abs | max | floor (see search.resource)
    c.targets = (1.5, 2.0, 2.5, 3.0)   # millions, at search.resource scale
    # Each set must contain the swept resource; several sets multiply the
    # runs: --config.objective_sets="(('acc','params'),('acc','adv','params'))"
    c.objective_sets = (("acc", "adv", "params"),)
    c.seed = 0
    c.data = _data_source()
    c.search = search_config()
    c.train = train_config()
    # The robust accuracy of the Pareto front.
    c.robust = ml_collections.ConfigDict(dict(attack="pgd", eps=2.0))
    c.model_name = "e2rnas"    # the served model the front is exported to
    return c


PIPELINE_VARIANTS = ("cpu", "paper", "tiny")


def set_pipeline_scale(c, variant):
    """Sets the search/train/evaluate scale of a reproduce or sweep config.

    - ``paper``: the paper's settings (search 8 cells C=16, 32x32, batch
      64, 50 epochs; retraining 20 cells C=36, 600 epochs, cutout 16,
      drop-path 0.2; the full test set, PGD-20). Needs a GPU.
    - ``cpu``: what a 2-core CPU runs in minutes per setting. Search:
      5 cells, C=8, 16x16, 10,000 training images split 5,000/5,000, batch
      32, 4 epochs of which the first trains only w. Retraining: 8 cells,
      C=16, 32x32, the same 10,000 images, 3 epochs, batch 64, auxiliary
      head, no cutout or drop-path (test accuracy on 2,000 images).
      Evaluation on 1,000 test images, PGD-10.
    - ``tiny``: a few steps of each stage on the embedded subset (tests).

    All variants evaluate FGSM and PGD at 2/255 and 8/255, every run on
    the same test images with the same PGD random starts (evaluation seed
    0, whatever the run's seed), and load CIFAR-10 through tfds
    (``c.data.name = "cifar10"``) except ``tiny``.
    """
    if variant not in PIPELINE_VARIANTS:
        raise ValueError(f"Expected a variant in {list(PIPELINE_VARIANTS)}. "
                         f"Received: {variant!r}")
    c.variant = variant
    s, t = c.search, c.train
    ev = t.evaluate
    ev.attacks = ("fgsm", "pgd")
    ev.epsilons = (2.0, 8.0)
    # Methods and seeds are compared on the same images.
    ev.seed = 0
    c.data.name = "embedded" if variant == "tiny" else "cifar10"
    if variant == "paper":
        ev.pgd_steps = 20
    elif variant == "cpu":
        s.data.image_size = 16
        s.data.num_train = 10000
        s.data.num_test = 1000
        s.model.layers, s.model.channels = 5, 8
        s.batch_size, s.eval_batch_size = 32, 250
        s.epochs = 4
        s.arch.warmup_epochs = 1
        t.data.num_train = 10000
        t.data.num_test = 2000
        t.data.cutout = 0
        t.model.layers, t.model.channels = 8, 16
        t.model.drop_path = 0.0
        t.batch_size, t.eval_batch_size = 64, 250
        t.epochs = 3
        ev.num_examples = 1000
        ev.pgd_steps = 10
        ev.batch_size = 250
    else:
        s.data.image_size = 8
        s.data.num_train = 64
        s.data.num_test = 16
        s.model.layers, s.model.channels = 3, 4
        s.model.steps, s.model.multiplier = 2, 2
        s.resource.layers, s.resource.channels = 5, 8
        s.batch_size, s.eval_batch_size = 8, 16
        s.epochs, s.steps_per_epoch = 2, 2
        s.arch.warmup_epochs = 1
        s.log_every = 1000
        t.data.image_size = 8
        t.data.num_train = 32
        t.data.num_test = 16
        t.data.cutout = 0
        t.model.layers, t.model.channels = 3, 4
        t.model.drop_path = 0.0
        t.batch_size, t.eval_batch_size = 8, 16
        t.epochs, t.steps_per_epoch = 1, 2
        t.log_every = 1000
        ev.num_examples = 16
        ev.pgd_steps = 2
        ev.batch_size = 16
    return c
