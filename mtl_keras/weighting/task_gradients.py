"""Per-task gradients of the shared trunk, the input of gradient methods (PCGrad, CAGrad).

A pair's loss depends on the trunk only through that pair's features `z_p`,
and only its own task's loss depends on `z_p`. So one ordinary backward pass
through the heads gives every task's gradient with respect to the features
at once: task t's is the rows of its pairs, the others zeroed. Two exact
ways pull those T cotangents back to the trunk's weights:

- `"grouped"` (`grouped_trunk_task_gradients`): each task's pairs are
  gathered into their own sub-batch (padded to the largest task's count)
  and the trunk runs forward and backward on the T sub-batches in one
  `tf.vectorized_map`. Every pair is processed about once, so this costs
  about one extra forward + backward pass of the batch, whatever T. Exact
  when the trunk treats examples independently in training: no batch
  normalisation (whose batch statistics couple the examples) and no dropout
  (which would draw new masks).
- `"jacobian"` (`trunk_task_gradients`): one backward pass of the whole
  batch per task with a pair in it (`K = min(T, pairs)` of them), batched
  into a vectorised `tape.jacobian` of the recorded forward pass, `chunk`
  tasks at a time: exact for any trunk (batch norm included), about K
  times a backward pass, and memory that grows with the chunk, not with T.

`"auto"` picks `"grouped"` when the trunk has no batch normalisation or
dropout layer, else `"jacobian"`; asking for `"grouped"` on such a trunk is
an error (its per-task gradients would be wrong, and batch norm's moving
statistics would be updated by the sub-batches).

Why not per-task gradients of the features themselves (LibMTL's
`rep_grad`)? With one task per example, the tasks' feature gradients live on
disjoint rows, hence are orthogonal: they never conflict, and PCGrad or
CAGrad would reduce to equal weighting. The trunk *weights* are where tasks
meet, so that is where these methods work.

Under a distribution strategy each replica holds a share of every task's
gradient; `all_reduce_sum` adds them before any nonlinear combination, and
each replica hands the optimizer `1 / replicas` of the combined gradient
(the optimizer sums over replicas), so R replicas take the same step as one.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from mtl_keras.distribute import all_reduce_sum

PER_TASK_GRADIENTS = ("auto", "grouped", "jacobian")
# Tasks whose backward passes the "jacobian" route vectorises at once: with
# 8, per-task gradients of the benchmark model (batch 128) take 0.6-1.0 GiB
# above the plain model's memory at every T from 10 to 312; all at once, 50
# tasks took 7 GiB (docs/BENCHMARKS.md).
DEFAULT_TASK_CHUNK_SIZE = 8


def check_every_n_steps(every_n_steps):
    """Validates a gradient method's `every_n_steps` (a positive int)."""
    if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
        raise ValueError(
            f"every_n_steps must be a positive int (1 = combine per-task gradients at every "
            f"step), got {every_n_steps!r}."
        )
    return every_n_steps


def split_shared(variables, shared_variables):
    """Indices in `variables` of the shared (trunk) variables and of the others."""
    shared_ids = {id(v) for v in shared_variables}
    shared = [i for i, v in enumerate(variables) if id(v) in shared_ids]
    others = [i for i, v in enumerate(variables) if id(v) not in shared_ids]
    return shared, others


def trunk_task_gradients(
    tape, features, feature_grads, task_ids, num_tasks, shared_variables, chunk_size=None
):
    """Per-task gradients of the trunk variables, flattened: `[T, N]` (this replica's share).

    Only the tasks with a pair on this replica are differentiated (the
    others' rows are zero: their cotangents are), so the work is
    `K = min(T, pairs)` backward passes, not T. They run as one vectorised
    Jacobian of the recorded forward pass, `chunk_size` tasks at a time:
    `tape.jacobian(..., parallel_iterations=chunk_size)` vectorises each
    chunk and loops over the chunks one after another, so the batched
    backward's activations are those of `chunk_size` backward passes, not
    K. The result is the same for every chunk size (up to float rounding).

    Cost: `K` backward passes through the trunk; memory `T x N` floats
    (N = trunk parameters) plus `min(chunk_size, K)` times the activations
    of one backward pass.

    Args:
        tape: a persistent tape that recorded `features` from the variables.
        features: `[P, D]` trunk output of each pair.
        feature_grads: `[P, D]` gradient of the (weighted) task losses w.r.t.
            `features`; task t's gradient is its rows (see module docstring).
        task_ids: `[P]` int32.
        num_tasks: T.
        shared_variables: the trunk's trainable variables.
        chunk_size: tasks per vectorised chunk (None: all at once).
    """
    local_tasks = tf.unique(task_ids).y  # [K], the tasks with a pair here
    rows = ops.cast(ops.equal(local_tasks[:, None], task_ids[None, :]), feature_grads.dtype)  # [K, P]
    cotangents = ops.stop_gradient(rows[:, :, None] * feature_grads[None])
    with tape:
        # Entry k of this vector has gradient J^T cotangent_k w.r.t. the trunk.
        probes = ops.einsum("pd,kpd->k", ops.cast(features, cotangents.dtype), cotangents)
    shared_variables = list(shared_variables)
    if chunk_size == 1:
        # pfor needs chunks of 2 or more; one task at a time is a plain loop.
        jac = tape.jacobian(probes, shared_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO,
                            parallel_iterations=1, experimental_use_pfor=False)
    else:
        jac = tape.jacobian(probes, shared_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO,
                            parallel_iterations=chunk_size, experimental_use_pfor=True)
    local = ops.concatenate([ops.reshape(j, (ops.shape(local_tasks)[0], -1)) for j in jac], axis=1)
    n_shared = sum(int(np.prod(v.shape)) for v in shared_variables)
    return tf.scatter_nd(local_tasks[:, None], local, [num_tasks, n_shared])


