"""Faults around the Omniglot archives and the prepared TFDS cache.

Real corrupted copies in tmp_path (the shared archives are only read): a
clear error naming the file and the fix, and nothing prepared earlier lost.
The prepared cache is keyed by the archives' content: other archives are
prepared afresh beside it, the same ones reuse it.
"""

import io
import pathlib
import shutil
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from small_archives import small_omniglot_dir
from mtl_keras.data import omniglot
from omniglot_fakes import hide_archives
from omniglot_fakes import rewrite_zip

SMALL = omniglot.ARCHIVE_SETS["small"]
OFFICIAL_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"


@pytest.fixture(autouse=True)
def _never_online(monkeypatch):
    for name in (omniglot.OMNIGLOT_URL_ENV, omniglot.OMNIGLOT_CHECKSUMS_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(omniglot.NO_DOWNLOAD_ENV, "1")


@pytest.fixture(scope="module")
def small_dir():
    return small_omniglot_dir()


@pytest.fixture(scope="module")
def good_cache(small_dir, tmp_path_factory):
    """A TFDS dir holding one dataset, prepared from the good small archives."""
    tfds_dir = tmp_path_factory.mktemp("good_tfds")
    omniglot.omniglot_builder(small_dir, archives="small", tfds_dir=tfds_dir)
    return tfds_dir


@pytest.fixture
def no_preparing(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the dataset was prepared again")

    monkeypatch.setattr(omniglot.OmniglotAlphabets, "_split_generators", fail)


def _prepared(tfds_dir):
    """The prepared datasets' folders, and any half-written leftovers."""
    done = sorted(p.parent for p in tfds_dir.rglob("dataset_info.json"))
    return done, sorted(tfds_dir.rglob("*incomplete*"))


def _still_works(tfds_dir, small_dir, before):
    """The earlier dataset is intact and loads without being prepared again."""
    assert _prepared(tfds_dir) == before
    data = omniglot.load_omniglot(small_dir, archives="small", tfds_dir=tfds_dir, batch_size=64)
    inputs, labels = next(iter(data.test))
    assert inputs["image"].shape[0] == labels.shape[0] == 64


def _archives_with(tmp_path, small_dir, first_archive_bytes):
    folder = tmp_path / "archives"
    folder.mkdir()
    (folder / SMALL[0]).write_bytes(first_archive_bytes)
    shutil.copy(small_dir / SMALL[1], folder)
    return folder


def _foreign_zip():
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("README.txt", "holiday pictures\n")
        image = io.BytesIO()
        Image.new("L", (105, 105), 255).save(image, format="PNG")
        zf.writestr("photos/beach.png", image.getvalue())
    return out.getvalue()


FAULTS = {
    "truncated_in_the_middle": lambda good: good[: len(good) // 2],
    "random_bytes": lambda good: np.random.default_rng(0).bytes(len(good)),
    "empty_file": lambda good: b"",
    "zip_of_unrelated_files": lambda good: _foreign_zip(),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_bad_archive_is_refused_and_cache_survives(fault, good_cache, small_dir, tmp_path, no_preparing):
    before = _prepared(good_cache)
    assert len(before[0]) == 1 and not before[1]
    bad = _archives_with(tmp_path, small_dir, FAULTS[fault]((small_dir / SMALL[0]).read_bytes()))
    with pytest.raises(omniglot.OmniglotArchiveError) as info:
        omniglot.load_omniglot(bad, archives="small", tfds_dir=good_cache)
    message = str(info.value)
    assert f"Omniglot archive {bad / SMALL[0]} is corrupt or not the official one" in message
    assert f"Delete it and download it again from {OFFICIAL_URL}{SMALL[0]}" in message
    _still_works(good_cache, small_dir, before)


def test_random_bytes_as_the_full_background_archive(tmp_path):
    bad = tmp_path / "archives"
    bad.mkdir()
    (bad / "images_background.zip").write_bytes(np.random.default_rng(1).bytes(100_000))
    (bad / "images_evaluation.zip").write_bytes(np.random.default_rng(2).bytes(100_000))
    with pytest.raises(omniglot.OmniglotArchiveError) as info:
        omniglot.load_omniglot(bad, tfds_dir=tmp_path / "tfds")
    message = str(info.value)
    assert f"{bad / 'images_background.zip'} is corrupt" in message
    assert f"download it again from {OFFICIAL_URL}images_background.zip" in message
    assert _prepared(tmp_path / "tfds") == ([], [])


def test_fix_from_the_message_then_the_cache_serves(good_cache, small_dir, tmp_path, monkeypatch, no_preparing):
    """A truncated archive found in the usual places; deleting it, as the
    message says, leaves the earlier prepared dataset in use (downloads are
    forbidden here, so the archives are found nowhere)."""
    before = _prepared(good_cache)
    hide_archives(monkeypatch, tmp_path)
    found = _archives_with(tmp_path, small_dir, (small_dir / SMALL[0]).read_bytes()[:50_000])
    monkeypatch.setenv(omniglot.OMNIGLOT_DIR_ENV, str(found))
    with pytest.raises(omniglot.OmniglotArchiveError, match="Delete it and download it again"):
        omniglot.load_omniglot(archives="small", tfds_dir=good_cache)
    (found / SMALL[0]).unlink()
    data = omniglot.load_omniglot(archives="small", tfds_dir=good_cache, batch_size=32)
    assert next(iter(data.train))[1].shape == (32,)
    assert _prepared(good_cache) == before


def _damaged(small_dir, tmp_path):
    """Bytes damaged inside a member; the zip directory (names, CRCs) intact."""
    data = bytearray((small_dir / SMALL[0]).read_bytes())
    data[400_000:400_400] = bytes(b ^ 0x55 for b in data[400_000:400_400])
    return _archives_with(tmp_path, small_dir, bytes(data))


def test_damaged_image_bytes_with_the_cache_prepared(good_cache, small_dir, tmp_path, no_preparing):
    """The content key is the good archives' one, so their prepared data
    (checked against the same CRCs when it was written) is used."""
    before = _prepared(good_cache)
    omniglot.load_omniglot(_damaged(small_dir, tmp_path), archives="small", tfds_dir=good_cache)
    assert _prepared(good_cache) == before


def test_damaged_image_bytes_keep_nothing_half_prepared(small_dir, tmp_path):
    damaged = _damaged(small_dir, tmp_path)
    tfds_dir = tmp_path / "tfds"
    with pytest.raises(omniglot.OmniglotArchiveError, match=f"{damaged / SMALL[0]}.*download it again"):
        omniglot.omniglot_builder(damaged, archives="small", tfds_dir=tfds_dir)
    assert _prepared(tfds_dir) == ([], [])


def test_repacked_archives_reuse_the_cache(good_cache, small_dir, tmp_path, no_preparing):
    repacked = tmp_path / "repacked"
    repacked.mkdir()
    for name in SMALL:
        rewrite_zip(small_dir / name, repacked / name, compression=zipfile.ZIP_STORED)
        assert (repacked / name).read_bytes() != (small_dir / name).read_bytes()
    good = omniglot.omniglot_builder(small_dir, archives="small", tfds_dir=good_cache, prepare=False)
    same = omniglot.omniglot_builder(repacked, archives="small", tfds_dir=good_cache)
    assert same.is_prepared() and same.data_path == good.data_path
    assert same.archives_key == good.archives_key


def _prepared_image(builder, member):
    ds = builder.as_dataset(split="test")
    for example in tfds.as_numpy(ds):
        if example["filename"].decode() == member:
            return example["image"][..., 0]
    raise AssertionError(f"{member} not in the prepared test split")


def test_cache_is_keyed_by_archive_content(small_dir, tmp_path, monkeypatch):
    tfds_dir = tmp_path / "tfds"
    a = omniglot.omniglot_builder(small_dir, archives="small", tfds_dir=tfds_dir)
    a_info = pathlib.Path(a.data_path) / "dataset_info.json"
    a_written = a_info.stat().st_mtime_ns

    # B: the same archives with one test-split drawing changed (mirrored).
    with zipfile.ZipFile(small_dir / SMALL[0]) as zf:
        member = next(
            n for n in zf.namelist() if "/Korean/character01/" in n and n.endswith("_18.png")
        )
        original = np.asarray(Image.open(io.BytesIO(zf.read(member))).convert("L"))
    mirrored = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(original[:, ::-1])).save(mirrored, format="PNG")
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    rewrite_zip(
        small_dir / SMALL[0],
        b_dir / SMALL[0],
        content=lambda name, data: mirrored.getvalue() if name == member else data,
    )
    shutil.copy(small_dir / SMALL[1], b_dir)

    b = omniglot.omniglot_builder(b_dir, archives="small", tfds_dir=tfds_dir)
    assert b.archives_key != a.archives_key and b.data_path != a.data_path
    assert b.data_path.parts[-3:] == ("omniglot_alphabets", "small", "1.0.0")
    assert b.info.metadata["archives"] == [str(b_dir / name) for name in SMALL]
    np.testing.assert_array_equal(_prepared_image(b, member), 255 - original[:, ::-1])
    np.testing.assert_array_equal(_prepared_image(a, member), 255 - original)

    # A again: its dataset, as it was, not prepared again.
    def fail(*args, **kwargs):
        raise AssertionError("A was prepared again")

    monkeypatch.setattr(omniglot.OmniglotAlphabets, "_split_generators", fail)
    again = omniglot.omniglot_builder(small_dir, archives="small", tfds_dir=tfds_dir)
    assert again.data_path == a.data_path and a_info.stat().st_mtime_ns == a_written
    np.testing.assert_array_equal(_prepared_image(again, member), 255 - original)
    assert len(_prepared(tfds_dir)[0]) == 2

    # With the archives gone, which of the two to use is not guessed.
    hide_archives(monkeypatch, tmp_path)
    with pytest.raises(omniglot.OmniglotNotFoundError) as info:
        omniglot.load_omniglot(archives="small", tfds_dir=tfds_dir)
    message = str(info.value)
    for builder, folder in ((a, small_dir), (b, b_dir)):
        assert f"  - {builder.data_path}  (from {folder / SMALL[0]}, {folder / SMALL[1]} on " in message
    assert "Pass data_dir (--data-dir)" in message


@pytest.mark.parametrize("case", ["missing", "a_file", "empty", "one_archive_of_two"])
def test_data_dir_is_used_as_given(case, small_dir, tmp_path, caplog):
    """Never a warning and a fallback: the usual places hold the archives
    (the shared folder), but a data_dir given explicitly is the only one used."""
    data_dir = tmp_path / "given"
    if case == "a_file":
        data_dir.write_text("not a folder")
    elif case == "empty":
        data_dir.mkdir()
    elif case == "one_archive_of_two":
        data_dir.mkdir()
        shutil.copy(small_dir / SMALL[0], data_dir)
    tfds_dir = tmp_path / "tfds"
    with pytest.raises(omniglot.OmniglotNotFoundError) as info:
        omniglot.load_omniglot(data_dir, archives="small", tfds_dir=tfds_dir)
    message = str(info.value)
    if case == "one_archive_of_two":
        assert f"{SMALL[1]} not found in data_dir={data_dir}" in message
        assert f"{OFFICIAL_URL}{SMALL[1]}" in message
    else:
        problem = {
            "missing": "the folder does not exist",
            "a_file": "it is not a folder",
            "empty": f"it holds none of {SMALL[0]}, {SMALL[1]}",
        }[case]
        assert f"Omniglot archives not found in data_dir={data_dir}: {problem}." in message
        assert f"(They are in {small_dir}: leave data_dir out to use them.)" in message
    assert "nothing is downloaded" in message or "leave data_dir / --data-dir out" in message
    assert not any(r.levelname == "WARNING" for r in caplog.records)
    assert not tfds_dir.exists()
