"""The merge gate: groups from an affinity matrix, merged only if they hold up against noise.

`affinity_groups` proposes groups by average linkage: starting from
singletons, the two groups with the highest mean pairwise affinity merge
while that mean is at least `threshold` (and the merged group stays within
`max_group_size` tasks). `gated_grouping` then checks every proposed group
on the *evidence* the affinity came from (a `PredictionEvidence`, or any
object with `n`, `num_rows` and `affinity(rows=None, permute=None)`):

- **null**: the affinity of unrelated units, measured by permuting each
  unit's probe rows independently (`null_permutations` times); a group's
  mean within-group affinity must exceed the `null_quantile` quantile of the
  largest off-diagonal null affinity (a family-wise threshold: on noise, no
  pair should pass);
- **stability**: the probe rows are resampled with replacement
  (`bootstrap` times) and the grouping redone; a group passes only if its
  members end up together in at least `min_stability` of the resamples;
- **separation**: its mean within-group affinity must be above its largest
  mean affinity to any other proposed group.

A group of three or more units that fails a check is split in two at its
own dendrogram's top (average linkage on its affinity) and each half is
checked again (`split_refused`): a proposal that lumped two related
families together (correlated labelling rules) is refused as a whole, but
each family on its own can still earn its merge. Units of a group that
fails and cannot be split stay alone. Every check, of proposed groups and of
halves, is kept in `GateCheck`s so a callback can record why a group did or
did not merge.

Example:

>>> evidence = PredictionEvidence(head_logits(model, probe))
>>> result = gated_grouping(evidence, threshold=0.5)
>>> result.groups, [c.passed for c in result.checks]
([[0, 3], [1], [2]], [True])
"""

import dataclasses

import numpy as np

from mtl_keras.sharing.predictions import prediction_affinity


def affinity_groups(affinity, threshold, sizes=None, max_group_size=None):
    """Average-linkage groups whose mean pairwise affinity is at least `threshold`.

    Args:
        affinity: `[n, n]` symmetric affinity (larger = more related).
        threshold: least mean affinity between two groups for them to merge.
        sizes: tasks per unit (default 1 each), for `max_group_size`.
        max_group_size: most tasks in one group (None: no limit).

    Returns:
        A sorted partition of `range(n)`.
    """
    a = np.asarray(affinity, dtype=np.float64)
    n = len(a)
    sizes = np.ones(n, dtype=int) if sizes is None else np.asarray(sizes, dtype=int)
    groups = [[i] for i in range(n)]
    while len(groups) > 1:
        best, pair = -np.inf, None
        for x in range(len(groups)):
            for y in range(x + 1, len(groups)):
                if max_group_size and sizes[groups[x]].sum() + sizes[groups[y]].sum() > max_group_size:
                    continue
                mean = float(a[np.ix_(groups[x], groups[y])].mean())
                if mean > best:
                    best, pair = mean, (x, y)
        if pair is None or best < threshold:
            break
        x, y = pair
        groups[x] = sorted(groups[x] + groups[y])
        del groups[y]
    return sorted(groups)


@dataclasses.dataclass
class GateCheck:
    """The gate's figures for one proposed group.

    Attributes:
        group: the units (row indices).
        within: mean pairwise affinity inside the group.
        between: largest mean affinity to another proposed group (0 if none).
        null_threshold: the permutation null's threshold the within-group
            affinity must exceed.
        stability: share of bootstrap resamples keeping the members together.
        passed: whether the group merges.
        reasons: the failed checks (empty when passed).
    """

    group: list
    within: float
    between: float
    null_threshold: float
    stability: float
    passed: bool
    reasons: list

    def as_dict(self):
        return {"group": list(self.group), "within": round(self.within, 4), "between": round(self.between, 4),
                "null_threshold": round(self.null_threshold, 4), "stability": round(self.stability, 4),
                "passed": self.passed, "reasons": list(self.reasons)}


