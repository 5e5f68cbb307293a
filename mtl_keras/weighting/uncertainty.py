"""Uncertainty weighting: learned homoscedastic noise per task."""

import keras
from keras import ops

from mtl_keras.distribute import num_replicas
from mtl_keras.weighting.base import Weighting, register_weighting


@register_weighting("uncertainty")
class UncertaintyWeighting(Weighting):
    """Uncertainty weighting (Kendall, Gal, Cipolla: "Multi-Task Learning Using
    Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018).

    Each task t has a learned log-variance `s_t = log sigma_t^2` (a weight of
    this layer: trained by the model's optimizer, saved with the model). The
    objective is the paper's Eq. 7 in that parametrisation, averaged over the
    present tasks:

        mean_t [ 0.5 exp(-s_t) weight_t L_t + 0.5 s_t ]

    so a task whose loss stays high (a noisy task) learns a larger `s_t` and
    a smaller weight `0.5 exp(-s_t)`: at the optimum `exp(s_t) = L_t`. The
    same form is used for classification tasks (the paper's Eq. 10 differs
    by the factor 1/2 on the loss, which only shifts `s_t`). The objective
    can be negative.

    Cost: T extra parameters; no extra computation.

    Args:
        initial_log_variance: starting `s_t` (0, i.e. sigma = 1).

    Example:

    >>> model = MultiTaskModel(backbone, tasks, weighting="uncertainty")
    >>> model.weighting.current_weights()  # 0.5 * exp(-s)
    """

    def __init__(self, initial_log_variance=0.0, **kwargs):
        super().__init__(**kwargs)
        self.initial_log_variance = float(initial_log_variance)

    def create_state(self, num_tasks):
        self.log_variance = self.add_weight(
            shape=(int(num_tasks),),
            initializer=keras.initializers.Constant(self.initial_log_variance),
            name="log_variance",
        )

    def combine(self, task_losses, present, task_weights, global_task_losses):
        p = ops.cast(present, "float32")
        s = ops.cast(self.log_variance, "float32")
        # The regulariser is not a per-example loss: each replica adds 1/R of it.
        terms = 0.5 * ops.exp(-s) * task_weights * task_losses + 0.5 * s / num_replicas()
        return ops.sum(terms * p) / ops.maximum(ops.sum(p), 1.0)

    def current_weights(self):
        return ops.convert_to_numpy(0.5 * ops.exp(-self.log_variance))

    def get_config(self):
        return {**super().get_config(), "initial_log_variance": self.initial_log_variance}
