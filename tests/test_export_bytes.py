"""The export's bytes signatures: image files in, the training preprocessing in the graph.

The equality checks use PNGs of the `_small` Omniglot archives and the real
training pipeline (`load_omniglot`): a file through `serving_bytes` must give
the image training saw (to 1e-6) and the prediction `serving_default` gives
for that image (the same class, logits to 1e-6).
"""

import base64
import io
import json
import re
import struct
import urllib.error
import urllib.request
import zipfile
import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from mtl_keras import MultiTaskModel, Task, TaskSet, conv_backbone
from mtl_keras.data import omniglot
from mtl_keras.export import bytes_signature_name, export_for_serving, load_metadata
from mtl_keras.image_preprocessing import ImagePreprocessing, decode_images
from small_archives import small_omniglot_dir
from test_app_serving_client import MODEL, make_server

SIZE = 28
COUNT = 24  # test-split examples compared


def _png(array, mode=None, **save):
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, format="PNG", **save)
    return out.getvalue()


@pytest.fixture(scope="module")
def omniglot_export(tmp_path_factory):
    """A model trained a few steps on the small archives, exported with Omniglot's preprocessing,
    and the first test-split examples: their archive PNGs and their training-pipeline images."""
    archive_dir = small_omniglot_dir()
    tfds_dir = tmp_path_factory.mktemp("tfds")
    data = omniglot.load_omniglot(archive_dir, archives="small", tfds_dir=tfds_dir, image_size=SIZE,
                                  batch_size=COUNT, shuffle_buffer=0, download=False)
    # load_omniglot's test split is the prepared split in order (all alphabets kept, no shuffling),
    # so the prepared records name the archive member of each example.
    builder = omniglot.omniglot_builder(archives="small", tfds_dir=tfds_dir, prepare=False)
    records = builder.as_dataset(split="test", shuffle_files=False,
                                 decoders={"image": tfds.decode.SkipDecoding()}).take(COUNT)
    files = []
    for record in tfds.as_numpy(records):
        member = record["filename"].decode()
        with zipfile.ZipFile(archive_dir / (member.split("/")[0] + ".zip")) as zf:
            files.append(zf.read(member))
    inputs, labels = next(iter(data.test))
    # Untrained (training adds only time here): the checks compare two paths through the same weights.
    keras.utils.set_random_seed(0)
    backbone = conv_backbone((SIZE, SIZE, 1), len(data.tasks), sigma=0.5, filters=(8, 16), seed=0)
    model = MultiTaskModel(backbone, data.tasks, head_units=(16,), seed=0)
    # Per-task signatures are checked on the small export below (fewer tasks, faster to write).
    path = export_for_serving(model, tmp_path_factory.mktemp("serving") / "omniglot", task_signatures=False,
                              preprocessing=omniglot.serving_preprocessing(SIZE))
    return dict(model=model, path=path, served=tf.saved_model.load(str(path)), files=files,
                images=inputs["image"].numpy(), task=inputs["task"].numpy(), tasks=data.tasks)


