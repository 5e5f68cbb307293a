"""Malformed serving requests get the model's own clear error, in process and over REST.

In process: the export's signatures called with plain `tf.saved_model.load`.
Over REST: the stand-in TF Serving server of tests/test_app_serving_client.py,
which passes a signature's error back as HTTP 400 `{"error": ...}`, as TF
Serving does. Raw JSON bodies are posted (the client app only builds valid
requests).
"""

import json
import re
import urllib.error
import urllib.request

import numpy as np
import pytest
import tensorflow as tf

from mtl_keras import MultiTaskModel, Task, TaskSet, conv_backbone
from mtl_keras.export import export_for_serving, reference_predictions
from test_app_serving_client import MODEL, make_server

GOOD = np.random.default_rng(0).random((3, 8, 8, 1)).astype("float32")
NAN = GOOD.copy()
NAN[1, 2, 3, 0] = np.nan

# (request name, image, task, the error's words); the image and task as a client would send them.
MALFORMED = [
    ("wrong image rank", GOOD[0], [0],
     r"image must have shape \[batch, 8, 8, 1\] \(resize .*\); got shape\] \[8,8,1\]"),
    ("wrong image size", np.zeros((3, 6, 6, 1), "float32"), [0, 1, 2], r"image must have shape .*\[3,6,6,1\]"),
    ("wrong task rank", GOOD, [[0], [1], [2]], r"task must be a vector of int32 task ids.*\[3,1\]"),
    ("batch mismatch", GOOD, [0, 1], r"image and task must have the same batch size; got\] \[3\] \[images and\] \[2\]"),
    ("empty batch", np.zeros((0, 8, 8, 1), "float32"), np.zeros((0,), "int32"), r"empty batch"),
    ("NaN pixels", NAN, [0, 1, 2], r"image has NaN or infinite pixels in examples\] \[1\]"),
    ("Inf pixels", np.where(np.arange(3)[:, None, None, None] == 2, np.inf, GOOD).astype("float32"), [0, 1, 2],
     r"image has NaN or infinite pixels in examples\] \[2\]"),
    ("task id too large", GOOD, [0, 3, 1], r"task ids must be in \[0, 3\) \(the model has 3 tasks\)"),
    ("negative task id", GOOD, [0, -1, 1], r"task ids must be in \[0, 3\); got a negative id"),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tasks = TaskSet([Task("a", "multiclass", 3), Task("b", "multiclass", 5), Task("c", "binary", 1)])
    backbone = conv_backbone((8, 8, 1), len(tasks), sigma=0.5, filters=(4, 8), seed=0)
    model = MultiTaskModel(backbone, tasks, head_units=(4,), seed=0)
    model.compile()
    path = export_for_serving(model, tmp_path_factory.mktemp("serving") / MODEL)
    server, _ = make_server(path)
    try:
        yield dict(model=model, loaded=tf.saved_model.load(str(path)),
                   url=f"http://127.0.0.1:{server.server_address[1]}/v1/models/{MODEL}:predict")
    finally:
        server.shutdown()
        server.server_close()


def _post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("name, image, task, error", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request_in_process(served, name, image, task, error):
    fn = served["loaded"].signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=error):
        fn(image=tf.constant(image, tf.float32), task=tf.constant(task, tf.int32))


@pytest.mark.parametrize("name, image, task, error", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request_over_rest(served, name, image, task, error):
    # Python's json writes NaN / Infinity, which TF Serving's parser accepts too.
    status, reply = _post(served["url"], {"inputs": {"image": np.asarray(image).tolist(),
                                                     "task": np.asarray(task).tolist()}})
    assert status == 400, reply
    assert re.search(error, reply["error"]), reply["error"]


def test_one_task_signature_refuses_the_same_images(served):
    fn = served["loaded"].signatures["task_b"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image must have shape .*\[8,8,1\]"):
        fn(image=tf.constant(GOOD[0]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"NaN or infinite pixels in examples\] \[1\]"):
        fn(image=tf.constant(NAN))
    with pytest.raises(tf.errors.InvalidArgumentError, match="empty batch"):
        fn(image=tf.zeros((0, 8, 8, 1)))


def test_wrong_dtypes_are_refused_before_the_model_runs(served):
    fn = served["loaded"].signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"input #0.*expected to be a float tensor but is a double"):
        fn(image=tf.constant(GOOD, tf.float64), task=tf.constant([0, 1, 2], tf.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"input #1.*expected to be a int32 tensor but is a float"):
        fn(image=tf.constant(GOOD), task=tf.constant([0.0, 1.0, 2.0]))
    # Over REST, JSON values are converted to the signature's dtypes (by the server, not the
    # model); what does not convert is a 400 naming the value.
    # (TF Serving also refuses a fractional id such as 0.5 for int32; the stand-in truncates it
    # like numpy, so that case is covered in process only, above.)
    status, reply = _post(served["url"], {"inputs": {"image": [[[["dark"]] * 8] * 8], "task": [0]}})
    assert status == 400 and "dark" in reply["error"], reply
    status, reply = _post(served["url"], {"inputs": {"image": GOOD.tolist(), "task": ["a", "b", "c"]}})
    assert status == 400 and "'a'" in reply["error"], reply


def test_a_well_formed_request_still_answers(served):
    status, reply = _post(served["url"], {"instances": [{"image": GOOD[i].tolist(), "task": i} for i in range(3)]})
    assert status == 200, reply
    expected = reference_predictions(served["model"], GOOD, [0, 1, 2])
    assert [p["predicted_class"] for p in reply["predictions"]] == expected["predicted_class"].tolist()
