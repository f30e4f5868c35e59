"""MGDA combination of per-objective architecture gradients.

E2RNAS updates the architecture parameters with one direction that serves
several objectives at once (validation cross-entropy, adversarial
cross-entropy, resource cost). Following the multiple-gradient descent
algorithm (MGDA), that direction is the minimum-norm point of the convex hull
of the per-objective gradients: weights `c` on the simplex minimising
`|sum_k c_k g_k|^2`. If that point is not zero, moving against it decreases
every objective; if it is zero, the point is Pareto-stationary.

Everything here is built from TensorFlow ops with static Python control flow
only, so it runs inside a compiled `tf.function` step (also with
`jit_compile=True`) without a host round trip.

Conventions:

- A "gradient" is a list of tensors, one per architecture variable (for
  example `[d alpha_normal, d alpha_reduce]`); `grads` is a list of `K` such
  lists, one per objective, `1 <= K <= 5`. A `None` entry (the loss does not
  depend on that variable, as `tf.GradientTape.gradient` reports) counts as
  zeros.
- Weights are returned as a `[K]` float32 tensor. For every method but
  `"ones"` (the authors' "noMGDA": weight 1 each) they sum to one (up to the
  authors' solver's 1e-7 offsets), so the scale of the direction does not
  depend on the method.

Reference:
    - [Sener & Koltun, 2018](https://arxiv.org/abs/1810.04650)
    - [Desideri, 2012](https://doi.org/10.1016/j.crma.2012.03.014)
    - [E2RNAS, 2020](https://arxiv.org/abs/2011.09820)
"""

import itertools

import tensorflow as tf

NORMALIZATIONS = ("none", "l2", "loss", "loss+")
METHODS = ("mgda", "sum", "ones", "fixed")
APPLY_TO = ("normalized", "raw")
# exact: every support solved (ours); authors: the E2RNAS authors'
# MinNormSolver (min_norm_solvers.py), reproduced step by step.
SOLVERS = ("exact", "authors")
MAX_OBJECTIVES = 5

# The Gram matrix is rescaled to a unit largest diagonal before solving, so the
# tolerances below are relative to the scale of the gradients.
# Eigenvalues of a KKT system below this fraction of the largest are treated as
# zero: the system then belongs to an (almost) affinely dependent subset, whose
# optimum is also reached on a smaller subset.
_PINV_RCOND = 1e-10
# Active-set solutions with weights this negative still count as feasible
# (round-off of an exact zero); they are clipped and renormalised.
_FEASIBLE_ATOL = 1e-9
# Candidates whose objectives differ by less than this are equally good; among
# them the one with the largest support wins, so symmetric inputs (identical
# or all-zero gradients) get symmetric weights instead of an arbitrary vertex.
_TIE_ATOL = 1e-12
# For K = 2, |g1 - g2|^2 at or below this fraction of |g1|^2 + |g2|^2 means the
# two gradients are equal up to float32 round-off: every weight gives the same
# direction and we return (0.5, 0.5).
_FLAT_RTOL = 1e-12


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(
            f"Expected `{name}` to be one of {choices}. "
            f"Received: {name}={value!r}"
        )


def _as_gradient_lists(grads):
    """Validates the nested structure and replaces `None` by zeros."""
    if isinstance(grads, tf.Tensor) or not isinstance(grads, (list, tuple)):
        raise ValueError(
            "Expected `grads` to be a list of K gradients, each a list of "
            f"tensors. Received: grads={grads!r}"
        )
    num = len(grads)
    if not 1 <= num <= MAX_OBJECTIVES:
        raise ValueError(
            f"Expected between 1 and {MAX_OBJECTIVES} gradients. "
            f"Received: len(grads)={num}"
        )
    for g in grads:
        if isinstance(g, tf.Tensor) or not isinstance(g, (list, tuple)):
            raise ValueError(
                "Expected each gradient to be a list of tensors (one per "
                f"variable). Received: gradient={g!r}"
            )
    num_vars = len(grads[0])
    if num_vars == 0 or any(len(g) != num_vars for g in grads):
        raise ValueError(
            "Expected every gradient to have the same, non-zero number of "
            f"tensors. Received: lengths={[len(g) for g in grads]}"
        )
    out = [[None] * num_vars for _ in grads]
    for v in range(num_vars):
        present = [g[v] for g in grads if g[v] is not None]
        if not present:
            raise ValueError(
                "Expected at least one gradient per variable to be "
                f"non-None. Received: all None for variable index {v}"
            )
        like = tf.convert_to_tensor(present[0])
        for k, g in enumerate(grads):
            t = tf.zeros_like(like) if g[v] is None else tf.convert_to_tensor(
                g[v])
            if not t.shape.is_compatible_with(like.shape):
                raise ValueError(
                    "Expected the gradients of one variable to share a shape. "
                    f"Received: shapes {t.shape} and {like.shape} for "
                    f"variable index {v}"
                )
            out[k][v] = t
    return out


