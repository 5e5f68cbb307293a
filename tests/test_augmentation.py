"""RandomAffine: the geometry it promises, per-pass randomness, and resume-safe seeding."""

import numpy as np
import pytest
import tensorflow as tf

from mtl_keras.augmentation import RandomAffine
from mtl_keras.distribute import epoch_stream


def _dot(size=15, row=7, col=10, blur=0.0):
    if not blur:
        image = np.zeros((1, size, size, 1), np.float32)
        image[0, row, col, 0] = 1.0
        return image
    # A smooth blob: its centre of mass survives resampling at any scale.
    rows, cols = np.indices((size, size))
    blob = np.exp(-((rows - row) ** 2 + (cols - col) ** 2) / (2 * blur**2))
    return blob[None, :, :, None].astype(np.float32)


def _centre_of_mass(image):
    img = np.asarray(image)[0, :, :, 0]
    rows, cols = np.indices(img.shape)
    return (rows * img).sum() / img.sum(), (cols * img).sum() / img.sum()


SEED = tf.constant([3, 4], tf.int64)


def test_shift_moves_the_content_by_the_drawn_offset():
    augment = RandomAffine(shift=0.2)
    t = augment.transforms(1, 15, 15, SEED).numpy()[0]
    # Output pixel (x, y) reads input (x + a2, y + b2): content moves by (-a2, -b2).
    assert t[0] == pytest.approx(1) and t[4] == pytest.approx(1) and t[1] == pytest.approx(0, abs=1e-7)
    assert 0 < abs(t[2]) <= 0.2 * 15 and 0 < abs(t[5]) <= 0.2 * 15
    row, col = _centre_of_mass(augment(_dot(), SEED))
    assert col == pytest.approx(10 - t[2], abs=1e-4) and row == pytest.approx(7 - t[5], abs=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_rotation_and_scale_keep_the_centre_and_stay_in_bounds(seed):
    augment = RandomAffine(rotation=30, scale=0.2)
    s = tf.constant([seed, 1], tf.int64)
    t = augment.transforms(1, 15, 15, s).numpy()[0]
    linear = np.array([[t[0], t[1]], [t[3], t[4]]])
    zoom = 1 / np.sqrt(abs(np.linalg.det(linear)))
    angle = np.degrees(np.arctan2(t[1], t[0]))
    assert 0.8 - 1e-6 <= zoom <= 1.2 + 1e-6 and abs(angle) <= 30 + 1e-4
    # The image centre (7, 7) maps to itself.
    assert t[0] * 7 + t[1] * 7 + t[2] == pytest.approx(7, abs=1e-4)
    assert t[3] * 7 + t[4] * 7 + t[5] == pytest.approx(7, abs=1e-4)
    # In a larger image (centre 15), a blob 4 pixels right of the centre
    # lands 4 * zoom away from it, turned by the angle.
    t = augment.transforms(1, 31, 31, s).numpy()[0]
    assert np.degrees(np.arctan2(t[1], t[0])) == pytest.approx(angle, abs=1e-4)
    row, col = _centre_of_mass(augment(_dot(size=31, row=15, col=19, blur=1.5), s))
    assert np.hypot(row - 15, col - 15) == pytest.approx(4 * zoom, abs=0.02)
    assert abs(np.degrees(np.arctan2(row - 15, col - 15))) == pytest.approx(abs(angle), abs=0.5)


def test_identity_when_all_zero_and_bad_values_refused():
    identity = RandomAffine()
    assert not identity.enabled
    ds = tf.data.Dataset.from_tensor_slices(np.zeros((4, 8, 8, 1), np.float32)).batch(2)
    assert identity.apply_to(ds) is ds
    for bad in (dict(shift=-0.1), dict(rotation=float("nan")), dict(scale=1.0), dict(shift="0.1"),
                dict(interpolation="cubic")):
        with pytest.raises(ValueError, match="RandomAffine|interpolation"):
            RandomAffine(**bad)


def _dataset(n=12, batch=4):
    images = np.random.default_rng(0).random((n, 10, 10, 1)).astype(np.float32)
    x = {"image": images, "task": np.arange(n, dtype=np.int32) % 3}
    return tf.data.Dataset.from_tensor_slices((x, np.arange(n, dtype=np.int32))).batch(batch)


def _images(ds, batches):
    return [x["image"].numpy() for x, _ in ds.take(batches)]


def test_new_transformations_each_pass_same_for_the_same_seed_and_resume():
    augment = RandomAffine(shift=0.1, rotation=10, scale=0.1)
    steps = 3
    stream = _images(epoch_stream(augment.apply_to(_dataset(), seed=5), steps), 3 * steps)
    again = _images(epoch_stream(augment.apply_to(_dataset(), seed=5), steps), 3 * steps)
    other_seed = _images(epoch_stream(augment.apply_to(_dataset(), seed=6), steps), steps)
    resumed = _images(epoch_stream(augment.apply_to(_dataset(), seed=5), steps, start_epoch=2), steps)
    np.testing.assert_array_equal(np.stack(stream), np.stack(again))
    # Epoch 1 transforms the same images differently from epoch 0, and another seed differs.
    assert not np.allclose(stream[0], stream[steps])
    assert not np.allclose(stream[0], other_seed[0])
    # A run resumed at epoch 2 sees exactly what the uninterrupted one saw in epoch 2.
    np.testing.assert_array_equal(np.stack(resumed), np.stack(stream[2 * steps:]))


def test_only_the_image_changes_and_cardinality_is_kept():
    ds = _dataset()
    out = RandomAffine(shift=0.2).apply_to(ds, seed=0)
    assert int(out.cardinality()) == int(ds.cardinality()) == 3
    for (x0, y0), (x1, y1) in zip(ds, out):
        np.testing.assert_array_equal(x0["task"], x1["task"])
        np.testing.assert_array_equal(y0, y1)
        assert x1["image"].shape == x0["image"].shape
        assert not np.allclose(x0["image"], x1["image"])
