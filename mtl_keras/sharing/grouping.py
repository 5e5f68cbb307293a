"""From accumulated estimator gradients to task groups: features, factors, clusters, rules.

The pipeline (`group_units`) works on *units*: the estimators alive in the
model (one per task before any merge, one per group after). Each unit has
one row of accumulated gradients (see `gradients.GradientCollector`).

1. **Features** (`gradient_features`). `signal="gram"` (default) compares
   units by the gradient of their *first* estimator kernel `G [D, h]`. The
   trunk features are the same for every head, but the h hidden units of
   independently initialised estimators are in arbitrary order and sign, so
   raw gradients of two estimators are not comparable coordinate by
   coordinate. Two steps make them comparable: (a) the term `f_mean b^T`
   that every kernel gradient carries because the trunk's features are not
   centred (`b` = the bias gradient; `f_mean` is estimated over all units by
   least squares) is removed; (b) the Gram matrix `G G^T` over the D trunk
   features is formed, which is invariant to any rotation of the hidden units
   and keeps what the task asks of the shared features. The D features are
   first projected on the top `max_dim` left singular vectors of all units'
   `G`. `signal="flat"` uses the raw flattened gradients (the literal reading
   of the method; meaningful only when estimators share their initial
   weights). Rows are L2-normalised: grouping looks at directions, not at how
   much gradient a unit got.
2. **Factorize** (`factorize`) the units x features matrix: `"pca"`
   (default; centred, so a direction common to all units is removed),
   `"svd"` (`TruncatedSVD`, uncentred) or `"nmf"` (`NMF` on the magnitudes
   `|features|`). `n_components` is an int, or a float in (0, 1) = the
   fraction of variance (energy for svd/nmf) to keep (default 0.9). Factor
   rows are L2-normalised.
3. **Cluster** (`cluster_factors`) the factors: `"kmeans"` (default) or
   `"agglomerative"` (average linkage, cosine). `n_clusters=None` picks the
   number with the best silhouette score. Each unit's *distance to its
   cluster's centre* is the cosine distance between its features and the
   mean features of the other members of its cluster (see `Clusters`).
4. **Rule**: a function `(factors, clusters) -> groups` returning a
   partition of the unit indices `range(n)` (a list of lists); singletons
   are units left alone. Built in:

   - `"similarity"` (`similarity_rule`): the members of a cluster whose
     distance to the cluster's centre is at most `threshold` (default 0.7,
     i.e. a cosine similarity of at least 0.3 to the rest of the cluster)
     form one group; members further away stay alone. Tightly related
     tasks share. Clusters decide who may go together, the threshold
     whether they are related enough: without it, unrelated tasks that
     k-means had to put somewhere would merge.
   - `"variance"` (`variance_rule`): a shared estimator should see
     complementary, high-variance signal. Groups are built greedily: seed a
     group with the unassigned unit farthest from the mean of all factors,
     then repeatedly add, from a cluster not yet in the group, the
     unassigned unit that most increases the group's factor variance (mean
     squared distance to the group mean), provided its cosine distance to
     every member is at least `threshold`; stop when no candidate is left or
     the group would exceed `max_group_size` tasks. It deliberately groups
     tasks across clusters, so it does *not* recover families of similar
     tasks (its ARI against such families is about 0 or below).

   Both honour `max_group_size` (in tasks: a unit that is already a merged
   group counts all its tasks) via `clusters.sizes`.

Groups are always validated (`validate_groups`): a rule returning anything but
a partition of `range(n)` raises a `ValueError` naming the problem.
"""

import dataclasses
import numpy as np

FACTORIZERS = ("pca", "svd", "nmf")
CLUSTERERS = ("kmeans", "agglomerative")
SIGNALS = ("gram", "flat")

_RULES = {}


def register_rule(name):
    """Decorator: makes a grouping rule `(factors, clusters, **knobs) -> groups` selectable by name."""

    def wrap(fn):
        _RULES[name] = fn
        return fn

    return wrap


def available_rules():
    return sorted(_RULES)


def get_rule(rule):
    """A rule function from a name or a callable."""
    if callable(rule):
        return rule
    if rule not in _RULES:
        raise ValueError(
            f"Unknown grouping rule {rule!r}; use one of {available_rules()} or a callable "
            "(factors, clusters) -> list of groups."
        )
    return _RULES[rule]


# --------------------------------------------------------------------- features
def _normalise_rows(a):
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.maximum(norms, 1e-30)


