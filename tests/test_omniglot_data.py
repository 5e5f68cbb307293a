"""Tests for `mtl_keras.data.omniglot`: archives, TFDS builder, tf.data pipeline.

Most tests use the two small archives (8 alphabets), prepared once into a
temporary TFDS dir. The full archives are only listed, never prepared.
"""

import collections
import io
import shutil
import urllib.error
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mtl_keras.data import omniglot
from mtl_keras.tasks import Task
from omniglot_fakes import hide_archives

SMALL_ARCHIVES = omniglot.ARCHIVE_SETS["small"]
FULL_ARCHIVES = omniglot.ARCHIVE_SETS["full"]
# Greek and Latin are in both small archives; together they hold 8 alphabets.
SMALL_ALPHABETS = (
    "Balinese",
    "Early_Aramaic",
    "Greek",
    "Japanese_(katakana)",
    "Korean",
    "Latin",
    "Sanskrit",
    "Tagalog",
)
SMALL_CHARACTERS = 24 + 22 + 24 + 47 + 40 + 26 + 42 + 17  # 242


def _find(archives):
    try:
        # Skipped, not fetched, when absent: tests never reach the internet.
        return omniglot.find_omniglot_dir(archives=archives, download=False)
    except omniglot.OmniglotNotFoundError as e:
        pytest.skip(f"Omniglot archives not available: {e}")


def _png_members(path):
    with zipfile.ZipFile(path) as zf:
        return [n for n in zf.namelist() if n.endswith(".png")]


@pytest.fixture(scope="module")
def small_dir():
    return _find("small")


@pytest.fixture(scope="module")
def small_tfds(small_dir, tmp_path_factory):
    """A TFDS data dir with the small config prepared once for the module."""
    tfds_dir = tmp_path_factory.mktemp("tfds")
    omniglot.omniglot_builder(small_dir, archives="small", tfds_dir=tfds_dir)
    return tfds_dir


