"""matplotlib for the PNG plots, loaded when a plot is drawn: it is the optional `plot` extra, so commands that
draw nothing (serve, generate, ...) must not need it."""

from __future__ import annotations


class PlottingUnavailable(RuntimeError):
    """matplotlib is not installed (the CLI prints this without a traceback)."""


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    try:
        import matplotlib
    except ImportError as exc:
        raise PlottingUnavailable("plots need matplotlib: pip install 'tokenmill[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
