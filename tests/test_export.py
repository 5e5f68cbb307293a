import json
import os
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from mtl_keras import MultiTaskModel, Task, TaskSet, conv_backbone
from mtl_keras.export import export_for_serving, load_metadata, next_version, reference_predictions


def exported_model(sigma=0.5):
    tasks = TaskSet(
        [Task("latin", "multiclass", 3), Task("greek.(x)", "multiclass", 5), Task("flag", "binary", 1)]
    )
    backbone = conv_backbone((8, 8, 1), len(tasks), sigma=sigma, filters=(8, 8), seed=3)
    model = MultiTaskModel(backbone, tasks, head_units=(6,), seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    rng = np.random.default_rng(0)
    x = {"image": rng.random((12, 8, 8, 1)).astype("float32"), "task": np.arange(12, dtype="int32") % 3}
    y = rng.integers(0, 2, 12).astype("float32")
    model.fit(x, y, batch_size=12, epochs=2, verbose=0)
    return model, x


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    model, x = exported_model()
    base = tmp_path_factory.mktemp("serving") / "m"
    path = export_for_serving(model, base)
    return model, x, base, path


def test_versions_follow_tf_serving_layout(export, tmp_path):
    model, x, base, path = export
    assert path == base / "1"
    assert (path / "saved_model.pb").exists() and (path / "variables").is_dir()
    assert next_version(base) == 2
    with pytest.raises(FileExistsError, match="already exists"):
        export_for_serving(model, base, version=1, task_signatures=False)
    assert not [p for p in base.iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_signatures_match_the_keras_model(export):
    model, x, base, path = export
    served = tf.saved_model.load(str(path))
    assert set(served.signatures) == {"serving_default", "task_latin", "task_greek__x_", "task_flag"}
    out = served.signatures["serving_default"](image=tf.constant(x["image"]), task=tf.constant(x["task"]))
    ref = reference_predictions(model, x["image"], x["task"])
    np.testing.assert_allclose(out["logits"].numpy(), ref["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["probabilities"].numpy(), ref["probabilities"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["predicted_class"].numpy(), ref["predicted_class"])
    probs = out["probabilities"].numpy()
    multiclass = x["task"] < 2
    np.testing.assert_allclose(probs[multiclass].sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(probs[x["task"] == 0][:, 3:] == 0)  # padded classes of a 3-class task
    one = served.signatures["task_greek__x_"](image=tf.constant(x["image"][:4]))
    assert one["probabilities"].shape == (4, 5)
    full = served.signatures["serving_default"](image=tf.constant(x["image"][:4]), task=tf.fill([4], 1))
    np.testing.assert_allclose(one["probabilities"].numpy(), full["probabilities"].numpy()[:, :5], rtol=1e-5)


def test_requests_the_model_cannot_answer_fail_clearly(export):
    model, x, base, path = export
    fn = tf.saved_model.load(str(path)).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"task ids must be in \[0, 3\)"):
        fn(image=tf.constant(x["image"][:2]), task=tf.constant([0, 7], tf.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="negative"):
        fn(image=tf.constant(x["image"][:2]), task=tf.constant([0, -1], tf.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image must have shape \[batch, 8, 8, 1\]"):
        fn(image=tf.zeros((2, 16, 16, 1)), task=tf.constant([0, 1], tf.int32))


def test_metadata_asset(export):
    model, x, base, path = export
    meta = load_metadata(path)
    assert [t["name"] for t in meta["tasks"]] == ["latin", "greek.(x)", "flag"]
    assert [t["num_outputs"] for t in meta["tasks"]] == [3, 5, 1]
    assert meta["input_shape"] == [8, 8, 1]
    assert [r["sigma"] for r in meta["routing"]] == [0.5, 0.5]
    assert meta["routing"][0]["units_per_task"] == model.backbone.get_layer("routing_0").masks.sum(1).tolist()


def test_saved_model_cli_lists_named_inputs(export):
    cli = shutil.which("saved_model_cli") or os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if not os.path.exists(cli):
        pytest.fail("saved_model_cli (installed with tensorflow) not found beside the interpreter")
    out = subprocess.run(
        [cli, "show", "--dir", str(export[3]), "--all"], capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "signature_def['serving_default']" in text
    for needle in ("inputs['image']", "inputs['task']", "outputs['probabilities']", "outputs['predicted_class']"):
        assert needle in text
    assert "args_0" not in text


def test_fresh_process_loads_without_mtl_keras(export, tmp_path):
    model, x, base, path = export
    np.save(tmp_path / "image.npy", x["image"])
    np.save(tmp_path / "task.npy", x["task"])
    script = textwrap.dedent(
        f"""
        import sys, numpy as np, tensorflow as tf
        fn = tf.saved_model.load({str(path)!r}).signatures["serving_default"]
        out = fn(image=tf.constant(np.load({str(tmp_path / 'image.npy')!r})),
                 task=tf.constant(np.load({str(tmp_path / 'task.npy')!r})))
        np.save({str(tmp_path / 'out.npy')!r}, out["probabilities"].numpy())
        bad = [m for m in sys.modules if m.startswith(("mtl_keras", "keras"))]
        print("IMPORTED", bad)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    # Run from the temp dir so the checkout is not on sys.path.
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'mtl_keras" not in result.stdout, result.stdout
    expected = reference_predictions(model, x["image"], x["task"])["probabilities"]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-5, atol=1e-6)


def test_export_after_merge_serves_merged_heads(tmp_path):
    model, x = exported_model()
    model.set_estimator_of_task([0, 0, 2])
    path = export_for_serving(model, tmp_path / "m", version=4, task_signatures=False)
    assert path.name == "4"
    fn = tf.saved_model.load(str(path)).signatures["serving_default"]
    out = fn(image=tf.constant(x["image"]), task=tf.constant(x["task"]))
    ref = reference_predictions(model, x["image"], x["task"])
    np.testing.assert_allclose(out["logits"].numpy(), ref["logits"], rtol=1e-5, atol=1e-5)
    assert load_metadata(path)["estimator_of_task"] == [0, 0, 2]
    assert json.loads((path / "assets" / "mtl_keras_tasks.json").read_text())["format"] == "mtl_keras.serving/1"


def test_bad_version_is_rejected(tmp_path):
    model, _ = exported_model()
    with pytest.raises(ValueError, match="non-negative int"):
        export_for_serving(model, tmp_path, version="v1")
