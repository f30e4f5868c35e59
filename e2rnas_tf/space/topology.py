"""The shape of a DARTS network: edges of a cell, reductions, widths.

One source for what the supernet (`search_space.SearchNetwork`), the
derived network (`model.DerivedNetwork`) and the cost models
(`resources`) must agree on: a cell of ``steps`` nodes has an edge from
every earlier state to every node; a network of ``layers`` cells reduces
(doubles the width, halves the resolution, ``ceil``) at ``layers // 3``
and ``2 * layers // 3``; the stem is ``stem_multiplier * channels`` wide
and every cell concatenates ``multiplier`` nodes.

Reference:
    Liu, Simonyan, Yang. DARTS. https://arxiv.org/abs/1806.09055
"""

from __future__ import annotations

import dataclasses

__all__ = ["CellSpec", "cell_plan", "edge_inputs", "num_edges",
           "reduction_layers"]


def num_edges(steps):
    """Edges of a cell with ``steps`` intermediate nodes (14 for 4)."""
    return sum(2 + i for i in range(steps))


def edge_inputs(steps):
    """``[(node, input_state)]`` for every edge, in alpha row order."""
    return [(i, j) for i in range(steps) for j in range(2 + i)]


def reduction_layers(layers):
    """Indices of the reduction cells among ``layers`` cells."""
    return sorted({layers // 3, 2 * layers // 3})


@dataclasses.dataclass(frozen=True)
class CellSpec:
    """One cell of a network (see `cell_plan`).

    Attributes:
        index: position of the cell.
        channels: its width ``C`` (each edge's channels).
        reduction: whether it halves the resolution.
        reduction_prev: whether the cell before it did (its first input
            then needs a factorized reduction).
        c_prev_prev, c_prev: widths of its two inputs.
        size_prev_prev, size: resolutions of its two inputs (None without
            an image size).
    """

    index: int
    channels: int
    reduction: bool
    reduction_prev: bool
    c_prev_prev: int
    c_prev: int
    size_prev_prev: int | None
    size: int | None


def cell_plan(channels, layers, *, multiplier=4, stem_multiplier=3,
              image_size=None):
    """The cells of a network of ``layers`` cells of initial width
    ``channels``.

    Args:
        channels: initial width ``C``.
        layers: number of cells.
        multiplier: nodes concatenated into a cell's output.
        stem_multiplier: stem width as a multiple of ``channels``.
        image_size: input resolution, for the cells' input sizes (optional).

    Returns:
        ``(cells, c_last)``: a list of `CellSpec` and the width of the last
        cell's output (what the classifier sees).

    Example:

    >>> cells, c_last = cell_plan(16, 8)
    >>> [c.channels for c in cells], c_last
    ([16, 16, 32, 32, 32, 64, 64, 64], 256)
    """
    reductions = reduction_layers(layers)
    c_prev_prev = c_prev = stem_multiplier * channels
    size_prev_prev = size_prev = image_size
    c_curr, reduction_prev, cells = channels, False, []
    for i in range(layers):
        reduction = i in reductions
        if reduction:
            c_curr *= 2
        cells.append(CellSpec(i, c_curr, reduction, reduction_prev,
                              c_prev_prev, c_prev, size_prev_prev, size_prev))
        out_size = size_prev
        if reduction and size_prev is not None:
            out_size = (size_prev + 1) // 2
        reduction_prev = reduction
        c_prev_prev, c_prev = c_prev, multiplier * c_curr
        size_prev_prev, size_prev = size_prev, out_size
    return cells, c_prev
