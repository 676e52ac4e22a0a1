import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest

from segbook.book.figures import label_colormap, show_label_map


@pytest.mark.parametrize("n", [2, 10, 21, 27, 150])
def test_every_class_has_its_own_colour(n):
    cmap = label_colormap(n)
    colours = np.array([cmap(c)[:3] for c in range(n)])
    assert cmap.N == n and len(np.unique(colours.round(3), axis=0)) == n
    if n > 10:   # no two neighbouring classes share a hue family (tab20's pairs)
        import colorsys
        hues = np.array([colorsys.rgb_to_hls(*c)[0] for c in colours])
        gap = np.abs((hues[1:] - hues[:-1] + 0.5) % 1.0 - 0.5)
        assert gap.min() > 0.1


def test_a_class_keeps_its_colour_whatever_the_image_holds():
    fig, axes = plt.subplots(1, 2)
    show_label_map(axes[0], np.array([[3, 3], [4, -1]]), 27)
    show_label_map(axes[1], np.array([[3, 0], [26, 26]]), 27)
    a, b = (ax.get_images()[0] for ax in axes)
    assert a.norm.vmin == b.norm.vmin == -0.5 and a.norm.vmax == b.norm.vmax == 26.5
    assert np.allclose(a.to_rgba(np.array([3]))[0], b.to_rgba(np.array([3]))[0])
    plt.close(fig)
