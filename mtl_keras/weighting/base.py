"""How task losses are combined into the one objective the optimizer minimises.

LibMTL separates *architecture* (how parameters are shared) from *weighting*
(how task losses and gradients are combined); so do we. A weighting is a
Keras layer owned by the model, so any state it learns (e.g. uncertainty
log-variances) is saved, restored and exported with the model.
"""

import keras
from keras import ops

_REGISTRY = {}


def register_weighting(name):
    """Class decorator: makes a weighting selectable by `name` (`--weighting NAME`)."""

    def wrap(cls):
        _REGISTRY[name] = cls
        cls.registered_name = name
        return keras.saving.register_keras_serializable(package="mtl_keras")(cls)

    return wrap


def available_weightings():
    return sorted(_REGISTRY)


def get_weighting(identifier, **kwargs):
    """A weighting instance from a name, an instance, or None (equal weights)."""
    if identifier is None:
        identifier = "equal"
    if isinstance(identifier, Weighting):
        return identifier
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    if identifier not in _REGISTRY:
        raise ValueError(
            f"Unknown weighting {identifier!r}; available: {available_weightings()}."
        )
    return _REGISTRY[identifier](**kwargs)


class Weighting(keras.layers.Layer):
    """Base class: turns `[T]` task losses into a scalar objective.

    `task_losses[t]` is this replica's share of task t's mean loss over the
    global batch (the shares of all replicas add up to the mean), so any
    combination that is linear in the task losses is exact under a
    distribution strategy. `present[t]` tells whether task t had any labelled
    example in the global batch; absent tasks must not contribute.

    Subclasses override `combine`; methods that need per-task gradients set
    `needs_task_gradients = True` and override `combine_gradients`.
    """

    needs_task_gradients = False

    def build(self, num_tasks):
        self.num_tasks = num_tasks
        self.built = True

    def combine(self, task_losses, present, task_weights, global_task_losses):
        """Args:
            task_losses: `[T]` float32, this replica's share (differentiable).
            present: `[T]` bool.
            task_weights: `[T]` float32, the `Task.weight`s.
            global_task_losses: `[T]` float32 task losses summed over replicas
                (no gradient), for methods whose weights depend on loss values.

        Returns:
            A scalar: this replica's share of the objective.
        """
        raise NotImplementedError

    def call(self, *args, **kwargs):
        return self.combine(*args, **kwargs)


@register_weighting("equal")
class EqualWeighting(Weighting):
    """The mean over present tasks of each task's weighted loss."""

    def combine(self, task_losses, present, task_weights, global_task_losses):
        present = ops.cast(present, "float32")
        return ops.sum(task_losses * task_weights * present) / ops.maximum(ops.sum(present), 1.0)
