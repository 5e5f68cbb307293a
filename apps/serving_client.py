"""Ask a TF Serving model (exported by mtl_keras.export) for per-task predictions.

    python apps/serving_client.py --url http://localhost:8501 --model omniglot img1.png img2.png
    python apps/serving_client.py --model omniglot --task Latin img1.png        # one task, by name
    python apps/serving_client.py --model omniglot --task 3 --format inputs img1.png   # by task id
    python apps/serving_client.py --model omniglot --send pixels img1.png       # preprocess here

Speaks TF Serving's REST API: reads the signatures from
`GET /v1/models/<name>/metadata`, posts `{"instances": [...]}` (row format)
or `{"inputs": {...}}` (columnar) to `POST /v1/models/<name>:predict` and
prints, for every image, each task's predicted class and its probability.

Two ways to send images (--send):

- `files` (the default when the model has a `serving_bytes` signature, i.e.
  was exported with its preprocessing): each file's bytes as they are,
  base64-encoded as `{"b64": ...}`; the model decodes, converts, resizes and
  inverts them exactly as training did. Without --task it asks every
  `bytes_task_<name>` signature; --task NAME or --task ID asks
  `serving_bytes` with that task.
- `pixels`: resizes each image here to the input size the metadata reports
  (grayscale or RGB as the model expects; dark strokes on light paper are
  inverted to the light-on-dark the model was trained on, see --invert),
  and sends float tensors. This only approximates the training
  preprocessing (Pillow's resize is not TensorFlow's). Without --task it
  asks every `task_<name>` signature; --task NAME asks that task's
  signature; --task ID asks `serving_default` with that task id.

Needs only numpy and Pillow (no TensorFlow). Serve an export with:

    docker run -p 8501:8501 -v "$PWD/saved_models/omniglot:/models/omniglot" \\
        -e MODEL_NAME=omniglot tensorflow/serving
"""

import argparse
import base64
import json
import re
import sys
import urllib.error
import urllib.request

import numpy as np
from PIL import Image

TASK_PREFIX = "task_"
DEFAULT_SIGNATURE = "serving_default"
BYTES_SIGNATURE = "serving_bytes"
BYTES_PREFIX = "bytes_"


class ServingError(RuntimeError):
    """A request TF Serving could not answer (HTTP error, bad reply, no connection)."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


def signature_name(task_name):
    """The export's signature name of a task (`mtl_keras.export.signature_name`)."""
    return TASK_PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", task_name)


def _model_url(url, model, version=None):
    base = url.rstrip("/") + f"/v1/models/{model}"
    return base + (f"/versions/{int(version)}" if version is not None else "")


def _request(url, body=None, timeout=30.0):
    data = None if body is None else json.dumps(body).encode("utf-8")
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as reply:
            text = reply.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        raw = e.read().decode("utf-8", "replace")
        try:
            detail = json.loads(raw).get("error", raw)
        except (json.JSONDecodeError, AttributeError):
            detail = raw
        hint = ""
        if e.code == 404:
            hint = " (is the model name right, and has the server loaded a version? see /v1/models/<name>)"
        raise ServingError(f"HTTP {e.code} from {url}: {detail.strip()}{hint}", status=e.code) from None
    except urllib.error.URLError as e:
        raise ServingError(
            f"Cannot reach {url}: {e.reason}. Is TF Serving running with its REST port (8501) published?"
        ) from None
    try:
        reply = json.loads(text)
    except json.JSONDecodeError:
        raise ServingError(f"{url} did not answer with JSON: {text[:200]!r}") from None
    if isinstance(reply, dict) and "error" in reply:
        raise ServingError(f"{url}: {reply['error']}")
    return reply


def get_metadata(url, model, version=None, timeout=30.0):
    """`GET /v1/models/<model>[/versions/<v>]/metadata`, parsed."""
    return _request(_model_url(url, model, version) + "/metadata", timeout=timeout)


def signatures(metadata):
    """`{signature: {"inputs": {name: shape list (-1 = any)}, "outputs": {...}}}` of a metadata reply."""
    try:
        defs = metadata["metadata"]["signature_def"]["signature_def"]
    except (KeyError, TypeError):
        raise ServingError("The metadata reply has no metadata.signature_def.signature_def") from None

    def shapes(tensors):
        out = {}
        for name, info in tensors.items():
            dims = info.get("tensor_shape", {}).get("dim", [])
            out[name] = [int(d.get("size", -1)) for d in dims]
        return out

    return {
        name: {"inputs": shapes(d.get("inputs", {})), "outputs": shapes(d.get("outputs", {}))}
        for name, d in defs.items()
        if not name.startswith("__")
    }


def task_signatures(sigs):
    """`{signature name: task label}` of the per-task signatures."""
    return {name: name[len(TASK_PREFIX):] for name in sorted(sigs) if name.startswith(TASK_PREFIX)}


def bytes_task_signatures(sigs):
    """`{signature name: task label}` of the per-task signatures that take image files."""
    prefix = BYTES_PREFIX + TASK_PREFIX
    return {name: name[len(prefix):] for name in sorted(sigs) if name.startswith(prefix)}


