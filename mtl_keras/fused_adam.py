"""FusedAdam: Keras' Adam whose dense updates run as one TensorFlow op per variable.

Keras' `Adam.update_step` builds each variable's update from about ten
separate ops (two `assign_add`s, an `assign_sub` and the arithmetic between
them), each a pass over the variable and its moments. TensorFlow's
`ResourceApplyAdam` kernel computes the same update in one pass::

    m <- m + (g - m) * (1 - beta_1)
    v <- v + (g^2 - v) * (1 - beta_2)
    w <- w - lr * sqrt(1 - beta_2^t) / (1 - beta_1^t) * m / (sqrt(v) + epsilon)

which is Keras' arithmetic (epsilon outside the square root, the bias
corrections folded into the step size), equal to float rounding. On the
routed T = 50 benchmark step, whose stacked heads make the optimizer's update
a few megabytes per step, the step was 1-7% faster (median 4%) in seven
same-process A/B runs (docs/BENCHMARKS.md, issue 10's sixth round).

Sparse gradients (`tf.IndexedSlices`), `amsgrad`, variables that are not
float32 or float64, and backends other than TensorFlow take Keras' own
update, so the optimizer behaves as `keras.optimizers.Adam` everywhere.
Weight decay, clipping, EMA and loss scaling are the base optimizer's and
apply as they do for Adam.

Example:

>>> model.compile(optimizer=FusedAdam(1e-3))
"""

import keras
import tensorflow as tf

_FUSED_DTYPES = ("float32", "float64")


def _handle(variable):
    """The resource handle of a Keras or TensorFlow variable (the local one inside a strategy's update)."""
    return (variable.value if isinstance(variable, keras.Variable) else variable).handle


@keras.saving.register_keras_serializable(package="mtl_keras")
class FusedAdam(keras.optimizers.Adam):
    """`keras.optimizers.Adam` with each dense update fused into one op (see the module docstring).

    Takes `keras.optimizers.Adam`'s arguments and has Adam's variables, in
    Adam's order and with Adam's names.

    Args:
        learning_rate, beta_1, beta_2, epsilon, amsgrad: as `keras.optimizers.Adam`.
        **kwargs: other `keras.optimizers.Optimizer` arguments (weight
            decay, clipping, EMA, ...), applied as Adam applies them.

    Example:

    >>> optimizer = FusedAdam(learning_rate=1e-3)
    >>> model.compile(optimizer=optimizer)
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False, name="adam",
                 **kwargs):
        # Adam's name, so that the optimizer's variables have Adam's paths.
        super().__init__(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                         amsgrad=amsgrad, name=name, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        if (isinstance(gradient, tf.IndexedSlices) or self.amsgrad or dtype not in _FUSED_DTYPES
                or keras.backend.backend() != "tensorflow"):
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        local_step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable), m=_handle(self._momentums[index]), v=_handle(self._velocities[index]),
            beta1_power=tf.pow(beta_1, local_step), beta2_power=tf.pow(beta_2, local_step),
            lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2, epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype), use_locking=False)
