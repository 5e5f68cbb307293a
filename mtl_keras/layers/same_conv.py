"""SameConv2D: a stride-1 "same" Conv2D whose gradients are forward convolutions.

TensorFlow's CPU kernel for a convolution's input gradient
(`Conv2DBackpropInput`) is far slower than the forward kernel on small
feature maps: on the 2-core AVX2 machine of docs/BENCHMARKS.md, 79 ms
against 15 ms for the forward pass at the trunk's last block (batch 128,
4x4 maps, 128 -> 256 channels), which made that block's backward pass the
largest single cost of a training step. For a stride-1 convolution with an
odd kernel and "same" padding, the input gradient *is* a forward
convolution of the output gradient with the kernel flipped in space and
its channel axes swapped, which runs on the fast kernel. The result is the
same gradient up to float rounding.

The kernel's gradient is a forward convolution too, on small feature maps.
Summed over the batch, `dkernel[i, j, c, o] = sum x_padded[n, y+i, x+j, c]
* dy[n, y, x, o]`: a convolution of the input, its channels taken as the
batch and its batch as the channels (`[C, H, W, N]`, padded as the layer
pads), with the output gradient as an `[H, W, N, O]` filter. On maps of at
most `FILTER_GRADIENT_AS_CONV_MAX_PIXELS` pixels, timed op by op on the
machine of docs/BENCHMARKS.md: 1.3-1.9x faster than TensorFlow's
`Conv2DBackpropFilter` with oneDNN's kernels (8x8 to 2x2 maps, 64 to 256
channels), about even with Eigen's (0.8-1.5x), and within half a
millisecond either way on layers of a few channels; a whole routed T = 50
training step is 7-10% faster with oneDNN, 1% with Eigen. On 16x16 maps
and larger `Conv2DBackpropFilter` is as fast or faster (also when the maps
are cut into 8x8 tiles), and it is kept there, under XLA, and for maps of
unknown size.
"""

import keras
import tensorflow as tf

from mtl_keras.sparse_rows import in_xla

# Largest H * W for which the kernel's gradient is computed as a forward convolution.
FILTER_GRADIENT_AS_CONV_MAX_PIXELS = 64


def kernel_gradient(x, dy, kernel_shape):
    """The gradient of a stride-1 "same" convolution's kernel: `[kh, kw, C, O]` from `x` and `dy`.

    Args:
        x: the convolution's input, `[N, H, W, C]`.
        dy: the gradient of its output, `[N, H, W, O]`.
        kernel_shape: `(kh, kw, C, O)`, odd `kh` and `kw`.

    Returns:
        `sum over n, y, x of x_padded[n, y+i, x+j, c] * dy[n, y, x, o]`,
        as `Conv2DBackpropFilter` computes it.
    """
    height, width = x.shape[1], x.shape[2]
    if height is None or width is None or height * width > FILTER_GRADIENT_AS_CONV_MAX_PIXELS or in_xla():
        return tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=[int(d) for d in kernel_shape], out_backprop=dy, strides=[1, 1, 1, 1], padding="SAME")
    pad_h, pad_w = kernel_shape[0] // 2, kernel_shape[1] // 2
    # Channels as the batch, the batch as channels: the sum over examples is the convolution's own sum.
    images = tf.transpose(x, (3, 1, 2, 0))
    filters = tf.transpose(dy, (1, 2, 0, 3))
    padding = [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]]
    return tf.transpose(tf.nn.conv2d(images, filters, strides=1, padding=padding), (1, 2, 0, 3))


def _conv_same(x, kernel):
    @tf.custom_gradient
    def conv(x, kernel):
        y = tf.nn.conv2d(x, kernel, strides=1, padding="SAME")

        def grad(dy):
            flipped = tf.reverse(tf.transpose(kernel, (0, 1, 3, 2)), axis=(0, 1))
            dx = tf.nn.conv2d(dy, flipped, strides=1, padding="SAME")
            return dx, kernel_gradient(x, dy, kernel.shape)

        return y, grad

    # A tensor, not the variable: the gradient reaches the variable through
    # the read, and custom_gradient then needs no variables of its own.
    return conv(tf.convert_to_tensor(x), tf.identity(kernel))


@keras.saving.register_keras_serializable(package="mtl_keras")
class SameConv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` (stride 1, "same" padding, odd kernel) with a faster backward pass.

    Takes `Conv2D`'s arguments, has its weights (a `.keras` file's
    `Conv2D` weights load into it unchanged) and computes the same outputs;
    only the gradients are computed differently (see the module
    docstring). Needs the TensorFlow backend.

    Args:
        filters: output channels.
        kernel_size: an odd int, or a pair of odd ints.
        **kwargs: other `Conv2D` arguments; `strides`, `dilation_rate` and
            `groups` must stay 1, `padding` "same" and `data_format`
            "channels_last".

    Example:

    >>> conv = SameConv2D(32, 3, use_bias=False)
    >>> conv(np.zeros((2, 8, 8, 1), "float32")).shape
    TensorShape([2, 8, 8, 32])
    """

    def __init__(self, filters, kernel_size, **kwargs):
        kwargs.setdefault("padding", "same")
        super().__init__(filters, kernel_size, **kwargs)
        problems = []
        if tuple(self.strides) != (1, 1):
            problems.append(f"strides {tuple(self.strides)} (must be 1)")
        if tuple(self.dilation_rate) != (1, 1):
            problems.append(f"dilation_rate {tuple(self.dilation_rate)} (must be 1)")
        if self.groups != 1:
            problems.append(f"groups {self.groups} (must be 1)")
        if self.padding != "same":
            problems.append(f"padding {self.padding!r} (must be 'same')")
        if self.data_format != "channels_last":
            problems.append(f"data_format {self.data_format!r} (must be 'channels_last')")
        if any(k % 2 == 0 for k in self.kernel_size):
            problems.append(f"kernel_size {tuple(self.kernel_size)} (must be odd: 'same' padding is then symmetric)")
        if problems:
            raise ValueError(f"SameConv2D {self.name!r} cannot take " + "; ".join(problems)
                             + ". Use keras.layers.Conv2D for these.")

    def convolution_op(self, inputs, kernel):
        return _conv_same(inputs, kernel)
