"""The training recipe's parts in the library: learning-rate schedule and label smoothing."""

import keras
import numpy as np
import pytest
from keras import ops

from mtl_keras import Task, TaskSet
from mtl_keras.experiments.training import build_model, learning_rate
from mtl_keras.presets import get_preset
from mtl_keras.schedules import WarmupStableDecay
from mtl_keras.task_losses import TaskTable, gather_task_logits, pair_losses


def test_cosine_schedule_warms_up_peaks_and_ends_at_zero():
    config = get_preset("default").replace(lr=0.01, lr_schedule="cosine", warmup_fraction=0.25, epochs=4)
    schedule = learning_rate(config, steps_per_epoch=10)
    lr = [float(schedule(step)) for step in range(41)]
    assert lr[0] == 0.0 and lr[5] == pytest.approx(0.005) and lr[10] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))  # decays monotonically after the warm-up
    assert lr[25] == pytest.approx(0.005, abs=1e-6)  # half-way through the decay: half the peak
    assert lr[40] == pytest.approx(0.0, abs=1e-9)  # the last step of the run
    no_warmup = learning_rate(config.replace(warmup_fraction=0), steps_per_epoch=10)
    assert float(no_warmup(0)) == pytest.approx(0.01) and float(no_warmup(40)) == pytest.approx(0.0, abs=1e-9)
    assert learning_rate(config.replace(lr_schedule="constant")) == 0.01
    with pytest.raises(ValueError, match="steps_per_epoch"):
        learning_rate(config)
    with pytest.raises(ValueError, match="warmup_fraction"):
        learning_rate(config.replace(warmup_fraction=1.0), steps_per_epoch=10)
    # A 3-step run still warms up for less than its length.
    short = learning_rate(config.replace(epochs=1, warmup_fraction=0.5), steps_per_epoch=1)
    assert float(short(0)) == pytest.approx(0.01)


def test_warmup_stable_decay_holds_the_peak_then_decays_to_zero():
    config = get_preset("default").replace(lr=0.01, lr_schedule="wsd", warmup_fraction=0.1, decay_fraction=0.25,
                                           epochs=4)
    schedule = learning_rate(config, steps_per_epoch=10)
    lr = [float(schedule(step)) for step in range(41)]
    assert lr[0] == 0.0 and lr[2] == pytest.approx(0.005) and lr[4] == pytest.approx(0.01)
    assert lr[4:31] == pytest.approx([0.01] * 27)  # held from the end of the warm-up to the decay
    assert lr[35] == pytest.approx(0.005) and lr[40] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(lr[30:], lr[31:]))
    assert float(schedule(1000)) == 0.0  # past the run: never negative
    no_decay = learning_rate(config.replace(decay_fraction=0.0, warmup_fraction=0.0), steps_per_epoch=10)
    assert [float(no_decay(s)) for s in (0, 39)] == pytest.approx([0.01, 0.01])
    # Warm-up and decay never overlap, even when their shares add up to more than the run.
    squeezed = learning_rate(config.replace(warmup_fraction=0.5, decay_fraction=1.0), steps_per_epoch=10)
    assert float(squeezed(20)) == pytest.approx(0.01) and float(squeezed(30)) == pytest.approx(0.005)
    with pytest.raises(ValueError, match="decay_fraction"):
        learning_rate(config.replace(decay_fraction=1.5), steps_per_epoch=10)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        learning_rate(config)


def test_warmup_stable_decay_refuses_impossible_phases():
    with pytest.raises(ValueError, match="peak_learning_rate"):
        WarmupStableDecay(0.0, total_steps=10)
    with pytest.raises(ValueError, match="warmup_steps \\+ decay_steps"):
        WarmupStableDecay(0.1, total_steps=10, warmup_steps=6, decay_steps=5)


def test_schedule_is_saved_with_the_model(tmp_path):
    tasks = TaskSet([Task("a", "multiclass", 3)])
    config = get_preset("default").replace(width=4, depth=1, head_units=(4,), lr_schedule="cosine",
                                           warmup_fraction=0.25, epochs=2)
    model = build_model(config, tasks, (8, 8, 1), steps_per_epoch=4)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    saved = loaded.optimizer.get_config()["learning_rate"]
    assert saved == model.optimizer.get_config()["learning_rate"]
    assert saved["class_name"] == "CosineDecay" and saved["config"]["warmup_steps"] == 2
    assert saved["config"]["decay_steps"] == 6  # 2 epochs of 4 steps, minus the warm-up


def test_warmup_stable_decay_is_saved_with_the_model(tmp_path):
    tasks = TaskSet([Task("a", "multiclass", 3)])
    config = get_preset("default").replace(width=4, depth=1, head_units=(4,), lr_schedule="wsd",
                                           warmup_fraction=0.25, decay_fraction=0.5, epochs=2)
    model = build_model(config, tasks, (8, 8, 1), steps_per_epoch=4)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    saved = loaded.optimizer.get_config()["learning_rate"]
    assert saved["class_name"] == "WarmupStableDecay"
    assert saved["config"] == {"peak_learning_rate": config.lr, "total_steps": 8, "warmup_steps": 2,
                               "decay_steps": 4, "name": "warmup_stable_decay"}

TASKS = TaskSet([Task("three", "multiclass", 3), Task("five", "multiclass", 5), Task("flag", "binary", 1)])


def _losses(logits, labels, task_ids, eps):
    table = TaskTable(TASKS)
    ids = ops.convert_to_tensor(np.array(task_ids, "int32"))
    gathered = gather_task_logits(ops.convert_to_tensor(np.array(logits, "float32")), ids, table)
    labels = ops.convert_to_tensor(np.array(labels, "float32")[:, None])
    return np.asarray(pair_losses(gathered, labels, ids, table, label_smoothing=eps))


def test_label_smoothing_spreads_over_each_tasks_own_classes():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 3 + 5 + 1))  # every task's outputs, concatenated
    eps = 0.2
    got = _losses(logits, [2, 4, 1], [0, 1, 2], eps)
    # The reference: Keras' categorical cross-entropy with label_smoothing on
    # each task's own classes (3 for task 0, 5 for task 1), binary for task 2.
    cce = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=eps, reduction=None)
    bce = keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=eps, reduction=None)
    expected = [
        float(cce(np.eye(3)[[2]], logits[[0], 0:3])[0]),
        float(cce(np.eye(5)[[4]], logits[[1], 3:8])[0]),
        float(bce(np.array([[1.0]]), logits[[2], 8:9])[0]),
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    plain = _losses(logits, [2, 4, 1], [0, 1, 2], 0.0)
    assert not np.allclose(plain, got)


def test_model_smooths_the_training_loss_only():
    tasks = TaskSet([Task("a", "multiclass", 4)])
    config = get_preset("default").replace(width=4, depth=1, head_units=(4,), lr_schedule="constant",
                                           label_smoothing=0.3, head_dropout=0.0)
    model = build_model(config, tasks, (8, 8, 1))
    assert model.label_smoothing == 0.3
    rng = np.random.default_rng(1)
    x = {"image": rng.random((16, 8, 8, 1)).astype("float32"), "task": np.zeros(16, "int32")}
    y = rng.integers(0, 4, 16).astype("int32")
    evaluated = model.evaluate(x, y, return_dict=True, verbose=0)["loss"]
    logits = model.predict(x, verbose=0)[:, :4]
    plain = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits))
    assert evaluated == pytest.approx(plain, rel=1e-4)
    assert keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model)).label_smoothing == 0.3
    with pytest.raises(ValueError, match="label_smoothing"):
        build_model(config.replace(label_smoothing=1.0), tasks, (8, 8, 1))