def _as_losses(losses, num):
    if losses is None:
        return None
    losses = tf.reshape(tf.cast(tf.convert_to_tensor(losses), tf.float32),
                        [-1])
    if losses.shape[0] is not None and losses.shape[0] != num:
        raise ValueError(
            f"Expected one loss per gradient ({num}). "
            f"Received: losses.shape={losses.shape}"
        )
    return losses


def _all_finite(tensors):
    return tf.reduce_all(
        tf.stack([tf.reduce_all(tf.math.is_finite(t)) for t in tensors])
    )


def _global_norm(tensors):
    """Euclidean norm over a list of tensors, safe from float32 overflow."""
    tensors = [tf.cast(t, tf.float32) for t in tensors]
    # Scaling by the largest entry first keeps the sum of squares finite for
    # gradients around 1e20, which would overflow float32 when squared.
    peak = tf.reduce_max(tf.stack([tf.reduce_max(tf.abs(t)) for t in tensors]))
    safe_peak = tf.where(peak > 0.0, peak, 1.0)
    total = tf.add_n([tf.reduce_sum(tf.square(t / safe_peak)) for t in tensors])
    return peak * tf.sqrt(total)


def gram_matrix(grads):
    """Gram matrix of the flattened per-objective gradients.

    Args:
        grads: list of `K` gradients, each a list of tensors (one per
            variable). `None` entries count as zeros.

    Returns:
        A `[K, K]` float32 tensor `G` with `G[i, j] = <g_i, g_j>`, exactly
        symmetric.

    Example:

    >>> g1 = [tf.constant([1.0, 0.0])]
    >>> g2 = [tf.constant([0.0, 2.0])]
    >>> gram_matrix([g1, g2]).numpy().tolist()
    [[1.0, 0.0], [0.0, 4.0]]
    """
    grads = _as_gradient_lists(grads)
    flat = tf.stack([
        tf.concat([tf.reshape(tf.cast(t, tf.float32), [-1]) for t in g], 0)
        for g in grads
    ])
    gram = tf.matmul(flat, flat, transpose_b=True)
    return 0.5 * (gram + tf.transpose(gram))


def _static_size(gram):
    gram = tf.convert_to_tensor(gram)
    shape = gram.shape
    if (shape.rank != 2 or shape[0] is None or shape[0] != shape[1]
            or not 1 <= shape[0] <= MAX_OBJECTIVES):
        raise ValueError(
            "Expected a square Gram matrix of static size K x K with "
            f"1 <= K <= {MAX_OBJECTIVES}. Received: gram.shape={shape}"
        )
    return gram, shape[0]


def _two_point_weights(gram):
    """Closed form for K = 2: minimise |g2 + c (g1 - g2)|^2 over c in [0, 1]."""
    a, b, d = gram[0, 0], gram[1, 1], gram[0, 1]
    curvature = a + b - 2.0 * d  # = |g1 - g2|^2
    flat = curvature <= _FLAT_RTOL * (a + b)
    safe_curvature = tf.where(flat, tf.ones_like(curvature), curvature)
    c1 = tf.clip_by_value((b - d) / safe_curvature, 0.0, 1.0)
    c1 = tf.where(flat, tf.constant(0.5, gram.dtype), c1)
    return tf.stack([c1, 1.0 - c1])


