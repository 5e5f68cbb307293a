"""apps/grouping_benchmark.py on a tiny planted problem: its files and their keys."""

import json

from apps import grouping_benchmark


def test_grouping_benchmark_app_writes_results_with_provenance(tmp_path):
    out = tmp_path / "run"
    argv = ["--output", str(out), "--seeds", "2", "--no-sweep", "--families", "2", "--family-size", "2",
            "--input-dim", "4", "--examples", "256", "--batch-size", "64"]
    report = grouping_benchmark.main(argv)
    on_disk = json.loads((out / "grouping.json").read_text())
    assert on_disk == json.loads(json.dumps(report, default=lambda v: v.tolist()))
    assert set(on_disk) == {"app", "setting", "grouping_settings", "rules", "sweeps", "real", "wall_time_seconds",
                            "provenance"}
    assert on_disk["setting"]["seeds"] == [0, 1] and on_disk["setting"]["families"] == 2
    assert on_disk["setting"]["model"] == "dense trunk (64, 64), head_units (16,)"
    assert set(on_disk["rules"]) == {"similarity", "variance", "predictions+gate", "cosine_agglomerative", "random"}
    assert on_disk["real"] == {}
    assert all(len(r["ari_per_seed"]) == 2 for r in on_disk["rules"].values())
    assert on_disk["sweeps"] == {}
    assert on_disk["grouping_settings"]["threshold"] == 0.7
    provenance = on_disk["provenance"]
    assert provenance["command"].startswith("python apps/grouping_benchmark.py --output ")
    assert len(provenance["load_average_before"]) == 3 and "heavy_processes" in provenance
    assert (out / "grouping.png").stat().st_size > 1000 and (out / "affinity_seed0.png").stat().st_size > 1000


def test_character_seed_reaches_the_omniglot_draw(tmp_path, monkeypatch):
    import pytest

    from mtl_keras.data import omniglot_arrays

    seen = []

    class Drawn(Exception):
        pass

    def fake_load(*args, seed=None, **kwargs):
        seen.append(seed)
        raise Drawn

    monkeypatch.setattr(omniglot_arrays, "load_omniglot_arrays", fake_load)
    assert grouping_benchmark.parse_args(["--output", str(tmp_path)]).character_seed == 0
    for argv, expected in (([], 0), (["--character-seed", "3"], 3)):
        args = grouping_benchmark.parse_args(["--output", str(tmp_path), "--real", *argv])
        with pytest.raises(Drawn):
            grouping_benchmark.run_real_sets(args, tmp_path, log=print)
        assert seen[-1] == expected
