"""Selective Sharing: tasks whose estimator gradients group together share one estimator.

- `GradientCollector` (`gradients.py`): the per-estimator gradients, accumulated
  in the train step itself (one backward pass), summed over replicas.
- `group_units` and the rules (`grouping.py`): gradient features, factorization
  (PCA / TruncatedSVD / NMF), clustering (KMeans / agglomerative) and the
  `similarity` / `variance` / user-defined grouping rules.
- `SelectiveSharing` (`callback.py`): the Keras callback that merges estimators
  during `fit()` and records every merge.
- `selective_sharing` (`named.py`): the callback by the name the apps'
  `--sharing` flag gives (`"predictions"`, with its probe from the
  validation data, or a rule); `probe_inputs` (`probe.py`) draws a probe.
- `planted_families` (`planted.py`): a synthetic problem with known task
  families, to measure how well groups are recovered.
"""

from mtl_keras.sharing.callback import SelectiveSharing
from mtl_keras.sharing.probe import DEFAULT_PROBE_SIZE, probe_inputs
from mtl_keras.sharing.gradients import GradientCollector
from mtl_keras.sharing.grouping import (
    Clusters,
    Grouping,
    affinity_matrix,
    available_rules,
    cluster_factors,
    factorize,
    get_rule,
    gradient_features,
    group_units,
    groups_to_labels,
    register_rule,
    similarity_rule,
    validate_groups,
    variance_rule,
)
from mtl_keras.sharing.named import PREDICTIONS, selective_sharing, sharing_names, sharing_options
from mtl_keras.sharing.planted import PlantedProblem, planted_families, planted_model
from mtl_keras.sharing.plots import plot_affinity
