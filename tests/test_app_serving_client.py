"""apps/serving_client.py against a stand-in TF Serving REST server (test-only).

The client's logic stays in the app: it runs on numpy and Pillow alone (no
TensorFlow, as the README promises), and anything under `mtl_keras` imports
TensorFlow with the package. So its functions are tested here, with the app.

The stand-in implements TF Serving's two REST endpoints the client uses,
`GET /v1/models/<name>/metadata` and `POST /v1/models/<name>:predict`
(row and columnar formats, `{"b64": ...}` values of string inputs decoded,
`{"error": ...}` replies with HTTP 400), by calling the SavedModel written
by `export_for_serving`, loaded with plain `tf.saved_model.load`. (No TF
Serving binary is installable here, from PyPI or Debian, so the real
server is not run.)
"""

import base64
import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from apps import serving_client as client
from mtl_keras import MultiTaskModel, Task, TaskSet, conv_backbone
from mtl_keras.export import export_for_serving, reference_predictions
from mtl_keras.image_preprocessing import ImagePreprocessing, decode_images

MODEL = "omniglot"
_DTYPES = {tf.float32: "DT_FLOAT", tf.int32: "DT_INT32", tf.int64: "DT_INT64", tf.string: "DT_STRING"}
PREPROCESSING = ImagePreprocessing(height=8, width=8, invert=True)


def _tensor_info(spec, name):
    dims = [{"size": str(-1 if d is None else d), "name": ""} for d in spec.shape]
    return {"dtype": _DTYPES[spec.dtype], "tensor_shape": {"dim": dims, "unknown_rank": False}, "name": name}


def _metadata(loaded):
    defs = {}
    for name, fn in loaded.signatures.items():
        inputs = fn.structured_input_signature[1]
        outputs = fn.structured_outputs
        defs[name] = {
            "inputs": {k: _tensor_info(s, f"{name}_{k}:0") for k, s in inputs.items()},
            "outputs": {k: _tensor_info(tf.TensorSpec(v.shape, v.dtype), f"out_{k}") for k, v in outputs.items()},
            "method_name": "tensorflow/serving/predict",
        }
    return {"model_spec": {"name": MODEL, "signature_name": "", "version": "1"},
            "metadata": {"signature_def": {"signature_def": defs}}}


def _from_json(value, dtype):
    """A request's JSON value as a tensor, the way TF Serving converts it to the input's dtype."""
    if dtype != tf.string:
        return tf.constant(np.asarray(value), dtype=dtype)

    def text(v):
        if isinstance(v, list):
            return [text(x) for x in v]
        if isinstance(v, dict) and set(v) == {"b64"}:  # binary values arrive base64-encoded
            return base64.b64decode(v["b64"], validate=True)
        if not isinstance(v, str):
            raise ValueError(f"JSON Value: {json.dumps(v)} Type: {type(v).__name__} is not of expected type: string")
        return v.encode("utf-8")

    return tf.constant(text(value), dtype=tf.string)


def make_server(export_dir):
    loaded = tf.saved_model.load(str(export_dir))
    metadata = _metadata(loaded)
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == f"/v1/models/{MODEL}/metadata":
                return self._reply(200, metadata)
            self._reply(404, {"error": f"Servable not found for request: Latest({self.path.split('/')[3]})"})

        def do_POST(self):
            m = re.fullmatch(r"/v1/models/([^/:]+):predict", self.path)
            if not m or m.group(1) != MODEL:
                return self._reply(404, {"error": "Servable not found"})
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(body)
            name = body.get("signature_name", "serving_default")
            if name not in loaded.signatures:
                return self._reply(400, {"error": f"Serving signature name: \"{name}\" not found in signature def"})
            fn = loaded.signatures[name]
            specs = fn.structured_input_signature[1]
            if "instances" in body:
                columns = {k: [row[k] for row in body["instances"]] for k in specs}
            else:
                columns = body["inputs"]
            try:
                tensors = {k: _from_json(columns[k], specs[k].dtype) for k in specs}
                out = {k: v.numpy() for k, v in fn(**tensors).items()}
            except Exception as e:  # what TF Serving does: the op's message, HTTP 400
                return self._reply(400, {"error": getattr(e, "message", None) or str(e)})
            if "instances" in body:
                n = len(next(iter(out.values())))
                return self._reply(200, {"predictions": [{k: v[i].tolist() for k, v in out.items()} for i in range(n)]})
            self._reply(200, {"outputs": {k: v.tolist() for k, v in out.items()}})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, requests


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    tasks = TaskSet([Task("Latin", "multiclass", 3), Task("Greek.v2", "multiclass", 5), Task("yes-no", "binary", 1)])
    backbone = conv_backbone((8, 8, 1), len(tasks), sigma=0.5, filters=(4, 8), seed=0)
    model = MultiTaskModel(backbone, tasks, head_units=(4,), seed=0)
    model.compile()
    export_dir = export_for_serving(model, tmp / "saved_models" / MODEL, preprocessing=PREPROCESSING)
    server, requests = make_server(export_dir)
    rng = np.random.default_rng(0)
    paths = []
    for i, (mode, ext) in enumerate([("L", "png"), ("RGB", "png"), ("L", "jpg")]):
        # Dark strokes on light paper, larger than the model's input, grey or colour, PNG or JPEG.
        pixels = np.where(rng.random((20, 24)) < 0.2, 0, 255).astype("uint8")
        path = tmp / f"img{i}.{ext}"
        Image.fromarray(pixels).convert(mode).save(path)
        paths.append(str(path))
    try:
        yield dict(model=model, url=f"http://127.0.0.1:{server.server_address[1]}", paths=paths,
                   requests=requests, images=client.load_images(paths, (8, 8, 1)))
    finally:
        server.shutdown()
        server.server_close()


