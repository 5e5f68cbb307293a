"""Losses and metric values of (example, task) pairs, for all tasks in one pass.

Every pair carries its task id; the model computes each loss kind that its
tasks use on every pair and picks, per pair, the one its task asked for.
With a handful of loss kinds that costs a few elementwise ops, and no Python
loop over tasks is traced into the step.
"""

import numpy as np
import tensorflow as tf
from keras import ops

from mtl_keras.tasks import LOSSES

LOSS_CODES = {name: i for i, name in enumerate(sorted({l for ls in LOSSES.values() for l in ls}))}
# Logit given to the padded (non-existent) classes of a multiclass task, so
# that softmax gives them zero probability and argmax never picks them.
INVALID_LOGIT = -1e9


class TaskTable:
    """Per-task constants of a TaskSet as arrays indexed by task id.

    Args:
        tasks: a `TaskSet`.
    """

    def __init__(self, tasks):
        self.tasks = tasks
        self.num_tasks = len(tasks)
        self.max_outputs = tasks.max_outputs
        self.label_width = tasks.label_width
        self.num_outputs = np.array([t.num_outputs for t in tasks], "int32")
        self.offsets = np.concatenate([[0], np.cumsum(self.num_outputs)[:-1]]).astype("int32")
        self.is_multiclass = np.array([t.kind == "multiclass" for t in tasks])
        self.is_binary = np.array([t.kind == "binary" for t in tasks])
        self.is_regression = np.array([t.kind == "regression" for t in tasks])
        self.loss_code = np.array([LOSS_CODES[t.loss] for t in tasks], "int32")
        self.used_losses = sorted({t.loss for t in tasks}, key=LOSS_CODES.get)
        self.weights = np.array([t.weight for t in tasks], "float32")
        # Valid output positions per task: [T, max_outputs].
        self.valid_outputs = np.arange(self.max_outputs)[None, :] < self.num_outputs[:, None]
        self.metric_names = sorted({m for t in tasks for m in t.metrics})
        self.metric_active = {m: np.array([m in t.metrics for t in tasks]) for m in self.metric_names}

    def take(self, array, task_ids):
        return ops.take(ops.convert_to_tensor(array), task_ids, axis=0)


def gather_task_logits(all_logits, task_ids, table, offsets=None):
    """Each pair's own task's logits out of the concatenated outputs of all tasks.

    Args:
        all_logits: `[P, sum of num_outputs]`, every task's output layer
            applied to every pair (or the output layers of some tasks, side
            by side, with `offsets`).
        task_ids: `[P]` int32.
        table: the `TaskTable`.
        offsets: `[P]` int32, the column of each pair's task's first output
            in `all_logits`; None: the task's offset among all tasks.

    Returns:
        `[P, max_outputs]` logits; positions past a task's `num_outputs` are
        `INVALID_LOGIT` for multiclass tasks and 0 otherwise.
    """
    positions = ops.arange(table.max_outputs, dtype="int32")[None, :]
    valid = table.take(table.valid_outputs, task_ids)
    if offsets is None:
        offsets = table.take(table.offsets, task_ids)
    index = ops.where(valid, offsets[:, None] + positions, 0)
    logits = ops.take_along_axis(all_logits, index, axis=1)
    fill = ops.where(table.take(table.is_multiclass, task_ids), INVALID_LOGIT, 0.0)[:, None]
    return ops.where(valid, logits, ops.cast(fill, logits.dtype))


def sanitize_labels(labels, task_ids, table):
    """Labels as `[P, label_width]` float32 and a `[P]` mask of present labels.

    A label is missing when it is NaN, or negative for a classification task;
    missing labels get weight 0 and a harmless placeholder value.
    """
    labels = ops.cast(labels, "float32")
    if len(labels.shape) == 1:
        labels = labels[:, None]
    width = labels.shape[-1]
    if width is not None and width < table.label_width:
        labels = ops.pad(labels, [[0, 0], [0, table.label_width - width]])
    finite = ops.all(ops.isfinite(labels[:, :1]), axis=1)
    is_class = ops.logical_not(table.take(table.is_regression, task_ids))
    present = ops.logical_and(finite, ops.logical_or(ops.logical_not(is_class), labels[:, 0] >= 0))
    labels = ops.where(ops.isfinite(labels), labels, 0.0)
    labels = ops.where(present[:, None], labels, 0.0)
    return labels, present


def assert_class_labels_in_range(labels, task_ids, weights, table):
    """Fails when a weighted pair's class label is >= its task's class count.

    The vectorised loss would clip such a label silently; this makes it an
    `InvalidArgumentError` naming the cause (a graph assertion: not for XLA).

    Args:
        labels: `[P, label_width]` from `sanitize_labels`.
        task_ids: `[P]` int32.
        weights: `[P]`; pairs of weight 0 (missing labels) are not checked.
        table: the `TaskTable`.
    """
    is_class = table.take(np.logical_not(table.is_regression), task_ids)
    n = ops.cast(table.take(table.num_outputs, task_ids), "float32")
    limit = ops.where(table.take(table.is_binary, task_ids), 2.0, n)
    bad = ops.logical_and(is_class, labels[:, 0] >= limit)
    tf.debugging.assert_equal(
        ops.any(ops.logical_and(bad, weights > 0)),
        False,
        message=(
            "A class label is >= its task's number of classes (num_outputs); check the "
            "label encoding or the Task's num_outputs."
        ),
    )


