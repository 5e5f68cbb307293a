"""Files that cannot be written: a full disk under the report, output folders that refuse writes.

The full disk is real: the report's temporary file is a link to /dev/full
(every write fails with ENOSPC, no privileges needed) and, as root, a 64 KiB
tmpfs filled to the last block. The unwritable folder is a file where a
folder is expected (tests run as root, who ignores permission bits) and a
read-only mount (root) or a 0500 folder (anyone else).
"""

import contextlib
import errno
import json
import os
import subprocess

import pytest

from apps import train_omniglot
from mtl_keras.reporting import ensure_writable_dir, write_json

PREVIOUS = {"mean_test_accuracy": 0.5, "note": "the previous report"}


@contextlib.contextmanager
def _tmpfs(path, options):
    """A tmpfs mounted at `path` for the block; skips where mounting is not allowed."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True, timeout=60)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True, timeout=60)


def test_report_on_a_full_disk_is_a_clear_error_and_the_previous_report_stays(tmp_path):
    path = tmp_path / "report.json"
    write_json(path, PREVIOUS)
    os.symlink("/dev/full", f"{path}.tmp")
    with pytest.raises(OSError) as caught:
        write_json(path, {"mean_test_accuracy": 0.9})
    assert caught.value.errno == errno.ENOSPC
    assert str(caught.value).endswith(
        f"Could not write {path}: No space left on device; the previous report.json is unchanged.")
    assert json.loads(path.read_text()) == PREVIOUS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_report_on_a_full_tmpfs(tmp_path):
    with _tmpfs(tmp_path / "disk", "size=64k") as disk:
        path = disk / "report.json"
        write_json(path, PREVIOUS)
        with pytest.raises(OSError, match="No space left"):
            with open(disk / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        with pytest.raises(OSError, match=r"Could not write .*report.json: No space left on device; the previous"):
            write_json(path, {"rows": ["x" * 100] * 1000})
        assert json.loads(path.read_text()) == PREVIOUS
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "report.json"]
        os.remove(disk / "filler")
        write_json(path, {"rows": ["x" * 100] * 100})  # room again: written


def test_a_first_report_that_cannot_be_written_says_nothing_was_written(tmp_path):
    path = tmp_path / "report.json"
    os.symlink("/dev/full", f"{path}.tmp")
    with pytest.raises(OSError, match="; nothing was written.$"):
        write_json(path, PREVIOUS)
    assert not path.exists()


def test_unwritable_folders_are_named():
    with pytest.raises(NotADirectoryError, match=r"Output folder /dev/null \(given by --output\) is a file"):
        ensure_writable_dir("/dev/null", "--output")
    with pytest.raises(OSError, match=r"Cannot write into the output folder /dev/null/run: .*; choose another"):
        ensure_writable_dir("/dev/null/run")


@pytest.fixture
def read_only_dir(tmp_path):
    if os.geteuid() != 0:
        path = tmp_path / "read_only"
        path.mkdir(mode=0o500)
        yield path
        path.chmod(0o700)
    else:
        with _tmpfs(tmp_path / "read_only", "ro,size=64k") as path:
            yield path


def _app(tmp_path, *flags):
    # No data flags: a refused folder must stop the app before it looks for data.
    return ["--tasks", "2", "--epochs", "1", "--tfds-dir", str(tmp_path / "tfds"), "--verbose", "0", *flags]


def _refused(capsys, argv):
    """The error line of an app run that must end with status 2."""
    with pytest.raises(SystemExit) as exit_:
        train_omniglot.main(argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2
    assert "Omniglot:" not in out, "data were loaded before the check"
    return err


def test_app_refuses_an_output_path_that_is_a_file_before_training(tmp_path, capsys):
    taken = tmp_path / "results"
    taken.write_text("someone's file")
    err = _refused(capsys, _app(tmp_path, "--output", str(taken), "--export-dir", str(tmp_path / "saved")))
    assert err == (f"train_omniglot: error: Output folder {taken} (given by --output) is a file, not a folder; "
                   "choose another path.\n")
    assert taken.read_text() == "someone's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_app_refuses_read_only_output_and_export_folders_before_training(tmp_path, read_only_dir, capsys):
    err = _refused(capsys, _app(tmp_path, "--output", str(read_only_dir / "run"),
                                "--export-dir", str(tmp_path / "saved")))
    assert err.startswith(f"train_omniglot: error: Cannot write into the output folder {read_only_dir / 'run'} "
                          "(given by --output): ")
    err = _refused(capsys, _app(tmp_path, "--output", str(tmp_path / "run"), "--export-dir", str(read_only_dir)))
    assert err.startswith(f"train_omniglot: error: Cannot write into the output folder {read_only_dir} "
                          "(given by --export-dir): ")
    err = _refused(capsys, _app(tmp_path, "--output", str(tmp_path / "run"), "--no-export",
                                "--backup-dir", str(read_only_dir / "backup")))
    assert "(given by --backup-dir)" in err
    assert not list((tmp_path / "run").iterdir())
