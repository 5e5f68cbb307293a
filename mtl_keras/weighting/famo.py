"""FAMO: decrease every task's loss at the same rate, without per-task gradients."""

from keras import ops

from mtl_keras.weighting.base import Weighting, register_weighting

LOSS_AFTER_UPDATE = ("same_batch", "next_batch")


def masked_softmax(logits, mask):
    """Softmax of `logits` over the entries where `mask` is True (0 elsewhere)."""
    m = ops.cast(mask, logits.dtype)
    shifted = ops.where(mask, logits, ops.cast(-1e30, logits.dtype))
    e = ops.exp(shifted - ops.max(shifted)) * m
    return e / ops.maximum(ops.sum(e), 1e-30)


def loss_gap(losses, min_losses=0.0, epsilon=1e-8):
    """Each task loss's distance above its lower bound, `l_t - m_t + eps`, kept positive."""
    return ops.maximum(losses - min_losses, 0.0) + epsilon


def famo_loss_weights(logits, losses, present, min_losses=0.0, epsilon=1e-8):
    """The multipliers of the task losses in FAMO's gradient, `[T]`, summing to 1 over present tasks.

    FAMO descends `sum_t z_t log(l_t - m_t + eps) / c` with `z = softmax(xi)`
    and `c = sum_t z_t / (l_t - m_t + eps)` held constant, whose gradient is
    `sum_t a_t grad l_t` with `a_t = (z_t / (l_t - m_t + eps)) / c`. Here the
    softmax and the sum run over the present tasks.

    Args:
        logits: `[T]` the task logits `xi`.
        losses: `[T]` the task losses (no gradient flows through the weights).
        present: `[T]` bool.
        min_losses: `[T]` or scalar, each loss's lower bound `m_t` (0 for
            cross-entropy and squared error).
        epsilon: keeps the logarithm finite at the bound.

    Returns:
        `[T]` weights `a`.
    """
    z = masked_softmax(logits, present)
    a = z / loss_gap(losses, min_losses, epsilon)
    return a / ops.maximum(ops.sum(a), 1e-30)


def famo_logit_gradient(logits, log_loss_before, log_loss_after, mask):
    """FAMO's gradient for the task logits, `[T]`.

    `delta = log l(theta_t) - log l(theta_t+1)` is each task's
    log-loss decrease over the last update; the gradient is that of
    `z(xi)^T delta`, `z_i (delta_i - z^T delta)`: tasks that fell faster
    than the `z`-weighted average lose weight, slower ones gain it. The
    softmax runs over the tasks in `mask` (measured before and after); the
    others get 0.
    """
    z = masked_softmax(logits, mask)
    delta = ops.where(mask, log_loss_before - log_loss_after, 0.0)
    return z * (delta - ops.sum(z * delta))


