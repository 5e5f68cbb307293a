"""Compare many-task methods on Omniglot against single-task learning (Δm).

Trains every configuration of --configs on the same data, seeds and budget
and writes a table of mean test accuracy (mean ± std over seeds), per-task
accuracy, Δm against single-task learning, parameter count and wall time:

    python apps/compare_methods.py                      # docs/RESULTS.md's seed-0 table (~40 min on 2 cores)
    python apps/compare_methods.py --configs stl,hard,tr0.5,tr0.5+pcgrad --tasks 10 --seeds 0 1 2

Configurations (combine with '+'):
    stl               one network per task (same trunk, one task), on its own examples
    hard              hard sharing: one trunk for all tasks (sigma = 1, no routing)
    tr<S>             Task Routing with sharing ratio S, e.g. tr0.5
    <base>+<W>        weighting method W (mtl_keras.weighting.available_weightings()), e.g. tr0.5+pcgrad
    <W>:<arg>=<value> a weighting with arguments, e.g. pcgrad:every_n_steps=8
    <W>               short for tr0.5+<W>, e.g. uncertainty
    <base>+<R>        Selective Sharing with grouping rule R, e.g. tr0.5+similarity
                      (options as for weightings: tr0.5+similarity:threshold=0.3)

Single-task results are cached in --cache-dir per task, keyed by a hash of
everything they depend on, so later comparisons compute Δm without
retraining them. `--reuse DIR...` takes the runs of earlier comparisons of
the same budget instead of training them again (to add seeds, or to put
several comparisons in one table; `--reuse-only` trains nothing). Writes
into --output: results.md, results.csv,
per_task.csv, results.json and results.png.
"""

import argparse
import ast
import datetime
import inspect
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mtl_keras import MultiTaskModel, conv_backbone, vgg_filters  # noqa: E402
from mtl_keras.baselines import delta_m, summarize, train_single_task_models  # noqa: E402
from mtl_keras.data import load_omniglot  # noqa: E402
from mtl_keras.reporting import markdown_table, per_task, text_table, write_json  # noqa: E402
from mtl_keras.weighting import available_weightings, get_weighting  # noqa: E402

# The configurations of docs/RESULTS.md (PCGrad every 10 steps: its exact
# per-task gradients cost ~40x a step at 50 tasks, see docs/BENCHMARKS.md).
DEFAULT_CONFIGS = "stl,hard,tr0.25,tr0.5,tr0.75,tr0.5+similarity,tr0.5+variance,uncertainty,pcgrad:every_n_steps=10"
DEFAULT_SIGMA = 0.5


# ------------------------------------------------------------------ configs
def sharing_rules():
    """Grouping rules of Selective Sharing, if that module provides a callback."""
    try:
        from mtl_keras import sharing
    except ImportError:
        return []
    if _sharing_callback_class() is None:
        return []
    rules = getattr(sharing, "available_rules", None)
    return list(rules()) if rules else []


def _sharing_callback_class():
    try:
        from mtl_keras import sharing
    except ImportError:
        return None
    return getattr(sharing, "SelectiveSharing", None)