@pytest.fixture
def no_default_dirs(tmp_path, monkeypatch):
    """Hides every default location of the archives and forbids downloads
    (a test never reaches the internet); returns an empty dir."""
    hide_archives(monkeypatch, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty


# --- constants and tasks ----------------------------------------------------


def test_alphabet_names_are_valid_task_names():
    assert len(omniglot.ALPHABETS) == 50
    assert omniglot.ALPHABETS_BACKGROUND == tuple(sorted(omniglot.ALPHABETS_BACKGROUND))
    assert omniglot.ALPHABETS_EVALUATION == tuple(sorted(omniglot.ALPHABETS_EVALUATION))
    assert omniglot.ALPHABETS == omniglot.ALPHABETS_BACKGROUND + omniglot.ALPHABETS_EVALUATION
    for name in omniglot.ALPHABETS:
        # Accepted as they are: no sanitising needed for Omniglot.
        assert omniglot._task_name(name) == name
        Task(name, "multiclass", omniglot.ALPHABET_NUM_CHARACTERS[name])
    assert omniglot._task_name("a b/c") == "a_b_c"


def test_omniglot_tasks():
    tasks = omniglot.omniglot_tasks()
    assert tasks.names == omniglot.ALPHABETS
    assert sum(t.num_outputs for t in tasks) == 1623
    assert {t.kind for t in tasks} == {"multiclass"}
    assert min(t.num_outputs for t in tasks) == 14 and tasks.max_outputs == 55
    assert omniglot.omniglot_tasks(3).names == omniglot.ALPHABETS[:3]
    assert omniglot.omniglot_tasks(["Latin", "Greek"], "small").names == ("Latin", "Greek")
    assert omniglot.omniglot_tasks(archives="small").names == SMALL_ALPHABETS
    with pytest.raises(ValueError, match="Unknown alphabets"):
        omniglot.omniglot_tasks(["Angelic"], "small")  # an evaluation alphabet
    with pytest.raises(ValueError, match="8 alphabets"):
        omniglot.omniglot_tasks(9, "small")
    with pytest.raises(ValueError, match="repeated"):
        omniglot.omniglot_tasks(["Latin", "Latin"], "small")


def test_split_drawers_constant():
    drawers = [d for split in ("train", "validation", "test") for d in omniglot.SPLIT_DRAWERS[split]]
    assert sorted(drawers) == list(range(1, 21))  # disjoint and complete
    assert [len(omniglot.SPLIT_DRAWERS[s]) for s in ("train", "validation", "test")] == [14, 3, 3]


# --- archives ---------------------------------------------------------------


def test_full_archives_match_documented_counts():
    directory = _find("full")
    counts = {}
    for name, expected in zip(
        FULL_ARCHIVES, (omniglot.ALPHABETS_BACKGROUND, omniglot.ALPHABETS_EVALUATION)
    ):
        index = omniglot._index_archive(directory / name)  # also checks 20 drawings each
        assert tuple(sorted(index)) == expected
        counts.update({a: len(images) // 20 for a, (images, _) in index.items()})
    assert counts == omniglot.ALPHABET_NUM_CHARACTERS
    assert sum(counts.values()) == 1623
    assert sum(len(_png_members(directory / n)) for n in FULL_ARCHIVES) == 32460


def test_small_archives_contents(small_dir):
    assert [len(_png_members(small_dir / n)) for n in SMALL_ARCHIVES] == [2720, 3120]
    index = omniglot._index_archives([small_dir / n for n in SMALL_ARCHIVES], SMALL_ALPHABETS)
    assert tuple(index) == SMALL_ALPHABETS
    # Greek and Latin come once (from small1), not twice.
    assert sum(len(images) for images in index.values()) == SMALL_CHARACTERS * 20 == 4840
    assert index["Greek"][0].archive.name == "images_background_small1.zip"


# --- finding the archives ---------------------------------------------------


def test_not_found_error_lists_places_and_instructions(no_default_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv(omniglot.OMNIGLOT_DIR_ENV, str(tmp_path / "env_dir"))
    with pytest.raises(omniglot.OmniglotNotFoundError) as info:
        omniglot.find_omniglot_dir(no_default_dirs)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    for place in (
        no_default_dirs,
        tmp_path / "env_dir",
        tmp_path / "home" / "tensorflow_datasets" / "downloads" / "manual",
        tmp_path / "repo" / "shared" / "data" / "omniglot",
        tmp_path.parent / "shared" / "data" / "omniglot",
    ):
        assert str(place) in message
    for url in FULL_ARCHIVES:
        assert "https://github.com/brendenlake/omniglot/raw/master/python/" + url in message
    assert "--data-dir" in message and omniglot.OMNIGLOT_DIR_ENV in message


def test_search_order(no_default_dirs, small_dir, tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    for d in (first, second):
        d.mkdir()
        (d / "images_background.zip").symlink_to(small_dir / SMALL_ARCHIVES[0])
    monkeypatch.setenv(omniglot.OMNIGLOT_DIR_ENV, str(second))
    assert omniglot.find_omniglot_dir(first) == first.resolve()
    assert omniglot.find_omniglot_dir() == second.resolve()
    # The TFDS manual dir counts too.
    monkeypatch.delenv(omniglot.OMNIGLOT_DIR_ENV)
    manual = tmp_path / "tfds_data" / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "images_evaluation.zip").symlink_to(small_dir / SMALL_ARCHIVES[1])
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds_data"))
    assert omniglot.find_omniglot_dir() == manual.resolve()
    # Small archives are only found when asked for.
    with pytest.raises(omniglot.OmniglotNotFoundError):
        omniglot.find_omniglot_dir(archives="small")


def test_download_failure_is_explained(no_default_dirs, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(omniglot.urllib.request, "urlopen", offline)
    monkeypatch.delenv(omniglot.NO_DOWNLOAD_ENV)
    with pytest.raises(omniglot.OmniglotNotFoundError, match="no network in this test") as info:
        omniglot.find_omniglot_dir(download=True)
    assert "images_background.zip" in str(info.value)


# --- the TFDS builder -------------------------------------------------------


def test_prepared_small_counts_and_splits(small_tfds):
    builder = omniglot.omniglot_builder(archives="small", tfds_dir=small_tfds, prepare=False)
    assert builder.is_prepared()
    assert (builder.data_path / "dataset_info.json").exists()
    # Keyed by the archives' content, then by config:
    # <tfds_dir>/omniglot_alphabets_by_archives/<key>/omniglot_alphabets/small/1.0.0.
    assert builder.data_path.parts[-3:] == ("omniglot_alphabets", "small", "1.0.0")
    assert builder.data_path.parts[-5:-3] == ("omniglot_alphabets_by_archives", builder.archives_key)
    assert builder.info.metadata["archives_key"] == builder.archives_key
    info = builder.info
    assert info.features["alphabet"].names == list(SMALL_ALPHABETS)
    assert {s: info.splits[s].num_examples for s in ("train", "validation", "test")} == {
        "train": SMALL_CHARACTERS * 14,
        "validation": SMALL_CHARACTERS * 3,
        "test": SMALL_CHARACTERS * 3,
    }
    drawers = collections.defaultdict(set)  # (split, alphabet, character) -> drawers
    seen = set()
    for split in ("train", "validation", "test"):
        ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        for ex in tfds.as_numpy(ds):
            key = (int(ex["alphabet"]), int(ex["character"]), int(ex["drawer"]))
            assert key not in seen  # no image in two splits, no duplicates
            seen.add(key)
            drawers[(split,) + key[:2]].add(key[2])
            name = ex["filename"].decode()
            assert name.endswith(f"_{key[2]:02d}.png")
            assert f"/{SMALL_ALPHABETS[key[0]]}/character{key[1] + 1:02d}/" in name
    assert len(seen) == SMALL_CHARACTERS * 20
    for (split, _, _), found in drawers.items():
        assert found == set(omniglot.SPLIT_DRAWERS[split])
    assert len(drawers) == 3 * SMALL_CHARACTERS


def test_prepared_images_are_inverted_originals(small_tfds, small_dir):
    builder = omniglot.omniglot_builder(archives="small", tfds_dir=small_tfds, prepare=False)
    ds = builder.as_dataset(split="test").take(20)
    for ex in tfds.as_numpy(ds):
        image, member = ex["image"], ex["filename"].decode()
        assert image.shape == (105, 105, 1) and image.dtype == np.uint8
        assert set(np.unique(image)) <= {0, 255}
        with zipfile.ZipFile(small_dir / (member.split("/")[0] + ".zip")) as zf:
            original = np.asarray(Image.open(io.BytesIO(zf.read(member))).convert("L"))
        np.testing.assert_array_equal(image[..., 0], 255 - original)
        assert image.mean() < 0.3 * 255  # mostly background (0), strokes 255


def test_second_load_uses_prepared_data(small_tfds, no_default_dirs, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the prepared dataset was generated again")

    monkeypatch.setattr(omniglot.OmniglotAlphabets, "_split_generators", fail)
    monkeypatch.setattr(omniglot.OmniglotAlphabets, "_generate_examples", fail)
    # No archives are reachable now; the prepared records are enough.
    data = omniglot.load_omniglot(archives="small", tfds_dir=small_tfds, batch_size=64)
    assert data.num_examples["test"] == SMALL_CHARACTERS * 3
    next(iter(data.test))


def test_configs_are_prepared_apart(small_tfds, no_default_dirs):
    # The small data must never be served as "full": that config is not prepared.
    with pytest.raises(omniglot.OmniglotNotFoundError):
        omniglot.load_omniglot(archives="full", tfds_dir=small_tfds)
    assert not (small_tfds / "omniglot_alphabets" / "full" / "1.0.0").exists()
    assert not list(small_tfds.rglob("full"))


# --- corrupt and wrong archives ---------------------------------------------


def _prepare_from(archive_dir, tfds_dir):
    return omniglot.omniglot_builder(archive_dir, archives="small", tfds_dir=tfds_dir)


def test_truncated_zip_is_reported(small_dir, tmp_path):
    archives = tmp_path / "archives"
    archives.mkdir()
    shutil.copy(small_dir / SMALL_ARCHIVES[1], archives)
    data = (small_dir / SMALL_ARCHIVES[0]).read_bytes()
    (archives / SMALL_ARCHIVES[0]).write_bytes(data[: len(data) // 2])
    with pytest.raises(omniglot.OmniglotArchiveError) as info:
        _prepare_from(archives, tmp_path / "tfds")
    message = str(info.value)
    assert str(archives / SMALL_ARCHIVES[0]) in message
    assert "download it again" in message and SMALL_ARCHIVES[0] in message
    # Nothing half-prepared is left behind to be mistaken for a dataset.
    assert not (tmp_path / "tfds" / "omniglot_alphabets" / "small" / "1.0.0").exists()
    assert not list(tmp_path.rglob("dataset_info.json"))


def test_damaged_image_data_is_reported(small_dir, tmp_path):
    archives = tmp_path / "archives"
    archives.mkdir()
    shutil.copy(small_dir / SMALL_ARCHIVES[1], archives)
    data = bytearray((small_dir / SMALL_ARCHIVES[0]).read_bytes())
    data[400_000:400_400] = bytes(b ^ 0x55 for b in data[400_000:400_400])
    (archives / SMALL_ARCHIVES[0]).write_bytes(bytes(data))
    with pytest.raises(omniglot.OmniglotArchiveError, match="download it again"):
        _prepare_from(archives, tmp_path / "tfds")


def _rewrite(src, dst, keep=lambda name: True, rename=lambda name: name):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if keep(info.filename):
                zout.writestr(rename(info.filename), zin.read(info.filename))


def test_missing_drawing_is_reported(small_dir, tmp_path):
    archives = tmp_path / "archives"
    archives.mkdir()
    shutil.copy(small_dir / SMALL_ARCHIVES[1], archives)
    _rewrite(
        small_dir / SMALL_ARCHIVES[0],
        archives / SMALL_ARCHIVES[0],
        keep=lambda n: not n.endswith("Balinese/character03/0110_07.png"),
    )
    with pytest.raises(omniglot.OmniglotArchiveError, match="character03 has 19 drawings"):
        _prepare_from(archives, tmp_path / "tfds")


def test_wrong_layout_is_reported(small_dir, tmp_path):
    archives = tmp_path / "archives"
    archives.mkdir()
    shutil.copy(small_dir / SMALL_ARCHIVES[1], archives)
    # The right images under the wrong top-level folder.
    _rewrite(
        small_dir / SMALL_ARCHIVES[0],
        archives / SMALL_ARCHIVES[0],
        rename=lambda n: n.replace("images_background_small1/", "omniglot/", 1),
    )
    with pytest.raises(omniglot.OmniglotArchiveError, match="XXXX_YY.png"):
        _prepare_from(archives, tmp_path / "tfds")


# --- load_omniglot ----------------------------------------------------------


def test_load_batch_shapes_and_ranges(small_tfds):
    data = omniglot.load_omniglot(archives="small", tfds_dir=small_tfds, image_size=28, batch_size=32)
    assert isinstance(data, omniglot.OmniglotData)
    assert data.tasks.names == data.alphabet_names == SMALL_ALPHABETS
    assert data.image_size == 28
    assert data.num_examples == {
        "train": SMALL_CHARACTERS * 14,
        "validation": SMALL_CHARACTERS * 3,
        "test": SMALL_CHARACTERS * 3,
    }
    inputs, labels = next(iter(data.train))
    assert inputs["image"].shape == (32, 28, 28, 1) and inputs["image"].dtype == "float32"
    assert inputs["task"].shape == (32,) and inputs["task"].dtype == "int32"
    assert labels.shape == (32,) and labels.dtype == "int32"
    image = inputs["image"].numpy()
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert 0.0 < image.mean() < 0.3  # ink = 1 on a 0 background
    sizes = np.array([t.num_outputs for t in data.tasks])
    assert np.all(labels.numpy() < sizes[inputs["task"].numpy()])
    # Every example once per epoch, in every split.
    for split in ("train", "validation", "test"):
        total = sum(int(y.shape[0]) for _, y in getattr(data, split))
        assert total == data.num_examples[split]


def test_task_subset_is_remapped(small_tfds):
    data = omniglot.load_omniglot(
        tasks=["Latin", "Greek"], archives="small", tfds_dir=small_tfds, batch_size=1000
    )
    assert data.tasks.names == ("Latin", "Greek")
    assert [t.num_outputs for t in data.tasks] == [26, 24]
    inputs, labels = next(iter(data.validation))
    task, labels = inputs["task"].numpy(), labels.numpy()
    assert len(task) == data.num_examples["validation"] == (26 + 24) * 3
    assert np.bincount(task).tolist() == [26 * 3, 24 * 3]
    assert sorted(set(labels[task == 0])) == list(range(26))
    assert sorted(set(labels[task == 1])) == list(range(24))

    first3 = omniglot.load_omniglot(tasks=3, archives="small", tfds_dir=small_tfds)
    assert first3.alphabet_names == SMALL_ALPHABETS[:3]
    tasks = np.concatenate([x["task"].numpy() for x, _ in first3.test])
    assert set(tasks) == {0, 1, 2}


def test_load_is_deterministic(small_tfds):
    def first_batches(seed):
        data = omniglot.load_omniglot(
            archives="small", tfds_dir=small_tfds, batch_size=256, seed=seed, image_size=16
        )
        train = [y.numpy() for _, y in data.train.take(2)]
        validation = next(iter(data.validation))[1].numpy()
        return train, validation

    train_a, val_a = first_batches(seed=1)
    train_b, val_b = first_batches(seed=1)
    train_c, val_c = first_batches(seed=2)
    for a, b in zip(train_a, train_b):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(val_a, val_b)
    np.testing.assert_array_equal(val_a, val_c)  # validation is never shuffled
    assert not np.array_equal(train_a[0], train_c[0])


def test_reshuffles_each_epoch(small_tfds):
    data = omniglot.load_omniglot(archives="small", tfds_dir=small_tfds, batch_size=4096)
    (x1, y1), (x2, y2) = next(iter(data.train)), next(iter(data.train))
    assert not np.array_equal(y1.numpy(), y2.numpy())
    # Same examples, new order.
    key = lambda x, y: sorted(zip(x["task"].numpy(), y.numpy()))  # noqa: E731
    assert key(x1, y1) == key(x2, y2)


@pytest.mark.parametrize(
    "kwargs, named, allowed",
    [
        ({"image_size": 0}, "image_size", "a positive integer"),
        ({"image_size": -32}, "image_size", "a positive integer"),
        ({"image_size": 2.5}, "image_size", "a positive integer"),
        ({"image_size": "32"}, "image_size", "a positive integer"),
        ({"image_size": True}, "image_size", "a positive integer"),
        ({"batch_size": 0}, "batch_size", "a positive integer"),
        ({"batch_size": -1}, "batch_size", "a positive integer"),
        ({"batch_size": None}, "batch_size", "a positive integer"),
        ({"shuffle_buffer": -1}, "shuffle_buffer", "an integer >= 0"),
        ({"tasks": 0}, "tasks=0", "use 1 to 8"),
        ({"tasks": 9}, "tasks=9", "use 1 to 8"),
        ({"tasks": -1}, "tasks=-1", "use 1 to 8"),
        ({"tasks": 2.0}, "2.0", "an int from 1 to 8 or a list of alphabet names"),
        ({"tasks": ["Latin", "Klingon"]}, "['Klingon']", "'Balinese', 'Early_Aramaic'"),
        ({"tasks": ["Angelic"]}, "['Angelic']", "'Balinese', 'Early_Aramaic'"),
        ({"tasks": []}, "at least one alphabet", "'Balinese', 'Early_Aramaic'"),
        ({"archives": "medium"}, "'medium'", "['full', 'small']"),
        ({"archives": ["images_background.zip"]}, "['images_background.zip']", "['full', 'small']"),
    ],
)
def test_bad_arguments_are_refused_before_any_io(no_default_dirs, kwargs, named, allowed):
    # Nothing is reachable here: an argument checked late would surface as
    # "archives not found" instead.
    kwargs = {"archives": "small", **kwargs}
    with pytest.raises(ValueError) as info:
        omniglot.load_omniglot(**kwargs)
    message = str(info.value)
    assert named in message and allowed in message
    name = next(iter(kwargs.keys() - {"archives"}), "archives")
    assert name in message


def test_data_smaller_than_a_batch(small_tfds):
    data = omniglot.load_omniglot(
        tasks=["Tagalog"], archives="small", tfds_dir=small_tfds, batch_size=10_000, image_size=8
    )
    for split, drawers in (("train", 14), ("validation", 3), ("test", 3)):
        batches = list(getattr(data, split))
        assert len(batches) == 1
        inputs, labels = batches[0]
        assert labels.shape == (17 * drawers,) == (data.num_examples[split],)
        assert inputs["image"].shape == (17 * drawers, 8, 8, 1)