@pytest.mark.slow
def test_archive_png_gives_the_training_image_and_prediction(omniglot_export):
    e = omniglot_export
    decoded = decode_images(tf.constant(e["files"]), omniglot.serving_preprocessing(SIZE)).numpy()
    assert decoded.shape == e["images"].shape == (COUNT, SIZE, SIZE, 1)
    np.testing.assert_allclose(decoded, e["images"], rtol=0, atol=1e-6)
    assert e["images"].max() == 1.0 and 0 < e["images"].mean() < 0.3  # strokes bright, not blank

    sig = e["served"].signatures
    by_tensor = sig["serving_default"](image=tf.constant(e["images"]), task=tf.constant(e["task"], tf.int32))
    # Half the tasks by name, half by id as text.
    names = [e["tasks"][int(t)].name if i % 2 else str(int(t)) for i, t in enumerate(e["task"])]
    by_bytes = sig["serving_bytes"](image_bytes=tf.constant(e["files"]), task=tf.constant(names))
    np.testing.assert_array_equal(by_bytes["predicted_class"].numpy(), by_tensor["predicted_class"].numpy())
    np.testing.assert_array_equal(by_bytes["task_id"].numpy(), e["task"])
    np.testing.assert_allclose(by_bytes["logits"].numpy(), by_tensor["logits"].numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(by_bytes["probabilities"].numpy(), by_tensor["probabilities"].numpy(),
                               rtol=1e-6, atol=1e-6)
    # The model does not answer one class for everything (the comparison means something).
    assert len(set(by_tensor["predicted_class"].numpy().tolist())) > 1


@pytest.mark.slow
def test_colour_alpha_jpeg_and_other_sizes(omniglot_export):
    prep = omniglot.serving_preprocessing(SIZE)
    original = omniglot_export["files"][0]
    ink = np.asarray(Image.open(io.BytesIO(original)).convert("L"))  # 0 ink on 255 paper, 105 x 105
    expected = decode_images(tf.constant([original]), prep).numpy()[0]

    rgb = np.stack([ink] * 3, axis=-1)
    rgba = np.concatenate([np.zeros_like(rgb), (255 - ink)[..., None]], axis=-1)  # black ink, transparent paper
    variants = {
        "rgb": _png(rgb),
        "rgba over transparent paper": _png(rgba),
        "grey + alpha": _png(np.stack([np.zeros_like(ink), 255 - ink], -1), "LA"),
        "8-bit grey": _png(ink),
    }
    out = decode_images(tf.constant(list(variants.values())), prep).numpy()
    for (name, _), image in zip(variants.items(), out):
        np.testing.assert_allclose(image, expected, atol=1e-6, err_msg=name)

    # Colour to grey is decode_png(channels=1)'s (libpng), as training decodes; not rgb_to_grayscale's.
    colour = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3)).astype("uint8")
    grey_of_colour = decode_images(tf.constant([_png(colour)]), prep).numpy()[0]
    libpng = tf.image.convert_image_dtype(255 - tf.io.decode_png(_png(colour), channels=1), tf.float32).numpy()
    np.testing.assert_allclose(grey_of_colour, libpng, atol=1e-6)

    # JPEG (lossy) and other sizes: close to the archive PNG's image, not equal.
    jpeg = io.BytesIO()
    Image.fromarray(rgb).save(jpeg, format="JPEG", quality=95)
    larger = _png(np.kron(ink, np.ones((2, 3), "uint8")))  # 210 x 315: resized, stretched
    near = decode_images(tf.constant([jpeg.getvalue(), larger]), prep).numpy()
    for image in near:
        assert image.shape == expected.shape
        assert np.abs(image - expected).mean() < 0.03


@pytest.mark.slow
def test_metadata_records_the_preprocessing(omniglot_export):
    meta = load_metadata(omniglot_export["path"])
    assert ImagePreprocessing.from_json(meta["preprocessing"]) == omniglot.serving_preprocessing(SIZE)
    assert meta["preprocessing"]["invert"] is True and meta["bytes_signature"] == "serving_bytes"
    assert [t["bytes_signature"] for t in meta["tasks"]] == [
        bytes_signature_name(t.name) for t in omniglot_export["tasks"]]
    assert "bytes_task_Japanese__katakana_" in [t["bytes_signature"] for t in meta["tasks"]]
    assert set(omniglot_export["served"].signatures) == {"serving_default", "serving_bytes"}


# --- bad requests ---------------------------------------------------------------------------------


def _apng():
    frames = [Image.fromarray(np.full((8, 8), v, "uint8")) for v in (0, 255)]
    out = io.BytesIO()
    frames[0].save(out, format="PNG", save_all=True, append_images=frames[1:])
    return out.getvalue()


def _gif():
    out = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), "uint8")).save(out, format="GIF")
    return out.getvalue()


GOOD = _png(np.full((12, 12), 255, "uint8"))
_jpeg = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype("uint8")).save(_jpeg, format="JPEG")
JPEG = _jpeg.getvalue()


def _declaring(data, height, width):
    """`data` (PNG or baseline JPEG) with its header saying height x width; the pixel data is unchanged."""
    if data.startswith(b"\x89PNG"):
        ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
        return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]
    sof = data.index(b"\xff\xc0")
    return data[:sof + 5] + struct.pack(">HH", height, width) + data[sof + 9:]


