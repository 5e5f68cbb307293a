"""Optimizer surgery (zeroed rows after a merge, state of another layout), against the pinned Keras' private layout."""

import re

import keras
import numpy as np
import pytest

from mtl_keras.optimizers import KERAS_VERSION, check_optimizer_layout, load_state_of_other_layout, zero_optimizer_rows

BUILTIN = {
    "sgd_momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adam_amsgrad": lambda: keras.optimizers.Adam(0.01, amsgrad=True),
    "adam_ema": lambda: keras.optimizers.Adam(0.01, use_ema=True),
    "adam_accumulation": lambda: keras.optimizers.Adam(0.01, gradient_accumulation_steps=2),
    "adam_schedule": lambda: keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(0.01, 10, 0.9)),
    "adamw": lambda: keras.optimizers.AdamW(0.01),
    "adamax": lambda: keras.optimizers.Adamax(0.01),
    "nadam": lambda: keras.optimizers.Nadam(0.01),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01, momentum=0.5, centered=True),
    "adagrad": lambda: keras.optimizers.Adagrad(0.01),
    "adadelta": lambda: keras.optimizers.Adadelta(0.01),
    "adafactor": lambda: keras.optimizers.Adafactor(0.01),
    "ftrl": lambda: keras.optimizers.Ftrl(0.01),
    "lion": lambda: keras.optimizers.Lion(0.01),
    "lamb": lambda: keras.optimizers.Lamb(0.01),
    "muon": lambda: keras.optimizers.Muon(0.01),
    "loss_scale": lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01)),
}


def test_pinned_keras_is_the_one_the_module_is_written_against():
    assert keras.__version__ == KERAS_VERSION, (
        f"mtl_keras/optimizers.py reaches into Keras {KERAS_VERSION}'s private optimizer layout; "
        f"this is Keras {keras.__version__}. Check its assumptions (module docstring) against this "
        "Keras, then update KERAS_VERSION."
    )


def _variables():
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (4,), (2, 2, 3), (5,)]
    return [keras.Variable(rng.normal(size=s).astype("float32"), name=f"v{i}") for i, s in enumerate(shapes)]


def _state_store(optimizer):
    store = {}
    optimizer.save_own_variables(store)
    return store


def _slots_of(optimizer, variable):
    """`{slot list name: slot}` of one model variable."""
    from mtl_keras.optimizers import _inner, _slot_lists

    inner = _inner(optimizer)
    i = inner._get_variable_index(variable)
    return {name: slots[i] for name, slots in _slot_lists(inner).items() if slots[i] is not None}


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_builtin_optimizer_zeroes_the_given_rows_of_its_state_and_nothing_else(name):
    variables = _variables()
    optimizer = BUILTIN[name]()
    optimizer.build(variables)
    check_optimizer_layout(_inner_of(optimizer))
    for _ in range(2):
        optimizer.apply([keras.ops.ones_like(v) for v in variables], variables)
    before = {id(v): v.numpy() for v in optimizer.variables}
    paths = [v.path for v in optimizer.variables]
    zero_optimizer_rows(optimizer, [variables[0], variables[2]], [1])
    assert [v.path for v in optimizer.variables] == paths  # nothing created or removed
    rowed = {id(s) for v in (variables[0], variables[2]) for s in _slots_of(optimizer, v).values()
             if tuple(s.shape) == tuple(v.shape)}
    for v in optimizer.variables:
        now = v.numpy()
        if id(v) in rowed:
            assert not np.any(now[1])
            np.testing.assert_array_equal(np.delete(now, 1, axis=0), np.delete(before[id(v)], 1, axis=0))
        else:
            np.testing.assert_array_equal(now, before[id(v)])
    if name in ("adam", "sgd_momentum", "rmsprop", "nadam"):
        assert rowed  # these keep variable-shaped state, which was zeroed


def _inner_of(optimizer):
    return optimizer.inner_optimizer if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) else optimizer


