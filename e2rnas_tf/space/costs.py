"""Counting the cost of a network: parameters and multiply-adds.

Multiply-adds ("FLOPs" in the NAS literature, following DARTS and its
successors) are counted from a traced TensorFlow graph and the static shapes
of its nodes, so the count follows whatever the code actually computes
rather than a second, hand-written description of the model. Only the
operations that dominate the cost and that the literature counts are
included: convolutions (regular and depthwise) and matrix products (the
linear classifier). Batch norm, activations, pooling, additions and
concatenations are not counted, which is the convention behind published
figures such as "DARTS: 3.3M parameters, ~530M multiply-adds" on CIFAR-10.

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

__all__ = ["count_macs", "count_params", "graph_macs"]

_CONV_OPS = ("Conv2D", "_FusedConv2D")
_DEPTHWISE_OPS = ("DepthwiseConv2dNative", "_FusedDepthwiseConv2dNative")
_MATMUL_OPS = ("MatMul", "_MatMul", "_FusedMatMul")
_BATCH_MATMUL_OPS = ("BatchMatMul", "BatchMatMulV2", "BatchMatMulV3")


def _static_shape(tensor, op):
    shape = tensor.shape
    if shape.rank is None or None in shape.as_list():
        raise ValueError(
            "Expected fully static shapes to count multiply-adds. "
            f"Received: {op.type} node {op.name!r} with shape {shape}")
    return shape.as_list()


def _einsum_macs(op):
    equation = op.get_attr("equation").decode()
    if "..." in equation or len(op.inputs) != 2:
        raise ValueError(
            "Expected a two-operand einsum without an ellipsis. "
            f"Received: equation={equation!r} in node {op.name!r}")
    inputs, _ = equation.replace(" ", "").split("->")
    sizes = {}
    for letters, tensor in zip(inputs.split(","), op.inputs):
        for letter, size in zip(letters, _static_shape(tensor, op)):
            sizes[letter] = size
    # Every index of a two-operand product is iterated over once.
    return int(np.prod([sizes[k] for k in sorted(sizes)], dtype=np.int64))


def _conv_positions(op):
    """Output positions ``N * H * W`` of a convolution node.

    TensorFlow runs some dilated convolutions as SpaceToBatchND, an
    undilated convolution and BatchToSpaceND; the inner convolution then
    also computes positions that only exist in the padding added to make
    the size a multiple of the dilation, and that BatchToSpaceND crops.
    Counting the cropped output's positions counts what the dilated
    convolution means, whatever TensorFlow's implementation of it.
    """
    shape = _static_shape(op.outputs[0], op)
    consumers = op.outputs[0].consumers()
    if len(consumers) == 1 and consumers[0].type == "BatchToSpaceND":
        shape = _static_shape(consumers[0].outputs[0], consumers[0])
    return shape[0] * shape[1] * shape[2]


def _node_macs(op):
    """Multiply-adds of one graph node (0 for nodes that are not counted)."""
    if op.type in _CONV_OPS:
        kh, kw, c_in, c_out = _static_shape(op.inputs[1], op)
        return _conv_positions(op) * kh * kw * c_in * c_out
    if op.type in _DEPTHWISE_OPS:
        kh, kw, c_in, mult = _static_shape(op.inputs[1], op)
        return _conv_positions(op) * kh * kw * c_in * mult
    if op.type in _MATMUL_OPS:
        a = _static_shape(op.inputs[0], op)
        m, n = _static_shape(op.outputs[0], op)
        k = a[0] if op.get_attr("transpose_a") else a[1]
        return m * k * n
    if op.type in _BATCH_MATMUL_OPS:
        a = _static_shape(op.inputs[0], op)
        out = _static_shape(op.outputs[0], op)
        adjoint = op.get_attr("adj_x")
        k = a[-2] if adjoint else a[-1]
        return int(np.prod(out, dtype=np.int64)) * k
    if op.type == "Einsum":
        return _einsum_macs(op)
    return 0


def graph_macs(graph):
    """Sums the multiply-adds of the counted nodes of a `tf.Graph`.

    Args:
        graph: a `tf.Graph` (e.g. a concrete function's ``.graph``) whose
            counted nodes have static shapes.

    Returns:
        An int: conv / depthwise conv / matmul / einsum multiply-adds.

    Raises:
        ValueError: a counted node has a dynamic shape, or the graph calls a
            nested function or a loop, whose cost cannot be read off its
            static shapes.
    """
    total = 0
    for op in graph.get_operations():
        if op.type in ("PartitionedCall", "StatefulPartitionedCall", "While",
                       "StatelessWhile"):
            raise ValueError(
                "Expected a flat graph to count multiply-adds. Received: "
                f"{op.type} node {op.name!r}; call layers directly, not "
                "through nested tf.functions or loops.")
        total += _node_macs(op)
    return int(total)


def count_macs(fn, input_shape, dtype=tf.float32):
    """Multiply-adds of one call of ``fn`` on a single example.

    ``fn`` is traced once into a graph on a batch of one; convolutions,
    depthwise convolutions and matrix products are counted from their
    static shapes:

    - convolution: ``H_out * W_out * kh * kw * C_in * C_out``;
    - depthwise convolution: ``H_out * W_out * kh * kw * C_in * multiplier``
      (dilation does not change the count);
    - matrix product: ``M * K * N`` (batched: times the batch size).

    Batch norm, activations, pooling, additions and concatenations are
    ignored, which is the convention of the NAS literature (DARTS and
    successors report conv + linear multiply-adds). Multiply-adds of padded
    positions of a ``SAME`` convolution are included, as everyone does.

    Args:
        fn: a Keras layer or model, or a callable mapping one
            ``[N, H, W, C]`` tensor to outputs. Keras layers are called in
            inference mode (their default), which has the same
            convolutions as training.
        input_shape: the shape of one example, without the batch axis,
            e.g. ``(32, 32, 3)``.
        dtype: the input dtype.

    Returns:
        An int, the multiply-adds for one example.

    Example:

    >>> conv = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)
    >>> count_macs(conv, (8, 8, 3))  # 8 * 8 * 3 * 3 * 3 * 16
    27648
    """
    input_shape = tuple(int(d) for d in input_shape)
    if not input_shape or min(input_shape) < 1:
        raise ValueError(
            "Expected a non-empty shape of positive sizes (without batch). "
            f"Received: input_shape={input_shape}")
    full_shape = (1,) + input_shape
    if isinstance(fn, keras.layers.Layer) and not fn.built:
        # Variables are created eagerly, before tracing, so the traced graph
        # holds only the computation.
        fn.build(full_shape)
    traced = tf.function(fn, autograph=False).get_concrete_function(
        tf.TensorSpec(full_shape, dtype))
    return graph_macs(traced.graph)


def count_params(layer_or_variables):
    """Number of learned parameters (scalars) of a layer or variable list.

    For a Keras layer this counts its trainable weights only, so batch
    norm moving statistics are excluded, as PyTorch's ``parameters()`` (and
    so every published parameter count) excludes buffers; a training-only
    auxiliary head (a layer's ``auxiliary_head``, as `model.DerivedNetwork`
    has) is left out, as published counts do. A list of variables is
    counted as given.

    Args:
        layer_or_variables: a built Keras layer/model, or an iterable of
            variables or arrays.

    Returns:
        An int.

    Example:

    >>> dense = keras.layers.Dense(10)
    >>> dense.build((None, 4))
    >>> count_params(dense)
    50
    """
    if isinstance(layer_or_variables, keras.layers.Layer):
        layer = layer_or_variables
        if not layer.built:
            raise ValueError(
                "Expected a built layer to count its parameters. Received: "
                f"unbuilt layer {layer.name!r}")
        aux = getattr(layer, "auxiliary_head", None)
        skip = {id(v) for v in aux.trainable_weights} if aux else set()
        variables = [v for v in layer.trainable_weights if id(v) not in skip]
    else:
        variables = list(layer_or_variables)
    return int(sum(int(np.prod(v.shape, dtype=np.int64)) for v in variables))


def count_inference_macs(model, image_size):
    """Multiply-adds of one inference forward pass of one square image
    (``model(x, training=False)``: an auxiliary head does not run).

    Raises:
        ValueError: the graph holds an op this module cannot count.
    """
    def forward(images):
        return model(images, training=False)

    return int(count_macs(forward, (image_size, image_size, 3)))
