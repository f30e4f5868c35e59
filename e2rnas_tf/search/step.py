"""The E2RNAS bi-level search step: alpha by MGDA over objectives, then w.

One call of `SearchStep` is one DARTS iteration: the architecture ``alpha``
takes an Adam step along the MGDA combination of the objectives' gradients
on an architecture-validation batch, then the supernet weights ``w`` take an
SGD-momentum step on a weight-training batch at the new ``alpha``.

Where this runs: `SearchStep.__call__` is a `tf.function` (autograph off)
that calls `tf.distribute.Strategy.run` on the per-replica step. Inside a
replica every gradient and loss is all-reduced (summed, the losses being
pre-scaled to the global batch) before it is used, so every replica solves
the same MGDA problem and applies the same update; variables are only
written through `merge_call` + `extended.update`. Under ``jit_compile``
XLA compiles the whole step with one replica, and each replica's forward
and backward passes and attacks with several (`runtime.jit_scope`).

Reference:
    Yue, Lin, Huang, Zhang. Effective, Efficient and Robust Neural
    Architecture Search. https://arxiv.org/abs/2011.09820
    Liu, Simonyan, Yang. DARTS: Differentiable Architecture Search.
    https://arxiv.org/abs/1806.09055
"""

from __future__ import annotations

import functools

import tensorflow as tf

from e2rnas_tf import optim, runtime, schedules
from e2rnas_tf.search import mgda, resources
from e2rnas_tf.search import objectives as obj_lib

OBJECTIVES = ("acc", "adv", "params", "flops", "ood")
NETWORK_OBJECTIVES = ("acc", "adv", "ood")
ORDERS = ("first", "second")


class SearchDivergedError(ValueError):
    """The search skipped too many consecutive steps (non-finite values)."""


def check_objectives(names):
    """Validates ``config.objectives``; returns them as a tuple.

    Args:
        names: sequence of objective names, each in `OBJECTIVES`, distinct,
            at most 5 of them.

    Returns:
        A tuple of names.
    """
    names = tuple(names)
    if not names:
        raise ValueError(
            "Expected at least one objective. Received: objectives=[]")
    for name in names:
        if name not in OBJECTIVES:
            raise ValueError(
                f"Expected objectives among {list(OBJECTIVES)}. "
                f"Received: objectives={list(names)}")
    if len(set(names)) != len(names):
        raise ValueError(
            f"Expected distinct objectives. Received: objectives={list(names)}")
    return names


def objective_start_epochs(config):
    """``{objective: first epoch (0-based) it is used}`` of a search config.

    From ``config.objective_start`` (the authors' ``adv_later`` /
    ``nop_later``: an objective joins the upper level once the epoch
    reaches its value); objectives it does not name start at 0.
    """
    starts = config.get("objective_start", None)
    starts = {} if starts is None else dict(starts)
    out = {}
    for name in check_objectives(config.objectives):
        value = starts.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"Expected config.objective_start.{name} to be an integer "
                f">= 0 (an epoch). Received: {value!r}")
        out[name] = value
    return out


def check_resource(resource):
    """Validates ``config.resource``; raises ValueError with the field."""
    for field, choices in (("cost_model", resources.COST_MODELS),
                           ("estimate", resources.ESTIMATES)):
        if resource[field] not in choices:
            raise ValueError(
                f"Expected config.resource.{field} in {list(choices)}. "
                f"Received: {resource[field]!r}")
    for kind in resources.KINDS:
        mode = resource[f"{kind}_constraint"]
        if mode not in resources.CONSTRAINTS:
            raise ValueError(
                f"Expected config.resource.{kind}_constraint in "
                f"{list(resources.CONSTRAINTS)}. Received: {mode!r}")
    if not float(resource.gumbel_tau) > 0:
        raise ValueError(
            "Expected config.resource.gumbel_tau > 0. "
            f"Received: {resource.gumbel_tau!r}")


def normalization_scale(grads, loss, mode):
    """The factor `mgda.normalize_gradients` multiplies one gradient by.

    The second-order step needs it to weight each objective's w-gradient
    exactly as its alpha-gradient entered the combined direction.
    """
    if mode == "none":
        return tf.constant(1.0)
    if mode == "l2":
        divisor = optim.global_norm(grads)
    elif mode == "loss":
        divisor = loss
    else:
        divisor = loss * optim.global_norm(grads)
    return 1.0 / tf.where(divisor > 0.0, divisor, 1.0)


