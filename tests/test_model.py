"""Tests for e2rnas_tf.space.model: the derived network, its cells and heads."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from e2rnas_tf.space import costs, genotypes, ops
from e2rnas_tf.space import model as model_lib

# Published DARTS (V2) at 20 cells, C=36, 10 classes, without the auxiliary
# head: 3.3M in the paper; 3,349,342 with PyTorch DARTS' own counter
# (utils.count_parameters_in_MB, which skips "auxiliary" parameters).
DARTS_V2_PARAMS = 3_349_342
E2RNAS_PARAMS = 2_546_470
DARTS_V1_PARAMS = 3_169_414


def _aux_head_params(c_in, num_classes, kernel=2):
    # 1x1 conv + BN(128), kxk conv + BN(768), linear with bias.
    return (c_in * 128 + 2 * 128 + kernel * kernel * 128 * 768 + 2 * 768
            + 768 * num_classes + num_classes)


def _small(genotype, **kwargs):
    kwargs.setdefault("channels", 4)
    kwargs.setdefault("layers", 3)
    kwargs.setdefault("num_classes", 10)
    size = kwargs.pop("size", 16)
    net = model_lib.DerivedNetwork(genotype, **kwargs)
    net.build((None, size, size, 3))
    return net


@pytest.fixture(scope="module")
def images():
    return tf.random.stateless_uniform([4, 16, 16, 3], seed=[1, 2])


@pytest.mark.parametrize("name", sorted(genotypes.PUBLISHED))
def test_published_genotype_builds_trains_and_round_trips(name, images,
                                                          tmp_path):
    net = _small(name, auxiliary=True, drop_path=0.1,
                 mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    labels = tf.constant([0, 1, 2, 3])
    before = [v.numpy().copy() for v in net.trainable_variables]
    optimizer = keras.optimizers.SGD(0.1)
    with tf.GradientTape() as tape:
        logits, aux = net.call_with_aux(images, training=True)
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
            + 0.4 * tf.nn.sparse_softmax_cross_entropy_with_logits(labels, aux))
    grads = tape.gradient(loss, net.trainable_variables)
    assert all(g is not None for g in grads)
    optimizer.apply(grads, net.trainable_variables)
    changed = [not np.array_equal(b, v.numpy())
               for b, v in zip(before, net.trainable_variables)]
    assert all(changed)
    assert logits.dtype == tf.float32 and logits.shape == (4, 10)

    path = str(tmp_path / "net.keras")
    net.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, model_lib.DerivedNetwork)
    assert loaded.genotype == genotypes.PUBLISHED[name]
    assert loaded.get_config() == net.get_config()
    np.testing.assert_array_equal(loaded(images).numpy(), net(images).numpy())
    assert float(loaded.drop_path_rate.numpy()) == pytest.approx(0.1)


def test_darts_v2_published_parameter_count():
    net = _small("DARTS_V2", channels=36, layers=20, auxiliary=True, size=32)
    assert costs.count_params(net) == DARTS_V2_PARAMS
    # The auxiliary head sits on the 8x8x576 output of cell 13 (2 * 20 // 3).
    assert costs.count_params(net.trainable_variables) == (
        DARTS_V2_PARAMS + _aux_head_params(576, 10))


@pytest.mark.parametrize("name,expected", [("E2RNAS", E2RNAS_PARAMS),
                                           ("DARTS_V1", DARTS_V1_PARAMS)])
def test_published_parameter_counts(name, expected):
    net = _small(name, channels=36, layers=20, size=32)
    assert costs.count_params(net) == expected


def test_cell_parameter_count_by_hand():
    # A DARTS_V2 normal cell with C=8 fed by 24-channel states: preprocess
    # 2 x (24*8 + 16); five sep_conv_3x3 (2 x (9C + C*C + 2C)); one
    # dil_conv_3x3 (9C + C*C + 2C); two identities.
    c = 8
    cell = model_lib.DerivedCell(genotypes.PUBLISHED["DARTS_V2"], c)
    cell.build((None, 8, 8, 24), (None, 8, 8, 24))
    dil = 9 * c + c * c + 2 * c
    expected = 2 * (24 * c + 2 * c) + 5 * 2 * dil + dil
    got = sum(int(np.prod(v.shape)) for v in cell.trainable_variables)
    assert got == expected
    out = cell(tf.zeros([2, 8, 8, 24]), tf.zeros([2, 8, 8, 24]))
    assert out.shape == (2, 8, 8, 4 * c)


def test_reduction_cell_halves_resolution():
    cell = model_lib.DerivedCell(genotypes.PUBLISHED["E2RNAS"], 8,
                                 reduction=True, reduction_prev=True)
    out = cell(tf.zeros([2, 10, 10, 12]), tf.zeros([2, 5, 5, 12]))
    assert out.shape == (2, 3, 3, 32)
    assert isinstance(cell.preprocess0, ops.FactorizedReduce)


def test_drop_path_function():
    x = tf.ones([2000, 2, 2, 3])
    tf.random.set_seed(0)
    y = model_lib.drop_path(x, 0.25).numpy()
    per_example = y.reshape(2000, -1)
    # Whole examples are kept (scaled by 1 / keep) or dropped.
    assert np.all(per_example.min(1) == per_example.max(1))
    values = np.unique(per_example)
    np.testing.assert_allclose(values, [0.0, 1 / 0.75], rtol=1e-6)
    assert abs((per_example[:, 0] == 0).mean() - 0.25) < 0.04
    np.testing.assert_array_equal(model_lib.drop_path(x, 0.0).numpy(),
                                  x.numpy())


def test_drop_path_only_in_training(images):
    net = _small("DARTS_V2", drop_path=0.0)
    clean_inference = net(images, training=False).numpy()
    net.set_drop_path_rate(0.5)
    np.testing.assert_array_equal(net(images, training=False).numpy(),
                                  clean_inference)
    # Training-mode outputs use batch statistics, so they are repeatable
    # without drop-path even though the moving statistics change.
    net.set_drop_path_rate(0.0)
    clean_training = net(images, training=True).numpy()
    np.testing.assert_array_equal(net(images, training=True).numpy(),
                                  clean_training)
    net.set_drop_path_rate(0.5)
    assert not np.allclose(net(images, training=True).numpy(), clean_training)


def test_seeded_drop_path_masks_depend_only_on_the_seed(images):
    # Training passes a seed from (seed, step, replica) so that a resumed
    # run draws the masks an uninterrupted one would have drawn.
    net = _small("DARTS_V2", drop_path=0.5)
    seed = tf.constant([1, 7], tf.int64)
    first = net.call_with_aux(images, training=True, drop_seed=seed)[0]
    tf.random.uniform([3])  # moves the global generator; must not matter
    again = net.call_with_aux(images, training=True, drop_seed=seed)[0]
    np.testing.assert_array_equal(again.numpy(), first.numpy())
    other = net.call_with_aux(images, training=True,
                              drop_seed=tf.constant([1, 8], tf.int64))[0]
    assert not np.allclose(other.numpy(), first.numpy())
    # Per edge the masks differ (the seed is folded with the edge index):
    # with rate 0.5 on every edge, identical masks would keep or drop
    # whole cells at once.
    edge_0 = tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(seed, 0), 0)
    edge_1 = tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(seed, 0), 1)
    x = tf.ones([64, 1, 1, 1])
    assert not np.array_equal(model_lib.drop_path(x, 0.5, edge_0).numpy(),
                              model_lib.drop_path(x, 0.5, edge_1).numpy())


def test_drop_path_rate_is_read_at_call_time(images):
    net = _small("DARTS_V2", drop_path=0.0)
    forward = tf.function(lambda x: net(x, training=True), autograph=False)
    first = forward(images).numpy()
    np.testing.assert_array_equal(forward(images).numpy(), first)
    net.drop_path_rate.assign(0.6)
    assert not np.allclose(forward(images).numpy(), first)
    net.drop_path_rate.assign(0.0)
    np.testing.assert_array_equal(forward(images).numpy(), first)
    assert forward.experimental_get_tracing_count() == 1


def test_auxiliary_head_only_in_training(images):
    net = _small("E2RNAS", auxiliary=True)
    logits, aux = net.call_with_aux(images, training=True)
    assert aux.shape == (4, 10) and aux.dtype == tf.float32
    _, aux = net.call_with_aux(images, training=False)
    assert aux is None
    np.testing.assert_array_equal(
        net.call_with_aux(images, training=False)[0].numpy(),
        net(images).numpy())
    plain = _small("E2RNAS", auxiliary=False)
    assert plain.call_with_aux(images, training=True)[1] is None
    assert plain.auxiliary_head is None
    # The head does not count as a model parameter.
    assert costs.count_params(net) == costs.count_params(plain)


@pytest.mark.parametrize("size,kernel", [(8, (2, 2)), (4, (1, 1)),
                                         (2, (1, 1)), (16, (2, 2))])
def test_auxiliary_head_adapts_to_the_map_size(size, kernel):
    head = model_lib.AuxiliaryHead(7)
    out = head(tf.ones([2, size, size, 16]), training=True)
    assert out.shape == (2, 7)
    assert tuple(head.kernel_2.shape) == kernel + (128, 768)


def test_call_with_aux_and_call_agree_in_inference(images):
    net = _small("DARTS_V1", auxiliary=True)
    eager = net(images).numpy()
    graph = tf.function(lambda x: net(x), autograph=False)(images).numpy()
    np.testing.assert_allclose(graph, eager, rtol=1e-5, atol=1e-5)


def test_constructor_validation():
    with pytest.raises(ValueError, match="drop_path"):
        model_lib.DerivedNetwork("DARTS_V2", drop_path=1.0)
    with pytest.raises(ValueError, match="layers"):
        model_lib.DerivedNetwork("DARTS_V2", layers=2)
    with pytest.raises(ValueError, match="channels"):
        model_lib.DerivedNetwork("DARTS_V2", channels=0)
    with pytest.raises(genotypes.GenotypeError):
        model_lib.DerivedNetwork("NO_SUCH_GENOTYPE")
    net = _small("DARTS_V2")
    with pytest.raises(ValueError, match="rate"):
        net.set_drop_path_rate(-0.1)


def test_genotype_dict_and_config_round_trip():
    genotype = genotypes.PUBLISHED["E2RNAS"]
    net = model_lib.DerivedNetwork(genotype.to_dict(), channels=4, layers=4,
                                   num_classes=3, auxiliary=True,
                                   drop_path=0.2)
    clone = model_lib.DerivedNetwork.from_config(net.get_config())
    assert clone.get_config() == net.get_config()
    assert clone.genotype == genotype
    assert [c.reduction for c in clone.cells] == [False, True, True, False]


def test_flops_of_darts_v2():
    net = _small("DARTS_V2", channels=36, layers=20, size=32)
    macs = costs.count_inference_macs(net, 32)
    # Conv + linear multiply-adds counted by costs.count_macs; DARTS' own
    # figure for this network is ~528M (a regression pin, not a reference).
    assert macs == 528_359_040
