"""Omniglot as a many-task problem: one classification task per alphabet.

Omniglot (Lake, Salakhutdinov & Tenenbaum, 2015) has 1,623 handwritten
characters from 50 alphabets, each drawn once by 20 different people
("drawers"). Here every alphabet is one task; a task classifies the
characters of its alphabet (14 to 55 classes), so the whole set is 50 tasks
that share an input space but not their labels.

The data comes from the official zip archives (30 alphabets in
`images_background.zip`, 20 in `images_evaluation.zip`), read directly with
`zipfile` by the TFDS builder `OmniglotAlphabets` (dataset name
`omniglot_alphabets`). Nothing is downloaded unless you ask for it:
`find_omniglot_dir()` says where the archives were looked for and what to
fetch. The builder prepares the images once into a TFDS data dir; later runs
only read the prepared records.

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
import io
import logging
import os
import pathlib
import re
import urllib.request
import zipfile
import zlib

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

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


class OmniglotArchiveError(ValueError):
    """An Omniglot archive is corrupt or does not have the expected layout."""


# --------------------------------------------------------------------------
# Finding (and optionally downloading) the archives.
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


def _tfds_manual_dirs(tfds_dir=None):
    """TFDS's manual-download dirs, most specific first."""
    roots = []
    if tfds_dir is not None:
        roots.append(pathlib.Path(tfds_dir).expanduser())
    if os.environ.get("TFDS_DATA_DIR"):
        roots.append(pathlib.Path(os.environ["TFDS_DATA_DIR"]).expanduser())
    roots.append(pathlib.Path.home() / "tensorflow_datasets")
    return [root / "downloads" / "manual" for root in roots]


