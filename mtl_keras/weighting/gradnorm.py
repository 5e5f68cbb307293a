"""GradNorm: learn loss weights that balance the tasks' gradient norms."""

import keras
from keras import ops

from mtl_keras.distribute import all_reduce_sum
from mtl_keras.weighting.base import Weighting, present_mean, register_weighting


def gradnorm_weight_gradient(norms, weights, losses, initial_losses, present, alpha=1.5):
    """The gradient of GradNorm's `L_grad` w.r.t. the loss weights.

    `L_grad = sum_t |G_t - mean(G) r_t^alpha|`, with `G_t = |grad(w_t L_t)|`,
    `r_t = (L_t / L_t(0)) / mean_i (L_i / L_i(0))`, and the target held
    constant (the paper's Eq. 2). As `G_t = w_t |grad L_t|`, the gradient is
    `sign(G_t - target_t) G_t / w_t`. Means run over present tasks; absent
    tasks get 0.

    Args:
        norms: `[T]` `G_t`, the weighted tasks' gradient norms.
        weights: `[T]` the current `w_t` (> 0).
        losses: `[T]` current task losses.
        initial_losses: `[T]` first losses `L_t(0)`.
        present: `[T]` bool.
        alpha: the restoring-force strength.

    Returns:
        `([T] gradient, [T] target norms)`.
    """
    inverse_rate = losses / ops.maximum(initial_losses, 1e-12)
    relative = inverse_rate / ops.maximum(present_mean(inverse_rate, present), 1e-12)
    target = present_mean(norms, present) * ops.power(ops.maximum(relative, 0.0), alpha)
    grad = ops.sign(norms - target) * norms / ops.maximum(weights, 1e-12)
    return ops.where(present, grad, 0.0), target


@register_weighting("gradnorm")
class GradNorm(Weighting):
    """GradNorm (Chen, Badrinarayanan, Lee, Rabinovich: "GradNorm: Gradient
    Normalization for Adaptive Loss Balancing in Deep Multitask Networks",
    ICML 2018).

    The objective is `mean_t w_t weight_t L_t` with learned loss weights
    `w_t` (a weight of this layer, saved with the model). The model's
    optimizer trains `w` on `L_grad` (see `gradnorm_weight_gradient`), which
    pulls each task's gradient norm `G_t` towards the mean norm times its
    relative inverse training rate to the power `alpha` (1.5 by default, the
    paper's most used value; `alpha = 0` equalises the norms). After every
    step the weights are renormalised to sum to T (floored at 1e-3 to stay
    positive).

    `G_t` is measured w.r.t. the shared representation (the trunk's output
    features, `[P, D]`), which LibMTL calls `rep_grad` and the paper allows
    as the last shared layer's output: it costs nothing extra, the norms come
    out of the one backward pass through the heads. (Unlike directions,
    norms stay meaningful although with one task per example the tasks'
    feature gradients sit on disjoint rows.) `L_t(0)` is each task's loss
    at the first step it is present.

    Cost: one extra `[P, D]` squared-norm segment sum and `O(T)` per step.

    Args:
        alpha: GradNorm's asymmetry hyper-parameter.
        min_weight: floor of the loss weights after renormalisation.

    Example:

    >>> model = MultiTaskModel(backbone, tasks, weighting="gradnorm")
    """

    def __init__(self, alpha=1.5, min_weight=1e-3, **kwargs):
        super().__init__(**kwargs)
        self.alpha = float(alpha)
        self.min_weight = float(min_weight)

    def create_state(self, num_tasks):
        num_tasks = int(num_tasks)
        # Every replica computes the same (all-reduced) update.
        self.loss_weights = self.add_weight(
            shape=(num_tasks,), initializer="ones", aggregation="only_first_replica", name="loss_weights"
        )
        self.initial_losses = self.add_weight(
            shape=(num_tasks,),
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
            name="initial_losses",
        )

    def combine(self, task_losses, present, task_weights, global_task_losses):
        p = ops.cast(present, "float32")
        w = ops.stop_gradient(ops.cast(self.loss_weights, "float32"))
        return ops.sum(w * task_weights * task_losses * p) / ops.maximum(ops.sum(p), 1.0)

    def compute_gradients(self, tape, objective, variables, step):
        own = [i for i, v in enumerate(variables) if v is self.loss_weights]
        if not own:  # frozen (`trainable=False`): fixed loss weights
            return tape.gradient(objective, variables)
        own = own[0]
        others = [v for i, v in enumerate(variables) if i != own]
        grads = tape.gradient(objective, others + [step.features])
        feature_grads = ops.cast(grads[-1], "float32")
        present = step.present
        num_tasks = self.num_tasks
        n_present = ops.maximum(ops.sum(ops.cast(present, "float32")), 1.0)
        sq = ops.segment_sum(ops.sum(feature_grads**2, axis=1), step.pairs.task_ids, num_segments=num_tasks)
        # Rows of different replicas are different pairs: squared norms add up.
        # Undo the objective's 1 / (present tasks) and the loss scale.
        norms = ops.sqrt(all_reduce_sum(sq)) * n_present / step.loss_scale
        losses = step.global_task_losses
        initial = self._initial(losses, present)
        grad_w, _ = gradnorm_weight_gradient(
            norms, ops.convert_to_tensor(self.loss_weights), losses, initial, present, self.alpha
        )
        # The optimizer unscales and sums over replicas.
        grad_w = grad_w * step.loss_scale / step.num_replicas
        out = list(grads[:-1])
        out.insert(own, grad_w)
        return out

    def _initial(self, losses, present):
        unset = ops.logical_and(present, self.initial_losses <= 0)
        return ops.where(unset, losses, self.initial_losses)

    def end_train_step(self, step):
        self.initial_losses.assign(self._initial(step.global_task_losses, step.present))
        w = ops.maximum(ops.convert_to_tensor(self.loss_weights), self.min_weight)
        self.loss_weights.assign(w * self.num_tasks / ops.sum(w))

    def current_weights(self):
        return ops.convert_to_numpy(self.loss_weights)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "min_weight": self.min_weight}