def gradient_features(gradients, layout, signal="gram", max_dim=64):
    """Per-unit feature vectors that are comparable across estimators.

    Args:
        gradients: `[n, P]` accumulated gradients, one row per unit, laid out
            as the estimator's variables `layout` (flattened, concatenated).
        layout: shapes of the estimator's variables; the first must be the
            first layer's kernel `[D, h]`.
        signal: `"gram"` or `"flat"` (see the module docstring).
        max_dim: for `"gram"`, the number of directions of the trunk's
            feature space kept before forming `G G^T`.

    Returns:
        `[n, F]` float64 with unit-norm rows (zero rows stay zero).
    """
    gradients = np.asarray(gradients, dtype=np.float64)
    if signal not in SIGNALS:
        raise ValueError(f"Unknown signal {signal!r}; use one of {SIGNALS}.")
    if signal == "flat":
        return _normalise_rows(gradients)
    if len(layout[0]) != 2:
        raise ValueError(f"signal='gram' needs a first estimator kernel [D, h]; got shape {layout[0]}.")
    d, h = layout[0]
    kernels = gradients[:, : d * h].reshape(-1, d, h)
    if len(layout) > 1 and tuple(layout[1]) == (h,):
        # The trunk's features are not centred (e.g. after a ReLU), so each
        # kernel gradient G = sum_i f_i delta_i^T carries a term f_mean b^T,
        # b = sum_i delta_i being the bias gradient: the same direction
        # f_mean for every task, weighted by task-specific noise. Estimate
        # f_mean by least squares over all units and remove that term, which
        # leaves sum_i (f_i - f_mean) delta_i^T.
        biases = gradients[:, d * h : d * h + h]
        denominator = float(np.sum(biases**2))
        if denominator > 0:
            f_mean = np.einsum("ndh,nh->d", kernels, biases) / denominator
            kernels = kernels - f_mean[None, :, None] * biases[:, None, :]
    # Scale each unit's kernel gradient to unit norm so that the projection
    # below is not dominated by the units that got the largest gradients.
    scale = np.linalg.norm(kernels.reshape(len(kernels), -1), axis=1)
    kernels = kernels / np.maximum(scale, 1e-30)[:, None, None]
    if d > max_dim:
        stacked = np.concatenate(list(kernels), axis=1)  # [D, n*h]
        u, _, _ = np.linalg.svd(stacked, full_matrices=False)
        kernels = np.einsum("dm,ndh->nmh", u[:, :max_dim], kernels)
    grams = np.einsum("nih,njh->nij", kernels, kernels)
    iu = np.triu_indices(grams.shape[1])
    # Off-diagonal entries appear twice in G G^T: weight them by sqrt(2) so
    # the dot product of feature vectors equals the Frobenius one.
    weights = np.where(iu[0] == iu[1], 1.0, np.sqrt(2.0))
    return _normalise_rows(grams[:, iu[0], iu[1]] * weights)


def affinity_matrix(features):
    """Pairwise cosine similarity `[n, n]` of feature rows."""
    f = _normalise_rows(np.asarray(features, dtype=np.float64))
    return np.clip(f @ f.T, -1.0, 1.0)


# ---------------------------------------------------------------------- factors
def _components_for(values, fraction):
    """Smallest k whose leading `values` (variances or energies) reach `fraction` of the total."""
    total = float(np.sum(values))
    if total <= 0:
        return 1
    return int(np.searchsorted(np.cumsum(values) / total, fraction) + 1)


def factorize(features, method="pca", n_components=0.9, seed=0):
    """Factors of the units x features matrix, one unit-norm row per unit.

    Args:
        features: `[n, F]` (see `gradient_features`).
        method: `"pca"`, `"svd"` or `"nmf"`.
        n_components: an int (at most `n - 1` are used) or a float in (0, 1),
            the fraction of variance/energy to keep.
        seed: random state of the factorizer.

    Returns:
        `[n, k]` float64 factors with L2-normalised rows.
    """
    from sklearn.decomposition import NMF, PCA, TruncatedSVD

    x = np.asarray(features, dtype=np.float64)
    n, f = x.shape
    if method not in FACTORIZERS:
        raise ValueError(f"Unknown factorizer {method!r}; use one of {FACTORIZERS}.")
    if isinstance(n_components, float):
        if not 0.0 < n_components < 1.0:
            raise ValueError(f"A float n_components is a fraction in (0, 1); got {n_components}.")
    elif not isinstance(n_components, (int, np.integer)) or n_components < 1:
        raise ValueError(f"n_components must be a positive int or a fraction in (0, 1); got {n_components!r}.")
    cap = max(1, min(n - 1, f))
    if n < 2:
        return _normalise_rows(x[:, :1] if f else np.ones((n, 1)))
    if method == "pca":
        full = PCA(n_components=cap, svd_solver="full", random_state=seed).fit(x)
        k = _components_for(full.explained_variance_, n_components) if isinstance(n_components, float) \
            else min(int(n_components), cap)
        factors = full.transform(x)[:, :k]
    elif method == "svd":
        k_max = max(1, min(cap, f - 1))
        svd = TruncatedSVD(n_components=k_max, algorithm="arpack" if k_max < min(n, f) else "randomized",
                           random_state=seed).fit(x)
        k = _components_for(svd.singular_values_**2, n_components) if isinstance(n_components, float) \
            else min(int(n_components), k_max)
        factors = svd.transform(x)[:, :k]
    else:
        mags = np.abs(x)
        if isinstance(n_components, float):
            s = np.linalg.svd(mags, compute_uv=False)
            k = min(_components_for(s**2, n_components), cap)
        else:
            k = min(int(n_components), cap)
        factors = NMF(n_components=k, init="nndsvda", max_iter=500, random_state=seed).fit_transform(mags)
    return _normalise_rows(factors)


