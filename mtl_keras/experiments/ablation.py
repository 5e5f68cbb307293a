"""A recipe ablation: one training app run per (row, seed), each row the app's command with some flags changed.

Each row names a variant of a training recipe by the flags it passes to a
training app (e.g. `--lr-schedule constant` for "without the cosine
schedule"). Every (row, seed) runs the app in its own process, so its wall
time counts everything a user waits for (start-up, data preparation,
training, evaluation), and the app's own `report.json` is the result. A run
whose report exists is not run again, so a killed ablation goes on where it
stopped.

Example:

>>> rows = [AblationRow("recipe", ()), AblationRow("- augmentation", ("--augment-shift", "0"))]
>>> runs = run_ablation("apps/train_omniglot.py", rows, seeds=[0, 1], output="runs/ablation")
>>> print(ablation_table(summarise_ablation(runs, rows)))
"""

import dataclasses
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from mtl_keras.reporting import markdown_table


@dataclasses.dataclass(frozen=True)
class AblationRow:
    """One variant of the recipe.

    Attributes:
        name: how the table names it (e.g. `"- label smoothing"`).
        flags: the app flags that make the variant, as separate arguments.
    """

    name: str
    flags: tuple = ()

    @classmethod
    def parse(cls, text):
        """`"NAME=FLAGS"` (FLAGS split like a shell would) -> `AblationRow`.

        Example:

        >>> AblationRow.parse("no smoothing=--label-smoothing 0")
        AblationRow(name='no smoothing', flags=('--label-smoothing', '0'))
        """
        name, sep, flags = text.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"An ablation row is NAME=FLAGS (e.g. 'no smoothing=--label-smoothing 0'); got {text!r}.")
        return cls(name.strip(), tuple(shlex.split(flags)))

    @property
    def slug(self):
        """A folder name for the row's runs."""
        keep = "".join(c if c.isalnum() else "_" for c in self.name.lower())
        return "_".join(part for part in keep.split("_") if part) or "row"


def run_folder(output, row, seed):
    return Path(output) / row.slug / f"seed{seed}"


# Settings a report.json recorded at its top level before it recorded the
# whole configuration (its "config"); "tasks" and "sharing" are left out, as
# they hold the task count and the sharing report there.
_TOP_LEVEL_SETTINGS = ("sigma", "weighting", "routing_mode", "seed", "epochs", "batch_size", "image_size",
                       "width", "depth")


def config_mismatch(report, expected):
    """The settings in which a finished run differs from what it should be.

    Args:
        report: the run's `report.json`, as a dict.
        expected: the configuration the run should have (e.g.
            `TrainConfig.to_dict()`).

    Returns:
        `{name: (recorded, expected)}` for each setting both know with another
        value (empty when the run is the expected one). A report with a
        `config` is compared on all of it; an older one on the settings it
        recorded at its top level.
    """
    if "config" in report:
        recorded = report["config"]
    else:
        recorded = {k: report[k] for k in _TOP_LEVEL_SETTINGS if k in report}
    plain = json.loads(json.dumps(expected))  # tuples as lists, as a report holds them
    return {k: (recorded[k], v) for k, v in plain.items() if k in recorded and recorded[k] != v}


def run_one(app, row, seed, output, common_flags=(), python=sys.executable, log=print, expected=None):
    """Runs `app` for `row` and `seed` (unless its report exists) and returns its result.

    Args:
        app: path of the training app; it must take `--seed S --output DIR`
            and write `DIR/report.json` with `mean_test_accuracy`.
        row: the `AblationRow`.
        seed: the seed.
        output: the ablation's folder; the run goes to `output/<row>/seed<S>`.
        common_flags: flags every row passes before its own (e.g. `--no-export`).
        python: the interpreter.
        log: where progress lines go.
        expected: the configuration the run must have (a dict, see
            `config_mismatch`), or None. A finished run is reused only if it
            has it: a default that changed since, or a row whose flags did,
            would otherwise put an old run in the new row.

    Returns:
        `{"row", "seed", "mean_test_accuracy", "parameters", "wall_seconds",
        "report", "reused"}`; `wall_seconds` is the process's, measured
        outside it, when it ran in this ablation.

    Raises:
        RuntimeError: the app failed (its output's last lines included).
        ValueError: a finished run in the row's folder has another
            configuration than `expected` (nothing is deleted).
    """
    folder = run_folder(output, row, seed)
    report_path = folder / "report.json"
    reused = report_path.exists()
    wall = None
    if reused:
        report = json.loads(report_path.read_text())
        differ = {} if expected is None else config_mismatch(report, expected)
        if differ:
            settings = ", ".join(f"{k} {old!r} instead of {new!r}" for k, (old, new) in sorted(differ.items()))
            raise ValueError(
                f"{folder} holds a finished run of another configuration than row {row.name!r} seed {seed} "
                f"trains now ({settings}): a default or the row's flags changed since it ran. Give another "
                f"--output, or move {folder} away to train it again.")
        if (folder / "wall_seconds.json").exists():
            wall = json.loads((folder / "wall_seconds.json").read_text())["wall_seconds"]
    else:
        folder.mkdir(parents=True, exist_ok=True)
        command = [python, str(app), *common_flags, *row.flags, "--seed", str(seed), "--output", str(folder)]
        log(f"{row.name} seed {seed}: {shlex.join(command[1:])}")
        started = time.perf_counter()
        with open(folder / "log.txt", "w") as out:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - started
        if done.returncode != 0 or not report_path.exists():
            tail = (folder / "log.txt").read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"{row.name} seed {seed} failed (exit {done.returncode}):\n" + "\n".join(tail))
        (folder / "wall_seconds.json").write_text(json.dumps({"wall_seconds": wall}))
        report = json.loads(report_path.read_text())
    result = {
        "row": row.name,
        "seed": seed,
        "mean_test_accuracy": float(report["mean_test_accuracy"]),
        "parameters": int(report["parameters"]),
        "head_parameters": report.get("head_parameters"),
        "wall_seconds": None if wall is None else round(wall, 3),
        "report": str(report_path),
        "reused": reused,
        # Each run's own record: runs of one ablation may be days apart.
        "quiet": report.get("provenance", {}).get("quiet"),
        "load_average": [report.get("provenance", {}).get(k, [None])[0]
                         for k in ("load_average_before", "load_average_after")],
        "git_commit": report.get("provenance", {}).get("git_commit"),
    }
    log(f"{row.name} seed {seed}: mean test accuracy {result['mean_test_accuracy']:.4f}"
        + ("" if wall is None else f", {wall:.0f} s") + (" (earlier run)" if reused else ""))
    return result


