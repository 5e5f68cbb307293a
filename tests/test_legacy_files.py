"""Files saved by mtl_keras before the TaskHeads refactor (commit 2aef377) still load and agree.

The fixture (tests/fixtures/legacy_v0_1) was written by `tests/fixtures/make_legacy_fixture.py`
run against that commit: a 4-task routed model with uncertainty weighting, trained, then
regrouped (heads 1 and 3 lost their estimators), then trained again.
"""

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import mtl_keras  # noqa: F401  (registers the serializable classes)

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_v0_1"


def _expected():
    with np.load(FIXTURE / "expected.npz") as f:
        return {k: f[k] for k in f.files}


def test_legacy_keras_file_loads_with_same_outputs_and_groups():
    expected = _expected()
    model = keras.saving.load_model(FIXTURE / "model.keras")
    assert list(model.estimator_of_task) == [0, 0, 2, 2]
    logits = model({"image": expected["image"], "task": expected["task"]}, training=False)
    np.testing.assert_allclose(np.asarray(logits), expected["logits"], rtol=1e-5, atol=1e-6)
    # The optimizer state came back too: training goes on from it.
    assert int(model.optimizer.iterations.numpy()) == 6
    rng = np.random.default_rng(1)
    x = rng.random((8, 16, 16, 1)).astype("float32")
    t = np.arange(8, dtype="int32") % 4
    history = model.fit({"image": x, "task": t}, np.zeros(8, "float32"), batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_legacy_optimizer_state_is_converted_to_the_stacked_heads():
    import io
    import zipfile

    import h5py

    model = keras.saving.load_model(FIXTURE / "model.keras")
    with zipfile.ZipFile(FIXTURE / "model.keras") as archive:
        with h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as f:
            saved = {int(k): np.asarray(v) for k, v in f["optimizer/vars"].items()}
    # The file's Adam state, a (momentum, velocity) pair per variable in the
    # per-head order: 8 trunk variables (vars 2-17), then head 0's estimator
    # kernel (18, 19) and bias, its output kernel (22, 23), head 1's output
    # kernel (26, 27), head 2's estimator kernel (30, 31), ...
    slots = {v.path.split("/")[-1]: v.numpy() for v in model.optimizer.variables}
    kernel_momentum = slots["task_heads_estimator_kernel_0_momentum"]
    np.testing.assert_array_equal(kernel_momentum[0], saved[18])
    np.testing.assert_array_equal(kernel_momentum[2], saved[30])
    assert np.all(kernel_momentum[[1, 3]] == 0)  # heads 1 and 3 lost their estimators
    np.testing.assert_array_equal(slots["task_heads_estimator_kernel_0_velocity"][2], saved[31])
    output_velocity = slots["task_heads_output_kernel_velocity"]  # one row per output unit
    np.testing.assert_array_equal(output_velocity[:5], saved[23].T)
    np.testing.assert_array_equal(output_velocity[5:8], saved[27].T)
    # The trunk's and the weighting's state, first and last, as saved.
    np.testing.assert_array_equal(model.optimizer.variables[2].numpy(), saved[2])
    np.testing.assert_array_equal(model.optimizer.variables[-1].numpy(), saved[43])
    assert int(model.optimizer.iterations.numpy()) == int(saved[0])


def test_legacy_saved_model_serves_without_mtl_keras_objects():
    expected = _expected()
    served = tf.saved_model.load(str(FIXTURE / "saved_model" / "1"))
    out = served.signatures["serving_default"](
        image=tf.constant(expected["image"]), task=tf.constant(expected["task"])
    )
    np.testing.assert_allclose(out["logits"].numpy(), expected["logits"], rtol=1e-5, atol=1e-6)


def test_import_mtl_keras_registers_every_serializable_object():
    """A saved model loads after `import mtl_keras` alone: every class the package registers is then known."""
    import importlib
    import json
    import os
    import pkgutil
    import subprocess
    import sys

    import keras

    import mtl_keras

    for module in pkgutil.walk_packages(mtl_keras.__path__, "mtl_keras."):
        importlib.import_module(module.name)
    registered = sorted(n for n in keras.saving.get_custom_objects() if n.startswith("mtl_keras>"))
    assert "mtl_keras>WarmupStableDecay" in registered and "mtl_keras>SameConv2D" in registered
    script = ("import json, sys, keras, mtl_keras\n"
              "print(json.dumps([n for n in json.loads(sys.argv[1]) if n not in keras.saving.get_custom_objects()]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", script, json.dumps(registered)], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
