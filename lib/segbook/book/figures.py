"""Colours for label maps: one fixed colour per class, no paired shades.

A ground-truth or class-matched map must show class ``c`` in the same colour in every panel
and every image, and two classes must never share a hue family (``tab20`` pairs each hue with
a lighter shade of itself). :func:`label_colormap` gives ``tab10`` for up to 10 classes and,
above that, colours spaced by the golden angle in hue with alternating lightness;
:func:`show_label_map` draws a map with it, ``vmin``/``vmax`` fixed to the class range and
ignored pixels (< 0) white.
"""

from __future__ import annotations

import colorsys

import numpy as np

__all__ = ["label_colormap", "show_label_map"]


def label_colormap(num_classes: int):
    """A ``ListedColormap`` with ``num_classes`` distinct colours (class ``c`` -> colour ``c``)."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    n = max(int(num_classes), 1)
    if n <= 10:
        return ListedColormap(colormaps["tab10"].colors[:n], name=f"labels{n}")
    colours = []
    for c in range(n):
        hue = (c * 0.618033988749895) % 1.0
        light, sat = (0.45, 0.75) if c % 2 == 0 else (0.62, 0.6)
        colours.append(colorsys.hls_to_rgb(hue, light, sat))
    return ListedColormap(colours, name=f"labels{n}")


def show_label_map(ax, labels, num_classes: int, title: str | None = None, fontsize: int = 9):
    """Draw a class map: fixed colour per class, ignored pixels (< 0) white, no axes."""
    labels = np.asarray(labels)
    ax.imshow(np.ma.masked_less(labels, 0), cmap=label_colormap(num_classes), vmin=-0.5,
              vmax=num_classes - 0.5, interpolation="nearest")
    if title is not None:
        ax.set_title(title, fontsize=fontsize)
    ax.axis("off")
