"""What one step of `MultiTaskModel` hands to its weighting and its gradient observers.

The model builds these records inside its (traced) train and test steps, so
their tensor fields are the step's symbolic tensors; a field that changes
during the step (the loss scale, once the optimizer applies it) gives a new
record through `dataclasses.replace`, never an in-place update.

Consumers:

- `Weighting.compute_gradients(tape, objective, variables, step)` and
  `Weighting.end_train_step(step)` (see `mtl_keras.weighting`);
- every `model.gradient_observers` entry, called as
  `observer(variables, grads, step)` after the gradients are computed and
  before the optimizer applies them (see `sharing.GradientCollector`).
"""

import dataclasses
from typing import Callable, Dict, Optional

import keras
import tensorflow as tf


@dataclasses.dataclass(frozen=True, eq=False)
class Pairs:
    """A batch flattened into (example, task) pairs, as `MultiTaskModel.make_pairs` returns it.

    Example:

    >>> pairs = model.make_pairs({"image": x}, y, training=True)
    >>> pairs.task_ids.shape  # [batch * tasks_per_step]
    """

    images: Dict[str, tf.Tensor]
    """The batch's image inputs, `{input name: [B, ...]}` (no `task` entry)."""

    rows: Optional[tf.Tensor]
    """`[P]` int32: the example of each pair; None when the pairs are the
    examples (one task per example)."""

    task_ids: tf.Tensor
    """`[P]` int32: the task of each pair."""

    labels: tf.Tensor
    """`[P, label_width]` float32: each pair's label (0 where it is missing)."""

    weights: tf.Tensor
    """`[P]` float32: each pair's weight in its task's loss (0 for a missing
    label or a zero sample weight)."""


@dataclasses.dataclass(frozen=True, eq=False)
class StepContext:
    """One step's pairs, outputs and losses, for weightings and gradient observers.

    Example:

    >>> counts = tf.Variable(tf.zeros(len(tasks)), trainable=False)
    >>> def count_pairs(variables, grads, step):  # a gradient observer
    ...     counts.assign_add(tf.math.unsorted_segment_sum(step.pairs.weights, step.pairs.task_ids, len(tasks)))
    >>> model.gradient_observers.append(count_pairs)
    """

    pairs: Pairs
    """The batch as (example, task) pairs."""

    logits: tf.Tensor
    """`[P, max_outputs]` logits of each pair's task (see `TaskHeads`)."""

    losses: tf.Tensor
    """`[P]` float32: each pair's loss under its task's loss function."""

    features: tf.Tensor
    """`[P, D]`: the trunk's output for each pair, the heads' input, recorded
    on the step's tape (gradient methods differentiate with respect to it)."""

    task_losses: tf.Tensor
    """`[T]` float32: this replica's share of each task's mean loss over the
    global batch (differentiable; the replicas' shares add up to the mean)."""

    present: tf.Tensor
    """`[T]` bool: whether a task had a labelled pair in the global batch."""

    task_weights: tf.Tensor
    """`[T]` float32: each `Task.weight`."""

    global_task_losses: tf.Tensor
    """`[T]` float32: each task's mean loss over the global batch, summed
    over replicas (no gradient)."""

    regularization: Optional[tf.Tensor]
    """Scalar: this replica's share of the layers' regularisation losses,
    multiplied by `loss_scale`; None when the model has none."""

    loss_scale: tf.Tensor
    """Scalar: the factor the optimizer scales the objective by (1 without a
    `LossScaleOptimizer`; no gradient)."""

    iteration: Optional[tf.Variable]
    """The optimizer's iteration count before this step's update; None in
    evaluation."""

    num_replicas: int
    """Replicas in sync: each one hands the optimizer its share of the gradient."""

    backbone: keras.Model
    """The shared trunk."""

    features_fn: Callable[[Dict[str, tf.Tensor], tf.Tensor], tf.Tensor]
    """`(images, task_ids) -> features`: the trunk in this step's mode
    (training or not) on any images; `task_ids` route it when it routes."""

    task_losses_fn: Callable[[], tf.Tensor]
    """`() -> [T]` float32: each task's mean loss over this step's global
    batch, summed over replicas like `global_task_losses`, but under the
    model's weights *as they are when called* (e.g. after the optimizer's
    update: FAMO compares the two). One more forward pass of the batch, in
    the step's mode and without gradient; batch norm's moving statistics
    are left as they were."""

    @property
    def shared_variables(self):
        """The trunk's trainable variables (the ones all tasks share)."""
        return self.backbone.trainable_variables