def read_files(paths):
    """The bytes of each file, as they are (the model decodes them)."""
    out = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                out.append(f.read())
        except OSError as e:
            raise ServingError(f"Cannot read image {path}: {e}") from None
    return out


def load_images(paths, shape, invert="auto"):
    """Reads image files into a float32 `[N, *shape]` array in [0, 1].

    Args:
        paths: image files (anything Pillow reads).
        shape: `(height, width, channels)` with 1 (grayscale) or 3 (RGB)
            channels.
        invert: `"yes"`, `"no"`, or `"auto"`: invert images whose mean is
            above 0.5 (dark ink on light paper) into light ink on a dark
            background, as the training images are.
    """
    height, width, channels = shape
    if channels not in (1, 3):
        raise ServingError(f"The model expects {channels} channels; this client reads grayscale (1) or RGB (3).")
    out = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img = img.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
                pixels = np.asarray(img, dtype=np.float32) / 255.0
        except (OSError, ValueError) as e:
            raise ServingError(f"Cannot read image {path}: {e}") from None
        if invert == "yes" or (invert == "auto" and pixels.mean() > 0.5):
            pixels = 1.0 - pixels
        out.append(pixels.reshape(height, width, channels))
    return np.stack(out)


def predict(url, model, inputs, signature=DEFAULT_SIGNATURE, fmt="instances", version=None, timeout=30.0):
    """`POST /v1/models/<model>:predict`; returns `{output name: np.ndarray}`.

    Args:
        inputs: `{input name: array or list}`, all with the same first
            (batch) size; `bytes` values (image files) are sent as
            `{"b64": ...}`, which TF Serving decodes for string inputs.
        fmt: `"instances"` (row format: one object per example) or
            `"inputs"` (columnar: one array per input).
    """
    columns = {k: [_json_value(x) for x in v] if isinstance(v, (list, tuple)) else np.asarray(v).tolist()
               for k, v in inputs.items()}
    if fmt == "instances":
        n = len(next(iter(columns.values())))
        body = {"instances": [{k: v[i] for k, v in columns.items()} for i in range(n)]}
    elif fmt == "inputs":
        body = {"inputs": columns}
    else:
        raise ValueError(f"fmt must be 'instances' or 'inputs', got {fmt!r}.")
    body["signature_name"] = signature
    reply = _request(_model_url(url, model, version) + ":predict", body, timeout=timeout)
    if "predictions" in reply:
        rows = reply["predictions"]
        if rows and isinstance(rows[0], dict):
            return {k: np.asarray([r[k] for r in rows]) for k in rows[0]}
        return {"output": np.asarray(rows)}
    if "outputs" in reply:
        outs = reply["outputs"]
        if isinstance(outs, dict):
            return {k: np.asarray(v) for k, v in outs.items()}
        return {"output": np.asarray(outs)}
    raise ServingError(f"Unexpected predict reply (no 'predictions' or 'outputs'): {str(reply)[:200]}")


def _json_value(value):
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    return value.tolist() if isinstance(value, np.ndarray) else value


def describe(outputs, i, top_k=1):
    """One example's answer as text: class and probability, top-k, or regression values."""
    probs = np.asarray(outputs.get("probabilities", outputs.get("output")))[i]
    cls = int(np.asarray(outputs["predicted_class"])[i]) if "predicted_class" in outputs else int(np.argmax(probs))
    if cls < 0:  # regression: the values themselves
        return "values " + ", ".join(f"{v:.4g}" for v in np.asarray(outputs.get("logits", probs))[i])
    if probs.size == 1:  # binary: P(label = 1)
        return f"class {cls}  (P(1) = {float(probs[0]):.3f})"
    text = f"class {cls}  (p = {float(probs[cls]):.3f})"
    if top_k > 1:
        order = np.argsort(-probs)[:top_k]
        text += "  top-" + str(top_k) + ": " + ", ".join(f"{int(c)}:{float(probs[c]):.3f}" for c in order)
    return text


def _size(text):
    m = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip())
    if not m or int(m.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"expected N or HxW (e.g. 32 or 32x48), got {text!r}")
    return int(m.group(1)), int(m.group(2) or m.group(1))


def _url(text):
    # urllib would refuse any other scheme only at the first request, with a traceback.
    if not re.match(r"https?://[^/\s]+", text):
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// address (e.g. http://localhost:8501), "
                                         f"got {text!r}")
    return text


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify")
    p.add_argument("--url", type=_url, default="http://localhost:8501", help="TF Serving's REST address")
    p.add_argument("--model", default="omniglot", help="the served model's name (MODEL_NAME)")
    p.add_argument("--version", type=int, default=None, help="a model version (default: the server's latest)")
    p.add_argument("--task", default=None,
                   help="a task name or an integer task id; default: every task")
    p.add_argument("--send", choices=("auto", "files", "pixels"), default="auto",
                   help="files: the image files as they are (the model preprocesses them; needs an export "
                        "with preprocessing); pixels: resized and inverted here, as float tensors; "
                        "auto: files when the model takes them")
    p.add_argument("--format", choices=("instances", "inputs"), default="instances",
                   help="request body: row ('instances') or columnar ('inputs') format")
    p.add_argument("--image-size", type=_size, default=None, metavar="N|HxW",
                   help="--send pixels: resize to N x N (or H x W) instead of the size the metadata reports")
    p.add_argument("--invert", choices=("auto", "yes", "no"), default=None,
                   help="--send pixels: invert images (auto, the default: when the paper is lighter than the ink)")
    p.add_argument("--top-k", type=int, default=1, help="also list the k most probable classes")
    p.add_argument("--timeout", type=_seconds, default=30.0, help="seconds per HTTP request")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p.parse_args(argv)