def _active_set_weights(gram, num):
    """Exact min-norm weights by enumerating every support (K >= 3)."""
    # For a support S the optimum on the affine hull of {g_i, i in S} solves
    #   [G_S 1; 1^T 0] [c; -lam] = [0; 1].
    # The global optimum is reached on some affinely independent S, for which
    # this system is regular and its solution non-negative, so solving all
    # 2^K - 1 systems and taking the best non-negative solution is exact.
    # Variables outside S get identity rows so that all systems share one
    # shape and are solved in one batch. A symmetric pseudo-inverse (via eigh)
    # keeps colinear subsets from failing: their least-squares solution is
    # still a valid point, merely possibly not the best one.
    subsets = [
        s for r in range(1, num + 1)
        for s in itertools.combinations(range(num), r)
    ]
    masks = tf.constant(
        [[1.0 if i in s else 0.0 for i in range(num)] for s in subsets],
        gram.dtype,
    )
    sizes = tf.constant([len(s) for s in subsets], tf.int32)
    count = len(subsets)
    outer = masks[:, :, None] * masks[:, None, :]
    top_left = outer * gram[None] + tf.linalg.diag(1.0 - masks)
    top = tf.concat([top_left, masks[:, :, None]], axis=2)
    bottom = tf.concat(
        [masks[:, None, :], tf.zeros([count, 1, 1], gram.dtype)], axis=2)
    kkt = tf.concat([top, bottom], axis=1)

    eigvals, eigvecs = tf.linalg.eigh(kkt)
    cutoff = _PINV_RCOND * tf.reduce_max(tf.abs(eigvals), axis=1,
                                         keepdims=True)
    keep = tf.abs(eigvals) > cutoff
    inv_eigvals = tf.where(keep, 1.0 / tf.where(keep, eigvals, 1.0), 0.0)
    # The right-hand side is the last unit vector, so V^T b is V's last row.
    coeffs = inv_eigvals * eigvecs[:, num, :]
    solution = tf.einsum("pij,pj->pi", eigvecs, coeffs)
    raw = solution[:, :num] * masks

    # Only solutions that are non-negative up to round-off compete: each is
    # then the optimum over its face of the simplex, so the tie-break below
    # chooses between genuinely optimal points. Singletons always qualify.
    clipped = tf.maximum(raw, 0.0)
    total = tf.reduce_sum(clipped, axis=1, keepdims=True)
    feasible = (
        tf.reduce_all(raw >= -_FEASIBLE_ATOL, axis=1)
        & tf.reduce_all(tf.math.is_finite(raw), axis=1)
        & (total[:, 0] > 0.0)
    )
    weights = clipped / tf.where(total > 0.0, total, 1.0)
    objective = tf.einsum("pi,ij,pj->p", weights, gram, weights)
    objective = tf.where(feasible, objective, tf.constant(float("inf"),
                                                          gram.dtype))
    near_best = objective <= tf.reduce_min(objective) + _TIE_ATOL
    choice = tf.argmax(tf.where(near_best, sizes, -1), output_type=tf.int32)
    return tf.gather(weights, choice)


def min_norm_weights(gram):
    """Weights of the minimum-norm point in the convex hull of K gradients.

    Solves `min_c c^T G c` subject to `c >= 0`, `sum(c) = 1`. For `K = 2`
    the closed form is used; for `3 <= K <= 5` every support set is solved
    exactly (a batch of 2^K - 1 tiny KKT systems), which is exact up to
    float64 round-off. The solve runs in float64 on the Gram matrix rescaled
    to a unit largest diagonal.

    Ties are broken towards the most spread-out weights: identical gradients
    get equal weights, and all-zero gradients get `1 / K` each. A zero
    gradient always attains the minimum (objective 0), so it receives all the
    weight unless other zero gradients share it.

    Args:
        gram: `[K, K]` Gram matrix of the gradients (see `gram_matrix`),
            `K` static, `1 <= K <= 5`. Must be finite; a non-finite matrix
            yields all-zero weights (not on the simplex) so that the failure
            is visible.

    Returns:
        A `[K]` float32 tensor on the simplex.

    Example:

    >>> gram = tf.constant([[1.0, -1.0], [-1.0, 1.0]])  # opposite gradients
    >>> min_norm_weights(gram).numpy().tolist()
    [0.5, 0.5]

    Reference:
        - [Sener & Koltun, 2018](https://arxiv.org/abs/1810.04650)
    """
    gram, num = _static_size(gram)
    if num == 1:
        return tf.ones([1], tf.float32)
    gram64 = tf.cast(gram, tf.float64)
    finite = tf.reduce_all(tf.math.is_finite(gram64))
    gram64 = tf.where(finite, gram64, 0.0)
    gram64 = 0.5 * (gram64 + tf.transpose(gram64))
    scale = tf.reduce_max(tf.linalg.diag_part(gram64))
    gram64 = gram64 / tf.where(scale > 0.0, scale, 1.0)
    if num == 2:
        weights = _two_point_weights(gram64)
    else:
        weights = _active_set_weights(gram64, num)
    weights = tf.where(finite, weights, 0.0)
    return tf.cast(weights, tf.float32)


