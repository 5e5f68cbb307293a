"""SelectiveSharing: learn which tasks share an estimator from their gradients, during fit().

The callback implements Selective Sharing (Strezoski, van Noord and Worring,
ICMR 2019) on a `MultiTaskModel`:

1. **Collect.** From the start of each evidence window it accumulates, in the
   train step itself, the gradient that reaches every live estimator
   (`gradients.GradientCollector`: one pass, no extra tapes, summed over
   replicas under a distribution strategy).
2. **Group.** At each scheduled epoch end it turns the accumulated gradients
   into groups of estimators (`grouping.group_units`: features, factorization,
   clustering and a rule, see that module for each step's exact definition).
3. **Merge.** Tasks of a group then share one estimator: the one whose tasks
   have the lowest validation loss (`keep="loss"`, see below); the other
   estimators are dropped from the model (`model.set_estimator_of_task`),
   each task keeps its own output layer, and training goes on in the same
   `fit()` call with the optimizer state of every surviving weight. A task
   moved onto another estimator has its output layer refitted (ridge
   regression, `readout.refit_plan`) to reproduce its pre-merge logits from
   the new estimator's features on `refit_inputs` (default: the probe), so
   the merge does not throw away what the task had learnt; the fit's R² per
   task goes to `history` (`"refit"`).
4. **Record.** Each check is written to `history` (for a report), to the
   epoch logs, to TensorBoard (an affinity heatmap image and the groups as
   text) and, with `plot_dir`, to a PNG heatmap with a dendrogram.

**Schedule.** Epochs are counted from 1. A check happens at the end of epoch
`n` when `n >= start_epoch`, `(n - start_epoch) % every == 0`, `n <=
stop_epoch` (if set) and fewer than `max_merges` merges happened. Its
evidence is the gradients of the `window` epochs up to and including `n`
(the accumulators restart at the beginning of epoch `n - window + 1`), so
`window <= every`. After the last possible check the collector is detached
and the train step runs at full speed again.

**Units and finality.** Grouping works on the *estimators alive* (units): a
group formed by an earlier merge is one unit from then on, with one summed
gradient; it can join other units later but never splits. Merges are final:
a dropped estimator cannot come back, so a task never leaves its group.

**Minimum evidence.** A unit whose tasks contributed fewer than
`min_evidence` (weighted) training examples in the window, or got no
gradient at all, is left out of the grouping and stays as it is.

**Which estimator survives** (`keep`): `"loss"` keeps the estimator whose
tasks have the lowest mean `val_<task>/loss` at that epoch end (the training
`<task>/loss` if there is no validation data): the estimator that serves its
own tasks best is the best placed to serve the group. Losses of tasks of
different kinds or class counts are on different scales; `"central"` keeps
instead the unit closest to its cluster's centre in factor space, and
`"first"` the lowest head index.

**Persistence.** The grouping is the model's `estimator_of_task`, part of its
config, so `.keras` files and SavedModel exports hold the merged model. To
resume with `keras.callbacks.BackupAndRestore(backup_dir)`, give this
callback the same `backup_dir` and put it *before* `BackupAndRestore` in the
callbacks list: it records every merge in `backup_dir/selective_sharing.json`
and, at `on_train_begin`, re-applies the merges of the epochs the backup
covers before the backup's weights are loaded into the (re-merged) model.
The accumulated gradients are not saved: a resumed run restarts its window.

**The predictions signal and the gate** (`signal="predictions"`, needs
`probe`). Instead of estimator gradients, each check takes every head's
logits on the `probe` inputs (`predictions.head_logits`) and compares tasks
by linear CKA of their centred logits (`predictions.prediction_affinity`): tasks
that share one labelling rule and differ by independent label noise get
nearly the same predictions, while their gradients are dominated by each
task's own mislabelled examples. Groups are proposed (`proposal`: the
best-silhouette clusters above the floor `min_affinity`, or average linkage
down to it) and merged only if they pass the gate (`gate.gated_grouping`):
above a permutation null, stable over `bootstrap` resamples of the probe
(`min_stability`), and more related inside than to any other group. The
gate's figures for every proposed group go to `history` (`"gate"`), to the
epoch logs (`sharing/gate_proposed`, `sharing/gate_passed`,
`sharing/gate_min_stability`) and to TensorBoard (a table). No gradient is
collected with this signal, and `window` plays no part: the evidence is the
model as it is at the check.

Put this callback before `TensorBoard`/`CSVLogger` in the list so that they
see the `sharing/...` entries it adds to the epoch logs.
"""

