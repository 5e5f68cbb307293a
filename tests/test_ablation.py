"""experiments.ablation and apps/recipe_ablation.py: rows, runs in their own processes, reuse, the table."""

import json
import textwrap

import pytest

from mtl_keras.experiments.ablation import (
    AblationRow, ablation_table, config_mismatch, run_ablation, run_folder, summarise_ablation,
)

# A stand-in training app: accuracy from its flags, so every row's result is known.
FAKE_APP = textwrap.dedent('''
    import argparse, json, pathlib, sys
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int); p.add_argument("--output"); p.add_argument("--bonus", type=float, default=0)
    p.add_argument("--fail", action="store_true"); p.add_argument("--no-export", action="store_true")
    p.add_argument("--verbose"); p.add_argument("--sigma", type=float, default=0.5)
    a = p.parse_args()
    if a.fail:
        sys.exit("fake app: error: told to fail")
    out = pathlib.Path(a.output)
    with open(out.parent.parent / "calls.txt", "a") as f:
        f.write(f"{out.parent.name} {a.seed}\\n")
    report = {"mean_test_accuracy": 0.8 + a.bonus + 0.01 * a.seed, "parameters": 1000,
              "config": {"sigma": a.sigma, "seed": a.seed, "head_units": [128]},
              "provenance": {"quiet": False, "load_average_before": [1.5], "load_average_after": [2.0],
                             "git_commit": "abc"}}
    (out / "report.json").write_text(json.dumps(report))
''')


@pytest.fixture
def app(tmp_path):
    path = tmp_path / "fake_app.py"
    path.write_text(FAKE_APP)
    return path


ROWS = [AblationRow.parse("recipe="), AblationRow.parse("better=--bonus 0.05"),
        AblationRow.parse("tiny change=--bonus 0.001")]


def test_rows_parse_and_name_their_folders():
    row = AblationRow.parse(" - label smoothing = --label-smoothing 0 --epochs '3'")
    assert row == AblationRow("- label smoothing", ("--label-smoothing", "0", "--epochs", "3"))
    assert row.slug == "label_smoothing"
    for bad in ("no equals sign", "=--epochs 3"):
        with pytest.raises(ValueError, match="NAME=FLAGS"):
            AblationRow.parse(bad)


def test_runs_summary_and_reuse(app, tmp_path):
    out = tmp_path / "abl"
    runs = run_ablation(app, ROWS, [0, 1], out, common_flags=["--no-export"], log=lambda _: None)
    assert [(r["row"], r["seed"]) for r in runs] == [(r.name, s) for s in (0, 1) for r in ROWS]
    # The stand-in app starts in tens of milliseconds: a wall time is there, however small.
    assert all(not r["reused"] and r["wall_seconds"] is not None and r["wall_seconds"] >= 0
               and r["load_average"] == [1.5, 2.0] for r in runs)
    summary = {s["row"]: s for s in summarise_ablation(runs, ROWS)}
    assert summary["recipe"]["mean_test_accuracy"] == pytest.approx(0.805)
    assert summary["recipe"]["std"] == pytest.approx(0.00707, abs=1e-4)
    assert summary["better"]["delta_vs_reference"] == pytest.approx(0.05)
    assert summary["better"]["within_noise"] is False and summary["tiny change"]["within_noise"] is True
    assert summary["recipe"]["within_noise"] is None
    table = ablation_table(summarise_ablation(runs, ROWS))
    assert "+5.00 pt" in table and "(noise)" in table and "`--bonus 0.05`" in table
    # Started again: nothing runs twice, the results are the same.
    again = run_ablation(app, ROWS, [0, 1], out, log=lambda _: None)
    assert all(r["reused"] for r in again)
    assert [r["mean_test_accuracy"] for r in again] == [r["mean_test_accuracy"] for r in runs]
    assert len((out / "calls.txt").read_text().splitlines()) == 6
    assert json.loads((run_folder(out, ROWS[1], 1) / "report.json").read_text())["mean_test_accuracy"] == pytest.approx(0.86)


