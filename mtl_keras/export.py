"""Export a `MultiTaskModel` as a SavedModel that TF Serving (or plain TF) serves.

The export needs no mtl_keras code to load: `tf.saved_model.load(path)` or
TF Serving's `--model_base_path` pointing at the parent of the version
folders. Routing masks are weights of the model, so the export routes every
task exactly as the trained model did.

Signatures (all inputs and outputs named, never `args_0`):

- `serving_default(image, task)`: `image` float32 `[B, *input_shape]`,
  `task` int32 `[B]`; returns each example's own task output:
  `probabilities` `[B, max_outputs]` (softmax over the task's classes,
  padded with zeros to the largest task; for a binary task column 0 is
  P(label = 1); for a regression task the predicted values), `predicted_class`
  int32 `[B]` (argmax, or `P >= 0.5` for binary; -1 for regression) and
  `logits` `[B, max_outputs]`.
- `task_<name>(image)`: the same outputs for one task, sized to that task.

With `preprocessing` (an `ImagePreprocessing`, which a data module
provides, e.g. `mtl_keras.data.omniglot.serving_preprocessing`), the export
also takes image files as they are (`mtl_keras.image_preprocessing` decodes,
converts, inverts and resizes them in the graph, as training did):

- `serving_bytes(image_bytes, task)`: `image_bytes` string `[B]`, one PNG
  or JPEG file per example (any size, grayscale or colour; over TF
  Serving's REST API `{"b64": "<base64 of the file>"}`), `task` string
  `[B]`, a task name (`"Latin"`) or a task id as text (`"3"`); returns the
  outputs of `serving_default` and `task_id` int32 `[B]`.
- `bytes_task_<name>(image_bytes)`: one task's outputs, as `task_<name>`.

Requests the model cannot answer fail with an `InvalidArgumentError` whose
message says what is wrong (TF Serving returns it with HTTP 400): an image
of another shape or rank than `[batch, *input_shape]`, a `task` that is not
a vector, image and task batches of different sizes, an empty batch, NaN or
infinite pixels, a task id outside `[0, num_tasks)`; for the bytes
signatures also empty, truncated, non-PNG/JPEG, GIF, animated, too large
(over 16 megapixels) or undecoded base64 files
(`image_preprocessing.check_requests`, `decode_images`) and unknown task
names (the message lists the tasks). A wrong dtype is
refused before the graph runs, by TensorFlow's signature binding (in
process: "input #i was expected to be a float tensor"; TF Serving's REST
layer converts JSON numbers to the signature's dtypes and refuses what does
not convert).

**Crash safety.** A version folder appears under the base path complete or
not at all: the export is written to a hidden staging folder beside it
(`.<version>.tmp-<host>-<pid>-...`, a name TF Serving ignores since it is
not an integer), flushed to disk, then renamed to `<version>` in one
`rename`; `overwrite=True` swaps old and new in one `renameat2` exchange
(Linux; elsewhere the old version is moved aside first, and put back by the
next export if the process died in between). Staging folders left by a
killed export of this host are removed by the next export.

The version folder also holds `assets/mtl_keras_tasks.json`: task names,
kinds, class counts, input shape, the Selective Sharing groups, for each
routing layer, sigma, mode and seed, and the image preprocessing (null
without one).
"""

import ctypes
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from mtl_keras.backbones import routing_layers
from mtl_keras.image_preprocessing import ImagePreprocessing
from mtl_keras.image_preprocessing import decode_images
from mtl_keras.reporting import fsync_path

METADATA_FILE = "mtl_keras_tasks.json"
BYTES_SIGNATURE = "serving_bytes"
BYTES_PREFIX = "bytes_"


def next_version(base_dir):
    """The next integer version under `base_dir` (1 when there is none)."""
    base = Path(base_dir)
    versions = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()] if base.is_dir() else []
    return max(versions, default=0) + 1


def signature_name(task_name):
    """`task_<name>` with characters other than [A-Za-z0-9_] replaced by `_`."""
    return "task_" + re.sub(r"[^A-Za-z0-9_]", "_", task_name)


