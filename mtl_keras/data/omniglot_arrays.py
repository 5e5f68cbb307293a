"""Omniglot characters as NumPy arrays, for experiments that build their own labels.

`load_omniglot_arrays` reads the official zip archives (found by
`omniglot.find_omniglot_dir`, never downloading unless asked) straight into
memory: images resized to a small square, ink = 1, with each image's
character class, alphabet and drawer. Nothing is prepared on disk, so a
slice of a few thousand images loads in seconds. The grouping benchmark uses
it to plant task families on real images (`mtl_keras.sharing.planted`).

Example:

>>> arrays = load_omniglot_arrays(archives="small", image_size=20, max_characters=100)
>>> arrays.images.shape, arrays.characters.max() + 1
((2000, 20, 20, 1), 100)
"""

import dataclasses
import io
import zipfile

import numpy as np

from mtl_keras.data import omniglot


@dataclasses.dataclass
class OmniglotArrays:
    """Images and their identities.

    Attributes:
        images: `[N, S, S, 1]` float32 in [0, 1], ink = 1.
        characters: `[N]` int, a global character class in `[0, C)`.
        alphabets: `[N]` int, the alphabet's index in `alphabet_names`.
        drawers: `[N]` int, 1..20.
        alphabet_names: the alphabets read, in order.
    """

    images: np.ndarray
    characters: np.ndarray
    alphabets: np.ndarray
    drawers: np.ndarray
    alphabet_names: list


def load_omniglot_arrays(archives="small", image_size=20, max_characters=None, data_dir=None, seed=0,
                         download=False):
    """Reads Omniglot images from the archives into arrays.

    Args:
        archives: `"small"`, `"full"` or zip names (see `find_omniglot_dir`).
        image_size: side of the (square) resized images.
        max_characters: read only this many characters (all their 20
            drawings), drawn at random over all alphabets with `seed`; None
            reads every character.
        data_dir: the archives' folder (default: search).
        seed: the character draw's seed.
        download: allow downloading missing archives.

    Returns:
        An `OmniglotArrays`, characters numbered in the order read.
    """
    from PIL import Image

    folder = omniglot.find_omniglot_dir(data_dir, archives=archives, download=download)
    paths = [folder / name for name in omniglot._archive_names(archives)]
    index = {}
    for path in paths:
        for alphabet, (images, _) in omniglot._index_archive(path).items():
            index.setdefault(alphabet, images)  # an alphabet in two archives: the first copy
    names = sorted(index)
    keys = [(a, c) for a in names for c in sorted({im.character for im in index[a]})]
    if max_characters is not None and max_characters < len(keys):
        chosen = np.random.default_rng(seed).choice(len(keys), size=int(max_characters), replace=False)
        keys = [keys[i] for i in sorted(chosen)]
    wanted = {k: i for i, k in enumerate(keys)}
    rows = [(im, wanted[(im.alphabet, im.character)]) for a in names for im in index[a]
            if (im.alphabet, im.character) in wanted]
    images = np.empty((len(rows), image_size, image_size, 1), dtype=np.float32)
    opened = {}
    try:
        for i, (im, _) in enumerate(rows):
            zf = opened.get(im.archive) or opened.setdefault(im.archive, zipfile.ZipFile(im.archive))
            with Image.open(io.BytesIO(zf.read(im.member))) as img:
                # Box filter: averaging the 1-bit strokes keeps thin lines visible when shrunk.
                small = img.convert("L").resize((image_size, image_size), Image.Resampling.BOX)
            images[i, :, :, 0] = 1.0 - np.asarray(small, dtype=np.float32) / 255.0
    finally:
        for zf in opened.values():
            zf.close()
    return OmniglotArrays(
        images=images,
        characters=np.array([c for _, c in rows], dtype=int),
        alphabets=np.array([names.index(im.alphabet) for im, _ in rows], dtype=int),
        drawers=np.array([im.drawer for im, _ in rows], dtype=int),
        alphabet_names=names,
    )