def test_a_failing_run_names_itself_and_keeps_the_finished_ones(app, tmp_path):
    rows = [AblationRow.parse("recipe="), AblationRow.parse("broken=--fail")]
    with pytest.raises(RuntimeError, match=r"broken seed 0 failed \(exit 1\)[\s\S]*told to fail"):
        run_ablation(app, rows, [0], tmp_path, log=lambda _: None)
    assert (run_folder(tmp_path, rows[0], 0) / "report.json").exists()


def test_a_finished_run_of_another_configuration_is_not_reused(app, tmp_path):
    # The row's run trained sigma 0.5; the row now means sigma 1 (a default changed).
    rows = [AblationRow.parse("recipe=")]
    expected = {"sigma": 0.5, "seed": 0, "head_units": (128,), "epochs": 16}
    first = run_ablation(app, rows, [0], tmp_path, log=lambda _: None, expected_config=lambda row, seed: expected)
    again = run_ablation(app, rows, [0], tmp_path, log=lambda _: None, expected_config=lambda row, seed: expected)
    assert again[0]["reused"] and again[0]["mean_test_accuracy"] == first[0]["mean_test_accuracy"]
    changed = dict(expected, sigma=1.0)
    with pytest.raises(ValueError, match=r"recipe[\s\S]*sigma 0.5 instead of 1.0[\s\S]*another --output"):
        run_ablation(app, rows, [0], tmp_path, log=lambda _: None, expected_config=lambda row, seed: changed)
    # Nothing lost, nothing retrained.
    assert (run_folder(tmp_path, rows[0], 0) / "report.json").exists()
    assert len((tmp_path / "calls.txt").read_text().splitlines()) == 1


def test_config_mismatch_reads_old_reports_by_their_top_level_settings():
    old = {"sigma": 0.5, "tasks": 50, "sharing": None, "epochs": 16, "mean_test_accuracy": 0.93}
    assert config_mismatch(old, {"sigma": 1.0, "tasks": None, "sharing": "none", "epochs": 16}) == {"sigma": (0.5, 1.0)}
    assert config_mismatch(old, {"sigma": 0.5, "tasks": None, "epochs": 16}) == {}
    new = {"config": {"head_units": [], "lr": 0.002}, "sigma": 0.5}
    assert config_mismatch(new, {"head_units": (), "lr": 0.002, "sigma": 1.0}) == {}  # config wins
    assert config_mismatch(new, {"head_units": (128,)}) == {"head_units": ([], [128])}


def test_app_rows_mean_the_default_preset_with_their_flags():
    import importlib.util
    from pathlib import Path

    from mtl_keras.presets import get_preset

    spec = importlib.util.spec_from_file_location(
        "recipe_ablation", Path(__file__).resolve().parents[1] / "apps" / "recipe_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    common = ["--no-export", "--verbose", "0", "--archives=small", "--data-dir", "/somewhere"]
    assert module.row_config(AblationRow.parse("default recipe="), 1, common) == \
        get_preset("default").replace(seed=1).to_dict()
    routed = module.row_config(AblationRow.parse("tr=--sigma 0.5 --head-units 128"), 0, common)
    assert routed == get_preset("default").replace(sigma=0.5, head_units=(128,)).to_dict()


def test_app_writes_the_table_and_refuses_bad_rows(app, tmp_path, monkeypatch, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "recipe_ablation", Path(__file__).resolve().parents[1] / "apps" / "recipe_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "APP", app)
    out = tmp_path / "out"
    summary = module.main(["--output", str(out), "--seeds", "0", "--row", "a=", "--row", "b=--bonus 0.1"])
    assert [s["row"] for s in summary] == ["a", "b"]
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["summary"][1]["mean_test_accuracy"] == pytest.approx(0.9) and "provenance" in saved
    assert "| b |" in (out / "ablation.md").read_text()
    with pytest.raises(SystemExit):
        module.parse_args(["--output", str(out), "--row", "same=", "--row", "same=--bonus 1"])
    assert "same name" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="broken seed 0 failed"):
        module.main(["--output", str(out), "--seeds", "0", "--row", "broken=--fail"])