class SearchStep(tf.Module):
    """The compiled E2RNAS search step and all the state it updates.

    Create it inside ``strategy.scope()`` after the network is built. The
    state it owns (``iterations``, ``consecutive_skips``, the loss scale and
    both optimizers) belongs in the run's checkpoint.

    Args:
        network: a built `search_space.SearchNetwork`.
        config: a `config_lib.search_config()`.
        num_classes: classes of the data set (for the resource tables).
        image_size: input size (for the resource tables).
        steps_per_epoch: steps in one epoch (for the lr schedule).
        strategy: the `tf.distribute.Strategy` (default: the current one).

    Call arguments:
        train_batch: ``(images, labels)`` for the weights (a distributed
            value under a multi-replica strategy).
        valid_batch: ``(images, labels)`` for the architecture.

    Returns (of a call):
        A dict of float32 scalars: ``objective/<name>`` (value of each
        objective), ``weight/<name>`` (its MGDA weight), ``nonfinite/<name>``
        (1 if it caused a skip; also ``nonfinite/train``), ``cost/params``
        / ``cost/flops`` (expected cost, millions), ``lr``, ``arch_lr``,
        ``train/loss``, ``train/acc``, ``valid/acc``, ``skipped``,
        ``consecutive_skips`` and, under mixed_float16, ``loss_scale``.

    Attributes:
        jit_scope: what XLA compiles under ``config.jit_compile``:
            ``none``, ``step`` (one replica) or ``replica`` (several); see
            `runtime.jit_scope`.

    Reference:
        https://arxiv.org/abs/2011.09820, https://arxiv.org/abs/1806.09055
    """

    def __init__(self, network, config, *, num_classes, image_size,
                 steps_per_epoch, strategy=None, name="search_step"):
        super().__init__(name=name)
        self.network = network
        self.config = config
        self.objectives = check_objectives(config.objectives)
        if config.arch.order not in ORDERS:
            raise ValueError(
                f"Expected config.arch.order in {list(ORDERS)}. "
                f"Received: {config.arch.order!r}")
        self.strategy = strategy or tf.distribute.get_strategy()
        self.steps_per_epoch = max(int(steps_per_epoch), 1)
        warmup = config.arch.get("warmup_epochs", 0)
        if not isinstance(warmup, int) or warmup < 0:
            raise ValueError(
                "Expected config.arch.warmup_epochs to be an integer >= 0. "
                f"Received: {warmup!r}")
        self.warmup_steps = tf.constant(warmup * self.steps_per_epoch,
                                        tf.int64)
        self.float16 = config.mixed_precision == "mixed_float16"
        self.start_epochs = objective_start_epochs(config)
        c = config.combine
        if c.method == "fixed" and len(c.weights) != len(self.objectives):
            raise ValueError(
                "Expected one config.combine.weights entry per objective "
                f"({len(self.objectives)}). Received: weights={list(c.weights)}")
        self.ood_upper = "ood" in self.objectives
        self.ood_lower_weight = float(config.ood.lower_weight)
        if self.ood_lower_weight < 0:
            raise ValueError(
                "Expected config.ood.lower_weight >= 0. "
                f"Received: {self.ood_lower_weight!r}")
        # Whether each call needs a batch of out-of-distribution images.
        self.needs_ood = self.ood_upper or self.ood_lower_weight > 0
        r = config.resource
        check_resource(r)
        scale = dict(channels=r.channels, layers=r.layers,
                     num_classes=num_classes, image_size=image_size,
                     steps=config.model.steps,
                     multiplier=config.model.multiplier,
                     stem_multiplier=config.model.stem_multiplier,
                     primitives=config.model.primitives)
        self.tables = {}
        for kind in resources.KINDS:
            if kind in self.objectives:
                self.tables[kind] = resources.make_table(
                    r.cost_model, kind, **scale)
        # What every step reports: the derived genotype's parameters in
        # millions at the evaluation scale, whatever the objectives' model.
        self.report_table = (
            self.tables["params"] if r.cost_model == "measured"
            and "params" in self.tables
            else resources.measured_table("params", **scale))
        w_vars = network.weight_variables
        alpha = network.arch_variables
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False,
                                      name="iterations")
        self.consecutive_skips = tf.Variable(0, dtype=tf.int64,
                                             trainable=False,
                                             name="consecutive_skips")
        self.loss_scale = optim.DynamicLossScale(self.float16)
        self.w_optimizer = optim.MomentumSGD(w_vars, config.optim.momentum,
                                       config.optim.weight_decay)
        self.arch_optimizer = optim.AdamL2(alpha, config.arch.beta1,
                                     config.arch.beta2,
                                     config.arch.weight_decay)
        self.jit_scope = runtime.jit_scope(
            config.jit_compile, self.strategy.num_replicas_in_sync)
        if self.jit_scope == "replica":
            # Each replica's own passes as XLA programs on its device (traced
            # per device and per kind); everything that crosses replicas
            # stays outside them. The wrappers look the forward pass up at
            # trace time, so a replaced `_forward` (tests) is honoured.
            self._network_loss_grads = runtime.per_replica_xla(
                self._network_loss_grads)
            self._attack = runtime.per_replica_xla(self._attack)
        self._compiled = tf.function(
            self._distributed_step, autograph=False,
            jit_compile=self.jit_scope == "step")

    # -- objectives of a step ------------------------------------------------

    def active_objectives(self, step=None):
        """The objectives the upper level uses at ``step`` (a Python int;
        default: the current step): those whose start epoch
        (``config.objective_start``) has been reached."""
        step = int(self.iterations.numpy()) if step is None else int(step)
        epoch = step // self.steps_per_epoch
        return tuple(n for n in self.objectives
                     if self.start_epochs[n] <= epoch)

    def ood_lower_weight_at(self, step):
        """The lower level's OOD weight at ``step`` (a tensor):
        ``config.ood.lower_weight``, times ``epoch / epochs`` with
        ``config.ood.lower_ramp`` (the authors' "oodS" runs,
        docs/fidelity.md)."""
        weight = tf.constant(self.ood_lower_weight)
        if not self.config.ood.lower_ramp:
            return weight
        epoch = tf.cast(step // self.steps_per_epoch, tf.float32)
        return weight * epoch / float(max(int(self.config.epochs), 1))

    def _combine_kwargs(self, active):
        c = self.config.combine
        # With one objective there is nothing to balance: its gradient is
        # used as is, so `objectives=[acc]` is exactly DARTS.
        fixed = None
        if c.method == "fixed":
            fixed = [w for n, w in zip(self.objectives, c.weights)
                     if n in active]
        return dict(method=c.method,
                    normalization=(c.normalization if len(active) > 1
                                   else "none"),
                    apply_to=c.apply_to, fixed_weights=fixed,
                    solver=c.get("solver", "exact"),
                    accumulate=bool(c.get("accumulate", False)))

    # -- schedules ---------------------------------------------------------

    def learning_rate(self, step=None):
        """The weight learning rate at ``step`` (default: the current one)."""
        step = self.iterations if step is None else step
        o = self.config.optim
        epoch = tf.convert_to_tensor(step) // self.steps_per_epoch
        return schedules.cosine_lr(epoch, self.config.epochs, o.lr, o.lr_min)

    # -- losses ------------------------------------------------------------

    def _global_batch(self, labels):
        replicas = self.strategy.num_replicas_in_sync
        return tf.cast(tf.shape(labels)[0] * replicas, tf.float32)

    def _ce(self, logits, labels):
        # Scaled to the global batch: the all-reduce SUM of the replicas'
        # losses and gradients is then the mean over the global batch.
        per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(labels, tf.int32),
            logits=tf.cast(logits, tf.float32))
        return tf.reduce_sum(per_example) / self._global_batch(labels)

    def _acc(self, logits, labels):
        hits = tf.equal(tf.argmax(logits, -1, output_type=tf.int32),
                        tf.cast(labels, tf.int32))
        return (tf.reduce_sum(tf.cast(hits, tf.float32))
                / self._global_batch(labels))

    def _forward(self, images):
        return self.network(images, training=True)

    def _sources(self, which):
        alpha = [optim.raw_variable(a) for a in self.network.arch_variables]
        w_vars = [optim.raw_variable(v) for v in self.network.weight_variables]
        return {"alpha": alpha, "w": w_vars, "all": alpha + w_vars}[which]

    def _ood(self, logits):
        # A mean over the replica's batch, divided by the replicas: the
        # all-reduce SUM is then the mean over the global batch.
        replicas = self.strategy.num_replicas_in_sync
        return obj_lib.ood_kl(logits) / float(replicas)

    def _network_loss_grads(self, images, labels, which, kind="ce",
                            ood_images=None, ood_weight=None):
        """Scaled loss, logits and (unscaled) gradients.

        ``which`` selects the sources: ``alpha``, ``w`` or ``all``.
        ``kind``: ``ce`` (cross-entropy of ``images`` and ``labels``) or
        ``ood`` (``config.ood.upper_scale`` times `objectives.ood_kl` of
        ``images``, out-of-distribution; ``labels`` unused). With
        ``ood_images`` (the lower level), ``ood_weight`` times their
        `objectives.ood_kl` is added, from a forward pass of its own, as
        the authors' weight training does. (Wrapping this in an inner
        `tf.function` to trace it once per kind did not shorten the time to
        the first step on the CPU: the executor then spends the saved
        tracing time instantiating the function calls.)
        """
        sources = self._sources(which)
        with tf.GradientTape() as tape:
            logits = self._forward(images)
            if kind == "ce":
                loss = self._ce(logits, labels)
            else:
                loss = float(self.config.ood.upper_scale) * self._ood(logits)
            if ood_images is not None:
                loss += ood_weight * self._ood(self._forward(ood_images))
            scaled = self.loss_scale.scale_loss(loss)
        grads = tape.gradient(scaled, sources)
        grads = [tf.zeros_like(s) if g is None else tf.cast(g, tf.float32)
                 for g, s in zip(grads, sources)]
        return loss, logits, self.loss_scale.unscale(grads)

    def _attack(self, images, labels, which, seed):
        """The adversarial images of ``which`` attack: ``valid`` (the adv
        objective's, ``config.attack``) or ``train`` (``adv_train``'s)."""
        cfg = (self.config.attack if which == "valid"
               else self.config.adv_train.attack)
        return obj_lib.attack(self._forward, images, labels, cfg, seed)

    def _resource_loss_grads(self, kind, alpha, seed):
        r = self.config.resource
        m = self.config.model
        with tf.GradientTape() as tape:
            tape.watch(alpha)
            cost = resources.resource_cost(
                alpha[0], alpha[1], self.tables[kind], r.estimate,
                steps=m.steps, primitives=m.primitives, tau=r.gumbel_tau,
                seed=seed)
            loss = resources.constrain(cost, r[f"{kind}_target"],
                                       r[f"{kind}_constraint"],
                                       r[f"{kind}_target_max"])
        grads = tape.gradient(loss, alpha)
        grads = [tf.zeros_like(a) if g is None else g
                 for g, a in zip(grads, alpha)]
        return loss, cost, grads

    # -- the upper level ----------------------------------------------------

    def arch_direction(self, valid_batch, train_batch, lr, seed,
                       ood_images=None, active=None):
        """The combined architecture update direction (no variable changes).

        Runs in a replica context. First order: each objective's gradient
        w.r.t. alpha at the current weights, combined by `mgda.combine`.
        Second order (DARTS' unrolled step): the objectives are evaluated at
        the virtual weights ``w' = w - lr (m buf + grad L_train + wd w)``
        and the implicit term ``-lr * H_{alpha w} v`` is added, with one
        finite-difference Hessian-vector product on the combined weight
        gradient ``v = sum_k c_k s_k dL_k/dw'`` (``s_k`` the normalisation
        factor of objective ``k``). The weights are restored exactly.

        Args:
            valid_batch: ``(images, labels)``, the architecture batch.
            train_batch: ``(images, labels)``, the weight batch (second
                order only).
            lr: the weight learning rate of the virtual step.
            seed: ``[2]`` int32 seed for the attack's random start (and
                the Gumbel noise of ``resource.estimate="gumbel"``).
            ood_images: out-of-distribution images (the ``ood`` objective).
            active: the objectives to combine (a tuple, a subset of
                ``config.objectives`` in its order; default all of them).

        Returns:
            A dict with ``direction`` (list of 2 tensors), ``weights``
            ``[K]``, ``losses`` ``[K]``, ``finite`` (list of K bool
            scalars), ``costs`` (dict kind -> resource estimate), ``ok``
            (bool) and ``valid_acc``, K = ``len(active)``.
        """
        active = self.objectives if active is None else tuple(active)
        combine_kwargs = self._combine_kwargs(active)
        net = self.network
        cfg = self.config
        xv, yv = valid_batch
        alpha = [optim.raw_variable(a) for a in net.arch_variables]
        w_vars = [optim.raw_variable(v) for v in net.weight_variables]
        second = cfg.arch.order == "second"
        if second:
            w_saved = [tf.identity(optim.raw_variable(v)) for v in w_vars]
            xt, yt = train_batch
            _, _, g_train = self._network_loss_grads(xt, yt, "w")
            g_train = optim.all_reduce(g_train)
            optim.assign(w_vars, self.w_optimizer.virtual_step(w_saved, g_train,
                                                          lr))
        losses, alpha_grads, w_grads, costs = [], [], [], {}
        valid_acc = tf.constant(0.0)
        which = "all" if second else "alpha"
        for name in active:
            if name == "ood":
                loss, _, grads = self._network_loss_grads(
                    ood_images, None, which, kind="ood")
                loss, grads = optim.all_reduce((loss, grads))
                alpha_grads.append(grads[:2])
                w_grads.append(grads[2:])
            elif name in NETWORK_OBJECTIVES:
                if name == "adv":
                    images = self._attack(xv, yv, "valid", seed)
                else:
                    images = xv
                loss, logits, grads = self._network_loss_grads(
                    images, yv, which)
                hits = self._acc(logits, yv)
                loss, grads, hits = optim.all_reduce((loss, grads, hits))
                if name == "acc":
                    valid_acc = hits
                alpha_grads.append(grads[:2])
                w_grads.append(grads[2:])
            else:
                loss, costs[name], grads = self._resource_loss_grads(
                    name, alpha, tf.stack([seed[0] + 7919, seed[1]]))
                alpha_grads.append(grads)
                w_grads.append(None)
            losses.append(loss)
        finite = [optim.all_finite([loss] + list(g))
                  for loss, g in zip(losses, alpha_grads)]
        if second:
            finite = [f & optim.all_finite(g) if g else f
                      for f, g in zip(finite, w_grads)]
        losses_t = tf.stack(losses)
        direction, weights, ok = mgda.combine(alpha_grads, losses_t,
                                              **combine_kwargs)
        if second:
            direction, ok_hvp = self._implicit(
                direction, weights, alpha_grads, losses, w_grads, w_saved,
                train_batch, lr, combine_kwargs["normalization"])
            ok = ok & ok_hvp
            optim.assign(w_vars, w_saved)
        ok = ok & tf.reduce_all(tf.stack(finite))
        return dict(direction=direction, weights=weights, losses=losses_t,
                    finite=finite, costs=costs, ok=ok, valid_acc=valid_acc)

    def _implicit(self, direction, weights, alpha_grads, losses, w_grads,
                  w_saved, train_batch, lr, normalization):
        """``direction - lr * H_{alpha w} v`` by central differences."""
        cfg = self.config
        net = self.network
        w_vars = [optim.raw_variable(v) for v in net.weight_variables]
        normalized = cfg.combine.apply_to == "normalized"
        v = None
        for k, g in enumerate(w_grads):
            if not g:  # resource objectives do not depend on w
                continue
            coef = weights[k]
            if normalized:
                coef = coef * normalization_scale(
                    alpha_grads[k], losses[k], normalization)
            term = [coef * t for t in g]
            v = term if v is None else [a + b for a, b in zip(v, term)]
        if v is None:
            return direction, tf.constant(True)
        norm = optim.global_norm(v)
        eps = cfg.arch.unrolled_eps / tf.where(norm > 0.0, norm, 1.0)
        xt, yt = train_batch
        grads_pm = []
        for sign in (1.0, -1.0):
            optim.assign(w_vars, [w + sign * eps * d for w, d in zip(w_saved, v)])
            _, _, g = self._network_loss_grads(xt, yt, "alpha")
            grads_pm.append(optim.all_reduce(g))
        hvp = [(p - m) / (2.0 * eps) for p, m in zip(*grads_pm)]
        direction = [d - lr * h for d, h in zip(direction, hvp)]
        return direction, optim.all_finite(hvp)

    # -- the whole step -------------------------------------------------------

    def _replica_step(self, xt, yt, xv, yv, xo, active):
        net = self.network
        cfg = self.config
        w_vars = [optim.raw_variable(v) for v in net.weight_variables]
        alpha_vars = [optim.raw_variable(v) for v in net.arch_variables]
        arch_ids = {id(v) for v in alpha_vars}
        state_vars = [optim.raw_variable(v) for v in net.non_trainable_variables
                      if id(optim.raw_variable(v)) not in arch_ids]
        step = self.iterations.read_value()
        lr = self.learning_rate(step)
        arch_lr = tf.constant(float(cfg.arch.lr))
        seed = tf.stack([tf.constant(int(cfg.seed), tf.int32),
                         tf.cast(step, tf.int32)])
        # Snapshots so that a skipped step leaves everything as it was
        # (including the batch-norm statistics the forward passes update).
        state_saved = [tf.identity(optim.raw_variable(v)) for v in state_vars]
        alpha_saved = [tf.identity(optim.raw_variable(v)) for v in alpha_vars]

        arch = self.arch_direction((xv, yv), (xt, yt), lr, seed,
                                   ood_images=xo, active=active or None)
        adam = self.arch_optimizer
        new_alpha, new_m, new_v, new_t = adam.updates(
            alpha_saved, arch["direction"], arch_lr)
        ok_arch = arch["ok"] & optim.all_finite(new_alpha)
        # During the warm-up alpha and Adam's state are kept (the direction
        # is still computed, so its objectives are logged and checked);
        # likewise before the first objective's start epoch.
        arch_on = step >= self.warmup_steps
        if not active:
            arch_on = tf.constant(False)
        keep = tf.logical_not(arch_on)
        new_alpha = [tf.where(keep, s, a)
                     for a, s in zip(new_alpha, alpha_saved)]
        new_m = [tf.where(keep, m.read_value(), n)
                 for n, m in zip(new_m, adam.m)]
        new_v = [tf.where(keep, v.read_value(), n)
                 for n, v in zip(new_v, adam.v)]
        new_t = tf.where(keep, adam.iterations.value(), new_t)
        arch_lr = tf.where(arch_on, arch_lr, 0.0)
        # DARTS updates alpha first and trains w at the new alpha.
        optim.assign(alpha_vars, [tf.where(ok_arch, a, s)
                             for a, s in zip(new_alpha, alpha_saved)])

        if cfg.adv_train.enabled:
            xt = self._attack(xt, yt, "train", seed + 1)
        w_saved = [tf.identity(optim.raw_variable(v)) for v in w_vars]
        if self.ood_lower_weight > 0:
            train_loss, logits, g_w = self._network_loss_grads(
                xt, yt, "w", ood_images=xo,
                ood_weight=self.ood_lower_weight_at(step))
        else:
            train_loss, logits, g_w = self._network_loss_grads(xt, yt, "w")
        train_acc = self._acc(logits, yt)
        train_loss, train_acc, g_w = optim.all_reduce((train_loss, train_acc, g_w))
        g_w, g_norm = tf.clip_by_global_norm(g_w, cfg.optim.grad_clip)
        # The global norm is NaN/Inf iff a gradient entry is (or its square
        # overflows float32): one check instead of one per weight tensor.
        ok_train = tf.math.is_finite(train_loss) & tf.math.is_finite(g_norm)
        ok = ok_arch & ok_train
        sgd = self.w_optimizer
        new_w, new_buf = sgd.updates(w_saved, g_w, lr, apply=ok)
        optim.assign(w_vars, new_w)
        optim.assign(sgd.buffers, new_buf)

        def pick(new, old):
            return [tf.where(ok, n, o) for n, o in zip(new, old)]

        optim.assign(alpha_vars, pick(new_alpha, alpha_saved))
        optim.assign(adam.m, pick(new_m, [m.read_value() for m in adam.m]))
        optim.assign(adam.v, pick(new_v, [v.read_value() for v in adam.v]))
        optim.assign([adam.iterations], pick([new_t], [adam.iterations.value()]))
        optim.assign(state_vars, [tf.where(ok, optim.raw_variable(v).read_value(), s)
                             for v, s in zip(state_vars, state_saved)])
        skips = tf.where(ok, tf.constant(0, tf.int64),
                         self.consecutive_skips + 1)
        # Dynamic loss scale: an overflow halves it (and the step is skipped
        # like any non-finite step); a long finite run doubles it.
        scale_vars, scale_values = self.loss_scale.updates(ok)
        optim.assign([self.iterations, self.consecutive_skips] + scale_vars,
                     [step + 1, skips] + scale_values)

        metrics = {"lr": lr, "arch_lr": arch_lr,
                   "train/loss": train_loss, "train/acc": train_acc,
                   "valid/acc": arch["valid_acc"],
                   "skipped": 1.0 - tf.cast(ok, tf.float32),
                   "consecutive_skips": tf.cast(skips, tf.float32),
                   "nonfinite/train": 1.0 - tf.cast(ok_train, tf.float32)}
        zero = tf.constant(0.0)
        used = active or self.objectives
        for name in self.objectives:
            # An objective before its start epoch reports 0 and active 0.
            k = used.index(name) if name in used else None
            on = k is not None
            metrics[f"objective/{name}"] = arch["losses"][k] if on else zero
            metrics[f"weight/{name}"] = arch["weights"][k] if on else zero
            metrics[f"nonfinite/{name}"] = (
                1.0 - tf.cast(arch["finite"][k], tf.float32) if on else zero)
            if self.start_epochs[name]:
                metrics[f"active/{name}"] = tf.constant(float(name in active))
        for kind, cost in arch["costs"].items():
            metrics[f"cost/{kind}"] = cost
        # The genotype the DARTS rule derives from the new alpha: its
        # parameters (millions, evaluation scale) every step.
        m = cfg.model
        derived = [resources.derived_weights(tf.nn.softmax(a, axis=-1),
                                             m.steps, m.primitives)
                   for a in alpha_vars]
        metrics["derived/params"] = resources.expected_cost(
            *derived, self.report_table)
        if self.float16:
            metrics["loss_scale"] = self.loss_scale.scale.read_value()
        return {k: tf.cast(v, tf.float32) for k, v in metrics.items()}

    def _distributed_step(self, train_batch, valid_batch, ood_images,
                          active):
        xt, yt = train_batch
        xv, yv = valid_batch
        # `active` is a trace-time tuple of names, bound rather than passed
        # through the strategy (which distributes tensors).
        out = self.strategy.run(
            functools.partial(self._replica_step, active=active),
            args=(xt, yt, xv, yv, ood_images))
        # Every metric was all-reduced inside the replicas: any copy will do.
        return {k: self.strategy.experimental_local_results(v)[0]
                for k, v in out.items()}

    def concrete_function(self, train_batch, valid_batch, ood_images=None):
        """The traced step for these inputs and the current active
        objectives (its ``.graph`` for op counts and FLOPs)."""
        return self._compiled.get_concrete_function(
            train_batch, valid_batch,
            ood_images if self.needs_ood else None, self.active_objectives())

    def __call__(self, train_batch, valid_batch, ood_images=None):
        """One bi-level step; see the class docstring.

        The set of objectives whose start epoch has been reached is read
        from the step counter here, in Python, and selects the compiled
        function: each distinct set is traced once (the authors'
        ``adv_later`` / ``nop_later`` runs have two), and objectives not
        yet active cost nothing.
        """
        if self.needs_ood and ood_images is None:
            raise ValueError(
                "Expected `ood_images` (config.objectives has 'ood' or "
                "config.ood.lower_weight > 0). Received: None")
        return self._compiled(train_batch, valid_batch,
                              ood_images if self.needs_ood else None,
                              self.active_objectives())
