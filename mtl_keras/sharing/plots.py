"""Figures of Selective Sharing: the task-affinity heatmap with its dendrogram."""

import io

import numpy as np

from mtl_keras.plots import pyplot


def plot_affinity(affinity, labels, path=None, title="Task affinity (cosine of gradient features)", groups=None):
    """A heatmap of `affinity` ordered by an average-linkage dendrogram drawn above it.

    Args:
        affinity: `[n, n]` similarities in [-1, 1] (e.g. `Grouping.affinity`).
        labels: `n` names (tasks or groups).
        path: PNG file to write; None returns the PNG bytes instead.
        title: figure title.
        groups: optional partition of `range(n)`; members of a group of two
            or more get the same colour in the tick labels.

    Returns:
        `path`, or the PNG as bytes when `path` is None.
    """
    from scipy.cluster.hierarchy import dendrogram, linkage
    from scipy.spatial.distance import squareform

    plt = pyplot()
    a = np.asarray(affinity, dtype=np.float64)
    n = len(a)
    size = min(16.0, max(5.0, 0.22 * n + 3.0))
    fig = plt.figure(figsize=(size, size * 1.15))
    top = fig.add_axes([0.18, 0.80, 0.70, 0.13])
    main = fig.add_axes([0.18, 0.08, 0.70, 0.70])
    bar = fig.add_axes([0.90, 0.08, 0.02, 0.70])
    if n >= 2:
        distance = np.clip(1.0 - a, 0.0, 2.0)
        distance = (distance + distance.T) / 2
        np.fill_diagonal(distance, 0.0)
        tree = linkage(squareform(distance, checks=False), method="average")
        order = dendrogram(tree, ax=top, no_labels=True, color_threshold=0, above_threshold_color="#4C72B0")["leaves"]
    else:
        order = list(range(n))
    top.set_axis_off()
    image = main.imshow(a[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    names = [str(labels[i]) for i in order]
    fontsize = 8 if n <= 40 else 6
    main.set_xticks(range(n))
    main.set_yticks(range(n))
    main.set_xticklabels(names, rotation=90, fontsize=fontsize)
    main.set_yticklabels(names, fontsize=fontsize)
    if groups:
        colours = plt.get_cmap("tab20")
        colour_of = {}
        for g, members in enumerate(m for m in groups if len(m) > 1):
            for u in members:
                colour_of[u] = colours(g % 20)
        for ticks in (main.get_xticklabels(), main.get_yticklabels()):
            for tick, u in zip(ticks, order):
                if u in colour_of:
                    tick.set_color(colour_of[u])
                    tick.set_fontweight("bold")
    fig.colorbar(image, cax=bar)
    fig.suptitle(title)
    if path is None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        plt.close(fig)
        return buffer.getvalue()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
