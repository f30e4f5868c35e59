"""Tests for e2rnas_tf.search.resources: constraints, cost models (measured, the
authors' closed forms), estimates (expected, derived, Gumbel), against hand
computations, the built ops and finite differences."""

import numpy as np
import pytest
import tensorflow as tf

from e2rnas_tf.search import resources
from e2rnas_tf.space import costs, genotypes, ops, search_space, topology

# ---------------------------------------------------------------------------
# Constraints.


@pytest.mark.parametrize("mode,values,grads", [
    ("none", (2.0, 4.0), (1.0, 1.0)),
    ("abs", (1.0, 1.0), (-1.0, 1.0)),
    ("max", (0.0, 1.0), (0.0, 1.0)),
    ("floor", (3.0, 4.0), (0.0, 1.0)),
])
def test_constrain(mode, values, grads):
    target = tf.constant(3.0)
    for cost, value, grad in zip((2.0, 4.0), values, grads):
        c = tf.Variable(cost)
        with tf.GradientTape() as tape:
            out = resources.constrain(c, target, mode)
        assert out.dtype == tf.float32
        assert float(out) == value
        assert float(tape.gradient(out, c) or 0.0) == grad


def test_constrain_rejects_unknown_mode():
    with pytest.raises(ValueError, match="constraint mode"):
        resources.constrain(1.0, 1.0, "min")


# ---------------------------------------------------------------------------
# Resource tables.


