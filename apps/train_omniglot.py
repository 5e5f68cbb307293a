"""Train a many-task model on Omniglot: one task per alphabet (50 tasks by default).

    python apps/train_omniglot.py                       # Task Routing, sigma 0.5, all 50 alphabets
    python apps/train_omniglot.py --tasks 10 --epochs 3 --sigma 1.0

Writes into --output (default runs/omniglot/<timestamp>): TensorBoard logs,
report.json (per-task test accuracy by alphabet, mean, parameters, sigma,
seed, wall time, export path), accuracy.png, and exports a SavedModel for TF
Serving to saved_models/omniglot/<version>/ (--export-dir to change).
"""

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from mtl_keras import MultiTaskModel, conv_backbone, vgg_filters  # noqa: E402
from mtl_keras.data import OMNIGLOT_DIR_ENV, load_omniglot  # noqa: E402
from mtl_keras.distribute import (  # noqa: E402
    STRATEGIES, backup_dir_for_worker, get_strategy, is_chief, prepare_for_replicas,
)  # noqa: E402
from mtl_keras.export import export_for_serving  # noqa: E402
from mtl_keras.progress import CompactProgbar  # noqa: E402
from mtl_keras.sharing import SelectiveSharing  # noqa: E402
from mtl_keras.tensorboard import MultiTaskTensorBoard  # noqa: E402
from mtl_keras.weighting import available_weightings  # noqa: E402
from mtl_keras.plots import plot_task_bars  # noqa: E402
from mtl_keras.reporting import per_task, text_table, write_json  # noqa: E402


