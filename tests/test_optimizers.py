"""Optimizer pruning after a merge, against the pinned Keras' private optimizer layout."""

import re
import warnings

import keras
import numpy as np
import pytest

from mtl_keras import MultiTaskModel, Task, TaskSet, conv_backbone
from mtl_keras.optimizers import KERAS_VERSION, check_optimizer_layout, prune_optimizer
from synthetic import per_example_batch

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


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_builtin_optimizer_prunes_to_what_a_fresh_build_on_the_survivors_holds(name):
    variables = _variables()
    optimizer = BUILTIN[name]()
    optimizer.build(variables)
    check_optimizer_layout(optimizer)
    for _ in range(2):
        optimizer.apply([keras.ops.ones_like(v) for v in variables], variables)
    before = {id(v): v.numpy() for v in optimizer.variables}
    survivors = [variables[0], variables[2], variables[3]]
    prune_optimizer(optimizer, survivors)
    check_optimizer_layout(optimizer)
    # The survivors' state: the same objects with the same values, nothing new.
    assert all(id(v) in before for v in optimizer.variables)
    for v in optimizer.variables:
        np.testing.assert_array_equal(v.numpy(), before[id(v)])
    # ...laid out as a fresh optimizer built on the survivors (what a .keras reload builds).
    fresh = BUILTIN[name]()
    fresh.build(survivors)
    assert [tuple(v.shape) for v in optimizer.variables] == [tuple(v.shape) for v in fresh.variables]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*Skipping variable loading.*")
        fresh.load_own_variables(_state_store(optimizer))
    for a, b in zip(optimizer.variables, fresh.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Training goes on with the survivors; the dropped variable is no longer known.
    optimizer.apply([keras.ops.ones_like(v) for v in survivors], survivors)
    with pytest.raises(ValueError):
        optimizer.apply([keras.ops.ones_like(variables[1])], [variables[1]])
    prune_optimizer(optimizer, survivors)  # nothing left to drop: no change
    assert len(optimizer.variables) == len(fresh.variables)


def test_prune_of_an_unbuilt_optimizer_does_nothing():
    optimizer = keras.optimizers.Adam()
    prune_optimizer(optimizer, _variables()[:1])
    assert not optimizer.built


def small_model():
    keras.utils.set_random_seed(0)
    tasks = TaskSet([Task("a", "multiclass", 3), Task("b", "multiclass", 5), Task("c", "binary", 1),
                     Task("d", "regression", 2)])
    backbone = conv_backbone((8, 8, 1), 4, sigma=0.5, filters=(8, 8), seed=0)
    model = MultiTaskModel(backbone, tasks, head_units=(6,), seed=0)
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    return model


def test_merge_prunes_dropped_adam_state_and_keras_file_round_trips_it(tmp_path):
    model = small_model()
    x, y = per_example_batch(n=24)
    model.fit(x, y, batch_size=12, epochs=2, verbose=0)
    dropped_variables = {id(v) for h in (1, 3) for v in model.heads[h].estimator_variables()}
    slots_before = {v.path: (id(v), v.numpy()) for v in model.optimizer.variables}
    iterations = int(model.optimizer.iterations.numpy())

    assert model.set_estimator_of_task([0, 0, 2, 2]) == [1, 3]

    optimizer = model.optimizer
    assert not any(id(v) in dropped_variables for v in model.trainable_variables)
    # Adam's momentum and velocity of 2 estimators x (kernel, bias) are gone...
    assert len(optimizer.variables) == len(slots_before) - 2 * 2 * 2
    gone = set(slots_before) - {v.path for v in optimizer.variables}
    assert all(re.search(r"head_[13]_estimator_0_(kernel|bias)_(momentum|velocity)$", p) for p in gone), gone
    # ...and every survivor's slot is the same object, with the same value.
    for v in optimizer.variables:
        same_id, value = slots_before[v.path]
        assert id(v) == same_id
        np.testing.assert_array_equal(v.numpy(), value)
    assert int(optimizer.iterations.numpy()) == iterations

    model.save(tmp_path / "merged.keras")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*Skipping variable loading for optimizer.*")
        loaded = keras.saving.load_model(tmp_path / "merged.keras")
    assert loaded.estimator_of_task == [0, 0, 2, 2]
    assert [v.path for v in loaded.optimizer.variables] == [v.path for v in optimizer.variables]
    for a, b in zip(optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    model.fit(x, y, batch_size=12, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=12, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def _message_names_both_versions():
    return rf"Keras {re.escape(KERAS_VERSION)}.*Keras {re.escape(keras.__version__)}"


def test_state_outside_the_aligned_lists_fails_loudly():
    variables = _variables()
    optimizer = keras.optimizers.Adam()
    optimizer.build(variables)
    # As if a Keras release kept Adam's momentums in another container.
    optimizer._momentums = tuple(optimizer._momentums)
    with pytest.raises(RuntimeError, match=_message_names_both_versions()) as error:
        prune_optimizer(optimizer, variables[:2])
    assert "momentum" in str(error.value)


def test_missing_private_attributes_fail_loudly():
    variables = _variables()
    optimizer = keras.optimizers.Adam()
    optimizer.build(variables)
    del optimizer._trainable_variables_indices
    with pytest.raises(RuntimeError, match=_message_names_both_versions() + ".*_trainable_variables_indices"):
        prune_optimizer(optimizer, variables[:2])
