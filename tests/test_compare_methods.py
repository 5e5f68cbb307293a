"""apps/compare_methods.py: configuration grammar, Δm summary, tables, STL cache."""

import csv
import json

import numpy as np
import pytest

from app_loading import load_app, small_omniglot_dir

app = load_app("compare_methods")


def test_parse_config_grammar():
    w, r = ["equal", "pcgrad", "uncertainty"], ["similarity"]
    parse = lambda name: app.parse_config(name, weightings=w, rules=r)  # noqa: E731
    assert parse("stl")["kind"] == "stl"
    assert parse("hard") == {"name": "hard", "kind": "mtl", "sigma": 1.0, "weighting": None, "sharing": None,
                             "weighting_kwargs": {}}
    assert parse("tr0.25")["sigma"] == 0.25 and parse("tr.75")["sigma"] == 0.75
    assert parse("pcgrad") == {"name": "pcgrad", "kind": "mtl", "sigma": 0.5, "weighting": "pcgrad", "sharing": None,
                               "weighting_kwargs": {}}
    every = parse("tr0.25+pcgrad:every_n_steps=8:seed=1")
    assert (every["sigma"], every["weighting"], every["weighting_kwargs"]) == (0.25, "pcgrad", {"every_n_steps": 8, "seed": 1})
    with pytest.raises(ValueError, match="bad option 'every_n_steps'"):
        parse("pcgrad:every_n_steps")
    both = parse("hard+uncertainty+similarity")
    assert (both["sigma"], both["weighting"], both["sharing"]) == (1.0, "uncertainty", "similarity")
    assert parse("tr0.5+similarity")["sharing"] == "similarity"
    assert parse("similarity:threshold=0.3:start_epoch=2")["sharing_kwargs"] == {"threshold": 0.3, "start_epoch": 2}
    with pytest.raises(ValueError, match="unknown or repeated part 'nash'"):
        parse("tr0.5+nash")
    with pytest.raises(ValueError, match="repeated part 'pcgrad'"):
        parse("pcgrad+pcgrad")
    with pytest.raises(ValueError, match="sigma must be in \\[0, 1\\]"):
        parse("tr1.5")
    with pytest.raises(ValueError, match="Selective Sharing is not available"):
        app.parse_config("tr0.5+similarity", weightings=w, rules=[])


def test_default_configs_use_the_registered_weightings():
    from mtl_keras.weighting import available_weightings

    configs, skipped = app.resolve_configs(app.DEFAULT_CONFIGS)
    names = [c["name"] for c in configs]
    assert names[0] == "stl" and "hard" in names and "tr0.5" in names
    weightings = {c["weighting"] for c in configs if c["weighting"]}
    assert weightings == {"uncertainty", "pcgrad"} <= set(available_weightings())
    assert next(c for c in configs if c["weighting"] == "pcgrad")["weighting_kwargs"] == {"every_n_steps": 10}
    assert all(name in app.DEFAULT_CONFIGS.split(",") for name in names + [s for s, _ in skipped])
    # Named explicitly, an unavailable part is an error, and STL is always added for Δm.
    with pytest.raises(ValueError):
        app.resolve_configs("hard,no_such_method")
    assert [c["name"] for c in app.resolve_configs("hard")[0]] == ["stl", "hard"]


def test_summarise_computes_delta_m_over_seed_means():
    runs = [
        {"config": "stl", "seed": 0, "test_accuracy": {"a": 0.8, "b": 0.4}, "mean_test_accuracy": 0.6,
         "parameters": 100, "wall_seconds": 10.0},
        {"config": "stl", "seed": 1, "test_accuracy": {"a": 0.8, "b": 0.4}, "mean_test_accuracy": 0.6,
         "parameters": 100, "wall_seconds": 12.0},
        {"config": "hard", "seed": 0, "test_accuracy": {"a": 0.88, "b": 0.4}, "mean_test_accuracy": 0.64,
         "parameters": 60, "wall_seconds": 5.0},
        {"config": "hard", "seed": 1, "test_accuracy": {"a": 0.8, "b": 0.48}, "mean_test_accuracy": 0.64,
         "parameters": 60, "wall_seconds": 7.0},
    ]
    rows = {r["config"]: r for r in app.summarise(runs, ["a", "b"], ["stl", "hard"])}
    assert rows["stl"]["delta_m"] == 0.0 and rows["stl"]["wall_seconds"] == 11.0
    hard = rows["hard"]
    # seed means: a 0.84 (+5%), b 0.44 (+10%) -> +7.5%; per seed: +5% and +10% -> std 2.5
    assert hard["delta_m"] == pytest.approx(7.5)
    assert hard["delta_m_std"] == pytest.approx(2.5)
    assert hard["mean_test_accuracy"] == pytest.approx(0.64) and hard["mean_test_accuracy_std"] == pytest.approx(0.0)
    assert hard["tasks_beating_stl"] == 2 and hard["parameters"] == 60


