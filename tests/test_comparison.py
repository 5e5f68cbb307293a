"""mtl_keras.experiments.comparison: configuration grammar, Δm summary, tables, STL cache, reuse."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mtl_keras import Task, TaskSet
from mtl_keras.data import load_omniglot, omniglot
from mtl_keras.experiments import comparison
from mtl_keras.experiments.comparison import (
    DEFAULT_CONFIGS,
    SingleTaskBudget,
    budget_text,
    compare,
    load_reused_runs,
    mean_std,
    parse_config,
    resolve_configs,
    summarise,
)
from mtl_keras.experiments.comparison_tables import write_tables
from mtl_keras.experiments.provenance import RunProvenance
from mtl_keras.presets import get_preset

DOCS = Path(__file__).resolve().parents[1] / "docs"
# The runs below need the small Omniglot archives; without them find_omniglot_dir
# fails (it does not skip) and says where to put them.


def test_parse_config_grammar():
    w, r = ["equal", "pcgrad", "uncertainty"], ["similarity"]
    parse = lambda name: parse_config(name, weightings=w, rules=r)  # noqa: E731
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
        parse_config("tr0.5+similarity", weightings=w, rules=[])


def test_default_configs_use_the_registered_weightings():
    from mtl_keras.weighting import available_weightings

    configs, skipped = resolve_configs(DEFAULT_CONFIGS)
    names = [c["name"] for c in configs]
    assert names[0] == "stl" and "hard" in names and "tr0.5" in names
    weightings = {c["weighting"] for c in configs if c["weighting"]}
    assert weightings == {"uncertainty", "pcgrad"} <= set(available_weightings())
    assert next(c for c in configs if c["weighting"] == "pcgrad")["weighting_kwargs"] == {"every_n_steps": 10}
    assert all(name in DEFAULT_CONFIGS.split(",") for name in names + [s for s, _ in skipped])
    # Every default configuration parses here: Selective Sharing is part of the library.
    assert skipped == [] and {c["sharing"] for c in configs if c["sharing"]} == {"similarity", "variance"}
    # Named explicitly, an unavailable part is an error, and STL is always added for Δm.
    with pytest.raises(ValueError):
        resolve_configs("hard,no_such_method")
    assert [c["name"] for c in resolve_configs("hard")[0]] == ["stl", "hard"]


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5]) == (0.5, 0.0)
    assert all(np.isnan(v) for v in mean_std([]))


def _runs():
    return [
        {"config": "stl", "seed": 0, "test_accuracy": {"a": 0.8, "b": 0.4}, "mean_test_accuracy": 0.6,
         "parameters": 100, "wall_seconds": 10.0},
        {"config": "stl", "seed": 1, "test_accuracy": {"a": 0.8, "b": 0.4}, "mean_test_accuracy": 0.6,
         "parameters": 100, "wall_seconds": 12.0},
        {"config": "hard", "seed": 0, "test_accuracy": {"a": 0.88, "b": 0.4}, "mean_test_accuracy": 0.64,
         "parameters": 60, "wall_seconds": 5.0},
        {"config": "hard", "seed": 1, "test_accuracy": {"a": 0.8, "b": 0.48}, "mean_test_accuracy": 0.64,
         "parameters": 60, "wall_seconds": 7.0},
    ]


def test_summarise_computes_delta_m_over_seed_means():
    rows = {r["config"]: r for r in summarise(_runs(), ["a", "b"], ["stl", "hard"])}
    assert rows["stl"]["delta_m"] == 0.0 and rows["stl"]["wall_seconds"] == 11.0
    hard = rows["hard"]
    # seed means: a 0.84 (+5%), b 0.44 (+10%) -> +7.5%; per seed: +5% and +10% -> std 2.5
    assert hard["delta_m"] == pytest.approx(7.5)
    assert hard["delta_m_std"] == pytest.approx(2.5)
    assert hard["mean_test_accuracy"] == pytest.approx(0.64) and hard["mean_test_accuracy_std"] == pytest.approx(0.0)
    assert hard["tasks_beating_stl"] == 2 and hard["parameters"] == 60


def test_tables_keep_their_columns_and_number_formats(tmp_path):
    rows = summarise(_runs(), ["a", "b"], ["stl", "hard"])
    tasks = TaskSet([Task("a", "multiclass", 3), Task("b", "multiclass", 5)])
    with RunProvenance(argv=["--configs", "stl,hard"], program="apps/compare_methods.py") as prov:
        pass
    meta = {"command": prov.record["command"], "machine": prov.record["machine"], "budget": "tiny",
            "finished": "2026-01-01 00:00", "total_seconds": 60.0, "provenance": prov.record}
    write_tables(rows, tasks, tmp_path, meta)
    # The layout the committed docs/results*/ tables have.
    assert (tmp_path / "results.csv").read_text() == (
        "config,seeds,mean_test_accuracy,mean_test_accuracy_std,delta_m,delta_m_std,tasks_beating_stl,"
        "parameters,wall_seconds\n"
        "stl,2,0.600000,0.000000,0.0000,0.0000,0,100,11.0\n"
        "hard,2,0.640000,0.000000,7.5000,2.5000,2,60,6.0\n")
    assert (tmp_path / "per_task.csv").read_text() == (
        "task,classes,stl,hard\na,3,0.800000,0.840000\nb,5,0.400000,0.440000\n")
    committed = (DOCS / "results" / "results.csv").read_text().splitlines()[0]
    assert (tmp_path / "results.csv").read_text().splitlines()[0] == committed
    md = (tmp_path / "results.md").read_text()
    assert "| hard | 2 | 0.6400 ± 0.0000 | 7.50 ± 2.50 | 2/2 | 60 | 6 |" in md
    assert "Command: `python apps/compare_methods.py --configs stl,hard`" in md
    assert "Provenance: commit " in md and "load average" in md and "quiet machine" not in md


def test_the_committed_results_are_still_accepted_by_reuse(tmp_path):
    # The defaults of the comparison preset and of the single-task
    # budget are the budget docs/RESULTS.md was made with.
    config, stl = get_preset("comparison"), SingleTaskBudget()
    saved = json.loads((DOCS / "results" / "results.json").read_text())
    assert budget_text(config, 50, [0], stl, "full archives") == saved["meta"]["budget"]
    both = load_reused_runs([DOCS / "results", DOCS / "results_seed1"], budget_text(config, 50, [0, 1], stl, "full archives"))
    assert len(both) == 14 and {seed for _, seed in both} == {0, 1}
    assert both[("tr0.5", 0)]["mean_test_accuracy"] == pytest.approx(0.8523, abs=1e-4)
    with pytest.raises(ValueError, match="another budget"):
        load_reused_runs([DOCS / "results"], budget_text(config.replace(epochs=6), 50, [0], stl, "full archives"))
    with pytest.raises(ValueError, match=r"no results.json \(or runs.json\) there"):
        load_reused_runs([DOCS], budget_text(config, 50, [0], stl, "full archives"))
    # A stopped comparison left only runs.json (written after each finished run): its runs are reused.
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "runs.json").write_text(json.dumps({"meta": saved["meta"], "runs": saved["runs"][:2]}))
    assert set(load_reused_runs([stopped], saved["meta"]["budget"])) == {
        (r["config"], r["seed"]) for r in saved["runs"][:2]}
    # A budget with the newer recipe's parts names them, so it never matches the old runs.
    for change in (dict(lr_schedule="cosine", warmup_fraction=0.05), dict(augment_rotation=10.0),
                   dict(label_smoothing=0.1)):
        newer = budget_text(config.replace(**change), 50, [0], stl, "full archives")
        assert newer != saved["meta"]["budget"] and str(next(iter(change.values()))) in newer
        with pytest.raises(ValueError, match="another budget"):
            load_reused_runs([DOCS / "results"], newer)


# ------------------------------------------------- on the small archives
CONFIG = get_preset("comparison").replace(tasks=3, epochs=1, image_size=12, width=4,
                                                   depth=2, head_units=(8,), batch_size=64)
STL = SingleTaskBudget(epochs=2, batch_size=64)


def run_small(tmp, names, output, config=CONFIG, **kwargs):
    """A comparison on 3 small alphabets, as apps/compare_methods.py runs it."""
    data_dir = omniglot.find_omniglot_dir(archives="small")
    argv = ["--configs", names, "--output", str(tmp / output)]

    def load_data(seed):
        return load_omniglot(data_dir=data_dir, tasks=config.tasks, image_size=config.image_size,
                             batch_size=config.batch_size, tfds_dir=tmp / "tfds", archives="small", seed=seed)

    (tmp / output).mkdir(exist_ok=True)
    return compare(resolve_configs(names)[0], [0], load_data, config, stl=STL,
                   data_description={"data": "omniglot", "archives": "small"}, cache_dir=tmp / "cache",
                   output=tmp / output, provenance=RunProvenance(argv, program="apps/compare_methods.py"),
                   data_title="Omniglot, {num_tasks} alphabets", data_label="small archives", verbose=0, **kwargs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    first = run_small(tmp, "stl,hard,tr0.5,tr0.5+similarity", "one")
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp / "cache").glob("stl-*.json")}
    second = run_small(tmp, "tr0.25,pcgrad:every_n_steps=2", "two")
    return tmp, first, second, mtimes


def test_compare_writes_markdown_csv_png_and_json(runs):
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
    # Both JSON files say where the numbers came from.
    record = saved["meta"]["provenance"]
    assert record["command"].startswith("python apps/compare_methods.py --configs stl,hard,tr0.5,tr0.5+similarity")
    assert len(record["git_commit"]) == 40 and record["wall_seconds"] > 0 and "quiet" in record
    assert len(record["load_average_before"]) == 3 and len(record["load_average_after"]) == 3
    assert saved["meta"]["title"] == "Omniglot, 3 alphabets, 1 epochs, 1 seed (mean ± std over seeds)"
    logged = json.loads((out / "runs.json").read_text())
    assert logged["meta"]["provenance"] == record and logged["runs"] == saved["runs"]


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
    both = run_small(tmp, "stl,hard,tr0.25,tr0.5", "both", reuse=[tmp / "one", tmp / "two"], reuse_only=True)
    assert [r["config"] for r in both["rows"]] == ["stl", "hard", "tr0.25", "tr0.5"]
    earlier = {r["config"]: r for r in first["runs"] + second["runs"]}
    for run in both["runs"]:
        assert run["test_accuracy"] == earlier[run["config"]]["test_accuracy"]  # taken, not retrained
    # A configuration no earlier run has is left out with --reuse-only.
    none = run_small(tmp, "stl,tr0.75", "none", reuse=[tmp / "one"], reuse_only=True)
    assert [r["config"] for r in none["rows"]] == ["stl"]
    with pytest.raises(ValueError, match="another budget"):
        run_small(tmp, "stl", "bad", config=CONFIG.replace(epochs=2), reuse=[tmp / "one"])


def test_stl_early_stopping_is_part_of_the_cache_key(runs, monkeypatch):
    tmp = runs[0]
    seen = {}

    def fake_train(*args, cache_config, callbacks, **kwargs):
        seen.update(cache_config=cache_config, callbacks=callbacks)
        raise RuntimeError("stop here")

    monkeypatch.setattr(comparison, "train_single_task_models", fake_train)
    data = load_omniglot(data_dir=omniglot.find_omniglot_dir(archives="small"), tasks=3, image_size=12,
                         batch_size=64, tfds_dir=tmp / "tfds", archives="small", seed=0)
    with pytest.raises(RuntimeError, match="stop here"):
        comparison.run_stl(data, CONFIG, 0, STL, tmp / "cache", {"data": "omniglot", "archives": "small"}, verbose=0)
    assert seen["cache_config"] == {
        "data": "omniglot", "archives": "small", "tasks": ["Balinese", "Early_Aramaic", "Greek"],
        "image_size": 12, "data_seed": 0, "num_examples": data.num_examples,
        "early_stopping": {"monitor": "val_mean_accuracy", "mode": "max", "patience": 6, "start_from_epoch": 5},
    }
    [stopper] = seen["callbacks"](data.tasks[0])
    assert stopper.patience == 6 and stopper.start_from_epoch == 5 and stopper.restore_best_weights
    with pytest.raises(RuntimeError, match="stop here"):
        comparison.run_stl(data, CONFIG, 0, SingleTaskBudget(patience=0), tmp / "cache", {}, verbose=0)
    assert seen["callbacks"] is None


def test_the_committed_v02_single_task_runs_are_accepted_by_reuse_at_the_default_preset():
    # docs/RESULTS.md's STL row at the v0.2 recipe: a later comparison at
    # `--preset default` (e.g. Selective Sharing's trade) reuses them.
    config, stl = get_preset("default"), SingleTaskBudget()
    runs = load_reused_runs([DOCS / "results_v02_stl"], budget_text(config, 50, [0, 1], stl, "full archives"))
    assert set(runs) == {("stl", 0), ("stl", 1)}
    assert runs[("stl", 1)]["mean_test_accuracy"] == pytest.approx(0.8859, abs=1e-4)