def example_coupling_layers(backbone):
    """Layers of `backbone` that make an example's training-mode output depend
    on other examples (batch normalisation) or on fresh randomness (dropout,
    noise): with them, only the `"jacobian"` route is exact."""
    kinds = (
        keras.layers.BatchNormalization,
        keras.layers.Dropout,
        keras.layers.GaussianNoise,
        keras.layers.GaussianDropout,
        keras.layers.AlphaDropout,
    )
    return [l for l in backbone._flatten_layers(include_self=False) if isinstance(l, kinds)]


def check_task_chunk_size(chunk_size):
    """Validates a gradient method's `task_chunk_size` (a positive int, or None for all tasks at once)."""
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(
            f"task_chunk_size must be a positive int (tasks whose per-task gradients are computed "
            f"at once; smaller = less memory) or None (all at once), got {chunk_size!r}."
        )
    return chunk_size


def check_per_task_gradients(route):
    """Validates a gradient method's `per_task_gradients` option."""
    if route not in PER_TASK_GRADIENTS:
        raise ValueError(f"per_task_gradients must be one of {PER_TASK_GRADIENTS}, got {route!r}.")
    return route


def resolve_per_task_gradients(route, backbone):
    """`"grouped"` or `"jacobian"` for this backbone (see the module docstring)."""
    coupling = example_coupling_layers(backbone)
    if route == "auto":
        return "jacobian" if coupling else "grouped"
    if route == "grouped" and coupling:
        names = ", ".join(f"{l.name} ({type(l).__name__})" for l in coupling[:4])
        raise ValueError(
            "per_task_gradients='grouped' re-runs the trunk on each task's examples alone, "
            "which is exact only when training-mode outputs do not depend on the other "
            f"examples or on fresh randomness; this trunk has {names}"
            f"{' and more' if len(coupling) > 4 else ''}. Use per_task_gradients='jacobian' "
            "(exact, about T backward passes) or a trunk without them, e.g. "
            "conv_backbone(..., batch_norm=False)."
        )
    return route


