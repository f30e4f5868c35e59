"""XLA and mixed-precision tests of the search, training and evaluation.

XLA (``config.jit_compile``): the compiled search step, training step and
evaluation attacks agree with the uncompiled ones. Stateless random numbers
differ between XLA and the TF kernels, so every random start is off here
(the attacks' XLA random starts are tested in test_objectives.py).

Mixed precision: under ``mixed_bfloat16`` (the CPU policy) the search and
the training run with finite losses, float32 alphas and float32 MGDA, and
pick the same genotype as float32 where the answer is clear. Under
``mixed_float16`` (meant for GPUs; float16 kernels also run on the CPU)
every network objective's gradient is unscaled before MGDA, so the loss
scale does not change the MGDA problem, and an overflow skips the step and
halves the scale.

Tiny sizes, as test_distributed.py: 3 cells, 4 channels, 8x8, batch 8.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from e2rnas_tf.search import step as search_step
from e2rnas_tf.space import genotypes
from e2rnas_tf.training import evaluate as evaluate_lib
from tests.step_util import (
    batches,
    restore,
    run_search,
    run_train,
    search_config,
    train_config,
)


@pytest.fixture
def policy(request):
    """Sets a global dtype policy for one test, float32 afterwards."""
    def set_policy(name):
        keras.mixed_precision.set_global_policy(name)
    yield set_policy
    keras.mixed_precision.set_global_policy("float32")


def initial(init, name):
    """A variable's value in a `snapshot`."""
    return dict(init)[name]


def genotype_of(net, config):
    w_normal, w_reduce = net.op_weights()
    return genotypes.derive(w_normal.numpy(), w_reduce.numpy(),
                            config.model.primitives, config.model.multiplier)


# -- XLA ---------------------------------------------------------------------


def _xla_search_matches_uncompiled(steps, **overrides):
    single = tf.distribute.get_strategy()
    keras.utils.set_random_seed(0)
    net, init, plain, plain_alpha = run_search(
        single, search_config(**overrides), 1, steps=steps)
    xla_net, _, xla, xla_alpha = run_search(
        single, search_config(jit_compile=True, **overrides), 1, init,
        steps=steps)
    assert xla_net is not net
    for key, value in plain[-1].items():
        np.testing.assert_allclose(xla[-1][key], value, rtol=1e-4,
                                   atol=1e-6, err_msg=key)
    for a, b in zip(plain_alpha[-1], xla_alpha[-1]):
        np.testing.assert_allclose(b[0], a[0], rtol=1e-4, atol=1e-6)
    # The steps did something (alpha moved, nothing skipped).
    assert not np.allclose(plain_alpha[-1][0][0], initial(init, "alpha_normal"))
    assert plain[-1]["skipped"] == 0.0
    for v, w in zip(net.weight_variables, xla_net.weight_variables):
        np.testing.assert_allclose(w.numpy(), v.numpy(), rtol=1e-4,
                                   atol=1e-5)


@pytest.mark.slow
def test_xla_search_step_matches_uncompiled():
    # XLA compiles the first-order step with the accuracy objective in
    # about half a minute on 2 cores.
    _xla_search_matches_uncompiled(1, objectives=("acc", "params"))


@pytest.mark.slow
def test_xla_search_step_with_attack_matches_uncompiled():
    # With the adversarial objective (FGSM inside the step) XLA compiles
    # for about 9 minutes on 2 cores.
    _xla_search_matches_uncompiled(3)


@pytest.mark.slow
def test_xla_train_step_matches_uncompiled():
    single = tf.distribute.get_strategy()
    keras.utils.set_random_seed(0)
    model, init, plain = run_train(single, train_config(), 1)
    xla_model, _, xla = run_train(single, train_config(jit_compile=True), 1,
                                  init)
    for key in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in xla],
                                   [m[key] for m in plain], rtol=1e-4,
                                   err_msg=key)
    assert plain[0]["loss"] != plain[-1]["loss"]
    for v, w in zip(model.trainable_variables,
                    xla_model.trainable_variables):
        np.testing.assert_allclose(w.numpy(), v.numpy(), rtol=1e-4,
                                   atol=1e-5)


@pytest.mark.slow
def test_xla_evaluation_attacks_match_uncompiled():
    from e2rnas_tf.space import model as model_lib

    keras.utils.set_random_seed(0)
    model = model_lib.DerivedNetwork("DARTS_V2", channels=4, num_classes=10,
                                     layers=3)
    model.build((None, 8, 8, 3))
    images, labels = batches(5, steps=1)[0]
    # Labels the model gets right, so that the attacks have work to do.
    labels = np.argmax(model(images).numpy(), -1).astype(np.int32)
    kwargs = dict(attacks=("fgsm", "pgd"), epsilons=(1.0, 8.0), pgd_steps=2,
                  random_start=False, batch_size=8)
    plain = evaluate_lib.evaluate_model(model, (images, labels), **kwargs)
    xla = evaluate_lib.evaluate_model(model, (images, labels),
                                      jit_compile=True, **kwargs)
    assert plain["clean_accuracy"] == xla["clean_accuracy"] == 1.0
    assert xla["robust_accuracy"] == plain["robust_accuracy"]
    # eps 8/255 against an untrained net flips some predictions.
    assert min(plain["robust_accuracy"]["pgd"].values()) < 1.0


# -- mixed precision ---------------------------------------------------------


