"""Suite hygiene: the supported Pythons are the ones the pins allow; a hung test fails with its name."""

import re
import subprocess
import sys
import textwrap
from importlib.metadata import PackageNotFoundError, metadata
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _pins():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))


def test_python_requires_is_what_the_pins_need():
    ours = SpecifierSet(re.search(r'python_requires="([^"]+)"', (ROOT / "setup.py").read_text()).group(1))
    floors = {}
    for name, version in _pins().items():
        try:
            meta = metadata(name)
        except PackageNotFoundError:
            pytest.fail(f"{name}=={version} (requirements.txt) is not installed")
        assert meta["Version"] == version, f"{name} {meta['Version']} installed, {version} pinned"
        needed = SpecifierSet(meta.get("Requires-Python") or "")
        floors[name] = min((Version(f"3.{m}") for m in range(8, 20) if Version(f"3.{m}") in needed), default=None)
        assert all(Version(f"3.{m}") in needed for m in range(8, 20) if Version(f"3.{m}") in ours), \
            f"python_requires {ours} allows a Python that {name}=={version} does not ({needed})"
    lowest = min(Version(f"3.{m}") for m in range(8, 20) if Version(f"3.{m}") in ours)
    assert lowest == max(f for f in floors.values() if f), f"python_requires {ours} is stricter than the pins need"
    assert Version(f"{sys.version_info.major}.{sys.version_info.minor}") in ours


@pytest.mark.parametrize("workers", ["xdist", "one process"])
def test_a_hung_test_fails_with_its_name(tmp_path, workers):
    (tmp_path / "test_hang.py").write_text(textwrap.dedent("""
        import threading

        def test_waits_forever():
            threading.Event().wait()
    """))
    (tmp_path / "test_fine.py").write_text("def test_one():\n    pass\n\ndef test_two():\n    pass\n")
    # The suite's own settings (two xdist workers), with a 3 s timeout and the
    # stack dump at 1 s instead of the suite's.
    ini = (ROOT / "pytest.ini").read_text().replace("testpaths = tests\n", "")
    ini = re.sub(r"(?m)^timeout = \d+$", "timeout = 3", ini)
    ini = re.sub(r"(?m)^faulthandler_timeout = \d+$", "faulthandler_timeout = 1", ini)
    (tmp_path / "pytest.ini").write_text(ini)
    extra = ["-n", "0"] if workers == "one process" else []
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Timeout" in out, out[-3000:]
    # The hung test's stack (faulthandler's or pytest-timeout's format) ...
    assert re.search(r'test_hang\.py", line \d+,? in test_waits_forever', out), out[-3000:]
    if workers == "xdist":
        # ... its name in the report, run once, and the other tests still run.
        assert "crashed while running 'test_hang.py::test_waits_forever'" in out, out[-3000:]
        assert re.search(r"\b1 failed, 2 passed\b", out), out[-3000:]
