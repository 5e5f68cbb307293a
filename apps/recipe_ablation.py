"""Ablation of the default Omniglot recipe: what each of its parts is worth, and at what wall time.

    python apps/recipe_ablation.py --output docs/ablation --seeds 0 1   # the table of docs/RESULTS.md
    python apps/recipe_ablation.py --output runs/abl --row "wider=--width 48" --seeds 0

Each row is `apps/train_omniglot.py` (all 50 alphabets) with some flags
changed: the default recipe itself, the recipe without one of its parts,
and the recipe of earlier releases. Every (row, seed) runs in its own
process, so its wall time is what a user waits for (start-up and data
preparation included). A run whose report.json exists is reused, so a
killed ablation started again goes on where it stopped, but only if it
trained what its row means now (the settings in its report.json against the
row's flags on today's defaults; otherwise the ablation stops and says
which settings differ). Writes
OUTPUT/ablation.json (runs, summary, provenance) and OUTPUT/ablation.md.
"""

import argparse
import sys
from pathlib import Path

from mtl_keras.app_errors import exit_on_user_error
from mtl_keras.experiments.ablation import AblationRow, ablation_table, run_ablation, summarise_ablation
from mtl_keras.experiments.provenance import RunProvenance, describe
from mtl_keras.presets import add_config_arguments, config_from_args
from mtl_keras.reporting import ensure_writable_dir, write_json

APP = Path(__file__).resolve().parent / "train_omniglot.py"
AUGMENTATION = "--augment-shift 0.1 --augment-rotation 10 --augment-scale 0.1"
V01 = "--sigma 0.5 --epochs 12 --lr-schedule constant --warmup-fraction 0 --label-smoothing 0 --head-units 128 --head-dropout 0.2"
# The default recipe, each of its parts taken out or swapped for what it
# replaced, the lever that did not pay (augmentation), sigma at the same
# recipe (the default is 1, hard sharing, which beat Task Routing at 0.5 and
# 0.75 on both seeds; below 0.5 is left out: sigma 0.25 was 11 points below 0.5
# at v0.1's recipe, and at this one more sharing scores higher), and the recipe
# of v0.1 (Task Routing at sigma 0.5, 12 epochs, constant learning rate,
# 128-unit head estimators with dropout 0.2, no smoothing).
DEFAULT_ROWS = (
    "default recipe=",
    "- decay (constant lr)=--lr-schedule constant --warmup-fraction 0",
    "cosine instead of wsd=--lr-schedule cosine",
    "- label smoothing=--label-smoothing 0",
    "128-unit head estimators, dropout 0.2=--head-units 128 --head-dropout 0.2",
    f"+ augmentation={AUGMENTATION}",
    "Task Routing, sigma 0.5=--sigma 0.5",
    "Task Routing, sigma 0.75=--sigma 0.75",
    f"v0.1 recipe={V01}",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder of the runs, ablation.json and ablation.md")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--row", action="append", default=None, metavar="NAME=FLAGS",
                   help="a row (repeat the flag for more); default: the rows of DEFAULT_ROWS")
    p.add_argument("--reference", default=None, help="row the others are compared with (default: the first)")
    p.add_argument("--app-flag", action="append", default=[], metavar="FLAG",
                   help="a flag given to every run of the app (e.g. --app-flag=--archives=small)")
    args = p.parse_args(argv)
    try:
        args.rows = [AblationRow.parse(r) for r in (args.row or DEFAULT_ROWS)]
    except ValueError as e:
        p.error(str(e))
    if len({r.slug for r in args.rows}) != len(args.rows):
        p.error("two rows have the same name (folder); name each row differently")
    return args


def row_config(row, seed, app_flags=()):
    """The configuration train_omniglot.py runs for `row` and `seed` (its "default" preset and the flags)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_config_arguments(parser, preset="default")
    known, _ = parser.parse_known_args([*app_flags, *row.flags, "--seed", str(seed)])
    return config_from_args(known).to_dict()


@exit_on_user_error("recipe_ablation")
def main(argv=None):
    args = parse_args(argv)
    output = ensure_writable_dir(args.output, "--output")
    common = ["--no-export", "--verbose", "0", *args.app_flag]
    with RunProvenance(argv, __file__) as provenance:
        try:
            runs = run_ablation(APP, args.rows, args.seeds, output, common,
                                expected_config=lambda row, seed: row_config(row, seed, common))
        except (RuntimeError, ValueError) as e:
            raise SystemExit(f"recipe_ablation: error: {e}") from e
    summary = summarise_ablation(runs, args.rows, args.reference)
    table = ablation_table(summary)
    write_json(output / "ablation.json", {"summary": summary, "runs": runs, "app_flags": common,
                                          "command": provenance.record["command"], "provenance": provenance.record})
    (output / "ablation.md").write_text(
        f"{table}\n\nCommand: `{provenance.record['command']}`. {describe(provenance.record)}\n")
    print(table)
    print(describe(provenance.record))
    return summary


if __name__ == "__main__":
    sys.exit(main() and 0)
