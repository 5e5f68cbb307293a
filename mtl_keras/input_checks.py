"""Refusing bad input with a message that names the problem and the fix.

Two kinds of checks live here:

- **Settings**, checked in Python when a model is built or a flag parsed
  (`check_sigma`, `check_fraction`, from `mtl_keras.setting_checks`): a
  `ValueError` naming the value and the allowed range.
- **Batches**, checked at the start of the step (`checked_batch`): graph
  assertions that fail the step with a `tf.errors.InvalidArgumentError`
  before anything is computed from the batch. Each costs one or two
  reductions over the batch; the details shown in the message (which ids,
  which task and label) are computed only when a check fails.

XLA ignores assertions, so a model compiled with `jit_compile=True` runs the
same checks in the data path instead (`GuardedModel` maps them over a
`tf.data.Dataset` or applies them to in-memory arrays before `fit`,
`evaluate` and `predict`).
"""

import re

import numpy as np
import tensorflow as tf
from keras import ops

from mtl_keras.setting_checks import check_fraction, check_sigma  # noqa: F401 (re-exported)

# How many offending values an error message lists.
SHOWN = 10


# ------------------------------------------------------------------ graph checks
def _require(ok, message, details):
    """A tensor to depend on that fails with `message` and `details()` when `ok` is False.

    `details` is a function so that the tensors it shows are computed only
    on failure. Eagerly, raises at once and returns None.
    """
    if tf.executing_eagerly():
        if not bool(ok):
            shown = " ".join(d if isinstance(d, str) else str(ops.convert_to_numpy(d)) for d in details())
            raise tf.errors.InvalidArgumentError(None, None, f"{message} {shown}")
        return None

    def fail():
        check = tf.debugging.Assert(False, [message, *details()], summarize=SHOWN)
        with tf.control_dependencies([check]):
            return tf.constant(False)

    return tf.cond(ok, lambda: tf.constant(True), fail)


def _after(checks, tensor):
    """`tensor`, computed only once every check in `checks` has passed."""
    checks = [c for c in checks if c is not None]
    if not checks or tensor is None:
        return tensor
    with tf.control_dependencies(checks):
        return tf.nest.map_structure(tf.identity, tensor)


def task_ids_message(num_tasks):
    return (
        f"Task ids must be integers in [0, {num_tasks}): the model has {num_tasks} tasks (ids 0 to "
        f"{num_tasks - 1}). Fix the task input (e.g. a task numbering that starts at 1, or data with more "
        "tasks than the TaskSet), or build the model with a TaskSet holding every task the data uses. "
        "Offending ids:"
    )


def _check_task_ids(task, num_tasks):
    """The check that `task` holds integers in [0, num_tasks), and the ids as int32 once it passed."""
    task = tf.reshape(tf.convert_to_tensor(task), (-1,))
    ids = tf.cast(task, tf.int32)
    bad = tf.logical_or(ids < 0, ids >= num_tasks)
    if task.dtype.is_floating:
        # A fractional id would be truncated to a neighbour's id.
        bad = tf.logical_or(bad, tf.not_equal(task, tf.math.floor(task)))
    check = _require(tf.logical_not(tf.reduce_any(bad)), task_ids_message(num_tasks),
                     lambda: [tf.boolean_mask(task, bad)])
    return check, _after([check], ids)


def _task_descriptions(table):
    """What each task accepts as a label, as the messages show it."""
    out = []
    for i, task in enumerate(table.tasks):
        if task.kind == "multiclass":
            allowed = f"an integer class index in [0, {task.num_outputs}) (its number of classes)"
        elif task.kind == "binary":
            allowed = "0 or 1 (or a probability in [0, 1])"
        else:
            allowed = f"{task.num_outputs} finite value(s)"
        out.append(f"task {task.name} (id {i}) takes {allowed};")
    return np.array(out)


def _bad_class_labels(labels, is_multiclass, is_binary, num_classes):
    """Class labels that are no class index (multiclass) or outside [0, 1] (binary); any matching shapes."""
    # NaN fails every comparison, so `not (in range)` catches it too.
    class_ok = (labels >= 0.0) & (labels < num_classes) & tf.equal(labels, tf.math.floor(labels))
    binary_ok = (labels >= 0.0) & (labels <= 1.0)
    return (is_multiclass & ~class_ok) | (is_binary & ~binary_ok)