def run(served, *flags):
    return client.run(client.parse_args(["--url", served["url"], "--model", MODEL, *flags, *served["paths"]]))


def test_load_images_resizes_and_inverts(tmp_path):
    path = tmp_path / "x.png"
    pixels = np.full((10, 12), 255, "uint8")
    pixels[:, :4] = 0  # ink on the left third, paper elsewhere
    Image.fromarray(pixels).save(path)
    img = client.load_images([str(path)], (5, 6, 1))
    assert img.shape == (1, 5, 6, 1) and img.dtype == np.float32
    assert img[0, :, 0].min() > 0.9 and img[0, :, 3:].max() < 0.1  # inverted: ink is bright
    np.testing.assert_allclose(client.load_images([str(path)], (5, 6, 1), invert="no"), 1 - img, atol=1e-6)
    assert client.load_images([str(path)], (4, 4, 3)).shape == (1, 4, 4, 3)
    with pytest.raises(client.ServingError, match="Cannot read image"):
        client.load_images([str(tmp_path / "missing.png")], (4, 4, 1))


@pytest.mark.parametrize("fmt", ["instances", "inputs"])
def test_every_task_signature_matches_the_model(served, fmt):
    results = run(served, "--send", "pixels", "--format", fmt)
    model, images = served["model"], served["images"]
    assert list(results) == served["paths"]
    for task_id, task in enumerate(model.tasks):
        label = client.signature_name(task.name)[len("task_"):]
        ref = reference_predictions(model, images, np.full(len(images), task_id))
        for i, path in enumerate(served["paths"]):
            answer = results[path][label]
            assert answer["predicted_class"] == ref["predicted_class"][i]
            np.testing.assert_allclose(answer["probabilities"], ref["probabilities"][i, : task.num_outputs], atol=1e-5)
    body = served["requests"][-1]
    assert ("instances" in body) == (fmt == "instances") and ("inputs" in body) == (fmt == "inputs")


def test_task_by_id_and_by_name(served, capsys):
    model, images = served["model"], served["images"]
    by_id = run(served, "--send", "pixels", "--task", "1", "--format", "inputs")
    assert served["requests"][-1]["signature_name"] == "serving_default"
    assert served["requests"][-1]["inputs"]["task"] == [1, 1, 1]
    ref = reference_predictions(model, images, np.ones(len(images), "int32"))
    for i, path in enumerate(served["paths"]):
        assert by_id[path]["task id 1"]["predicted_class"] == ref["predicted_class"][i]
        np.testing.assert_allclose(by_id[path]["task id 1"]["probabilities"], ref["probabilities"][i], atol=1e-5)
    by_name = run(served, "--send", "pixels", "--task", "Greek.v2")
    assert served["requests"][-1]["signature_name"] == "task_Greek_v2"
    for path in served["paths"]:
        assert by_name[path]["Greek.v2"]["predicted_class"] == by_id[path]["task id 1"]["predicted_class"]
    code = client.main(["--url", served["url"], "--model", MODEL, "--task", "Latin", "--top-k", "2", served["paths"][0]])
    out = capsys.readouterr().out
    assert code == 0 and served["paths"][0] in out and "Latin  class" in out and "top-2:" in out


def test_requests_the_model_cannot_answer_are_clear_errors(served, capsys):
    base = ["--url", served["url"], "--model", MODEL, "--send", "pixels"]
    # An unknown task id: the signature's own check, passed through by the server.
    assert client.main(base + ["--task", "7", served["paths"][0]]) == 2
    err = capsys.readouterr().err
    assert "HTTP 400" in err and "task ids must be in [0, 3)" in err
    assert client.main(base + ["--task", "-1", "--format", "inputs", served["paths"][0]]) == 2
    assert "task ids must be in [0, 3)" in capsys.readouterr().err
    # Images of the wrong size: rejected by the signature, not silently padded.
    with pytest.raises(client.ServingError, match=r"(?s)HTTP 400.*image must have shape \[batch, 8, 8, 1\]"):
        run(served, "--image-size", "6")
    # Unknown task name, unknown model, no server.
    with pytest.raises(client.ServingError, match="has no task 'Klingon'; its tasks are: Greek_v2, Latin, yes_no"):
        run(served, "--send", "pixels", "--task", "Klingon")
    with pytest.raises(client.ServingError, match="HTTP 404.*model name"):
        client.run(client.parse_args(["--url", served["url"], "--model", "nope", served["paths"][0]]))
    with pytest.raises(client.ServingError, match="Cannot reach"):
        client.run(client.parse_args(["--url", "http://127.0.0.1:9", "--timeout", "5", served["paths"][0]]))


