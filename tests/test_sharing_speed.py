"""mtl_keras.experiments.sharing_speed: Selective Sharing's overhead and one-pass collection, on a tiny model."""

import pytest

from mtl_keras.experiments.benchmarking import FIXED_TRAINING
from mtl_keras.experiments.sharing_speed import collection_vs_naive, sharing_overhead
from mtl_keras.presets import TrainConfig

TINY = TrainConfig(image_size=8, batch_size=8, width=4, depth=1, head_units=(4,), **FIXED_TRAINING)


def test_sharing_overhead_times_both_variants_and_the_collector_alone():
    out = sharing_overhead(3, TINY, classes=3, steps=2, rounds=2)
    assert (out["num_tasks"], out["batch_size"]) == (3, 8)
    assert len(out["rounds_off"]) == len(out["rounds_on"]) == 2
    assert out["steps_per_second_off"] == max(out["rounds_off"]) and out["steps_per_second_on"] == max(out["rounds_on"])
    assert out["slowdown"] == pytest.approx(out["steps_per_second_off"] / out["steps_per_second_on"] - 1)
    assert out["collector_seconds_per_step"] > 0
    collector = out["collector_seconds_per_step"]
    assert out["collector_fraction_of_step"] == pytest.approx(collector * out["steps_per_second_off"])


def test_collection_vs_naive_gets_the_same_gradients_three_ways():
    # collection_vs_naive itself fails when the three ways disagree; here they must agree and be timed.
    out = collection_vs_naive(3, TINY, classes=3, repeats=2)
    assert out["num_tasks"] == 3
    for name in ("one_pass", "naive", "naive_persistent"):
        assert out[f"{name}_seconds"] > 0
    assert out["naive_over_one_pass"] == pytest.approx(out["naive_seconds"] / out["one_pass_seconds"])
    persistent = out["naive_persistent_seconds"]
    assert out["naive_persistent_over_one_pass"] == pytest.approx(persistent / out["one_pass_seconds"])