# --------------------------------------------------------------------- clusters
@dataclasses.dataclass
class Clusters:
    """A clustering of the units' factors, as passed to a rule.

    Attributes:
        labels: cluster of each unit `[n]`.
        centers: `[K, k]` mean factor of each cluster.
        distances: `[n]` each unit's distance to its cluster's centre: the
            cosine distance (1 - cosine similarity) between the unit's
            gradient features and the mean features of the *other* members
            of its cluster (1.0 for a unit alone in its cluster). Leaving the
            unit out keeps it from pulling the centre to itself, so
            distances do not shrink with the cluster's size; measuring them
            on the features rather than on the (few, renormalised) factors
            keeps unrelated units far apart.
        affinity: `[n, n]` cosine similarity of the units' features.
        sizes: `[n]` number of tasks in each unit (> 1 for an earlier merge).
        silhouette: silhouette score of the clustering (nan when undefined).
        method: the clustering method.
        units: for each row, the task ids it holds (set by `group_units`
            when given; `SelectiveSharing` always gives them), so a custom
            rule can see which tasks it groups.
    """

    labels: np.ndarray
    centers: np.ndarray
    distances: np.ndarray
    affinity: np.ndarray
    sizes: np.ndarray
    silhouette: float = float("nan")
    method: str = "kmeans"
    units: list = None

    @property
    def n_clusters(self):
        return len(self.centers)


def _fit_clusters(factors, method, k, seed):
    from sklearn.cluster import AgglomerativeClustering, KMeans

    if k == 1:
        return np.zeros(len(factors), dtype=int)
    if method == "kmeans":
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(factors)
    return AgglomerativeClustering(n_clusters=k, metric="cosine", linkage="average").fit_predict(factors)


def cluster_factors(factors, features=None, method="kmeans", n_clusters=None, sizes=None, seed=0,
                    max_clusters=None):
    """Clusters units on their factors.

    Args:
        factors: `[n, k]` (see `factorize`).
        features: `[n, F]` the features the factors came from, in which
            `Clusters.distances` and `Clusters.affinity` are measured
            (default: the factors themselves).
        method: `"kmeans"` or `"agglomerative"`.
        n_clusters: number of clusters, or None to pick the one in
            `[2, min(n - 1, max_clusters)]` with the best silhouette score.
        sizes: tasks per unit (default all 1).
        seed: random state of KMeans.
        max_clusters: upper bound of the automatic search.

    Returns:
        `Clusters`.
    """
    from sklearn.metrics import silhouette_score

    factors = np.asarray(factors, dtype=np.float64)
    n = len(factors)
    if method not in CLUSTERERS:
        raise ValueError(f"Unknown clusterer {method!r}; use one of {CLUSTERERS}.")
    sizes = np.ones(n, dtype=int) if sizes is None else np.asarray(sizes, dtype=int)
    if n_clusters is not None and not 1 <= int(n_clusters) <= max(n, 1):
        raise ValueError(f"n_clusters must be in [1, {n}] (the number of units); got {n_clusters}.")

    def score(labels):
        if len(set(labels)) < 2 or len(set(labels)) >= n:
            return float("nan")
        return float(silhouette_score(factors, labels, metric="euclidean"))

    if n_clusters is not None:
        k = min(int(n_clusters), n)
        labels = _fit_clusters(factors, method, k, seed)
        sil = score(labels)
    elif n <= 2:
        labels, sil = np.zeros(n, dtype=int), float("nan")
    else:
        upper = min(n - 1, max_clusters or n - 1)
        best = None
        for k in range(2, upper + 1):
            labels_k = _fit_clusters(factors, method, k, seed)
            s = score(labels_k)
            if best is None or s > best[0] + 1e-12:
                best = (s, labels_k)
        sil, labels = best
    # Relabel 0..K-1 in order of first appearance; centres are member means.
    _, labels = np.unique(labels, return_inverse=True)
    centers = np.stack([factors[labels == c].mean(axis=0) for c in range(labels.max() + 1)])
    feats = _normalise_rows(np.asarray(factors if features is None else features, dtype=np.float64))
    distances = np.ones(n)
    for i in range(n):
        others = (labels == labels[i]) & (np.arange(n) != i)
        if others.any():
            centre = feats[others].mean(axis=0)
            distances[i] = 1.0 - float(feats[i] @ centre) / max(float(np.linalg.norm(centre)), 1e-30)
    return Clusters(labels=labels, centers=centers, distances=distances, affinity=affinity_matrix(feats),
                    sizes=sizes, silhouette=sil, method=method)


