"""Comparing many-task methods against single-task learning on one data set, budget and seeds.

A comparison trains every configuration of a list on the same data, seeds and
budget and reduces them to one table: mean test accuracy (mean ± std over
seeds), per-task accuracy, Δm against single-task learning, parameters and
wall time.

The configurations' grammar is `CONFIGURATION_GRAMMAR`.

The data come from the caller (`load_data(seed)`), so the same code compares
methods on any one-task-per-example image data set.

Example:

>>> configs, _ = resolve_configs("stl,hard,tr0.5")
>>> result = compare(configs, [0], lambda seed: my_data(seed), get_preset("comparison"),
...                  data_description={"data": "my_data"}, cache_dir="runs/stl_cache",
...                  output=run_directory("compare"), provenance=RunProvenance())
>>> [(r["config"], round(r["delta_m"], 2)) for r in result["rows"]]
"""

import dataclasses
import datetime
import json
import re
import time
from pathlib import Path

import keras
import numpy as np

from mtl_keras import sharing
from mtl_keras.baselines import delta_m, train_single_task_models
from mtl_keras.experiments.comparison_plots import plot_results
from mtl_keras.experiments.comparison_tables import write_tables
from mtl_keras.experiments.training import build_backbone, build_model
from mtl_keras.option_strings import parse_options
from mtl_keras.reporting import per_task, write_json
from mtl_keras.weighting import available_weightings, get_weighting

CONFIGURATION_GRAMMAR = """Configurations (combine with '+'):
    stl               one network per task (same trunk, one task), on its own examples
    hard              hard sharing: one trunk for all tasks (sigma = 1, no routing)
    tr<S>             Task Routing with sharing ratio S, e.g. tr0.5
    <base>+<W>        weighting method W (mtl_keras.weighting.available_weightings()), e.g. tr0.5+pcgrad
    <W>:<arg>=<value> a weighting with arguments, e.g. pcgrad:every_n_steps=8
    <W>               short for tr0.5+<W>, e.g. uncertainty
    <base>+<R>        Selective Sharing R: predictions (heads compared on a probe of validation
                      inputs, through the gate) or a grouping rule of the estimator gradients,
                      e.g. tr0.5+predictions, tr0.5+similarity (options as for weightings:
                      tr0.5+similarity:threshold=0.3, tr0.5+predictions:start_epoch=8)
"""

# The configurations of docs/RESULTS.md (PCGrad every 10 steps: its exact
# per-task gradients cost ~40x a step at 50 tasks, see docs/BENCHMARKS.md).
DEFAULT_CONFIGS = "stl,hard,tr0.25,tr0.5,tr0.75,tr0.5+similarity,tr0.5+variance,uncertainty,pcgrad:every_n_steps=10"
DEFAULT_SIGMA = 0.5

# Early stopping of single-task models ignores the first epochs: batch-norm
# statistics are still settling there and a lucky early epoch would win on noise.
STL_START_FROM_EPOCH = 5


# ------------------------------------------------------------------ configs
def sharing_rules():
    """The names of Selective Sharing configurations: `"predictions"` and the grouping rules."""
    return sharing.sharing_names()




