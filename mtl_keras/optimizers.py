"""Optimizer surgery after a merge: the one module that touches Keras optimizer internals.

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
from keras.src.utils.tracking import DotNotTrackScope

KERAS_VERSION = "3.15.1"


def _layout_error(optimizer, problem):
    return RuntimeError(
        f"mtl_keras.optimizers is written against the private optimizer layout of Keras "
        f"{KERAS_VERSION}; with Keras {keras.__version__}, {type(optimizer).__name__} "
        f"{optimizer.name!r} differs: {problem}. Merging estimators cannot prune its state "
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
    private layout is not the one `prune_optimizer` relies on (see the module
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


def prune_optimizer(optimizer, keep_variables):
    """Forgets the optimizer state of variables not in `keep_variables`.

    Keras 3 optimizers keep one slot per variable they were built with (Adam's
    momentum and velocity, EMA, gradient accumulators) in lists indexed by
    the variable's position. After a merge drops estimator variables, their
    slots would still be saved, and a `.keras` reload (whose optimizer is
    built on the surviving variables only) could not match them. Removing
    them keeps the surviving slots (same objects, same values) in the order a
    fresh build on the surviving variables gives. No variable is created.

    Args:
        optimizer: a Keras optimizer (a `LossScaleOptimizer` is pruned with
            its inner optimizer); nothing happens when it is not built yet.
        keep_variables: the model variables whose state survives, e.g. the
            model's `trainable_variables` after the merge.

    Raises:
        RuntimeError: when the optimizer's private layout is not the one of
            the Keras version this module is written against.

    Example:

    >>> model.heads[1].drop_estimator()  # its variables leave the model
    >>> prune_optimizer(model.optimizer, model.trainable_variables)
    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        prune_optimizer(optimizer.inner_optimizer, keep_variables)
    if not optimizer.built:
        return
    check_optimizer_layout(optimizer)
    old = list(optimizer._trainable_variables)
    keep_keys = {optimizer._var_key(v) for v in keep_variables}
    kept = [i for i, v in enumerate(old) if optimizer._var_key(v) in keep_keys]
    if len(kept) == len(old):
        return
    kept_set = set(kept)
    removed = set()
    originally_tracked = list(optimizer._variables)
    with DotNotTrackScope():  # Keras' tracker must not re-collect what we set
        for name, value in _slot_lists(optimizer).items():
            removed.update(id(x) for i, x in enumerate(value) if i not in kept_set and x is not None)
            setattr(optimizer, name, [value[i] for i in kept])
        survivors = [old[i] for i in kept]
        optimizer._trainable_variables = survivors
        # A new list rather than deleting from the old one: TensorFlow refuses
        # to save (SavedModel export) a tracked list that had items deleted.
        optimizer._variables = [v for v in originally_tracked if id(v) not in removed]
    optimizer._trainable_variables_indices = {optimizer._var_key(v): i for i, v in enumerate(survivors)}
    store = optimizer._variables
    optimizer._tracker.config["variables"] = (optimizer._tracker.config["variables"][0], store)
    optimizer._tracker.stored_ids["variables"] = {id(v) for v in store}
