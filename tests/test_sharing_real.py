"""Selective Sharing on real images: planted families of Omniglot rules are recovered, a null set is not merged.

Through the public API in one `fit`: `conv_backbone` + `MultiTaskModel` +
`SelectiveSharing(signal="predictions")`, on the `_small` archives.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import adjusted_rand_score

from mtl_keras.data.omniglot_arrays import load_omniglot_arrays
from mtl_keras.model import MultiTaskModel
from mtl_keras.sharing import SelectiveSharing, groups_to_labels
from mtl_keras.sharing.planted import planted_label_families
from small_archives import small_omniglot_dir

# 8 characters (160 images), rules of 4 vs 4 characters: small enough to learn in seconds.
SIZE, CHARACTERS, EPOCHS = 20, 8, 12


@pytest.fixture(scope="module")
def arrays():
    return load_omniglot_arrays("small", SIZE, max_characters=CHARACTERS, data_dir=small_omniglot_dir(), seed=0)


def test_omniglot_arrays_shapes_and_identities(arrays):
    assert arrays.images.shape == (CHARACTERS * 20, SIZE, SIZE, 1) and arrays.images.dtype == np.float32
    assert 0.0 <= arrays.images.min() and arrays.images.max() <= 1.0 and arrays.images.mean() < 0.5  # ink = 1
    assert sorted(set(arrays.characters.tolist())) == list(range(CHARACTERS))
    assert np.all(np.bincount(arrays.characters) == 20) and set(arrays.drawers.tolist()) == set(range(1, 21))


def _small_trunk(seed):
    """Conv -> pool -> flatten -> dense: keeps where the strokes are, so a few epochs learn the characters."""
    image = keras.Input((SIZE, SIZE, 1), name="image")
    init = keras.initializers.GlorotUniform
    h = keras.layers.Conv2D(16, 3, activation="relu", kernel_initializer=init(seed))(image)
    h = keras.layers.MaxPooling2D(2)(keras.layers.Conv2D(32, 3, activation="relu", kernel_initializer=init(seed + 1))(h))
    h = keras.layers.Dense(64, activation="relu", kernel_initializer=init(seed + 2))(keras.layers.Flatten()(h))
    return keras.Model({"image": image}, h, name="small_trunk")


def _fit_with_sharing(arrays, family_sizes, seed=0, log_dir=None):
    planted = planted_label_families(arrays.characters, family_sizes, noise=0.1, seed=seed)
    train = arrays.drawers <= 15
    x, y = arrays.images[train], planted.y[train]
    n = len(planted.tasks)
    keras.utils.set_random_seed(seed)
    backbone = _small_trunk(seed)
    model = MultiTaskModel(backbone, planted.tasks, head_units=(32,), tasks_per_step=n, seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    sharing = SelectiveSharing(signal="predictions", probe=x[:256], start_epoch=EPOCHS, verbose=0,
                               log_dir=log_dir)
    data = tf.data.Dataset.from_tensor_slices(({"image": x}, y)).shuffle(len(x), seed=seed).batch(16)
    history = model.fit(data, epochs=EPOCHS, callbacks=[sharing], verbose=0)
    return planted, model, sharing, history


def test_planted_real_image_families_are_merged_by_family(arrays, tmp_path):
    planted, model, sharing, history = _fit_with_sharing(arrays, [2, 2], log_dir=str(tmp_path))
    groups = sorted(model.task_groups.values())
    ari = adjusted_rand_score(planted.families, groups_to_labels(groups, len(planted.families)))
    assert ari == 1.0, (groups, planted.families, sharing.history[-1]["gate"])
    record = sharing.history[-1]
    assert record["merged"] and record["signal"] == "predictions" and len(record["gate"]) == 2
    assert all(c["passed"] and c["stability"] >= 0.9 and c["within"] > c["between"] for c in record["gate"])
    assert history.history["sharing/gate_passed"][-1] == 2.0
    assert model.head_parameter_count() < record["head_parameters_before"]
    assert list((tmp_path / "sharing").glob("events.out.tfevents.*"))  # the gate's table and the heatmap
    assert sharing.report()["settings"]["min_affinity"] == 0.3


def test_null_real_image_tasks_merge_nothing(arrays):
    planted, model, sharing, history = _fit_with_sharing(arrays, [1] * 4)
    # Four different rules (over 8 characters two rules agree on at most 6 of them).
    assert np.all(np.abs(planted.correlation[~np.eye(4, dtype=bool)]) <= 0.5)
    assert len(model.estimator_owners) == 4
    record = sharing.history[-1]
    assert not record["merged"] and record["dropped_estimators"] == []
    assert history.history["sharing/gate_passed"][-1] == 0.0


def test_planted_label_families_rules_noise_and_correlation():
    classes = np.repeat(np.arange(40), 50)
    planted = planted_label_families(classes, [3, 2, 1], noise=0.2, correlation=0.45, label_fraction=0.8, seed=0)
    assert planted.y.shape == (2000, 6) and sorted(planted.families.tolist()) == [0, 0, 0, 1, 1, 2]
    assert np.all(planted.rules.sum(axis=1) == 20)  # balanced rules
    off = planted.correlation[~np.eye(3, dtype=bool)]
    assert np.all((0.2 < off) & (off < 0.7)), planted.correlation
    labelled = ~np.isnan(planted.y)
    assert 0.75 < labelled.mean() < 0.85
    clean = planted.rules[planted.families][:, classes].T
    flipped = (planted.y != clean)[labelled]
    assert 0.17 < flipped.mean() < 0.23  # the noise, each task its own
    independent = planted_label_families(classes, [1] * 6, seed=1)
    assert not np.array_equal(independent.rules[0], independent.rules[1])
    with pytest.raises(ValueError, match="noise"):
        planted_label_families(classes, [2], noise=0.5)