# The choice that did best on validation accuracy on all 50 alphabets
# (docs/RESULTS.md: none 0.847, variance 0.818, similarity 0.774; README,
# "Selective Sharing").
SHARING_DEFAULT = "none"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", default=None,
                   help=f"folder with images_background.zip / images_evaluation.zip (or set {OMNIGLOT_DIR_ENV}); "
                        "default: TFDS's manual dir, then ../shared/data/omniglot beside the checkout")
    d.add_argument("--archives", choices=("full", "small"), default="full",
                   help="'full' = all 50 alphabets; 'small' = the 8 alphabets of the _small zips (quick checks)")
    d.add_argument("--tfds-dir", default=None, help="where the prepared TFDS dataset is cached (default ~/tensorflow_datasets)")
    d.add_argument("--tasks", type=int, default=None, help="use the first K alphabets (default: all)")
    d.add_argument("--image-size", type=int, default=32)
    m = p.add_argument_group("model")
    m.add_argument("--sigma", type=float, default=0.5, help="sharing ratio: 1 = fully shared, 0 = a sub-network per task")
    m.add_argument("--routing-mode", choices=("partition", "independent"), default="partition")
    m.add_argument("--width", type=int, default=32, help="filters of the first conv block (doubled per block)")
    m.add_argument("--depth", type=int, default=4, help="number of conv blocks")
    m.add_argument("--head-units", type=int, nargs="*", default=[128], help="estimator widths of each task head")
    m.add_argument("--head-dropout", type=float, default=0.2)
    m.add_argument("--bn-momentum", type=float, default=0.99,
                   help="batch norm momentum (0.9 suits runs of a few hundred steps)")
    m.add_argument("--sharing", choices=("none", "similarity", "variance"), default=SHARING_DEFAULT,
                   help="Selective Sharing rule that merges task heads during training")
    m.add_argument("--sharing-epoch", type=int, default=2,
                   help="epoch at whose end Selective Sharing groups the heads")
    m.add_argument("--weighting", choices=available_weightings(), default="equal",
                   help="how task losses (and gradients) are combined")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=12)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--jit-compile", action=argparse.BooleanOptionalAction, default=False,
                   help="XLA-compile the train step")
    t.add_argument("--strategy", choices=STRATEGIES, default="auto",
                   help="auto: MultiWorkerMirrored when TF_CONFIG names a cluster, Mirrored with >1 GPU, "
                        "else one device")
    t.add_argument("--backup-dir", default=None,
                   help="BackupAndRestore folder: an interrupted run restarts from its last epoch")
    o = p.add_argument_group("output")
    o.add_argument("--output", default=None, help="run folder (default runs/omniglot/<timestamp>)")
    o.add_argument("--export-dir", default=str(ROOT / "saved_models" / "omniglot"),
                   help="SavedModel root for TF Serving; the next integer version is created inside")
    o.add_argument("--no-export", action="store_true", help="skip the SavedModel export")
    o.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # MultiWorkerMirroredStrategy must exist before any other TensorFlow op.
    strategy = get_strategy(args.strategy)
    chief = is_chief(strategy)
    started = time.time()
    keras.utils.set_random_seed(args.seed)
    output = Path(args.output or ROOT / "runs" / "omniglot" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    output.mkdir(parents=True, exist_ok=True)

    data = load_omniglot(
        data_dir=args.data_dir, tasks=args.tasks, image_size=args.image_size, batch_size=args.batch_size,
        tfds_dir=args.tfds_dir, archives=args.archives, seed=args.seed,
    )
    tasks = data.tasks
    print(f"Omniglot: {len(tasks)} alphabets, {data.num_examples} examples, "
          f"{args.image_size}x{args.image_size} images")

    replicas = strategy.num_replicas_in_sync
    train = prepare_for_replicas(data.train, args.batch_size, strategy, training=True)
    validation = prepare_for_replicas(data.validation, args.batch_size, strategy)
    test = prepare_for_replicas(data.test, args.batch_size, strategy)
    with strategy.scope():
        backbone = conv_backbone(
            (args.image_size, args.image_size, 1), len(tasks), sigma=args.sigma,
            filters=vgg_filters(args.width, args.depth), routing_mode=args.routing_mode, seed=args.seed,
            batch_norm_momentum=args.bn_momentum,
        )
        model = MultiTaskModel(backbone, tasks, head_units=args.head_units, head_dropout=args.head_dropout,
                               weighting=args.weighting, seed=args.seed, name="omniglot_mtl")
        model.compile(optimizer=keras.optimizers.Adam(args.lr), jit_compile=args.jit_compile)
    params_before = model.count_params()
    print(f"{type(strategy).__name__}: {replicas} replica(s) | {params_before:,} parameters | "
          f"sigma {args.sigma} | weighting {args.weighting} | sharing {args.sharing}")

    # Non-chief workers of a multi-worker job log aside; the chief's logs are the run's.
    tensorboard_dir = output / "tensorboard" if chief else Path(tempfile.mkdtemp(prefix="mtl_worker_tb_"))
    callbacks = [
        keras.callbacks.TensorBoard(log_dir=str(tensorboard_dir)),
        MultiTaskTensorBoard(str(tensorboard_dir), config=vars(args)),
        CompactProgbar(),
    ]
    # Each worker backs up into its own folder; Selective Sharing's record of
    # merges goes beside that worker's BackupAndRestore state.
    backup_dir = backup_dir_for_worker(args.backup_dir, strategy) if args.backup_dir else None
    sharing = None
    if args.sharing != "none":
        sharing = SelectiveSharing(
            args.sharing, start_epoch=min(args.sharing_epoch, args.epochs), log_dir=str(tensorboard_dir),
            plot_dir=str(output), backup_dir=backup_dir, seed=args.seed, verbose=int(args.verbose > 0),
        )
        callbacks.insert(0, sharing)
    if backup_dir:
        callbacks.append(keras.callbacks.BackupAndRestore(backup_dir))
    history = model.fit(train, validation_data=validation, epochs=args.epochs,
                        callbacks=callbacks, verbose=args.verbose, shuffle=False)
    train_seconds = time.time() - started
    test_logs = model.evaluate(test, return_dict=True, verbose=0)
    if not chief:
        # Multi-worker: every worker trained the same weights; only the chief writes.
        output = output / f"worker_{strategy.cluster_resolver.task_id}"
        output.mkdir(parents=True, exist_ok=True)
    model_path = output / "model.keras"
    model.save(model_path)
    export_path = None
    if not args.no_export and chief:
        export_path = export_for_serving(model, args.export_dir)
        print(f"SavedModel for TF Serving: {export_path}")
    wall = time.time() - started

    accuracy = per_task(test_logs, tasks, "accuracy")
    chance = {t.name: 1.0 / t.num_outputs for t in tasks}
    report = {
        "app": "train_omniglot",
        "tasks": len(tasks),
        "sigma": args.sigma,
        "weighting": args.weighting,
        "sharing": sharing.report() if sharing is not None else None,
        "strategy": type(strategy).__name__,
        "replicas": replicas,
        "routing_mode": args.routing_mode,
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "width": args.width,
        "depth": args.depth,
        "parameters": model.count_params(),
        "parameters_at_start": params_before,
        "head_parameters": model.head_parameter_count(),
        "mean_test_accuracy": test_logs["mean_accuracy"],
        "test_loss": test_logs["loss"],
        "test_accuracy": accuracy,
        "chance_accuracy": chance,
        "final_val_mean_accuracy": history.history.get("val_mean_accuracy", [None])[-1],
        "wall_time_seconds": round(wall, 1),
        "train_seconds": round(train_seconds, 1),
        "num_examples": data.num_examples,
        "export_path": str(export_path) if export_path else None,
        "model_path": str(model_path),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
    }
    plot_task_bars(accuracy, output / "accuracy.png",
                   title=f"Omniglot per-alphabet test accuracy (sigma={args.sigma}, mean {report['mean_test_accuracy']:.3f})",
                   reference=chance, reference_label="chance")
    write_json(output / "report.json", report)

    rows = [[name, tasks[name].num_outputs, accuracy[name], chance[name]] for name in sorted(accuracy)]
    print()
    print(text_table(rows, ["alphabet", "classes", "test acc", "chance"]))
    print(f"\nmean test accuracy {report['mean_test_accuracy']:.4f} over {len(tasks)} alphabets | "
          f"parameters {report['parameters']:,} | sigma {args.sigma} | seed {args.seed} | {wall:.0f} s")
    print(f"report: {output / 'report.json'}")
    return report


if __name__ == "__main__":
    main()