@pytest.mark.parametrize("name", sorted(set(BUILTIN) - {"loss_scale"}))
def test_every_builtin_optimizer_loads_state_saved_for_per_head_variables_as_stacked(name):
    rng = np.random.default_rng(3)
    trunk = keras.Variable(rng.normal(size=(3, 4)).astype("float32"), name="trunk")
    heads = [keras.Variable(rng.normal(size=(4,)).astype("float32"), name=f"head_{i}") for i in range(3)]
    saved = BUILTIN[name]()
    saved.build([trunk] + heads)
    for step in range(3):
        saved.apply([keras.ops.ones_like(trunk)] + [keras.ops.ones_like(h) * (i + 1 + step) for i, h in
                                                    enumerate(heads)], [trunk] + heads)
    store = _state_store(saved)
    stacked = keras.Variable(np.stack([h.numpy() for h in heads]), name="stacked")
    optimizer = BUILTIN[name]()
    optimizer.build([trunk, stacked])

    def to_this_layout(slots):
        per_head = slots[1:]
        if any(x is None or x.shape != (4,) for x in per_head):
            return [slots[0], None]  # not variable-shaped (e.g. factored): left as built
        return [slots[0], np.stack(per_head)]

    assert load_state_of_other_layout(optimizer, store, [(3, 4), (4,), (4,), (4,)], to_this_layout)
    iterations = int(saved.iterations.numpy())
    assert iterations >= 1 and int(optimizer.iterations.numpy()) == iterations
    for slot_name, slot in _slots_of(optimizer, stacked).items():
        theirs = [_slots_of(saved, h)[slot_name].numpy() for h in heads]
        if tuple(slot.shape) == (3, 4) and all(t.shape == (4,) for t in theirs):
            np.testing.assert_array_equal(slot.numpy(), np.stack(theirs))
    for slot_name, slot in _slots_of(optimizer, trunk).items():
        np.testing.assert_array_equal(slot.numpy(), _slots_of(saved, trunk)[slot_name].numpy())
    # A store of neither layout is refused, and nothing changes.
    assert not load_state_of_other_layout(optimizer, {"0": np.zeros(())}, [(3, 4), (4,), (4,), (4,)], to_this_layout)
    assert int(optimizer.iterations.numpy()) == iterations


@pytest.mark.parametrize("failure", ["raises", "wrong shape"])
def test_a_slot_kind_that_cannot_be_converted_leaves_every_kind_as_it_was(failure):
    rng = np.random.default_rng(4)
    heads = [keras.Variable(rng.normal(size=(4,)).astype("float32"), name=f"head_{i}") for i in range(3)]
    saved = keras.optimizers.Adam()
    saved.build(heads)
    saved.apply([keras.ops.ones_like(h) for h in heads], heads)
    store = _state_store(saved)
    stacked = keras.Variable(np.stack([h.numpy() for h in heads]), name="stacked")
    optimizer = keras.optimizers.Adam()
    optimizer.build([stacked])
    calls = []

    def second_kind_fails(slots):
        calls.append(len(slots))
        if len(calls) == 2:  # the first kind (momentums) converted fine
            if failure == "raises":
                raise ValueError("cannot stack these")
            return [np.zeros((2, 4), "float32")]
        return [np.stack(slots)]

    assert not load_state_of_other_layout(optimizer, store, [(4,), (4,), (4,)], second_kind_fails)
    assert len(calls) == 2
    assert all(not np.any(slot.numpy()) for slot in _slots_of(optimizer, stacked).values())
    assert int(optimizer.iterations.numpy()) == 0


def test_zeroing_rows_of_an_unbuilt_optimizer_does_nothing():
    optimizer = keras.optimizers.Adam()
    zero_optimizer_rows(optimizer, _variables()[:1], [0])
    assert not optimizer.built


def _message_names_both_versions():
    return rf"Keras {re.escape(KERAS_VERSION)}.*Keras {re.escape(keras.__version__)}"


def test_state_outside_the_aligned_lists_fails_loudly():
    variables = _variables()
    optimizer = keras.optimizers.Adam()
    optimizer.build(variables)
    # As if a Keras release kept Adam's momentums in another container.
    optimizer._momentums = tuple(optimizer._momentums)
    with pytest.raises(RuntimeError, match=_message_names_both_versions()) as error:
        zero_optimizer_rows(optimizer, variables[:2], [0])
    assert "momentum" in str(error.value)


def test_missing_private_attributes_fail_loudly():
    variables = _variables()
    optimizer = keras.optimizers.Adam()
    optimizer.build(variables)
    del optimizer._trainable_variables_indices
    with pytest.raises(RuntimeError, match=_message_names_both_versions() + ".*_trainable_variables_indices"):
        zero_optimizer_rows(optimizer, variables[:2], [0])
