"""Omniglot as a many-task problem: one classification task per alphabet.

Omniglot (Lake, Salakhutdinov & Tenenbaum, 2015) has 1,623 handwritten
characters from 50 alphabets, each drawn once by 20 different people
("drawers"). Here every alphabet is one task; a task classifies the
characters of its alphabet (14 to 55 classes), so the whole set is 50 tasks
that share an input space but not their labels.

The data comes from the official zip archives (30 alphabets in
`images_background.zip`, 20 in `images_evaluation.zip`), read directly with
`zipfile` by the TFDS builder `OmniglotAlphabets` (dataset name
`omniglot_alphabets`). `find_omniglot_dir()` looks for them in the usual
places; when none has them, the official archives are downloaded into TFDS's
manual folder, checked against their known sizes and SHA-256s
(`OFFICIAL_ARCHIVES`). `download=False`, or `MTL_KERAS_NO_DOWNLOAD=1` in the
environment, forbids any download; `MTL_KERAS_OMNIGLOT_URL` replaces the
download URL (a mirror) and `MTL_KERAS_OMNIGLOT_CHECKSUMS` names a file of
sizes and SHA-256s for a mirror whose archives are packed differently.

The builder prepares the images once into a TFDS data dir, under a key
computed from the archives' content (the member names and CRC-32s of their
zip directories), so other archives are prepared afresh and the same ones,
wherever they are and however they are packed, reuse what was prepared.
Later runs only read the prepared records; when the archives are gone, the
prepared dataset is used as it is.

Splits are by drawer, the same for every character (see `SPLIT_DRAWERS`):
drawers 1-14 train, 15-17 validation, 18-20 test. Every character therefore
appears in every split, which is what a per-alphabet classifier needs.

Alphabet order (= task id order, = `alphabet` ClassLabel order) is fixed:
the background alphabets sorted by name, then the evaluation alphabets sorted
by name (`ALPHABETS`). A config that uses fewer alphabets (the "small" one)
keeps this relative order.

Example:

```python
from mtl_keras.data import load_omniglot

data = load_omniglot(tasks=5, image_size=32, batch_size=128)
data.tasks                 # TaskSet of 5 multiclass tasks, one per alphabet
for inputs, labels in data.train.take(1):
    inputs["image"].shape  # (128, 32, 32, 1), float32 in [0, 1], ink = 1
    inputs["task"].shape   # (128,), int32 task ids in [0, 5)
    labels.shape           # (128,), int32 character index in its alphabet
```
"""

import dataclasses
import datetime
import hashlib
import http.client
import io
import json
import logging
import os
import pathlib
import re
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mtl_keras.image_preprocessing import ImagePreprocessing
from mtl_keras.tasks import Task
from mtl_keras.tasks import TaskSet

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# Constants of the (fixed, public) dataset.
# --------------------------------------------------------------------------

OMNIGLOT_DIR_ENV = "MTL_KERAS_OMNIGLOT_DIR"
"""Environment variable naming a directory that holds the Omniglot zips."""

OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
"""Where the official archives live; each archive is `OMNIGLOT_URL + name`."""

OMNIGLOT_URL_ENV = "MTL_KERAS_OMNIGLOT_URL"
"""Environment variable replacing `OMNIGLOT_URL` (a mirror, a test server)."""

NO_DOWNLOAD_ENV = "MTL_KERAS_NO_DOWNLOAD"
"""Environment variable that, set to anything but `""`, `0`, `false`, `no` or
`off`, forbids every download, whatever `download=` says: for machines that
must never reach out."""

OMNIGLOT_CHECKSUMS_ENV = "MTL_KERAS_OMNIGLOT_CHECKSUMS"
"""Environment variable naming a file of expected sizes and SHA-256s that
replace `OFFICIAL_ARCHIVES` for the archives it lists.

One archive a line, `NAME_OR_URL SIZE SHA256 [NAME]`, whitespace separated,
`#` comments allowed: the format of TFDS's `url_checksums/*.txt`. For a
mirror whose archives hold the same images packed into other zip bytes.
"""

OFFICIAL_ARCHIVES = {
    "images_background.zip": (
        9464212,
        "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640",
    ),
    "images_evaluation.zip": (
        6462886,
        "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee",
    ),
    "images_background_small1.zip": (
        1319022,
        "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
    ),
    "images_background_small2.zip": (
        1580917,
        "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
    ),
}
"""Size in bytes and SHA-256 of each official archive at `OMNIGLOT_URL`.

The values TFDS ships in `tensorflow_datasets/url_checksums/omniglot.txt`
(a test keeps them equal). Only downloads are checked against them: local
copies may be repacked (other zip bytes, same images) and are checked by
their content instead.
"""

ARCHIVE_SETS = {
    "full": ("images_background.zip", "images_evaluation.zip"),
    "small": ("images_background_small1.zip", "images_background_small2.zip"),
}
"""Which zip archives each builder config (the `archives=` argument) reads."""

DRAWERS_PER_CHARACTER = 20
IMAGE_SHAPE = (105, 105, 1)

SPLIT_DRAWERS = {
    "train": tuple(range(1, 15)),
    "validation": (15, 16, 17),
    "test": (18, 19, 20),
}
"""Drawers (1-based, the `YY` of `XXXX_YY.png`) in each split: 70/15/15.

The split is by drawer and identical for every character, so it is
deterministic, disjoint, and every class has 14/3/3 examples.
"""

# Characters per alphabet, from the dataset's documentation (and checked
# against the archives when preparing, and in the tests).
_BACKGROUND_NUM_CHARACTERS = {
    "Alphabet_of_the_Magi": 20,
    "Anglo-Saxon_Futhorc": 29,
    "Arcadian": 26,
    "Armenian": 41,
    "Asomtavruli_(Georgian)": 40,
    "Balinese": 24,
    "Bengali": 46,
    "Blackfoot_(Canadian_Aboriginal_Syllabics)": 14,
    "Braille": 26,
    "Burmese_(Myanmar)": 34,
    "Cyrillic": 33,
    "Early_Aramaic": 22,
    "Futurama": 26,
    "Grantha": 43,
    "Greek": 24,
    "Gujarati": 48,
    "Hebrew": 22,
    "Inuktitut_(Canadian_Aboriginal_Syllabics)": 16,
    "Japanese_(hiragana)": 52,
    "Japanese_(katakana)": 47,
    "Korean": 40,
    "Latin": 26,
    "Malay_(Jawi_-_Arabic)": 40,
    "Mkhedruli_(Georgian)": 41,
    "N_Ko": 33,
    "Ojibwe_(Canadian_Aboriginal_Syllabics)": 14,
    "Sanskrit": 42,
    "Syriac_(Estrangelo)": 23,
    "Tagalog": 17,
    "Tifinagh": 55,
}
_EVALUATION_NUM_CHARACTERS = {
    "Angelic": 20,
    "Atemayar_Qelisayer": 26,
    "Atlantean": 26,
    "Aurek-Besh": 26,
    "Avesta": 26,
    "Ge_ez": 26,
    "Glagolitic": 45,
    "Gurmukhi": 45,
    "Kannada": 41,
    "Keble": 26,
    "Malayalam": 47,
    "Manipuri": 40,
    "Mongolian": 30,
    "Old_Church_Slavonic_(Cyrillic)": 45,
    "Oriya": 46,
    "Sylheti": 28,
    "Syriac_(Serto)": 23,
    "Tengwar": 25,
    "Tibetan": 42,
    "ULOG": 26,
}

