"""The predictions signal (sharing/predictions.py) and the merge gate (sharing/gate.py)."""

import numpy as np
import pytest

from mtl_keras.sharing.gate import PredictionEvidence, affinity_groups, gated_grouping
from mtl_keras.sharing.predictions import prediction_affinity


def _family_logits(families, rows=400, spread=0.2, seed=0):
    """`[rows, T, 1]` logits: a task is its family's function plus its own small deviation."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((rows, max(families) + 1))
    cols = [base[:, f] * rng.choice([-1, 1]) + spread * rng.standard_normal(rows) for f in families]
    return np.stack(cols, axis=1)[:, :, None]


def test_prediction_affinity_is_squared_correlation_for_one_output():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(300)
    b = 0.6 * a + 0.8 * rng.standard_normal(300)
    logits = np.stack([a, -b, 3 * a + 1], axis=1)[:, :, None]
    affinity = prediction_affinity(logits)
    assert affinity[0, 1] == pytest.approx(np.corrcoef(a, b)[0, 1] ** 2)
    assert affinity[0, 2] == pytest.approx(1.0)  # scale, shift and sign do not matter
    assert np.allclose(np.diag(affinity), 1.0) and np.allclose(affinity, affinity.T)


def test_prediction_affinity_compares_heads_of_different_widths():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((200, 2))
    logits = np.zeros((200, 2, 3))
    logits[:, 0, :2] = z
    logits[:, 1, :3] = z @ rng.standard_normal((2, 3))
    logits[:, 0, 2] = rng.standard_normal(200)  # past task 0's width: must be ignored
    assert prediction_affinity(logits, widths=[2, 3])[0, 1] > 0.6
    assert prediction_affinity(logits, widths=[3, 3])[0, 1] < prediction_affinity(logits, widths=[2, 3])[0, 1]


def test_affinity_groups_average_linkage_threshold_and_size_cap():
    a = np.array([[1, .9, .8, 0], [.9, 1, .7, 0], [.8, .7, 1, .1], [0, 0, .1, 1]], float)
    assert affinity_groups(a, 0.5) == [[0, 1, 2], [3]]
    assert affinity_groups(a, 0.85) == [[0, 1], [2], [3]]
    assert affinity_groups(a, 0.5, max_group_size=2) == [[0, 1], [2], [3]]


def test_gate_recovers_families_and_records_its_figures():
    families = [0, 1, 0, 2, 1, 0, 2, 3]
    result = gated_grouping(PredictionEvidence(_family_logits(families)), threshold=0.5, seed=0)
    assert result.groups == [[0, 2, 5], [1, 4], [3, 6], [7]]
    assert len(result.checks) == 3 and all(c.passed for c in result.checks)
    for c in result.checks:
        assert c.within > 0.9 and c.between < 0.2 and c.stability == 1.0 and c.within > c.null_threshold
        assert set(c.as_dict()) == {"group", "within", "between", "null_threshold", "stability", "passed", "reasons"}


def test_gate_merges_nothing_on_unrelated_tasks():
    logits = np.random.default_rng(3).standard_normal((300, 12, 1))
    result = gated_grouping(PredictionEvidence(logits), threshold=0.5, seed=0)
    assert result.groups == [[i] for i in range(12)]


def test_gate_refuses_a_group_that_a_low_threshold_proposes_from_a_small_probe():
    # 12 unrelated heads on 8 probe rows: chance correlations are large, so a
    # permissive threshold proposes groups; the permutation null and the
    # bootstrap must refuse them.
    logits = np.random.default_rng(4).standard_normal((8, 12, 1))
    result = gated_grouping(PredictionEvidence(logits), threshold=0.3, seed=0)
    assert any(len(g) > 1 for g in result.proposed)
    assert result.groups == [[i] for i in range(12)]
    assert all(not c.passed and c.reasons for c in result.checks)


def test_prediction_evidence_units_average_their_tasks():
    logits = _family_logits([0, 0, 1], seed=5)
    evidence = PredictionEvidence(logits, units=[[0, 1], [2]])
    tasks = prediction_affinity(logits)
    a = evidence.affinity()
    assert a.shape == (2, 2) and a[0, 1] == pytest.approx(tasks[[0, 1], 2].mean())
    rng = np.random.default_rng(0)
    assert evidence.affinity(permute=rng)[0, 1] < 0.1  # the null breaks the relation


def test_selective_sharing_signal_auto_and_probe_required():
    from mtl_keras.sharing import SelectiveSharing

    assert SelectiveSharing(verbose=0).signal == "gram"
    assert SelectiveSharing(probe=np.zeros((4, 2)), verbose=0).signal == "predictions"
    with pytest.raises(ValueError, match="probe"):
        SelectiveSharing(signal="predictions")
    with pytest.raises(ValueError, match="min_affinity"):
        SelectiveSharing(probe=np.zeros((4, 2)), min_affinity=1.5)


def test_silhouette_proposal_adapts_its_cut_and_keeps_chance_clusters_out():
    # Families whose heads agree only moderately (CKA about 0.4): a fixed
    # threshold of 0.5 proposes nothing; the best-silhouette clusters find them.
    families = [0, 1, 0, 2, 1, 0, 2, 1, 2]
    evidence = PredictionEvidence(_family_logits(families, spread=0.9, rows=2000, seed=6))
    within = evidence.affinity()[0, 2]
    assert 0.25 < within < 0.5
    assert gated_grouping(evidence, threshold=0.5, seed=0).groups == [[i] for i in range(9)]
    assert gated_grouping(evidence, threshold=0.2, proposal="silhouette", seed=0).groups == [
        [0, 2, 5], [1, 4, 7], [3, 6, 8]]
    noise = PredictionEvidence(np.random.default_rng(7).standard_normal((300, 9, 1)))
    assert gated_grouping(noise, threshold=0.2, proposal="silhouette", seed=0).groups == [[i] for i in range(9)]
    with pytest.raises(ValueError, match="proposal"):
        gated_grouping(noise, proposal="nearest")


def test_regroup_saved_scores_every_variant_on_saved_evidence(tmp_path):
    from mtl_keras.experiments.grouping_real import regroup_saved

    families = np.array([0, 1, 0, 1, 2])
    for seed in (0, 1):
        np.savez_compressed(tmp_path / f"fam_0.1_seed{seed}.npz", logits=_family_logits(families.tolist(), seed=seed),
                            labels=np.zeros((400, 5)), families=families)
    out = regroup_saved(sorted(tmp_path.glob("*.npz")), variants=(("threshold", 0.5), ("silhouette", 0.3)))
    assert list(out) == ["fam@0.1"] and out["fam@0.1"]["seeds"] == 2
    for name in ("threshold@0.5", "silhouette@0.3"):
        assert out["fam@0.1"][name]["ari_per_seed"] == [1.0, 1.0]
        assert out["fam@0.1"][name]["merged_fraction_mean"] == 0.8


class _TwoCloseFamilies:
    """Gate evidence for families A = units 0-3 and B = 4-7 whose cross affinity straddles the proposal's
    threshold: about half of the bootstrap resamples lump A and B together, the rest keep them apart."""

    n, num_rows = 8, 100

    def affinity(self, rows=None, permute=None):
        if permute is not None:
            cross, within = 0.02, 0.02
        else:
            cross = 0.45 if rows is None else (0.6 if np.mean(rows) < 49.5 else 0.25)
            within = 0.8
        a = np.full((8, 8), cross)
        a[:4, :4] = a[4:, 4:] = within
        np.fill_diagonal(a, 1.0)
        return a


def test_a_refused_group_is_split_and_each_half_earns_its_own_merge():
    evidence = _TwoCloseFamilies()
    result = gated_grouping(evidence, threshold=0.4, proposal="threshold", seed=0)
    assert result.proposed == [list(range(8))]
    whole, *halves = result.checks
    assert not whole.passed and "stability" in whole.reasons[0] and 0.2 < whole.stability < 0.8
    assert [c.group for c in halves] == [[0, 1, 2, 3], [4, 5, 6, 7]] and all(c.passed for c in halves)
    assert halves[0].between == pytest.approx(0.45)  # against the other half, not the refused whole
    assert result.groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # Without splitting, the refusal leaves every unit alone.
    unsplit = gated_grouping(evidence, threshold=0.4, proposal="threshold", seed=0, split_refused=False)
    assert unsplit.groups == [[i] for i in range(8)] and len(unsplit.checks) == 1