def bytes_signature_name(task_name):
    """`bytes_task_<name>`: a task's signature that takes image files."""
    return BYTES_PREFIX + signature_name(task_name)


def _image_spec(model):
    images = [t for t in model.backbone.inputs if t.name == "image"] or model.backbone.inputs[:1]
    shape = images[0].shape
    if any(d is None for d in shape[1:]):
        raise ValueError(
            f"Export needs a fixed image shape; the backbone's image input is {tuple(shape)}. "
            "Build the backbone with a fully specified input_shape."
        )
    return tf.TensorSpec((None, *shape[1:]), tf.float32, name="image")


def _outputs(logits, task_ids, table):
    """Probabilities, predicted class and logits of each example's task."""
    is_multiclass = tf.gather(tf.constant(table.is_multiclass), task_ids)
    is_binary = tf.gather(tf.constant(table.is_binary), task_ids)
    valid = tf.gather(tf.constant(table.valid_outputs), task_ids)
    softmax = tf.nn.softmax(logits, axis=-1)
    sigmoid = tf.where(valid, tf.sigmoid(logits), 0.0)
    probabilities = tf.where(
        is_multiclass[:, None], softmax, tf.where(is_binary[:, None], sigmoid, logits)
    )
    argmax = tf.argmax(logits, axis=-1, output_type=tf.int32)
    binary_class = tf.cast(logits[:, 0] >= 0.0, tf.int32)
    predicted = tf.where(is_multiclass, argmax, tf.where(is_binary, binary_class, -1))
    return {"probabilities": probabilities, "predicted_class": predicted, "logits": logits}


def serving_metadata(model, preprocessing=None):
    """What the export's asset JSON says about the model's tasks, routing and image preprocessing."""
    image_spec = _image_spec(model)
    routing = []
    for layer in routing_layers(model.backbone):
        routing.append(
            {
                "layer": layer.name,
                "sigma": layer.sigma,
                "mode": layer.mode,
                "seed": layer.seed,
                "units": int(layer.masks.shape[1]),
                "units_per_task": layer.masks.sum(axis=1).astype(int).tolist(),
            }
        )
    return {
        "format": "mtl_keras.serving/1",
        "input_shape": list(image_spec.shape[1:]),
        "tasks": [
            {
                "id": i,
                "name": t.name,
                "kind": t.kind,
                "num_outputs": t.num_outputs,
                "signature": signature_name(t.name),
                "bytes_signature": bytes_signature_name(t.name) if preprocessing is not None else None,
            }
            for i, t in enumerate(model.tasks)
        ],
        "max_outputs": int(model.table.max_outputs),
        "estimator_of_task": list(model.estimator_of_task),
        "routing": routing,
        "preprocessing": preprocessing.to_json() if preprocessing is not None else None,
        "bytes_signature": BYTES_SIGNATURE if preprocessing is not None else None,
        "outputs": {
            "probabilities": "softmax over the task's classes (binary: P(1) in column 0; "
            "regression: values), zero-padded to max_outputs",
            "predicted_class": "argmax (binary: P >= 0.5; regression: -1)",
            "logits": "raw outputs, padded",
        },
    }


