"""Tests for e2rnas_tf.search.mgda against NumPy/SciPy references."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import optimize

from e2rnas_tf.search import mgda

# Relative tolerance on the min-norm objective (scale = largest |g_k|^2). The
# returned weights are float32, which alone costs about 1e-8.
OBJ_RTOL = 1e-6
# The KKT (Frank-Wolfe) gap is held tighter: it also catches a solver that
# picks a slightly off point among near-equal objectives.
KKT_RTOL = 1e-7


def _grads_from_rows(rows, shapes=((2, 3), (4,))):
    """Splits each row of `rows` into tensors with the given shapes."""
    sizes = [int(np.prod(s)) for s in shapes]
    assert rows.shape[1] == sum(sizes)
    grads = []
    for row in rows:
        parts = np.split(row.astype(np.float32), np.cumsum(sizes)[:-1])
        grads.append([tf.constant(p.reshape(s)) for p, s in zip(parts, shapes)])
    return grads


def _instance(kind, num, seed, dim=10):
    rng = np.random.RandomState(seed)
    rows = rng.randn(num, dim)
    if kind == "colinear":
        rows = np.outer(rng.randn(num), rng.randn(dim))
    elif kind == "opposite":
        rows[1] = -rows[0] * rng.uniform(0.2, 3.0)
    elif kind == "dominated":
        # g1 = (2 + u) g0: the segment's nearest point to 0 is g0 itself.
        rows[1] = rows[0] * rng.uniform(2.0, 3.0)
    elif kind == "near_colinear":
        rows = np.outer(rng.uniform(0.5, 2.0, num), rng.randn(dim))
        rows += 1e-3 * rng.randn(num, dim)
    elif kind == "with_zero":
        rows[num - 1] = 0.0
    return rows.astype(np.float32)


def _reference_min_norm(gram):
    """Multi-start SLSQP on the simplex, plus all vertices and edges."""
    num = gram.shape[0]
    best = np.min(np.diag(gram))
    for i in range(num):
        for j in range(i + 1, num):
            a, b, d = gram[i, i], gram[j, j], gram[i, j]
            curv = a + b - 2 * d
            t = np.clip((b - d) / curv, 0, 1) if curv > 0 else 0.5
            best = min(best, t * t * a + (1 - t) ** 2 * b + 2 * t * (1 - t) * d)
    rng = np.random.RandomState(0)
    starts = [np.full(num, 1.0 / num)] + [rng.dirichlet(np.ones(num))
                                          for _ in range(5)]
    for x0 in starts:
        res = optimize.minimize(
            lambda c: c @ gram @ c, x0, jac=lambda c: 2 * gram @ c,
            method="SLSQP", bounds=[(0.0, 1.0)] * num,
            constraints=[{"type": "eq", "fun": lambda c: np.sum(c) - 1.0}],
            options={"ftol": 1e-15, "maxiter": 500},
        )
        c = np.clip(res.x, 0.0, None)
        c /= c.sum()
        best = min(best, c @ gram @ c)
    return best


def _check_kkt(weights, gram, tol):
    # Optimality certificate for the convex QP on the simplex: every vertex
    # direction is non-descending, (G c)_i >= c^T G c, with equality on the
    # support. The Frank-Wolfe gap c^T G c - min_i (G c)_i bounds f(c) - f*.
    assert np.all(weights >= 0.0)
    np.testing.assert_allclose(np.sum(weights), 1.0, atol=1e-6)
    grad = gram @ weights
    value = weights @ grad
    assert np.all(grad >= value - tol)
    support = weights > 1e-3
    np.testing.assert_allclose(grad[support], value, atol=tol)


KINDS = ("random", "colinear", "opposite", "dominated", "near_colinear",
         "with_zero")


@pytest.mark.parametrize("num", [2, 3, 4, 5])
@pytest.mark.parametrize("kind", KINDS)
def test_min_norm_matches_scipy_and_kkt(num, kind):
    for seed in range(3):
        rows = _instance(kind, num, seed)
        gram64 = rows.astype(np.float64) @ rows.astype(np.float64).T
        scale = np.max(np.diag(gram64))
        weights = mgda.min_norm_weights(
            mgda.gram_matrix(_grads_from_rows(rows))).numpy()
        assert weights.dtype == np.float32
        weights = weights.astype(np.float64)
        value = weights @ gram64 @ weights
        reference = _reference_min_norm(gram64)
        assert value <= reference + OBJ_RTOL * scale, (kind, num, seed)
        _check_kkt(weights, gram64, tol=KKT_RTOL * scale)


def test_opposite_pair_among_others_low_dimension():
    # The optimum is ~0 on the opposite pair; many other supports come within
    # round-off of it. The solver must still return a KKT point, not a
    # clipped infeasible candidate of a larger support.
    for num in (3, 4):
        for seed in range(20):
            rows = _instance("opposite", num, seed, dim=3)
            gram64 = rows.astype(np.float64) @ rows.astype(np.float64).T
            weights = mgda.min_norm_weights(
                mgda.gram_matrix(_grads_from_rows(rows, shapes=((3,),))))
            _check_kkt(weights.numpy().astype(np.float64), gram64,
                       tol=KKT_RTOL * np.max(np.diag(gram64)))


def test_min_norm_is_not_trivially_uniform():
    # Guards the reference test: on this instance the uniform point and every
    # vertex are clearly worse than the optimum the solver must find.
    gram = np.array([[4.0, -1.0, 0.5], [-1.0, 1.0, 0.2], [0.5, 0.2, 2.0]])
    weights = mgda.min_norm_weights(tf.constant(gram, tf.float32)).numpy()
    value = weights @ gram @ weights
    uniform = np.full(3, 1 / 3)
    assert value < uniform @ gram @ uniform - 0.1
    assert value < np.min(np.diag(gram)) - 0.1
    np.testing.assert_allclose(value, _reference_min_norm(gram), atol=1e-6)


def test_two_gradients_closed_form():
    rng = np.random.RandomState(3)
    for _ in range(20):
        rows = rng.randn(2, 7)
        gram = (rows @ rows.T).astype(np.float32).astype(np.float64)
        a, b, d = gram[0, 0], gram[1, 1], gram[0, 1]
        c1 = np.clip((b - d) / (a + b - 2 * d), 0.0, 1.0)
        weights = mgda.min_norm_weights(tf.constant(gram, tf.float32))
        np.testing.assert_allclose(weights.numpy(), [c1, 1 - c1], atol=1e-6)
    # Obtuse pair: the optimum is strictly inside the segment.
    gram = tf.constant([[1.0, -0.5], [-0.5, 4.0]])
    # c1 = (4 + 0.5) / (1 + 4 + 1) = 0.75
    np.testing.assert_allclose(mgda.min_norm_weights(gram).numpy(),
                               [0.75, 0.25], atol=1e-7)


def test_gram_matrix_matches_numpy_and_fills_none():
    rng = np.random.RandomState(0)
    rows = rng.randn(3, 10).astype(np.float32)
    grads = _grads_from_rows(rows)
    grads[2][1] = None  # the third objective does not touch variable 1
    expected_rows = rows.copy()
    expected_rows[2, 6:] = 0.0
    gram = mgda.gram_matrix(grads)
    assert gram.dtype == tf.float32 and gram.shape == (3, 3)
    np.testing.assert_allclose(gram.numpy(), expected_rows @ expected_rows.T,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(gram.numpy(), gram.numpy().T)


def _combine_np(grads, **kwargs):
    direction, weights, ok = mgda.combine(grads, **kwargs)
    return [d.numpy() for d in direction], weights.numpy(), bool(ok)


def test_zero_gradient_gets_all_weight():
    for num in (2, 3):
        rows = _instance("with_zero", num, seed=1)
        grads = _grads_from_rows(rows)
        direction, weights, ok = _combine_np(grads, losses=None)
        assert ok
        expected = np.zeros(num)
        expected[-1] = 1.0
        np.testing.assert_allclose(weights, expected, atol=1e-6)
        for d in direction:
            np.testing.assert_allclose(d, 0.0, atol=1e-6)


def test_all_zero_gradients_give_uniform_weights():
    grads = [[tf.zeros([2, 3]), tf.zeros([4])] for _ in range(3)]
    direction, weights, ok = _combine_np(grads, losses=None)
    assert ok
    np.testing.assert_allclose(weights, [1 / 3] * 3, atol=1e-6)
    assert all(np.all(d == 0.0) for d in direction)


@pytest.mark.parametrize("num", [2, 3, 5])
def test_identical_gradients(num):
    row = np.random.RandomState(2).randn(10).astype(np.float32)
    grads = _grads_from_rows(np.stack([row] * num))
    direction, weights, ok = _combine_np(grads, losses=None,
                                         normalization="none")
    assert ok
    np.testing.assert_allclose(np.sum(weights), 1.0, atol=1e-6)
    assert np.all(weights >= 0.0)
    np.testing.assert_allclose(np.concatenate([d.ravel() for d in direction]),
                               row, rtol=1e-5, atol=1e-6)
    # Ties are broken towards the most spread-out weights.
    np.testing.assert_allclose(weights, [1.0 / num] * num, atol=1e-6)


def test_opposite_gradients_of_equal_norm():
    row = np.random.RandomState(4).randn(10).astype(np.float32)
    grads = _grads_from_rows(np.stack([row, -row]))
    direction, weights, ok = _combine_np(grads, losses=None,
                                         normalization="none")
    assert ok
    np.testing.assert_allclose(weights, [0.5, 0.5], atol=1e-6)
    for d in direction:
        np.testing.assert_allclose(d, 0.0, atol=1e-6)
    # With "l2" normalisation the norms need not be equal to begin with.
    grads = _grads_from_rows(np.stack([row, -7.0 * row]))
    direction, weights, ok = _combine_np(grads, losses=None)
    np.testing.assert_allclose(weights, [0.5, 0.5], atol=1e-6)
    for d in direction:
        np.testing.assert_allclose(d, 0.0, atol=1e-6)


def test_dominated_gradient():
    # g1 = (1, 0), g2 = (2, 1): |g1 + t (g2 - g1)|^2 grows for t > 0.
    grads = [[tf.constant([1.0, 0.0])], [tf.constant([2.0, 1.0])]]
    direction, weights, ok = _combine_np(grads, losses=None,
                                         normalization="none")
    assert ok
    np.testing.assert_allclose(weights, [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(direction[0], [1.0, 0.0], atol=1e-6)


def test_single_objective():
    grads = [[tf.constant([3.0, 4.0]), tf.constant([[0.0]])]]
    direction, weights, ok = _combine_np(grads, losses=None)
    assert ok
    np.testing.assert_array_equal(weights, [1.0])
    np.testing.assert_allclose(direction[0], [0.6, 0.8], atol=1e-6)
    np.testing.assert_allclose(direction[1], [[0.0]])
    np.testing.assert_array_equal(
        mgda.min_norm_weights(tf.constant([[2.0]])).numpy(), [1.0])


def _assert_failed(result, shapes):
    direction, weights, ok = result
    assert not bool(ok)
    weights = weights.numpy()
    assert np.all(np.isfinite(weights)) and np.all(weights == 0.0)
    for d, shape in zip(direction, shapes):
        assert tuple(d.shape) == shape
        assert np.all(d.numpy() == 0.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("method", ["mgda", "sum"])
def test_non_finite_gradient_reports_not_ok(bad, method):
    rows = _instance("random", 3, seed=0)
    rows[1, 4] = bad
    grads = _grads_from_rows(rows)
    _assert_failed(mgda.combine(grads, None, method=method), [(2, 3), (4,)])
    compiled = tf.function(
        lambda g: mgda.combine(g, None, method=method), jit_compile=True)
    _assert_failed(compiled(grads), [(2, 3), (4,)])


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_non_finite_loss_reports_not_ok(normalization):
    grads = _grads_from_rows(_instance("random", 2, seed=0))
    losses = tf.constant([1.0, np.nan])
    _assert_failed(mgda.combine(grads, losses, normalization=normalization),
                   [(2, 3), (4,)])


def test_non_positive_loss_in_loss_modes_reports_not_ok():
    grads = _grads_from_rows(_instance("random", 2, seed=0))
    for losses in ([1.0, 0.0], [1.0, -2.0]):
        for mode in ("loss", "loss+"):
            _assert_failed(
                mgda.combine(grads, tf.constant(losses), normalization=mode),
                [(2, 3), (4,)])
        # Other modes do not divide by the loss, so it does not matter.
        assert bool(mgda.combine(grads, tf.constant(losses))[2])


def test_overflowing_gram_reports_not_ok_but_l2_survives():
    rows = _instance("random", 2, seed=0) * np.float32(1e25)
    grads = _grads_from_rows(rows)
    _assert_failed(mgda.combine(grads, None, normalization="none"),
                   [(2, 3), (4,)])
    direction, weights, ok = _combine_np(grads, losses=None)
    assert ok and np.all(np.isfinite(weights))
    unit = rows / np.linalg.norm(rows.astype(np.float64), axis=1,
                                 keepdims=True)
    flat = np.concatenate([d.ravel() for d in direction])
    np.testing.assert_allclose(flat, weights @ unit, rtol=1e-4, atol=1e-6)


def test_normalizations_hand_computed():
    # Objective 0: variables [3, 0] and [4] -> norm 5; objective 1 is zero.
    grads = [[tf.constant([3.0, 0.0]), tf.constant([4.0])],
             [tf.constant([0.0, 0.0]), tf.constant([0.0])]]
    losses = tf.constant([2.0, 0.5])
    expected = {
        "none": ([3.0, 0.0], [4.0]),
        "l2": ([0.6, 0.0], [0.8]),
        "loss": ([1.5, 0.0], [2.0]),
        "loss+": ([0.3, 0.0], [0.4]),
    }
    for mode, (first, second) in expected.items():
        out = mgda.normalize_gradients(grads, losses, mode)
        np.testing.assert_allclose(out[0][0].numpy(), first, rtol=1e-6)
        np.testing.assert_allclose(out[0][1].numpy(), second, rtol=1e-6)
        # A zero gradient stays exactly zero, never NaN.
        for t in out[1]:
            assert np.all(t.numpy() == 0.0)
    out = mgda.normalize_gradients(
        [[tf.constant([1.0, 1.0])], [tf.constant([0.0, 3.0])]],
        tf.constant([4.0, 3.0]), "loss+")
    np.testing.assert_allclose(out[0][0].numpy(), [1 / (4 * np.sqrt(2))] * 2,
                               rtol=1e-6)
    np.testing.assert_allclose(out[1][0].numpy(), [0.0, 1 / 3], rtol=1e-6)


def test_combine_uses_normalized_or_raw_gradients():
    g0 = np.array([3.0, 4.0], np.float32)
    g1 = np.array([0.0, -2.0], np.float32)
    grads = [[tf.constant(g0)], [tf.constant(g1)]]
    u0, u1 = g0 / 5.0, g1 / 2.0
    # Min-norm point of u0=(.6,.8), u1=(0,-1): c0 = (1 + .8) / (1 + 1 + 1.6).
    c0 = 1.8 / 3.6
    direction, weights, ok = _combine_np(grads, losses=None)
    assert ok
    np.testing.assert_allclose(weights, [c0, 1 - c0], atol=1e-6)
    np.testing.assert_allclose(direction[0], c0 * u0 + (1 - c0) * u1,
                               atol=1e-6)
    direction, weights_raw, _ = _combine_np(grads, losses=None,
                                            apply_to="raw")
    np.testing.assert_allclose(weights_raw, weights)
    np.testing.assert_allclose(direction[0], c0 * g0 + (1 - c0) * g1,
                               atol=1e-6)


def test_sum_and_fixed_methods():
    rows = _instance("random", 3, seed=5)
    grads = _grads_from_rows(rows)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    direction, weights, ok = _combine_np(grads, losses=None, method="sum")
    assert ok
    np.testing.assert_allclose(weights, [1 / 3] * 3, rtol=1e-6)
    flat = np.concatenate([d.ravel() for d in direction])
    np.testing.assert_allclose(flat, unit.mean(axis=0), atol=1e-6)

    direction, weights, ok = _combine_np(
        grads, losses=None, method="fixed", fixed_weights=[1, 0, 3],
        normalization="none", apply_to="raw")
    assert ok
    np.testing.assert_allclose(weights, [0.25, 0.0, 0.75], rtol=1e-6)
    flat = np.concatenate([d.ravel() for d in direction])
    np.testing.assert_allclose(flat, 0.25 * rows[0] + 0.75 * rows[2],
                               atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "pcgrad"}, "method"),
    ({"normalization": "l1"}, "normalization"),
    ({"apply_to": "both"}, "apply_to"),
    ({"method": "fixed"}, "fixed_weights"),
    ({"method": "fixed", "fixed_weights": [1.0, 2.0]}, "3 fixed weights"),
    ({"method": "fixed", "fixed_weights": [1.0, -1.0, 2.0]}, "non-negative"),
    ({"method": "fixed", "fixed_weights": [1.0, np.nan, 2.0]}, "non-negative"),
    ({"method": "fixed", "fixed_weights": [0.0, 0.0, 0.0]}, "not all zero"),
    ({"method": "mgda", "fixed_weights": [1.0, 1.0, 1.0]}, "unless"),
    ({"normalization": "loss"}, "losses"),
])
def test_combine_validation(kwargs, message):
    grads = _grads_from_rows(_instance("random", 3, seed=0))
    with pytest.raises(ValueError, match=message):
        mgda.combine(grads, None, **kwargs)


def test_structure_validation():
    one = [tf.ones([2])]
    with pytest.raises(ValueError, match="Expected between 1 and 5"):
        mgda.combine([], None)
    with pytest.raises(ValueError, match="Expected between 1 and 5"):
        mgda.combine([one] * 6, None)
    with pytest.raises(ValueError, match="same, non-zero number"):
        mgda.combine([one, one + one], None)
    with pytest.raises(ValueError, match="share a shape"):
        mgda.combine([one, [tf.ones([3])]], None)
    with pytest.raises(ValueError, match="one loss per gradient"):
        mgda.combine([one, one], tf.ones([3]), normalization="loss")
    with pytest.raises(ValueError, match="mode"):
        mgda.normalize_gradients([one], None, "L2")
    with pytest.raises(ValueError, match="square Gram"):
        mgda.min_norm_weights(tf.ones([6, 6]))
    with pytest.raises(ValueError, match="square Gram"):
        mgda.min_norm_weights(tf.ones([2, 3]))


@pytest.mark.parametrize("num", [2, 3, 4, 5])
def test_graph_and_xla_match_eager(num):
    grads = _grads_from_rows(_instance("random", num, seed=num))
    losses = tf.constant(np.linspace(0.5, 2.0, num), tf.float32)

    def step(g, l):
        return mgda.combine(g, l, normalization="loss+")

    eager = step(grads, losses)
    for compiled in (tf.function(step), tf.function(step, jit_compile=True)):
        direction, weights, ok = compiled(grads, losses)
        assert bool(ok)
        np.testing.assert_allclose(weights.numpy(), eager[1].numpy(),
                                   atol=1e-5)
        for d, e in zip(direction, eager[0]):
            np.testing.assert_allclose(d.numpy(), e.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------
# The authors' solver and their "noMGDA" ablation.


def _authors_reference(gram):
    """The authors' MinNormSolver, re-derived in NumPy from its description:
    best pair by the clamped two-point rule, then projected-gradient steps
    with a clamped exact line search until the L1 change is < 1e-5, then
    +1e-7 on every weight."""
    def two(a, d, b):  # <x1,x1>, <x1,x2>, <x2,x2>
        if d >= a:
            return 0.999, a
        if d >= b:
            return 0.001, b
        g = (b - d) / (a + b - 2 * d)
        return g, b + g * (d - b)

    def to_simplex(y):
        m = len(y)
        s = np.sort(y)[::-1]
        shift = (y.sum() - 1) / m
        for i in range(m - 1):
            t = (s[:i + 1].sum() - 1) / (i + 1)
            if t > s[i + 1]:
                shift = t
                break
        return np.maximum(y - shift, 0)

    def next_point(cur, grad):
        p = grad - grad.mean()
        t1 = -cur[p < 0] / p[p < 0]
        t2 = (1 - cur[p > 0]) / p[p > 0]
        t = t1[t1 > 1e-7].min() if (t1 > 1e-7).any() else 1.0
        if (t2 > 1e-7).any():
            t = min(t, t2[t2 > 1e-7].min())
        return to_simplex(p * t + cur)

    n = len(gram)
    best = None
    for i in range(n):
        for j in range(i + 1, n):
            c, d = two(gram[i, i], gram[i, j], gram[j, j])
            if best is None or d < best[0]:
                best = (d, i, j, c)
    sol = np.zeros(n)
    sol[best[1]], sol[best[2]] = best[3], 1 - best[3]
    if n >= 3:
        for _ in range(250):
            new = next_point(sol, -gram @ sol)
            nc, _ = two(sol @ gram @ sol, sol @ gram @ new, new @ gram @ new)
            step = nc * sol + (1 - nc) * new
            if np.abs(step - sol).sum() < 1e-5:
                break
            sol = step
    return sol + 1e-7


def test_authors_solver_two_points_by_hand():
    # A dominated pair: <g1,g2> >= |g1|^2 puts 0.999 on g1 (never 1).
    w = mgda.authors_min_norm_weights(tf.constant([[1.0, 2.0], [2.0, 5.0]]))
    np.testing.assert_allclose(w.numpy(), [0.999 + 1e-7, 0.001 + 1e-7],
                               rtol=1e-6)
    # A zero gradient: theirs keeps 0.001 on the other objective (the
    # exact solver gives it 0), which Adam turns into a full-size step.
    gram = tf.constant([[4.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(mgda.authors_min_norm_weights(gram).numpy(),
                               [0.001 + 1e-7, 0.999 + 1e-7], rtol=1e-6)
    np.testing.assert_allclose(mgda.min_norm_weights(gram).numpy(), [0, 1])
    # Interior: orthogonal unit and double vectors, c1 = 4 / 5.
    w = mgda.authors_min_norm_weights(tf.constant([[1.0, 0.0], [0.0, 4.0]]))
    np.testing.assert_allclose(w.numpy(), [0.8 + 1e-7, 0.2 + 1e-7],
                               rtol=1e-6)


@pytest.mark.parametrize("num", [3, 4, 5])
@pytest.mark.parametrize("kind", KINDS)
def test_authors_solver_matches_a_numpy_reference(num, kind):
    for seed in range(4):
        rows = _instance(kind, num, seed).astype(np.float64)
        gram = rows @ rows.T
        ours = mgda.authors_min_norm_weights(tf.constant(gram, tf.float32))
        expected = _authors_reference(
            gram.astype(np.float32).astype(np.float64))
        np.testing.assert_allclose(ours.numpy(), expected, atol=1e-5)


def test_authors_solver_nearly_optimal():
    # Not exact, but close: within 1e-4 of the exact min-norm objective on
    # random instances.
    for seed in range(5):
        rows = _instance("random", 4, seed, dim=12).astype(np.float64)
        gram = rows @ rows.T
        w = mgda.authors_min_norm_weights(tf.constant(gram, tf.float32))
        w = w.numpy().astype(np.float64)
        exact = mgda.min_norm_weights(tf.constant(gram, tf.float32))
        exact = exact.numpy().astype(np.float64)
        assert w @ gram @ w <= exact @ gram @ exact + 1e-4 * gram.max()


def test_combine_with_authors_solver_and_ones():
    rows = _instance("random", 3, seed=8)
    grads = _grads_from_rows(rows)
    direction, weights, ok = _combine_np(grads, losses=None, solver="authors",
                                         apply_to="raw")
    assert ok
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    expected = _authors_reference((unit @ unit.T).astype(np.float64))
    np.testing.assert_allclose(weights, expected, atol=1e-5)
    flat = np.concatenate([d.ravel() for d in direction])
    np.testing.assert_allclose(flat, expected @ rows, atol=1e-4)
    # noMGDA: weight 1 on every raw gradient, the gradient of the plain sum.
    direction, weights, ok = _combine_np(grads, losses=None, method="ones",
                                         apply_to="raw")
    assert ok
    np.testing.assert_array_equal(weights, [1.0, 1.0, 1.0])
    flat = np.concatenate([d.ravel() for d in direction])
    np.testing.assert_allclose(flat, rows.sum(axis=0), atol=1e-5)
    with pytest.raises(ValueError, match="solver"):
        mgda.combine(grads, None, solver="frank-wolfe")


def test_accumulated_gradients_of_the_first_version():
    """v1 took each gradient into an uncleared .grad: MGDA saw prefix sums
    and the final backward added (1 + c_k) g_k."""
    g_acc = np.array([0.3, -0.4, 0.1], np.float32)
    g_nop = np.array([0.0, 0.0, 0.0], np.float32)  # an inactive bound
    grads = [[tf.constant(g_acc)], [tf.constant(g_nop)]]
    direction, weights, ok = _combine_np(
        grads, losses=None, normalization="none", apply_to="raw",
        solver="authors", accumulate=True)
    assert ok
    # [g, g + 0] are identical: their two-point rule gives (0.999, 0.001).
    np.testing.assert_allclose(weights, [1.999 + 1e-7, 1.001 + 1e-7],
                               rtol=1e-6)
    np.testing.assert_allclose(direction[0], (1.999 + 1e-7) * g_acc,
                               rtol=1e-5)
    # Active: MGDA on [g1, g1 + g2], direction (1 + c1) g1 + (1 + c2) g2.
    rows = _instance("random", 2, seed=9)
    grads = _grads_from_rows(rows)
    prefix = np.stack([rows[0], rows[0] + rows[1]]).astype(np.float64)
    c = _authors_reference(prefix @ prefix.T)
    direction, weights, ok = _combine_np(
        grads, losses=None, normalization="none", apply_to="raw",
        solver="authors", accumulate=True)
    np.testing.assert_allclose(weights, 1.0 + c, atol=1e-6)
    flat = np.concatenate([d.ravel() for d in direction])
    np.testing.assert_allclose(flat, (1 + c) @ rows, atol=1e-5)
    # Their noMGDA under the same accumulation: 2 g1 + 2 g2.
    _, weights, _ = _combine_np(grads, losses=None, method="ones",
                                normalization="none", apply_to="raw",
                                accumulate=True)
    np.testing.assert_array_equal(weights, [2.0, 2.0])
