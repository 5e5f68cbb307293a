"""Turning a model's logs into per-task results, tables and report files."""

import errno
import json
import math
import os
import tempfile
from pathlib import Path


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
    """Writes `data` as indented JSON, atomically: a crash or a full disk leaves the old file.

    The JSON goes to `<path>.tmp`, is flushed to disk, then renamed over
    `path`.

    Raises:
        OSError: naming the file, the reason (e.g. "No space left on device")
            and that the previous file is unchanged; the partial `.tmp` file
            is removed. Its `errno` is the original one.
    """
    # Serialised first: data that cannot be written fails before any file is touched.
    text = json.dumps(data, indent=2, sort_keys=False, default=_jsonable)
    tmp = f"{path}.tmp"
    existed = os.path.exists(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        kept = f"the previous {os.path.basename(str(path))} is unchanged" if existed else "nothing was written"
        raise OSError(e.errno, f"Could not write {path}: {e.strerror or e}; {kept}.") from e
    return path


def ensure_writable_dir(path, flag=None):
    """Creates folder `path` if needed and checks that files can be written into it.

    Apps call it for every output folder before training, so that a folder
    that cannot be written fails in a second, not after the training it
    would have held.

    Args:
        path: the folder.
        flag: the command-line flag that gave it, named in the error.

    Returns:
        `path` as a `Path`.

    Raises:
        OSError: naming the folder, the flag and the reason (a file in the
            way, a read-only file system, no permission, ...). Nothing that
            already exists is changed.
    """
    path = Path(path)
    given = f" (given by {flag})" if flag else ""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR, f"Output folder {path}{given} is a file, not a folder; choose another path."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OSError(
            e.errno, f"Cannot write into the output folder {path}{given}: {e.strerror or e}; choose another path."
        ) from e
    return path


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def fsync_path(path):
    """Flushes a file's or a folder's entry to disk, so a rename that follows survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
