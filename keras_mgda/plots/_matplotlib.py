"""matplotlib, imported when a figure is drawn, not when `keras_mgda` is
imported, so the package imports without it."""

__all__ = ["new_axes", "pyplot"]


def pyplot():
    """`matplotlib.pyplot`, with a clear error where it is not installed."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "keras_mgda.plots needs matplotlib: pip install 'keras-mgda[plots]'."
        ) from error
    return plt


def new_axes(ax, figsize, **subplot_kw):
    """`(figure, ax)`: the given axes and its figure, or new ones laid out
    with constrained layout, so that titles, colour bars and legends stay
    inside the saved figure."""
    if ax is not None:
        return ax.figure, ax
    return pyplot().subplots(figsize=figsize, subplot_kw=subplot_kw or None, layout="constrained")