# ------------------------------------------------------------------------ rules
def _cap_split(members, sizes, max_group_size):
    """Splits an ordered member list into consecutive chunks of at most `max_group_size` tasks."""
    if not max_group_size:
        return [members]
    chunks, current, used = [], [], 0
    for m in members:
        if current and used + sizes[m] > max_group_size:
            chunks.append(current)
            current, used = [], 0
        current.append(m)
        used += sizes[m]
    if current:
        chunks.append(current)
    return chunks


@register_rule("similarity")
def similarity_rule(factors, clusters, threshold=0.7, max_group_size=None):
    """Merges the members of a cluster that lie within `threshold` of its centre.

    Args:
        factors: `[n, k]` unit-norm factors.
        clusters: `Clusters` of the factors.
        threshold: largest distance to the cluster centre
            (`clusters.distances`, a cosine distance in [0, 2]) for a unit to
            join its cluster's group; units further away stay alone. 0.7
            means a cosine similarity of at least 0.3 to the rest of the
            cluster.
        max_group_size: most tasks per group; a larger cluster is cut into
            groups of members in order of closeness to the centre.

    Returns:
        A partition of `range(n)`.
    """
    groups = []
    for c in range(clusters.n_clusters):
        members = np.flatnonzero(clusters.labels == c)
        members = members[np.argsort(clusters.distances[members], kind="stable")]
        close = [int(m) for m in members if clusters.distances[m] <= threshold]
        groups += [[int(m)] for m in members if clusters.distances[m] > threshold]
        groups += _cap_split(close, clusters.sizes, max_group_size)
    return groups


@register_rule("variance")
def variance_rule(factors, clusters, threshold=0.7, max_group_size=None):
    """Groups units from different clusters so a shared estimator sees high-variance signal.

    Args:
        factors: `[n, k]` unit-norm factors.
        clusters: `Clusters` of the factors.
        threshold: smallest cosine distance (`1 - clusters.affinity`)
            between a candidate and every current member for the candidate
            to join: only complementary, not redundant, signal is combined.
        max_group_size: most tasks per group (None: one unit per cluster).

    Returns:
        A partition of `range(n)`.
    """
    factors = np.asarray(factors, dtype=np.float64)
    n = len(factors)
    sizes = clusters.sizes
    spread = np.linalg.norm(factors - factors.mean(axis=0), axis=1)
    unassigned = set(range(n))
    groups = []
    while unassigned:
        seed = max(unassigned, key=lambda i: (spread[i], -i))
        group, used = [seed], int(sizes[seed])
        unassigned.discard(seed)
        while True:
            taken = {int(clusters.labels[m]) for m in group}
            candidates = [
                i for i in unassigned
                if int(clusters.labels[i]) not in taken
                and (not max_group_size or used + sizes[i] <= max_group_size)
                and min(1.0 - clusters.affinity[i, m] for m in group) >= threshold
            ]
            if not candidates:
                break

            def variance_with(i):
                f = factors[group + [i]]
                return float(np.mean(np.sum((f - f.mean(axis=0)) ** 2, axis=1)))

            best = max(candidates, key=lambda i: (variance_with(i), -i))
            group.append(best)
            used += int(sizes[best])
            unassigned.discard(best)
        groups.append(sorted(group))
    return groups


