"""Downloading the Omniglot archives, against a real HTTP server on 127.0.0.1.

The server serves the `_small` archives, which are byte for byte the official
ones, so the official sizes and SHA-256s verify them as they would a real
download. Nothing here reaches the internet: every test points
`$MTL_KERAS_OMNIGLOT_URL` at 127.0.0.1, or forbids downloads.
"""

import hashlib
import io
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types
import zipfile

import pytest

from small_archives import ROOT
from small_archives import small_omniglot_dir
from mtl_keras.data import omniglot
from omniglot_fakes import ArchiveServer
from omniglot_fakes import hide_archives
from omniglot_fakes import rewrite_zip

SMALL = omniglot.ARCHIVE_SETS["small"]


@pytest.fixture(scope="module")
def originals():
    """The official `_small` archives' bytes, by name."""
    directory = small_omniglot_dir()
    return {name: (directory / name).read_bytes() for name in SMALL}


@pytest.fixture
def server():
    server = ArchiveServer()
    yield server
    server.close()


@pytest.fixture
def tfds_dir(tmp_path, monkeypatch, server):
    """A fresh TFDS dir; the archives are found nowhere and downloads go to `server`."""
    hide_archives(monkeypatch, tmp_path, download_from=server.url)
    return tmp_path / "tfds"


def _manual(tfds_dir):
    return tfds_dir / "downloads" / "manual"


