"""Turning a model's logs into per-task results, tables and report files."""

import json
import math
import os


def per_task(logs, tasks, metric, prefix=""):
    """`{task name: logs[f"{prefix}{name}/{metric}"]}` for the tasks that report `metric`.

    Args:
        logs: a dict of logs (`model.evaluate(..., return_dict=True)`, a
            History's last epoch, ...).
        tasks: the `TaskSet`.
        metric: e.g. `"accuracy"` or `"loss"`.
        prefix: `"val_"` for validation logs.
    """
    out = {}
    for t in tasks:
        key = f"{prefix}{t.name}/{metric}"
        if key in logs:
            out[t.name] = float(logs[key])
    return out


def markdown_table(rows, headers):
    """A GitHub-flavoured Markdown table of `rows` (lists of cells)."""
    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(rows, headers):
    """A plain fixed-width table for the terminal."""
    cells = [[str(h) for h in headers]] + [
        [f"{c:.4f}" if isinstance(c, float) else str(c) for c in r] for r in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path, data):
    """Writes `data` as indented JSON, atomically (a crash leaves the old file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=_jsonable)
    os.replace(tmp, path)
    return path


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)