def test_bfloat16_search_finite_float32_alpha_same_genotype(policy):
    """A resource-only objective decides the genotype (the cheapest ops);
    the bf16 network steps must leave alpha's float32 path untouched."""
    single = tf.distribute.get_strategy()
    overrides = {"objectives": ("acc", "params"), "arch.lr": 0.05,
                 "combine.method": "fixed", "combine.weights": (0.0, 1.0)}
    keras.utils.set_random_seed(0)
    net32, init, m32, _ = run_search(single, search_config(**overrides), 1)
    policy("mixed_bfloat16")
    cfg16 = search_config(mixed_precision="mixed_bfloat16", **overrides)
    net16, _, m16, _ = run_search(single, cfg16, 1, init)
    assert net16.stem_conv.compute_dtype == "bfloat16"
    for a in net16.arch_variables:
        assert a.dtype == "float32"
    assert all(np.isfinite(v) for m in m16 for v in m.values())
    assert all(m["skipped"] == 0.0 for m in m16)
    # Losses agree to bfloat16 precision (8 mantissa bits).
    np.testing.assert_allclose(m16[0]["objective/acc"],
                               m32[0]["objective/acc"], rtol=3e-2)
    np.testing.assert_allclose(m16[-1]["objective/params"],
                               m32[-1]["objective/params"], rtol=1e-6)
    g32, g16 = genotype_of(net32, cfg16), genotype_of(net16, cfg16)
    assert g16 == g32
    # The cheap ops win: no separable convolution in the genotype.
    assert all(op != "sep_conv_3x3" for op, _ in g16.normal + g16.reduce)


def test_bfloat16_training_step_is_close_to_float32(policy):
    single = tf.distribute.get_strategy()
    keras.utils.set_random_seed(0)
    model32, init, m32 = run_train(single, train_config(), 1)
    policy("mixed_bfloat16")
    model16, _, m16 = run_train(
        single, train_config(mixed_precision="mixed_bfloat16"), 1, init)
    assert model16.stem_conv.compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in model16.trainable_variables)
    assert all(np.isfinite(v) for m in m16 for v in m.values())
    np.testing.assert_allclose(m16[0]["loss"], m32[0]["loss"], rtol=3e-2)


def _float16_step(init, loss_scale, cell_impl="reference"):
    single = tf.distribute.get_strategy()
    cfg = search_config(mixed_precision="mixed_float16")
    from e2rnas_tf.space.search_space import SearchNetwork
    net = SearchNetwork(channels=4, num_classes=10, layers=3, steps=2,
                        multiplier=2, primitives=cfg.model.primitives,
                        alpha_seed=0, cell_impl=cell_impl)
    net.build((None, 8, 8, 3))
    restore(init, net)
    step = search_step.SearchStep(net, cfg, num_classes=10, image_size=8,
                                  steps_per_epoch=10, strategy=single)
    step.loss_scale.scale.assign(loss_scale)
    train, valid = batches(1, 1)[0], batches(2, 1)[0]
    return net, step, {k: float(v) for k, v in step(train, valid).items()}


@pytest.mark.slow
def test_float16_loss_scale_is_removed_before_mgda(policy):
    single = tf.distribute.get_strategy()
    keras.utils.set_random_seed(0)
    # Reference cells: the fused cells' float16 grouped 1x1 convolutions
    # are einsums on a CPU (no CPU float16 grouped-conv backprop), not the
    # kernels a GPU runs; test_float16_fused_cells_run_on_cpu covers them.
    reference = {"model.cell_impl": "reference"}
    _, init, m32, _ = run_search(single, search_config(**reference), 1)
    policy("mixed_float16")
    _, _, low = _float16_step(init, 2.0 ** 4)
    net, step, high = _float16_step(init, 2.0 ** 12)
    assert net.stem_conv.compute_dtype == "float16"
    assert low["skipped"] == high["skipped"] == 0.0
    assert high["loss_scale"] == 2.0 ** 12
    # Same MGDA weights whatever the scale (gradients unscaled first), and
    # close to float32's.
    for name in ("acc", "adv", "params"):
        np.testing.assert_allclose(high[f"weight/{name}"],
                                   low[f"weight/{name}"], atol=2e-3)
        # float16 activations move MGDA weights by a few hundredths
        # (0.022 seen in CI for adv); the scale invariance above is the
        # property under test, this only guards against nonsense.
        np.testing.assert_allclose(high[f"weight/{name}"],
                                   m32[0][f"weight/{name}"], atol=5e-2)
        np.testing.assert_allclose(high[f"objective/{name}"],
                                   m32[0][f"objective/{name}"], rtol=1e-2)
    assert all(a.dtype == "float32" for a in net.arch_variables)

    # A scale that overflows float16 (65504) skips the step: nothing moves
    # and the scale halves.
    net, step, over = _float16_step(init, 2.0 ** 30)
    assert over["skipped"] == 1.0
    assert over["loss_scale"] == 2.0 ** 29
    np.testing.assert_array_equal(net.alpha_normal.numpy(), initial(init, "alpha_normal"))


def test_float16_fused_cells_run_on_cpu(policy):
    """The default fused cells under mixed_float16 on a CPU: their grouped
    1x1 convolutions fall back to einsums (TF's CPU kernels cannot
    differentiate a float16 grouped convolution), the step runs, alpha
    stays float32 and the objectives are float32's to float16 accuracy."""
    single = tf.distribute.get_strategy()
    keras.utils.set_random_seed(0)
    fused = {"model.cell_impl": "fused"}
    _, init, m32, _ = run_search(single, search_config(**fused), 1)
    policy("mixed_float16")
    net, _, m16 = _float16_step(init, 2.0 ** 12, cell_impl="fused")
    assert net.stem_conv.compute_dtype == "float16"
    assert m16["skipped"] == 0.0
    assert all(a.dtype == "float32" for a in net.arch_variables)
    for name in ("acc", "adv", "params"):
        np.testing.assert_allclose(m16[f"objective/{name}"],
                                   m32[0][f"objective/{name}"], rtol=1e-2)
