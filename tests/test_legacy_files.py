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


def test_legacy_saved_model_serves_without_mtl_keras_objects():
    expected = _expected()
    served = tf.saved_model.load(str(FIXTURE / "saved_model" / "1"))
    out = served.signatures["serving_default"](
        image=tf.constant(expected["image"]), task=tf.constant(expected["task"])
    )
    np.testing.assert_allclose(out["logits"].numpy(), expected["logits"], rtol=1e-5, atol=1e-6)
