"""mtl-keras: many-task learning on Keras 3 (Task Routing, Selective Sharing, and more)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow turns its oneDNN kernels on by itself only on CPUs with
# AVX-512 VNNI / BF16 or AMX. Elsewhere (AMD, older Intel) they make a
# training step of a conv trunk about 1.5x faster (docs/BENCHMARKS.md,
# "Issue 10"). An environment variable read when TensorFlow loads, so this
# takes effect only if mtl_keras is imported first (the apps do); the
# user's own TF_ENABLE_ONEDNN_OPTS wins. A NaN weight can hide behind a
# finite loss with either kernel set (a max pool passes a window's finite
# values; oneDNN's fused convolution + ReLU passed some NaNs as 0 in a
# probe): `StopOnNonFiniteLoss` scans the weights at every epoch's end.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from mtl_keras.backbones import conv_backbone, routing_layers, vgg_filters  # noqa: E402
from mtl_keras.layers import SameConv2D, TaskHead, TaskHeads, TaskRouting, routing_masks  # noqa: E402
from mtl_keras.metrics import PerTaskMean  # noqa: E402
from mtl_keras.model import MultiTaskModel  # noqa: E402
# Registers the optimizers and the learning-rate schedule, so `import mtl_keras`
# is all that loading a saved model (whose optimizer holds them) needs.
from mtl_keras.fused_adam import FusedAdam  # noqa: E402
from mtl_keras.lazy_adam import LazyAdam  # noqa: E402
from mtl_keras.schedules import WarmupStableDecay  # noqa: E402
from mtl_keras.tasks import Task, TaskSet  # noqa: E402

__version__ = "0.1.0"
