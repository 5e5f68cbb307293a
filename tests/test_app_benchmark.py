"""apps/benchmark.py: a tiny benchmark end to end (cases and Selective Sharing in subprocesses)."""

import json

from apps import benchmark


def test_smoke(tmp_path):
    report = benchmark.main([
        "--batch-size", "8", "--image-size", "8", "--width", "4", "--depth", "1", "--head-units", "4",
        "--classes", "3", "--steps", "2", "--warmup", "1", "--num-tasks", "2", "--cases", "plain",
        "--no-variants", "--sharing-tasks", "2", "--quick", "--peak-sizes", "256", "--output", str(tmp_path),
    ])
    # One case: each runs in its own process (the cases: tests/test_benchmarking.py).
    assert [(r["case"], r["ok"]) for r in report["results"]] == [("plain", True)]
    assert report["sharing"]["ok"], report["sharing"].get("error")
    assert set(report["sharing"]) == {"ok", "overhead_T2", "collection_vs_naive_T2", "predictions_check_T2"}
    assert {"sharing_slowdown_T2", "collection_naive_over_one_pass_T2",
            "predictions_check_overhead_T2"} <= set(report["targets"])
    check = report["sharing"]["predictions_check_T2"]
    # One check against the default run's 2848 steps; both timed parts took time.
    assert check["run_steps"] == benchmark.DEFAULT_RUN_STEPS == 2848
    assert check["check_seconds"] > 0 and check["refit_all_seconds"] > 0
    assert check["overhead"] == (check["check_seconds"] + check["refit_all_seconds"]) / check["run_seconds"]
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["provenance"]["command"].startswith("python apps/benchmark.py --batch-size 8")
    md = (tmp_path / "benchmark.md").read_text()
    assert "## Selective Sharing" in md and "- overhead_T2: num_tasks = 2" in md and "Provenance: commit " in md