# The authors' MinNormSolver constants (min_norm_solvers.py): iterations
# (theirs never counts them, so it stops only on convergence), the
# convergence threshold on the L1 change of the weights, and the vertex
# clamps of the two-point solution.
_AUTHORS_MAX_ITER = 250
_AUTHORS_STOP = 1e-5
_AUTHORS_VERTEX = (0.999, 0.001)
# Added to every weight after solving (DARTS/architect.py at 9b66e4d).
_AUTHORS_OFFSET = 1e-7


def _authors_two_point(v11, v12, v22):
    """Their ``_min_norm_element_from2``: ``(gamma, cost)`` of
    ``min |gamma x1 + (1 - gamma) x2|^2`` with vertices clamped to
    0.999 / 0.001 (vectorised over any shape)."""
    upper, lower = _AUTHORS_VERTEX
    denom = v11 + v22 - 2.0 * v12
    safe = tf.where(denom > 0.0, denom, tf.ones_like(denom))
    gamma = -(v12 - v22) / safe
    cost = v22 + gamma * (v12 - v22)
    at_first = v12 >= v11
    at_second = tf.logical_not(at_first) & (v12 >= v22)
    gamma = tf.where(at_first, tf.constant(upper, v11.dtype),
                     tf.where(at_second, tf.constant(lower, v11.dtype), gamma))
    cost = tf.where(at_first, v11, tf.where(at_second, v22, cost))
    return gamma, cost


def _authors_projection_to_simplex(y):
    """Their ``_projection2simplex`` (sort-based Euclidean projection)."""
    m = int(y.shape[0])
    ordered = tf.sort(y, direction="DESCENDING")
    default = (tf.reduce_sum(y) - 1.0) / m
    partial = tf.cumsum(ordered)[:m - 1]
    tmax = (partial - 1.0) / tf.range(1, m, dtype=y.dtype)
    hits = tmax > ordered[1:]
    first = tf.argmax(tf.cast(hits, tf.int32), output_type=tf.int32)
    tmax_f = tf.where(tf.reduce_any(hits), tmax[first], default)
    return tf.maximum(y - tmax_f, 0.0)


def _authors_next_point(current, grad):
    """Their ``_next_point``: a step along the projected gradient to the
    simplex boundary, projected back."""
    n = int(current.shape[0])
    inf = tf.constant(float("inf"), current.dtype)
    proj = grad - tf.reduce_sum(grad) / n
    neg, pos = proj < 0.0, proj > 0.0
    safe = tf.where(neg | pos, proj, tf.ones_like(proj))
    tm1 = tf.where(neg, -current / safe, inf)
    tm2 = tf.where(pos, (1.0 - current) / safe, inf)
    ok1 = neg & (tm1 > 1e-7)
    ok2 = pos & (tm2 > 1e-7)
    t = tf.where(tf.reduce_any(ok1), tf.reduce_min(tf.where(ok1, tm1, inf)),
                 tf.constant(1.0, current.dtype))
    t = tf.where(tf.reduce_any(ok2),
                 tf.minimum(t, tf.reduce_min(tf.where(ok2, tm2, inf))), t)
    return _authors_projection_to_simplex(proj * t + current)