def _options(text, name):
    """`"every_n_steps=8:seed=1"` -> `{"every_n_steps": 8, "seed": 1}`."""
    out = {}
    for item in filter(None, text.split(":")):
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise ValueError(
                f"Configuration {name!r}: bad option {item!r}; write options as "
                "<weighting>:<argument>=<value>, e.g. pcgrad:every_n_steps=8."
            )
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def parse_config(name, weightings=None, rules=None):
    """Parses a configuration name into `{kind, sigma, weighting, sharing}`.

    Grammar: `stl`, or a base (`hard` = sigma 1, `tr<S>` = Task Routing with
    sigma S) followed by optional `+<weighting>` and `+<sharing rule>`; a bare
    weighting or rule name means `tr0.5+<name>`. A weighting or rule takes
    arguments as `<name>:<argument>=<value>[:...]`, e.g.
    `pcgrad:every_n_steps=8` (weighting arguments) or
    `similarity:threshold=0.3` (`SelectiveSharing` arguments).
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
            config["weighting_kwargs"] = _options(options, name)
        elif method in rules and config["sharing"] is None:
            config["sharing"] = method
            config["sharing_kwargs"] = _options(options, name)
        else:
            known = ["stl", "hard", "tr<sigma>"] + weightings + rules
            hint = ""
            if method in ("similarity", "variance") and not rules:
                hint = " (Selective Sharing is not available in this checkout: mtl_keras.sharing has no SelectiveSharing callback)"
            raise ValueError(
                f"Configuration {name!r}: unknown or repeated part {part!r}{hint}. Known parts: {known}; "
                "combine them as <base>+<weighting>+<rule>, e.g. tr0.5+pcgrad."
            )
    return config


# -------------------------------------------------------------------- runs
def machine_description():
    gpus = tf.config.list_physical_devices("GPU")
    return (
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, "
        f"{'GPU: ' + ', '.join(g.name for g in gpus) if gpus else 'no GPU'}, "
        f"Python {platform.python_version()}, TensorFlow {tf.__version__}, Keras {keras.__version__}"
    )


def build_backbone_fn(args, seed, sigma):
    shape = (args.image_size, args.image_size, 1)
    filters = vgg_filters(args.width, args.depth)

    def build(num_tasks):
        return conv_backbone(shape, num_tasks, sigma=sigma, filters=filters, seed=seed,
                             batch_norm_momentum=args.bn_momentum)

    return build


def _sharing_callback(config, seed):
    """A `SelectiveSharing` callback with the rule and options of `config`."""
    cls = _sharing_callback_class()
    params = inspect.signature(cls).parameters
    kwargs = {"rule": config["sharing"]}
    if "seed" in params:
        kwargs["seed"] = seed
    if "verbose" in params:
        kwargs["verbose"] = 0
    kwargs.update(config.get("sharing_kwargs", {}))
    return cls(**kwargs)


def run_mtl(config, data, args, seed):
    """Trains and tests one multi-task configuration; returns its result dict."""
    started = time.time()
    keras.utils.set_random_seed(seed)
    tasks = data.tasks
    backbone = build_backbone_fn(args, seed, config["sigma"])(len(tasks))
    model = MultiTaskModel(
        backbone, tasks, head_units=args.head_units, head_dropout=args.head_dropout,
        weighting=get_weighting(config["weighting"], **config.get("weighting_kwargs", {})), seed=seed, name="mtl",
    )
    model.compile(optimizer=keras.optimizers.Adam(args.lr), jit_compile=args.jit_compile)
    params_at_start = model.count_params()
    callbacks = [_sharing_callback(config, seed)] if config["sharing"] else []
    history = model.fit(data.train, validation_data=data.validation, epochs=args.epochs,
                        callbacks=callbacks, verbose=args.keras_verbose, shuffle=False)
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


def run_stl(data, args, seed):
    tasks = data.tasks
    cache_config = {
        "data": "omniglot",
        "archives": args.archives,
        "tasks": list(tasks.names),
        "image_size": args.image_size,
        "data_seed": seed,
        "num_examples": data.num_examples,
    }

    def progress(index, task, entry, cached):
        if args.verbose:
            how = "cached" if cached else f"{entry['train_seconds']:.0f} s"
            print(f"  stl seed {seed} [{index + 1}/{len(tasks)}] {task.name}: "
                  f"test acc {entry['test'].get('accuracy', float('nan')):.4f} ({how})", flush=True)

    # A single task has ~450 training images: with the multi-task budget
    # (a few epochs of batch 128) its network would take a few dozen steps
    # and stay near chance. Each STL model instead trains up to
    # --stl-epochs on smaller batches and keeps its best epoch on validation
    # accuracy: the strongest STL baseline the data allow, so Δm is
    # conservative. The first epochs are never kept: batch-norm statistics
    # are still settling there and a lucky early epoch would win on noise.
    stopping = {"monitor": "val_mean_accuracy", "mode": "max", "patience": args.stl_patience, "start_from_epoch": 5}
    cache_config["early_stopping"] = stopping  # part of what the cached results depend on

    def early_stopping(task):
        return [keras.callbacks.EarlyStopping(**stopping, restore_best_weights=True)]

    started = time.time()
    stl = train_single_task_models(
        build_backbone_fn(args, seed, 1.0), tasks, data.train, data.validation, data.test,
        epochs=args.stl_epochs, batch_size=args.stl_batch_size,
        optimizer=lambda: keras.optimizers.Adam(args.lr),
        model_kwargs=dict(head_units=args.head_units, head_dropout=args.head_dropout),
        seed=seed, jit_compile=args.jit_compile, cache_dir=args.cache_dir,
        cache_config=cache_config, on_task_end=progress,
        callbacks=early_stopping if args.stl_patience > 0 else None,
    )
    accuracy = stl.metric("accuracy")
    return {
        "config": "stl",
        "seed": seed,
        "test_accuracy": accuracy,
        "mean_test_accuracy": float(np.mean([accuracy[t] for t in tasks.names])),
        "parameters": stl.total_parameters,
        # Wall time as measured when each task was trained (cached or not).
        "wall_seconds": round(stl.total_seconds, 1),
        "this_run_seconds": round(time.time() - started, 1),
        "trained": stl.num_trained > 0,
        "tasks_trained": stl.num_trained,
        "tasks_from_cache": len(tasks) - stl.num_trained,
    }


# -------------------------------------------------------------- summarising
def summarise(runs, task_names, config_names):
    """Per configuration: mean ± std over seeds, Δm vs STL, parameters, time."""
    stl_runs = [r for r in runs if r["config"] == "stl"]
    stl_mean = {t: float(np.mean([r["test_accuracy"][t] for r in stl_runs])) for t in task_names}
    rows = []
    for name in config_names:
        mine = [r for r in runs if r["config"] == name]
        if not mine:
            continue
        acc_mean, acc_std = summarize(r["mean_test_accuracy"] for r in mine)
        per_task_mean = {t: float(np.mean([r["test_accuracy"][t] for r in mine])) for t in task_names}
        # Δm of the seed-averaged per-task accuracies against the seed-averaged
        # STL ones (LibMTL's convention); the std is over seeds.
        dm = delta_m(per_task_mean, stl_mean)
        _, dm_std = summarize(delta_m(r["test_accuracy"], stl_mean) for r in mine)
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


def _pm(mean, std, digits=4):
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_tables(rows, tasks, output, meta):
    output = Path(output)
    names = [r["config"] for r in rows]
    best = max(rows, key=lambda r: r["mean_test_accuracy"])
    summary_headers = ["config", "seeds", "mean test accuracy", "Δm vs STL (%)", "tasks > STL",
                       "parameters", "wall time (s)"]
    summary = [[r["config"], r["seeds"], _pm(r["mean_test_accuracy"], r["mean_test_accuracy_std"]),
                _pm(r["delta_m"], r["delta_m_std"], 2), f"{r['tasks_beating_stl']}/{len(tasks)}",
                f"{r['parameters']:,}", f"{r['wall_seconds']:.0f}"] for r in rows]
    task_rows = [[t.name, t.num_outputs] + [r["per_task_accuracy"][t.name] for r in rows] for t in tasks]

    lines = [
        "# Method comparison",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}. Budget: {meta['budget']}. Finished {meta['finished']} "
        f"after {meta['total_seconds'] / 60:.1f} min.",
        "",
        "Δm = (1/T) Σ_t (M_t − M_stl,t) / M_stl,t × 100 over the T tasks' test accuracies "
        "(higher is better), of the seed-averaged accuracies; ± is the std over seeds "
        "(0 with one seed). Wall time = training + test per seed (STL: sum over its models, "
        "as measured when trained).",
        "",
        markdown_table(summary, summary_headers),
        "",
        f"Best mean test accuracy: **{best['config']}** ({best['mean_test_accuracy']:.4f}, "
        f"Δm {best['delta_m']:+.2f}%).",
        "",
        "## Per-task test accuracy (mean over seeds)",
        "",
        markdown_table(task_rows, ["task", "classes"] + names),
        "",
    ]
    (output / "results.md").write_text("\n".join(lines), encoding="utf-8")

    csv = ["config,seeds,mean_test_accuracy,mean_test_accuracy_std,delta_m,delta_m_std,"
           "tasks_beating_stl,parameters,wall_seconds"]
    csv += [f"{r['config']},{r['seeds']},{r['mean_test_accuracy']:.6f},{r['mean_test_accuracy_std']:.6f},"
            f"{r['delta_m']:.4f},{r['delta_m_std']:.4f},{r['tasks_beating_stl']},{r['parameters']},"
            f"{r['wall_seconds']:.1f}" for r in rows]
    (output / "results.csv").write_text("\n".join(csv) + "\n", encoding="utf-8")
    per_task_csv = ["task,classes," + ",".join(names)]
    per_task_csv += [f"{t.name},{t.num_outputs}," + ",".join(f"{r['per_task_accuracy'][t.name]:.6f}" for r in rows)
                     for t in tasks]
    (output / "per_task.csv").write_text("\n".join(per_task_csv) + "\n", encoding="utf-8")
    plot_results(rows, output / "results.png", meta)
    return summary, summary_headers


def plot_results(rows, path, meta):
    from mtl_keras import plots  # noqa: F401  (sets the headless backend)
    import matplotlib.pyplot as plt

    names = [r["config"] for r in rows]
    y = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.8), sharey=True)
    acc = [r["mean_test_accuracy"] for r in rows]
    axes[0].barh(y, acc, xerr=[r["mean_test_accuracy_std"] for r in rows], color="#4C72B0")
    axes[0].set_xlabel("mean test accuracy")
    axes[0].set_xlim(min(acc) * 0.9 if min(acc) > 0.2 else 0, min(1.0, max(acc) * 1.05 + 1e-3))
    dm = [r["delta_m"] for r in rows]
    axes[1].barh(y, dm, xerr=[r["delta_m_std"] for r in rows],
                 color=["#55A868" if d >= 0 else "#C44E52" for d in dm])
    axes[1].axvline(0, color="black", linewidth=0.8)
    axes[1].set_xlabel("Δm vs single-task (%)")
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(names)
    axes[0].invert_yaxis()
    for i, (a, d) in enumerate(zip(acc, dm)):
        axes[0].text(a, i, f" {a:.3f}", va="center", fontsize=8)
        axes[1].text(d, i, f" {d:+.1f}%", va="center", ha="left" if d >= 0 else "right", fontsize=8)
    axes[1].margins(x=0.2)
    fig.suptitle(meta["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help=f"comma-separated configurations (default: {DEFAULT_CONFIGS}); configurations "
                        "whose weighting or sharing rule is not available are skipped with a warning "
                        "when they come from the default list, and are an error when named explicitly")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--tasks", type=int, default=None, help="first K alphabets (default: all)")
    p.add_argument("--archives", choices=("full", "small"), default="full")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--tfds-dir", default=None)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--head-units", type=int, nargs="*", default=[128])
    p.add_argument("--head-dropout", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--bn-momentum", type=float, default=0.9,
                   help="batch-norm moving-average momentum (0.9 suits short runs; the train app's 0.99 "
                        "needs more steps before its moving statistics are usable)")
    p.add_argument("--stl-epochs", type=int, default=30, help="most epochs of each single-task model")
    p.add_argument("--stl-batch-size", type=int, default=32, help="batch size of each single-task model")
    p.add_argument("--stl-patience", type=int, default=6,
                   help="early stopping on mean validation accuracy for single-task models, from epoch 6, "
                        "best epoch restored (0: off)")
    p.add_argument("--jit-compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--output", default=None, help="folder of the tables (default runs/compare/<timestamp>)")
    p.add_argument("--cache-dir", default=str(ROOT / "runs" / "stl_cache"),
                   help="single-task result cache (shared between runs)")
    p.add_argument("--reuse", nargs="+", default=[], metavar="DIR",
                   help="earlier --output folders of the same budget: their (configuration, seed) runs are "
                        "taken instead of training again, e.g. to add seeds to a comparison")
    p.add_argument("--reuse-only", action="store_true",
                   help="train nothing: build the table from the --reuse runs alone (configurations have "
                        "as many seeds as were run)")
    p.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2),
                   help="0 silent, 1 a line per run, 2 also Keras progress bars")
    args = p.parse_args(argv)
    args.keras_verbose = 2 if args.verbose == 2 else 0
    return args


def resolve_configs(spec):
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


def budget_text(args, num_tasks, seeds):
    """The training budget as one line (the table's caption; reused runs must match it)."""
    return (f"{args.epochs} epochs, seeds {seeds}, batch {args.batch_size}, Adam lr {args.lr}, "
            f"{num_tasks} tasks ({args.archives} archives), {args.image_size}x{args.image_size} images, "
            f"VGG width {args.width} depth {args.depth}, BN momentum {args.bn_momentum}, "
            f"head units {args.head_units}, head dropout {args.head_dropout}, "
            f"jit_compile={args.jit_compile}; STL: up to {args.stl_epochs} epochs of batch "
            f"{args.stl_batch_size}, early stopping on val accuracy from epoch 6 (patience "
            f"{args.stl_patience}, best epoch restored)")


def _without_seeds(budget):
    return re.sub(r"seeds \[[^\]]*\], ", "", budget)


def load_reused_runs(dirs, budget):
    """`{(config, seed): run}` from earlier outputs (`results.json`) of the same budget."""
    reused = {}
    for d in dirs:
        path = Path(d) / "results.json"
        if not path.exists():
            raise ValueError(f"--reuse {d}: no results.json there; give the --output folder of an earlier, "
                             "finished comparison.")
        saved = json.loads(path.read_text())
        theirs = _without_seeds(saved["meta"]["budget"])
        if theirs != _without_seeds(budget):
            raise ValueError(f"--reuse {d}: its runs had another budget and cannot share a table with this one.\n"
                             f"  theirs: {theirs}\n  this:   {_without_seeds(budget)}\n"
                             "Run with the same flags (epochs, batch, model, data) as that comparison.")
        for run in saved["runs"]:
            reused.setdefault((run["config"], run["seed"]), run)
    return reused


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    configs, skipped = resolve_configs(args.configs)
    for name, why in skipped:
        print(f"skipping {name}: {why}")
    output = Path(args.output or ROOT / "runs" / "compare" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    output.mkdir(parents=True, exist_ok=True)
    verbose = args.verbose

    runs, tasks, reused = [], None, None
    for seed in args.seeds:
        data = load_omniglot(data_dir=args.data_dir, tasks=args.tasks, image_size=args.image_size,
                             batch_size=args.batch_size, tfds_dir=args.tfds_dir, archives=args.archives, seed=seed)
        tasks = data.tasks
        if reused is None:
            reused = load_reused_runs(args.reuse, budget_text(args, len(tasks), args.seeds))
        for config in configs:
            key = (config["name"], seed)
            if key in reused:
                runs.append(reused[key])
                if verbose:
                    print(f"[{time.time() - started:6.0f} s] {config['name']} seed {seed}: reused "
                          f"(mean test accuracy {reused[key]['mean_test_accuracy']:.4f})", flush=True)
                continue
            if args.reuse_only:
                if verbose:
                    print(f"[{time.time() - started:6.0f} s] {config['name']} seed {seed}: no earlier run, "
                          "left out (--reuse-only)", flush=True)
                continue
            if verbose:
                print(f"[{time.time() - started:6.0f} s] {config['name']} seed {seed}: training "
                      f"({len(tasks)} tasks, {args.epochs} epochs)", flush=True)
            if config["kind"] == "stl":
                result = run_stl(data, args, seed)
            else:
                result = run_mtl(config, data, args, seed)
            runs.append(result)
            if verbose:
                print(f"[{time.time() - started:6.0f} s] {config['name']} seed {seed}: mean test accuracy "
                      f"{result['mean_test_accuracy']:.4f}, {result['parameters']:,} parameters, "
                      f"{result['wall_seconds']:.0f} s", flush=True)
            write_json(output / "runs.json", runs)  # partial results survive an interruption

    write_json(output / "runs.json", runs)
    rows = summarise(runs, list(tasks.names), [c["name"] for c in configs])
    command = "python apps/compare_methods.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {
        "command": command.strip(),
        "machine": machine_description(),
        "budget": budget_text(args, len(tasks), args.seeds),
        "title": f"Omniglot, {len(tasks)} alphabets, {args.epochs} epochs, "
                 f"{len(args.seeds)} seed{'s' if len(args.seeds) > 1 else ''} (mean ± std over seeds)",
        "finished": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "total_seconds": time.time() - started,
        "skipped": skipped,
    }
    summary, headers = write_tables(rows, tasks, output, meta)
    write_json(output / "results.json", {"meta": meta, "summary": rows, "runs": runs,
                                          "tasks": list(tasks.names)})
    if verbose:
        print()
        print(text_table(summary, headers))
        print(f"\ntables: {output / 'results.md'}, {output / 'results.csv'}, {output / 'per_task.csv'}, "
              f"{output / 'results.png'}")
    return {"rows": rows, "runs": runs, "meta": meta, "output": str(output)}


if __name__ == "__main__":
    main()
