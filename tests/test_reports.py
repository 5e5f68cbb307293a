"""experiments.reports: the report.json of a training run, and its per-task table."""

import json

import keras
import numpy as np
import tensorflow as tf

from mtl_keras import Task, TaskSet
from mtl_keras.experiments.reports import chance_accuracy, task_table, training_report
from mtl_keras.experiments.training import build_model
from mtl_keras.presets import get_preset

TASKS = TaskSet([Task("Latin", "multiclass", 4), Task("Greek", "multiclass", 5), Task("yes_no", "binary", 1)])

KEYS = ["app", "tasks", "sigma", "weighting", "sharing", "strategy", "replicas", "routing_mode", "seed", "epochs",
        "batch_size", "image_size", "width", "depth", "parameters", "parameters_at_start", "head_parameters",
        "mean_test_accuracy", "test_loss", "test_accuracy", "chance_accuracy", "final_val_mean_accuracy",
        "wall_time_seconds", "train_seconds", "num_examples", "export_path", "model_path", "config"]


def _data(n=24):
    rng = np.random.default_rng(0)
    t = (np.arange(n) % 3).astype("int32")
    y = np.where(t == 0, rng.integers(0, 4, n), np.where(t == 1, rng.integers(0, 5, n), rng.integers(0, 2, n)))
    x = {"image": rng.random((n, 8, 8, 1)).astype("float32"), "task": t}
    return tf.data.Dataset.from_tensor_slices((x, y.astype("float32"))).batch(8)


def test_chance_is_a_uniform_guess_and_binary_has_two_classes():
    tasks = TaskSet([Task("m", "multiclass", 4), Task("b", "binary", 1), Task("r", "regression", 2)])
    assert chance_accuracy(tasks) == {"m": 0.25, "b": 0.5}


def test_report_of_a_trained_model(tmp_path):
    config = get_preset("default").replace(width=4, depth=1, head_units=(4,), epochs=1, image_size=8, lr=1e-2)
    keras.utils.set_random_seed(0)
    model = build_model(config, TASKS, (8, 8, 1), steps_per_epoch=3)  # _data(): 3 batches
    start = model.count_params()
    history = model.fit(_data(), validation_data=_data(), epochs=1, verbose=0)
    logs = model.evaluate(_data(), return_dict=True, verbose=0)
    report = training_report("app", config, model, logs, history, strategy=tf.distribute.get_strategy(),
                             parameters_at_start=start, num_examples=24, train_seconds=1.234, wall_seconds=2.26,
                             export_path=None, model_path=tmp_path / "m.keras")
    assert list(report) == KEYS
    assert report["app"] == "app" and report["tasks"] == 3 and report["sigma"] == config.sigma and report["width"] == 4
    assert report["config"] == json.loads(json.dumps(config.to_dict())) and report["config"]["sigma"] == config.sigma
    assert report["strategy"] == "_DefaultDistributionStrategy" and report["replicas"] == 1
    assert report["parameters"] == report["parameters_at_start"] == start == model.count_params()
    assert report["head_parameters"] == model.head_parameter_count()
    assert set(report["test_accuracy"]) == {"Latin", "Greek", "yes_no"}
    for name, acc in report["test_accuracy"].items():
        assert acc == float(logs[f"{name}/accuracy"])
    assert report["chance_accuracy"] == {"Latin": 0.25, "Greek": 0.2, "yes_no": 0.5}
    assert report["final_val_mean_accuracy"] == history.history["val_mean_accuracy"][-1]
    assert report["mean_test_accuracy"] == logs["mean_accuracy"] and report["test_loss"] == logs["loss"]
    assert (report["train_seconds"], report["wall_time_seconds"]) == (1.2, 2.3)
    assert report["export_path"] is None and report["model_path"] == str(tmp_path / "m.keras")
    json.dumps(report)  # JSON as it is

    no_history = training_report("app", config, model, logs, keras.callbacks.History(),
                                 strategy=tf.distribute.get_strategy(), parameters_at_start=start,
                                 export_path=tmp_path / "1")
    assert no_history["final_val_mean_accuracy"] is None and no_history["export_path"] == str(tmp_path / "1")

    table = task_table(report, TASKS, task_label="script").splitlines()
    assert table[0].split() == ["script", "classes", "test", "acc", "chance"]
    assert [line.split()[0] for line in table[2:]] == ["Greek", "Latin", "yes_no"]
    assert table[2].split()[1:] == ["5", f"{report['test_accuracy']['Greek']:.4f}", "0.2000"]