def _contents(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _nothing_prepared(tfds_dir):
    return not list(tfds_dir.rglob("dataset_info.json"))


def test_official_checksums_are_those_tfds_ships():
    import tensorflow_datasets

    path = pathlib.Path(tensorflow_datasets.__file__).parent / "url_checksums" / "omniglot.txt"
    shipped = {}
    for line in path.read_text().splitlines():
        if line.strip():
            url, size, sha256, name = line.split("\t")
            assert url == omniglot.OMNIGLOT_URL + name
            shipped[name] = (int(size), sha256)
    assert shipped == omniglot.OFFICIAL_ARCHIVES


def test_first_load_downloads_verifies_and_prepares(tfds_dir, server, originals, capfd):
    for name in SMALL:
        server.serve(name, originals[name])
    manual = _manual(tfds_dir)
    manual.mkdir(parents=True)
    # Left by downloads killed long ago / still running in another process.
    old = manual / f".{SMALL[0]}.otherhost.123.abc.part"
    old.write_bytes(b"old")
    os.utime(old, (time.time() - 2 * 3600,) * 2)
    live = manual / f".{SMALL[0]}.otherhost.456.def.part"
    live.write_bytes(b"live")

    data = omniglot.load_omniglot(
        archives="small", tfds_dir=tfds_dir, tasks=["Latin", "Greek"], image_size=16, batch_size=64
    )
    inputs, labels = next(iter(data.test))
    assert inputs["image"].shape == (64, 16, 16, 1) and labels.shape == (64,)
    assert data.num_examples["test"] == (26 + 24) * 3

    assert server.requests == {name: 1 for name in SMALL}
    for name in SMALL:
        assert (manual / name).read_bytes() == originals[name]
    assert _contents(manual) == sorted(SMALL + (live.name,))

    err = capfd.readouterr().err
    for name, total in zip(SMALL, ("1.3/1.3 MB", "1.6/1.6 MB")):
        assert f"Downloading {server.url}{name} to {manual / name}" in err
        bars = [line for line in err.splitlines() if line.startswith(f"{name}: [")]
        # Not a TTY: one line per tenth, readable in a log, ending at 100%.
        assert 2 <= len(bars) <= 11
        assert bars[-1].endswith(f"{total} 100%") and "#" * 30 in bars[-1]
        assert "\r" not in "".join(bars)

    # The archives are found where they were downloaded: no second request.
    omniglot.load_omniglot(archives="small", tfds_dir=tfds_dir, tasks=1)
    assert server.requests == {name: 1 for name in SMALL}


@pytest.mark.parametrize("mode", ["truncated", "no_length"])
def test_truncated_download_keeps_nothing(tfds_dir, server, originals, mode):
    data = originals[SMALL[0]]
    server.serve(SMALL[0], data, mode)
    server.serve(SMALL[1], originals[SMALL[1]])
    with pytest.raises(omniglot.OmniglotDownloadError) as info:
        omniglot.find_omniglot_dir(archives="small", tfds_dir=tfds_dir)
    message = str(info.value)
    assert f"{server.url}{SMALL[0]}" in message
    if mode == "truncated":  # The server announced the full size.
        assert f"truncated: the connection closed after {len(data) // 2:,} of {len(data):,}" in message
    else:
        assert f"sent {len(data) // 2:,} bytes; the expected {SMALL[0]} has {len(data):,}" in message
    assert f"Nothing was kept under {_manual(tfds_dir) / SMALL[0]}" in message
    # Nothing that could pass for an archive, no temporary file either.
    assert _contents(_manual(tfds_dir)) == []
    # No retry, and no second archive after the first failed.
    assert server.requests == {SMALL[0]: 1}


def test_download_killed_midway_leaves_no_archive(tfds_dir, server, originals, tmp_path):
    server.serve(SMALL[0], originals[SMALL[0]], "stall")
    server.serve(SMALL[1], originals[SMALL[1]])
    manual = _manual(tfds_dir)
    script = textwrap.dedent(
        f"""
        import pathlib
        from mtl_keras.data import omniglot
        omniglot._REPO_ROOT = pathlib.Path({str(tmp_path / "repo" / "main")!r})
        omniglot.find_omniglot_dir(archives="small", tfds_dir={str(tfds_dir)!r})
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        # Well into the transfer (the server stalls at half).
        midway = len(originals[SMALL[0]]) // 4
        while not any(p.stat().st_size >= midway for p in manual.glob("*.part")):
            assert proc.poll() is None, "the download ended before it could be killed"
            assert time.monotonic() < deadline, "the download never got halfway"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)
    # Half an archive on disk, under a name that is not the archive's.
    (part,) = _contents(manual)
    assert part.startswith(f".{SMALL[0]}.") and part.endswith(".part")

    # Run again: downloads afresh, and removes what the killed run left.
    server.serve(SMALL[0], originals[SMALL[0]])
    assert omniglot.find_omniglot_dir(archives="small", tfds_dir=tfds_dir) == manual
    assert _contents(manual) == sorted(SMALL)
    for name in SMALL:
        assert (manual / name).read_bytes() == originals[name]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_is_redrawn_in_place(monkeypatch):
    screen = _Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    clock = iter([100.0, 100.1, 100.15])
    monkeypatch.setattr(omniglot, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    progress = omniglot._Progress("images_background.zip", 9_464_212)
    progress.update(0)
    progress.update(4_732_106)  # 0.1 s after the last redraw: skipped.
    progress.update(9_464_212, final=True)  # The last one always shows.
    assert screen.getvalue() == (
        "\rimages_background.zip: [" + "." * 30 + "] 0.0/9.5 MB   0%"
        "\rimages_background.zip: [" + "#" * 30 + "] 9.5/9.5 MB 100%\n"
    )


def _one_byte_changed(data):
    data = bytearray(data)
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize(
    "served, problem",
    [
        (lambda o: _one_byte_changed(o[SMALL[0]]), "has SHA-256"),
        (lambda o: o[SMALL[1]], "sent more than the 1,319,022 bytes"),
        (lambda o: b"<html>Rate limit exceeded</html>", "sent 32 bytes"),
    ],
    ids=["one_byte_changed", "another_archive", "html_page"],
)
def test_wrong_bytes_are_not_kept(tfds_dir, server, originals, served, problem):
    data = served(originals)
    server.serve(SMALL[0], data)
    server.serve(SMALL[1], originals[SMALL[1]])
    with pytest.raises(omniglot.OmniglotDownloadError) as info:
        omniglot.find_omniglot_dir(archives="small", tfds_dir=tfds_dir)
    message = str(info.value)
    assert f"{server.url}{SMALL[0]}" in message and problem in message
    if problem == "has SHA-256":
        assert hashlib.sha256(data).hexdigest() in message
        assert omniglot.OFFICIAL_ARCHIVES[SMALL[0]][1] in message
    assert omniglot.OMNIGLOT_CHECKSUMS_ENV in message
    assert _contents(_manual(tfds_dir)) == []
    assert server.requests == {SMALL[0]: 1}


def _closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_gives_the_offline_message(tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{_closed_port()}/"
    hide_archives(monkeypatch, tmp_path, download_from=url)
    tfds_dir = tmp_path / "tfds"
    with pytest.raises(omniglot.OmniglotDownloadError) as info:
        omniglot.load_omniglot(archives="small", tfds_dir=tfds_dir)
    assert isinstance(info.value, omniglot.OmniglotNotFoundError)
    message = str(info.value)
    assert f"Could not download {url}{SMALL[0]}: cannot reach the server" in message
    assert "there is no retry" in message
    # Where to put the files by hand, and how to stay off the network.
    assert f"put them, unextracted, in {_manual(tfds_dir)}" in message
    assert f"{url}{SMALL[1]}" in message
    assert "--data-dir" in message and omniglot.OMNIGLOT_DIR_ENV in message
    assert "download=False" in message and f"{omniglot.NO_DOWNLOAD_ENV}=1" in message
    assert _contents(_manual(tfds_dir)) == [] and _nothing_prepared(tfds_dir)


def test_http_error_is_reported(tfds_dir, server):
    with pytest.raises(omniglot.OmniglotDownloadError, match="HTTP 404") as info:
        omniglot.find_omniglot_dir(archives="small", tfds_dir=tfds_dir)
    assert f"{server.url}{SMALL[0]}" in str(info.value)
    assert server.requests == {SMALL[0]: 1}
    assert _contents(_manual(tfds_dir)) == []


@pytest.mark.parametrize("how", ["environment", "argument"])
def test_forbidden_downloads_explain_how_to_enable_them(tfds_dir, server, originals, monkeypatch, how):
    for name in SMALL:
        server.serve(name, originals[name])
    if how == "environment":  # Wins over download=True.
        monkeypatch.setenv(omniglot.NO_DOWNLOAD_ENV, "1")
        kwargs, reason = {"download": True}, f"${omniglot.NO_DOWNLOAD_ENV}=1 forbids downloading"
    else:
        kwargs, reason = {"download": False}, "downloading is off (download=False)"
    with pytest.raises(omniglot.OmniglotNotFoundError) as info:
        omniglot.load_omniglot(archives="small", tfds_dir=tfds_dir, **kwargs)
    assert not isinstance(info.value, omniglot.OmniglotDownloadError)
    message = str(info.value)
    assert f"They are not downloaded: {reason}" in message
    assert f"download=True (the default) with {omniglot.NO_DOWNLOAD_ENV} unset" in message
    home = pathlib.Path(os.environ["HOME"])
    for place in (
        _manual(tfds_dir),
        home / "tensorflow_datasets" / "downloads" / "manual",
        tfds_dir.parent / "repo" / "shared" / "data" / "omniglot",
    ):
        assert f"  - {place}  (" in message
    assert f"{server.url}{SMALL[0]}" in message
    assert server.requests == {}
    assert not _manual(tfds_dir).exists()


def test_mirror_of_repacked_archives_needs_its_checksums(tfds_dir, server, originals, tmp_path, monkeypatch):
    repacked = {}
    for name in SMALL:
        source, copy = tmp_path / f"original_{name}", tmp_path / name
        source.write_bytes(originals[name])
        rewrite_zip(source, copy, compression=zipfile.ZIP_STORED)
        repacked[name] = copy.read_bytes()
        assert repacked[name] != originals[name]
        server.serve(name, repacked[name])
    with pytest.raises(omniglot.OmniglotDownloadError, match=omniglot.OMNIGLOT_CHECKSUMS_ENV):
        omniglot.find_omniglot_dir(archives="small", tfds_dir=tfds_dir)

    checksums = tmp_path / "mirror_checksums.txt"
    checksums.write_text("# our mirror, TFDS's url_checksums format\n")
    monkeypatch.setenv(omniglot.OMNIGLOT_CHECKSUMS_ENV, str(checksums))
    with checksums.open("a") as f:
        f.write(f"{server.url}{SMALL[0]}\tnot-a-size\tabc\n")
    with pytest.raises(ValueError, match=f"{checksums}, line 2"):
        omniglot.find_omniglot_dir(archives="small", tfds_dir=tfds_dir)
    checksums.write_text(
        "".join(
            f"{server.url}{name}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}\t{name}\n"
            for name, data in repacked.items()
        )
    )
    assert omniglot.find_omniglot_dir(archives="small", tfds_dir=tfds_dir) == _manual(tfds_dir)
    for name in SMALL:
        assert (_manual(tfds_dir) / name).read_bytes() == repacked[name]
