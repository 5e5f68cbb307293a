"""How task losses are combined into the one objective the optimizer minimises.

LibMTL separates *architecture* (how parameters are shared) from *weighting*
(how task losses and gradients are combined); so do we. A weighting is a
Keras layer owned by the model, so any state it learns (e.g. uncertainty
log-variances) is saved, restored and exported with the model.

The model's `train_step` talks to a weighting through three methods:

1. `combine(task_losses, present, task_weights, global_task_losses)` gives
   the scalar objective (also used for the validation loss);
2. `compute_gradients(tape, objective, variables, step)` turns it into one
   gradient per variable: plain `tape.gradient` for loss weightings, a
   combination of per-task trunk gradients for gradient methods;
3. `end_train_step(step)`, after the optimizer's update, updates the
   method's non-trainable state (loss statistics, weight renormalisation).
"""

import keras
from keras import ops

_REGISTRY = {}


def register_weighting(name):
    """Class decorator: makes a weighting selectable by `name` (`--weighting NAME`).

    The class is also registered as a Keras serializable, so models using it
    round-trip through `.keras` files.

    Example:

    >>> @register_weighting("half")
    ... class Half(Weighting):
    ...     def combine(self, task_losses, present, task_weights, global_task_losses):
    ...         return 0.5 * ops.sum(task_losses * task_weights)
    """

    def wrap(cls):
        _REGISTRY[name] = cls
        cls.registered_name = name
        return keras.saving.register_keras_serializable(package="mtl_keras")(cls)

    return wrap


def available_weightings():
    """Sorted names accepted by `get_weighting` and `MultiTaskModel(weighting=...)`."""
    return sorted(_REGISTRY)


def get_weighting(identifier, **kwargs):
    """A weighting instance from a name, an instance, a config dict, or None (equal weights).

    Args:
        identifier: a registered name (see `available_weightings()`), a
            `Weighting`, a serialized config, or None.
        **kwargs: constructor arguments when `identifier` is a name, e.g.
            `get_weighting("gradnorm", alpha=1.0)`.

    Returns:
        A `Weighting`.
    """
    if identifier is None:
        identifier = "equal"
    if isinstance(identifier, Weighting):
        return identifier
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    if not isinstance(identifier, str) or identifier not in _REGISTRY:
        raise ValueError(
            f"Unknown weighting {identifier!r}; available: {available_weightings()}. "
            "Pass one of these names (e.g. MultiTaskModel(..., weighting='pcgrad')) or a "
            "Weighting instance."
        )
    return _REGISTRY[identifier](**kwargs)


def present_mean(values, present):
    """Mean of `values` [T] over the present tasks (0 when none is present)."""
    p = ops.cast(present, values.dtype)
    return ops.sum(values * p) / ops.maximum(ops.sum(p), 1.0)


class Weighting(keras.layers.Layer):
    """Base class: turns `[T]` task losses into a scalar objective and its gradients.

    `task_losses[t]` is this replica's share of task t's mean loss over the
    global batch (the shares of all replicas add up to the mean), so any
    combination that is linear in the task losses is exact under a
    distribution strategy. `present[t]` tells whether task t had any labelled
    example in the global batch; absent tasks must not contribute.

    Subclasses override `combine`; methods with variables create them in
    `create_state(num_tasks)`; methods that need more than the gradient
    of the objective override `compute_gradients` (and set
    `needs_task_gradients = True` when they call the tape more than once, so
    the model records on a persistent tape), and methods with state override
    `end_train_step`.

    Scale convention: every method is normalised like `EqualWeighting` (the
    mean over present tasks), so a learning rate tuned for one works for the
    others.
    """

    needs_task_gradients = False

    def build(self, num_tasks):
        # Called by the model's constructor, and by Keras before that when a
        # saved weighting is deserialised: build once.
        num_tasks = int(num_tasks)
        if self.built:
            if num_tasks != self.num_tasks:
                raise ValueError(
                    f"{type(self).__name__} was built for {self.num_tasks} tasks and cannot be "
                    f"used for {num_tasks}; create a new one."
                )
            return
        self.num_tasks = num_tasks
        self.create_state(num_tasks)
        self.built = True

    def create_state(self, num_tasks):
        """Creates the method's variables (override; called once, by `build`)."""

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

    def compute_gradients(self, tape, objective, variables, step):
        """The gradients the optimizer applies, one per variable (this replica's share).

        Args:
            tape: the `tf.GradientTape` that recorded the step (persistent
                when `needs_task_gradients`).
            objective: the (loss-scaled) objective returned by `combine`,
                plus regularisation losses.
            variables: the model's trainable variables.
            step: the step's `mtl_keras.step.StepContext`: its pairs,
                the trunk features on the tape, the task losses, the
                (loss-scaled) regularisation, the trunk and its variables,
                the loss scale, the iteration and the replica count.

        Returns:
            A list aligned with `variables`.
        """
        return tape.gradient(objective, variables)

    def end_train_step(self, step):
        """Updates non-trainable state after the optimizer step (training only).

        Args:
            step: the step's `mtl_keras.step.StepContext`.
        """

    def current_weights(self):
        """The per-task multipliers this method currently applies, as numpy `[T]`
        (on top of `Task.weight` and the 1/(present tasks) normalisation)."""
        return ops.convert_to_numpy(ops.ones((self.num_tasks,)))

    def call(self, *args, **kwargs):
        return self.combine(*args, **kwargs)


@register_weighting("equal")
class EqualWeighting(Weighting):
    """The mean over present tasks of each task's weighted loss.

    Cost: none beyond the single-task-sum backward pass.

    Example:

    >>> model = MultiTaskModel(backbone, tasks, weighting="equal")
    """

    def combine(self, task_losses, present, task_weights, global_task_losses):
        present = ops.cast(present, "float32")
        return ops.sum(task_losses * task_weights * present) / ops.maximum(ops.sum(present), 1.0)
