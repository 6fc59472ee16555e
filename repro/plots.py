"""The book's house style for figures: one look across chapters, labelled axes with units."""
from __future__ import annotations

from typing import Sequence

import matplotlib

import matplotlib.pyplot as plt
import numpy as np

PALETTE = "colorblind"


def _inline_in_notebooks() -> None:
    """Inside a Jupyter kernel, draw figures into the notebook even when the environment
    forces another backend (CI sets MPLBACKEND=Agg, which would silently drop them)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and "IPKernelApp" in shell.config:
        shell.run_line_magic("matplotlib", "inline")


def use_style() -> None:
    """Apply the house style (seaborn whitegrid, colour-blind palette, readable sizes)."""
    import seaborn as sns
    _inline_in_notebooks()
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight",
                         "axes.titleweight": "bold", "figure.figsize": (6.0, 3.8),
                         "legend.frameon": False})


def percent_axis(ax, axis: str = "y") -> None:
    from matplotlib.ticker import PercentFormatter
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(PercentFormatter(1.0))


def eps_label(norm: str = "linf", unit: str = "/255") -> str:
    return (r"$\epsilon$ ($L_\infty$, " + unit + ")") if norm == "linf" else r"$\epsilon$ ($L_2$)"


def accuracy_curves(x: Sequence[float], curves: dict[str, Sequence[float]], *, xlabel: str,
                    title: str | None = None, ax=None, marker: str = "o"):
    """Accuracy (fraction) against a swept quantity, one line per named curve."""
    if ax is None:
        _, ax = plt.subplots()
    for name, ys in curves.items():
        ax.plot(x, ys, marker=marker, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    percent_axis(ax)
    if title:
        ax.set_title(title)
    ax.legend()
    return ax


def image_grid(images: np.ndarray, titles: Sequence[str] | None = None, ncols: int = 8,
               size: float = 1.2):
    """Show NCHW images in [0,1] (or uint8) in a grid."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        images = images / 255.0
    n = len(images)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * size * 1.15))
    for i, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if i < n:
            img = images[i].transpose(1, 2, 0)
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img,
                      cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1)
            if titles is not None:
                ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig
