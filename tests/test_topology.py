"""e2rnas_tf.space.topology: cells, edges, reductions and widths, by hand."""

from e2rnas_tf.space import topology
from e2rnas_tf.space.search_space import SearchNetwork


def test_num_edges_and_edge_inputs():
    assert topology.num_edges(4) == 14
    assert topology.num_edges(1) == 2
    assert topology.edge_inputs(2) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert len(topology.edge_inputs(4)) == 14
    assert topology.edge_inputs(4)[-1] == (3, 4)


def test_reduction_layers():
    assert topology.reduction_layers(3) == [1, 2]
    assert topology.reduction_layers(5) == [1, 3]
    assert topology.reduction_layers(8) == [2, 5]
    assert topology.reduction_layers(20) == [6, 13]


def test_cell_plan_by_hand():
    # DARTS' 8-cell search network at C=16 on 32x32 images.
    cells, c_last = topology.cell_plan(16, 8, image_size=32)
    assert [c.channels for c in cells] == [16, 16, 32, 32, 32, 64, 64, 64]
    assert [c.reduction for c in cells] == [False, False, True, False,
                                            False, True, False, False]
    assert [c.reduction_prev for c in cells] == [False, False, False, True,
                                                 False, False, True, False]
    # Inputs: the stem (48) twice, then 4 * C of the previous cells.
    assert [(c.c_prev_prev, c.c_prev) for c in cells[:4]] == [
        (48, 48), (48, 64), (64, 64), (64, 128)]
    assert [c.size for c in cells] == [32, 32, 32, 16, 16, 16, 8, 8]
    assert cells[3].size_prev_prev == 32 and c_last == 256
    # Odd resolutions round up (ceil), and no size without an image size.
    cells, _ = topology.cell_plan(8, 5, image_size=15)
    assert [c.size for c in cells] == [15, 15, 8, 8, 4]
    assert topology.cell_plan(8, 5)[0][2].size is None


def test_the_supernet_follows_the_plan():
    net = SearchNetwork(channels=4, num_classes=10, layers=5)
    cells, _ = topology.cell_plan(4, 5)
    assert [(c.channels, c.reduction, c.reduction_prev) for c in net.cells] \
        == [(s.channels, s.reduction, s.reduction_prev) for s in cells]
