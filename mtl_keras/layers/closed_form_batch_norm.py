"""Batch normalisation whose training-mode gradient is computed in closed form.

Keras' `BatchNormalization` lets autodiff differentiate through the batch
mean and variance: on the TensorFlow backend that backward pass broadcasts
(`Tile`) and multiplies the full activation tensor several times. The
gradient of batch normalisation has a known closed form (Ioffe & Szegedy,
2015, section 3)::

    xhat = (x - mean) / sqrt(var + eps)
    dbeta = sum(dy),  dgamma = sum(dy * xhat)
    dx = gamma / sqrt(var + eps) * (dy - dbeta / n - xhat * dgamma / n)

which needs two reductions and a few elementwise passes. On the trunk's
first block (128 x 32 x 32 x 32 activations), that is the largest
memory-bound part of a training step on CPU (docs/BENCHMARKS.md).
"""

import keras
import tensorflow as tf


def batch_norm_training(x, gamma, beta, epsilon):
    """Normalises `x` over all axes but the last with its own batch statistics.

    Args:
        x: `[..., C]` float tensor.
        gamma: `[C]` scale.
        beta: `[C]` offset.
        epsilon: added to the variance.

    Returns:
        `(y, mean, variance)`: the output, and the batch statistics (for
        the moving averages; no gradient flows through them, since `y`'s
        gradient already accounts for them).
    """
    axes = list(range(len(x.shape) - 1))
    mean = tf.reduce_mean(x, axis=axes)
    variance = tf.reduce_mean(tf.math.squared_difference(x, mean), axis=axes)

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        inv = tf.math.rsqrt(variance + epsilon)
        scale = gamma * inv
        y = x * scale + (beta - mean * scale)

        def grad(dy):
            n = tf.cast(tf.size(x) // tf.shape(x)[-1], x.dtype)
            centered = x - mean
            dbeta = tf.reduce_sum(dy, axis=axes)
            dgamma = tf.reduce_sum(dy * centered, axis=axes) * inv
            dx = (dy - dbeta / n - centered * (dgamma * inv / n)) * scale
            return dx, dgamma, dbeta

        return y, grad

    return normalize(x, gamma, beta), tf.stop_gradient(mean), tf.stop_gradient(variance)


@keras.saving.register_keras_serializable(package="mtl_keras")
class ClosedFormBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` with a closed-form training gradient.

    Takes `BatchNormalization`'s arguments and has its weights (a `.keras`
    file's `BatchNormalization` weights load into it unchanged). In
    training mode, for the common case (normalising the last axis, with
    scale and offset, no mask, renormalisation or cross-replica
    synchronisation), it computes the same outputs and moving statistics
    and, to float rounding, the same gradients as its parent in fewer
    passes over the activations (see the module docstring and
    `tests/test_layers.py`); every other case is the parent's own code.
    Needs the TensorFlow backend.

    Example:

    >>> bn = ClosedFormBatchNormalization(momentum=0.99)
    >>> bn(np.ones((4, 8, 8, 16), "float32"), training=True).shape
    TensorShape([4, 8, 8, 16])
    """

    def _closed_form_applies(self, inputs, training, mask):
        return (
            training and self.trainable and mask is None and not self.renorm and not self.synchronized
            and self.scale and self.center and self.axis in (-1, len(inputs.shape) - 1)
        )

    def call(self, inputs, training=None, mask=None):
        if not self._closed_form_applies(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        # Like the parent: statistics in float32 even under a 16-bit policy.
        x = tf.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        y, mean, variance = batch_norm_training(
            x, tf.cast(self.gamma, x.dtype), tf.cast(self.beta, x.dtype), self.epsilon)
        self.moving_mean.assign(
            tf.cast(self.moving_mean, x.dtype) * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            tf.cast(self.moving_variance, x.dtype) * self.momentum + variance * (1.0 - self.momentum))
        return tf.cast(y, self.compute_dtype)
