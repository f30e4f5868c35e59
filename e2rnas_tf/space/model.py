"""The derived (retrained) network: a genotype stacked into a deep CNN.

This is DARTS' ``NetworkCIFAR``: a 3x3 stem, ``layers`` cells built from
one genotype (reduction cells at ``layers // 3`` and ``2 * layers // 3``),
global average pooling and a linear classifier, plus an optional auxiliary
classifier after cell ``2 * layers // 3`` that only runs in training. Each
edge of a cell is the single op the genotype chose, with affine batch norm;
non-identity edges are regularised with drop-path while training.

Reference:
    Liu, Simonyan, Yang. DARTS: Differentiable Architecture Search.
    https://arxiv.org/abs/1806.09055
    Yue, Lin, Huang, Zhang. Effective, Efficient and Robust Neural
    Architecture Search. https://arxiv.org/abs/2011.09820
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from e2rnas_tf.space import genotypes as genotypes_lib
from e2rnas_tf.space import ops as ops_lib
from e2rnas_tf.space import topology

__all__ = ["AuxiliaryHead", "DerivedCell", "DerivedNetwork", "drop_path"]

_PACKAGE = "e2rnas_tf"
STEM_MULTIPLIER = 3


def _as_genotype(genotype):
    if isinstance(genotype, genotypes_lib.Genotype):
        return genotype
    if isinstance(genotype, str):
        return genotypes_lib.get(genotype)
    return genotypes_lib.Genotype.from_dict(genotype)


def _check_rate(rate, name="drop_path"):
    if not isinstance(rate, (int, float, np.floating, np.integer)) \
            or isinstance(rate, bool) or not 0.0 <= float(rate) < 1.0:
        raise ValueError(
            f"Expected `{name}` in [0, 1). Received: {name}={rate!r}")
    return float(rate)


def drop_path(x, rate, seed=None):
    """Zeroes whole examples of ``x`` with probability ``rate``.

    Kept examples are divided by the keep probability so that the expected
    value is unchanged, as in DARTS' ``drop_path``. With ``rate == 0`` the
    mask is exactly one and ``x`` is returned unchanged (up to ``x / 1``),
    so a rate held in a variable needs no Python branch.

    Args:
        x: ``[N, ...]`` tensor.
        rate: scalar drop probability in [0, 1) (a tensor is fine).

    Returns:
        A tensor like ``x``.

    Example:

    >>> y = drop_path(tf.ones([4, 2, 2, 1]), 0.0)
    >>> float(tf.reduce_min(y))
    1.0

    Reference:
        Larsson, Maire, Shakhnarovich. FractalNet.
        https://arxiv.org/abs/1605.07648
    """
    keep = 1.0 - tf.cast(rate, tf.float32)
    shape = [tf.shape(x)[0]] + [1] * (x.shape.rank - 1)
    # floor(keep + U[0, 1)) is 1 with probability keep, else 0. A seed
    # makes the mask a function of the seed alone (training passes one
    # derived from the step), so a resumed run draws the same masks.
    if seed is None:
        noise = tf.random.uniform(shape, dtype=tf.float32)
    else:
        noise = tf.random.stateless_uniform(shape, seed, dtype=tf.float32)
    mask = tf.floor(keep + noise)
    return x * tf.cast(mask / keep, x.dtype)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DerivedCell(keras.layers.Layer):
    """One cell of the derived network, wired as the genotype says.

    ``s0`` is preprocessed by a FactorizedReduce if the previous cell
    reduced the resolution, otherwise by a ReLU-1x1 conv-BN; ``s1`` always
    by a ReLU-1x1 conv-BN. Node ``i`` sums its two chosen ops applied to
    their input states; in a reduction cell the ops reading the cell inputs
    have stride 2. The output concatenates the genotype's ``concat`` states.

    Args:
        genotype: a `Genotype` or its dict.
        channels: channels of every node.
        reduction: build the reduction cell (else the normal cell).
        reduction_prev: whether the previous cell reduced the resolution.

    Call arguments:
        s0: output of the cell before the previous one.
        s1: output of the previous cell.
        drop_rate: scalar drop-path rate, used only if ``training``.
        training: batch statistics and drop-path if true.
    """

    def __init__(self, genotype, channels, reduction=False,
                 reduction_prev=False, **kwargs):
        super().__init__(**kwargs)
        ops_lib._check_positive_int("channels", channels)
        self.genotype = _as_genotype(genotype)
        self.channels = int(channels)
        self.reduction = bool(reduction)
        self.reduction_prev = bool(reduction_prev)
        if self.reduction:
            edges, concat = self.genotype.reduce, self.genotype.reduce_concat
        else:
            edges, concat = self.genotype.normal, self.genotype.normal_concat
        self.inputs_of_edges = [j for _, j in edges]
        self.concat = tuple(concat)
        self.preprocess0, self.preprocess1 = ops_lib.cell_preprocess(
            channels, self.reduction_prev, affine=True)
        self.edge_ops = []
        for k, (name, j) in enumerate(edges):
            stride = 2 if self.reduction and j < 2 else 1
            self.edge_ops.append(ops_lib.make_op(
                name, channels, stride, affine=True,
                layer_name=f"node_{k // 2}_edge_{k % 2}_{name}"))

    def build(self, s0_shape, s1_shape=None, drop_rate_shape=None):
        self.preprocess0.build(s0_shape)
        self.preprocess1.build(s1_shape)
        state = self.preprocess1.compute_output_shape(s1_shape)
        for op in self.edge_ops:
            op.build(state)

    def call(self, s0, s1, drop_rate=0.0, training=False, seed=None):
        states = [self.preprocess0(s0, training=training),
                  self.preprocess1(s1, training=training)]
        for i in range(len(self.edge_ops) // 2):
            node = None
            for k in (2 * i, 2 * i + 1):
                op = self.edge_ops[k]
                h = states[self.inputs_of_edges[k]]
                if isinstance(op, (ops_lib.Identity, ops_lib.Pool)):
                    h = op(h)
                else:
                    h = op(h, training=training)
                # DARTS drops every edge but the parameter-free identity
                # (a strided skip, FactorizedReduce, is dropped too).
                if training and not isinstance(op, ops_lib.Identity):
                    edge_seed = None if seed is None else \
                        tf.random.experimental.stateless_fold_in(seed, k)
                    h = drop_path(h, drop_rate, edge_seed)
                node = h if node is None else node + h
            states.append(node)
        return tf.concat([states[s] for s in self.concat], axis=-1)

    def compute_output_shape(self, s0_shape, s1_shape=None,
                             drop_rate_shape=None):
        return ops_lib._strided_shape(s1_shape, 2 if self.reduction else 1,
                                      len(self.concat) * self.channels)

    def get_config(self):
        config = super().get_config()
        config.update(genotype=self.genotype.to_dict(),
                      channels=self.channels, reduction=self.reduction,
                      reduction_prev=self.reduction_prev)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AuxiliaryHead(keras.layers.Layer):
    """DARTS' auxiliary CIFAR classifier, for an ``8 x 8`` feature map.

    ReLU, 5x5 average pooling with stride 3 (8x8 -> 2x2), 1x1 conv to 128
    channels, BN, ReLU, 2x2 conv to 768 channels, BN, ReLU, linear
    classifier. On the 8x8 map of a 32x32 input this is exactly DARTS'
    head. Other sizes are adapted rather than refused, so that small test
    and demo images work: the pooling window is ``min(5, H)`` and the
    second convolution's kernel ``min(2, pooled size)``, and whatever
    spatial extent remains is averaged before the classifier (a no-op at
    8x8, where it is already 1x1). Only the second conv's kernel size, and
    so its parameter count, differs from DARTS for maps smaller than 5x5.

    Args:
        num_classes: classifier outputs.

    Call arguments:
        inputs: ``[N, H, W, C]`` with static ``H`` and ``W``.
        training: batch statistics in the batch norms if true.
    """

    def __init__(self, num_classes, **kwargs):
        super().__init__(**kwargs)
        ops_lib._check_positive_int("num_classes", num_classes)
        self.num_classes = int(num_classes)
        self.bn_1 = ops_lib.BatchNorm(affine=True, name="bn_1")
        self.bn_2 = ops_lib.BatchNorm(affine=True, name="bn_2")
        self.classifier = keras.layers.Dense(num_classes, name="classifier")

    def _geometry(self, input_shape):
        height, width = input_shape[1], input_shape[2]
        if height is None or width is None:
            raise ValueError(
                "Expected a static spatial size for the auxiliary head. "
                f"Received: input_shape={tuple(input_shape)}")
        pool = (min(5, height), min(5, width))
        pooled = ((height - pool[0]) // 3 + 1, (width - pool[1]) // 3 + 1)
        kernel = (min(2, pooled[0]), min(2, pooled[1]))
        return pool, kernel

    def build(self, input_shape):
        self.pool_size, kernel = self._geometry(input_shape)
        he = keras.initializers.HeNormal()
        self.kernel_1 = self.add_weight(
            shape=(1, 1, int(input_shape[-1]), 128), initializer=he,
            name="kernel_1")
        self.kernel_2 = self.add_weight(
            shape=kernel + (128, 768), initializer=he, name="kernel_2")
        self.bn_1.build((None, None, None, 128))
        self.bn_2.build((None, None, None, 768))
        self.classifier.build((None, 768))

    def call(self, inputs, training=False):
        x = tf.nn.relu(inputs)
        x = tf.nn.avg_pool2d(x, self.pool_size, 3, "VALID")
        x = tf.nn.conv2d(x, tf.cast(self.kernel_1, x.dtype), 1, "VALID")
        x = tf.nn.relu(self.bn_1(x, training=training))
        x = tf.nn.conv2d(x, tf.cast(self.kernel_2, x.dtype), 1, "VALID")
        x = tf.nn.relu(self.bn_2(x, training=training))
        return self.classifier(tf.reduce_mean(x, axis=[1, 2]))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DerivedNetwork(keras.Model):
    """The derived network retrained from scratch (DARTS ``NetworkCIFAR``).

    Pixels in [0, 1] are normalised inside the model, so attacks and
    exported models work in pixel space. ``call`` returns only the float32
    logits (what exports and attacks need); training uses `call_with_aux`,
    which also returns the auxiliary logits.

    The drop-path rate is the non-trainable variable ``drop_path_rate``,
    read by every call, so a trainer changes it with ``assign`` between
    epochs and compiled steps see the new value without retracing.

    Args:
        genotype: a `Genotype`, its dict, or a published name.
        channels: initial channels ``C`` (36 in the paper).
        num_classes: classifier outputs.
        layers: number of cells (20 in the paper), at least 3.
        auxiliary: add the auxiliary head after cell ``2 * layers // 3``.
        mean, std: per-channel input normalisation, pixel units.
        drop_path: initial value of ``drop_path_rate``, in [0, 1).

    Call arguments:
        inputs: ``[N, H, W, 3]`` images in [0, 1].
        training: batch statistics and drop-path if true.

    Example:

    >>> net = DerivedNetwork("DARTS_V2", channels=4, num_classes=10,
    ...                      layers=3)
    >>> net(tf.zeros([2, 16, 16, 3])).shape
    TensorShape([2, 10])

    Reference:
        Liu, Simonyan, Yang. DARTS. https://arxiv.org/abs/1806.09055
    """

    def __init__(self, genotype="DARTS_V2", channels=36, num_classes=10,
                 layers=20, auxiliary=False, mean=(0.0, 0.0, 0.0),
                 std=(1.0, 1.0, 1.0), drop_path=0.0, **kwargs):
        super().__init__(**kwargs)
        for name, value in (("channels", channels),
                            ("num_classes", num_classes), ("layers", layers)):
            ops_lib._check_positive_int(name, value)
        if layers < 3:
            raise ValueError(
                f"Expected `layers` >= 3. Received: layers={layers}")
        self.genotype = _as_genotype(genotype)
        self.channels = int(channels)
        self.num_classes = int(num_classes)
        self.num_layers = int(layers)
        self.auxiliary = bool(auxiliary)
        self.initial_drop_path = _check_rate(drop_path)
        self.normalize = ops_lib.Normalize(mean, std, name="normalize")
        c_curr = STEM_MULTIPLIER * self.channels
        self.stem_conv = keras.layers.Conv2D(
            c_curr, 3, padding="same", use_bias=False,
            kernel_initializer="he_normal", name="stem_conv")
        self.stem_bn = ops_lib.BatchNorm(affine=True, name="stem_bn")
        plan, _ = topology.cell_plan(
            self.channels, self.num_layers,
            multiplier=len(self.genotype.normal_concat),
            stem_multiplier=STEM_MULTIPLIER)
        self.cells = [DerivedCell(self.genotype, spec.channels, spec.reduction,
                                  spec.reduction_prev,
                                  name=f"cell_{spec.index}")
                      for spec in plan]
        self.aux_index = 2 * self.num_layers // 3
        self.auxiliary_head = (AuxiliaryHead(num_classes, name="auxiliary_head")
                               if self.auxiliary else None)
        self.classifier = keras.layers.Dense(num_classes, name="classifier")
        # float32 whatever the policy; not trainable, but saved with the
        # model and in checkpoints so that a resumed run keeps its value.
        self.drop_path_rate = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(
                self.initial_drop_path),
            name="drop_path_rate", trainable=False, dtype="float32",
            autocast=False)

    def build(self, input_shape):
        shape = self.normalize.compute_output_shape(input_shape)
        self.stem_conv.build(shape)
        shape = self.stem_conv.compute_output_shape(shape)
        self.stem_bn.build(shape)
        s0 = s1 = shape
        for i, cell in enumerate(self.cells):
            cell.build(s0, s1)
            s0, s1 = s1, cell.compute_output_shape(s0, s1)
            if i == self.aux_index and self.auxiliary_head is not None:
                self.auxiliary_head.build(s1)
        self.classifier.build((input_shape[0], s1[-1]))
        self.built = True

    def _forward(self, inputs, training, with_aux, drop_seed=None):
        x = self.normalize(inputs)
        s0 = s1 = self.stem_bn(self.stem_conv(x), training=training)
        rate = self.drop_path_rate.value
        aux_logits = None
        for i, cell in enumerate(self.cells):
            cell_seed = None if drop_seed is None else \
                tf.random.experimental.stateless_fold_in(drop_seed, i)
            s0, s1 = s1, cell(s0, s1, rate, training=training, seed=cell_seed)
            if (with_aux and training and i == self.aux_index
                    and self.auxiliary_head is not None):
                aux_logits = tf.cast(
                    self.auxiliary_head(s1, training=training), tf.float32)
        logits = self.classifier(tf.reduce_mean(s1, axis=[1, 2]))
        return tf.cast(logits, tf.float32), aux_logits

    def call(self, inputs, training=False):
        return self._forward(inputs, training, with_aux=False)[0]

    def call_with_aux(self, inputs, training=True, drop_seed=None):
        """Logits and auxiliary logits, for the training loss.

        Args:
            inputs: ``[N, H, W, 3]`` images in [0, 1].
            training: batch statistics and drop-path if true.
            drop_seed: ``[2]`` int seed of the drop-path masks (stateless,
                so a resumed run draws the same masks); None draws them
                from TF's global generator.

        Returns:
            ``(logits, aux_logits)``, float32 ``[N, num_classes]`` each;
            ``aux_logits`` is None without an auxiliary head or when not
            training.
        """
        if not self.built:
            self.build(tuple(inputs.shape))
        return self._forward(inputs, training, with_aux=True,
                             drop_seed=drop_seed)

    def set_drop_path_rate(self, rate):
        """Assigns the drop-path rate read by every later call."""
        self.drop_path_rate.assign(_check_rate(rate, "rate"))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        return {
            "name": self.name,
            "genotype": self.genotype.to_dict(),
            "channels": self.channels,
            "num_classes": self.num_classes,
            "layers": self.num_layers,
            "auxiliary": self.auxiliary,
            "mean": list(self.normalize.mean),
            "std": list(self.normalize.std),
            "drop_path": self.initial_drop_path,
        }