def parse_config(name, weightings=None, rules=None):
    """Parses a configuration name into `{name, kind, sigma, weighting, sharing, ...}`.

    Grammar: `stl`, or a base (`hard` = sigma 1, `tr<S>` = Task Routing with
    sigma S) followed by optional `+<weighting>` and `+<sharing rule>`; a bare
    weighting or rule name means `tr0.5+<name>`. A weighting or rule takes
    arguments as `<name>:<argument>=<value>[:...]`, e.g.
    `pcgrad:every_n_steps=8` (weighting arguments) or
    `similarity:threshold=0.3` (`SelectiveSharing` arguments).

    Args:
        name: the configuration, e.g. `"tr0.25+pcgrad:every_n_steps=8"`.
        weightings: the weighting names to accept (default: the registered ones).
        rules: the sharing rules to accept (default: `sharing_rules()`).
    """
    weightings = available_weightings() if weightings is None else list(weightings)
    rules = sharing_rules() if rules is None else list(rules)
    name = name.strip()
    if name == "stl":
        return {"name": name, "kind": "stl", "sigma": 1.0, "weighting": None, "sharing": None}
    parts = [p for p in name.split("+") if p]
    if not parts:
        raise ValueError("Empty configuration name; see --help for the grammar.")
    config = {"name": name, "kind": "mtl", "sigma": DEFAULT_SIGMA, "weighting": None, "sharing": None,
              "weighting_kwargs": {}}
    base = parts[0]
    if base == "hard":
        config["sigma"] = 1.0
        parts = parts[1:]
    elif re.fullmatch(r"tr(\d*\.?\d+)", base):
        config["sigma"] = float(base[2:])
        if not 0.0 <= config["sigma"] <= 1.0:
            raise ValueError(f"Configuration {name!r}: sigma must be in [0, 1], got {config['sigma']}.")
        parts = parts[1:]
    for part in parts:
        method, _, options = part.partition(":")
        if method in weightings and config["weighting"] is None:
            config["weighting"] = method
            config["weighting_kwargs"] = parse_options(options, name)
        elif method in rules and config["sharing"] is None:
            config["sharing"] = method
            config["sharing_kwargs"] = parse_options(options, name)
        else:
            known = ["stl", "hard", "tr<sigma>"] + weightings + rules
            hint = ""
            if method in ("predictions", "similarity", "variance") and not rules:
                hint = " (Selective Sharing is not available: no grouping rule was accepted)"
            raise ValueError(
                f"Configuration {name!r}: unknown or repeated part {part!r}{hint}. Known parts: {known}; "
                "combine them as <base>+<weighting>+<rule>, e.g. tr0.5+pcgrad."
            )
    return config


def resolve_configs(spec):
    """`(configs, skipped)` of a comma-separated list, with `stl` first if it was not named.

    Configurations of `DEFAULT_CONFIGS` that cannot be parsed here are skipped
    (`skipped` holds `(name, why)`); in any other list they are an error, as
    the user named them.
    """
    names = [c.strip() for c in spec.split(",") if c.strip()]
    explicit = spec != DEFAULT_CONFIGS
    configs, skipped = [], []
    for name in names:
        try:
            configs.append(parse_config(name))
        except ValueError as e:
            if explicit:
                raise
            skipped.append((name, str(e)))
    if not any(c["kind"] == "stl" for c in configs):
        # Δm needs the single-task baseline (cached after its first run).
        configs.insert(0, parse_config("stl"))
    return configs, skipped


# -------------------------------------------------------------------- runs
@dataclasses.dataclass(frozen=True)
class SingleTaskBudget:
    """How each single-task model trains.

    A single task has a few hundred training images: with the multi-task
    budget (a few epochs of batch 128) its network would take a few dozen
    steps and stay near chance. Each STL model instead trains up to `epochs`
    on smaller batches and, with `patience` > 0, keeps its best epoch on
    validation accuracy: the strongest STL baseline the data allow, so Δm is
    conservative.
    """

    epochs: int = 30
    batch_size: int = 32
    patience: int = 6


def image_shape(dataset):
    """One example's image shape in a `({"image", ...}, label)` dataset, e.g. `(32, 32, 1)`."""
    shape = dataset.element_spec[0]["image"].shape[1:]
    if not shape.is_fully_defined():
        raise ValueError(f"The images need a static shape to build a model on them; got {shape}.")
    return tuple(shape)


def _sharing_callback(config, seed, data):
    """The `SelectiveSharing` callback of `config` with its options (a probe from the validation data,
    output layers refitted at a merge on training inputs)."""
    kwargs = {"seed": seed, "verbose": 0, **config.get("sharing_kwargs", {})}
    return sharing.selective_sharing(config["sharing"], validation=data.validation, train=data.train, **kwargs)


def _batches(dataset):
    """Batches in one pass of `dataset`, or None when tf.data does not know."""
    n = int(dataset.cardinality())
    return n if n > 0 else None


