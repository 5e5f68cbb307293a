"""Shared trunks: VGG-style conv blocks with a TaskRouting layer after each conv.

A backbone is a functional `keras.Model` from `{"image", "task"}` (the task
input only when it routes) to features `[batch, features]`; the heads and
the losses belong to `MultiTaskModel` (keras-hub's backbone / task split).
The same builder gives the Task Routing model (`sigma < 1`), the hard-sharing
baseline (`sigma = 1`, no routing layers) and the single-task baseline (one
task, `sigma = 1`).
"""

import keras

from mtl_keras.batch_norm import synchronized_by_default
from mtl_keras.input_checks import check_sigma
from mtl_keras.layers.closed_form_batch_norm import ClosedFormBatchNormalization
from mtl_keras.layers.same_conv import SameConv2D
from mtl_keras.layers.task_routing import TaskRouting


def vgg_filters(width=32, depth=4, max_width=None):
    """Filters per block: `width` doubled at each block, capped at `max_width` (default `8 * width`)."""
    if width < 1 or depth < 1:
        raise ValueError(f"width and depth must be >= 1, got width={width}, depth={depth}.")
    cap = max_width or 8 * width
    return tuple(min(width * 2**i, cap) for i in range(depth))


def conv_backbone(
    input_shape,
    num_tasks,
    sigma=1.0,
    filters=(32, 64, 128, 256),
    convs_per_block=1,
    dense_units=(),
    routing="auto",
    routing_mode="partition",
    seed=None,
    batch_norm=True,
    batch_norm_momentum=0.99,
    batch_norm_synchronized="auto",
    name="conv_backbone",
):
    """A VGG-style trunk; with routing, a `TaskRouting` after every conv and dense layer.

    Each block is `convs_per_block` times `Conv2D(3x3) -> BatchNorm ->
    TaskRouting -> ReLU` (routing after batch norm, before the ReLU, where the
    authors' routed VGG puts it), then a 2x2 max pool; after the last block a
    global average pool and optional `Dense -> TaskRouting -> ReLU` layers.
    (The pool is applied right after the block's last batch norm, which
    gives the same outputs and gradients at a quarter of the routing and
    ReLU work.)

    Args:
        input_shape: image shape, e.g. `(32, 32, 1)`.
        num_tasks: number of tasks (rows of each routing mask).
        sigma: sharing ratio of every routing layer, in `[0, 1]`.
        filters: filters of each block (see `vgg_filters`).
        convs_per_block: conv layers per block.
        dense_units: widths of dense layers after pooling (routed as well).
        routing: True, False, or `"auto"` (route when `sigma < 1`). Without
            routing the backbone has no `task` input.
        routing_mode: `"partition"` or `"independent"`, see `routing_masks`.
        seed: seed of the routing masks; layer i uses `seed + i`. None draws a
            random seed per layer (recorded in the config).
        batch_norm: whether to normalise after each conv.
        batch_norm_momentum: momentum of the moving statistics (Keras'
            default 0.99). `MultiTaskModel.fit` re-estimates them for the
            final weights (`mtl_keras.batch_norm`), so short runs need no
            faster momentum.
        batch_norm_synchronized: normalise with the statistics of the
            global batch, all replicas together; `"auto"`: when built under
            a strategy with more than one replica (see
            `batch_norm.synchronized_by_default`).
        name: model name.

    Returns:
        A functional `keras.Model`.

    Example:

    >>> trunk = conv_backbone((32, 32, 1), num_tasks=50, sigma=0.5, seed=0)
    >>> trunk({"image": np.zeros((2, 32, 32, 1)), "task": np.array([0, 7])}).shape
    (2, 256)
    """
    # Before "auto" reads it: sigma 1.5 would silently build an unrouted trunk.
    sigma = check_sigma(sigma)
    if routing == "auto":
        routing = sigma < 1.0
    image = keras.Input(shape=tuple(input_shape), name="image")
    inputs = {"image": image}
    if routing:
        task = keras.Input(shape=(), dtype="int32", name="task")
        inputs["task"] = task
    x = image
    n_routing = 0

    def route(x):
        nonlocal n_routing
        if routing:
            layer_seed = None if seed is None else int(seed) + n_routing
            x = TaskRouting(num_tasks, sigma, seed=layer_seed, mode=routing_mode, name=f"routing_{n_routing}")(x, task)
            n_routing += 1
        return x

    for b, f in enumerate(filters):
        for c in range(convs_per_block):
            # Conv2D with a faster backward pass on CPU (layers/same_conv.py).
            x = SameConv2D(f, 3, use_bias=not batch_norm, name=f"block{b}_conv{c}")(x)
            if batch_norm:
                synchronized = synchronized_by_default() if batch_norm_synchronized == "auto" else batch_norm_synchronized
                # BatchNormalization with a faster training gradient (layers/closed_form_batch_norm.py).
                x = ClosedFormBatchNormalization(
                    momentum=batch_norm_momentum, synchronized=bool(synchronized), name=f"block{b}_bn{c}"
                )(x)
            if c == convs_per_block - 1 and x.shape[1] is not None and x.shape[1] >= 2 and x.shape[2] >= 2:
                # The block's 2x2 max pool, moved before the routing mask and
                # the ReLU: both commute with a max (the mask is >= 0 per
                # channel, ReLU is monotone), so outputs and gradients are
                # those of pooling last, and both run on a quarter of the values.
                x = keras.layers.MaxPooling2D(2, name=f"block{b}_pool")(x)
            x = route(x)
            x = keras.layers.ReLU(name=f"block{b}_relu{c}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    for i, units in enumerate(dense_units):
        x = keras.layers.Dense(units, name=f"dense{i}")(x)
        x = route(x)
        x = keras.layers.ReLU(name=f"dense{i}_relu")(x)
    return keras.Model(inputs, x, name=name)


def routing_layers(model):
    """All `TaskRouting` layers inside `model`, in graph order."""
    return [l for l in model._flatten_layers(include_self=False) if isinstance(l, TaskRouting)]
