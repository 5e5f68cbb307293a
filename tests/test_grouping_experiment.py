"""The planted-families grouping experiment (mtl_keras.experiments.grouping), piece by piece."""

import numpy as np
import pytest

from mtl_keras.experiments import grouping
from mtl_keras.sharing import SelectiveSharing

# Four tasks in two families, one short epoch: seconds, not minutes.
TINY = dict(families=2, family_size=2, noise=0.1, input_dim=4, examples=256, batch_size=64, lr=1e-2)


@pytest.fixture(scope="module")
def defaults():
    return SelectiveSharing(verbose=0)


def test_collect_sums_one_row_per_task():
    sums, layout, families = grouping.collect(TINY, seed=0)
    assert sums.shape[0] == 4 and sums.shape[1] == sum(int(np.prod(s)) for s in layout)
    assert sorted(families.tolist()) == [0, 0, 1, 1]
    assert np.all(np.isfinite(sums)) and np.abs(sums).sum() > 0


def test_cosine_agglomerative_finds_separated_directions():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(20), rng.standard_normal(20)
    sums = np.stack([a, a + 0.01 * rng.standard_normal(20), b, b + 0.01 * rng.standard_normal(20), a])
    labels = grouping.cosine_agglomerative(sums)
    assert labels[0] == labels[1] == labels[4] and labels[2] == labels[3] and labels[0] != labels[2]


def test_evaluate_scores_every_rule_and_baseline(defaults):
    sums, layout, families = grouping.collect(TINY, seed=0)
    out = grouping.evaluate(sums, layout, families, seed=0, defaults=defaults)
    assert set(out) == set(grouping.RULES) | set(grouping.BASELINES) | {"_affinity"}
    assert out["_affinity"].shape == (4, 4)
    for rule in grouping.RULES:
        result = out[rule]
        assert sorted(u for g in result["groups"] for u in g) == [0, 1, 2, 3]
        assert -1.0 <= result["ari"] <= 1.0 and 0.0 <= result["merged_fraction"] <= 1.0
        assert result["cross_family_fraction"] is None or 0.0 <= result["cross_family_fraction"] <= 1.0
        merged = [g for g in result["groups"] if len(g) > 1]
        assert (result["cross_family_fraction"] is None) == (not merged)
    for name in grouping.BASELINES:
        assert set(out[name]) == {"ari"} and -1.0 <= out[name]["ari"] <= 1.0


def test_summarise_means_and_fractions():
    def seed(ari, merged, cross):
        return {"similarity": {"ari": ari, "merged_fraction": merged, "cross_family_fraction": cross},
                "random": {"ari": -ari}}

    rules = grouping.summarise([seed(1.0, 0.5, None), seed(0.5, 0.25, 0.5)], names=("similarity", "random"))
    assert rules["similarity"] == {"ari_mean": 0.75, "ari_per_seed": [1.0, 0.5], "merged_fraction_mean": 0.375,
                                   "cross_family_fraction_mean": 0.5}
    assert rules["random"] == {"ari_mean": -0.75, "ari_per_seed": [-1.0, -0.5]}
    none_merged = grouping.summarise([seed(0.0, 0.0, None)], names=("similarity",))
    assert none_merged["similarity"]["cross_family_fraction_mean"] is None


def test_sweep_plans():
    grid, seeds, null = grouping.sweep_plan(quick=True)
    assert grid == {"noise": [0.25, 1.0, 2.0], "family_size": [2, 8]} and seeds == [0] and null == [12]
    grid, seeds, null = grouping.sweep_plan()
    assert set(grid) == {"noise", "family_size", "families"} and seeds == [0, 1, 2] and null == [12, 20]


def test_run_sweeps_one_point_per_value_and_a_null_problem(defaults, monkeypatch):
    monkeypatch.setattr(grouping, "sweep_plan", lambda quick: ({"noise": [0.1, 1.0]}, [0], [3]))
    lines = []
    sweeps = grouping.run_sweeps(TINY, defaults, quick=True, log=lines.append)
    assert list(sweeps) == ["noise", "null"]
    assert [p["value"] for p in sweeps["noise"]] == [0.1, 1.0]
    for point in sweeps["noise"]:
        assert set(point) == {"value", "similarity", "cosine_agglomerative", "random", "merged_fraction"}
        assert point["merged_fraction"] == point["similarity"]["merged_fraction_mean"]
    assert [p["value"] for p in sweeps["null"]] == [3] and set(sweeps["null"][0]) == {
        "value", "similarity", grouping.PREDICTIONS, "merged_fraction"}
    assert len(lines) == 3 and "sweep noise=0.1" in lines[0] and "3 unrelated tasks" in lines[2]


def test_plot_grouping_writes_a_png(tmp_path):
    rules = {"similarity": {"ari_mean": 0.9, "ari_per_seed": [0.8, 1.0]}, "random": {"ari_mean": 0.0,
                                                                                    "ari_per_seed": [0.1, -0.1]}}
    point = {"value": 0.5, "similarity": {"ari_mean": 0.9}, "cosine_agglomerative": {"ari_mean": 0.1},
             "random": {"ari_mean": 0.0}}
    sweeps = {"noise": [point], "null": [{"value": 12, "merged_fraction": 0.0}]}
    assert grouping.plot_grouping(rules, sweeps, tmp_path / "g.png").stat().st_size > 1000
    assert grouping.plot_grouping(rules, {}, tmp_path / "only.png").stat().st_size > 1000