def authors_min_norm_weights(gram):
    """The E2RNAS authors' MGDA solver, reproduced in TensorFlow ops.

    Their ``MinNormSolver.find_min_norm_element`` (after Sener & Koltun's
    code): the best pair of gradients by the two-point closed form, whose
    vertex solutions are clamped to 0.999 / 0.001 (so a gradient never gets
    exactly zero weight), then, for ``K >= 3``, projected-gradient steps
    on the simplex with an exact line search until the weights change by
    less than 1e-5 (L1); finally 1e-7 is added to every weight, as their
    ``architect.py`` does. Differences from theirs: at most 250 iterations
    (their counter is never incremented), and the pair search has no 1e8
    cap on the cost.

    The clamps matter where one gradient is zero or dominated: `min_norm_
    weights` then gives the other objectives exactly 0, theirs 0.001, and
    Adam (nearly invariant to the scale of its input) turns a 0.001-weighted
    gradient into a full-size step.

    Args:
        gram: ``[K, K]`` Gram matrix, ``1 <= K <= 5``, finite.

    Returns:
        A ``[K]`` float32 tensor (sums to 1 + K * 1e-7, not exactly 1).

    Reference:
        github.com/yuezhixiong/NAS-Benchmark, min_norm_solvers.py (commit
        d10b60e) and DARTS/architect.py at 9b66e4d, lines 208-219;
        https://arxiv.org/abs/1810.04650
    """
    gram, num = _static_size(gram)
    if num == 1:
        return tf.ones([1], tf.float32)
    g = tf.cast(gram, tf.float64)
    g = 0.5 * (g + tf.transpose(g))
    pairs = list(itertools.combinations(range(num), 2))
    ii = tf.constant([i for i, _ in pairs])
    jj = tf.constant([j for _, j in pairs])
    gamma, cost = _authors_two_point(
        tf.gather_nd(g, tf.stack([ii, ii], 1)),
        tf.gather_nd(g, tf.stack([ii, jj], 1)),
        tf.gather_nd(g, tf.stack([jj, jj], 1)))
    best = tf.argmin(cost, output_type=tf.int32)
    sol = (tf.one_hot(ii[best], num, dtype=tf.float64) * gamma[best]
           + tf.one_hot(jj[best], num, dtype=tf.float64) * (1.0 - gamma[best]))
    if num >= 3:
        def body(i, sol, done):
            new_point = _authors_next_point(sol, -tf.linalg.matvec(g, sol))
            v11 = tf.tensordot(sol, tf.linalg.matvec(g, sol), 1)
            v12 = tf.tensordot(sol, tf.linalg.matvec(g, new_point), 1)
            v22 = tf.tensordot(new_point, tf.linalg.matvec(g, new_point), 1)
            nc, _ = _authors_two_point(v11, v12, v22)
            new_sol = nc * sol + (1.0 - nc) * new_point
            converged = tf.reduce_sum(tf.abs(new_sol - sol)) < _AUTHORS_STOP
            # On convergence they return the previous point.
            return i + 1, tf.where(converged, sol, new_sol), converged

        _, sol, _ = tf.while_loop(
            lambda i, sol, done: tf.logical_not(done) & (i < _AUTHORS_MAX_ITER),
            body, (tf.constant(0), sol, tf.constant(False)),
            maximum_iterations=_AUTHORS_MAX_ITER)
    return tf.cast(sol + _AUTHORS_OFFSET, tf.float32)


