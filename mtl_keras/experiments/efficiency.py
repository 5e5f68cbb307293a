"""How close a training step comes to what the machine can do: its FLOPs, counted, against a measured peak.

The peak is this machine's own: the best rate of a large square matmul
(`matmul_peak`), in float32 and bfloat16, measured in the same run as the
steps it is compared with. A step's FLOPs are the multiply-adds of its
convolutions and dense layers (`training_flops_per_step`), forward and
backward; normalisation, activations, routing masks and the optimizer
are elementwise and not counted, so the fraction of peak is a lower bound
of the step's arithmetic efficiency.
"""

import time

import keras
import numpy as np
import tensorflow as tf

BACKWARD_FACTOR = 3
"""Training FLOPs per forward FLOP: the forward pass, then the gradients of
every layer's input and of its kernel, each as large as the forward. A
layer with no trainable weight upstream (the first convolution, on the
image) needs no input gradient: factor 2."""


PEAK_SIZES = (1024, 1536, 2048, 3072)
"""Matrix sides the peak is measured at. One size is not enough: on the
2-core AVX2 machine of docs/BENCHMARKS.md, 2048 x 2048 ran at 136 GFLOP/s
and 1536 x 1536 at 177 GFLOP/s (cache set conflicts at powers of two)."""


def matmul_peak(dtype="float32", sizes=PEAK_SIZES, repeats=5, inner=4):
    """The machine's best measured matmul rate, in FLOP/s.

    For each side in `sizes`, runs `inner` chained square matmuls in one
    traced function, `repeats` times after a warm-up, and keeps the best
    run; the peak is the best size's rate: the rate the hardware reaches on
    the most favourable dense work, in this process's threading.

    Args:
        dtype: `"float32"` or `"bfloat16"` (or any TensorFlow float type).
        sizes: the matrices' sides; large enough that overheads vanish.
        repeats: timed runs per size.
        inner: matmuls per run.

    Returns:
        `{"dtype", "size", "flops_per_second", "seconds", "by_size"}`: the
        best size, its rate and its run time, and every size's rate.

    Example:

    >>> matmul_peak("float32")["flops_per_second"] / 1e9   # GFLOP/s
    """
    by_size = {int(size): _matmul_rate(dtype, int(size), repeats, inner) for size in sizes}
    size = max(by_size, key=lambda n: by_size[n]["flops_per_second"])
    return {"dtype": str(dtype), "size": size, **by_size[size],
            "by_size": {str(n): r["flops_per_second"] for n, r in by_size.items()}}


def _matmul_rate(dtype, size, repeats, inner):
    rng = np.random.default_rng(0)
    a = tf.constant(rng.standard_normal((size, size)) / np.sqrt(size), dtype=dtype)
    b = tf.constant(rng.standard_normal((size, size)) / np.sqrt(size), dtype=dtype)

    @tf.function
    def chain(x):
        for _ in range(inner):
            x = tf.matmul(x, b)
        return tf.reduce_sum(tf.cast(x[:1, :1], tf.float32))

    chain(a).numpy()  # trace and warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        chain(a).numpy()
        best = min(best, time.perf_counter() - start)
    return {"flops_per_second": 2.0 * size**3 * inner / best, "seconds": best}


def _forward_flops_per_call(layer):
    """Multiply-add FLOPs (2 per MAC) of one call of `layer` on one example; 0 for other layers."""
    if isinstance(layer, keras.layers.Conv2D) and not isinstance(layer, keras.layers.Conv2DTranspose):
        out = layer.output.shape  # (None, H, W, C_out) for channels_last
        spatial = out[1] * out[2] if layer.data_format == "channels_last" else out[2] * out[3]
        kh, kw, cin_per_group, cout = layer.kernel.shape
        return 2 * spatial * kh * kw * cin_per_group * cout
    if isinstance(layer, keras.layers.Dense):
        cin, cout = layer.kernel.shape
        try:  # a Dense on [B, ..., C] inputs runs once per position
            positions = int(np.prod(layer.output.shape[1:-1]))
        except (AttributeError, ValueError):
            positions = 1
        return 2 * positions * cin * cout
    return 0


def trunk_forward_flops(backbone):
    """Forward FLOPs of `backbone` on one example: its `Conv2D` and `Dense` layers' multiply-adds."""
    return int(sum(_forward_flops_per_call(l) for l in backbone._flatten_layers(include_self=False)))


def layers_without_input_gradient(backbone):
    """Names of the layers of a functional `backbone` with no trainable weight upstream.

    Their inputs need no gradient, so training computes only their kernels'
    gradient (autodiff prunes the other).
    """
    upstream = {}  # id(tensor) -> whether a trainable weight feeds it
    free = set()
    for op in backbone.operations:
        for node in op._inbound_nodes:
            fed = any(upstream.get(id(t), False) for t in node.input_tensors)
            if not fed:
                free.add(op.name)
            for t in node.output_tensors:
                upstream[id(t)] = fed or bool(op.trainable_weights)
    return free


def trunk_training_flops(backbone):
    """Training FLOPs of `backbone` on one example: forward and backward of its `Conv2D` and `Dense` layers.

    `BACKWARD_FACTOR` times each layer's forward FLOPs, or 2 times for a
    layer whose input needs no gradient (`layers_without_input_gradient`).
    """
    free = layers_without_input_gradient(backbone) if hasattr(backbone, "operations") else set()
    return int(sum((2 if l.name in free else BACKWARD_FACTOR) * _forward_flops_per_call(l)
                   for l in backbone._flatten_layers(include_self=False)))


def head_forward_flops(model):
    """Forward FLOPs of one pair's own head (estimator and output layer), averaged over the tasks."""
    per_task = []
    for head in model.heads:
        layers = list(head.estimator_layers) + [head.output_layer]
        per_task.append(sum(2 * int(l.kernel.shape[0]) * int(l.kernel.shape[1]) for l in layers))
    return float(np.mean(per_task))


def training_flops_per_step(model, batch_size, tasks_per_example=1):
    """FLOPs of one training step of a `MultiTaskModel`: what the step needs, not what it wastes.

    The trunk runs once per example, or once per (example, task) pair when
    it routes and each example has several tasks (as `MultiTaskModel` runs
    it); each pair goes through its own task's head. Forward FLOPs times
    `BACKWARD_FACTOR` (3), or 2 for a layer whose input needs no gradient
    (`trunk_training_flops`). Work the implementation does beyond that (e.g.
    every task's output layer applied to every pair) is not counted, so it
    shows as lost efficiency.

    Args:
        model: a built `MultiTaskModel`.
        batch_size: examples per step.
        tasks_per_example: pairs per example (1 with one task per example).

    Returns:
        FLOPs (a float).
    """
    pairs = batch_size * tasks_per_example
    trunk_calls = pairs if (model.routed and tasks_per_example > 1) else batch_size
    return float(trunk_calls * trunk_training_flops(model.backbone)
                 + pairs * BACKWARD_FACTOR * head_forward_flops(model))