def validate_groups(groups, n, max_group_size=None, sizes=None):
    """Checks that `groups` is a partition of `range(n)` and returns it canonically sorted.

    Raises:
        ValueError: naming the problem (not a list of lists, a non-integer or
            out-of-range index, a unit in two groups or in none, a group over
            `max_group_size` tasks).
    """
    fix = "a grouping rule must return a partition of range(n): a list of lists of unit indices, each index exactly once"
    if isinstance(groups, (str, bytes)) or not hasattr(groups, "__iter__"):
        raise ValueError(f"Invalid grouping {groups!r}: {fix}.")
    seen = {}
    out = []
    for g in groups:
        if isinstance(g, (str, bytes)) or not hasattr(g, "__iter__"):
            raise ValueError(f"Invalid group {g!r} (not a list): {fix}.")
        members = []
        for m in g:
            if isinstance(m, (bool, np.bool_)) or not isinstance(m, (int, np.integer)):
                raise ValueError(f"Invalid unit index {m!r} in group {list(g)!r}: {fix}.")
            m = int(m)
            if not 0 <= m < n:
                raise ValueError(f"Unit index {m} in group {list(g)!r} is outside range({n}): {fix}.")
            if m in seen:
                raise ValueError(f"Unit {m} is in two groups ({seen[m]!r} and {list(g)!r}): {fix}.")
            seen[m] = list(g)
            members.append(m)
        if members:
            out.append(sorted(members))
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        raise ValueError(f"Units {missing} are in no group: {fix} (put a unit left alone in its own [i]).")
    if max_group_size and sizes is not None:
        for g in out:
            if sum(int(sizes[m]) for m in g) > max_group_size and len(g) > 1:
                raise ValueError(
                    f"Group {g} has {sum(int(sizes[m]) for m in g)} tasks, more than "
                    f"max_group_size={max_group_size}."
                )
    return sorted(out)


# --------------------------------------------------------------------- pipeline
@dataclasses.dataclass
class Grouping:
    """The outcome of `group_units`.

    Attributes:
        groups: a partition of the units (sorted lists of row indices).
        features: `[n, F]` unit features.
        factors: `[n, k]` unit-norm factors.
        clusters: the `Clusters`.
        affinity: `[n, n]` cosine similarity of the features.
    """

    groups: list
    features: np.ndarray
    factors: np.ndarray
    clusters: Clusters
    affinity: np.ndarray


def group_units(
    gradients,
    layout,
    rule="similarity",
    signal="gram",
    factorizer="pca",
    n_components=0.9,
    clusterer="kmeans",
    n_clusters=None,
    threshold=0.7,
    max_group_size=None,
    sizes=None,
    max_dim=64,
    units=None,
    seed=0,
):
    """Groups units (estimators) by their accumulated gradients.

    Args:
        gradients: `[n, P]` accumulated gradients of the units.
        layout: the estimator's variable shapes (`GradientCollector.layout`).
        rule: `"similarity"`, `"variance"`, a registered name, or a callable
            `(factors, clusters) -> groups`.
        signal, max_dim: see `gradient_features`.
        factorizer, n_components: see `factorize`.
        clusterer, n_clusters: see `cluster_factors`.
        threshold, max_group_size: knobs of the built-in rules.
        sizes: tasks per unit (default 1 each).
        units: optional task ids of each unit, passed on as `clusters.units`.
        seed: random state.

    Returns:
        A `Grouping`.

    Example:

    >>> result = group_units(sums, collector.layout, rule="similarity")
    >>> result.groups
    [[0, 3, 5], [1], [2, 4]]
    """
    rule_fn = get_rule(rule)
    gradients = np.asarray(gradients, dtype=np.float64)
    n = len(gradients)
    sizes = np.ones(n, dtype=int) if sizes is None else np.asarray(sizes, dtype=int)
    if max_group_size is not None and (not isinstance(max_group_size, (int, np.integer)) or max_group_size < 1):
        raise ValueError(f"max_group_size must be None or a positive int, got {max_group_size!r}.")
    features = gradient_features(gradients, layout, signal=signal, max_dim=max_dim)
    factors = factorize(features, method=factorizer, n_components=n_components, seed=seed)
    clusters = cluster_factors(factors, features, method=clusterer, n_clusters=n_clusters, sizes=sizes, seed=seed)
    clusters.units = None if units is None else [list(u) for u in units]
    if rule_fn in _RULES.values():
        groups = rule_fn(factors, clusters, threshold=threshold, max_group_size=max_group_size)
    else:
        groups = rule_fn(factors, clusters)
    groups = validate_groups(groups, n, max_group_size=max_group_size, sizes=sizes)
    return Grouping(groups=groups, features=features, factors=factors, clusters=clusters,
                    affinity=affinity_matrix(features))


def groups_to_labels(groups, n):
    """Partition -> label per unit (the group's index), e.g. for `adjusted_rand_score`."""
    labels = np.full(n, -1, dtype=int)
    for g, members in enumerate(groups):
        labels[list(members)] = g
    return labels