def run_mtl(config, data, train_config, seed, verbose=1):
    """Trains and tests one multi-task configuration; returns its result dict.

    Args:
        config: a parsed configuration (`parse_config`).
        data: the seed's data: `tasks` (a `TaskSet`) and `train` /
            `validation` / `test` one-task-per-example datasets.
        train_config: the `TrainConfig` of model and budget.
        seed: seeds the weights, routing masks and task sampling.
        verbose: 2 shows Keras progress bars.
    """
    started = time.time()
    keras.utils.set_random_seed(seed)
    tasks = data.tasks
    model = build_model(
        train_config, tasks, image_shape(data.train), sigma=config["sigma"],
        weighting=get_weighting(config["weighting"], **config.get("weighting_kwargs", {})), seed=seed, name="mtl",
        steps_per_epoch=_batches(data.train),
    )
    params_at_start = model.count_params()
    callbacks = [_sharing_callback(config, seed, data)] if config["sharing"] else []
    history = model.fit(data.train, validation_data=data.validation, epochs=train_config.epochs,
                        callbacks=callbacks, verbose=2 if verbose == 2 else 0, shuffle=False)
    test_logs = model.evaluate(data.test, return_dict=True, verbose=0)
    result = {
        "config": config["name"],
        "seed": seed,
        "test_accuracy": per_task(test_logs, tasks, "accuracy"),
        "mean_test_accuracy": float(test_logs["mean_accuracy"]),
        "final_val_mean_accuracy": float(history.history.get("val_mean_accuracy", [np.nan])[-1]),
        "parameters": int(model.count_params()),
        "parameters_at_start": int(params_at_start),
        "head_parameters": model.head_parameter_count(),
        "wall_seconds": round(time.time() - started, 1),
        "trained": True,
        "weighting": keras.saving.serialize_keras_object(model.weighting).get("config", {}),
    }
    if config["sharing"]:
        names = list(tasks.names)
        result["task_groups"] = [[names[t] for t in g] for g in model.task_groups.values() if len(g) > 1]
        result["sharing_history"] = getattr(callbacks[0], "history", None)
    return result


def run_stl(data, train_config, seed, stl, cache_dir, data_description, verbose=1):
    """Trains (or takes from `cache_dir`) one single-task model per task; returns the result dict.

    Args:
        data: as for `run_mtl`, plus `num_examples` (split -> count).
        train_config: the `TrainConfig` (model; STL keeps its own epochs and batch).
        seed: seeds every single-task model; the data were loaded with it.
        stl: a `SingleTaskBudget`.
        cache_dir: folder of the per-task result cache.
        data_description: JSON-able description of the data source (e.g.
            `{"data": "omniglot", "archives": "full"}`): the cached results
            depend on it, and datasets cannot be hashed.
        verbose: 1 prints a line per task.
    """
    tasks = data.tasks
    cache_config = {
        **data_description,
        "tasks": list(tasks.names),
        "image_size": train_config.image_size,
        "data_seed": seed,
        "num_examples": data.num_examples,
    }

    def progress(index, task, entry, cached):
        if verbose:
            how = "cached" if cached else f"{entry['train_seconds']:.0f} s"
            print(f"  stl seed {seed} [{index + 1}/{len(tasks)}] {task.name}: "
                  f"test acc {entry['test'].get('accuracy', float('nan')):.4f} ({how})", flush=True)

    stopping = {"monitor": "val_mean_accuracy", "mode": "max", "patience": stl.patience,
                "start_from_epoch": STL_START_FROM_EPOCH}
    cache_config["early_stopping"] = stopping  # part of what the cached results depend on

    def early_stopping(task):
        return [keras.callbacks.EarlyStopping(**stopping, restore_best_weights=True)]

    shape = image_shape(data.train)
    started = time.time()
    results = train_single_task_models(
        lambda num_tasks: build_backbone(train_config, shape, num_tasks, sigma=1.0, seed=seed),
        tasks, data.train, data.validation, data.test,
        epochs=stl.epochs, batch_size=stl.batch_size,
        optimizer=lambda: keras.optimizers.Adam(train_config.lr),
        model_kwargs=dict(head_units=list(train_config.head_units), head_dropout=train_config.head_dropout),
        seed=seed, jit_compile=train_config.jit_compile, cache_dir=cache_dir,
        cache_config=cache_config, on_task_end=progress,
        callbacks=early_stopping if stl.patience > 0 else None,
    )
    accuracy = results.metric("accuracy")
    return {
        "config": "stl",
        "seed": seed,
        "test_accuracy": accuracy,
        "mean_test_accuracy": float(np.mean([accuracy[t] for t in tasks.names])),
        "parameters": results.total_parameters,
        # Wall time as measured when each task was trained (cached or not).
        "wall_seconds": round(results.total_seconds, 1),
        "this_run_seconds": round(time.time() - started, 1),
        "trained": results.num_trained > 0,
        "tasks_trained": results.num_trained,
        "tasks_from_cache": len(tasks) - results.num_trained,
    }