import contextlib
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

from mtl_keras.batch_norm import serving_statistics
from mtl_keras.sharing.gate import PROPOSALS, PredictionEvidence, gated_grouping
from mtl_keras.sharing.gradients import GradientCollector
from mtl_keras.sharing.grouping import CLUSTERERS, FACTORIZERS, SIGNALS, get_rule, group_units
from mtl_keras.sharing.predictions import head_logits
from mtl_keras.sharing.readout import apply_refit, refit_plan
from mtl_keras.sharing.readout import summarize as summarize_refit

# "predictions" compares what the heads predict on a probe batch (see
# `predictions.py`) and merges through the gate (`gate.py`); the others are
# the authors' estimator-gradient pipeline (`grouping.py`).
ALL_SIGNALS = SIGNALS + ("predictions",)

KEEP = ("loss", "central", "first")
STATE_FILE = "selective_sharing.json"


class SelectiveSharing(keras.callbacks.Callback):
    """Merges task estimators whose accumulated gradients group together, during `fit()`.

    Args:
        rule: `"similarity"` (default), `"variance"`, or a callable
            `(factors, clusters) -> groups` (see `grouping`).
        start_epoch: first epoch (counting from 1) at whose end a check may
            happen.
        every: epochs between checks.
        window: epochs of gradients each check looks at (`1 <= window <=
            every`).
        max_merges: most checks that change the grouping (None: no limit).
        stop_epoch: last epoch at whose end a check may happen (None: none).
        min_evidence: weighted training examples a unit needs in the window
            to take part.
        threshold: the rule's distance threshold (see `grouping`).
        max_group_size: most tasks sharing one estimator (None: no limit).
        signal: `"gram"` or `"flat"` estimator-gradient features (the
            authors' pipeline), `"predictions"` (heads' predictions on
            `probe`, through the gate; see above), or `"auto"` (default):
            `"predictions"` when a `probe` is given, else `"gram"`. On
            real-image planted families the predictions signal recovers the
            families where the gradient features do not (docs/GROUPING.md).
        factorizer: `"pca"`, `"svd"` or `"nmf"`.
        n_components: factors kept (int, or a fraction of variance).
        clusterer: `"kmeans"` or `"agglomerative"`.
        n_clusters: number of clusters (None: best silhouette).
        keep: which estimator of a group survives: `"loss"`, `"central"` or
            `"first"`.
        max_dim: trunk directions kept by the `"gram"` features.
        log_dir: TensorBoard folder; summaries go to `log_dir/sharing`.
        plot_dir: folder for a heatmap PNG per check.
        backup_dir: folder shared with `BackupAndRestore` (see above).
        probe: for `signal="predictions"`: the inputs every head predicts
            on (an image array, or a dict with `"image"`; a `"task"` key is
            ignored). A few hundred examples, ideally not trained on.
        min_affinity: for `"predictions"`: the least mean CKA for tasks to
            group (with `proposal="threshold"` the cut, with `"silhouette"`
            a floor; 0.3 keeps out the chance agreement of unrelated rules,
            at most about 0.3 on the null sets of docs/GROUPING.md).
        proposal: how `"predictions"` proposes groups before the gate:
            `"silhouette"` (default: best-silhouette clusters, `min_affinity`
            a floor; the cut adapts to how alike one family's heads are, which
            drops with label noise) or `"threshold"` (average linkage down to
            `min_affinity`); see `gate.gated_grouping`.
        bootstrap, min_stability, null_permutations: the gate's resamples,
            least stability, and permutations of the null (see `gate`).
        split_refused: for `"predictions"`: a refused group of three or
            more units is split in two and each half gated again (see
            `gate`); False leaves all its units alone.
        calibrate_batch_norm: read the heads (`"predictions"`) and refit
            with the trunk's batch-norm statistics re-estimated on
            `refit_inputs` (default: the probe) and put back after the check
            (`batch_norm.serving_statistics`): early in training the moving
            averages do not serve yet (momentum 0.99: hundreds of steps), and
            a model read through them predicts at chance, whose heads all look
            alike. False reads the model with its moving averages.
        refit_outputs: refit moved tasks' output layers at a merge (see
            above); False keeps them as they were (the authors' merge).
        refit_inputs: inputs the refit is made on (images, or a dict with
            `"image"`; labels are not used); default: `probe`. Without
            either, output layers are kept as they were.
        seed: random state of factorization, clustering and the gate.
        verbose: 1 prints each merge.

    Attributes:
        history: one dict per check (epoch, groups, rule, distances,
            parameters before/after, ...), JSON-serialisable.

    Example:

    >>> sharing = SelectiveSharing("similarity", start_epoch=1, log_dir="logs")
    >>> model.fit(train, validation_data=val, epochs=10,
    ...           callbacks=[sharing, keras.callbacks.TensorBoard("logs")])
    >>> sharing.report()["merges"][0]["groups"]
    [['Latin', 'Greek'], ['Korean'], ...]
    """

    def __init__(
        self,
        rule="similarity",
        start_epoch=1,
        every=1,
        window=1,
        max_merges=1,
        stop_epoch=None,
        min_evidence=1.0,
        threshold=0.7,
        max_group_size=None,
        signal="auto",
        factorizer="pca",
        n_components=0.9,
        clusterer="kmeans",
        n_clusters=None,
        keep="loss",
        max_dim=64,
        log_dir=None,
        plot_dir=None,
        backup_dir=None,
        probe=None,
        min_affinity=0.3,
        proposal="silhouette",
        bootstrap=50,
        min_stability=0.9,
        null_permutations=20,
        split_refused=True,
        calibrate_batch_norm=True,
        refit_outputs=True,
        refit_inputs=None,
        seed=0,
        verbose=1,
    ):
        super().__init__()
        get_rule(rule)  # fails early on an unknown name
        for name, value in (("start_epoch", start_epoch), ("every", every), ("window", window)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int (epochs, counted from 1); got {value!r}.")
        if window > every:
            raise ValueError(
                f"window ({window}) must be <= every ({every}): the gradient accumulators restart "
                "after each check, so a check can only look at the epochs since the previous one."
            )
        if max_merges is not None and (not isinstance(max_merges, (int, np.integer)) or max_merges < 1):
            raise ValueError(f"max_merges must be None or a positive int; got {max_merges!r}.")
        if stop_epoch is not None and stop_epoch < start_epoch:
            raise ValueError(f"stop_epoch ({stop_epoch}) is before start_epoch ({start_epoch}): no check would run.")
        if min_evidence < 0:
            raise ValueError(f"min_evidence must be >= 0; got {min_evidence!r}.")
        if max_group_size is not None and (not isinstance(max_group_size, (int, np.integer)) or max_group_size < 2):
            raise ValueError(f"max_group_size must be None or an int >= 2; got {max_group_size!r}.")
        if signal == "auto":
            signal = "gram" if probe is None else "predictions"
        for name, value, options in (("signal", signal, ALL_SIGNALS), ("factorizer", factorizer, FACTORIZERS),
                                     ("clusterer", clusterer, CLUSTERERS), ("keep", keep, KEEP)):
            if value not in options:
                raise ValueError(f"Unknown {name} {value!r}; use one of {options}.")
        if signal == "predictions" and probe is None:
            raise ValueError(
                "signal='predictions' compares the heads' predictions on a probe batch: pass "
                "probe=<inputs> (e.g. a few hundred validation images)."
            )
        if not 0.0 <= min_affinity <= 1.0:
            raise ValueError(f"min_affinity is a CKA in [0, 1]; got {min_affinity!r}.")
        self.probe = probe
        self.split_refused = bool(split_refused)
        self.calibrate_batch_norm = bool(calibrate_batch_norm)
        self.refit_outputs = bool(refit_outputs)
        self.refit_inputs = refit_inputs
        self._last_refit = None
        self.min_affinity = float(min_affinity)
        if proposal not in PROPOSALS:
            raise ValueError(f"Unknown proposal {proposal!r}; use one of {sorted(PROPOSALS)}.")
        self.proposal = proposal
        self.bootstrap = int(bootstrap)
        self.min_stability = float(min_stability)
        self.null_permutations = int(null_permutations)
        self.rule = rule
        self.start_epoch = int(start_epoch)
        self.every = int(every)
        self.window = int(window)
        self.max_merges = max_merges
        self.stop_epoch = stop_epoch
        self.min_evidence = float(min_evidence)
        self.threshold = float(threshold)
        self.max_group_size = max_group_size
        self.signal = signal
        self.factorizer = factorizer
        self.n_components = n_components
        self.clusterer = clusterer
        self.n_clusters = n_clusters
        self.keep = keep
        self.max_dim = int(max_dim)
        self.log_dir = log_dir
        self.plot_dir = plot_dir
        self.backup_dir = backup_dir
        self.seed = seed
        self.verbose = verbose
        self.history = []
        self.collector = None
        self._writer = None
        self._window_open = False

    # ------------------------------------------------------------- schedule
    @property
    def _fit_inputs(self):
        """What the refit (and the batch-norm calibration) runs on: `refit_inputs`, else the probe."""
        return self.refit_inputs if self.refit_inputs is not None else self.probe

    @property
    def rule_name(self):
        if self.signal == "predictions":  # the gate groups; the gradient rule is not used
            return "predictions+gate"
        return self.rule if isinstance(self.rule, str) else getattr(self.rule, "__name__", "custom")

    @property
    def uses_gradients(self):
        return self.signal in SIGNALS

    @property
    def merges(self):
        return sum(1 for h in self.history if h["merged"])

    def is_check_epoch(self, n):
        """Whether a check happens at the end of epoch `n` (counted from 1)."""
        if n < self.start_epoch or (n - self.start_epoch) % self.every:
            return False
        if self.stop_epoch is not None and n > self.stop_epoch:
            return False
        return self.max_merges is None or self.merges < self.max_merges

    def _next_check(self, n):
        """The first check epoch >= n, or None."""
        if self.max_merges is not None and self.merges >= self.max_merges:
            return None
        first = max(n, self.start_epoch)
        first += (-(first - self.start_epoch)) % self.every
        if self.stop_epoch is not None and first > self.stop_epoch:
            return None
        return first

    # ------------------------------------------------------------ callbacks
    def set_model(self, model):
        if not hasattr(model, "set_estimator_of_task") or not hasattr(model, "heads"):
            raise ValueError(
                f"SelectiveSharing works on a mtl_keras MultiTaskModel; got {type(model).__name__}."
            )
        if not model.task_heads.hidden_units:
            # Only the estimators are shared; the output layers differ in size.
            raise ValueError(
                "SelectiveSharing merges the task heads' estimators, and these heads have none "
                "(head_units=()): build the model with estimator layers, e.g. "
                "MultiTaskModel(..., head_units=(128,)) (apps: --head-units 128)."
            )
        if self.collector is not None and self.collector.model is not model:
            self.collector.detach()
            self.collector = None
        super().set_model(model)

    def on_train_begin(self, logs=None):
        self._restore_state()
        self._window_open = False
        if self._next_check(1) is not None and self.collector is None and self.uses_gradients:
            # The accumulators are created here, before the train step is
            # traced, never inside it.
            self.collector = GradientCollector(self.model)
        if self.log_dir and self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "sharing"))

    def on_epoch_begin(self, epoch, logs=None):
        n = epoch + 1
        check = self._next_check(n)
        if self.collector is None:
            return
        if check is None or n < check - self.window + 1:
            # Outside every window: the train step runs without collecting.
            self.collector.detach()
            self._window_open = False
            return
        self.collector.attach()
        if not self._window_open:
            self.collector.reset()
            self._window_open = True

    def on_train_end(self, logs=None):
        if self.collector is not None:
            self.collector.detach()
        if self._writer is not None:
            self._writer.flush()

    def on_epoch_end(self, epoch, logs=None):
        n = epoch + 1
        logs = logs if logs is not None else {}
        if self.is_check_epoch(n) and not self.uses_gradients:
            self._check_predictions(n, logs)
        elif self.is_check_epoch(n) and self.collector is not None and self._window_open:
            self._check(n, logs)
            self._window_open = False
        model = self.model
        logs["sharing/estimators"] = float(len(model.estimator_owners))
        logs["sharing/head_parameters"] = float(model.head_parameter_count())

    # ---------------------------------------------------------------- check
    def _keeper(self, units, owners, unit_tasks, logs, grouping, rows):
        if self.keep == "first":
            return min(owners[u] for u in units)
        if self.keep == "loss":
            names = self.model.tasks.names
            for prefix in ("val_", ""):
                keys = [[f"{prefix}{names[t]}/loss" for t in unit_tasks[u]] for u in units]
                if all(k in logs for ks in keys for k in ks):
                    losses = [float(np.mean([logs[k] for k in ks])) for ks in keys]
                    return owners[units[int(np.argmin(losses))]]
        # "central", and "loss" without per-task losses in the logs.
        distances = grouping.clusters.distances if hasattr(grouping, "clusters") else grouping.distances
        return owners[units[int(np.argmin([distances[rows.index(u)] for u in units]))]]

    def _check(self, n, logs):
        model = self.model
        names = list(model.tasks.names)
        sums, counts, steps = self.collector.read()
        owners = model.estimator_owners
        groups = model.task_groups
        unit_tasks = [groups[o] for o in owners]
        evidence = [float(sum(counts[t] for t in ts)) for ts in unit_tasks]
        rows = [
            u for u, o in enumerate(owners)
            if evidence[u] >= self.min_evidence and np.any(sums[o] != 0)
        ]
        record = {
            "epoch": n,
            "rule": self.rule_name,
            "steps": steps,
            "units": [[names[t] for t in ts] for ts in unit_tasks],
            "evidence": {names[owners[u]]: evidence[u] for u in range(len(owners))},
            "merged": False,
        }
        if len(rows) < 2:
            record["skipped"] = f"{len(rows)} unit(s) with enough evidence (min_evidence={self.min_evidence})"
            self.history.append(record)
            return
        grouping = group_units(
            sums[[owners[u] for u in rows]],
            self.collector.layout,
            rule=self.rule,
            signal=self.signal,
            factorizer=self.factorizer,
            n_components=self.n_components,
            clusterer=self.clusterer,
            n_clusters=self.n_clusters,
            threshold=self.threshold,
            max_group_size=self.max_group_size,
            sizes=[len(unit_tasks[u]) for u in rows],
            units=[unit_tasks[u] for u in rows],
            max_dim=self.max_dim,
            seed=self.seed,
        )
        with self._serving_statistics():  # the refit reads the model as it serves
            kept, dropped, params_before, heads_before = self._merge(grouping.groups, rows, owners, unit_tasks,
                                                                     logs, grouping)
        unit_names = [names[owners[u]] for u in rows]
        record.update(
            merged=bool(dropped),
            groups=[[names[t] for t in ts] for _, ts in sorted(model.task_groups.items())],
            kept=kept,
            dropped_estimators=[names[i] for i in dropped],
            estimator_of_task=list(model.estimator_of_task),
            clustered_units=unit_names,
            cluster_of_unit=dict(zip(unit_names, grouping.clusters.labels.tolist())),
            distance_to_centre=dict(zip(unit_names, np.round(grouping.clusters.distances, 4).tolist())),
            n_clusters=int(grouping.clusters.n_clusters),
            silhouette=None if np.isnan(grouping.clusters.silhouette) else round(float(grouping.clusters.silhouette), 4),
            n_factors=int(grouping.factors.shape[1]),
            affinity=np.round(grouping.affinity, 4).tolist(),
            parameters_before=int(params_before),
            parameters_after=int(model.count_params()),
            head_parameters_before=int(heads_before),
            head_parameters_after=int(model.head_parameter_count()),
            refit=self._last_refit,
        )
        self.history.append(record)
        if self.verbose and dropped:
            merged = "; ".join(f"{', '.join(ts)} -> {k}" for k, ts in kept.items())
            print(
                f"\nSelectiveSharing ({self.rule_name}) epoch {n}: {merged}. Estimators "
                f"{len(owners)} -> {len(model.estimator_owners)}, parameters {params_before:,} -> "
                f"{record['parameters_after']:,}."
            )
        self._write_summaries(n, record, grouping, unit_names, steps)
        self._save_state()

    def _merge(self, groups, rows, owners, unit_tasks, logs, grouping):
        """Merges each group of >= 2 units; returns `(kept, dropped, params_before, heads_before)`."""
        model = self.model
        names = list(model.tasks.names)
        new_owner = {o: o for o in owners}
        kept = {}
        for group in groups:
            units = [rows[i] for i in group]
            if len(units) < 2:
                continue
            keeper = self._keeper(units, owners, unit_tasks, logs, grouping, rows)
            for u in units:
                new_owner[owners[u]] = keeper
            kept[names[keeper]] = [names[t] for u in units for t in unit_tasks[u]]
        estimator_of_task = [new_owner[o] for o in model.estimator_of_task]
        params_before, heads_before = model.count_params(), model.head_parameter_count()
        dropped = []
        self._last_refit = None
        if estimator_of_task != list(model.estimator_of_task):
            inputs = self._fit_inputs
            plan = (refit_plan(model, inputs, estimator_of_task)
                    if self.refit_outputs and inputs is not None else {})
            dropped = model.set_estimator_of_task(estimator_of_task)
            apply_refit(model, plan)
            self._last_refit = summarize_refit(plan, names)
        return kept, dropped, params_before, heads_before

    def _check_predictions(self, n, logs):
        """A check on the heads' predictions on the probe, through the gate, read with batch-norm statistics
        that serve (`calibrate_batch_norm`)."""
        started = time.perf_counter()
        with self._serving_statistics() as batches:
            self._check_predictions_now(n, logs, started, batches)

    def _serving_statistics(self):
        """A block in which the model serves with batch-norm statistics of `_fit_inputs` (see `calibrate_batch_norm`)."""
        if self.calibrate_batch_norm and self._fit_inputs is not None:
            return serving_statistics(self.model, self._fit_inputs, seed=self.seed)
        return contextlib.nullcontext(0)

    def _check_predictions_now(self, n, logs, started, calibration_batches):
        model = self.model
        names = list(model.tasks.names)
        owners = model.estimator_owners
        groups = model.task_groups
        unit_tasks = [groups[o] for o in owners]
        rows = list(range(len(owners)))
        logits = head_logits(model, self.probe)
        widths = [int(w) for w in model.table.num_outputs]
        evidence = PredictionEvidence(logits, units=unit_tasks, widths=widths)
        result = gated_grouping(
            evidence, threshold=self.min_affinity, bootstrap=self.bootstrap, min_stability=self.min_stability,
            null_permutations=self.null_permutations, sizes=[len(ts) for ts in unit_tasks],
            max_group_size=self.max_group_size, seed=self.seed, proposal=self.proposal,
            split_refused=self.split_refused,
        )
        # For keep="central": the unit least related to the rest of its group is the farthest.
        a = result.affinity
        result.distances = np.array([
            1.0 - (float(np.mean([a[i, j] for j in g if j != i])) if len(g) > 1 else 0.0)
            for i in range(len(a)) for g in [next(g for g in result.groups if i in g)]
        ])
        kept, dropped, params_before, heads_before = self._merge(result.groups, rows, owners, unit_tasks, logs,
                                                                 result)
        unit_names = [names[o] for o in owners]
        gate = [{**c.as_dict(), "group": [unit_names[u] for u in c.group]} for c in result.checks]
        record = {
            "epoch": n,
            "rule": "predictions+gate",
            "signal": "predictions",
            "probe_rows": int(evidence.num_rows),
            "units": [[names[t] for t in ts] for ts in unit_tasks],
            "merged": bool(dropped),
            "groups": [[names[t] for t in ts] for _, ts in sorted(model.task_groups.items())],
            "proposed_groups": [[unit_names[u] for u in g] for g in result.proposed],
            "gate": gate,
            "null_threshold": round(result.null_threshold, 4),
            "kept": kept,
            "dropped_estimators": [names[i] for i in dropped],
            "estimator_of_task": list(model.estimator_of_task),
            "clustered_units": unit_names,
            "affinity": np.round(result.affinity, 4).tolist(),
            "parameters_before": int(params_before),
            "parameters_after": int(model.count_params()),
            "head_parameters_before": int(heads_before),
            "head_parameters_after": int(model.head_parameter_count()),
            "refit": self._last_refit,
            "batch_norm_calibration_batches": int(calibration_batches),
            # The check's own cost (logits, gate, merge, refit): what sharing adds to a run.
            "seconds": round(time.perf_counter() - started, 3),
        }
        self.history.append(record)
        logs["sharing/gate_proposed"] = float(len(gate))
        logs["sharing/gate_passed"] = float(sum(c["passed"] for c in gate))
        logs["sharing/gate_min_stability"] = float(min((c["stability"] for c in gate), default=1.0))
        if self.verbose and dropped:
            merged = "; ".join(f"{', '.join(ts)} -> {k}" for k, ts in kept.items())
            print(f"\nSelectiveSharing (predictions + gate) epoch {n}: {merged}. Estimators "
                  f"{len(owners)} -> {len(model.estimator_owners)}.")
        self._write_summaries(n, record, result, unit_names, 0)
        self._save_state()

    # ------------------------------------------------------------ recording
    def _write_summaries(self, n, record, grouping, unit_names, steps):
        if self._writer is None and not self.plot_dir:
            return
        from mtl_keras.sharing.plots import plot_affinity

        title = f"Selective Sharing ({self.rule_name}), epoch {n}: gradient affinity of {len(unit_names)} estimators"
        png = plot_affinity(grouping.affinity, unit_names, title=title, groups=grouping.groups)
        if self.plot_dir:
            os.makedirs(self.plot_dir, exist_ok=True)
            with open(os.path.join(self.plot_dir, f"sharing_epoch{n:03d}.png"), "wb") as f:
                f.write(png)
        if self._writer is not None:
            if "gate" in record:
                lines = [f"**epoch {n}**, predictions on {record['probe_rows']} probe inputs, permutation null "
                         f"{record['null_threshold']}, parameters {record['parameters_before']} -> "
                         f"{record['parameters_after']}", "",
                         "| proposed group | within | between | stability | passed |", "|---|---|---|---|---|"]
                lines += [f"| {', '.join(c['group'])} | {c['within']} | {c['between']} | {c['stability']} | "
                          f"{'yes' if c['passed'] else '; '.join(c['reasons'])} |" for c in record["gate"]]
                lines += ["", "| estimator | tasks |", "|---|---|"]
            else:
                lines = [f"**epoch {n}**, rule `{self.rule_name}`, {steps} steps of evidence, "
                         f"{record['n_clusters']} clusters, parameters {record['parameters_before']} -> "
                         f"{record['parameters_after']}", "", "| estimator | tasks |", "|---|---|"]
            lines += [f"| {ts[0] if len(ts) == 1 else k} | {', '.join(ts)} |"
                      for k, ts in _named_groups(self.model).items()]
            with self._writer.as_default(step=n):
                tf.summary.image("sharing/affinity", tf.image.decode_png(png, channels=4)[None], step=n)
                tf.summary.text("sharing/groups", "\n".join(lines), step=n)
            self._writer.flush()

    def report(self):
        """A JSON-serialisable summary for a report file: settings, checks, final groups."""
        model = self.model
        return {
            "rule": self.rule_name,
            "settings": {
                "start_epoch": self.start_epoch, "every": self.every, "window": self.window,
                "max_merges": self.max_merges, "stop_epoch": self.stop_epoch,
                "min_evidence": self.min_evidence, "threshold": self.threshold,
                "max_group_size": self.max_group_size, "signal": self.signal,
                "factorizer": self.factorizer, "n_components": self.n_components,
                "clusterer": self.clusterer, "n_clusters": self.n_clusters, "keep": self.keep,
                "min_affinity": self.min_affinity, "proposal": self.proposal, "bootstrap": self.bootstrap,
                "min_stability": self.min_stability, "null_permutations": self.null_permutations,
                "split_refused": self.split_refused, "calibrate_batch_norm": self.calibrate_batch_norm,
                "refit_outputs": self.refit_outputs,
            },
            "checks": [{k: v for k, v in h.items() if k != "affinity"} for h in self.history],
            "merges": [{k: v for k, v in h.items() if k != "affinity"} for h in self.history if h["merged"]],
            "final_groups": _named_groups(model) if model is not None else None,
            "estimators": len(model.estimator_owners) if model is not None else None,
        }

    # ---------------------------------------------------------- persistence
    def _state_path(self):
        return os.path.join(self.backup_dir, STATE_FILE) if self.backup_dir else None

    def _save_state(self):
        path = self._state_path()
        if not path:
            return
        os.makedirs(self.backup_dir, exist_ok=True)
        state = {"history": self.history}
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(state, f)
        os.replace(path + ".tmp", path)

    def _restore_state(self):
        """Re-applies the merges of the epochs a `BackupAndRestore` backup covers."""
        path = self._state_path()
        if not path or not os.path.exists(path):
            return
        metadata = os.path.join(self.backup_dir, "training_metadata.json")
        if not os.path.exists(metadata):
            return  # no backup to resume from: a fresh run
        with open(metadata, encoding="utf-8") as f:
            done = int(json.load(f).get("epoch", 0))
        with open(path, encoding="utf-8") as f:
            history = [h for h in json.load(f)["history"] if h["epoch"] <= done]
        self.history = history
        merges = [h for h in history if h["merged"]]
        if merges and list(self.model.estimator_of_task) != merges[-1]["estimator_of_task"]:
            self.model.set_estimator_of_task(merges[-1]["estimator_of_task"])
            if self.verbose:
                print(f"SelectiveSharing: resumed with the groups of epoch {merges[-1]['epoch']}.")


def _named_groups(model):
    names = model.tasks.names
    return {names[o]: [names[t] for t in ts] for o, ts in model.task_groups.items()}
