"""Matplotlib figures written by the apps (headless: the Agg backend).

`pyplot()` is the one place the library picks matplotlib's backend: every
figure module gets `matplotlib.pyplot` through it.
"""

import functools

import matplotlib
import numpy as np


@functools.cache
def pyplot():
    """`matplotlib.pyplot` on the non-interactive Agg backend (selected on the first call only).

    The figures are files written by training runs, often on machines without
    a display, where an interactive backend fails or opens windows. Selecting
    it once leaves a backend the caller picks afterwards alone.

    Example:

    >>> plt = pyplot()
    >>> fig, ax = plt.subplots()
    """
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt



def plot_task_bars(values, path, title, ylabel="test accuracy", reference=None, reference_label=None):
    """Horizontal bars of one value per task, sorted, with the mean marked.

    Args:
        values: `{task name: value}`.
        path: PNG file to write.
        title: figure title.
        ylabel: what the values are.
        reference: optional `{task name: value}` drawn as ticks on each bar
            (e.g. chance level).
        reference_label: legend text of the reference ticks.

    Returns:
        `path`.
    """
    plt = pyplot()
    names = sorted(values, key=values.get)
    vals = np.array([values[n] for n in names], dtype=float)
    height = max(3.0, 0.22 * len(names) + 1.2)
    fig, ax = plt.subplots(figsize=(8, height))
    y = np.arange(len(names))
    ax.barh(y, vals, color="#4C72B0")
    if reference:
        ax.scatter([reference[n] for n in names], y, marker="|", s=120, color="#C44E52",
                   label=reference_label or "reference", zorder=3)
    mean = float(vals.mean())
    ax.axvline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.3f}")
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xlabel(ylabel)
    ax.set_xlim(0, max(1.0, float(vals.max()) * 1.05))
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
