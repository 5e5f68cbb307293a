"""Selective Sharing by name (the apps' --sharing): the probe drawn from validation data, and the app end to end."""

import json

import numpy as np
import pytest
import tensorflow as tf

from mtl_keras.sharing import SelectiveSharing, probe_inputs, selective_sharing, sharing_names
from small_archives import small_omniglot_dir


def stored_task_by_task(tasks=4, per_task=100, batch=32):
    """A batched split stored task by task, each image filled with its task id."""
    task = np.repeat(np.arange(tasks), per_task).astype("int32")
    image = np.broadcast_to(task[:, None, None, None], (len(task), 4, 4, 1)).astype("float32")
    labels = np.zeros(len(task), "float32")
    return tf.data.Dataset.from_tensor_slices(({"image": image, "task": task}, labels)).batch(batch)


def test_the_probe_is_drawn_across_the_whole_split_and_the_same_for_a_seed():
    data = stored_task_by_task()
    probe = probe_inputs(data, size=40, seed=3)
    assert set(probe) == {"image"} and probe["image"].shape == (40, 4, 4, 1)
    drawn = probe["image"][:, 0, 0, 0]
    # Every task's inputs are in it (the first 40 would all be task 0's), in the split's order.
    assert set(drawn) == {0.0, 1.0, 2.0, 3.0} and np.all(np.diff(drawn) >= 0)
    np.testing.assert_array_equal(probe_inputs(data, size=40, seed=3)["image"], probe["image"])
    assert not np.array_equal(probe_inputs(data, size=40, seed=4)["image"], probe["image"])
    # Fewer examples than asked: all of them; unbatched elements and bare images too.
    assert len(probe_inputs(data, size=1000)["image"]) == 400
    assert len(probe_inputs(data.unbatch(), size=50, batched=False)["image"]) == 50
    assert len(probe_inputs(data.map(lambda x, y: x["image"]), size=50)["image"]) == 50
    assert len(probe_inputs(data, size=1000, max_read=70)["image"]) == 70


def test_bad_probes_and_names_are_refused_with_the_fix():
    data = stored_task_by_task()
    with pytest.raises(ValueError, match="probe's dataset is empty"):
        probe_inputs(data.take(0))
    with pytest.raises(ValueError, match="without an 'image' entry"):
        probe_inputs(data.map(lambda x, y: ({"pixels": x["image"]}, y)))
    with pytest.raises(ValueError, match="positive int"):
        probe_inputs(data, size=0)
    with pytest.raises(ValueError, match="pass validation=<dataset>"):
        selective_sharing("predictions")
    with pytest.raises(ValueError, match=r"Unknown Selective Sharing 'nash'; use one of \['predictions', "):
        selective_sharing("nash")


def test_names_give_the_predictions_signal_or_the_authors_pipeline():
    assert sharing_names()[0] == "predictions" and {"similarity", "variance"} <= set(sharing_names())
    data = stored_task_by_task()
    by_predictions = selective_sharing("predictions", validation=data, probe_size=64, start_epoch=3, seed=1)
    assert isinstance(by_predictions, SelectiveSharing)
    assert (by_predictions.signal, by_predictions.rule_name, by_predictions.start_epoch) == (
        "predictions", "predictions+gate", 3)
    np.testing.assert_array_equal(by_predictions.probe["image"], probe_inputs(data, 64, seed=1)["image"])
    by_rule = selective_sharing("variance", validation=data)
    assert (by_rule.signal, by_rule.rule_name, by_rule.probe) == ("gram", "variance", None)


def test_the_app_groups_on_a_probe_of_validation_images(tmp_path):
    from apps import train_omniglot

    report = train_omniglot.main([
        "--data-dir", str(small_omniglot_dir()), "--archives", "small", "--tfds-dir", str(tmp_path / "tfds"),
        "--tasks", "3", "--image-size", "12", "--width", "4", "--depth", "2", "--head-units", "8",
        "--epochs", "2", "--batch-size", "64", "--sharing", "predictions", "--sharing-epoch", "2",
        "--output", str(tmp_path / "run"), "--no-export", "--verbose", "0",
    ])
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["sharing"] == report["sharing"] and report["sharing"]["rule"] == "predictions+gate"
    [check] = report["sharing"]["checks"]
    validation_examples = report["num_examples"]["validation"]
    assert check["epoch"] == 2 and check["signal"] == "predictions"
    assert check["probe_rows"] == min(512, validation_examples)
    # The gate's figures are recorded with the check, whatever it decided.
    assert "null_threshold" in check and all("passed" in g for g in check["gate"])
    assert report["parameters"] <= report["parameters_at_start"]