@dataclasses.dataclass
class GatedGrouping:
    """The outcome of `gated_grouping`.

    Attributes:
        groups: the partition after the gate (failed groups split into singletons).
        proposed: the partition before the gate.
        checks: one `GateCheck` per proposed group of two or more units.
        affinity: `[n, n]` affinity on all the evidence.
        null_threshold: the permutation null's threshold.
    """

    groups: list
    proposed: list
    checks: list
    affinity: np.ndarray
    null_threshold: float


def _halves(affinity, group):
    """`group` split in two by average linkage on its own affinity (its dendrogram's top split)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    sub = np.asarray(affinity, dtype=np.float64)[np.ix_(group, group)]
    distance = np.clip(1.0 - (sub + sub.T) / 2, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    labels = fcluster(linkage(squareform(distance, checks=False), method="average"), 2, criterion="maxclust")
    return [sorted(group[i] for i in np.flatnonzero(labels == c)) for c in np.unique(labels)]


def _together(partition, members):
    """Whether all `members` are in one group of `partition`."""
    first = next(g for g in partition if members[0] in g)
    return all(m in first for m in members)


def silhouette_groups(affinity, threshold, sizes=None, max_group_size=None):
    """Average-linkage clusters of `1 - affinity`, their number by best silhouette; clusters whose
    mean pairwise affinity is below `threshold` (a floor) are split into singletons.

    A relative proposal: the cut adapts to how similar the heads of one family
    are (lower with noisier labels), the floor keeps chance clusters out.
    `max_group_size` splits larger clusters by `affinity_groups` at the floor.
    """
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import silhouette_score

    a = np.asarray(affinity, dtype=np.float64)
    n = len(a)
    if n < 3:
        return affinity_groups(a, threshold, sizes, max_group_size)
    distance = np.clip(1.0 - (a + a.T) / 2, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    best = None
    for k in range(2, n):
        labels = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(distance)
        score = silhouette_score(distance, labels, metric="precomputed")
        if best is None or score > best[0]:
            best = (score, labels)
    groups = []
    for c in np.unique(best[1]):
        members = np.flatnonzero(best[1] == c).tolist()
        within = a[np.ix_(members, members)][~np.eye(len(members), dtype=bool)].mean() if len(members) > 1 else 1.0
        if len(members) > 1 and within >= threshold:
            sub = a[np.ix_(members, members)]
            sub_sizes = None if sizes is None else np.asarray(sizes)[members]
            groups += [[members[i] for i in g] for g in affinity_groups(sub, threshold, sub_sizes, max_group_size)] \
                if max_group_size else [members]
        else:
            groups += [[m] for m in members]
    return sorted(sorted(g) for g in groups)


PROPOSALS = {"threshold": affinity_groups, "silhouette": silhouette_groups}


def gated_grouping(evidence, threshold=0.5, bootstrap=50, min_stability=0.9, null_permutations=20,
                   null_quantile=0.95, sizes=None, max_group_size=None, seed=0, proposal="threshold",
                   split_refused=True):
    """Proposes groups from the evidence's affinity and keeps those that pass the gate.

    Args:
        evidence: has `n` (units), `num_rows` (probe rows) and
            `affinity(rows=None, permute=None) -> [n, n]` (`rows`: indices of
            the probe rows to use; `permute`: a `numpy.random.Generator` to
            permute each unit's rows independently, for the null).
        threshold: least mean affinity for units to group (`affinity_groups`).
        bootstrap: resamples of the probe rows for the stability check (0
            turns it off).
        min_stability: least share of resamples keeping a group together.
        null_permutations: permutations for the null threshold (0: off).
        null_quantile: quantile of the null's largest affinity to beat.
        sizes, max_group_size: see `affinity_groups`.
        seed: random state of resampling and permutations.
        proposal: `"threshold"` (`affinity_groups`: merge while the mean
            affinity is at least `threshold`) or `"silhouette"`
            (`silhouette_groups`: the best-silhouette clustering, `threshold`
            as a floor).
        split_refused: check the two halves of a refused group of three or
            more units (recursively) instead of leaving all its units alone.

    Returns:
        A `GatedGrouping`.
    """
    if proposal not in PROPOSALS:
        raise ValueError(f"Unknown proposal {proposal!r}; use one of {sorted(PROPOSALS)}.")
    propose = PROPOSALS[proposal]
    if not 0.0 <= min_stability <= 1.0:
        raise ValueError(f"min_stability must be in [0, 1]; got {min_stability!r}.")
    rng = np.random.default_rng(seed)
    affinity = np.asarray(evidence.affinity(), dtype=np.float64)
    n = len(affinity)
    proposed = propose(affinity, threshold, sizes, max_group_size)
    off = ~np.eye(n, dtype=bool)
    null_max = [float(evidence.affinity(permute=rng)[off].max()) for _ in range(null_permutations)] if n > 1 else []
    null_threshold = float(np.quantile(null_max, null_quantile)) if null_max else 0.0
    multi = [g for g in proposed if len(g) > 1]
    resampled = []
    if multi and bootstrap:
        for _ in range(bootstrap):
            rows = rng.integers(0, evidence.num_rows, evidence.num_rows)
            resampled.append(propose(evidence.affinity(rows=rows), threshold, sizes, max_group_size))
    checks, groups = [], []
    # The partition being checked: the proposal, with each split group replaced by its halves.
    current = [list(g) for g in proposed]
    pending = list(current)
    while pending:
        g = pending.pop(0)
        if len(g) < 2:
            groups.append(g)
            continue
        within = float(affinity[np.ix_(g, g)][~np.eye(len(g), dtype=bool)].mean())
        others = [h for h in current if h is not g]
        between = max((float(affinity[np.ix_(g, h)].mean()) for h in others), default=0.0)
        stability = float(np.mean([_together(p, g) for p in resampled])) if resampled else 1.0
        reasons = []
        if within <= null_threshold:
            reasons.append("within-group affinity not above the permutation null")
        if stability < min_stability:
            reasons.append(f"stability {stability:.2f} < {min_stability}")
        if within <= between:
            reasons.append("within-group affinity not above between-group affinity")
        check = GateCheck(group=list(g), within=within, between=between, null_threshold=null_threshold,
                          stability=stability, passed=not reasons, reasons=reasons)
        checks.append(check)
        if check.passed:
            groups.append(g)
        elif split_refused and len(g) > 2:
            halves = _halves(affinity, g)
            current = [h for h in current if h is not g] + halves
            pending += halves
        else:
            groups += [[u] for u in g]
    return GatedGrouping(groups=sorted(groups), proposed=proposed, checks=checks, affinity=affinity,
                         null_threshold=null_threshold)


class PredictionEvidence:
    """Heads' logits on a probe batch as gate evidence; units may hold several tasks.

    Args:
        logits: `[B, T, K]` (see `predictions.head_logits`).
        units: the task ids of each unit (default: one unit per task).
        widths: outputs of each task (default all K).

    The affinity of two units is the mean `prediction_affinity` of their
    tasks' pairs (a unit's own tasks count 1 with each other).
    """

    def __init__(self, logits, units=None, widths=None):
        self.logits = np.asarray(logits, dtype=np.float64)
        t = self.logits.shape[1]
        self.units = [[i] for i in range(t)] if units is None else [list(u) for u in units]
        self.widths = widths
        self.n = len(self.units)
        self.num_rows = self.logits.shape[0]

    def affinity(self, rows=None, permute=None):
        logits = self.logits if rows is None else self.logits[rows]
        if permute is not None:
            # One permutation per unit: a merged unit's tasks stay aligned with each other.
            order = np.tile(np.arange(len(logits))[:, None], (1, logits.shape[1]))
            for u in self.units:
                order[:, u] = permute.permutation(len(logits))[:, None]
            logits = np.stack([logits[order[:, t], t] for t in range(logits.shape[1])], axis=1)
        tasks = prediction_affinity(logits, self.widths)
        out = np.empty((self.n, self.n))
        for x, u in enumerate(self.units):
            for y, v in enumerate(self.units):
                out[x, y] = 1.0 if x == y else float(tasks[np.ix_(u, v)].mean())
        return out
