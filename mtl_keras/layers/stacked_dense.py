"""One head's Dense layer whose weights are rows of `TaskHeads`' stacked variables.

`TaskHeads` keeps the weights of all heads in a few stacked variables (one
row block per head), so that a training step reads and updates only the
rows of the heads its batch uses. Each `TaskHead` still presents its own
layers: `Dense` here is such a layer, a *view* of its rows. It owns no
variable; `kernel` and `bias` read (and `assign` writes) its rows, and it
saves and loads them under its own path in a `.keras` file. Files therefore
keep the layout they had when every head owned its own `keras.layers.Dense`
(`heads/task_head_<i>/estimator_layers/dense/vars/{0,1}`,
`heads/task_head_<i>/output_layer/vars/{0,1}`): Keras names a layer in a
list by its class, which is why this class is called `Dense`.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import ops


class RowBlock:
    """Rows `start:stop` of a stacked variable, seen as one layer's weight.

    The weight is `variable[start:stop]` reshaped to `shape` (and
    transposed when `transpose`, for output kernels stored one row per
    output unit). `value` reads it, `assign` writes it with a row scatter,
    so that writing one head does not copy the others.

    Args:
        variable: the stacked `keras.Variable`.
        start, stop: the rows.
        shape: the weight's shape as its layer sees it.
        transpose: the rows hold the weight transposed (`[units, in]` for an
            `[in, units]` kernel).
    """

    def __init__(self, variable, start, stop, shape, transpose=False):
        self.variable = variable
        self.start, self.stop = int(start), int(stop)
        self.shape = tuple(int(d) for d in shape)
        self.transpose = transpose
        self.dtype = variable.dtype

    @property
    def value(self):
        rows = self.variable.value[self.start:self.stop]
        if self.transpose:
            return ops.transpose(rows)
        return ops.reshape(rows, self.shape)

    def numpy(self):
        return np.asarray(self.value)

    def __array__(self, dtype=None, copy=None):
        return self.numpy() if dtype is None else self.numpy().astype(dtype)

    def assign(self, value):
        value = ops.convert_to_tensor(value, self.dtype)
        if tuple(value.shape) != self.shape:
            raise ValueError(f"Cannot assign a value of shape {tuple(value.shape)} to a weight of shape {self.shape}.")
        if self.transpose:
            value = ops.transpose(value)
        rows = ops.reshape(value, (self.stop - self.start,) + tuple(self.variable.shape[1:]))
        self.variable.value.scatter_update(tf.IndexedSlices(rows, tf.range(self.start, self.stop)))


class Dense(keras.layers.Layer):
    """A head's dense layer, `x @ kernel + bias`, on rows of stacked variables.

    Built by `TaskHead` when it belongs to a `TaskHeads`; not meant to be
    made by hand. Like the `keras.layers.Dense` it stands in for, it has no
    activation of its own: `TaskHead.estimate` applies the head's.

    Args:
        kernel: `RowBlock` of the kernel, `[in, units]` as the layer sees it.
        bias: `RowBlock` of the bias, `[units]`.
        **kwargs: standard `keras.layers.Layer` arguments.
    """

    def __init__(self, kernel, bias, **kwargs):
        super().__init__(**kwargs)
        self.kernel = kernel
        self.bias = bias
        self.units = kernel.shape[1]
        self.built = True

    def weights_as_blocks(self):
        """`[kernel, bias]`, the `RowBlock`s of this layer's weights (it owns no variable)."""
        return [self.kernel, self.bias]

    def call(self, inputs):
        return ops.matmul(ops.cast(inputs, self.kernel.dtype), self.kernel.value) + self.bias.value

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def save_own_variables(self, store):
        # As keras.layers.Dense saves its own: 0 the kernel, 1 the bias.
        store["0"] = self.kernel.numpy()
        store["1"] = self.bias.numpy()

    def load_own_variables(self, store):
        if len(store.keys()) != 2:
            raise ValueError(
                f"Layer {self.name!r} expects 2 saved weights (kernel, bias), the file has {len(store.keys())}."
            )
        self.kernel.assign(np.asarray(store["0"]))
        self.bias.assign(np.asarray(store["1"]))
