"""Single-task baselines, their cache, and Δm."""

import json

import numpy as np
import pytest
import tensorflow as tf

from mtl_keras import Task, TaskSet, conv_backbone
from mtl_keras.baselines import (
    config_hash,
    count_examples,
    delta_m,
    task_subset,
    train_single_task_models,
)


# ------------------------------------------------------------------- Δm
def test_delta_m_matches_a_hand_computed_example():
    # (0.9-0.8)/0.8 = +12.5%, (0.5-0.5)/0.5 = 0, (0.3-0.4)/0.4 = -25%  -> mean -4.1667%
    mtl = {"a": 0.9, "b": 0.5, "c": 0.3}
    stl = {"a": 0.8, "b": 0.5, "c": 0.4, "unused": 0.1}
    assert delta_m(mtl, stl) == pytest.approx(-12.5 / 3)


def test_delta_m_flips_the_sign_of_lower_is_better_tasks():
    # accuracy up 10% (+10), loss up 20% (worse: -20) -> (10 - 20) / 2 = -5
    mtl = {"acc": 0.55, "loss": 1.2}
    stl = {"acc": 0.5, "loss": 1.0}
    assert delta_m(mtl, stl, higher_is_better={"acc": True, "loss": False}) == pytest.approx(-5.0)
    assert delta_m({"loss": 0.5}, {"loss": 1.0}, higher_is_better=False) == pytest.approx(50.0)
    assert delta_m(stl, stl) == 0.0


def test_delta_m_rejects_missing_tasks_and_zero_references():
    with pytest.raises(ValueError, match="No single-task result for tasks \\['b'\\]"):
        delta_m({"a": 0.5, "b": 0.5}, {"a": 0.5})
    with pytest.raises(ValueError, match="must be finite and non-zero"):
        delta_m({"a": 0.5}, {"a": 0.0})
    with pytest.raises(ValueError, match="at least one task"):
        delta_m({}, {"a": 0.5})


def test_config_hash():
    # (`summarize`, the mean and std of a list, is comparison.mean_std now: tests/test_comparison.py.)
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


# ------------------------------------------------------------ synthetic data
NUM_CLASSES = (3, 2)


def _dataset(n=96, seed=0, batch=16):
    """Two tasks on 8x8 images; the label is readable from the image so a model can learn it."""
    rng = np.random.default_rng(seed)
    task = rng.integers(0, 2, n).astype("int32")
    label = np.array([rng.integers(0, NUM_CLASSES[t]) for t in task], "int32")
    image = rng.normal(0, 0.1, (n, 8, 8, 1)).astype("float32")
    image[np.arange(n), label, 0, 0] += 3.0
    return tf.data.Dataset.from_tensor_slices(({"image": image, "task": task}, label)).batch(batch), task, label


def _tasks():
    return TaskSet([Task("three", "multiclass", 3), Task("two", "multiclass", 2)])


def test_task_subset_keeps_one_task_renumbered_with_a_known_length():
    ds, task, label = _dataset()
    sub = task_subset(ds, 1, batch_size=10)
    labels = np.concatenate([y.numpy() for _, y in sub])
    tasks = np.concatenate([x["task"].numpy() for x, _ in sub])
    np.testing.assert_array_equal(labels, label[task == 1])  # order kept without shuffling
    assert set(tasks) == {0}
    assert int(sub.cardinality()) == int(np.ceil((task == 1).sum() / 10))
    assert count_examples(sub) == (task == 1).sum() == count_examples(ds.unbatch().filter(lambda x, y: x["task"] == 1))
    with pytest.raises(ValueError, match="one-task-per-example"):
        task_subset(tf.data.Dataset.from_tensor_slices(({"image": np.zeros((2, 3))}, np.zeros(2))), 0, 2)


def _build(num_tasks):
    return conv_backbone((8, 8, 1), num_tasks, sigma=1.0, filters=(4,), seed=0)


def test_single_task_models_train_per_task_and_hit_the_cache(tmp_path):
    train, task, _ = _dataset(seed=0)
    test, test_task, _ = _dataset(n=48, seed=1)
    seen = []
    kwargs = dict(
        epochs=1, batch_size=16, model_kwargs={"head_units": (8,)}, cache_dir=tmp_path / "cache",
        cache_config={"data": "synthetic", "seed": 0},
        on_task_end=lambda i, t, entry, cached: seen.append((t.name, cached)),
    )
    first = train_single_task_models(_build, _tasks(), train, test, test, **kwargs)
    assert seen == [("three", False), ("two", False)]
    assert first.num_trained == 2
    assert first.train_examples == {"three": int((task == 0).sum()), "two": int((task == 1).sum())}
    acc = first.metric("accuracy")
    assert set(acc) == {"three", "two"} and all(0.0 <= a <= 1.0 for a in acc.values())
    assert set(first.metric("accuracy", split="validation")) == {"three", "two"}
    # A one-task model: unrouted trunk (no task input) + one head, per task.
    one = _build(1)
    assert [t.name for t in one.inputs] == ["image"]
    assert first.parameters["three"] > one.count_params() and first.total_parameters == sum(first.parameters.values())

    files = sorted((tmp_path / "cache").glob("stl-*.json"))
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]
    entry = json.loads(files[0].read_text())
    assert {"test", "validation", "parameters", "train_seconds", "train_examples"} <= set(entry)

    seen.clear()
    second = train_single_task_models(_build, _tasks(), train, test, test, **kwargs)
    assert seen == [("three", True), ("two", True)]  # nothing retrained
    assert second.num_trained == 0 and all(second.from_cache.values())
    assert second.test == first.test and second.parameters == first.parameters
    assert [f.stat().st_mtime_ns for f in files] == mtimes

    # Anything the results depend on changes the key: other data -> retrain.
    seen.clear()
    kwargs["cache_config"] = {"data": "synthetic", "seed": 1}
    third = train_single_task_models(_build, _tasks(), train, None, test, **kwargs)
    assert third.num_trained == 2 and len(list((tmp_path / "cache").glob("stl-*.json"))) == 4


def test_single_task_models_reject_bad_settings(tmp_path):
    train, _, _ = _dataset()
    with pytest.raises(ValueError, match="cache_dir needs cache_config"):
        train_single_task_models(_build, _tasks(), train, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="'weighting' and 'tasks_per_step' do not apply"):
        train_single_task_models(_build, _tasks(), train, model_kwargs={"weighting": "pcgrad"})
    only_task_1 = train.unbatch().filter(lambda x, y: x["task"] == 1).batch(16)
    with pytest.raises(ValueError, match="'three' \\(id 0\\) has no training example"):
        train_single_task_models(_build, _tasks(), only_task_1)