def export_for_serving(model, base_dir, version=None, task_signatures=True, overwrite=False,
                       preprocessing=None):
    """Writes `model` to `base_dir/<version>/` in TF Serving's layout.

    Args:
        model: a `MultiTaskModel` (one task per example inputs).
        base_dir: the model's base path (TF Serving's `--model_base_path`).
        version: integer version; default: one more than the largest there.
        task_signatures: also write one `task_<name>` signature per task
            (and `bytes_task_<name>` with `preprocessing`).
        overwrite: replace an existing `base_dir/<version>/`; without it an
            existing version is an error (TF Serving may be serving it).
        preprocessing: an `ImagePreprocessing` whose shape is the model's
            input shape: also write `serving_bytes` (and `bytes_task_<name>`),
            which take encoded PNG / JPEG files and preprocess them in the
            graph. None: tensor signatures only.

    Returns:
        The `Path` of the version folder.

    Example:

    >>> path = export_for_serving(model, "saved_models/omniglot")
    >>> served = tf.saved_model.load(str(path))
    >>> out = served.signatures["serving_default"](image=images, task=task_ids)
    >>> out["predicted_class"]
    >>> from mtl_keras.data.omniglot import serving_preprocessing
    >>> path = export_for_serving(model, "saved_models/omniglot", preprocessing=serving_preprocessing(32))
    >>> png = open("0696_19.png", "rb").read()
    >>> tf.saved_model.load(str(path)).signatures["serving_bytes"](
    ...     image_bytes=tf.constant([png]), task=tf.constant(["Latin"]))["predicted_class"]
    """
    base = Path(base_dir)
    if base.is_dir():
        # First, so that a version a killed overwrite moved aside is back before the next is picked.
        _remove_dead_staging(base)
    if version is None:
        version = next_version(base)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"version must be a non-negative int (TF Serving's layout), got {version!r}.")
    target = base / str(version)
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{target} already exists; pick another version, leave version=None for the next one, "
            "or pass overwrite=True."
        )
    table = model.table
    num_tasks = len(model.tasks)
    image_spec = _image_spec(model)
    task_spec = tf.TensorSpec((None,), tf.int32, name="task")
    expected_shape = [int(d) for d in image_spec.shape[1:]]
    if preprocessing is not None:
        _check_preprocessing(preprocessing, expected_shape, [t.name for t in model.tasks])

    image_pattern = r"\d+," + ",".join(map(str, expected_shape))
    shape_message = (f"image must have shape [batch, {', '.join(map(str, expected_shape))}] "
                     "(resize the images to the input size of the model); got shape")

    def predict(image, task):
        # One check at a time, in this order: each later check reads what
        # the earlier ones vouch for, and the first problem is the one named.
        image_shape = _shape_text(image)
        # An empty JSON list arrives as shape [0]: named as the empty batch it is.
        with tf.control_dependencies([
            tf.debugging.Assert(~tf.strings.regex_full_match(image_shape, r"0(,\d+)*"),
                                ["empty batch: send at least one image and its task id."]),
        ]):
            image_shape = tf.identity(image_shape)
        with tf.control_dependencies([
            tf.debugging.Assert(tf.strings.regex_full_match(image_shape, image_pattern), [shape_message, image_shape])
        ]):
            task_shape = _shape_text(task)
        with tf.control_dependencies([
            tf.debugging.Assert(tf.strings.regex_full_match(task_shape, r"\d+"),
                                ["task must be a vector of int32 task ids, one per image; got shape", task_shape]),
        ]):
            batch = tf.shape(image)[0]
            task_batch = tf.shape(task)[0]
        with tf.control_dependencies([
            tf.debugging.Assert(tf.equal(batch, task_batch),
                                ["image and task must have the same batch size; got", batch, "images and",
                                 task_batch, "task ids."]),
        ]):
            batch = tf.identity(batch)
        finite = tf.reduce_all(tf.math.is_finite(tf.reshape(image, [batch, -1])), axis=1)
        checks = [
            tf.debugging.Assert(tf.reduce_all(finite),
                                ["image has NaN or infinite pixels in examples", tf.where(~finite)[:, 0]]),
            tf.debugging.assert_greater_equal(
                task, 0, message=f"task ids must be in [0, {num_tasks}); got a negative id."
            ),
            tf.debugging.assert_less(
                task, num_tasks,
                message=f"task ids must be in [0, {num_tasks}) (the model has {num_tasks} tasks).",
            ),
        ]
        # The checks must run before any gather sees a bad id, and before the
        # model's own ops read the image: without the image's dependency, graph
        # execution may run one of them first on a wrongly shaped image, and
        # its error ("Invalid reduction dimension") would replace the check's.
        with tf.control_dependencies(checks):
            task = tf.identity(task)
            image = tf.identity(image)
        logits = model({"image": image, "task": task}, training=False)
        return _outputs(tf.cast(logits, tf.float32), task, table)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", predict, input_signature=[image_spec, task_spec])
    if task_signatures:
        seen = set()
        for i, t in enumerate(model.tasks):
            name = signature_name(t.name)
            if name in seen:
                raise ValueError(
                    f"Two task names map to the signature {name!r}; rename one of the tasks."
                )
            seen.add(name)
            n = t.num_outputs

            def one_task(image, i=i, n=n):
                task = tf.fill(tf.shape(image)[:1], tf.constant(i, tf.int32))
                out = predict(image, task)
                return {
                    "probabilities": out["probabilities"][:, :n],
                    "predicted_class": out["predicted_class"],
                    "logits": out["logits"][:, :n],
                }

            archive.add_endpoint(name, one_task, input_signature=[image_spec])

    if preprocessing is not None:
        _add_bytes_endpoints(archive, predict, preprocessing, model.tasks, task_signatures)

    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(version)}{os.getpid()}-", dir=base))
    old = None
    try:
        # mkdtemp makes a private (0700) folder; a server running as another
        # user must be able to read the version, as with any folder made here.
        os.chmod(staging, 0o777 & ~_umask())
        archive.write_out(str(staging), verbose=False)
        assets = staging / "assets"
        assets.mkdir(exist_ok=True)
        (assets / METADATA_FILE).write_text(json.dumps(serving_metadata(model, preprocessing), indent=2))
        # Renamed data can reach the disk before its contents do: a power
        # cut must not leave an integer folder of empty files either.
        _fsync_tree(staging)
        if target.exists() and _exchange(staging, target):
            # One atomic swap: the old version is in `staging` now.
            pass
        else:
            if target.exists():
                # No atomic swap here: move the old version aside in one
                # rename (a kill during a recursive delete would leave a
                # half-deleted version visible); a kill before the next
                # rename leaves it aside, and the next export puts it back.
                old = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(version)}{os.getpid()}-old-", dir=base))
                os.replace(target, old / str(version))
            os.replace(staging, target)
        fsync_path(base)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old / str(version), target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def _check_preprocessing(preprocessing, expected_shape, names):
    if not isinstance(preprocessing, ImagePreprocessing):
        raise TypeError(
            "preprocessing must be an mtl_keras.image_preprocessing.ImagePreprocessing (a data module provides "
            f"one, e.g. mtl_keras.data.omniglot.serving_preprocessing); got {type(preprocessing).__name__}."
        )
    if list(preprocessing.shape) != list(expected_shape):
        raise ValueError(
            f"preprocessing makes images of shape {list(preprocessing.shape)}, but the model takes "
            f"{list(expected_shape)}; describe the preprocessing the model was trained with "
            "(e.g. serving_preprocessing(image_size) with the training image_size)."
        )
    for i, name in enumerate(names):
        # serving_bytes reads a task as a name first, then as an id.
        if re.fullmatch(r"[0-9]+", name) and int(name) != i:
            raise ValueError(
                f"Task {i} is named {name!r}, which serving_bytes would also read as task id {int(name)}; "
                "rename the task, or export without preprocessing."
            )


