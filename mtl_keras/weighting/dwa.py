"""Dynamic Weight Average: weight tasks by how slowly their loss is falling."""

import keras
import numpy as np
from keras import ops

from mtl_keras.weighting.base import Weighting, register_weighting


class _EpochBoundary(keras.metrics.Metric):
    """A metric-shaped hook: Keras resets every metric when an epoch (or an
    evaluation) starts, which is the only epoch signal a model gets without
    a callback. Logs nothing."""

    def __init__(self, on_reset, name="epoch_boundary"):
        super().__init__(name=name)
        self._on_reset = on_reset

    def update_state(self, *args, **kwargs):
        pass

    def result(self):
        return {}

    def reset_state(self):
        self._on_reset()


def dwa_weights(last, previous, present, temperature=2.0):
    """DWA's weights from two epochs' average task losses.

    `w_t = K exp(r_t / T) / sum_i exp(r_i / T)` with `r_t = last_t /
    previous_t` and K the number of present tasks (the softmax runs over
    them; absent tasks get 0). A task without both averages gets `r = 1`.

    Args:
        last: `[T]` average losses of the last epoch (0 = unknown).
        previous: `[T]` of the epoch before.
        present: `[T]` bool.
        temperature: the paper's T (2).

    Returns:
        `[T]` weights averaging 1 over present tasks.
    """
    p = ops.cast(present, "float32")
    known = ops.logical_and(last > 0, previous > 0)
    ratio = ops.where(known, last / ops.where(known, previous, 1.0), 1.0)
    logits = ops.where(present, ratio / temperature, -1e9)
    return ops.sum(p) * ops.softmax(logits) * p


@register_weighting("dwa")
class DynamicWeightAverage(Weighting):
    """Dynamic Weight Average (Liu, Johns, Davison: "End-to-End Multi-Task
    Learning with Attention", CVPR 2019).

    Task t's weight for this epoch is `K softmax(r / T)_t` with `r_t =
    L_t(e-1) / L_t(e-2)`, the ratio of its average training loss over the
    last two epochs, and temperature `T = 2`: a task whose loss falls more
    slowly is weighted up. The first two epochs use weight 1.

    The per-epoch averages are kept in non-trainable variables (saved with
    the model, so a resumed training keeps them), accumulated in the train
    step from the global (all-replica) task losses, so they are exact under
    a distribution strategy. An epoch ends when Keras resets the model's
    metrics (start of each `fit` epoch, start of `evaluate`), so no callback
    is needed; calling `model.reset_metrics()` mid-epoch also ends one.

    Cost: none measurable (`O(T)` per step).

    Args:
        temperature: the softmax temperature (2, as in the paper).

    Example:

    >>> model = MultiTaskModel(backbone, tasks, weighting="dwa")
    >>> model.fit(train, epochs=10)  # weights change from epoch 3 on
    """

    def __init__(self, temperature=2.0, **kwargs):
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"DWA's temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)
        self.epoch_boundary = _EpochBoundary(self._end_epoch)

    def create_state(self, num_tasks):
        num_tasks = int(num_tasks)

        def state(name, shape=(num_tasks,)):
            # Every replica writes the same (all-reduced) value.
            return self.add_weight(
                shape=shape,
                initializer="zeros",
                trainable=False,
                aggregation="only_first_replica",
                name=name,
            )

        self.epoch_loss_sum = state("epoch_loss_sum")
        self.epoch_steps = state("epoch_steps")
        self.last_epoch_loss = state("last_epoch_loss")
        self.previous_epoch_loss = state("previous_epoch_loss")
        self.completed_epochs = state("completed_epochs", ())

    def _end_epoch(self):
        if not self.built:
            return
        steps = np.asarray(ops.convert_to_numpy(self.epoch_steps))
        if not np.any(steps > 0):
            return
        sums = np.asarray(ops.convert_to_numpy(self.epoch_loss_sum))
        last = np.asarray(ops.convert_to_numpy(self.last_epoch_loss))
        mean = np.where(steps > 0, sums / np.maximum(steps, 1), 0.0).astype("float32")
        self.previous_epoch_loss.assign(last)
        self.last_epoch_loss.assign(mean)
        self.completed_epochs.assign(self.completed_epochs + 1.0)
        self.epoch_loss_sum.assign(np.zeros_like(sums))
        self.epoch_steps.assign(np.zeros_like(steps))

    def task_multipliers(self, present):
        """The DWA weights for this epoch, `[T]`."""
        w = dwa_weights(self.last_epoch_loss, self.previous_epoch_loss, present, self.temperature)
        return ops.where(self.completed_epochs >= 2.0, w, ops.ones_like(w))

    def combine(self, task_losses, present, task_weights, global_task_losses):
        p = ops.cast(present, "float32")
        w = ops.stop_gradient(self.task_multipliers(present))
        return ops.sum(w * task_weights * task_losses * p) / ops.maximum(ops.sum(p), 1.0)

    def end_train_step(self, step):
        p = ops.cast(step.present, "float32")
        self.epoch_loss_sum.assign_add(step.global_task_losses * p)
        self.epoch_steps.assign_add(p)

    def current_weights(self):
        return ops.convert_to_numpy(self.task_multipliers(ops.ones((self.num_tasks,), "bool")))

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}