def normalize_gradients(grads, losses, mode):
    """Rescales each objective's gradient before the weights are solved.

    Modes (with `g` one objective's gradient over all variables and `loss`
    its loss value):

    - `"none"`: `g`.
    - `"l2"`: `g / ||g||` (the default of `combine`), so every objective
      counts equally regardless of its gradient scale.
    - `"loss"`: `g / loss`.
    - `"loss+"`: `g / (loss * ||g||)`.

    A zero divisor leaves the gradient unscaled, so a zero gradient stays zero
    and nothing becomes NaN. A non-positive loss in the `"loss"` modes is
    likewise left unscaled here; `combine` reports it through `ok=False`.

    Args:
        grads: list of `K` gradients, each a list of tensors.
        losses: `[K]` tensor (or list of scalars) of loss values. Only used by
            the `"loss"` and `"loss+"` modes; may be `None` otherwise.
        mode: one of `NORMALIZATIONS`.

    Returns:
        A list of `K` lists of tensors, shaped and typed like `grads`.

    Example:

    >>> g = [[tf.constant([3.0, 4.0])], [tf.constant([0.0, 2.0])]]
    >>> out = normalize_gradients(g, None, "l2")
    >>> out[0][0].numpy().tolist()
    [0.6000000238418579, 0.800000011920929]

    Reference:
        - [Sener & Koltun, 2018](https://arxiv.org/abs/1810.04650)
    """
    _check_choice("mode", mode, NORMALIZATIONS)
    grads = _as_gradient_lists(grads)
    num = len(grads)
    if mode == "none":
        return [list(g) for g in grads]
    if mode in ("loss", "loss+") and losses is None:
        raise ValueError(
            f"Expected `losses` for normalization mode {mode!r}. "
            "Received: losses=None"
        )
    losses = _as_losses(losses, num)
    out = []
    for k, g in enumerate(grads):
        if mode == "l2":
            divisor = _global_norm(g)
        elif mode == "loss":
            divisor = losses[k]
        else:
            divisor = losses[k] * _global_norm(g)
        divisor = tf.where(divisor > 0.0, divisor, 1.0)
        out.append([t / tf.cast(divisor, t.dtype) for t in g])
    return out


def _fixed_weights(fixed_weights, num):
    try:
        values = [float(w) for w in fixed_weights]
    except (TypeError, ValueError):
        raise ValueError(
            "Expected `fixed_weights` to be a sequence of Python numbers. "
            f"Received: fixed_weights={fixed_weights!r}"
        ) from None
    if len(values) != num:
        raise ValueError(
            f"Expected {num} fixed weights (one per gradient). "
            f"Received: fixed_weights={fixed_weights!r}"
        )
    if any(not w >= 0.0 or w == float("inf") for w in values):
        raise ValueError(
            "Expected finite, non-negative fixed weights. "
            f"Received: fixed_weights={fixed_weights!r}"
        )
    total = sum(values)
    if total <= 0.0:
        raise ValueError(
            "Expected fixed weights that are not all zero. "
            f"Received: fixed_weights={fixed_weights!r}"
        )
    return tf.constant([w / total for w in values], tf.float32)


