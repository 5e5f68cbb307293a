"""Where a training step's time goes: TensorFlow's profiler, summed by kind of op.

`profile_calls` records a few calls of a traced function (e.g. a model's
`train_function`) with `tf.profiler.experimental`; `op_times` reads the
recorded XSpace (TensorFlow's own protobuf, no TensorBoard plugin needed)
and sums each op's duration on the executor threads; `summarize` groups
them into kinds (`op_kind`) per call.

An op's duration is wall time on the executor thread that ran it, with
the intra-op threads it used; two executor threads can run ops at once, so
the op time of a call can exceed its wall time. Shares of op time say
which kinds of work dominate; they are not a critical path.
"""

import collections
import glob
import os
import time

import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2

# Kinds of ops, by TensorFlow op type; anything else is "elementwise and reductions".
KINDS = {
    "convolution": ("Conv2D", "Conv2DBackpropFilter", "Conv2DBackpropInput", "DepthwiseConv2dNative",
                    "DepthwiseConv2dNativeBackpropFilter", "DepthwiseConv2dNativeBackpropInput", "_FusedConv2D",
                    # oneDNN's fused forms, named without their "_Mkl..." prefix.
                    "FusedConv2D", "PadWithConv2D", "PadWithFusedConv2D"),
    "matmul": ("MatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum", "_FusedMatMul", "FusedMatMul"),
    "pooling": ("MaxPool", "MaxPoolGrad", "MaxPoolV2", "MaxPoolGradV2", "AvgPool", "AvgPoolGrad"),
    "data movement": ("GatherV2", "ResourceGather", "UnsortedSegmentSum", "ScatterNd", "TensorScatterUpdate",
                      "Pack", "Unpack", "ConcatV2", "Split", "SplitV", "Tile", "Transpose", "ReverseV2", "Slice",
                      "StridedSlice", "StridedSliceGrad", "Pad", "GatherNd", "Cast"),
}
_KIND_OF_TYPE = {t: kind for kind, types in KINDS.items() for t in types}
OTHER_KIND = "elementwise and reductions"
OPTIMIZER_KIND = "optimizer update"
# Not work: the executor's own bookkeeping and variable reads.
IGNORED_TYPES = ("ReadVariableOp", "NoOp", "Identity", "_Retval", "_Arg", "Const", "Shape")
# With oneDNN on, TensorFlow rewrites ops to its own kernels under these prefixes
# (`_MklNativeConv2D` is a Conv2D); the kind is the original type's.
_ONEDNN_PREFIXES = ("_MklNative", "_Mkl")


def op_kind(name, op_type, optimizer_scope="adam/"):
    """The kind of one op: `optimizer update` for ops in the optimizer's name scope, else by type (`KINDS`)."""
    if optimizer_scope and f"/{optimizer_scope}" in f"/{name}":
        return OPTIMIZER_KIND
    for prefix in _ONEDNN_PREFIXES:
        if op_type.startswith(prefix) and op_type[len(prefix):] in _KIND_OF_TYPE:
            return _KIND_OF_TYPE[op_type[len(prefix):]]
    return _KIND_OF_TYPE.get(op_type, OTHER_KIND)


def profile_calls(fn, args, calls, logdir):
    """Runs `fn(*args)` `calls` times under TensorFlow's profiler.

    Returns:
        `(xplane_path, wall_seconds)`: the recorded XSpace file and the
        wall time of the calls.
    """
    tf.profiler.experimental.start(logdir)
    try:
        start = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        wall = time.perf_counter() - start
    finally:
        tf.profiler.experimental.stop()
    paths = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")), key=os.path.getmtime)
    if not paths:
        raise RuntimeError(f"TensorFlow's profiler wrote no .xplane.pb under {logdir}.")
    return paths[-1], wall


def op_times(xplane_path):
    """Seconds per op, summed over the executor threads of an XSpace file.

    Returns:
        `{(op_name, op_type): seconds}`.
    """
    space = xplane_pb2.XSpace()
    with open(xplane_path, "rb") as f:
        space.ParseFromString(f.read())
    totals = collections.Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU") and not plane.name.startswith("/device:"):
            continue
        metadata = plane.event_metadata
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = metadata[event.metadata_id].name
                if "::" in name:  # the executor's own events (e.g. ExecutorState::Process), which hold ops
                    continue
                # TensorFlow op events are named "<scope>/<op>:<OpType>".
                op_name, sep, op_type = name.rpartition(":")
                if not sep or not op_type or " " in op_type or op_type in IGNORED_TYPES:
                    continue
                totals[(op_name, op_type)] += event.duration_ps * 1e-12
    return dict(totals)


def summarize(times, calls, wall_seconds, top=15, optimizer_scope="adam/"):
    """Op time per call by kind, with shares, and the most expensive ops.

    Args:
        times: `op_times`' result.
        calls: how many calls the profile holds.
        wall_seconds: their wall time.
        top: how many single ops to list.

    Returns:
        A JSON-able dict: `wall_ms_per_call`, `op_ms_per_call`, `kinds`
        (`{kind: {"ms_per_call", "share"}}`, largest first) and `top_ops`.
    """
    if not times:
        raise ValueError("The profile holds no TensorFlow op events; nothing to summarize.")
    by_kind = collections.Counter()
    for (name, op_type), seconds in times.items():
        by_kind[op_kind(name, op_type, optimizer_scope)] += seconds
    total = sum(by_kind.values())
    return {
        "calls": calls,
        "wall_ms_per_call": 1e3 * wall_seconds / calls,
        "op_ms_per_call": 1e3 * total / calls,
        "kinds": {k: {"ms_per_call": 1e3 * v / calls, "share": v / total} for k, v in by_kind.most_common()},
        "top_ops": [{"op": name, "type": op_type, "kind": op_kind(name, op_type, optimizer_scope),
                     "ms_per_call": 1e3 * seconds / calls}
                    for (name, op_type), seconds in sorted(times.items(), key=lambda kv: -kv[1])[:top]],
    }