def common_args(tmp, data_dir):
    return [
        "--data-dir", str(data_dir), "--archives", "small", "--tfds-dir", str(tmp / "tfds"),
        "--tasks", "3", "--epochs", "1", "--image-size", "12", "--width", "4", "--depth", "2",
        "--head-units", "8", "--batch-size", "64", "--stl-epochs", "2", "--stl-batch-size", "64",
        "--cache-dir", str(tmp / "cache"), "--verbose", "0",
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data_dir = small_omniglot_dir()
    tmp = tmp_path_factory.mktemp("compare")
    common = common_args(tmp, data_dir)
    first = app.main(common + ["--configs", "stl,hard,tr0.5,tr0.5+similarity", "--output", str(tmp / "one")])
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp / "cache").glob("stl-*.json")}
    second = app.main(common + ["--configs", "tr0.25,pcgrad:every_n_steps=2", "--output", str(tmp / "two")])
    return tmp, first, second, mtimes


def test_app_writes_markdown_csv_png_and_json(runs):
    tmp, first, _, _ = runs
    out = tmp / "one"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == ["stl", "hard", "tr0.5", "tr0.5+similarity"]
    summary = {r["config"]: r for r in first["rows"]}
    for r in rows:
        assert float(r["mean_test_accuracy"]) == pytest.approx(summary[r["config"]]["mean_test_accuracy"], abs=1e-6)
        assert 0.0 <= float(r["mean_test_accuracy"]) <= 1.0 and int(r["parameters"]) > 0
    assert float(rows[0]["delta_m"]) == 0.0  # STL against itself
    # Δm in the table is recomputable from the per-task table.
    with open(out / "per_task.csv") as f:
        per_task = list(csv.DictReader(f))
    assert [p["task"] for p in per_task] == ["Balinese", "Early_Aramaic", "Greek"]
    hard = np.array([float(p["hard"]) for p in per_task])
    stl = np.array([float(p["stl"]) for p in per_task])
    assert float(rows[1]["delta_m"]) == pytest.approx(100 * np.mean((hard - stl) / stl), abs=1e-3)
    # One-task models: 3 STL networks have more parameters than one shared one.
    assert int(rows[0]["parameters"]) > int(rows[1]["parameters"])

    md = (out / "results.md").read_text()
    assert "| config | seeds | mean test accuracy | Δm vs STL (%)" in md
    assert "| hard | 1 |" in md and "| tr0.5 | 1 |" in md and "| Greek | 24 |" in md
    assert "--configs stl,hard,tr0.5,tr0.5+similarity" in md and "CPU cores" in md
    assert (out / "results.png").stat().st_size > 1000
    saved = json.loads((out / "results.json").read_text())
    assert {r["config"] for r in saved["runs"]} == {"stl", "hard", "tr0.5", "tr0.5+similarity"}
    sharing = next(r for r in saved["runs"] if r["config"] == "tr0.5+similarity")
    assert isinstance(sharing["task_groups"], list) and isinstance(sharing["sharing_history"], list)
    assert sharing["parameters"] <= sharing["parameters_at_start"]


def test_second_run_takes_stl_from_the_cache(runs):
    _, first, second, mtimes = runs
    stl_first = next(r for r in first["runs"] if r["config"] == "stl")
    stl_second = next(r for r in second["runs"] if r["config"] == "stl")
    assert stl_first["tasks_trained"] == 3 and stl_first["tasks_from_cache"] == 0
    assert stl_second["tasks_trained"] == 0 and stl_second["tasks_from_cache"] == 3
    assert stl_second["test_accuracy"] == stl_first["test_accuracy"]
    assert len(mtimes) == 3
    tmp = runs[0]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp / "cache").glob("stl-*.json")} == mtimes
    assert [r["config"] for r in second["rows"]] == ["stl", "tr0.25", "pcgrad:every_n_steps=2"]
    pcgrad = next(r for r in second["runs"] if r["config"] == "pcgrad:every_n_steps=2")
    assert pcgrad["weighting"]["every_n_steps"] == 2


def test_reuse_puts_earlier_runs_in_one_table_and_refuses_another_budget(runs):
    tmp, first, second, _ = runs
    common = common_args(tmp, small_omniglot_dir())
    both = app.main(common + ["--configs", "stl,hard,tr0.25,tr0.5", "--reuse", str(tmp / "one"), str(tmp / "two"),
                              "--reuse-only", "--output", str(tmp / "both")])
    assert [r["config"] for r in both["rows"]] == ["stl", "hard", "tr0.25", "tr0.5"]
    earlier = {r["config"]: r for r in first["runs"] + second["runs"]}
    for run in both["runs"]:
        assert run["test_accuracy"] == earlier[run["config"]]["test_accuracy"]  # taken, not retrained
    # A configuration no earlier run has is left out with --reuse-only.
    none = app.main(common + ["--configs", "stl,tr0.75", "--reuse", str(tmp / "one"), "--reuse-only",
                              "--output", str(tmp / "none")])
    assert [r["config"] for r in none["rows"]] == ["stl"]
    with pytest.raises(ValueError, match="another budget"):
        app.main(common + ["--epochs", "2", "--configs", "stl", "--reuse", str(tmp / "one"),
                           "--output", str(tmp / "bad")])
