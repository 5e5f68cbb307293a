"""The figure of a method comparison: mean test accuracy and Δm per configuration."""

import numpy as np

from mtl_keras.plots import pyplot


def plot_results(rows, path, title):
    """Two bar charts side by side, one bar per configuration, with the std over seeds.

    Args:
        rows: `comparison.summarise`'s rows.
        path: the PNG to write.
        title: the figure's title.
    """
    plt = pyplot()
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
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
