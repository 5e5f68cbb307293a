"""Optimizer surgery (merges, files of another layout): the one module that touches Keras optimizer internals.

Written against the private optimizer layout of **Keras 3.15.1** (the
TensorFlow backend's `TFOptimizer` on `keras.src.optimizers.BaseOptimizer`):

- `optimizer._trainable_variables`: the variables it was built with, and
  `optimizer._trainable_variables_indices`: `{optimizer._var_key(v): i}`;
- per-variable state (Adam's `_momentums` and `_velocities`, EMA's
  `_model_variables_moving_average`, `_accumulated_gradients`, ...) in list
  attributes aligned with `_trainable_variables` (None where a method keeps
  nothing for a variable);
- every optimizer variable in `optimizer._variables`, the store of its
  attribute tracker (`optimizer._tracker.config["variables"]`,
  `optimizer._tracker.stored_ids["variables"]`); anything there that is not
  per-variable is a scalar (iterations, learning rate, loss scale, Nadam's
  momentum product).

`check_optimizer_layout` asserts exactly that and names the Keras version in
its message, so a Keras upgrade that moves these fails at the first merge
instead of silently saving stale state; `tests/test_optimizers.py` runs it
on every built-in optimizer.
"""

import keras
import numpy as np
import tensorflow as tf
from keras.src.utils.tracking import DotNotTrackScope

KERAS_VERSION = "3.15.1"


def _layout_error(optimizer, problem):
    return RuntimeError(
        f"mtl_keras.optimizers is written against the private optimizer layout of Keras "
        f"{KERAS_VERSION}; with Keras {keras.__version__}, {type(optimizer).__name__} "
        f"{optimizer.name!r} differs: {problem}. Its state cannot be zeroed by rows or converted between layouts "
        "safely; update mtl_keras/optimizers.py (and tests/test_optimizers.py) to this Keras."
    )


def _slot_lists(optimizer):
    """`{attribute: list}` of the optimizer's per-variable state lists."""
    n = len(optimizer._trainable_variables)
    return {
        name: value
        for name, value in vars(optimizer).items()
        if name not in ("_trainable_variables", "_variables")
        and isinstance(value, list)
        and len(value) == n
        and all(x is None or isinstance(x, keras.Variable) for x in value)
    }


def check_optimizer_layout(optimizer):
    """Raises a `RuntimeError` naming the Keras version when a built optimizer's
    private layout is not the one this module relies on (see the module
    docstring); returns None when it is."""
    for name, kind in (
        ("_trainable_variables", list),
        ("_variables", list),
        ("_trainable_variables_indices", dict),
    ):
        if not isinstance(getattr(optimizer, name, None), kind):
            raise _layout_error(optimizer, f"it has no {kind.__name__} `{name}`")
    tracker = getattr(optimizer, "_tracker", None)
    store = getattr(tracker, "config", {}).get("variables")
    if not (isinstance(store, tuple) and len(store) == 2 and store[1] is optimizer._variables):
        raise _layout_error(optimizer, "`_tracker.config['variables']` is not `(test, optimizer._variables)`")
    if not isinstance(getattr(tracker, "stored_ids", {}).get("variables"), set):
        raise _layout_error(optimizer, "`_tracker.stored_ids['variables']` is not a set")
    if not callable(getattr(optimizer, "_var_key", None)):
        raise _layout_error(optimizer, "it has no `_var_key(variable)`")
    if len(optimizer._trainable_variables_indices) != len(optimizer._trainable_variables):
        raise _layout_error(optimizer, "`_trainable_variables_indices` does not index `_trainable_variables`")
    per_variable = {id(x) for slots in _slot_lists(optimizer).values() for x in slots if x is not None}
    elsewhere = [v.path for v in optimizer._variables if id(v) not in per_variable and len(v.shape) > 0]
    if elsewhere:
        raise _layout_error(
            optimizer,
            f"non-scalar state {elsewhere[:4]} is in no list aligned with `_trainable_variables`, "
            "so the state of a dropped variable could not be found",
        )


def _inner(optimizer):
    return optimizer.inner_optimizer if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) else optimizer