# ------------------------------------------------------------------ budget
def budget_text(train_config, num_tasks, seeds, stl, data_label=None):
    """The training budget as one line: the table's caption, and what reused runs must match.

    `data_label` names the data's variant after the task count, e.g.
    `"full archives"`.
    """
    c = train_config
    tasks = f"{num_tasks} tasks" + (f" ({data_label})" if data_label else "")
    # Named only when used, so budgets written before these parts existed still match.
    recipe = ""
    if c.lr_schedule != "constant":
        recipe += f" ({c.lr_schedule}, warm-up {c.warmup_fraction} of the steps"
        recipe += f", decay {c.decay_fraction})" if c.lr_schedule == "wsd" else ")"
    if c.augmentation().enabled:
        recipe += (f", augmentation shift {c.augment_shift} rotation {c.augment_rotation} "
                   f"scale {c.augment_scale}")
    if c.label_smoothing:
        recipe += f", label smoothing {c.label_smoothing}"
    return (f"{c.epochs} epochs, seeds {list(seeds)}, batch {c.batch_size}, Adam lr {c.lr}{recipe}, "
            f"{tasks}, {c.image_size}x{c.image_size} images, "
            f"VGG width {c.width} depth {c.depth}, BN momentum {c.bn_momentum}, "
            f"head units {list(c.head_units)}, head dropout {c.head_dropout}, "
            f"jit_compile={c.jit_compile}; STL: up to {stl.epochs} epochs of batch "
            f"{stl.batch_size}, early stopping on val accuracy from epoch {STL_START_FROM_EPOCH + 1} (patience "
            f"{stl.patience}, best epoch restored)")


def _without_seeds(budget):
    return re.sub(r"seeds \[[^\]]*\], ", "", budget)


def load_reused_runs(dirs, budget):
    """`{(config, seed): run}` from earlier outputs of the same budget (any seeds).

    A finished comparison's `results.json`, or else the `runs.json` a
    stopped one wrote after each of its finished runs.
    """
    reused = {}
    for d in dirs:
        path = Path(d) / "results.json"
        if not path.exists():
            path = Path(d) / "runs.json"
        if not path.exists():
            raise ValueError(f"--reuse {d}: no results.json (or runs.json) there; give the --output folder of "
                             "an earlier comparison.")
        saved = json.loads(path.read_text())
        theirs = _without_seeds(saved["meta"]["budget"])
        if theirs != _without_seeds(budget):
            raise ValueError(f"--reuse {d}: its runs had another budget and cannot share a table with this one.\n"
                             f"  theirs: {theirs}\n  this:   {_without_seeds(budget)}\n"
                             "Run with the same flags (epochs, batch, model, data) as that comparison.")
        for run in saved["runs"]:
            reused.setdefault((run["config"], run["seed"]), run)
    return reused


# ------------------------------------------------------------- summarising
def mean_std(values):
    """`(mean, std)` of a list of numbers (std with ddof=0; 0 for one value; NaNs for none)."""
    a = np.asarray(list(values), dtype=float)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std())


def summarise(runs, task_names, config_names):
    """Per configuration: mean ± std over seeds, Δm vs STL, parameters, time."""
    stl_runs = [r for r in runs if r["config"] == "stl"]
    stl_mean = {t: float(np.mean([r["test_accuracy"][t] for r in stl_runs])) for t in task_names}
    rows = []
    for name in config_names:
        mine = [r for r in runs if r["config"] == name]
        if not mine:
            continue
        acc_mean, acc_std = mean_std(r["mean_test_accuracy"] for r in mine)
        per_task_mean = {t: float(np.mean([r["test_accuracy"][t] for r in mine])) for t in task_names}
        # Δm of the seed-averaged per-task accuracies against the seed-averaged
        # STL ones (LibMTL's convention); the std is over seeds.
        dm = delta_m(per_task_mean, stl_mean)
        _, dm_std = mean_std(delta_m(r["test_accuracy"], stl_mean) for r in mine)
        rows.append({
            "config": name,
            "seeds": len(mine),
            "mean_test_accuracy": acc_mean,
            "mean_test_accuracy_std": acc_std,
            "delta_m": dm,
            "delta_m_std": dm_std,
            "parameters": int(np.mean([r["parameters"] for r in mine])),
            "wall_seconds": float(np.mean([r["wall_seconds"] for r in mine])),
            "per_task_accuracy": per_task_mean,
            "tasks_beating_stl": int(sum(per_task_mean[t] > stl_mean[t] for t in task_names)),
        })
    return rows