def combine(grads, losses, *, method="mgda", normalization="l2",
            fixed_weights=None, apply_to="normalized", solver="exact",
            accumulate=False):
    """Combines per-objective gradients into one architecture update.

    The gradients are first rescaled with `normalization` (see
    `normalize_gradients`), then weighted:

    - `"mgda"`: min-norm weights of the normalised gradients
      (`min_norm_weights`, or `authors_min_norm_weights` with
      `solver="authors"`).
    - `"sum"`: equal weights `1 / K` (the "equal weights" ablation); `1 / K`
      rather than 1 keeps the scale comparable with MGDA's simplex weights.
    - `"ones"`: weight 1 on every objective: the authors' "noMGDA"
      ablation (with `apply_to="raw"`, the gradient of the plain sum of the
      objectives). Not on the simplex.
    - `"fixed"`: `fixed_weights`, divided by their sum.

    The direction is `sum_k c_k g_k` over the normalised gradients, or over
    the raw gradients with `apply_to="raw"` (same weights). Pass it to the
    architecture optimizer as the gradient.

    `accumulate=True` reproduces the authors' first version, which took
    each objective's gradient with `backward()` into a `.grad` that nothing
    cleared between objectives: objective k's "gradient" was the sum of the
    first k gradients, and the final `backward()` of the weighted loss added
    to what was there. The weights are then solved on those prefix sums
    and the returned weights are `1 + c_k`, the factors each objective's own
    gradient ends up multiplied by (with `"ones"`: 2 each).

    Failures are reported, never propagated: if any gradient or loss is NaN
    or Inf, if a `"loss"` mode meets a non-positive loss, or if the Gram
    matrix or the direction overflows, `ok` is False, the weights are zeros
    and the direction is zeros, so the caller can skip the step and log it.

    Runs as TF ops inside a `tf.function` (also with `jit_compile=True`); all
    arguments except `grads` and `losses` are trace-time Python values.

    Args:
        grads: list of `K` gradients (`1 <= K <= 5`), each a list of tensors,
            one per architecture variable. `None` entries count as zeros.
        losses: `[K]` tensor (or list of scalars) of the objectives' values.
            Required by the `"loss"` and `"loss+"` normalisations; may be
            `None` otherwise. When given, it is checked for NaN/Inf.
        method: one of `METHODS`.
        normalization: one of `NORMALIZATIONS`.
        fixed_weights: with `method="fixed"`, `K` non-negative Python numbers,
            not all zero. Must be `None` for other methods.
        apply_to: `"normalized"` or `"raw"`: which gradients the weights
            multiply.
        solver: `"exact"` or `"authors"`, the min-norm solver of `"mgda"`.
        accumulate: the first version's accumulated gradients (above).

    Returns:
        A tuple `(direction, weights, ok)`: `direction` is a list of tensors
        shaped like the gradients of each variable, `weights` a `[K]` float32
        tensor and `ok` a scalar bool tensor.

    Example:

    >>> g_val = [tf.constant([1.0, 0.0])]
    >>> g_adv = [tf.constant([0.0, 1.0])]
    >>> direction, weights, ok = combine([g_val, g_adv], None)
    >>> weights.numpy().tolist(), bool(ok)
    ([0.5, 0.5], True)

    Reference:
        - [Sener & Koltun, 2018](https://arxiv.org/abs/1810.04650)
        - [E2RNAS, 2020](https://arxiv.org/abs/2011.09820)
    """
    _check_choice("method", method, METHODS)
    _check_choice("normalization", normalization, NORMALIZATIONS)
    _check_choice("apply_to", apply_to, APPLY_TO)
    _check_choice("solver", solver, SOLVERS)
    grads = _as_gradient_lists(grads)
    num = len(grads)
    if method == "fixed":
        if fixed_weights is None:
            raise ValueError(
                "Expected `fixed_weights` with method='fixed'. "
                "Received: fixed_weights=None"
            )
        constant_weights = _fixed_weights(fixed_weights, num)
    elif fixed_weights is not None:
        raise ValueError(
            "Expected `fixed_weights=None` unless method='fixed'. "
            f"Received: method={method!r}, fixed_weights={fixed_weights!r}"
        )
    needs_losses = normalization in ("loss", "loss+")
    if needs_losses and losses is None:
        raise ValueError(
            f"Expected `losses` for normalization={normalization!r}. "
            "Received: losses=None"
        )
    losses = _as_losses(losses, num)

    flat = [t for g in grads for t in g]
    ok = _all_finite(flat)
    if losses is not None:
        ok = ok & _all_finite([losses])
        if needs_losses:
            ok = ok & tf.reduce_all(losses > 0.0)
        # Safe stand-ins keep NaN out of every later op; the result is
        # discarded through `ok` anyway.
        losses = tf.where(ok, losses, 1.0)
    grads = [[tf.where(ok, t, tf.zeros_like(t)) for t in g] for g in grads]
    seen = grads
    if accumulate:
        seen = [[tf.add_n([grads[j][v] for j in range(k + 1)])
                 for v in range(len(grads[k]))] for k in range(num)]
    normalized = normalize_gradients(seen, losses, normalization)

    if method == "mgda":
        gram = gram_matrix(normalized)
        ok = ok & _all_finite([gram])
        if solver == "exact":
            weights = min_norm_weights(gram)
        else:
            weights = authors_min_norm_weights(gram)
    elif method == "sum":
        weights = tf.fill([num], 1.0 / num)
    elif method == "ones":
        weights = tf.ones([num])
    else:
        weights = constant_weights
    if accumulate:
        weights = 1.0 + weights
        if apply_to == "normalized":
            normalized = normalize_gradients(grads, losses, normalization)

    source = normalized if apply_to == "normalized" else grads
    direction = []
    for v in range(len(source[0])):
        terms = [tf.cast(weights[k], source[k][v].dtype) * source[k][v]
                 for k in range(num)]
        direction.append(tf.add_n(terms))
    ok = ok & _all_finite(direction) & _all_finite([weights])
    direction = [tf.where(ok, d, tf.zeros_like(d)) for d in direction]
    weights = tf.where(ok, weights, 0.0)
    return direction, weights, ok
