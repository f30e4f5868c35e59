"""``e2rnas info``: what a search config sets up, before it runs.

The supernet per cell, its parameter counts, the dataset, and, for each
resource objective, what it is worth at the initial alpha, where its target
lies and which way it pushes the architecture from the first step: the
single most telling fact about a search's outcome (docs/fidelity.md: a
target below the uniform-alpha value drives every edge toward
parameter-free ops).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from e2rnas_tf import data as data_lib
from e2rnas_tf import runtime
from e2rnas_tf.search import resources
from e2rnas_tf.search import step as search_step
from e2rnas_tf.space.costs import count_params
from e2rnas_tf.space.search_space import SearchNetwork

# What pushing a cost down means, per kind.
_CHEAPER = {"params": "parameter-free ops", "flops": "cheaper ops"}
_COSTLIER = {"params": "parameterised ops", "flops": "costlier ops"}


@dataclasses.dataclass(frozen=True)
class ResourceReport:
    """One resource objective of a config, at the initial alpha.

    Attributes:
        kind: ``params`` or ``flops``.
        table: its `resources.ResourceTable`.
        estimate: ``config.resource.estimate``.
        constraint: the constraint mode.
        target: the target (the table's units).
        initial: the estimate at the initial alpha.
        uniform: the estimate at uniform op weights.
        cheapest: every edge its cheapest op other than ``none``.
        costliest: every edge its costliest op.
        slope: d(objective)/d(cost) at the initial alpha: > 0 lowers the
            cost, < 0 raises it, 0 leaves it alone.
        uniform_slope: the same at the uniform-alpha value.
    """

    kind: str
    table: resources.ResourceTable
    estimate: str
    constraint: str
    target: float
    initial: float
    uniform: float
    cheapest: float
    costliest: float
    slope: float
    uniform_slope: float

    @property
    def push(self):
        """Which way the objective pushes the architecture, in words."""
        if self.slope > 0:
            return f"toward {_CHEAPER[self.kind]}"
        if self.slope < 0:
            return f"toward {_COSTLIER[self.kind]}"
        return "nowhere (the constraint is inactive here)"

    @property
    def below_uniform(self):
        """The target lies below the uniform-alpha value and, there, the
        objective lowers the cost: it pulls every edge toward the cheapest
        ops from the first step."""
        return (self.constraint != "none" and self.target < self.uniform
                and self.uniform_slope > 0)


def _value(alpha_normal, alpha_reduce, table, estimate, primitives, steps):
    # Gumbel samples: report the expected value they are an estimate of.
    estimate = "expected" if estimate == "gumbel" else estimate
    return float(resources.resource_cost(
        alpha_normal, alpha_reduce, table, estimate, steps=steps,
        primitives=primitives))


def resource_reports(config, table_scale, alpha_normal, alpha_reduce):
    """A `ResourceReport` per resource objective of a search config.

    Args:
        config: a search config.
        table_scale: ``num_classes`` and ``image_size`` of the data (the
            measured cost model needs them).
        alpha_normal, alpha_reduce: the initial alphas.

    Returns:
        A list of `ResourceReport`, in objective order.
    """
    r = config.resource
    m = config.model
    primitives = tuple(m.primitives)
    reports = []
    for kind in config.objectives:
        if kind not in resources.KINDS:
            continue
        table = resources.make_table(
            r.cost_model, kind, channels=r.channels, layers=r.layers,
            steps=m.steps, multiplier=m.multiplier,
            stem_multiplier=m.stem_multiplier, primitives=primitives,
            **table_scale)

        def at(a_n, a_r):
            return _value(a_n, a_r, table, r.estimate, primitives, m.steps)

        def vertex(pick):
            # Large logits on one op per edge: the estimate at that vertex.
            logits = []
            for t in (table.normal, table.reduce):
                costs = np.where(np.array([p != "none" for p in primitives]),
                                 t, np.nan)
                choice = pick(costs, axis=1)
                logits.append(30.0 * np.eye(len(primitives),
                                            dtype=np.float32)[choice])
            return at(*logits)

        def slope(value):
            cost = tf.Variable(value)
            with tf.GradientTape() as tape:
                objective = resources.constrain(
                    cost, r[f"{kind}_target"], r[f"{kind}_constraint"],
                    r[f"{kind}_target_max"])
            grad = tape.gradient(objective, cost)
            return 0.0 if grad is None else float(grad)

        zeros = np.zeros_like(np.asarray(alpha_normal), np.float32)
        initial, uniform = at(alpha_normal, alpha_reduce), at(zeros, zeros)
        reports.append(ResourceReport(
            kind=kind, table=table, estimate=r.estimate,
            constraint=r[f"{kind}_constraint"],
            target=float(r[f"{kind}_target"]), initial=initial,
            uniform=uniform, cheapest=vertex(np.nanargmin),
            costliest=vertex(np.nanargmax), slope=slope(initial),
            uniform_slope=slope(uniform)))
    return reports


def format_report(report, resource):
    """The lines `e2rnas info` prints for one `ResourceReport`."""
    t = report.table
    unit = f" {t.unit_name}" if t.unit_name else " (raw count)"
    fmt = "{:,.0f}" if t.unit == 1.0 else "{:.3f}"
    lines = [
        f"resource     {report.kind}: {t.model} cost model at "
        f"{resource.layers} cells, C={resource.channels}, {report.estimate} "
        f"estimate, units{unit}",
        f"  initial alpha {fmt.format(report.initial)}  uniform "
        f"{fmt.format(report.uniform)}  cheapest "
        f"{fmt.format(report.cheapest)}  costliest "
        f"{fmt.format(report.costliest)}",
    ]
    if report.constraint == "none":
        lines.append(f"  no target (minimised): pushes {report.push}")
    else:
        lines.append(f"  {report.constraint} target "
                     f"{fmt.format(report.target)}: pushes {report.push}")
    if report.below_uniform:
        lines.append(
            f"  warning: the target lies below the uniform-alpha value "
            f"{fmt.format(report.uniform)}: from the first step this "
            f"objective pushes every edge toward {_CHEAPER[report.kind]}")
    return lines


def main(config, args):
    """``e2rnas info``: the supernet, the dataset and the resource
    objectives a config selects."""
    search_step.check_resource(config.resource)
    with runtime.configured(config):
        _print_info(config)
    return 0


def _print_info(config):
    train, test, ds = data_lib.load(config.data)
    size = ds.image_size
    net = SearchNetwork(
        channels=config.model.channels, num_classes=ds.num_classes,
        layers=config.model.layers, steps=config.model.steps,
        multiplier=config.model.multiplier,
        stem_multiplier=config.model.stem_multiplier,
        primitives=config.model.primitives, mean=ds.mean, std=ds.std,
        alpha_seed=int(config.seed))
    net.build((None, size, size, 3))
    print(f"dataset      {ds.name}: {ds.num_train} train / {ds.num_test} test, "
          f"{ds.num_classes} classes, {size}x{size}x3")
    print(f"supernet     {config.model.layers} cells, C={config.model.channels}"
          f", {config.model.steps} nodes, {len(config.model.primitives)} ops")
    for cell in net.cells:
        kind = "reduce" if cell.reduction else "normal"
        print(f"  {cell.name:<10} {kind:<7} C={cell.channels:<4} "
              f"params={count_params(cell.trainable_variables):,}")
    print(f"weights      {count_params(net.weight_variables):,} parameters")
    print(f"architecture {count_params(net.arch_variables):,} parameters "
          f"(alpha_normal, alpha_reduce)")
    print(f"objectives   {', '.join(config.objectives)} "
          f"({config.combine.method}, {config.arch.order} order)")
    reports = resource_reports(
        config, dict(num_classes=ds.num_classes, image_size=size),
        net.alpha_normal.numpy(), net.alpha_reduce.numpy())
    for report in reports:
        for line in format_report(report, config.resource):
            print(line)