def _sep_macs(c, k, size, stride):
    out = (-(-size // stride)) ** 2
    return 2 * (out * k * k * c + out * c * c)


def _dil_macs(c, k, size, stride):
    out = (-(-size // stride)) ** 2
    return out * k * k * c + out * c * c


def test_flops_table_against_hand_formulas():
    # layers=3: cell 0 normal (C=4 at 8x8); cells 1 and 2 reduce
    # (C=8 from 8x8, C=16 from 4x4). Stem 12 channels.
    t = resources.measured_table("flops", channels=4, layers=3,
                                  num_classes=10, image_size=8)
    p = ops.PRIMITIVES.index
    edges = topology.edge_inputs(4)
    e_in, e_mid = edges.index((0, 1)), edges.index((2, 3))
    m = 1e6
    assert t.normal[e_in, p("sep_conv_3x3")] * m == pytest.approx(
        _sep_macs(4, 3, 8, 1), rel=1e-6)
    assert t.normal[e_mid, p("dil_conv_5x5")] * m == pytest.approx(
        _dil_macs(4, 5, 8, 1), rel=1e-6)
    # Input edges of reduction cells have stride 2 ...
    assert t.reduce[e_in, p("sep_conv_5x5")] * m == pytest.approx(
        _sep_macs(8, 5, 8, 2) + _sep_macs(16, 5, 4, 2), rel=1e-6)
    assert t.reduce[e_in, p("skip_connect")] * m == pytest.approx(
        16 * 8 * 8 + 4 * 16 * 16, rel=1e-6)
    # ... the others run at stride 1 on the reduced resolution.
    assert t.reduce[e_mid, p("dil_conv_3x3")] * m == pytest.approx(
        _dil_macs(8, 3, 4, 1) + _dil_macs(16, 3, 2, 1), rel=1e-6)
    assert t.reduce[e_mid, p("skip_connect")] == 0
    for name in ("none", "max_pool_3x3", "avg_pool_3x3"):
        assert not t.normal[:, p(name)].any() and not t.reduce[:, p(name)].any()
    const = (64 * 27 * 12            # stem
             + 2 * 64 * 12 * 4       # cell 0 preprocessing
             + 64 * 12 * 8 + 64 * 16 * 8    # cell 1
             + 16 * 16 * 16 + 16 * 32 * 16  # cell 2: FactorizedReduce, 1x1
             + 64 * 10)              # classifier
    assert t.const * m == pytest.approx(const, rel=1e-6)


def test_params_table_one_hot_and_const():
    channels, layers, classes = 4, 5, 7
    table = resources.measured_table(
        "params", channels=channels, layers=layers, num_classes=classes,
        image_size=8)
    # The supernet's own cells give the channel schedule independently.
    net = search_space.SearchNetwork(channels=channels, num_classes=classes,
                                     layers=layers)
    rng = np.random.RandomState(0)
    choice_n = rng.randint(0, 8, 14)
    choice_r = rng.randint(0, 8, 14)
    one_hot = lambda ch: tf.one_hot(ch, 8) * 1e4  # noqa: E731
    w_n = tf.nn.softmax(one_hot(choice_n))
    w_r = tf.nn.softmax(one_hot(choice_r))
    counted = 0
    for cell in net.cells:
        choice = choice_r if cell.reduction else choice_n
        for e, (_, j) in enumerate(topology.edge_inputs(4)):
            stride = 2 if cell.reduction and j < 2 else 1
            op = ops.make_op(ops.PRIMITIVES[choice[e]], cell.channels, stride,
                             affine=True)
            op.build((1, 4, 4, cell.channels))
            counted += costs.count_params(op)
    total = resources.expected_cost(w_n, w_r, table)
    assert float(total - table.const) * 1e6 == pytest.approx(counted,
                                                             rel=1e-6)
    # Stem conv + affine BN, ReLU-conv-BN / FactorizedReduce preprocessing
    # (both C_in * C weights + 2 C), classifier with bias.
    c_stem = 3 * channels
    const = 27 * c_stem + 2 * c_stem
    c_pp = c_p = c_stem
    for cell in net.cells:
        c = cell.channels
        const += c_pp * c + 2 * c + c_p * c + 2 * c
        c_pp, c_p = c_p, 4 * c
    const += c_p * classes + classes
    assert table.const * 1e6 == pytest.approx(const, rel=1e-6)


def test_published_darts_v2_size():
    # DARTS (second order) at 36 channels, 20 cells: 3,349,342 parameters
    # without the auxiliary head, as logged by the DARTS authors.
    table = resources.measured_table("params", channels=36, layers=20,
                                      num_classes=10, image_size=32)
    weights = resources.genotype_weights(genotypes.PUBLISHED["DARTS_V2"])
    cost = resources.expected_cost(*weights, table)
    assert float(cost) == pytest.approx(3.349342, abs=2e-6)


def test_table_validation():
    with pytest.raises(ValueError, match="kind"):
        resources.measured_table("latency", channels=4, layers=3,
                                  num_classes=10, image_size=8)
    with pytest.raises(ValueError, match="layers"):
        resources.measured_table("params", channels=4, layers=2,
                                  num_classes=10, image_size=8)
    table = resources.measured_table("params", channels=4, layers=3,
                                      num_classes=10, image_size=8)
    with pytest.raises(ValueError, match="op weights"):
        resources.expected_cost(np.ones((14, 7)), np.ones((14, 7)), table)
    with pytest.raises(ValueError):
        table.normal[0, 0] = 1.0  # read-only


@pytest.mark.parametrize("kind", ["params", "flops"])
def test_expected_cost_gradient(kind):
    table = resources.measured_table(kind, channels=4, layers=3,
                                      num_classes=10, image_size=8)
    rng = np.random.RandomState(1)
    alphas = [tf.Variable(rng.randn(14, 8).astype(np.float32))
              for _ in range(2)]

    def cost():
        return resources.expected_cost(tf.nn.softmax(alphas[0]),
                                        tf.nn.softmax(alphas[1]), table)

    with tf.GradientTape() as tape:
        value = cost()
    grads = tape.gradient(value, alphas)
    for alpha, grad, t in zip(alphas, grads, (table.normal, table.reduce)):
        w = tf.nn.softmax(alpha).numpy().astype(np.float64)
        t = t.astype(np.float64)
        # d/d alpha_k of sum_j w_j t_j = w_k (t_k - sum_j w_j t_j).
        analytic = w * (t - (w * t).sum(-1, keepdims=True))
        np.testing.assert_allclose(grad.numpy(), analytic, rtol=1e-4,
                                   atol=1e-6 * np.abs(t).max())
    # Finite differences along a random direction.
    directions = [rng.randn(14, 8).astype(np.float32) for _ in range(2)]
    h = 1e-2
    original = [a.numpy() for a in alphas]

    def shifted(sign):
        for a, a0, d in zip(alphas, original, directions):
            a.assign(a0 + sign * h * d)
        return float(cost())

    fd = (shifted(1) - shifted(-1)) / (2 * h)
    expected = sum(float(np.sum(g.numpy() * d))
                   for g, d in zip(grads, directions))
    assert fd == pytest.approx(expected, rel=1e-2)


# ---------------------------------------------------------------------------
# The authors' constraint formulas, by hand.


@pytest.mark.parametrize("mode,cases", [
    # max(cost - T, 1), T = 3: flat (1) up to T + 1.
    ("authors_max", [(2.0, 1.0, 0.0), (4.5, 1.5, 1.0)]),
    # max(T - cost, 1): a lower bound, flat above T - 1.
    ("authors_v1_min", [(0.5, 2.5, -1.0), (2.5, 1.0, 0.0)]),
    # cost + max(max(cost - T_max, 1), T - cost), T = 3, T_max = 5.
    ("authors_both", [(1.0, 3.0, 0.0), (4.0, 5.0, 1.0), (7.0, 9.0, 2.0)]),
])
def test_authors_constraints_by_hand(mode, cases):
    for cost, value, grad in cases:
        c = tf.Variable(cost)
        with tf.GradientTape() as tape:
            out = resources.constrain(c, 3.0, mode, target_max=5.0)
        assert float(out) == pytest.approx(value)
        assert float(tape.gradient(out, c) or 0.0) == pytest.approx(grad)


# ---------------------------------------------------------------------------
# The authors' cost models.

UNIFORM = np.full((14, 8), 1 / 8, np.float32)


def _all(op):
    return np.eye(8, dtype=np.float32)[[ops.PRIMITIVES.index(op)] * 14]


def _hand_authors_params(channels_of_cells, weights_of):
    """Their param_number by hand: per cell, sum over the 14 edges and 8 ops
    of weight * u, u from the closed forms; /1e5."""
    total = 0.0
    for c, reduction in channels_of_cells:
        u = [0, 0, 0, 0, 2 * (c * c + 11 * c), 2 * (c * c + 27 * c),
             c * c + 11 * c, c * c + 27 * c]
        w = weights_of(reduction)
        for e in range(14):
            for k in range(8):
                cost = u[k]
                if reduction and k == 3 and e in (0, 1, 2, 3, 5, 6, 9, 10):
                    cost += c * c + 2 * c
                total += w[e, k] * cost
    return total / 1e5


CELLS_8_16 = [(16, False), (16, False), (32, True), (32, False), (32, False),
              (64, True), (64, False), (64, False)]


def test_authors_params_table_published_values():
    table = resources.authors_table("params", channels=16, layers=8)
    assert table.unit == 1e5 and table.const == 0.0
    assert table.model == "authors" and table.unit_name == "x1e5"
    # The numbers issue 13 quotes: 2.358 at uniform alpha, 6.863 with
    # every edge sep_conv_5x5 (8 cells, C=16).
    uniform = float(resources.expected_cost(UNIFORM, UNIFORM, table))
    assert uniform == pytest.approx(2.35808, abs=1e-5)
    assert float(resources.expected_cost(_all("sep_conv_5x5"),
                                         _all("sep_conv_5x5"), table)) \
        == pytest.approx(6.86336, abs=1e-5)
    # All skip: only the reduction cells' FactorizedReduce on 8 edges.
    assert float(resources.expected_cost(_all("skip_connect"),
                                         _all("skip_connect"), table)) \
        == pytest.approx((8 * (32 * 32 + 64) + 8 * (64 * 64 + 128)) / 1e5)
    rng = np.random.RandomState(3)
    w = {r: tf.nn.softmax(rng.randn(14, 8)).numpy() for r in (False, True)}
    assert float(resources.expected_cost(w[False], w[True], table)) \
        == pytest.approx(_hand_authors_params(CELLS_8_16, w.get), rel=1e-5)


def test_authors_flops_table_by_hand():
    table = resources.authors_table("flops", channels=16, layers=8)
    assert table.unit == 1e8
    total = 0.0
    for c, reduction in CELLS_8_16:
        u = [0, 0, 1024 * c * c, 0, 26952 * c + 2048 * c * c,
             69920 * c + 2048 * c * c, 13476 * c + 1024 * c * c,
             39172 * c + 1024 * c * c]
        per_edge = sum(u) / 8
        total += 14 * per_edge
        if reduction:
            total += 8 * (256 * c * c + 2048 * c) / 8
    assert float(resources.expected_cost(UNIFORM, UNIFORM, table)) \
        == pytest.approx(total / 1e8, rel=1e-6)


def test_authors_v1_params_reproduce_their_matrix_product():
    """The first version multiplies softmax(alpha) [14, 8] by u [8, 14]
    (each row one op's count repeated) and sums rows weighted 2/indegree:
    the table must give the same number for any alpha."""
    table = resources.authors_v1_table("params", channels=16, layers=8)
    assert table.unit == 1.0 and table.model == "authors_v1"
    indegree = np.repeat(np.arange(2, 6), [2, 3, 4, 5]).astype(np.float64)

    def theirs(w_normal, w_reduce):
        total = 0.0
        for c, reduction in CELLS_8_16:
            a = np.array([0, 0, 0, 0, 2 * (c * c + 9 * c),
                          2 * (c * c + 25 * c), c * c + 9 * c,
                          c * c + 25 * c], np.float64)
            u = np.repeat(a[:, None], 14, axis=1)
            if reduction:
                u[3, :] += np.array([1, 1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 0,
                                     0]) * c * c
            w = w_reduce if reduction else w_normal
            total += (2 * (w @ u).sum(axis=1) / indegree).sum()
        return total

    assert float(resources.expected_cost(UNIFORM, UNIFORM, table)) == \
        pytest.approx(1831168.0)
    rng = np.random.RandomState(4)
    for _ in range(3):
        w_n = tf.nn.softmax(rng.randn(14, 8)).numpy()
        w_r = tf.nn.softmax(rng.randn(14, 8)).numpy()
        assert float(resources.expected_cost(w_n, w_r, table)) == \
            pytest.approx(theirs(w_n, w_r), rel=1e-5)


def test_authors_cost_models_need_the_darts_space():
    with pytest.raises(ValueError, match="DARTS space"):
        resources.authors_table("params", channels=16, layers=8, steps=2)
    with pytest.raises(ValueError, match="DARTS space"):
        resources.authors_table("params", channels=16, layers=8,
                                primitives=ops.PRIMITIVES[:4])
    with pytest.raises(ValueError, match="no FLOPs formula"):
        resources.authors_v1_table("flops", channels=16, layers=8)
    with pytest.raises(ValueError, match="cost model"):
        resources.make_table("guess", "params", channels=16, layers=8,
                             num_classes=10, image_size=32)
    t = resources.make_table("authors", "params", channels=16, layers=8,
                             num_classes=10, image_size=32)
    assert t.model == "authors"


# ---------------------------------------------------------------------------
# Estimates.


def _random_alphas(rng, shape=(14, 8), ties=False):
    a = rng.randn(*shape).astype(np.float32)
    if ties:
        # Whole rows equal and equal entries within rows: the DARTS rule's
        # tie-breaking (earlier input, earlier op) is exercised.
        a[1] = a[0]
        a[4, 2:5] = a[4, 2]
        a[7] = 0.0
    return a


@pytest.mark.parametrize("ties", [False, True])
def test_derived_weights_match_genotypes_derive(ties):
    rng = np.random.RandomState(5)
    for _ in range(30):
        w_n = tf.nn.softmax(_random_alphas(rng, ties=ties))
        w_r = tf.nn.softmax(_random_alphas(rng, ties=ties))
        g = genotypes.derive(w_n.numpy(), w_r.numpy())
        expected = resources.genotype_weights(g)
        np.testing.assert_array_equal(
            resources.derived_weights(w_n, 4).numpy(), expected[0])
        np.testing.assert_array_equal(
            resources.derived_weights(w_r, 4).numpy(), expected[1])
    # A smaller space without `none`: 2 nodes, 4 ops.
    prims = ("max_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3")
    w = tf.nn.softmax(rng.randn(5, 4).astype(np.float32))
    g = genotypes.derive(w.numpy(), w.numpy(), prims, multiplier=2)
    np.testing.assert_array_equal(
        resources.derived_weights(w, 2, prims).numpy(),
        resources.genotype_weights(g, prims)[0])


def test_derived_estimate_is_the_derived_network_with_the_expected_gradient():
    """Value: the parameters of the network the DARTS rule derives, counted
    on the built DerivedNetwork; gradient: exactly the expected cost's."""
    from e2rnas_tf.space import model as model_lib

    table = resources.measured_table("params", channels=8, layers=5,
                                     num_classes=10, image_size=16)
    rng = np.random.RandomState(6)
    for _ in range(3):
        alphas = [tf.Variable(rng.randn(14, 8).astype(np.float32))
                  for _ in range(2)]
        with tf.GradientTape(persistent=True) as tape:
            derived = resources.resource_cost(*alphas, table, "derived")
            expected = resources.resource_cost(*alphas, table, "expected")
        genotype = genotypes.derive(
            *[tf.nn.softmax(a).numpy() for a in alphas])
        net = model_lib.DerivedNetwork(genotype, channels=8, num_classes=10,
                                       layers=5, auxiliary=False)
        net.build((None, 16, 16, 3))
        assert float(derived) * 1e6 == pytest.approx(
            costs.count_params(net), abs=0.5)
        assert float(derived) != pytest.approx(float(expected))
        for g_d, g_e in zip(tape.gradient(derived, alphas),
                            tape.gradient(expected, alphas)):
            np.testing.assert_array_equal(g_d.numpy(), g_e.numpy())


def test_gumbel_estimate_is_a_one_hot_sample_with_a_soft_gradient():
    table = resources.measured_table("params", channels=4, layers=3,
                                     num_classes=10, image_size=8)
    rng = np.random.RandomState(7)
    alphas = [tf.Variable(rng.randn(14, 8).astype(np.float32))
              for _ in range(2)]
    seed = tf.constant([3, 9])
    with tf.GradientTape() as tape:
        value = resources.resource_cost(*alphas, table, "gumbel", tau=0.1,
                                        seed=seed)
    grads = tape.gradient(value, alphas)
    # The value is the cost of one op per edge in each cell type.
    hard = [resources.gumbel_hard(tf.nn.softmax(a), 0.1, s).numpy()
            for a, s in zip(alphas, (tf.constant([3, 9], tf.int64),
                                     tf.constant([3, 9 + (1 << 20)],
                                                 tf.int64)))]
    assert np.all(np.isin(hard[0], [0.0, 1.0])) and np.all(
        hard[0].sum(axis=1) == 1.0)
    assert float(value) == pytest.approx(
        float(resources.expected_cost(*hard, table)), rel=1e-6)
    assert all(np.isfinite(g.numpy()).all() and np.abs(g.numpy()).max() > 0
               for g in grads)
    # Same seed, same sample; another seed, (almost surely) another one.
    again = resources.resource_cost(*alphas, table, "gumbel", tau=0.1,
                                    seed=seed)
    assert float(again) == float(value)
    other = [float(resources.resource_cost(*alphas, table, "gumbel",
                                           tau=0.1, seed=tf.constant([s, 1])))
             for s in range(5)]
    assert len(set(other)) > 1
    with pytest.raises(ValueError, match="seed"):
        resources.resource_cost(*alphas, table, "gumbel")
    with pytest.raises(ValueError, match="estimate"):
        resources.resource_cost(*alphas, table, "mean")
