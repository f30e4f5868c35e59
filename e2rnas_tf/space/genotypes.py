"""Genotypes: a found architecture as plain, validated data.

A genotype lists, for the normal and the reduction cell, two incoming edges
per intermediate node as ``(op, input_state)`` pairs (states 0 and 1 are the
cell's two inputs, state ``2 + i`` is node ``i``) and the states whose
concatenation is the cell's output. It is stored as JSON and never built by
evaluating strings.

Reference:
    Liu, Simonyan, Yang. DARTS. https://arxiv.org/abs/1806.09055
    Yue, Lin, Huang, Zhang. E2RNAS. https://arxiv.org/abs/2011.09820
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Sequence

import numpy as np

from e2rnas_tf.space.ops import PRIMITIVES

__all__ = ["Genotype", "GenotypeError", "PUBLISHED", "derive", "get"]


class GenotypeError(ValueError):
    """A genotype (file, dict or name) is not valid."""


Edge = tuple[str, int]


def _edges(value, field):
    if not isinstance(value, (list, tuple)):
        raise GenotypeError(
            f"Expected `{field}` to be a list of [op, input] pairs. "
            f"Received: {field}={value!r}")
    edges = []
    for k, edge in enumerate(value):
        if (not isinstance(edge, (list, tuple)) or len(edge) != 2
                or not isinstance(edge[0], str)
                or isinstance(edge[1], bool)
                or not isinstance(edge[1], (int, np.integer))):
            raise GenotypeError(
                f"Expected {field}[{k}] to be an [op, input] pair with a "
                f"string op and an integer input. Received: {edge!r}")
        edges.append((edge[0], int(edge[1])))
    return tuple(edges)


def _concat(value, field):
    if (not isinstance(value, (list, tuple))
            or not all(isinstance(v, (int, np.integer))
                       and not isinstance(v, bool) for v in value)):
        raise GenotypeError(
            f"Expected `{field}` to be a list of state indices. "
            f"Received: {field}={value!r}")
    return tuple(int(v) for v in value)


@dataclasses.dataclass(frozen=True)
class Genotype:
    """The two cells of a derived architecture.

    Attributes:
        normal: ``2 * steps`` ``(op, input)`` edges of the normal cell, two
            per intermediate node, node by node.
        normal_concat: states concatenated into the normal cell's output.
        reduce: edges of the reduction cell.
        reduce_concat: states concatenated into the reduction cell's output.

    Example:

    >>> g = PUBLISHED["DARTS_V2"]
    >>> Genotype.from_json(g.to_json()) == g
    True
    """

    normal: tuple[Edge, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Edge, ...]
    reduce_concat: tuple[int, ...]

    def __post_init__(self):
        for field in ("normal", "reduce"):
            object.__setattr__(self, field, _edges(getattr(self, field), field))
        for field in ("normal_concat", "reduce_concat"):
            object.__setattr__(self, field, _concat(getattr(self, field), field))
        self._validate()

    @property
    def steps(self):
        """Intermediate nodes per cell."""
        return len(self.normal) // 2

    def _validate(self):
        if not self.normal or len(self.normal) % 2:
            raise GenotypeError(
                "Expected an even, non-zero number of normal edges (two per "
                f"node). Received: {len(self.normal)} edges")
        if len(self.reduce) != len(self.normal):
            raise GenotypeError(
                "Expected the same number of edges in both cells. Received: "
                f"normal={len(self.normal)}, reduce={len(self.reduce)}")
        valid_ops = [p for p in PRIMITIVES if p != "none"]
        for cell in ("normal", "reduce"):
            for k, (op, j) in enumerate(getattr(self, cell)):
                node = k // 2
                if op not in valid_ops:
                    raise GenotypeError(
                        f"Unknown op {op!r} at {cell}[{k}]; expected one of "
                        f"{valid_ops}")
                if not 0 <= j < node + 2:
                    raise GenotypeError(
                        f"Input {j} at {cell}[{k}] is out of range: node "
                        f"{node} can only read states 0..{node + 1}")
            concat = getattr(self, f"{cell}_concat")
            if not concat:
                raise GenotypeError(f"Expected a non-empty {cell}_concat.")
            if len(set(concat)) != len(concat):
                raise GenotypeError(
                    f"Expected distinct states in {cell}_concat. "
                    f"Received: {list(concat)}")
            for s in concat:
                if not 0 <= s < self.steps + 2:
                    raise GenotypeError(
                        f"State {s} in {cell}_concat is out of range "
                        f"0..{self.steps + 1}")

    def to_dict(self):
        """JSON-ready dict: lists of ``[op, input]`` pairs and indices."""
        return {
            "normal": [list(e) for e in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [list(e) for e in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    @classmethod
    def from_dict(cls, data: Mapping):
        """Builds and validates a genotype from `to_dict` output."""
        if not isinstance(data, Mapping):
            raise GenotypeError(
                f"Expected a JSON object for a genotype. Received: "
                f"{type(data).__name__}")
        fields = {"normal", "normal_concat", "reduce", "reduce_concat"}
        missing = sorted(fields - set(data))
        extra = sorted(set(data) - fields)
        if missing:
            raise GenotypeError(f"Genotype is missing field(s) {missing}")
        if extra:
            raise GenotypeError(f"Genotype has unknown field(s) {extra}")
        return cls(**{k: data[k] for k in fields})

    def to_json(self, indent=None):
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise GenotypeError(f"Genotype is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def save(self, path):
        """Writes the genotype as JSON, atomically (temp file + rename)."""
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(self.to_json(indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        """Reads and validates a genotype JSON file."""
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise GenotypeError(
                f"Cannot read genotype file {path!r}: {e.strerror}") from None
        try:
            return cls.from_json(text)
        except GenotypeError as e:
            raise GenotypeError(f"{path}: {e}") from None


def _genotype(normal, reduce, concat=(2, 3, 4, 5)):
    return Genotype(tuple(normal), tuple(concat), tuple(reduce), tuple(concat))


PUBLISHED = {
    "DARTS_V1": _genotype(
        normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0),
                ("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 1),
                ("sep_conv_3x3", 0), ("skip_connect", 2)],
        reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2),
                ("max_pool_3x3", 0), ("max_pool_3x3", 0), ("skip_connect", 2),
                ("skip_connect", 2), ("avg_pool_3x3", 0)]),
    "DARTS_V2": _genotype(
        normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0),
                ("sep_conv_3x3", 1), ("sep_conv_3x3", 1), ("skip_connect", 0),
                ("skip_connect", 0), ("dil_conv_3x3", 2)],
        reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2),
                ("max_pool_3x3", 1), ("max_pool_3x3", 0), ("skip_connect", 2),
                ("skip_connect", 2), ("max_pool_3x3", 1)]),
    # As published by the E2RNAS authors (arXiv 2011.09820).
    "E2RNAS": _genotype(
        normal=[("avg_pool_3x3", 0), ("skip_connect", 1), ("avg_pool_3x3", 0),
                ("sep_conv_3x3", 2), ("sep_conv_5x5", 3), ("avg_pool_3x3", 0),
                ("avg_pool_3x3", 0), ("sep_conv_5x5", 2)],
        reduce=[("avg_pool_3x3", 0), ("avg_pool_3x3", 1), ("avg_pool_3x3", 0),
                ("avg_pool_3x3", 1), ("avg_pool_3x3", 0), ("skip_connect", 3),
                ("avg_pool_3x3", 0), ("skip_connect", 3)]),
}


def _derive_cell(weights, primitives, steps):
    weights = np.asarray(weights, dtype=np.float64)
    none = primitives.index("none") if "none" in primitives else None
    candidates = [k for k in range(len(primitives)) if k != none]
    gene, start = [], 0
    for i in range(steps):
        rows = weights[start:start + i + 2]
        strength = [max(row[k] for k in candidates) for row in rows]
        # Stable sort: ties go to the earlier input, as in DARTS.
        chosen = sorted(range(i + 2), key=lambda j: -strength[j])[:2]
        for j in chosen:
            best = max(candidates, key=lambda k: rows[j][k])
            gene.append((primitives[best], j))
        start += i + 2
    return gene


def derive(weights_normal, weights_reduce, primitives: Sequence[str] = PRIMITIVES,
           multiplier=4):
    """Derives a genotype from op weights with the DARTS rule.

    For every intermediate node keep the two incoming edges whose strongest
    non-``none`` op weight is largest, each labelled with that op.

    Args:
        weights_normal: ``[num_edges, len(primitives)]`` op weights (the
            softmax of alpha, or alpha itself: the rule is invariant to the
            row-wise softmax only up to ties between edges, so pass softmaxed
            weights to match DARTS).
        weights_reduce: the same for the reduction cell.
        primitives: op names, in column order.
        multiplier: the output concatenates the last ``multiplier`` states.

    Returns:
        A validated `Genotype`.
    """
    weights_normal = np.asarray(weights_normal)
    weights_reduce = np.asarray(weights_reduce)
    primitives = tuple(primitives)
    if weights_normal.shape != weights_reduce.shape or weights_normal.ndim != 2:
        raise ValueError(
            "Expected two weight matrices of one shape [num_edges, num_ops]. "
            f"Received: {weights_normal.shape} and {weights_reduce.shape}")
    if weights_normal.shape[1] != len(primitives):
        raise ValueError(
            f"Expected {len(primitives)} columns (one per primitive). "
            f"Received: {weights_normal.shape[1]}")
    for name, w in (("weights_normal", weights_normal),
                    ("weights_reduce", weights_reduce)):
        if not np.all(np.isfinite(w)):
            # NaN compares false with everything: the choice would be
            # arbitrary rather than an error.
            raise ValueError("Expected finite op weights. Received: "
                             f"non-finite values in {name}")
    edges, steps = weights_normal.shape[0], 0
    while sum(2 + i for i in range(steps)) < edges:
        steps += 1
    if sum(2 + i for i in range(steps)) != edges:
        raise ValueError(
            f"Expected a number of edges 2 + 3 + ... (14 for 4 nodes). "
            f"Received: {edges}")
    if "none" in primitives and len(primitives) < 2:
        # Nothing to choose: 'none' is never part of a genotype.
        raise ValueError(
            "Expected at least one primitive besides 'none'. "
            f"Received: primitives={primitives}")
    if isinstance(multiplier, bool) or not 1 <= multiplier <= steps:
        # A larger multiplier would concatenate the cell's inputs too.
        raise ValueError(
            f"Expected `multiplier` in 1..{steps} (the number of nodes). "
            f"Received: multiplier={multiplier!r}")
    concat = tuple(range(2 + steps - multiplier, steps + 2))
    return Genotype(
        tuple(_derive_cell(weights_normal, primitives, steps)), concat,
        tuple(_derive_cell(weights_reduce, primitives, steps)), concat)


def get(name_or_path: str) -> Genotype:
    """A published genotype by name, or one loaded from a JSON file."""
    if name_or_path in PUBLISHED:
        return PUBLISHED[name_or_path]
    if os.path.exists(name_or_path):
        return Genotype.load(name_or_path)
    raise GenotypeError(
        f"Genotype {name_or_path!r} is neither a published name "
        f"({', '.join(sorted(PUBLISHED))}) nor an existing JSON file")
