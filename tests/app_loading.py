"""What the app and integration tests share: loading an app as a module, finding the small archives."""

import importlib.util
from pathlib import Path

import pytest

from mtl_keras.data import omniglot

ROOT = Path(__file__).resolve().parents[1]


def load_app(name):
    """`apps/<name>.py` as a module (the apps are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "apps" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_omniglot_dir():
    """The folder of the `_small` Omniglot zips; the test fails (not skips) without them."""
    try:
        return omniglot.find_omniglot_dir(archives="small")
    except omniglot.OmniglotNotFoundError as e:
        pytest.fail(f"the small Omniglot archives are needed for this test: {e}")