@register_weighting("famo")
class FAMO(Weighting):
    """FAMO (Liu, Liu, Stone, Liu: "FAMO: Fast Adaptive Multitask Optimization",
    NeurIPS 2023).

    Balances the tasks by the *rate* at which their losses fall, with no
    per-task gradient: the step descends `sum_t z_t log l_t` (see
    `famo_loss_weights`: each task's loss weighted by `z_t / l_t`, so a task
    whose loss is already small is not drowned by large ones), and after the
    optimizer's update the task logits `xi` (`z = softmax(xi)`) take one
    Adam step on `famo_logit_gradient`, raising the weight of the tasks
    whose log-loss fell least, plus a decay `gamma xi` towards equal weights.
    This follows the authors' code: Adam on the logits with learning rate
    0.025 and L2 decay `gamma` = 0.01, losses bounded below by 0.

    How the loss after the update is measured (`loss_after_update`):

    - `"same_batch"` (the paper's): one more forward pass of the same batch
      under the updated weights (training mode, no gradient, batch norm's
      moving statistics untouched), about a third of a training step more;
    - `"next_batch"`: the next step's losses, which that step computes
      anyway, so FAMO costs nothing; the decrease then also carries the
      difference between two batches (noisier, more so when each task has
      few examples per batch).

    With one task per example, a task absent from a batch keeps its logit
    (but for Adam's momentum and the decay) and gets no weight in it.
    Exact under a distribution strategy: the weights come from the global
    task losses, and every replica takes the same logit step.

    `current_weights()` reports `T softmax(xi)`, the method's standing
    preference; each step's multipliers also divide by the task's loss.
    The authors also clip the trunk's gradient norm to 1; with Keras that is
    the optimizer's `clipnorm`, left to the user.

    Cost: `O(T)` per step, plus one forward pass with `"same_batch"`.

    Args:
        learning_rate: Adam's step size for the task logits (0.025).
        gamma: L2 decay of the logits (0.01).
        loss_after_update: `"same_batch"` or `"next_batch"` (above).
        min_loss: lower bound of every task's loss (0).
        epsilon: keeps `log(l - min_loss)` finite.

    Example:

    >>> model = MultiTaskModel(backbone, tasks, weighting="famo")
    >>> model = MultiTaskModel(backbone, tasks, weighting=FAMO(loss_after_update="next_batch"))
    """

    def __init__(self, learning_rate=0.025, gamma=0.01, loss_after_update="same_batch", min_loss=0.0,
                 epsilon=1e-8, **kwargs):
        super().__init__(**kwargs)
        if not learning_rate > 0:
            raise ValueError(f"FAMO's learning_rate must be > 0, got {learning_rate!r}.")
        if not gamma >= 0:
            raise ValueError(f"FAMO's gamma must be >= 0, got {gamma!r}.")
        if loss_after_update not in LOSS_AFTER_UPDATE:
            raise ValueError(
                f"FAMO's loss_after_update must be one of {LOSS_AFTER_UPDATE} ('same_batch': the paper's, "
                f"one more forward pass; 'next_batch': free), got {loss_after_update!r}."
            )
        if not epsilon > 0:
            raise ValueError(f"FAMO's epsilon must be > 0, got {epsilon!r}.")
        self.learning_rate = float(learning_rate)
        self.gamma = float(gamma)
        self.loss_after_update = loss_after_update
        self.min_loss = float(min_loss)
        self.epsilon = float(epsilon)
        self.beta_1, self.beta_2, self.adam_epsilon = 0.9, 0.999, 1e-8  # torch.optim.Adam's

    def create_state(self, num_tasks):
        def state(name, shape=(num_tasks,)):
            # Every replica computes the same update from global losses.
            return self.add_weight(shape=shape, initializer="zeros", trainable=False,
                                   aggregation="only_first_replica", name=name)

        self.logits = state("logits")
        self.logit_m = state("logit_m")
        self.logit_v = state("logit_v")
        self.updates = state("updates", ())
        # The last step's log-losses, for loss_after_update="next_batch".
        self.last_log_loss = state("last_log_loss")
        self.last_present = state("last_present")

    def _log_gap(self, losses):
        return ops.log(loss_gap(losses, self.min_loss, self.epsilon))

    def combine(self, task_losses, present, task_weights, global_task_losses):
        a = famo_loss_weights(self.logits, ops.stop_gradient(global_task_losses), present,
                              self.min_loss, self.epsilon)
        a = ops.stop_gradient(a)
        return ops.sum(a * task_weights * task_losses * ops.cast(present, task_losses.dtype))

    def end_train_step(self, step):
        now = self._log_gap(step.global_task_losses)
        if self.loss_after_update == "same_batch":
            before, after, mask = now, self._log_gap(step.task_losses_fn()), step.present
        else:
            before, after = self.last_log_loss, now
            mask = ops.logical_and(self.last_present > 0, step.present)
            self.last_log_loss.assign(ops.where(step.present, now, self.last_log_loss))
            self.last_present.assign(ops.cast(step.present, "float32"))
        self._adam_step(famo_logit_gradient(self.logits, before, after, mask), ops.any(mask))

    def _adam_step(self, gradient, due):
        g = gradient + self.gamma * self.logits
        count = self.updates + 1.0
        m = self.beta_1 * self.logit_m + (1.0 - self.beta_1) * g
        v = self.beta_2 * self.logit_v + (1.0 - self.beta_2) * g * g
        m_hat = m / (1.0 - self.beta_1 ** count)
        v_hat = v / (1.0 - self.beta_2 ** count)
        logits = self.logits - self.learning_rate * m_hat / (ops.sqrt(v_hat) + self.adam_epsilon)
        # No task measured twice (the first step of "next_batch"): no step.
        self.logit_m.assign(ops.where(due, m, self.logit_m))
        self.logit_v.assign(ops.where(due, v, self.logit_v))
        self.logits.assign(ops.where(due, logits, self.logits))
        self.updates.assign(ops.where(due, count, self.updates))

    def current_weights(self):
        return ops.convert_to_numpy(self.num_tasks * ops.softmax(self.logits))

    def get_config(self):
        return {
            **super().get_config(),
            "learning_rate": self.learning_rate,
            "gamma": self.gamma,
            "loss_after_update": self.loss_after_update,
            "min_loss": self.min_loss,
            "epsilon": self.epsilon,
        }
