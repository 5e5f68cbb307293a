"""The `_small` Omniglot archives that the integration tests train on."""

from pathlib import Path

import pytest

from mtl_keras.data import omniglot

ROOT = Path(__file__).resolve().parents[1]


def small_omniglot_dir():
    """The folder of the `_small` Omniglot zips; the test fails (not skips, never downloads) without them."""
    try:
        return omniglot.find_omniglot_dir(archives="small", download=False)
    except omniglot.OmniglotNotFoundError as e:
        pytest.fail(f"the small Omniglot archives are needed for this test: {e}")