def grouped_trunk_task_gradients(
    features_fn, images, rows, task_ids, cotangents, num_tasks, shared_variables
):
    """Per-task trunk gradients from one sub-batch per task: `[T, N]` (this replica's share).

    Cost: one forward and one backward pass of the trunk over T sub-batches
    of `max_t count_t` pairs each (the batch, padded), vectorised over tasks;
    memory `T x N` floats plus the padded batch's activations.

    Args:
        features_fn: `(images dict, task_ids) -> features`, the trunk in
            training mode.
        images: the batch's image inputs (dict of `[B, ...]`).
        rows: `[P]` example of each pair, or None when pairs are examples.
        task_ids: `[P]` int32.
        cotangents: `[P, D]`, row p the gradient of pair p's task's
            (weighted) loss w.r.t. its features.
        num_tasks: T.
        shared_variables: the trunk's trainable variables.
    """
    num_pairs = ops.shape(task_ids)[0]
    counts = tf.math.bincount(task_ids, minlength=num_tasks, maxlength=num_tasks)
    width = tf.reduce_max(counts)
    # Pair indices of each task's sub-batch, [T, width], padded with pair 0.
    order = tf.argsort(task_ids, stable=True)
    starts = tf.cumsum(counts, exclusive=True)
    slots = tf.range(width)[None, :]
    valid = slots < counts[:, None]
    index = tf.where(valid, tf.gather(order, tf.minimum(starts[:, None] + slots, num_pairs - 1)), 0)
    example = index if rows is None else tf.gather(rows, index)
    group_images = {k: tf.gather(v, example) for k, v in images.items()}
    group_cotangents = tf.gather(cotangents, index) * tf.cast(valid, cotangents.dtype)[..., None]
    group_tasks = tf.broadcast_to(tf.range(num_tasks, dtype=task_ids.dtype)[:, None], tf.shape(index))

    def one_task(args):
        imgs, cot, tids = args
        with tf.GradientTape() as tape:
            z = features_fn(imgs, tids)
        grads = tape.gradient(
            z,
            list(shared_variables),
            output_gradients=tf.cast(cot, z.dtype),
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return tf.concat([tf.reshape(tf.cast(g, cotangents.dtype), [-1]) for g in grads], axis=0)

    # pfor has no vectorised rule for a filter gradient whose input varies
    # per task and falls back to a loop over tasks, with a warning per layer
    # at every trace; each iteration is one task's share of the batch, so
    # the loop costs about one filter gradient of the batch: keep it quiet.
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    try:
        per_task = tf.vectorized_map(one_task, (group_images, group_cotangents, group_tasks))
    finally:
        logger.setLevel(level)
    return tf.reshape(per_task, (num_tasks, -1))  # restores the static task count


def unflatten(flat, variables):
    """Splits a flat `[N]` vector into tensors shaped like `variables`."""
    out, start = [], 0
    for v in variables:
        size = 1
        for d in v.shape:
            size *= int(d)
        out.append(ops.reshape(flat[start : start + size], v.shape))
        start += size
    return out


def combined_trunk_gradients(
    tape, objective, variables, step, combine_fn, every_n_steps=1, per_task_gradients="auto",
    task_chunk_size=DEFAULT_TASK_CHUNK_SIZE,
):
    """Gradients where the trunk's come from `combine_fn` of the per-task ones.

    The heads (task-specific) get the gradient of `objective`; the trunk gets
    `combine_fn(G, present)`, with `G` `[T, N]` the global per-task
    gradients of `weight_t * loss_t` (summed over replicas), plus the
    gradient of any regularisation loss. With `every_n_steps > 1`, only
    steps whose optimizer iteration is a multiple of it pay for the per-task
    gradients; the others take the ordinary (equal weighting) gradient.

    Args:
        tape: persistent tape of the step.
        objective: the loss-scaled, equally weighted objective.
        variables: trainable variables.
        step: the step's `StepContext`.
        combine_fn: `(G [T, N], present [T] bool) -> [N]` global gradient.
        every_n_steps: how often to combine per-task gradients.
        per_task_gradients: `"auto"`, `"grouped"` or `"jacobian"` (see the
            module docstring).
        task_chunk_size: with `"jacobian"`, how many tasks' backward passes
            run vectorised at once (memory grows with it; None: all).

    Returns:
        A list of gradients aligned with `variables`.
    """
    features = step.features
    shared_vars = step.shared_variables
    shared_idx, other_idx = split_shared(variables, shared_vars)
    shared_list = [variables[i] for i in shared_idx]
    others = [variables[i] for i in other_idx]
    num_tasks = int(step.task_losses.shape[0])
    # One backward through the heads: their gradients and d objective / d features.
    grads = tape.gradient(objective, others + [features])
    head_grads, feature_grads = grads[:-1], grads[-1]
    present = step.present

    n_shared = sum(int(np.prod(v.shape)) for v in shared_list)

    route = resolve_per_task_gradients(per_task_gradients, step.backbone)

    def per_task_gradients_fn():
        n_present = ops.maximum(ops.sum(ops.cast(present, "float32")), 1.0)
        # The objective is the mean over present tasks; rows of G are the
        # per-task gradients of weight_t * loss_t (loss-scaled).
        cotangents = ops.stop_gradient(feature_grads * n_present)
        if route == "grouped":
            return grouped_trunk_task_gradients(
                step.features_fn, step.pairs.images, step.pairs.rows,
                step.pairs.task_ids, cotangents, num_tasks, shared_list,
            )
        return trunk_task_gradients(
            tape, features, cotangents, step.pairs.task_ids, num_tasks, shared_list, task_chunk_size
        )

    def combined(per_task):
        return unflatten(combine_fn(per_task, present) / step.num_replicas, shared_list)

    def plain():
        out = tape.gradient(
            features,
            shared_list,
            output_gradients=feature_grads,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return [ops.convert_to_tensor(g) for g in out]

    if every_n_steps == 1:
        trunk_grads = combined(all_reduce_sum(per_task_gradients_fn()))
    else:
        due = ops.equal(ops.mod(step.iteration, every_n_steps), 0)
        per_task = tf.cond(
            due, per_task_gradients_fn, lambda: tf.zeros((num_tasks, n_shared), feature_grads.dtype)
        )
        # The all-reduce is a synchronisation point: it must stay out of tf.cond.
        per_task = all_reduce_sum(per_task)
        trunk_grads = tf.cond(due, lambda: combined(per_task), plain)
    if step.regularization is not None:
        reg = tape.gradient(step.regularization, shared_list)
        trunk_grads = [g if r is None else g + r for g, r in zip(trunk_grads, reg)]
    out = [None] * len(variables)
    for i, g in zip(shared_idx, trunk_grads):
        out[i] = g
    for i, g in zip(other_idx, head_grads):
        out[i] = g
    return out