ONE_TASK_LABELS_MESSAGE = (
    "Labels that do not fit their task: with one task per example (image and task inputs) every "
    "example is labelled, so a class label must be an integer class index below the number of classes of "
    "its task (binary tasks: 0 or 1), and a regression target finite; NaN or a negative class does not "
    "mean missing in this layout (it does only for [batch, T] labels). Fix the labels, or give the "
    "example sample_weight 0 to leave it out of the loss. What each offending task takes, then the "
    "offending labels:"
)


def _check_one_task_labels(y, task_ids, sample_weight, table):
    """Every weighted label of one-task-per-example data fits its task (sample weight 0 leaves one out)."""
    labels = tf.cast(y, tf.float32)
    if len(labels.shape) == 1:
        labels = labels[:, None]
    # An unknown width is checked on the first column only.
    width = min(labels.shape[-1] or 1, table.label_width)
    labels = labels[:, :width]
    # The label columns each task reads: class tasks the first, regression tasks num_outputs.
    reads = np.where(table.is_regression, table.num_outputs, 1)
    columns = table.take(np.arange(width)[None, :] < reads[:, None], task_ids)
    first = labels[:, 0]
    bad = _bad_class_labels(
        first, table.take(table.is_multiclass, task_ids), table.take(table.is_binary, task_ids),
        tf.cast(table.take(table.num_outputs, task_ids), tf.float32),
    )
    non_finite_target = tf.reduce_any(columns & ~tf.math.is_finite(labels), axis=1)
    bad = bad | (table.take(table.is_regression, task_ids) & non_finite_target)
    if sample_weight is not None:
        bad = bad & (tf.reshape(tf.cast(sample_weight, tf.float32), (-1,)) > 0)
    descriptions = _task_descriptions(table)
    return _require(
        tf.logical_not(tf.reduce_any(bad)), ONE_TASK_LABELS_MESSAGE,
        lambda: [tf.gather(descriptions, tf.boolean_mask(task_ids, bad)), tf.boolean_mask(labels, bad)],
    )


SEVERAL_TASK_LABELS_MESSAGE = (
    "Labels that do not fit their task: in [batch, T] labels (several tasks per example) a present class "
    "label must be an integer class index below the number of classes of its task (binary tasks: 0 or 1); "
    "NaN, or a negative class label, marks a missing label. Fix the label encoding or Task.num_outputs. "
    "What each offending task takes, then the offending labels:"
)


def _check_several_task_labels(y, sample_weight, table):
    """Every present class label of `[batch, T]` data is a class index of its task (NaN, < 0: missing)."""
    y = tf.cast(y, tf.float32)
    is_class = tf.constant(~table.is_regression[None, :])
    present = tf.math.is_finite(y) & (y >= 0.0) & is_class
    if sample_weight is not None:
        present = present & (tf.cast(sample_weight, tf.float32) > 0)
    bad = present & _bad_class_labels(
        y, tf.constant(table.is_multiclass[None, :]), tf.constant(table.is_binary[None, :]),
        tf.constant(table.num_outputs[None, :].astype("float32")),
    )
    descriptions = _task_descriptions(table)
    return _require(
        tf.logical_not(tf.reduce_any(bad)), SEVERAL_TASK_LABELS_MESSAGE,
        lambda: [tf.gather(descriptions, tf.where(bad)[:, 1]), tf.boolean_mask(y, bad)],
    )


def images_message(name):
    # No quotes: a graph assertion would print them escaped.
    return (
        f"The {name} input holds NaN or Inf values; one such value makes every loss and gradient of its "
        "batch NaN. Clean the data, or drop those examples (e.g. a dataset.filter keeping the examples "
        f"whose {name} passes tf.math.is_finite). Number of non-finite values in this batch:"
    )


def _check_images(name, value):
    value = tf.convert_to_tensor(value)
    if not value.dtype.is_floating:
        return None
    return _require(
        tf.reduce_all(tf.math.is_finite(value)), images_message(name),
        lambda: [tf.reduce_sum(tf.cast(~tf.math.is_finite(value), tf.int32))],
    )