def _candidate_dirs(data_dir=None, tfds_dir=None):
    """Every place the archives are looked for, as `(how, path)` in order."""
    candidates = []
    if data_dir is not None:
        candidates.append(("data_dir argument", pathlib.Path(data_dir).expanduser()))
    if os.environ.get(OMNIGLOT_DIR_ENV):
        candidates.append(
            (f"${OMNIGLOT_DIR_ENV}", pathlib.Path(os.environ[OMNIGLOT_DIR_ENV]).expanduser())
        )
    for path in _tfds_manual_dirs(tfds_dir):
        candidates.append(("TFDS manual dir", path))
    candidates.append(("repository's shared data", _REPO_ROOT / _SHARED_SUBDIR))
    candidates.append(("working directory's shared data", pathlib.Path.cwd() / _SHARED_SUBDIR))
    # The same directory can be reached twice (e.g. cwd = repository root).
    seen, unique = set(), []
    for how, path in candidates:
        key = os.path.normpath(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            unique.append((how, pathlib.Path(key)))
    return unique


def _not_found_message(names, candidates, extra=""):
    searched = "\n".join(f"  - {path}  ({how})" for how, path in candidates)
    urls = "\n".join(f"  {OMNIGLOT_URL}{name}" for name in names)
    manual = _tfds_manual_dirs()[0]
    return (
        f"Omniglot archives {', '.join(names)} not found. Searched:\n{searched}\n"
        f"Download them from\n{urls}\n"
        f"and put them, unextracted, in one of the directories above (for example "
        f"{manual}), or pass --data-dir / data_dir=DIR, or set {OMNIGLOT_DIR_ENV}=DIR. "
        "find_omniglot_dir(download=True) can also fetch them when online."
        + (f"\n{extra}" if extra else "")
    )


def find_omniglot_dir(data_dir=None, *, archives="full", tfds_dir=None, download=False):
    """Returns the directory that holds the Omniglot zip archives.

    Looks, in this order, in: `data_dir`; `$MTL_KERAS_OMNIGLOT_DIR`; TFDS's
    manual-download dir (`<tfds_dir>/downloads/manual` when `tfds_dir` is
    given, `$TFDS_DATA_DIR/downloads/manual`, `~/tensorflow_datasets/
    downloads/manual`); `../shared/data/omniglot` next to the repository
    root and next to the current working directory. The first directory
    holding all the requested archives wins; failing that, the first holding
    any of them (preparing then reports which one is missing).

    Args:
        data_dir: a directory to look in first.
        archives: `"full"` (`images_background.zip`, `images_evaluation.zip`),
            `"small"` (`images_background_small1.zip`, `..._small2.zip`), or
            a sequence of zip file names.
        tfds_dir: a TFDS data dir whose `downloads/manual` is searched too.
        download: if no directory qualifies, download the archives from
            `OMNIGLOT_URL` into TFDS's manual dir. Off by default: nothing is
            fetched unless asked for.

    Returns:
        The directory, as an absolute `pathlib.Path`.

    Raises:
        OmniglotNotFoundError: nothing found (and download off or failed).
            The message lists every place searched and what to download.

    Example:

    >>> find_omniglot_dir()
    PosixPath('/.../shared/data/omniglot')
    """
    names = _archive_names(archives)
    candidates = _candidate_dirs(data_dir, tfds_dir)
    complete = partial = None
    for how, path in candidates:
        present = [name for name in names if (path / name).is_file()]
        if len(present) == len(names):
            complete = path
            break
        if present and partial is None:
            partial = path
    found = complete or partial
    if found is not None:
        if data_dir is not None and found != candidates[0][1]:
            logger.warning(
                "Omniglot archives not in data_dir=%s; using %s instead.", data_dir, found
            )
        return found
    if not download:
        raise OmniglotNotFoundError(_not_found_message(names, candidates))
    target = _tfds_manual_dirs(tfds_dir)[0]
    try:
        _download_archives(names, target)
    except Exception as e:  # Offline, proxy, HTTP error...: explain, then fail.
        raise OmniglotNotFoundError(
            _not_found_message(
                names, candidates, extra=f"Downloading into {target} failed: {e!r}"
            )
        ) from e
    return target.resolve()


def _download_archives(names, target):
    """Downloads the archives into `target`, atomically (no half-written zips)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        dest = target / name
        if dest.is_file():
            continue
        tmp = target / (name + ".incomplete")
        logger.info("Downloading %s%s to %s", OMNIGLOT_URL, name, dest)
        with urllib.request.urlopen(OMNIGLOT_URL + name, timeout=60) as response:
            with open(tmp, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
        # Do not keep an HTML error page or a truncated file under the real name.
        if not zipfile.is_zipfile(tmp):
            tmp.unlink()
            raise OmniglotArchiveError(f"{OMNIGLOT_URL}{name} did not return a zip file.")
        tmp.replace(dest)


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


def _archive_error(path, problem):
    name = path.name
    return OmniglotArchiveError(
        f"Omniglot archive {path} is corrupt or not the official one: {problem}. "
        f"Delete it and download it again from {OMNIGLOT_URL}{name}."
    )


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
                images.append(_Image(path, member, alphabet, number - 1, drawer))
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


# --------------------------------------------------------------------------
# The TFDS builder.
# --------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class OmniglotAlphabetsConfig(tfds.core.BuilderConfig):
    """Which archives an `OmniglotAlphabets` dataset is built from.

    Each config is prepared into its own directory
    (`<tfds_dir>/omniglot_alphabets/<config name>/<version>`), so the small
    and full sets never mix.

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


class OmniglotAlphabets(
    tfds.core.GeneratorBasedBuilder, skip_registration=_registered("omniglot_alphabets")
):
    """TFDS builder for Omniglot by alphabet, read from local zip archives.

    Configs: `"full"` (default; `images_background.zip` +
    `images_evaluation.zip`, 50 alphabets, 32,460 images) and `"small"`
    (`images_background_small1.zip` + `..._small2.zip`, 8 alphabets, 4,840
    images). The archives are read in place with `zipfile`; where they are
    is `archive_dir`, or else found by `find_omniglot_dir()` when (and only
    when) the dataset must be prepared.

    Features: `image` (uint8 `(105, 105, 1)`, ink 255 on 0), `alphabet`
    (ClassLabel, names in `ALPHABETS` order), `character` (int64, 0-based
    index in the alphabet, in `characterNN` order), `drawer` (int64, 1-20)
    and `filename` (path inside the archive). Splits: `SPLIT_DRAWERS`.

    Args:
        archive_dir: directory holding the zips; default: search for it.
        **kwargs: passed to `tfds.core.GeneratorBasedBuilder`, e.g.
            `config="small"`, `data_dir=` (the TFDS data dir).

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
    # import; there is no checksums file, the archives are local.
    code_path = tfds.core.Path(__file__)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download {', '.join(ARCHIVE_SETS['full'])} from {OMNIGLOT_URL} and put them in "
        f"the manual dir, or set {OMNIGLOT_DIR_ENV}."
    )

    def __init__(self, *, archive_dir=None, **kwargs):
        self._archive_dir = archive_dir
        self._tfds_dir = kwargs.get("data_dir")
        super().__init__(**kwargs)
        # TFDS re-creates builders from `_original_state` when unpickling.
        self._original_state = dict(self._original_state, archive_dir=archive_dir)

    @staticmethod
    def download_config():
        """A `DownloadConfig` that keeps TFDS off the network.

        The data is local, so TFDS must not look for a pre-built copy on GCS.
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
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Archives are local; nothing to download.
        names = self.builder_config.archives
        directory = find_omniglot_dir(self._archive_dir, archives=names, tfds_dir=self._tfds_dir)
        paths = [directory / name for name in names]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise OmniglotNotFoundError(
                _not_found_message(
                    [p.name for p in missing],
                    [("directory used", directory)],
                    extra=f"Config {self.builder_config.name!r} needs all of {list(names)}.",
                )
            )
        index = _index_archives(paths, self.builder_config.alphabets)
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


def omniglot_builder(data_dir=None, *, archives="full", tfds_dir=None, prepare=True):
    """Returns the `OmniglotAlphabets` builder, prepared unless `prepare=False`.

    Preparing happens once per TFDS data dir and config; afterwards the
    archives are not needed (nor searched for).

    Args:
        data_dir: directory holding the zip archives (see `find_omniglot_dir`).
        archives: `"full"` or `"small"`: the builder config.
        tfds_dir: TFDS data dir to prepare into; default `$TFDS_DATA_DIR` or
            `~/tensorflow_datasets`.
        prepare: run `download_and_prepare()` (a no-op when prepared).

    Returns:
        The `OmniglotAlphabets` builder.

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
):
    """Loads Omniglot as one classification task per alphabet.

    Prepares the TFDS dataset on first use (reading the zips found by
    `find_omniglot_dir(data_dir)`), then builds the input pipelines:
    filter to the selected alphabets -> decode, invert is already done,
    resize (bilinear with antialiasing) and scale to [0, 1] -> `cache()` ->
    shuffle (train only, seeded, reshuffled every epoch) -> batch ->
    prefetch. Output order is deterministic for a given `seed`.

    A split smaller than `batch_size` gives one smaller batch.

    Args:
        data_dir: directory with the zip archives; default: search.
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

    Returns:
        An `OmniglotData`.

    Raises:
        ValueError: a bad argument (named, with what is allowed).
        OmniglotNotFoundError: no archives.
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
    builder = omniglot_builder(data_dir, archives=archives, tfds_dir=tfds_dir)

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