def _file_requests(args, sigs):
    """(task label, signature, inputs) of each request that sends the files as they are."""
    if BYTES_SIGNATURE not in sigs:
        raise ServingError(
            f"Model {args.model!r} has no {BYTES_SIGNATURE!r} signature, so it takes no image files (it was "
            "exported without preprocessing); pass --send pixels, or export with "
            "export_for_serving(..., preprocessing=...)."
        )
    for flag, value in (("--image-size", args.image_size), ("--invert", args.invert)):
        if value is not None:
            raise ServingError(f"{flag} applies to --send pixels; with --send files the model preprocesses "
                               "the files itself. Drop the flag, or pass --send pixels.")
    files = read_files(args.images)
    if args.task is None:
        per_task = bytes_task_signatures(sigs)
        if not per_task:
            raise ServingError(f"The model has no bytes_task_<name> signatures; pass --task NAME or ID to use "
                               f"{BYTES_SIGNATURE}.")
        return [(label, sig, {"image_bytes": files}) for sig, label in per_task.items()]
    # serving_bytes reads a name or an id as text and answers unknown ones listing the tasks.
    label = f"task id {args.task}" if re.fullmatch(r"-?\d+", args.task) else args.task
    return [(label, BYTES_SIGNATURE, {"image_bytes": files, "task": [args.task] * len(files)})]


def run(args):
    """Does the requests of parsed `args`; returns `{image: {task label: answer}}`."""
    sigs = signatures(get_metadata(args.url, args.model, args.version, args.timeout))
    send = args.send
    if send == "auto":
        send = "files" if BYTES_SIGNATURE in sigs and args.image_size is None and args.invert is None else "pixels"
    if send == "files":
        return _answers(args, _file_requests(args, sigs))
    if DEFAULT_SIGNATURE not in sigs:
        raise ServingError(f"Model {args.model!r} has no {DEFAULT_SIGNATURE!r} signature; it has {sorted(sigs)}.")
    image_shape = sigs[DEFAULT_SIGNATURE]["inputs"].get("image")
    if not image_shape or len(image_shape) != 4:
        raise ServingError(
            f"{DEFAULT_SIGNATURE} has no 4-D 'image' input ({sigs[DEFAULT_SIGNATURE]['inputs']}); "
            "was the model exported by mtl_keras.export?"
        )
    shape = image_shape[1:]
    if args.image_size:
        shape = [*args.image_size, shape[2]]
    if any(d <= 0 for d in shape):
        raise ServingError(f"The model's image size is not fixed ({image_shape}); pass --image-size.")
    images = load_images(args.images, shape, args.invert or "auto")

    per_task = task_signatures(sigs)
    requests = []  # (task label, signature, inputs)
    if args.task is None:
        if not per_task:
            raise ServingError("The model has no task_<name> signatures; pass --task ID to use serving_default.")
        requests = [(label, sig, {"image": images}) for sig, label in per_task.items()]
    elif re.fullmatch(r"-?\d+", args.task):
        task_ids = np.full(len(images), int(args.task), dtype=np.int32)
        requests = [(f"task id {args.task}", DEFAULT_SIGNATURE, {"image": images, "task": task_ids})]
    else:
        sig = signature_name(args.task)
        if sig not in sigs:
            raise ServingError(f"Model {args.model!r} has no task {args.task!r}; its tasks are: "
                               + ", ".join(per_task.values()))
        requests = [(args.task, sig, {"image": images})]
    return _answers(args, requests)


def _answers(args, requests):
    """Sends each (task label, signature, inputs) request; `{image: {task label: answer}}`."""
    results = {path: {} for path in args.images}
    for label, sig, inputs in requests:
        outputs = predict(args.url, args.model, inputs, sig, args.format, args.version, args.timeout)
        for i, path in enumerate(args.images):
            results[path][label] = {
                "predicted_class": int(np.asarray(outputs["predicted_class"])[i]),
                "probabilities": np.asarray(outputs["probabilities"])[i].tolist(),
                "text": describe(outputs, i, args.top_k),
            }
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        results = run(args)
    except ServingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    width = max(len(label) for r in results.values() for label in r)
    for path, answers in results.items():
        print(path)
        for label, answer in answers.items():
            print(f"  {label.ljust(width)}  {answer['text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
