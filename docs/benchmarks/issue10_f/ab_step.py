"""Same-process A/B of the routed T = 50 benchmark step (docs/BENCHMARKS.md, issue 10, sixth round).

Across processes this machine's step time drifts by 10-25% within minutes, so a change of a few
percent shows only when the variants step in turn in one process, on the same batches. Each variant
is the benchmark's routed model (apps/benchmark.py's "benchmark" preset: sigma 0.5, heads of 128
units) traced with one setting changed:

- base: the library as committed (FusedAdam; SameConv2D's kernel gradient as a forward convolution
  on maps of at most 64 pixels);
- keras_adam: compiled with keras.optimizers.Adam instead of FusedAdam;
- bpf: Conv2DBackpropFilter for every kernel gradient.

Usage: python docs/benchmarks/issue10_f/ab_step.py base,keras_adam,bpf [steps]
Prints each variant's median step (ms) and its ratio to the first.
"""

import json
import sys
import time

import numpy as np

import mtl_keras  # noqa: F401  (before TensorFlow: oneDNN's setting)
import keras
import tensorflow as tf
import mtl_keras.layers.same_conv as same_conv
from mtl_keras.experiments import benchmarking
from mtl_keras.presets import get_preset


def traced_step(spec, data, variant):
    keras.utils.set_random_seed(0)
    model = benchmarking.case_model(spec)
    if variant == "keras_adam":
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(data, epochs=1, steps_per_epoch=1, verbose=0, recalibrate_batch_norm=False)
    limit = same_conv.FILTER_GRADIENT_AS_CONV_MAX_PIXELS
    if variant == "bpf":
        same_conv.FILTER_GRADIENT_AS_CONV_MAX_PIXELS = 0  # read while tracing only
    step = tf.function(model.train_step)
    step(next(iter(data)))
    same_conv.FILTER_GRADIENT_AS_CONV_MAX_PIXELS = limit
    return step


def main(variants, steps=60):
    settings = benchmarking.resolve_settings(get_preset("benchmark"), num_tasks=[50], cases=["routing"])
    spec = benchmarking.case_spec(settings, "routing", 50)
    data = benchmarking.make_data(spec)
    batches = list(data.take(4))
    traced = {v: traced_step(spec, data, v) for v in variants}
    times = {v: [] for v in variants}
    for i in range(steps):
        for v, step in traced.items():
            start = time.perf_counter()
            tf.nest.map_structure(lambda x: x.numpy() if hasattr(x, "numpy") else x, step(batches[i % 4]))
            times[v].append(time.perf_counter() - start)
    medians = {v: round(float(np.median(t[5:])) * 1e3, 1) for v, t in times.items()}
    first = medians[variants[0]]
    print(json.dumps({"median_ms": medians, "ratio": {v: round(m / first, 3) for v, m in medians.items()},
                      "load_average": list(np.round(np.array(__import__("os").getloadavg()), 2))}))


if __name__ == "__main__":
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else ["base", "keras_adam", "bpf"],
         int(sys.argv[2]) if len(sys.argv) > 2 else 60)
