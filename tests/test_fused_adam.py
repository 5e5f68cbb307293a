"""FusedAdam: Keras' Adam with each dense update one op; the same weights and moments as Adam's."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mtl_keras import FusedAdam
from mtl_keras.experiments.training import make_optimizer
from mtl_keras.presets import get_preset
from synthetic import assert_reload_keeps_the_optimizer, per_example_batch, small_model

SHAPES = [(3, 3, 2, 4), (5,), (7, 3)]


def run_steps(optimizer, gradients, variables=None):
    """Applies each step's gradients to fresh copies of the same start values; returns weights and state."""
    rng = np.random.default_rng(0)
    variables = variables or [keras.Variable(rng.normal(size=s).astype("float32")) for s in SHAPES]
    for step in gradients:
        optimizer.apply(step, variables)
    return [v.numpy() for v in variables], [v.numpy() for v in optimizer.variables]


def moments(optimizer, kind):
    """Adam's `kind` ("momentum" or "velocity") of each variable, in the variables' order."""
    return [v.numpy() for v in optimizer.variables if v.path.endswith(kind)]


def gradient_steps(steps=4, seed=1):
    rng = np.random.default_rng(seed)
    return [[tf.constant(rng.normal(size=s).astype("float32")) for s in SHAPES] for _ in range(steps)]


def reference_adam(value, steps, lr=0.05, b1=0.9, b2=0.999, eps=1e-7):
    """Adam in float64 NumPy: the weights and both moments after each step's gradient."""
    value = value.astype("float64").copy()
    m, v = np.zeros_like(value), np.zeros_like(value)
    for t, g in enumerate(steps, start=1):
        g = g.astype("float64")
        m += (g - m) * (1 - b1)
        v += (g * g - v) * (1 - b2)
        value -= lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
    return value, m, v


@pytest.mark.parametrize("options", [{}, {"beta_1": 0.5, "epsilon": 1e-3}])
def test_dense_updates_follow_adams_arithmetic(options):
    steps = gradient_steps()
    optimizer = FusedAdam(0.05, **options)
    weights, _ = run_steps(optimizer, steps)
    momentums, velocities = moments(optimizer, "momentum"), moments(optimizer, "velocity")
    assert len(momentums) == len(velocities) == len(SHAPES)
    start, _ = run_steps(FusedAdam(0.0), [])
    reference = dict(b1=options.get("beta_1", 0.9), eps=options.get("epsilon", 1e-7))
    for i, w in enumerate(weights):
        value, m, v = reference_adam(start[i], [step[i].numpy() for step in steps], **reference)
        # Within float32 rounding of the float64 result (Keras' own Adam is 1.7e-6 off here).
        np.testing.assert_allclose(w, value, atol=1e-6)
        np.testing.assert_allclose(momentums[i], m, rtol=1e-5, atol=1e-7)
        # float32's 1 - 0.999 is 1.3e-5 off 0.001, in Keras' Adam as here.
        np.testing.assert_allclose(velocities[i], v, rtol=5e-5, atol=1e-9)
        assert np.abs(w - start[i]).max() > 1e-3  # the weights moved


@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.01, "clipnorm": 0.5}, {"beta_1": 0.5, "epsilon": 1e-3}])
def test_dense_updates_equal_keras_adams(options):
    steps = gradient_steps()
    weights, state = run_steps(FusedAdam(0.05, **options), steps)
    reference_weights, reference_state = run_steps(keras.optimizers.Adam(0.05, **options), steps)
    for a, b in zip(weights + state, reference_weights + reference_state):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-6)
    # The weights moved: an update that did nothing would also "match" a reference that did nothing.
    start, _ = run_steps(FusedAdam(0.0), [])
    assert all(np.abs(w - s).max() > 1e-3 for w, s in zip(weights, start))


def test_the_variables_have_adams_paths():
    variables = [keras.Variable(np.ones(s, "float32"), name=f"w{i}") for i, s in enumerate(SHAPES)]
    paths = []
    for optimizer in (FusedAdam(), keras.optimizers.Adam()):
        assert optimizer.name.split("_")[0] == "adam"  # Keras numbers names apart ("adam_1") within a process
        optimizer.build(variables)
        paths.append([v.path.split("/", 1)[1] for v in optimizer.variables])
    assert paths[0] == paths[1] and "w0_momentum" in paths[0]


def test_the_update_is_one_op_per_variable():
    variable = keras.Variable(np.ones((4, 3), "float32"))
    optimizer = FusedAdam(0.1)
    optimizer.build([variable])
    graph = tf.function(lambda g: optimizer.apply([g], [variable])).get_concrete_function(
        tf.TensorSpec((4, 3), "float32")).graph
    types = [op.type for op in graph.get_operations()]
    assert types.count("ResourceApplyAdam") == 1
    assert "AssignSubVariableOp" not in types  # Keras' own update would assign the weight itself


def test_sparse_gradients_amsgrad_and_float16_variables_take_keras_adams_update():
    rng = np.random.default_rng(3)
    sparse = [[tf.IndexedSlices(tf.constant(rng.normal(size=(2, 3)).astype("float32")), tf.constant([0, 2]),
                                tf.constant([4, 3]))] for _ in range(3)]
    for steps, options in ((sparse, {}), ([[tf.constant(rng.normal(size=(4, 3)).astype("float32"))]] * 3,
                                          {"amsgrad": True})):
        results = []
        for cls in (FusedAdam, keras.optimizers.Adam):
            variable = keras.Variable(np.ones((4, 3), "float32"))
            optimizer = cls(0.1, **options)
            for step in steps:
                optimizer.apply(step, [variable])
            results.append(variable.numpy())
        np.testing.assert_array_equal(*results)
        assert not np.array_equal(results[0], np.ones((4, 3)))
    half = keras.Variable(np.ones((3,), "float16"), dtype="float16")
    FusedAdam(0.1).apply([tf.constant([1.0, -1.0, 0.0], "float16")], [half])
    np.testing.assert_allclose(half.numpy(), [0.9, 1.1, 1.0], atol=5e-3)  # float16 rounding


def test_a_model_trains_as_with_adam_on_one_device_and_on_two_replicas_and_keeps_its_optimizer_in_files(tmp_path):
    x, y = per_example_batch(n=16, seed=2)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    assert len(devices) == 2, "conftest should provide two logical CPU devices"
    results = {}
    for name, strategy, optimizer in (("adam", None, lambda: keras.optimizers.Adam(0.01)),
                                      ("fused", None, lambda: FusedAdam(0.01)),
                                      ("fused, two replicas", tf.distribute.MirroredStrategy(devices),
                                       lambda: FusedAdam(0.01))):
        model = small_model(optimizer, strategy)
        start = [w.numpy() for w in model.trainable_weights]
        model.fit(data, epochs=3, verbose=0, shuffle=False)
        results[name] = [w.numpy() for w in model.weights] + [v.numpy() for v in model.optimizer.variables]
        assert all(not np.array_equal(a, w.numpy()) for a, w in zip(start, model.trainable_weights))
    for a, b in zip(results["fused"], results["adam"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(results["fused, two replicas"], results["fused"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert_reload_keeps_the_optimizer(model, tmp_path / "fused.keras", FusedAdam)


def test_the_configs_adam_is_fused_adam():
    config = get_preset("default")
    assert config.optimizer == "adam" and type(make_optimizer(config, steps_per_epoch=10)) is FusedAdam