ALPHABETS_BACKGROUND = tuple(sorted(_BACKGROUND_NUM_CHARACTERS))
"""The 30 alphabets of `images_background.zip`, sorted by name."""

ALPHABETS_EVALUATION = tuple(sorted(_EVALUATION_NUM_CHARACTERS))
"""The 20 alphabets of `images_evaluation.zip`, sorted by name."""

ALPHABETS = ALPHABETS_BACKGROUND + ALPHABETS_EVALUATION
"""All 50 alphabets in task-id order: background sorted, then evaluation sorted."""

ALPHABET_NUM_CHARACTERS = {**_BACKGROUND_NUM_CHARACTERS, **_EVALUATION_NUM_CHARACTERS}
"""Alphabet name -> number of characters (classes of its task)."""

# The two "small" archives are subsets of the background set. They overlap:
# Greek and Latin are in both, byte for byte, so together they hold 8
# distinct alphabets; each is used once (from the first archive holding it).
_SMALL_ALPHABET_SET = {
    "Balinese",
    "Early_Aramaic",
    "Greek",
    "Japanese_(katakana)",
    "Korean",
    "Latin",
    "Sanskrit",
    "Tagalog",
}
_CONFIG_ALPHABETS = {
    "full": ALPHABETS,
    "small": tuple(a for a in ALPHABETS if a in _SMALL_ALPHABET_SET),
}

_CITATION = """\
@article{lake2015human,
  title={Human-level concept learning through probabilistic program induction},
  author={Lake, Brenden M and Salakhutdinov, Ruslan and Tenenbaum, Joshua B},
  journal={Science},
  volume={350},
  number={6266},
  pages={1332--1338},
  year={2015},
}"""

# `images_xxx/<Alphabet>/characterNN/XXXX_YY.png`, YY = drawer.
_MEMBER_RE = re.compile(r"^([^/]+)/([^/]+)/character(\d+)/(\d+)_(\d+)\.png$")


class OmniglotNotFoundError(FileNotFoundError):
    """The Omniglot zip archives were not found (or could not be downloaded)."""


class OmniglotDownloadError(OmniglotNotFoundError):
    """Downloading the archives failed: offline, HTTP error, truncated, or
    not the expected bytes. Nothing is kept under the archive's name."""


class OmniglotArchiveError(ValueError):
    """An Omniglot archive is corrupt or does not have the expected layout."""


# --------------------------------------------------------------------------
# Finding (and, when missing, downloading) the archives.
# --------------------------------------------------------------------------

# The repository root: the parent of the `mtl_keras` package directory. The
# project keeps shared data next to the repository (`../shared/data/...`).
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_SHARED_SUBDIR = pathlib.Path("..", "shared", "data", "omniglot")


def _archive_names(archives):
    """Normalises `archives` (a config name or zip names) to a tuple of names."""
    if isinstance(archives, str):
        if archives not in ARCHIVE_SETS:
            raise ValueError(
                f"Unknown Omniglot archive set {archives!r}; use one of {sorted(ARCHIVE_SETS)}."
            )
        return ARCHIVE_SETS[archives]
    return tuple(archives)


def _normalised(path):
    # Absolute without resolving symlinks: the path the user gave, made
    # comparable (the same folder reached twice counts once).
    return pathlib.Path(os.path.normpath(os.path.abspath(pathlib.Path(path).expanduser())))


def _tfds_root(tfds_dir=None):
    """The TFDS data dir: `tfds_dir`, `$TFDS_DATA_DIR` or `~/tensorflow_datasets`."""
    if tfds_dir is not None:
        return _normalised(tfds_dir)
    if os.environ.get("TFDS_DATA_DIR"):
        return _normalised(os.environ["TFDS_DATA_DIR"])
    return _normalised(pathlib.Path.home() / "tensorflow_datasets")


def _tfds_manual_dirs(tfds_dir=None):
    """TFDS's manual-download dirs, most specific first."""
    roots = []
    if tfds_dir is not None:
        roots.append(pathlib.Path(tfds_dir).expanduser())
    if os.environ.get("TFDS_DATA_DIR"):
        roots.append(pathlib.Path(os.environ["TFDS_DATA_DIR"]).expanduser())
    roots.append(pathlib.Path.home() / "tensorflow_datasets")
    return [root / "downloads" / "manual" for root in roots]


def _candidate_dirs(tfds_dir=None):
    """Every place searched when no `data_dir` is given, as `(how, path)`."""
    candidates = []
    if os.environ.get(OMNIGLOT_DIR_ENV):
        candidates.append((f"${OMNIGLOT_DIR_ENV}", pathlib.Path(os.environ[OMNIGLOT_DIR_ENV])))
    for path in _tfds_manual_dirs(tfds_dir):
        candidates.append(("TFDS manual dir", path))
    candidates.append(("repository's shared data", _REPO_ROOT / _SHARED_SUBDIR))
    candidates.append(("working directory's shared data", pathlib.Path.cwd() / _SHARED_SUBDIR))
    # The same directory can be reached twice (e.g. cwd = repository root).
    seen, unique = set(), []
    for how, path in candidates:
        path = _normalised(path)
        if path not in seen:
            seen.add(path)
            unique.append((how, path))
    return unique


def _search(names, candidates):
    """`(first dir holding all names, first dir holding some)`, None if none."""
    complete = partial = None
    for _, path in candidates:
        present = [name for name in names if (path / name).is_file()]
        if len(present) == len(names):
            complete = path
            break
        if present and partial is None:
            partial = path
    return complete, partial


def _download_refusal(download):
    """Why downloading is off (a phrase for messages), or None if allowed."""
    value = os.environ.get(NO_DOWNLOAD_ENV, "").strip()
    if value.lower() not in ("", "0", "false", "no", "off"):
        return f"${NO_DOWNLOAD_ENV}={value} forbids downloading"
    if not download:
        return "downloading is off (download=False)"
    return None


def _base_url():
    url = os.environ.get(OMNIGLOT_URL_ENV) or OMNIGLOT_URL
    return url if url.endswith("/") else url + "/"


def _url_list(names):
    return "\n".join(f"  {_base_url()}{name}" for name in names)


def _searched_list(candidates):
    return "\n".join(f"  - {path}  ({how})" for how, path in candidates)


def _local_files_help(target):
    return (
        f"To use local files instead, put them, unextracted, in {target} (or in any folder, "
        f"then pass --data-dir / data_dir=DIR, or set {OMNIGLOT_DIR_ENV}=DIR); "
        f"download=False (apps: --no-download) or {NO_DOWNLOAD_ENV}=1 stops any download attempt."
    )