def checked_batch(x, y, sample_weight, table, image_names):
    """`(x, y, sample_weight)`, usable only once the batch passed every check.

    Refuses (`tf.errors.InvalidArgumentError`) task ids outside `[0, T)`,
    labels that do not fit their task (see the messages above) and
    non-finite values in the image inputs. Every returned tensor depends on
    every check, so nothing computed from the batch (a batch-norm statistic,
    a metric, an update) happens before the batch is accepted. Per batch:
    one finiteness reduction over each image input, a range check (one
    reduction) of the task ids, and a few elementwise ops and one reduction
    over the labels; each check is a `tf.cond` whose failing branch (the
    assertion and its details) runs only on a bad batch.

    Args:
        x: the inputs: `{"image", "task"}` (one task per example), or images
            alone (several tasks per example).
        y: labels, or None (prediction).
        sample_weight: `[B]` or `[B, T]`, or None; examples of weight 0 are
            not label-checked.
        table: the model's `TaskTable`.
        image_names: the input names that hold images (others are ignored).

    Returns:
        `(x, y, sample_weight)`.
    """
    inputs = x if isinstance(x, dict) else {"image": x}
    y = None if y is None else tf.convert_to_tensor(y)
    checks = [_check_images(k, v) for k, v in inputs.items() if k in image_names and k != "task"]
    if "task" in inputs:
        ids_check, task_ids = _check_task_ids(inputs["task"], table.num_tasks)
        checks.append(ids_check)
        if y is not None:
            # Gathers by task id: only after the ids passed.
            checks.append(_check_one_task_labels(y, task_ids, sample_weight, table))
    elif y is not None and len(y.shape) == 2 and y.shape[-1] == table.num_tasks:
        # Other shapes get make_pairs' own error.
        checks.append(_check_several_task_labels(y, sample_weight, table))
    return tuple(_after(checks, v) for v in (x, y, sample_weight))


# ------------------------------------------------------------------- data size
def empty_data_message(what, replicas, training=True):
    if training and replicas > 1:
        fix = (
            f"With {replicas} replicas, prepare_for_replicas(..., training=True) drops every batch smaller than "
            "the global batch size, so a training set smaller than one global batch trains on nothing: use a "
            "global batch size no larger than the number of training examples, or pass more data"
        )
    else:
        fix = "Check the dataset: an empty split, or a filter / take / shard that keeps nothing"
    done = "trained" if training else "measured"
    return f"{what} got no batch: the data yielded no examples, so nothing was {done}. {fix}."


def require_one_global_batch(num_examples, global_batch, replicas, split="training"):
    """Raises a ValueError when `num_examples` cannot fill the one global batch a multi-replica run needs.

    With one replica a short last batch trains; with several,
    `prepare_for_replicas(..., training=True)` drops it, so fewer examples
    than one global batch leave nothing to train on.
    """
    if num_examples and not (replicas > 1 and num_examples < global_batch):
        return
    if not num_examples:
        fix = "check the data selection (e.g. --tasks, --archives)"
    elif num_examples >= replicas:
        fix = (f"use a batch size of at most {num_examples // replicas * replicas} (a multiple of {replicas}; "
               "--batch-size), more data (e.g. more --tasks), or one replica")
    else:
        fix = "use more data (e.g. more --tasks) or one replica"
    raise ValueError(
        f"The {split} data has {num_examples} examples, fewer than one global batch of {global_batch} "
        f"({replicas} replica(s)), so no step would run: {fix}."
    )


# --------------------------------------------------------------- presentation
def describe_error(error):
    """The part of an error a user needs: a failed check's message without the graph trace or Keras' frame."""
    text = error.message if isinstance(error, tf.errors.OpError) else str(error)
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # Keras' bold
    text = text.replace("\\'", "'")  # quotes escaped by a tf.data error
    start = text.rfind("assertion failed:")
    if start >= 0:
        return text[start + len("assertion failed:"):].split("\n\t [[")[0].strip()
    if text.startswith("Exception encountered when calling") and "\n\n" in text:
        return text.split("\n\n")[1].strip()
    return text.strip()
