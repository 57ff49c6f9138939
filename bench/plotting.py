"""Side-by-side log-log panels written to a PNG (matplotlib's Agg backend: no display needed)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)


def save_loglog_panels(path: Path, panels: list, title: str) -> None:
    """One log-log panel per dict in `panels`: {"title", "xlabel", "ylabel", "series": {label: (xs, ys)}}.

    Non-positive values cannot sit on a log axis and are left out of their series.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, (xs, ys) in panel["series"].items():
            points = [(x, y) for x, y in zip(xs, ys) if y is not None and y > 0]
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(panel["title"])
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
    fig.suptitle(title, fontsize="medium")
    save_figure(fig, axes.flat, path, dpi=120, legend_size="small")


def save_figure(fig, axes, path: Path, dpi: int, legend_size: str = "x-small") -> None:
    """A grid on every panel and a legend on those with a series (a panel whose every value was left out
    has none); the figure written to `path` and closed."""
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=legend_size)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