def _reference_from_files(served, task_id):
    """What the model answers for the fixture's files, preprocessed in process by the export's own ops."""
    files = [open(p, "rb").read() for p in served["paths"]]
    images = decode_images(tf.constant(files), PREPROCESSING).numpy()
    return files, reference_predictions(served["model"], images, np.full(len(files), task_id, "int32"))


@pytest.mark.parametrize("fmt", ["instances", "inputs"])
def test_files_are_sent_as_they_are(served, fmt):
    sent_before = len(served["requests"])
    results = run(served, "--format", fmt)  # auto: the model takes files, so files are sent
    bodies = served["requests"][sent_before:]
    model = served["model"]
    # Every task's own bytes signature (sized to the task), as the export wrote them.
    assert [b["signature_name"] for b in bodies] == ["bytes_task_Greek_v2", "bytes_task_Latin", "bytes_task_yes_no"]
    for task_id, task in enumerate(model.tasks):
        files, ref = _reference_from_files(served, task_id)
        encoded = [{"b64": base64.b64encode(f).decode()} for f in files]
        body = bodies[["Greek.v2", "Latin", "yes-no"].index(task.name)]
        sent = ([row["image_bytes"] for row in body["instances"]] if fmt == "instances"
                else body["inputs"]["image_bytes"])
        assert sent == encoded  # the bytes of each file, unchanged
        label = client.signature_name(task.name)[len("task_"):]
        for i, path in enumerate(served["paths"]):
            assert results[path][label]["predicted_class"] == ref["predicted_class"][i]
            np.testing.assert_allclose(results[path][label]["probabilities"],
                                       ref["probabilities"][i, : task.num_outputs], atol=1e-5)


def test_files_with_a_task_name_or_id(served):
    by_name = run(served, "--send", "files", "--task", "Greek.v2")
    body = served["requests"][-1]
    assert body["signature_name"] == "serving_bytes"
    assert [row["task"] for row in body["instances"]] == ["Greek.v2"] * 3
    by_id = run(served, "--send", "files", "--task", "1", "--format", "inputs")
    assert served["requests"][-1]["inputs"]["task"] == ["1"] * 3
    _, ref = _reference_from_files(served, 1)
    for i, path in enumerate(served["paths"]):
        assert by_name[path]["Greek.v2"]["predicted_class"] == by_id[path]["task id 1"]["predicted_class"]
        assert by_id[path]["task id 1"]["predicted_class"] == ref["predicted_class"][i]
        np.testing.assert_allclose(by_id[path]["task id 1"]["probabilities"], ref["probabilities"][i], atol=1e-5)


def test_files_the_model_cannot_answer_are_clear_errors(served, tmp_path):
    # An unknown task name: the model lists its tasks.
    with pytest.raises(client.ServingError, match=r"(?s)HTTP 400.*unknown task.*0 Latin, 1 Greek\.v2, 2 yes-no"
                                                  r".*Unknown:\] \[Klingon\]"):
        run(served, "--task", "Klingon")
    # A file the model does not read, sent as it is: the model names the problem and the example.
    gif = tmp_path / "anim.gif"
    Image.fromarray(np.zeros((8, 8), "uint8")).save(gif)
    args = client.parse_args(["--url", served["url"], "--model", MODEL, served["paths"][0], str(gif)])
    with pytest.raises(client.ServingError, match=r"(?s)HTTP 400.*image_bytes is a GIF.*Examples:\] \[1\]"):
        client.run(args)
    with pytest.raises(client.ServingError, match="Cannot read image"):
        run(served, "--send", "files", str(tmp_path / "missing.png"))
    with pytest.raises(client.ServingError, match="--image-size applies to --send pixels"):
        run(served, "--send", "files", "--image-size", "8")
    # A model exported without preprocessing takes no files.
    args = client.parse_args(["--send", "files", served["paths"][0]])
    with pytest.raises(client.ServingError, match="has no 'serving_bytes' signature.*pass --send pixels"):
        client._file_requests(args, {"serving_default": {}, "task_a": {}})


def test_client_runs_without_tensorflow():
    app = client.__file__
    res = subprocess.run([sys.executable, "-X", "importtime", app, "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "TF Serving" in res.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in res.stderr.splitlines() if "|" in line}
    assert {"numpy", "PIL"} <= imported and not imported & {"tensorflow", "keras", "mtl_keras"}


@pytest.mark.parametrize("flags, message", [
    (["--url", "localhost:8501"], "argument --url: expected an http:// or https:// address"),
    (["--url", "ftp://host"], "argument --url: expected an http:// or https:// address"),
    (["--timeout", "0"], "argument --timeout: expected a number of seconds > 0, got '0'"),
    (["--timeout", "nan"], "argument --timeout: expected a number of seconds > 0, got 'nan'"),
])
def test_bad_url_and_timeout_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        client.parse_args([*flags, "char.png"])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
