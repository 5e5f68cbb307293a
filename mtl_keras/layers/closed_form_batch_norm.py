"""Batch normalisation whose training-mode gradient is computed in closed form, by fused ops.

Keras' `BatchNormalization` lets autodiff differentiate through the batch
mean and variance: on the TensorFlow backend that backward pass broadcasts
(`Tile`) and multiplies the full activation tensor several times. The
gradient of batch normalisation has a known closed form (Ioffe & Szegedy,
2015, section 3)::

    xhat = (x - mean) / sqrt(var + eps)
    dbeta = sum(dy),  dgamma = sum(dy * xhat)
    dx = gamma / sqrt(var + eps) * (dy - dbeta / n - xhat * dgamma / n)

which needs two reductions and a few elementwise passes. TensorFlow's
`FusedBatchNormV3` op and its gradient compute exactly this in one kernel
each. On the trunk's first block (128 x 32 x 32 x 32 activations), batch
norm is the largest memory-bound part of a training step on CPU
(docs/BENCHMARKS.md).
"""

import keras
import tensorflow as tf

from mtl_keras.sparse_rows import in_xla


def batch_norm_training(x, gamma, beta, epsilon):
    """Normalises `x` over all axes but the last with its own batch statistics.

    Outside XLA: one `FusedBatchNormV3` op in training mode, whose
    registered gradient (`FusedBatchNormGradV3`) is the closed form above;
    with TensorFlow's oneDNN kernels on, both run as oneDNN's batch
    normalisation, fewer passes over the activations than separate ops.
    Under XLA, whose lowering of that op computes the variance in one pass
    (E[x^2] - E[x]^2, which loses precision on off-centre activations),
    the closed form in separate ops, which XLA fuses itself.

    Args:
        x: `[..., C]` float tensor, of rank 2 or more (the fused op runs
            on float32; other types take the separate ops).
        gamma: `[C]` scale.
        beta: `[C]` offset.
        epsilon: added to the variance.

    Returns:
        `(y, mean, variance)`: the output, and the batch statistics (the
        biased variance, as Keras' layer uses; for the moving averages, so
        no gradient flows through them: `y`'s gradient already accounts for
        them).
    """
    if in_xla() or x.dtype != tf.float32:  # the fused op takes no float64
        return _separate_ops_batch_norm_training(x, gamma, beta, epsilon)
    shape = tf.shape(x)
    channels = x.shape[-1]
    # The fused op wants NHWC; every axis but the last is a batch axis here.
    x4 = x if len(x.shape) == 4 else tf.reshape(x, [-1, 1, 1, channels])
    y, mean, unbiased_variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=x4, scale=gamma, offset=beta, mean=tf.zeros([0], x.dtype), variance=tf.zeros([0], x.dtype),
        epsilon=epsilon, exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
    if len(x.shape) != 4:
        y = tf.reshape(y, shape)
    # The op returns the unbiased variance (n / (n - 1) times the biased one).
    n = tf.cast(tf.size(x) // channels, x.dtype)
    variance = tf.where(n > 1, unbiased_variance * ((n - 1) / tf.maximum(n, 1)), tf.zeros_like(unbiased_variance))
    return y, tf.stop_gradient(mean), tf.stop_gradient(variance)


def _separate_ops_batch_norm_training(x, gamma, beta, epsilon):
    """`batch_norm_training` in separate ops: a two-pass variance and a custom gradient."""
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
