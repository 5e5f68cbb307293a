"""MultiTaskTensorBoard, read back with TensorBoard's own event reader."""

import io

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtl_keras import MultiTaskModel, Task, TaskSet, conv_backbone
from mtl_keras.tensorboard import MultiTaskTensorBoard, mask_image, split_log_key, task_scalars


def tiny_model(sigma=0.5):
    tasks = TaskSet([Task("Latin", "multiclass", 3), Task("Greek.v2", "multiclass", 4), Task("yes-no", "binary", 1)])
    backbone = conv_backbone((8, 8, 1), len(tasks), sigma=sigma, filters=(4, 8), seed=3)
    model = MultiTaskModel(backbone, tasks, head_units=(4,), seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    return model


def tiny_data(n=24):
    rng = np.random.default_rng(0)
    t = (np.arange(n) % 3).astype("int32")
    y = np.where(t == 0, rng.integers(0, 3, n), np.where(t == 1, rng.integers(0, 4, n), rng.integers(0, 2, n)))
    x = {"image": rng.random((n, 8, 8, 1)).astype("float32"), "task": t}
    return tf.data.Dataset.from_tensor_slices((x, y.astype("float32"))).batch(8)


def read_run(path):
    acc = EventAccumulator(str(path), size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    acc.Reload()
    return acc


def scalar_values(acc, tag):
    return [float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]


def text_value(acc, tag):
    return tf.make_ndarray(acc.Tensors(tag)[-1].tensor_proto).item().decode()


def test_split_log_key_and_tags():
    names = ("Latin", "Greek.v2")
    assert split_log_key("val_Latin/accuracy", names) == ("validation", "Latin", "accuracy")
    assert split_log_key("Greek.v2/loss", names) == ("train", "Greek.v2", "loss")
    assert split_log_key("mean_accuracy", names) == ("train", None, "mean_accuracy")
    assert split_log_key("other/x", names) == ("train", None, "other/x")
    tags = task_scalars({"loss": 1.0, "val_Latin/accuracy": 0.5, "Latin/accuracy": 0.25}, names)
    assert tags == {
        "train": {"overall/loss": 1.0, "task/Latin/accuracy": 0.25},
        "validation": {"task/Latin/accuracy": 0.5},
    }


def test_mask_image_magnifies_cells():
    masks = np.array([[1, 0, 1], [0, 1, 0]], "float32")
    img = mask_image(masks, max_side=30)
    assert img.shape == (1, 20, 30, 1)
    np.testing.assert_array_equal(img[0, ::10, ::10, 0], masks)
    with pytest.raises(ValueError, match="tasks, units"):
        mask_image(np.zeros(3))


def test_callback_writes_task_scalars_masks_and_config(tmp_path):
    model = tiny_model()
    ds = tiny_data()
    config = {"sigma": 0.5, "epochs": 2, "note": "a|b"}
    tb = MultiTaskTensorBoard(tmp_path / "tb", config=config)
    history = model.fit(ds, validation_data=ds, epochs=2, callbacks=[tb], verbose=0).history

    train = read_run(tmp_path / "tb" / "train")
    val = read_run(tmp_path / "tb" / "validation")
    tags = set(train.Tags()["tensors"])
    for name in model.tasks.names:
        assert f"task/{name}/accuracy" in tags and f"task/{name}/loss" in tags
        assert f"task/{name}/accuracy" in val.Tags()["tensors"]
    assert {"overall/loss", "overall/mean_accuracy", "overall/mean_loss"} <= tags
    # Values are what fit() logged, one per epoch.
    np.testing.assert_allclose(scalar_values(train, "task/Latin/accuracy"), history["Latin/accuracy"], rtol=1e-6)
    np.testing.assert_allclose(scalar_values(val, "task/Greek.v2/loss"), history["val_Greek.v2/loss"], rtol=1e-6)
    np.testing.assert_allclose(scalar_values(train, "overall/loss"), history["loss"], rtol=1e-6)

    # One mask image per routing layer: rows = tasks, white = unit used.
    for i, units in enumerate((4, 8)):
        tag = f"routing/routing_{i}"
        assert tag in tags
        width, height, png = tf.make_ndarray(train.Tensors(tag)[0].tensor_proto)[:3]
        pixels = np.asarray(Image.open(io.BytesIO(png)))
        assert pixels.shape[:2] == (int(height), int(width))
        scale = int(height) // 3
        assert int(width) == units * scale
        expected = model.backbone.get_layer(f"routing_{i}").masks
        np.testing.assert_array_equal(pixels[::scale, ::scale] > 127, expected > 0.5)

    text = text_value(train, "run/config")
    assert "| sigma | 0.5 |" in text and "a\\|b" in text
    assert "| 1 | Greek.v2 | multiclass | 4 |" in text and "routing_1" in text
    results = text_value(train, "run/results")
    assert "| Latin |" in results and "val accuracy" in results
    assert "| routing_0 | 4 | 0.5 | partition | 3 |" in text_value(train, "routing/summary")


def test_hard_sharing_model_has_no_masks_and_batch_scalars(tmp_path):
    model = tiny_model(sigma=1.0)
    tb = MultiTaskTensorBoard(tmp_path / "tb", update_freq=2, tag_prefix="tasks")
    model.fit(tiny_data(), epochs=2, callbacks=[tb], verbose=0)
    train = read_run(tmp_path / "tb" / "train")
    tags = set(train.Tags()["tensors"])
    assert not any(t.startswith("routing/routing_") for t in tags)
    assert "fully shared" in text_value(train, "routing/summary")
    assert "tasks/Latin/accuracy" in tags
    assert len(train.Tensors("batch/tasks/Latin/loss")) == 3  # 6 steps, every 2nd
    with pytest.raises(ValueError, match="update_freq"):
        MultiTaskTensorBoard(tmp_path, update_freq=0)