def _task_ids(task, names):
    """Task names or ids (as text) to int32 ids; an unknown one fails naming it and listing the tasks."""
    task_shape = _shape_text(task)
    with tf.control_dependencies([
        tf.debugging.Assert(tf.strings.regex_full_match(task_shape, r"\d+"),
                            ["task must be a vector of task names or ids (as text), one per image; got shape",
                             task_shape]),
    ]):
        task = tf.identity(task)
    match = tf.equal(task[:, None], tf.constant(names)[None, :])
    by_name = tf.argmax(tf.cast(match, tf.int32), axis=1, output_type=tf.int32)
    is_id = tf.strings.regex_full_match(task, r"[0-9]{1,9}")
    by_id = tf.strings.to_number(tf.where(is_id, task, "0"), tf.int32)
    ids = tf.where(tf.reduce_any(match, axis=1), by_name, tf.where(is_id, by_id, -1))
    listing = ", ".join(f"{i} {n}" for i, n in enumerate(names))
    if len(listing) > 1500:
        listing = listing[:1500] + ", ..."
    unknown = ids < 0
    with tf.control_dependencies([
        tf.debugging.Assert(
            ~tf.reduce_any(unknown),
            [f"unknown task: give a task name or its id as text. The tasks of this model (id name) are: {listing}. "
             f"They are also in assets/{METADATA_FILE} and, as {BYTES_PREFIX}task_<name> signatures, in "
             "GET /v1/models/<model>/metadata. Unknown:", tf.unique(tf.boolean_mask(task, unknown)).y],
            summarize=20),
    ]):
        return tf.identity(ids)