def _not_found_message(names, candidates, refusal):
    target = _tfds_manual_dirs()[0]
    return (
        f"Omniglot archives {', '.join(names)} not found. Searched:\n{_searched_list(candidates)}\n"
        f"They are not downloaded: {refusal}. Download them from\n{_url_list(names)}\n"
        f"and put them, unextracted, in one of the directories above (for example "
        f"{target}), or pass --data-dir / data_dir=DIR, or set {OMNIGLOT_DIR_ENV}=DIR. "
        f"Or let them be downloaded: download=True (the default) with {NO_DOWNLOAD_ENV} unset."
    )


def _given_dir(data_dir, names, candidates):
    """`data_dir` if it holds some of the archives; else a clear error.

    An explicit folder is never replaced by another one: a typo must not
    silently train on other data.
    """
    path = _normalised(data_dir)
    if not path.exists():
        problem = "the folder does not exist"
    elif not path.is_dir():
        problem = "it is not a folder"
    elif not any((path / name).is_file() for name in names):
        problem = f"it holds none of {', '.join(names)}"
    else:
        # Holding only some: preparing names the missing one.
        return path
    elsewhere, _ = _search(names, candidates)
    hint = f"\n(They are in {elsewhere}: leave data_dir out to use them.)" if elsewhere else ""
    message = (
        f"Omniglot archives not found in data_dir={path}: {problem}.\n"
        "A data_dir given explicitly is used as it is: no other folder is searched and "
        f"nothing is downloaded. Put {', '.join(names)} there, unextracted; they are at\n"
        f"{_url_list(names)}\n"
        "Or leave data_dir / --data-dir out: the archives are then searched for in "
        f"${OMNIGLOT_DIR_ENV} when set, then in\n{_searched_list(candidates)}\n"
        "and downloaded when none has them."
        + hint
    )
    raise OmniglotNotFoundError(message)


def find_omniglot_dir(data_dir=None, *, archives="full", tfds_dir=None, download=True):
    """Returns the directory that holds the Omniglot zip archives.

    With `data_dir`, that folder is the answer: if it does not exist or holds
    none of the archives, an error says so (no other folder is tried, nothing
    is downloaded). Otherwise looks, in this order, in:
    `$MTL_KERAS_OMNIGLOT_DIR`; TFDS's manual-download dir
    (`<tfds_dir>/downloads/manual` when `tfds_dir` is given,
    `$TFDS_DATA_DIR/downloads/manual`, `~/tensorflow_datasets/downloads/
    manual`); `../shared/data/omniglot` next to the repository root and next
    to the current working directory. The first directory holding all the
    requested archives wins. If none does, the missing archives are
    downloaded into the first TFDS manual dir (see `download`); with
    downloads off, the first directory holding some of them is returned
    (preparing then reports which one is missing).

    Downloads show their progress on stderr, are checked against
    `OFFICIAL_ARCHIVES` (size and SHA-256; `$MTL_KERAS_OMNIGLOT_CHECKSUMS`
    overrides them), and are written to a temporary file renamed into place
    only once verified, so an interrupted download never leaves a file under
    the archive's name. There is no retry: a failure raises at once.

    Args:
        data_dir: the directory holding the archives; default: search.
        archives: `"full"` (`images_background.zip`, `images_evaluation.zip`),
            `"small"` (`images_background_small1.zip`, `..._small2.zip`), or
            a sequence of zip file names.
        tfds_dir: a TFDS data dir whose `downloads/manual` is searched first
            among the TFDS dirs, and downloaded into.
        download: download the archives when no directory has them, from
            `OMNIGLOT_URL` (or `$MTL_KERAS_OMNIGLOT_URL`). `False`, or
            `$MTL_KERAS_NO_DOWNLOAD=1` whatever this says, forbids it.

    Returns:
        The directory, as an absolute `pathlib.Path`.

    Raises:
        OmniglotNotFoundError: `data_dir` missing or without the archives;
            or nothing found and downloads off. The message lists the places
            searched, what to download and how to enable downloading.
        OmniglotDownloadError: the download failed (offline, HTTP error,
            truncated, wrong size or checksum). The message names the URL,
            the folder to put the files in by hand, and how to stop
            downloading.

    Example:

    >>> find_omniglot_dir()
    PosixPath('/.../shared/data/omniglot')
    """
    names = _archive_names(archives)
    candidates = _candidate_dirs(tfds_dir)
    if data_dir is not None:
        return _given_dir(data_dir, names, candidates)
    complete, partial = _search(names, candidates)
    if complete is not None:
        return complete
    refusal = _download_refusal(download)
    if refusal is None:
        target = _normalised(_tfds_manual_dirs(tfds_dir)[0])
        _download_archives(names, target, candidates)
        return target
    if partial is not None:
        return partial
    raise OmniglotNotFoundError(_not_found_message(names, candidates, refusal))


# --------------------------------------------------------------------------
# Downloading.
# --------------------------------------------------------------------------

# A server that sends nothing for this long counts as unreachable.
_DOWNLOAD_TIMEOUT_SECONDS = 60
_CHUNK_BYTES = 1 << 16
# Temporary files of downloads killed this long ago are removed; younger ones
# may belong to a download running in another process.
_STALE_PART_SECONDS = 3600
_MIRROR_HINT = (
    "(A mirror whose archives are packed differently needs their sizes and SHA-256s in "
    f"the file named by ${OMNIGLOT_CHECKSUMS_ENV}.)"
)


def _expected_archives():
    """Archive name -> (size, SHA-256): `OFFICIAL_ARCHIVES`, overridden by
    the file named in `$MTL_KERAS_OMNIGLOT_CHECKSUMS`."""
    expected = dict(OFFICIAL_ARCHIVES)
    path = os.environ.get(OMNIGLOT_CHECKSUMS_ENV)
    if not path:
        return expected
    try:
        lines = pathlib.Path(path).expanduser().read_text().splitlines()
    except OSError as e:
        raise ValueError(f"${OMNIGLOT_CHECKSUMS_ENV}={path} cannot be read: {e}") from e
    for number, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        valid = len(fields) in (3, 4) and fields[1].isdigit()
        valid = valid and re.fullmatch(r"[0-9a-fA-F]{64}", fields[2]) is not None
        if not valid:
            raise ValueError(
                f"${OMNIGLOT_CHECKSUMS_ENV}={path}, line {number}: expected "
                f"'NAME_OR_URL SIZE SHA256 [NAME]', got {line!r}."
            )
        name = fields[3] if len(fields) == 4 else fields[0].rstrip("/").rsplit("/", 1)[-1]
        expected[name] = (int(fields[1]), fields[2].lower())
    return expected