def run_ablation(app, rows, seeds, output, common_flags=(), log=print, expected_config=None):
    """`run_one` for every row and seed, seed-major (so every row has a first seed early).

    `expected_config(row, seed)`, if given, is the configuration each run
    must have (`run_one`'s `expected`).
    """
    return [run_one(app, row, seed, output, common_flags, log=log,
                    expected=None if expected_config is None else expected_config(row, seed))
            for seed in seeds for row in rows]


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, std


def summarise_ablation(runs, rows, reference=None):
    """Per row: accuracy mean ± std over seeds, its change against `reference`, wall time, parameters.

    Args:
        runs: results of `run_one`.
        rows: the `AblationRow`s, in table order.
        reference: the name of the row the others are compared with
            (default: the first).

    Returns:
        One dict per row. `within_noise` is True when the difference to the
        reference is smaller than the larger of the two rows' seed spreads
        (std), so it cannot be told from seed noise.
    """
    reference = reference or rows[0].name
    by_row = {row.name: [r for r in runs if r["row"] == row.name] for row in rows}
    ref_mean, ref_std = _mean_std([r["mean_test_accuracy"] for r in by_row[reference]])
    summary = []
    for row in rows:
        mine = by_row[row.name]
        mean, std = _mean_std([r["mean_test_accuracy"] for r in mine])
        wall, wall_std = _mean_std([r["wall_seconds"] for r in mine])
        delta = None if mean is None or ref_mean is None else mean - ref_mean
        summary.append({
            "row": row.name,
            "flags": shlex.join(row.flags),
            "seeds": sorted(r["seed"] for r in mine),
            "accuracy_per_seed": [r["mean_test_accuracy"] for r in sorted(mine, key=lambda r: r["seed"])],
            "mean_test_accuracy": mean,
            "std": std,
            "delta_vs_reference": delta,
            "within_noise": None if delta is None or row.name == reference else abs(delta) <= max(std, ref_std),
            "wall_seconds": wall,
            "parameters": mine[0]["parameters"] if mine else None,
            # Selective Sharing can merge differently per seed: the mean, and each seed's.
            "head_parameters": _mean_std([r.get("head_parameters") for r in mine])[0],
            "head_parameters_per_seed": [r.get("head_parameters") for r in sorted(mine, key=lambda r: r["seed"])],
        })
    return summary


def ablation_table(summary):
    """A Markdown table of `summarise_ablation`'s rows."""
    rows = []
    for s in summary:
        acc = "–" if s["mean_test_accuracy"] is None else f"{s['mean_test_accuracy']:.4f} ± {s['std']:.4f}"
        delta = "" if s["delta_vs_reference"] is None or s["within_noise"] is None else (
            f"{100 * s['delta_vs_reference']:+.2f} pt" + (" (noise)" if s["within_noise"] else ""))
        wall = "–" if s["wall_seconds"] is None else f"{s['wall_seconds']:.0f} s"
        heads = "–" if s.get("head_parameters") is None else f"{s['head_parameters']:,.0f}"
        rows.append([s["row"], f"`{s['flags']}`" if s["flags"] else "(none)", acc, delta, wall,
                     " ".join(f"{a:.4f}" for a in s["accuracy_per_seed"]), heads])
    return markdown_table(rows, ["recipe", "flags", "mean test accuracy (± std over seeds)", "vs first row",
                                 "wall time (mean)", "per seed", "head parameters (mean)"])
