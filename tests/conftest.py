"""Test set-up: quiet TensorFlow, two logical CPU devices for distribution tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# oneDNN's kernels as users get them (mtl_keras/__init__.py), pinned in the
# environment before TensorFlow loads so that this process and every process
# a test starts compute alike: tests compare a subprocess's weights with this
# process's bit for bit (tests/test_faults_resume.py), and oneDNN's kernels
# round differently from Eigen's. tests/test_layers.py checks batch norm
# with them on and off.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import tensorflow as tf  # noqa: E402

# MirroredStrategy tests need two devices; logical devices can only be set
# before TensorFlow initialises, so do it once for the whole session.
_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
except RuntimeError:
    pass


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_collective_keys():
    """Gives each test's MirroredStrategy its own collective key range.

    Two MirroredStrategy objects in one process start their collective group
    and instance keys at the same numbers, so a second strategy whose
    all-reduces have other shapes collides with the first ("Shape mismatch in
    the collective instance"). TensorFlow's own tests bump this base for the
    same reason.
    """
    for cls in (tf.distribute.MirroredStrategy, tf.distribute.experimental.MultiWorkerMirroredStrategy):
        cls._collective_key_base += 10_000
    yield