def _add_bytes_endpoints(archive, predict, preprocessing, tasks, task_signatures):
    """`serving_bytes` and (with `task_signatures`) `bytes_task_<name>`: files in, `predict`'s checks kept."""
    bytes_spec = tf.TensorSpec((None,), tf.string, name="image_bytes")
    names = [t.name for t in tasks]

    def predict_bytes(image_bytes, task):
        image = decode_images(image_bytes, preprocessing)
        # Problems of the files are named first, then those of the tasks.
        with tf.control_dependencies([image]):
            task_ids = _task_ids(task, names)
        # The decoded images go through `predict`, so every check of the
        # tensor signatures (batch sizes, task id range) holds here too.
        out = predict(image, task_ids)
        return {**out, "task_id": task_ids}

    archive.add_endpoint(BYTES_SIGNATURE, predict_bytes,
                         input_signature=[bytes_spec, tf.TensorSpec((None,), tf.string, name="task")])
    if not task_signatures:
        return
    for i, t in enumerate(tasks):
        n = t.num_outputs

        def one_task(image_bytes, i=i, n=n):
            image = decode_images(image_bytes, preprocessing)
            out = predict(image, tf.fill(tf.shape(image)[:1], tf.constant(i, tf.int32)))
            return {
                "probabilities": out["probabilities"][:, :n],
                "predicted_class": out["predicted_class"],
                "logits": out["logits"][:, :n],
            }

        archive.add_endpoint(bytes_signature_name(t.name), one_task, input_signature=[bytes_spec])


def _shape_text(tensor):
    """The runtime shape of `tensor` as text, e.g. `"2,8,8,1"`.

    A signature input's rank is fixed when the graph is built, so TensorFlow
    folds rank and size ops to constants; yet a request of another rank still
    reaches the graph (neither a loaded signature nor TF Serving checks fed
    shapes). Text built from the `Shape` op itself is never folded away.
    """
    return tf.strings.reduce_join(tf.strings.as_string(tf.shape(tensor)), separator=",")


def _staging_prefix(version):
    # Host and pid identify the writer, so that another export can tell a
    # killed writer's leftovers from a live one's work in progress.
    return f".{version}.tmp-{socket.gethostname()}-"


def _remove_dead_staging(base):
    """Removes staging folders of exports on this host whose process is gone.

    A version moved aside by an overwrite that was killed before the new one
    took its place goes back first.
    """
    host = f"-{socket.gethostname()}-"
    for path in sorted(base.iterdir()):
        name = path.name
        if not (name.startswith(".") and ".tmp" + host in name and path.is_dir()):
            continue
        pid = name.split(".tmp" + host, 1)[1].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        for aside in path.iterdir() if "-old-" in name else ():
            if aside.name.isdigit() and not (base / aside.name).exists():
                os.replace(aside, base / aside.name)
        shutil.rmtree(path, ignore_errors=True)


def _exchange(a, b):
    """Swaps two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    # The file system or kernel does not support it (EINVAL, ENOSYS, ...).
    return False


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _umask():
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_tree(root):
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def load_metadata(export_dir):
    """The asset JSON of an export (`export_dir` = a version folder)."""
    path = Path(export_dir) / "assets" / METADATA_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {export_dir} a version folder written by export_for_serving?")
    return json.loads(path.read_text())


def reference_predictions(model, images, task_ids):
    """What `serving_default` returns, computed with the Keras model (for checks)."""
    logits = model({"image": np.asarray(images, "float32"), "task": np.asarray(task_ids, "int32")}, training=False)
    out = _outputs(tf.cast(logits, tf.float32), tf.constant(task_ids, tf.int32), model.table)
    return {k: v.numpy() for k, v in out.items()}
