"""SameConv2D: Conv2D's outputs and gradients (input and kernel), its config, and the settings it refuses."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mtl_keras.layers import SameConv2D
from mtl_keras.layers.same_conv import FILTER_GRADIENT_AS_CONV_MAX_PIXELS, kernel_gradient


def twins(filters, kernel_size, in_channels, **kwargs):
    """A Conv2D and a SameConv2D with the same weights."""
    reference = keras.layers.Conv2D(filters, kernel_size, padding="same", **kwargs)
    fast = SameConv2D(filters, kernel_size, **kwargs)
    shape = (None, 6, 7, in_channels)
    reference.build(shape)
    fast.build(shape)
    fast.set_weights(reference.get_weights())
    return reference, fast


@pytest.mark.parametrize("kernel_size, in_channels, filters, use_bias", [
    (3, 1, 4, False), (3, 5, 3, True), ((1, 5), 3, 2, True), (5, 2, 6, False),
])
def test_outputs_and_both_gradients_are_conv2ds(kernel_size, in_channels, filters, use_bias):
    reference, fast = twins(filters, kernel_size, in_channels, use_bias=use_bias)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(3, 6, 7, in_channels)).astype("float32"))
    upstream = tf.constant(rng.normal(size=(3, 6, 7, filters)).astype("float32"))

    def outputs_and_gradients(layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * upstream)
        return [y, *tape.gradient(loss, [x, *layer.trainable_variables])]

    for a, b in zip(outputs_and_gradients(reference), outputs_and_gradients(fast), strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("height, width, kernel_shape", [
    (8, 8, (3, 3, 5, 7)),      # at the limit: a forward convolution
    (4, 2, (5, 3, 3, 2)),      # a kernel larger than the map
    (1, 6, (1, 5, 2, 4)),
    (9, 8, (3, 3, 2, 3)),      # past the limit: Conv2DBackpropFilter
])
@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_kernel_gradient_equals_conv2d_backprop_filter(height, width, kernel_shape, mode):
    rng = np.random.default_rng(height * width)
    x = tf.constant(rng.normal(size=(6, height, width, kernel_shape[2])).astype("float32"))
    dy = tf.constant(rng.normal(size=(6, height, width, kernel_shape[3])).astype("float32"))
    as_conv = height * width <= FILTER_GRADIENT_AS_CONV_MAX_PIXELS
    fn = {"eager": kernel_gradient, "graph": tf.function(kernel_gradient),
          "xla": tf.function(kernel_gradient, jit_compile=True)}[mode]
    graph = tf.function(kernel_gradient).get_concrete_function(x, dy, kernel_shape).graph
    assert any(op.type == "Conv2DBackpropFilter" for op in graph.get_operations()) == (not as_conv)
    expected = tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=list(kernel_shape), out_backprop=dy,
                                               strides=[1, 1, 1, 1], padding="SAME")
    got = fn(x, dy, kernel_shape)
    assert got.shape == kernel_shape
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_it_traces_in_a_compiled_step_and_under_mixed_precision():
    reference, fast = twins(4, 3, 2)
    x = np.random.default_rng(1).normal(size=(2, 6, 7, 2)).astype("float32")

    @tf.function(jit_compile=True)
    def input_gradient(layer):
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            loss = tf.reduce_sum(tf.square(layer(xt)))
        return tape.gradient(loss, xt)

    np.testing.assert_allclose(input_gradient(fast).numpy(), input_gradient(reference).numpy(), rtol=1e-4, atol=1e-4)
    half = SameConv2D(4, 3, dtype="mixed_bfloat16")
    assert half(x).dtype == tf.bfloat16 and half.kernel.dtype == "float32"


def test_config_round_trip_and_conv2d_weights_load():
    _, fast = twins(4, 3, 2, use_bias=False, name="conv")
    clone = SameConv2D.from_config(fast.get_config())
    assert clone.get_config() == fast.get_config()
    inputs = keras.Input((6, 7, 2))
    model = keras.Model(inputs, fast(inputs))
    restored = keras.models.clone_model(model)
    assert isinstance(restored.layers[-1], SameConv2D)
    x = np.ones((1, 6, 7, 2), "float32")
    restored.set_weights(model.get_weights())
    np.testing.assert_allclose(restored(x).numpy(), model(x).numpy(), rtol=1e-6)


@pytest.mark.parametrize("kwargs, problem", [
    ({"strides": 2}, "strides (2, 2) (must be 1)"),
    ({"dilation_rate": 2}, "dilation_rate (2, 2) (must be 1)"),
    ({"padding": "valid"}, "padding 'valid' (must be 'same')"),
    ({"kernel_size": 2}, "kernel_size (2, 2) (must be odd"),
    ({"data_format": "channels_first"}, "data_format 'channels_first'"),
])
def test_settings_it_cannot_compute_are_refused_by_name(kwargs, problem):
    kwargs = {"kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match="SameConv2D 'c' cannot take .*Use keras.layers.Conv2D") as error:
        SameConv2D(4, name="c", **kwargs)
    assert problem in str(error.value)
