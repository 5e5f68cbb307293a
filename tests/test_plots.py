"""The figure modules: one headless backend, PNGs that are really written."""

import subprocess
import sys

import matplotlib
import numpy as np

from mtl_keras.plots import plot_task_bars, pyplot
from mtl_keras.sharing.plots import plot_affinity


def test_pyplot_is_headless_and_the_same_module():
    plt = pyplot()
    assert plt is pyplot() and plt.__name__ == "matplotlib.pyplot"
    assert matplotlib.get_backend().lower() == "agg"


def test_backend_picked_after_the_first_call_is_left_alone():
    # In a fresh process: the backend is global, this one must stay Agg for the others.
    code = (
        "import matplotlib\n"
        "from mtl_keras.plots import pyplot\n"
        "pyplot()\n"
        "matplotlib.use('svg')\n"
        "pyplot()\n"
        "print(matplotlib.get_backend())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().lower() == "svg"


def test_task_bars_and_affinity_write_pngs(tmp_path):
    path = plot_task_bars({"a": 0.5, "b": 0.75}, tmp_path / "bars.png", title="t", reference={"a": 0.1, "b": 0.2})
    assert path.stat().st_size > 1000
    affinity = np.array([[1.0, 0.8, -0.2], [0.8, 1.0, 0.0], [-0.2, 0.0, 1.0]])
    assert (plot_affinity(affinity, ["x", "y", "z"], tmp_path / "a.png", groups=[[0, 1], [2]])).stat().st_size > 1000
    png = plot_affinity(affinity, ["x", "y", "z"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