HUGE_PNG = _declaring(GOOD, 20000, 30000)
HUGE_JPEG = _declaring(JPEG, 60000, 50000)

# (case, image_bytes, task, the error's words)
BAD_BYTES = [
    ("empty file", [GOOD, b""], ["0", "1"],
     r"image_bytes is empty: send the bytes of each image file\. Examples:\] \[1\]"),
    ("GIF", [_gif()], ["0"], r"image_bytes is a GIF: send PNG or JPEG.*Examples:\] \[0\]"),
    ("animated PNG", [GOOD, _apng()], ["0", "0"],
     r"image_bytes is an animated PNG: send one still frame.*Examples:\] \[1\]"),
    ("garbage", [b"not an image at all"], ["0"], r"neither a PNG nor a JPEG file: send.*Examples:\] \[0\]"),
    ("base64 text", [base64.b64encode(GOOD)], ["0"],
     r"base64 text, not the decoded file: over REST send the JSON object \{b64: .*Examples:\] \[0\]"),
    ("truncated PNG", [GOOD, GOOD[:40]], ["0", "0"], r"image_bytes is a truncated file.*Examples:\] \[1\]"),
    ("truncated JPEG", [JPEG[:-200]], ["0"], r"image_bytes is a truncated file.*Examples:\] \[0\]"),
    # A small file that declares a huge image: refused from its header, before decoding.
    ("huge PNG", [GOOD, HUGE_PNG], ["0", "0"],
     r"image_bytes example\] \[1\] \[is an image of \(height, width\)\] \[20000 30000\] "
     r"\[; the largest accepted is 16777216 pixels: send a smaller image"),
    ("huge JPEG", [HUGE_JPEG], ["0"], r"example\] \[0\] \[is an image of \(height, width\)\] \[60000 50000\]"),
    # Complete but damaged: the decoder's own message.
    ("damaged PNG", [GOOD[:33] + b"\0" * (len(GOOD) - 45) + GOOD[-12:]], ["0"], r"Invalid PNG"),
    ("not a vector", GOOD, "0", r"image_bytes must be a vector of encoded image files.*got shape\] \[\]"),
    ("empty batch", np.array([], object), np.array([], object), r"empty batch"),
    ("unknown task name", [GOOD, GOOD], ["b", "Klingon"],
     r"unknown task: give a task name or its id as text\. The tasks of this model \(id name\) are: 0 a, 1 b, 2 c\. "
     r".*Unknown:\] \[Klingon\]"),
    ("task id too large", [GOOD], ["3"], r"task ids must be in \[0, 3\)"),
    ("batch mismatch", [GOOD, GOOD], ["a"], r"image and task must have the same batch size; got\] \[2\]"),
]


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    tasks = TaskSet([Task("a", "multiclass", 3), Task("b", "multiclass", 5), Task("c", "binary", 1)])
    backbone = conv_backbone((8, 8, 1), len(tasks), sigma=0.5, filters=(4, 8), seed=0)
    model = MultiTaskModel(backbone, tasks, head_units=(4,), seed=0)
    model.compile()
    prep = ImagePreprocessing(height=8, width=8, invert=True)
    # Per-task bytes signatures are checked over REST in tests/test_app_serving_client.py.
    path = export_for_serving(model, tmp_path_factory.mktemp("serving") / "m", task_signatures=False,
                              preprocessing=prep)
    server, _ = make_server(path)
    try:
        yield model, tf.saved_model.load(str(path)), f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _post(url, body):
    request = urllib.request.Request(f"{url}/v1/models/{MODEL}:predict", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _b64(data):
    return {"b64": base64.b64encode(data).decode("ascii")}


@pytest.mark.parametrize("case, image_bytes, task, error", BAD_BYTES, ids=[b[0] for b in BAD_BYTES])
def test_bad_bytes_get_clear_errors(small_export, case, image_bytes, task, error):
    fn = small_export[1].signatures["serving_bytes"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=error):
        fn(image_bytes=tf.constant(image_bytes, tf.string), task=tf.constant(task, tf.string))


@pytest.mark.parametrize("case, image_bytes, task, error", BAD_BYTES, ids=[b[0] for b in BAD_BYTES])
def test_bad_bytes_over_rest(small_export, case, image_bytes, task, error):
    # Columnar format: it can also carry a scalar, an empty batch and batches of two sizes.
    files = [_b64(f) for f in image_bytes] if isinstance(image_bytes, (list, np.ndarray)) else _b64(image_bytes)
    task = task.tolist() if isinstance(task, np.ndarray) else task
    status, reply = _post(small_export[2], {"signature_name": "serving_bytes",
                                            "inputs": {"image_bytes": files, "task": task}})
    assert status == 400 and re.search(error, reply["error"]), reply


def test_rest_row_format_as_in_the_readme(small_export):
    model, served, url = small_export
    files = [GOOD, JPEG]
    body = {"signature_name": "serving_bytes",
            "instances": [{"image_bytes": _b64(files[0]), "task": "b"}, {"image_bytes": _b64(files[1]), "task": "2"}]}
    status, reply = _post(url, body)
    assert status == 200, reply
    expected = served.signatures["serving_bytes"](image_bytes=tf.constant(files), task=tf.constant(["b", "2"]))
    assert [p["predicted_class"] for p in reply["predictions"]] == expected["predicted_class"].numpy().tolist()
    assert [p["task_id"] for p in reply["predictions"]] == [1, 2]


def test_a_good_request_answers_like_the_tensor_signature(small_export):
    model, served, _ = small_export
    files = [GOOD, _png(np.eye(8, dtype="uint8") * 255)]
    out = served.signatures["serving_bytes"](image_bytes=tf.constant(files), task=tf.constant(["c", "1"]))
    images = decode_images(tf.constant(files), ImagePreprocessing(height=8, width=8, invert=True))
    ref = served.signatures["serving_default"](image=images, task=tf.constant([2, 1]))
    np.testing.assert_array_equal(out["predicted_class"].numpy(), ref["predicted_class"].numpy())
    np.testing.assert_allclose(out["logits"].numpy(), ref["logits"].numpy(), atol=1e-6)
    assert set(served.signatures) == {"serving_default", "serving_bytes"}


def test_export_refuses_a_preprocessing_that_does_not_fit(tmp_path):
    tasks = TaskSet([Task("a", "multiclass", 3), Task("1", "multiclass", 2)])  # "1" is task 1's own id: fine
    model = MultiTaskModel(conv_backbone((8, 8, 1), 2, sigma=0.5, filters=(4,), seed=0), tasks, head_units=(4,))
    with pytest.raises(ValueError, match=r"preprocessing makes images of shape \[28, 28, 1\], but the model takes "
                                         r"\[8, 8, 1\]"):
        export_for_serving(model, tmp_path / "m", preprocessing=omniglot.serving_preprocessing(28))
    with pytest.raises(TypeError, match="must be an mtl_keras.image_preprocessing.ImagePreprocessing"):
        export_for_serving(model, tmp_path / "m", preprocessing={"height": 8})
    swapped = TaskSet([Task("1", "multiclass", 3), Task("a", "multiclass", 2)])
    model = MultiTaskModel(conv_backbone((8, 8, 1), 2, sigma=0.5, filters=(4,), seed=0), swapped, head_units=(4,))
    with pytest.raises(ValueError, match="Task 0 is named '1', which serving_bytes would also read as task id 1"):
        export_for_serving(model, tmp_path / "m", preprocessing=ImagePreprocessing(height=8, width=8))
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("kwargs, words", [
    (dict(height=0, width=8), "height must be a positive int"),
    (dict(height=8, width=8, channels=2), "channels must be 1 .* or 3"),
    (dict(height=8, width=8, resize_method="cubic"), "resize_method must be one of bilinear"),
    (dict(height=8, width=8, invert="yes"), "invert must be True or False"),
    (dict(height=8, width=8, background=256), r"background must be an int in \[0, 255\]"),
])
def test_bad_preprocessing_is_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ImagePreprocessing(**kwargs)