# ---------------------------------------------------------------- compare
def compare(configs, seeds, load_data, train_config, *, data_description, cache_dir, output, provenance,
            stl=SingleTaskBudget(), data_title="{num_tasks} tasks", data_label=None, reuse=(), reuse_only=False, skipped=(),
            verbose=1):
    """Runs a comparison and writes its outputs into `output`.

    Writes `runs.json` (after every run, so partial results survive an
    interruption), then `results.md`, `results.csv`, `per_task.csv`,
    `results.png` and `results.json`; both JSON files carry the run's
    provenance in `meta`.

    Args:
        configs: parsed configurations (`resolve_configs`).
        seeds: the seeds; each seed reloads the data with `load_data(seed)`.
        load_data: `seed -> data` with `tasks`, `train`, `validation`,
            `test` and `num_examples` (as `mtl_keras.data.load_omniglot`).
        train_config: the `TrainConfig` of every multi-task model.
        data_description: JSON-able description of the data source, for the
            single-task cache (see `run_stl`).
        cache_dir: the single-task result cache.
        output: the output folder (existing).
        provenance: a `RunProvenance`, entered around the training.
        stl: the `SingleTaskBudget`.
        data_title: the plot title's start, formatted with `num_tasks`.
        data_label: the data's variant in the budget line (`budget_text`).
        reuse: earlier output folders of the same budget whose runs are
            taken instead of training them again.
        reuse_only: train nothing; configurations without an earlier run
            are left out.
        skipped: `(name, why)` of configurations left out before, for `meta`.
        verbose: 0 silent, 1 a line per run, 2 also Keras progress bars.

    Returns:
        `{"rows": summary rows, "runs": every run, "meta": ..., "output": folder, "tasks": task names}`.
    """
    output = Path(output)
    runs, tasks, reused, budget = [], None, None, None

    def log(text):
        if verbose:
            print(f"[{time.time() - started:6.0f} s] {text}", flush=True)

    started = time.time()
    with provenance:
        for seed in seeds:
            data = load_data(seed)
            tasks = data.tasks
            if reused is None:
                budget = budget_text(train_config, len(tasks), seeds, stl, data_label)
                reused = load_reused_runs(reuse, budget)
            for config in configs:
                key = (config["name"], seed)
                if key in reused:
                    runs.append(reused[key])
                    log(f"{config['name']} seed {seed}: reused "
                        f"(mean test accuracy {reused[key]['mean_test_accuracy']:.4f})")
                    continue
                if reuse_only:
                    log(f"{config['name']} seed {seed}: no earlier run, left out (--reuse-only)")
                    continue
                log(f"{config['name']} seed {seed}: training ({len(tasks)} tasks, {train_config.epochs} epochs)")
                if config["kind"] == "stl":
                    result = run_stl(data, train_config, seed, stl, cache_dir, data_description, verbose)
                else:
                    result = run_mtl(config, data, train_config, seed, verbose)
                runs.append(result)
                log(f"{config['name']} seed {seed}: mean test accuracy {result['mean_test_accuracy']:.4f}, "
                    f"{result['parameters']:,} parameters, {result['wall_seconds']:.0f} s")
                write_json(output / "runs.json", {"meta": {"budget": budget, "provenance": provenance.record},
                                                  "runs": runs})

    rows = summarise(runs, list(tasks.names), [c["name"] for c in configs])
    meta = {
        "command": provenance.record["command"],
        "machine": provenance.record["machine"],
        "budget": budget,
        "title": f"{data_title.format(num_tasks=len(tasks))}, {train_config.epochs} epochs, "
                 f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} (mean ± std over seeds)",
        "finished": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "total_seconds": time.time() - started,
        "skipped": list(skipped),
        "provenance": provenance.record,
    }
    write_json(output / "runs.json", {"meta": meta, "runs": runs})
    write_tables(rows, tasks, output, meta)
    plot_results(rows, output / "results.png", meta["title"])
    write_json(output / "results.json", {"meta": meta, "summary": rows, "runs": runs, "tasks": list(tasks.names)})
    return {"rows": rows, "runs": runs, "meta": meta, "output": str(output), "tasks": list(tasks.names)}