class _Progress:
    """Bytes received / total of one download, on stderr.

    On a terminal the line is redrawn in place; otherwise (a log file) a new
    line is written at every tenth, so the log stays short and readable.
    """

    _BAR = 30

    def __init__(self, name, total):
        self._name, self._total = name, total
        self._stream = sys.stderr
        isatty = getattr(self._stream, "isatty", None)
        self._tty = bool(isatty and isatty())
        self._shown = -1  # last tenth written (log mode)
        self._drawn_at = 0.0  # last redraw (terminal mode)

    def _line(self, done):
        fraction = min(done / self._total, 1.0) if self._total else 0.0
        filled = int(fraction * self._BAR)
        return (
            f"{self._name}: [{'#' * filled}{'.' * (self._BAR - filled)}] "
            f"{done / 1e6:.1f}/{self._total / 1e6:.1f} MB {fraction:4.0%}"
        )

    def update(self, done, final=False):
        if self._tty:
            now = time.monotonic()
            if final or now - self._drawn_at >= 0.2:
                self._drawn_at = now
                self._stream.write("\r" + self._line(done) + ("\n" if final else ""))
                self._stream.flush()
            return
        tenth = min(10 * done // self._total, 10) if self._total else 0
        if tenth > self._shown or (final and done != self._total):
            self._shown = tenth
            self._stream.write(self._line(done) + "\n")
            self._stream.flush()


def _part_prefix(name):
    # Host and process id in the name tell a download killed on this host
    # (removable at once) from one still running, here or on another host
    # sharing the folder.
    return f".{name}.{socket.gethostname()}.{os.getpid()}."


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # Someone else's process, or not a pid: leave it alone.
    return True


def _remove_stale_parts(target, name):
    """Removes what killed downloads of `name` left in `target`."""
    host = socket.gethostname()
    for part in target.glob(f".{name}.*.part"):
        # `<host>.<pid>.<random>.part`; the host name may hold dots.
        fields = part.name[len(f".{name}.") :].split(".")
        killed_here = (
            len(fields) >= 4
            and ".".join(fields[:-3]) == host
            and fields[-3].isdigit()
            and not _process_alive(int(fields[-3]))
        )
        try:
            if killed_here or time.time() - part.stat().st_mtime > _STALE_PART_SECONDS:
                part.unlink()
        except OSError:
            pass  # Gone already, or not ours to remove: harmless either way.


def _download_archives(names, target, candidates=()):
    """Downloads the archives missing from `target`, each verified, atomically."""
    expected = _expected_archives()
    missing = [name for name in names if not (target / name).is_file()]
    unknown = [name for name in missing if name not in expected]
    if unknown:
        raise OmniglotDownloadError(
            f"No known size and SHA-256 for {', '.join(unknown)}, so it cannot be verified "
            f"and is not downloaded; list it in the file named by ${OMNIGLOT_CHECKSUMS_ENV}.\n"
            + _local_files_help(target)
        )
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OmniglotDownloadError(
            f"Cannot create {target} to download the Omniglot archives into: {e}.\n"
            + _local_files_help(target)
        ) from e
    for name in missing:
        _remove_stale_parts(target, name)
        try:
            _download_one(name, target, *expected[name])
        except OmniglotDownloadError as e:
            searched = f"\nSearched before downloading:\n{_searched_list(candidates)}"
            raise OmniglotDownloadError(
                f"{e}\nNothing was kept under {target / name}, and there is no retry. "
                f"The archives are\n{_url_list(names)}\n"
                + _local_files_help(target)
                + (searched if candidates else "")
            ) from e


def _download_one(name, target, size, sha256):
    url = _base_url() + name
    dest = target / name
    print(f"Downloading {url} to {dest} ({size:,} bytes)", file=sys.stderr, flush=True)
    try:
        response = urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_SECONDS)
    except urllib.error.HTTPError as e:
        raise OmniglotDownloadError(f"Could not download {url}: HTTP {e.code} {e.reason}.") from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        raise OmniglotDownloadError(
            f"Could not download {url}: cannot reach the server ({reason}). Offline?"
        ) from e
    # A unique temporary name in the same folder: the rename below is atomic,
    # and two processes downloading at once never write the same file.
    try:
        fd, tmp = tempfile.mkstemp(dir=target, prefix=_part_prefix(name), suffix=".part")
    except OSError as e:
        response.close()
        raise OmniglotDownloadError(f"Cannot write into {target}: {e}.") from e
    tmp = pathlib.Path(tmp)
    try:
        with response, os.fdopen(fd, "wb") as f:
            announced = response.headers.get("Content-Length")
            announced = int(announced) if announced and announced.isdigit() else None
            progress = _Progress(name, announced or size)
            digest, received = hashlib.sha256(), 0
            while True:
                try:
                    chunk = response.read(_CHUNK_BYTES)
                except (http.client.HTTPException, OSError) as e:
                    raise OmniglotDownloadError(
                        f"Download of {url} broke off after {received:,} bytes ({e!r})."
                    ) from e
                if not chunk:
                    break
                received += len(chunk)
                if received > size:
                    raise OmniglotDownloadError(
                        f"{url} sent more than the {size:,} bytes of the expected {name}; "
                        f"it is not that archive. {_MIRROR_HINT}"
                    )
                try:
                    f.write(chunk)
                except OSError as e:  # Disk full, quota: say where, not just errno.
                    raise OmniglotDownloadError(f"Cannot write {tmp}: {e}.") from e
                digest.update(chunk)
                progress.update(received)
            progress.update(received, final=True)
            try:
                # On disk before the rename makes it visible under its real name.
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                raise OmniglotDownloadError(f"Cannot write {tmp}: {e}.") from e
        if announced is not None and received < announced:
            raise OmniglotDownloadError(
                f"Download of {url} was truncated: the connection closed after {received:,} "
                f"of {announced:,} bytes."
            )
        if received != size:
            raise OmniglotDownloadError(
                f"{url} sent {received:,} bytes; the expected {name} has {size:,}. {_MIRROR_HINT}"
            )
        if digest.hexdigest() != sha256:
            raise OmniglotDownloadError(
                f"{url} has SHA-256 {digest.hexdigest()}; the expected {name} has {sha256}. "
                + _MIRROR_HINT
            )
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------
# Reading and validating the archives.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Image:
    """One PNG inside an archive."""

    archive: pathlib.Path
    member: str
    alphabet: str
    character: int  # 0-based
    drawer: int  # 1-based
    crc: int  # CRC-32 of the PNG bytes, from the zip directory


def _archive_error(path, problem):
    name = path.name
    return OmniglotArchiveError(
        f"Omniglot archive {path} is corrupt or not the official one: {problem}. "
        f"Delete it and download it again from {_base_url()}{name} (without data_dir, "
        "an archive found nowhere is downloaded automatically)."
    )


def _content_key(index):
    """A short hash of what the builder reads: member names and CRC-32s.

    Taken from the zip directories (no image bytes read), so it is fast, and
    it does not change when the same images are packed into other zip bytes.
    """
    digest = hashlib.sha256()
    for alphabet in sorted(index):
        for image in index[alphabet]:
            digest.update(f"{image.member}\t{image.crc:08x}\n".encode())
    return digest.hexdigest()[:16]


