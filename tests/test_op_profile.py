"""mtl_keras.experiments.op_profile and apps/profile_step.py: a real profile, read back by kind of op."""

import json

import numpy as np
import pytest
import tensorflow as tf

from apps import profile_step
from mtl_keras.experiments import op_profile


def test_op_kind_sorts_by_type_and_puts_the_optimizer_first():
    assert op_profile.op_kind("model/conv/Conv2D", "Conv2D") == "convolution"
    assert op_profile.op_kind("gradient_tape/x/MaxPoolGrad", "MaxPoolGrad") == "pooling"
    assert op_profile.op_kind("heads/GatherV2", "GatherV2") == "data movement"
    assert op_profile.op_kind("bn/Mul", "Mul") == op_profile.OTHER_KIND
    assert op_profile.op_kind("StatefulPartitionedCall/adam/Mul_3", "Mul") == op_profile.OPTIMIZER_KIND
    assert op_profile.op_kind("x/madam/Mul", "Mul") == op_profile.OTHER_KIND  # a scope that only ends in "adam"


def test_op_kind_reads_through_onednn_rewrites():
    assert op_profile.op_kind("x/Conv2DBackpropFilter", "_MklNativeConv2DBackpropFilter") == "convolution"
    assert op_profile.op_kind("x/Conv2D_3", "_MklNativePadWithConv2D") == "convolution"
    assert op_profile.op_kind("x/MatMul", "_MklFusedMatMul") == "matmul"
    assert op_profile.op_kind("x/MaxPoolGrad", "_MklMaxPoolGrad") == "pooling"
    assert op_profile.op_kind("x/MatMul", "_MklMatMul") == "matmul"
    assert op_profile.op_kind("x/bn", "_MklFusedBatchNormV3") == op_profile.OTHER_KIND


def test_a_recorded_profile_holds_the_ops_that_ran(tmp_path):
    x = tf.constant(np.random.default_rng(0).normal(size=(16, 32, 32, 8)), "float32")
    k = tf.constant(np.random.default_rng(1).normal(size=(3, 3, 8, 16)), "float32")
    w = tf.constant(np.random.default_rng(2).normal(size=(16, 64)), "float32")

    @tf.function
    def step():
        h = tf.nn.max_pool2d(tf.nn.conv2d(x, k, 1, "SAME"), 2, 2, "VALID")
        return tf.reduce_sum(tf.matmul(tf.reduce_mean(h, axis=(1, 2)), w) * 2.0)

    step()
    path, wall = op_profile.profile_calls(step, (), 3, str(tmp_path / "trace"))
    times = op_profile.op_times(path)
    types = {t for _, t in times}
    # By kind: with oneDNN on, TensorFlow runs its own kernels (`_MklNativeConv2D`).
    assert {"convolution", "pooling", "matmul"} <= {op_profile.op_kind(name, t) for name, t in times}, types
    # Only ops: not the executor's events that enclose them (counted twice otherwise).
    assert not any("::" in name or name.startswith("ExecutorState") for name, _ in times)
    summary = op_profile.summarize(times, 3, wall, top=3)
    assert sum(v["share"] for v in summary["kinds"].values()) == pytest.approx(1.0)
    assert summary["kinds"]["convolution"]["ms_per_call"] > 0 and len(summary["top_ops"]) == 3
    assert summary["wall_ms_per_call"] == pytest.approx(1e3 * wall / 3)
    with pytest.raises(ValueError, match="no TensorFlow op events"):
        op_profile.summarize({}, 1, 1.0)


def test_profile_step_app_end_to_end(tmp_path, capsys):
    profile_step.main(["--case", "plain", "--num-tasks", "3", "--batch-size", "8", "--image-size", "8", "--width",
                       "4", "--depth", "1", "--head-units", "4", "--steps", "2", "--warmup", "1",
                       "--output", str(tmp_path)])
    report = json.loads((tmp_path / "profile.json").read_text())
    kinds = report["summary"]["kinds"]
    assert {"convolution", op_profile.OPTIMIZER_KIND} <= set(kinds), kinds
    assert report["gflops_per_second"] > 0 and report["provenance"]["command"].startswith("python apps/profile_step.py")
    assert "| convolution |" in (tmp_path / "profile.md").read_text()
    with pytest.raises(SystemExit) as e:
        profile_step.main(["--case", "w:nosuch", "--output", str(tmp_path / "bad")])
    assert e.value.code == 2 and "Unknown weighting" in capsys.readouterr().err
