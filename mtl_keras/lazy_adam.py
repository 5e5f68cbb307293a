"""LazyAdam: Adam that updates only the rows a sparse gradient names.

A many-task model's heads are stacked variables (`TaskHeads`) whose
gradient in a step is a `tf.IndexedSlices` over the rows of the tasks in
the batch. Keras' Adam turns it into a dense gradient and updates every row,
so each step pays for every head, also the heads no example of the batch
used. `LazyAdam` updates a sparse gradient's rows only: their moments and
weights change exactly as Adam's would (the same arithmetic, in the same
order), and the other rows keep weights *and* moments as they are until a
batch uses them again. That is the "lazy" semantics of TensorFlow Addons'
and Keras 2's `LazyAdam`: not the same trajectory as Adam, whose moments
decay, and whose weights go on moving with the momentum, on every step.
Dense gradients (the trunk; the heads too when a kernel regularizer, which
reads every row, adds its gradient to theirs) get Adam's own update.

Duplicate rows (the gradients of several replicas under `tf.distribute`,
say) are summed first (`sparse_rows.sum_duplicate_rows`, which also
compiles under XLA).

Example:

>>> model.compile(optimizer=LazyAdam(1e-3))
"""

import keras
import tensorflow as tf
from keras import ops

from mtl_keras.sparse_rows import sum_duplicate_rows


@keras.saving.register_keras_serializable(package="mtl_keras")
class LazyAdam(keras.optimizers.Adam):
    """Adam whose sparse gradients update only the rows they name (see the module docstring).

    Takes `keras.optimizers.Adam`'s arguments; `amsgrad` is not offered
    (its running maximum has no lazy form here).

    Args:
        learning_rate, beta_1, beta_2, epsilon: as `keras.optimizers.Adam`.
        **kwargs: other `keras.optimizers.Optimizer` arguments (weight
            decay, clipping, EMA, ...), applied as Adam applies them.

    Example:

    >>> optimizer = LazyAdam(learning_rate=1e-3)
    >>> model.compile(optimizer=optimizer)
    """

    # Tells MultiTaskModel to hand over the heads' gradients as row slices
    # (other optimizers get them dense, converted once).
    sparse_updates = True

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, name="lazy_adam", **kwargs):
        if kwargs.pop("amsgrad", False):
            raise ValueError("LazyAdam does not offer amsgrad=True; use keras.optimizers.Adam(amsgrad=True).")
        super().__init__(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                         amsgrad=False, name=name, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        # As Adam.update_step, restricted to the gradient's rows.
        lr = ops.cast(learning_rate, dtype)
        local_step = ops.cast(self.iterations + 1, dtype)
        beta_1_power = ops.power(ops.cast(self.beta_1, dtype), local_step)
        beta_2_power = ops.power(ops.cast(self.beta_2, dtype), local_step)
        alpha = lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]

        rows, g, valid = sum_duplicate_rows(gradient)
        g = ops.cast(g, dtype)
        m_rows, v_rows = tf.gather(m.value, rows), tf.gather(v.value, rows)
        dm = ops.multiply(ops.subtract(g, m_rows), 1 - self.beta_1)
        dv = ops.multiply(ops.subtract(ops.square(g), v_rows), 1 - self.beta_2)
        m_rows, v_rows = m_rows + dm, v_rows + dv
        step = ops.divide(ops.multiply(m_rows, alpha), ops.add(ops.sqrt(v_rows), self.epsilon))
        if valid is not None:
            # XLA's padding slices (row 0) must add nothing, however often row 0 recurs.
            keep = ops.reshape(valid, (-1,) + (1,) * (len(variable.shape) - 1))
            dm, dv, step = (ops.where(keep, x, ops.zeros((), dtype)) for x in (dm, dv, step))
        self.assign_add(m, tf.IndexedSlices(dm, rows))
        self.assign_add(v, tf.IndexedSlices(dv, rows))
        self.assign_sub(variable, tf.IndexedSlices(step, rows))

    def get_config(self):
        config = super().get_config()
        config.pop("amsgrad", None)
        return config