def _index_archive(path):
    """Lists and checks one archive's images.

    Returns `{alphabet: ([_Image], fingerprint)}`, images in character, then
    drawer order.

    Reads only the zip's directory (no image bytes), so it is fast.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise _archive_error(path, f"cannot read it as a zip file ({e})") from e
    top = path.name[: -len(".zip")] if path.name.endswith(".zip") else path.stem
    # characters[alphabet][character_number] = {drawer: (member, crc)}
    characters = {}
    for info in infos:
        if info.is_dir() or not info.filename.endswith(".png"):
            continue
        match = _MEMBER_RE.match(info.filename)
        if match is None or match.group(1) != top:
            raise _archive_error(
                path,
                f"unexpected entry {info.filename!r}; expected "
                f"'{top}/<Alphabet>/characterNN/XXXX_YY.png'",
            )
        alphabet, number, drawer = match.group(2), int(match.group(3)), int(match.group(5))
        drawings = characters.setdefault(alphabet, {}).setdefault(number, {})
        if not 1 <= drawer <= DRAWERS_PER_CHARACTER or drawer in drawings:
            raise _archive_error(path, f"unexpected or repeated drawer in {info.filename!r}")
        drawings[drawer] = (info.filename, info.CRC)
    if not characters:
        raise _archive_error(path, f"it has no '{top}/<Alphabet>/characterNN/*.png' images")
    index = {}
    for alphabet, chars in characters.items():
        numbers = sorted(chars)
        if numbers != list(range(1, len(numbers) + 1)):
            raise _archive_error(
                path, f"{alphabet}: character folders are not numbered 1..{len(numbers)}"
            )
        images, fingerprint = [], set()
        for number in numbers:
            if len(chars[number]) != DRAWERS_PER_CHARACTER:
                raise _archive_error(
                    path,
                    f"{alphabet}/character{number:02d} has {len(chars[number])} drawings, "
                    f"expected {DRAWERS_PER_CHARACTER}",
                )
            for drawer, (member, crc) in sorted(chars[number].items()):
                images.append(_Image(path, member, alphabet, number - 1, drawer, crc))
                fingerprint.add((number, drawer, crc))
        # The fingerprint (CRCs from the zip directory) tells whether an
        # alphabet found in two archives is the same data, without reading it.
        index[alphabet] = (images, fingerprint)
    return index


def _index_archives(paths, expected_alphabets):
    """Indexes several archives into `{alphabet: [_Image]}`, checked against
    the expected alphabets and character counts.

    An alphabet found in two archives (Greek and Latin are in both small
    ones) is taken from the first, provided the copies are identical.
    """
    merged, fingerprints = {}, {}
    for path in paths:
        for alphabet, (images, fingerprint) in _index_archive(path).items():
            if alphabet in merged:
                if fingerprint != fingerprints[alphabet]:
                    other = merged[alphabet][0].archive
                    raise _archive_error(path, f"alphabet {alphabet} differs from its copy in {other}")
                continue
            merged[alphabet], fingerprints[alphabet] = images, fingerprint
    problems = []
    missing = [a for a in expected_alphabets if a not in merged]
    if missing:
        problems.append(f"missing alphabets {missing}")
    extra = sorted(set(merged) - set(expected_alphabets))
    if extra:
        problems.append(f"unexpected alphabets {extra}")
    for alphabet in expected_alphabets:
        if alphabet in merged:
            n = len(merged[alphabet]) // DRAWERS_PER_CHARACTER
            if n != ALPHABET_NUM_CHARACTERS[alphabet]:
                problems.append(
                    f"{alphabet} has {n} characters, expected {ALPHABET_NUM_CHARACTERS[alphabet]}"
                )
    if problems:
        names = ", ".join(str(p) for p in paths)
        raise OmniglotArchiveError(
            f"Omniglot archives {names} do not hold the expected images: {'; '.join(problems)}. "
            f"Download the official archives again from {OMNIGLOT_URL}."
        )
    return {a: merged[a] for a in expected_alphabets}


def _inverted_png(data, path, member):
    """Decodes one Omniglot PNG and re-encodes it with ink = 255, paper = 0.

    The originals are 1-bit, black strokes on white. Inverting makes the
    background 0, which is what convolutions and zero padding expect; the
    result is written as a 1-bit PNG again, so it stays small.
    """
    from PIL import Image  # Pillow ships with TFDS's image support.

    try:
        with Image.open(io.BytesIO(data)) as img:
            pixels = np.asarray(img.convert("L"))
    except Exception as e:
        raise _archive_error(path, f"{member} is not a readable PNG ({e})") from e
    if pixels.shape != IMAGE_SHAPE[:2]:
        raise _archive_error(path, f"{member} is {pixels.shape}, expected {IMAGE_SHAPE[:2]}")
    out = io.BytesIO()
    Image.fromarray(255 - pixels).convert("1").save(out, format="PNG")
    return out.getvalue()


def serving_preprocessing(image_size=32):
    """How `load_omniglot(image_size=...)` makes its images from an archive PNG, for an export.

    The same steps as preparation (`_inverted_png`: to 8-bit grayscale, then
    `255 - pixels`) and `load_omniglot`'s pipeline (to float32 in [0, 1];
    when the size is not 105, bilinear resize with antialiasing, clipped to
    [0, 1]). An archive PNG given to an export's bytes signature therefore
    becomes the image training saw (tests/test_export_bytes.py checks it).
    The 1-bit re-encoding of preparation changes nothing on the archive's
    1-bit images; grey levels of other files are kept, not dithered.

    Args:
        image_size: the `image_size` the model was trained with.

    Returns:
        An `ImagePreprocessing`.

    Example:

    >>> export_for_serving(model, "saved_models/omniglot", preprocessing=serving_preprocessing(32))
    """
    size = _positive_int("image_size", image_size)
    return ImagePreprocessing(height=size, width=size, channels=IMAGE_SHAPE[2], invert=True,
                              resize_method="bilinear", antialias=True, background=255)


# --------------------------------------------------------------------------
# The TFDS builder.
# --------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class OmniglotAlphabetsConfig(tfds.core.BuilderConfig):
    """Which archives an `OmniglotAlphabets` dataset is built from.

    Each config is prepared into its own directory
    (`.../omniglot_alphabets/<config name>/<version>`), so the small and full
    sets never mix.

    Args:
        archives: zip file names read, in order.
        alphabets: the alphabets they hold, in task-id / ClassLabel order.
    """

    archives: tuple = ()
    alphabets: tuple = ()


def _registered(name):
    # Importing this module twice (e.g. under two names) must not fail on
    # TFDS's "already registered" check.
    registry = getattr(getattr(tfds.core, "registered", None), "_DATASET_REGISTRY", {})
    return name in registry


# Prepared datasets live in `<tfds_dir>/<this>/<content key>/`, a TFDS data
# dir of their own, so the usual `omniglot_alphabets/<config>/<version>`
# layout sits below the key.
_PREPARED_SUBDIR = "omniglot_alphabets_by_archives"
_DATASET_NAME = "omniglot_alphabets"


def _keyed_data_dir(tfds_root, key):
    return tfds_root / _PREPARED_SUBDIR / key


def _prepared_datasets(tfds_root, config_name):
    """`[(key, dataset dir)]` of the datasets fully prepared in `tfds_root`."""
    version = OmniglotAlphabets.VERSION
    pattern = f"*/{_DATASET_NAME}/{config_name}/{version}/dataset_info.json"
    found = sorted((tfds_root / _PREPARED_SUBDIR).glob(pattern))
    return [(info.parts[-5], info.parent) for info in found]


def _prepared_source(dataset_dir):
    """Where a prepared dataset came from, for messages."""
    try:
        metadata = json.loads((dataset_dir / "metadata.json").read_text())
        return f"from {', '.join(metadata['archives'])} on {metadata['prepared_at']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "from unrecorded archives"


def _locate_archives(config, archive_dir, tfds_dir, download):
    """`(directory, content key)` of the archives a builder is made from.

    Without `archive_dir` and with no archives in the usual places, a dataset
    already prepared in the TFDS dir is used as it is (`directory` None):
    the archives are not needed once prepared, and nothing is downloaded.
    """
    names = tuple(config.archives)
    if archive_dir is not None:
        directory = find_omniglot_dir(archive_dir, archives=names, tfds_dir=tfds_dir)
    else:
        directory, _ = _search(names, _candidate_dirs(tfds_dir))
        if directory is None:
            root = _tfds_root(tfds_dir)
            prepared = _prepared_datasets(root, config.name)
            if len(prepared) == 1:
                key, dataset_dir = prepared[0]
                logger.info(
                    "Omniglot archives not found; using the dataset prepared in %s (%s).",
                    dataset_dir,
                    _prepared_source(dataset_dir),
                )
                return None, key
            if len(prepared) > 1:
                listing = "\n".join(f"  - {d}  ({_prepared_source(d)})" for _, d in prepared)
                raise OmniglotNotFoundError(
                    f"The Omniglot archives of the {config.name!r} set are not found, and "
                    f"{root} holds datasets prepared from {len(prepared)} different sets of "
                    f"archives:\n{listing}\nPass data_dir (--data-dir) = the folder of the "
                    "archives to use, or delete the prepared datasets you do not want."
                )
            directory = find_omniglot_dir(archives=names, tfds_dir=tfds_dir, download=download)
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        given = archive_dir is not None
        refusal = None if given else _download_refusal(download)
        raise OmniglotNotFoundError(
            f"Omniglot archive(s) {', '.join(missing)} not found in "
            f"{'data_dir=' if given else ''}{directory}; the {config.name!r} set needs all of "
            f"{', '.join(names)}. Download the missing one(s) from\n{_url_list(missing)}\n"
            "and put them there"
            + (
                ", or leave data_dir / --data-dir out to search the usual places and "
                "download the archives when none has them."
                if given
                else f" ({refusal}; download=True with ${NO_DOWNLOAD_ENV} unset fetches them)."
            )
        )
    index = _index_archives([directory / name for name in names], config.alphabets)
    return directory, _content_key(index)


class OmniglotAlphabets(
    tfds.core.GeneratorBasedBuilder, skip_registration=_registered(_DATASET_NAME)
):
    """TFDS builder for Omniglot by alphabet, read from the zip archives.

    Configs: `"full"` (default; `images_background.zip` +
    `images_evaluation.zip`, 50 alphabets, 32,460 images) and `"small"`
    (`images_background_small1.zip` + `..._small2.zip`, 8 alphabets, 4,840
    images). The archives are read in place with `zipfile`.

    The prepared data goes to `<data_dir>/omniglot_alphabets_by_archives/
    <key>/omniglot_alphabets/<config>/<version>`, where `key` is a short hash
    of the archives' content (member names and CRC-32s from their zip
    directories, which does not depend on how they were packed). So the
    builder finds its archives when it is created: `archive_dir` if given
    (used as it is), else the usual places (`find_omniglot_dir`); else a
    dataset prepared earlier in `data_dir` is used; else the archives are
    downloaded, unless `download=False` or `$MTL_KERAS_NO_DOWNLOAD` is set.

    Features: `image` (uint8 `(105, 105, 1)`, ink 255 on 0), `alphabet`
    (ClassLabel, names in `ALPHABETS` order), `character` (int64, 0-based
    index in the alphabet, in `characterNN` order), `drawer` (int64, 1-20)
    and `filename` (path inside the archive). Splits: `SPLIT_DRAWERS`.
    `info.metadata` records the content key, the archives' paths and when
    they were prepared.

    Args:
        archive_dir: directory holding the zips; default: search for it.
        download: download the archives when they are found nowhere and
            nothing is prepared.
        archives_key: the content key when already known (TFDS re-creates
            builders from their state with it); default: computed.
        **kwargs: passed to `tfds.core.GeneratorBasedBuilder`, e.g.
            `config="small"`, `data_dir=` (the TFDS data dir).

    Raises:
        OmniglotNotFoundError: no archives (and nothing prepared to use).
        OmniglotArchiveError: an archive is corrupt or not an Omniglot one.

    Example:

    >>> builder = OmniglotAlphabets(config="small", data_dir="/tmp/tfds")
    >>> builder.download_and_prepare(download_config=OmniglotAlphabets.download_config())
    >>> builder.as_dataset(split="train")
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: one alphabet per task, split by drawer."}
    BUILDER_CONFIGS = [
        OmniglotAlphabetsConfig(
            name=name,
            description=f"Alphabets of {' + '.join(ARCHIVE_SETS[name])}.",
            archives=ARCHIVE_SETS[name],
            alphabets=_CONFIG_ALPHABETS[name],
        )
        for name in ("full", "small")
    ]
    DEFAULT_CONFIG_NAME = "full"
    # TFDS derives `code_path` (where it looks for a `checksums.tsv`) through
    # the `importlib_resources` backport, which TFDS 4.9.10 only declares as a
    # dependency for Python < 3.9. Telling it the path directly avoids the
    # import; there is no checksums file, the archives are verified here.
    code_path = tfds.core.Path(__file__)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download {', '.join(ARCHIVE_SETS['full'])} from {OMNIGLOT_URL} and put them in "
        f"the manual dir, or set {OMNIGLOT_DIR_ENV}."
    )

    def __init__(self, *, archive_dir=None, download=True, archives_key=None, **kwargs):
        config = self._named_config(kwargs.get("config"))
        tfds_dir = kwargs.get("data_dir")
        if archives_key is None:
            archive_dir, archives_key = _locate_archives(config, archive_dir, tfds_dir, download)
        self._archive_dir = archive_dir
        self._archives_key = archives_key
        self._tfds_dir = tfds_dir
        root = _tfds_root(tfds_dir)
        super().__init__(**dict(kwargs, data_dir=os.fspath(_keyed_data_dir(root, archives_key))))
        # TFDS re-creates builders from `_original_state` when unpickling;
        # with the key known, that finds the same data without the archives.
        self._original_state = dict(
            self._original_state,
            data_dir=os.fspath(root),
            archive_dir=archive_dir,
            download=download,
            archives_key=archives_key,
        )

    @classmethod
    def _named_config(cls, config):
        if isinstance(config, tfds.core.BuilderConfig):
            return config
        configs = {c.name: c for c in cls.BUILDER_CONFIGS}
        name = config or cls.DEFAULT_CONFIG_NAME
        if name not in configs:
            raise ValueError(f"Unknown config {name!r} of {_DATASET_NAME}; use one of {sorted(configs)}.")
        return configs[name]

    @property
    def archives_key(self):
        """The content key of the archives this dataset is (to be) prepared from."""
        return self._archives_key

    @staticmethod
    def download_config():
        """A `DownloadConfig` that keeps TFDS off the network.

        TFDS must not look for a pre-built copy on GCS; the archives are
        found, or downloaded and verified, by this module.
        """
        return tfds.download.DownloadConfig(try_download_gcs=False)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Omniglot handwritten characters as a many-task problem: one task per "
                "alphabet, one class per character; split by drawer "
                f"(train {SPLIT_DRAWERS['train'][0]}-{SPLIT_DRAWERS['train'][-1]}, "
                f"validation {SPLIT_DRAWERS['validation'][0]}-{SPLIT_DRAWERS['validation'][-1]}, "
                f"test {SPLIT_DRAWERS['test'][0]}-{SPLIT_DRAWERS['test'][-1]})."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=IMAGE_SHAPE, dtype=np.uint8, encoding_format="png"
                    ),
                    "alphabet": tfds.features.ClassLabel(names=self.builder_config.alphabets),
                    "character": np.int64,
                    "drawer": np.int64,
                    "filename": tfds.features.Text(),
                }
            ),
            homepage="https://github.com/brendenlake/omniglot",
            citation=_CITATION,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # The archives were found (or downloaded) when the builder was made.
        names = self.builder_config.archives
        if self._archive_dir is None:
            # Chosen because it was prepared, so it is only generated again if
            # its files vanished since.
            raise OmniglotNotFoundError(
                f"The dataset prepared in {self.data_path} is incomplete and the Omniglot "
                f"archives {', '.join(names)} are not found. Pass data_dir (--data-dir) = "
                "their folder, or let them be downloaded."
            )
        paths = [self._archive_dir / name for name in names]
        index = _index_archives(paths, self.builder_config.alphabets)
        key = _content_key(index)
        if key != self._archives_key:
            raise OmniglotArchiveError(
                f"The Omniglot archives in {self._archive_dir} changed after this builder was "
                f"made (content key {key}, expected {self._archives_key}); run again."
            )
        self.info.metadata.update(
            archives_key=key,
            archives=[os.fspath(p) for p in paths],
            prepared_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        images = [image for alphabet in self.builder_config.alphabets for image in index[alphabet]]
        return {
            split: self._generate_examples(images=images, drawers=drawers)
            for split, drawers in SPLIT_DRAWERS.items()
        }

    def _generate_examples(self, images, drawers):
        drawers = set(drawers)
        open_zips = {}
        try:
            for image in images:
                if image.drawer not in drawers:
                    continue
                zf = open_zips.get(image.archive)
                if zf is None:
                    zf = open_zips[image.archive] = zipfile.ZipFile(image.archive)
                try:
                    data = zf.read(image.member)
                except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as e:
                    raise _archive_error(image.archive, f"cannot read {image.member} ({e})") from e
                # Keys do not depend on which archive an image came from.
                key = f"{image.alphabet}/{image.character:03d}/{image.drawer:02d}"
                yield key, {
                    "image": _inverted_png(data, image.archive, image.member),
                    "alphabet": image.alphabet,
                    "character": image.character,
                    "drawer": image.drawer,
                    "filename": image.member,
                }
        finally:
            for zf in open_zips.values():
                zf.close()


def omniglot_builder(
    data_dir=None, *, archives="full", tfds_dir=None, prepare=True, download=True
):
    """Returns the `OmniglotAlphabets` builder, prepared unless `prepare=False`.

    Preparing happens once per TFDS data dir, config and archives' content
    (see `OmniglotAlphabets`): the same archives, wherever they are, reuse
    what was prepared; others are prepared afresh, beside it. The archives
    are still looked for (their zip directories key the prepared data); when
    they are found nowhere, a dataset prepared earlier is used as it is.

    Args:
        data_dir: directory holding the zip archives, used as it is (an
            error if it lacks them); default: search (see
            `find_omniglot_dir`).
        archives: `"full"` or `"small"`: the builder config.
        tfds_dir: TFDS data dir to prepare into; default `$TFDS_DATA_DIR` or
            `~/tensorflow_datasets`.
        prepare: run `download_and_prepare()` (a no-op when prepared).
            `False` also means no download.
        download: download the official archives when they are found
            nowhere and nothing is prepared; `$MTL_KERAS_NO_DOWNLOAD=1`
            forbids it whatever this says.

    Returns:
        The `OmniglotAlphabets` builder.

    Raises:
        OmniglotNotFoundError: no archives and nothing prepared to use
            (`OmniglotDownloadError` when downloading them failed).
        OmniglotArchiveError: an archive is corrupt or not an Omniglot one.

    Example:

    >>> builder = omniglot_builder(archives="small", tfds_dir="/tmp/tfds")
    >>> builder.info.splits["train"].num_examples
    3388
    """
    _check_archives(archives)
    builder = OmniglotAlphabets(
        config=archives,
        data_dir=None if tfds_dir is None else os.fspath(tfds_dir),
        archive_dir=data_dir,
        download=download and prepare,
    )
    if prepare:
        builder.download_and_prepare(download_config=OmniglotAlphabets.download_config())
    return builder


# --------------------------------------------------------------------------
# Tasks and the tf.data pipeline.
# --------------------------------------------------------------------------


def _task_name(alphabet):
    """A valid `Task` name for an alphabet (letters, digits, `_-.()`).

    All 50 Omniglot names are already valid and kept as they are; any other
    character would be replaced by `_`, deterministically.
    """
    return "".join(c if (c.isalnum() or c in "_-.()") else "_" for c in alphabet)


def _check_archives(archives):
    if not isinstance(archives, str) or archives not in _CONFIG_ALPHABETS:
        raise ValueError(f"archives must be one of {sorted(_CONFIG_ALPHABETS)}, got {archives!r}.")


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _select_alphabets(tasks, archives="full"):
    _check_archives(archives)
    available = _CONFIG_ALPHABETS[archives]
    if tasks is None:
        return available
    if _is_int(tasks):
        if not 1 <= tasks <= len(available):
            raise ValueError(
                f"tasks={tasks} is out of range: the {archives!r} archives have "
                f"{len(available)} alphabets; use 1 to {len(available)}, a list of alphabet "
                "names, or None for all."
            )
        return available[: int(tasks)]
    if isinstance(tasks, str):
        tasks = [tasks]
    if not hasattr(tasks, "__iter__"):
        raise ValueError(
            f"tasks must be None, an int from 1 to {len(available)} or a list of alphabet "
            f"names; got {tasks!r}."
        )
    # Also accepts `Task`s (e.g. a `TaskSet` from an earlier run), by name.
    selected = tuple(getattr(t, "name", t) for t in tasks)
    unknown = [a for a in selected if a not in available]
    if unknown:
        raise ValueError(
            f"Unknown alphabets {unknown} in tasks for archives={archives!r}; choose from "
            f"{list(available)}."
        )
    if len(set(selected)) != len(selected):
        raise ValueError(f"Alphabets repeated in tasks={list(selected)}.")
    if not selected:
        raise ValueError(
            f"tasks must select at least one alphabet; choose from {list(available)}."
        )
    return selected


def omniglot_tasks(tasks=None, archives="full"):
    """The `TaskSet` for a selection of Omniglot alphabets, without any data.

    Args:
        tasks: None (all alphabets of `archives`), an int K (the first K in
            the fixed order), or a sequence of alphabet names or `Task`s (in
            that order).
        archives: `"full"` or `"small"`.

    Returns:
        A `TaskSet` with one multiclass `Task` per alphabet; task id order is
        the selection order.

    Example:

    >>> omniglot_tasks(2)
    TaskSet(2 tasks: Alphabet_of_the_Magi, Anglo-Saxon_Futhorc)
    """
    return TaskSet(
        Task(_task_name(a), "multiclass", ALPHABET_NUM_CHARACTERS[a])
        for a in _select_alphabets(tasks, archives)
    )


@dataclasses.dataclass
class OmniglotData:
    """What `load_omniglot` returns.

    Attributes:
        tasks: `TaskSet`, one multiclass task per selected alphabet, in task
            id order.
        train, validation, test: batched `tf.data.Dataset`s of
            `({"image": float32 [B, S, S, 1], "task": int32 [B]}, int32 [B])`.
        num_examples: split name -> number of examples (before batching).
        image_size: S.
        alphabet_names: the selected alphabets, in task id order.
    """

    tasks: TaskSet
    train: tf.data.Dataset
    validation: tf.data.Dataset
    test: tf.data.Dataset
    num_examples: dict
    image_size: int
    alphabet_names: tuple


def _positive_int(name, value):
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer (1, 2, ...); got {value!r}.")
    return int(value)


def load_omniglot(
    data_dir=None,
    tasks=None,
    image_size=32,
    batch_size=128,
    tfds_dir=None,
    archives="full",
    shuffle_buffer=10000,
    seed=0,
    cache=True,
    download=True,
    augment=None,
):
    """Loads Omniglot as one classification task per alphabet.

    Prepares the TFDS dataset on first use (reading the zips found by
    `find_omniglot_dir(data_dir)`, downloaded when found nowhere), then
    builds the input pipelines:
    filter to the selected alphabets -> decode, invert is already done,
    resize (bilinear with antialiasing) and scale to [0, 1] -> `cache()` ->
    shuffle (train only, seeded, reshuffled every epoch) -> batch ->
    augment (train only, optional) -> prefetch. Output order and
    augmentation are deterministic for a given `seed`.

    A split smaller than `batch_size` gives one smaller batch.

    Args:
        data_dir: directory with the zip archives, used as it is (an error if
            it does not exist or lacks them); default: search, then use a
            dataset prepared earlier, then download.
        tasks: None (all alphabets), an int K (the first K alphabets in the
            fixed order `ALPHABETS`), or a sequence of alphabet names; their
            order gives the task ids 0..K-1.
        image_size: output images are `image_size x image_size`.
        batch_size: batch size of all three datasets.
        tfds_dir: TFDS data dir; default `$TFDS_DATA_DIR` or
            `~/tensorflow_datasets`.
        archives: `"full"` (50 alphabets) or `"small"` (8 alphabets, for
            tests and quick runs).
        shuffle_buffer: train shuffle buffer size; 0 disables shuffling.
        seed: shuffle seed.
        cache: cache the decoded, resized images in memory (about
            `4 * image_size**2` bytes per image).
        download: download the official archives when they are found
            nowhere and nothing is prepared (`find_omniglot_dir`);
            `$MTL_KERAS_NO_DOWNLOAD=1` forbids it whatever this says.
        augment: a `mtl_keras.augmentation.RandomAffine` applied to the
            training batches (new transformations every epoch, seeded by
            `seed`); None: no augmentation.

    Returns:
        An `OmniglotData`.

    Raises:
        ValueError: a bad argument (named, with what is allowed).
        OmniglotNotFoundError: no archives (`OmniglotDownloadError`: the
            download failed).
        OmniglotArchiveError: an archive is corrupt or not an Omniglot one.

    Example:

    >>> data = load_omniglot(tasks=["Latin", "Greek"], archives="small")
    >>> data.tasks.names, data.num_examples["train"]
    (('Latin', 'Greek'), 700)
    """
    # Every argument is checked before anything is searched or prepared.
    size = _positive_int("image_size", image_size)
    batch_size = _positive_int("batch_size", batch_size)
    if not _is_int(shuffle_buffer) or shuffle_buffer < 0:
        raise ValueError(
            f"shuffle_buffer must be an integer >= 0 (0: no shuffling); got {shuffle_buffer!r}."
        )
    alphabets = _select_alphabets(tasks, archives)
    task_set = omniglot_tasks(alphabets, archives)
    builder = omniglot_builder(data_dir, archives=archives, tfds_dir=tfds_dir, download=download)

    # alphabet id (in the prepared ClassLabel) -> selected task id, or -1.
    label_names = builder.info.features["alphabet"].names
    remap = np.full(len(label_names), -1, dtype=np.int32)
    for task_id, alphabet in enumerate(alphabets):
        remap[label_names.index(alphabet)] = task_id
    remap = tf.constant(remap)

    characters = sum(ALPHABET_NUM_CHARACTERS[a] for a in alphabets)
    num_examples = {s: characters * len(d) for s, d in SPLIT_DRAWERS.items()}

    def keep(example):
        return tf.gather(remap, example["alphabet"]) >= 0

    def to_inputs(example):
        image = tf.io.decode_png(example["image"], channels=1)
        image = tf.image.convert_image_dtype(image, tf.float32)  # uint8 -> [0, 1]
        if size != IMAGE_SHAPE[0]:
            image = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
            image = tf.clip_by_value(image, 0.0, 1.0)
        image = tf.ensure_shape(image, (size, size, 1))
        task = tf.gather(remap, example["alphabet"])
        label = tf.cast(example["character"], tf.int32)
        return {"image": image, "task": task}, label

    def pipeline(split):
        ds = builder.as_dataset(
            split=split,
            shuffle_files=False,
            # Decode PNGs only for the alphabets kept.
            decoders={"image": tfds.decode.SkipDecoding()},
        )
        ds = ds.filter(keep)
        ds = ds.map(to_inputs, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if cache:
            ds = ds.cache()
        if split == "train" and shuffle_buffer:
            ds = ds.shuffle(int(shuffle_buffer), seed=seed, reshuffle_each_iteration=True)
        # The filter hides the size from tf.data; state it, so the progress
        # bar has a target from the first epoch and Keras does not warn.
        ds = ds.apply(tf.data.experimental.assert_cardinality(num_examples[split]))
        ds = ds.batch(batch_size, drop_remainder=False)
        if split == "train" and augment is not None:
            ds = augment.apply_to(ds, seed=seed)
        return ds.prefetch(tf.data.AUTOTUNE)

    return OmniglotData(
        tasks=task_set,
        train=pipeline("train"),
        validation=pipeline("validation"),
        test=pipeline("test"),
        num_examples=num_examples,
        image_size=size,
        alphabet_names=tuple(alphabets),
    )
