"""What `import mtl_keras` sets in TensorFlow's environment before TensorFlow loads, and what it leaves to the user."""

import os
import subprocess
import sys

import pytest

PROBE = ("import mtl_keras, tensorflow as tf; from tensorflow.python.util import _pywrap_util_port; "
         "print(_pywrap_util_port.IsMklEnabled())")


@pytest.mark.parametrize("setting, expected", [(None, "True"), ("0", "False")])
def test_onednn_is_on_unless_the_user_says_otherwise(setting, expected):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == expected
