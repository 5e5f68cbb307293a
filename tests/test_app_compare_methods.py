"""apps/compare_methods.py: its defaults reproduce docs/RESULTS.md; a tiny comparison end to end."""

import csv
import json
from pathlib import Path

from apps import compare_methods
from mtl_keras.data import omniglot
from mtl_keras.experiments.comparison import SingleTaskBudget, budget_text, load_reused_runs
from mtl_keras.presets import config_from_args

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_default_flags_are_the_budget_of_docs_results():
    args = compare_methods.parse_args([])
    stl = SingleTaskBudget(args.stl_epochs, args.stl_batch_size, args.stl_patience)
    budget = budget_text(config_from_args(args), 50, args.seeds, stl, f"{args.archives} archives")
    saved = json.loads((DOCS / "results" / "results.json").read_text())
    assert budget == saved["meta"]["budget"]
    assert len(load_reused_runs([DOCS / "results"], budget)) == 9
    assert args.configs.split(",") == [r["config"] for r in saved["runs"]]
    assert (args.output, args.reuse, args.reuse_only, args.verbose) == (None, [], False, 1)


def test_the_default_preset_gives_the_main_apps_recipe_and_flags_still_win():
    from mtl_keras.presets import get_preset

    main_recipe = config_from_args(compare_methods.parse_args(["--preset", "default"]))
    assert main_recipe == get_preset("default").replace(sigma=main_recipe.sigma, weighting=main_recipe.weighting)
    assert config_from_args(compare_methods.parse_args([])) != main_recipe  # "comparison" stays the default
    assert config_from_args(compare_methods.parse_args(["--preset", "default", "--epochs", "3"])).epochs == 3


def test_smoke(tmp_path):
    result = compare_methods.main([
        "--data-dir", str(omniglot.find_omniglot_dir(archives="small", download=False)), "--archives", "small",
        "--tfds-dir", str(tmp_path / "tfds"),
        "--tasks", "2", "--epochs", "1", "--image-size", "12", "--width", "4", "--depth", "2", "--head-units", "8",
        "--batch-size", "64", "--stl-epochs", "1", "--stl-batch-size", "64", "--cache-dir", str(tmp_path / "cache"),
        "--configs", "tr0.5", "--output", str(tmp_path / "out"), "--verbose", "0",
    ])
    out = tmp_path / "out"
    assert result["output"] == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["per_task.csv", "results.csv", "results.json", "results.md",
                                                     "results.png", "runs.json"]
    with open(out / "results.csv") as f:
        assert [r["config"] for r in csv.DictReader(f)] == ["stl", "tr0.5"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["meta"]["provenance"]["command"].startswith("python apps/compare_methods.py --data-dir ")
    assert "Omniglot, 2 alphabets, 1 epochs" in saved["meta"]["title"]
    assert "Provenance: commit " in (out / "results.md").read_text()