def zero_optimizer_rows(optimizer, variables, rows):
    """Zeroes the optimizer's state of some rows of some variables.

    After a merge, the rows of `TaskHeads`' stacked variables that held a
    dropped estimator are zeroed and no pair reads them again. Their
    momentum, velocity or accumulators are zeroed here too, so that an
    optimizer that updates every row (Adam, say, which would go on moving
    a row with its momentum) leaves them at zero. Only slots shaped like
    their variable have rows; others (e.g. Adafactor's factored moments)
    are left as they are. No variable is created or removed.

    Args:
        optimizer: a Keras optimizer (a `LossScaleOptimizer`'s inner one is
            used); nothing happens when it is not built yet.
        variables: model variables whose first axis is indexed by `rows`.
        rows: row indices.

    Raises:
        RuntimeError: when the optimizer's private layout is not the one of
            the Keras version this module is written against.
    """
    optimizer = _inner(optimizer)
    if not optimizer.built or not len(rows):
        return
    check_optimizer_layout(optimizer)
    index = tf.constant(list(rows), "int32")
    positions = [optimizer._trainable_variables_indices.get(optimizer._var_key(v)) for v in variables]
    for slots in _slot_lists(optimizer).values():
        for variable, i in zip(variables, positions):
            slot = None if i is None else slots[i]
            if slot is None or tuple(slot.shape) != tuple(variable.shape):
                continue
            zeros = tf.zeros((len(rows),) + tuple(slot.shape[1:]), slot.dtype)
            slot.value.scatter_update(tf.IndexedSlices(zeros, index))


def load_state_of_other_layout(optimizer, store, other_shapes, to_this_layout):
    """Loads optimizer state saved for variables of another layout, converted to this one.

    Builds a twin of `optimizer` (same class and config) on placeholder
    variables of `other_shapes`, loads `store` into it as Keras would, then
    sets each of this optimizer's per-variable slots with
    `to_this_layout(slots)`, where `slots` are the twin's slots of one kind
    (e.g. Adam's momentums), aligned with `other_shapes`; non-slot state
    (iterations, learning rate, loss scale) is copied in order.

    Args:
        optimizer: the built optimizer to fill.
        store: the saved optimizer state (`load_own_variables`' argument).
        other_shapes: the shapes of the variables the state was saved for, in order.
        to_this_layout: `list of numpy arrays or None` (a slot per other
            variable) -> `list of numpy arrays or None` (a slot per variable
            of `optimizer`).

    Returns:
        True when the state was loaded; False when the store does not match
        the other layout either, or a slot kind cannot be converted to this
        layout (nothing is changed then).
    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return False  # its own variables (the loss scale) would need a twin of the wrapper too
    inner = optimizer
    twin = type(inner).from_config(inner.get_config())
    with DotNotTrackScope():
        placeholders = [keras.Variable(np.zeros(shape, "float32"), trainable=True, name=f"v{i}")
                        for i, shape in enumerate(other_shapes)]
    twin.build(placeholders)
    if len(store.keys()) != len(twin.variables):
        return False
    twin.load_own_variables(store)
    check_optimizer_layout(twin)
    check_optimizer_layout(inner)
    theirs, ours = _slot_lists(twin), _slot_lists(inner)
    if set(theirs) != set(ours):
        return False
    # Every kind converted and checked before any is assigned: a kind that
    # cannot be converted (factored moments, say) leaves the optimizer as it was.
    assignments = []
    for name, slots in theirs.items():
        try:
            converted = to_this_layout([None if x is None else np.asarray(x.numpy()) for x in slots])
        except (ValueError, TypeError, IndexError):
            return False
        for target, value in zip(ours[name], converted):
            if target is None or value is None:
                continue
            if tuple(np.shape(value)) != tuple(target.shape):
                return False
            assignments.append((target, value))
    for target, value in assignments:
        target.assign(value)
    in_slots = lambda o: {id(x) for slots in _slot_lists(o).values() for x in slots if x is not None}
    their_other = [v for v in twin.variables if id(v) not in in_slots(twin)]
    our_other = [v for v in inner.variables if id(v) not in in_slots(inner)]
    for target, value in zip(our_other, their_other):
        target.assign(value.numpy())
    return True