def pair_losses(logits, labels, task_ids, table, label_smoothing=0.0):
    """The loss of each (example, task) pair, by its task's loss function.

    Args:
        logits: `[P, max_outputs]` from `gather_task_logits`.
        labels: `[P, label_width]` from `sanitize_labels`.
        task_ids: `[P]`.
        table: the `TaskTable`.
        label_smoothing: ε of the classification losses: the target puts
            `1 - ε` on the label and spreads `ε` uniformly over the task's
            own classes (binary: over {0, 1}), as Keras' losses do.

    Returns:
        `[P]` float32 losses.
    """
    logits = ops.cast(logits, "float32")
    per_kind = {}
    if "sparse_categorical_crossentropy" in table.used_losses:
        cls = ops.clip(ops.cast(labels[:, 0], "int32"), 0, table.max_outputs - 1)
        log_p = ops.log_softmax(logits, axis=-1)
        loss = -ops.take_along_axis(log_p, cls[:, None], axis=1)[:, 0]
        if label_smoothing:
            # The uniform part covers each task's own classes only: the
            # padded ones have probability 0 (log -1e9) and are not classes.
            valid = ops.cast(table.take(table.valid_outputs, task_ids), "float32")
            uniform = -ops.sum(log_p * valid, axis=1) / ops.maximum(ops.sum(valid, axis=1), 1.0)
            loss = (1.0 - label_smoothing) * loss + label_smoothing * uniform
        per_kind["sparse_categorical_crossentropy"] = loss
    if "binary_crossentropy" in table.used_losses:
        z, y = logits[:, 0], labels[:, 0]
        if label_smoothing:
            y = y * (1.0 - label_smoothing) + 0.5 * label_smoothing
        per_kind["binary_crossentropy"] = (
            ops.maximum(z, 0.0) - z * y + ops.log1p(ops.exp(-ops.abs(z)))
        )
    regression = [l for l in ("huber", "mae", "mse") if l in table.used_losses]
    if regression:
        width = table.label_width
        mask = ops.cast(table.take(table.valid_outputs[:, :width], task_ids), "float32")
        diff = (logits[:, :width] - labels) * mask
        denom = ops.maximum(ops.sum(mask, axis=1), 1.0)
        if "mse" in regression:
            per_kind["mse"] = ops.sum(diff**2, axis=1) / denom
        if "mae" in regression:
            per_kind["mae"] = ops.sum(ops.abs(diff), axis=1) / denom
        if "huber" in regression:
            a = ops.abs(diff)
            per_kind["huber"] = ops.sum(ops.where(a <= 1.0, 0.5 * diff**2, a - 0.5), axis=1) / denom
    if len(per_kind) == 1:
        return next(iter(per_kind.values()))
    names = sorted(per_kind, key=LOSS_CODES.get)
    stacked = ops.stack([per_kind[n] for n in names], axis=1)
    slot_of_code = np.zeros(len(LOSS_CODES), "int32")
    for i, n in enumerate(names):
        slot_of_code[LOSS_CODES[n]] = i
    slot = ops.take(ops.convert_to_tensor(slot_of_code), table.take(table.loss_code, task_ids))
    return ops.take_along_axis(stacked, slot[:, None], axis=1)[:, 0]


def pair_metrics(logits, labels, task_ids, table):
    """Each metric's value for every pair: `{name: [P]}` (0 where it does not apply)."""
    logits = ops.cast(logits, "float32")
    out = {}
    if "accuracy" in table.metric_names:
        predicted = ops.cast(ops.argmax(logits, axis=-1), "float32")
        multiclass_hit = ops.cast(ops.equal(predicted, labels[:, 0]), "float32")
        binary_hit = ops.cast(ops.equal(logits[:, 0] > 0, labels[:, 0] > 0.5), "float32")
        out["accuracy"] = ops.where(table.take(table.is_binary, task_ids), binary_hit, multiclass_hit)
    if "mae" in table.metric_names or "mse" in table.metric_names:
        width = table.label_width
        mask = ops.cast(table.take(table.valid_outputs[:, :width], task_ids), "float32")
        diff = (logits[:, :width] - labels) * mask
        denom = ops.maximum(ops.sum(mask, axis=1), 1.0)
        if "mae" in table.metric_names:
            out["mae"] = ops.sum(ops.abs(diff), axis=1) / denom
        if "mse" in table.metric_names:
            out["mse"] = ops.sum(diff**2, axis=1) / denom
    return out
