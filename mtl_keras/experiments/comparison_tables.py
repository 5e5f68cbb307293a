"""The tables of a method comparison: results.md, results.csv and per_task.csv."""

import csv
from pathlib import Path

from mtl_keras.experiments.provenance import describe
from mtl_keras.reporting import markdown_table

SUMMARY_HEADERS = ["config", "seeds", "mean test accuracy", "Δm vs STL (%)", "tasks > STL",
                   "parameters", "wall time (s)"]
CSV_COLUMNS = ["config", "seeds", "mean_test_accuracy", "mean_test_accuracy_std", "delta_m", "delta_m_std",
               "tasks_beating_stl", "parameters", "wall_seconds"]


def _pm(mean, std, digits=4):
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def summary_table(rows, num_tasks):
    """The summary as `(cells, headers)`, for Markdown or the terminal."""
    cells = [[r["config"], r["seeds"], _pm(r["mean_test_accuracy"], r["mean_test_accuracy_std"]),
              _pm(r["delta_m"], r["delta_m_std"], 2), f"{r['tasks_beating_stl']}/{num_tasks}",
              f"{r['parameters']:,}", f"{r['wall_seconds']:.0f}"] for r in rows]
    return cells, SUMMARY_HEADERS


def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_tables(rows, tasks, output, meta):
    """Writes `results.md`, `results.csv` and `per_task.csv` into `output`.

    Args:
        rows: `summarise`'s rows.
        tasks: the `TaskSet`.
        output: the folder.
        meta: `command`, `machine`, `budget`, `finished`, `total_seconds`
            and `provenance` (a `RunProvenance.record`).
    """
    output = Path(output)
    names = [r["config"] for r in rows]
    best = max(rows, key=lambda r: r["mean_test_accuracy"])
    summary, headers = summary_table(rows, len(tasks))
    task_rows = [[t.name, t.num_outputs] + [r["per_task_accuracy"][t.name] for r in rows] for t in tasks]
    lines = [
        "# Method comparison",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}. Budget: {meta['budget']}. Finished {meta['finished']} "
        f"after {meta['total_seconds'] / 60:.1f} min.",
        "",
        f"Provenance: {describe(meta['provenance'])}.",
        "",
        "Δm = (1/T) Σ_t (M_t − M_stl,t) / M_stl,t × 100 over the T tasks' test accuracies "
        "(higher is better), of the seed-averaged accuracies; ± is the std over seeds "
        "(0 with one seed). Wall time = training + test per seed (STL: sum over its models, "
        "as measured when trained).",
        "",
        markdown_table(summary, headers),
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
    _write_csv(output / "results.csv", CSV_COLUMNS, [
        [r["config"], r["seeds"], f"{r['mean_test_accuracy']:.6f}", f"{r['mean_test_accuracy_std']:.6f}",
         f"{r['delta_m']:.4f}", f"{r['delta_m_std']:.4f}", r["tasks_beating_stl"], r["parameters"],
         f"{r['wall_seconds']:.1f}"] for r in rows])
    _write_csv(output / "per_task.csv", ["task", "classes"] + names, [
        [t.name, t.num_outputs] + [f"{r['per_task_accuracy'][t.name]:.6f}" for r in rows] for t in tasks])
