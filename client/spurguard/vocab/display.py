"""How Visualize draws heatmaps, shared by the server that draws them and every viewer that
shows their colour scale (the HTML report, `spurguard ui`), so a legend cannot drift from the
pictures: heat in [0, 1] is coloured by `HEATMAP_COLORMAP` (an approximation of matplotlib's
"inferno", dark purple -> red -> yellow) and blended over the model input with weight
`HEATMAP_OPACITY * heat`, so cold areas show the image; 1 is the image's
`HEATMAP_DISPLAY_PERCENTILE`-th percentile of positive heat (higher heat is clipped to it).
"""
from __future__ import annotations

# (heat, (r, g, b) in [0, 1]) stops, linearly interpolated between them
HEATMAP_COLORMAP: tuple[tuple[float, tuple[float, float, float]], ...] = (
    (0.00, (0.00, 0.00, 0.02)),
    (0.25, (0.34, 0.06, 0.43)),
    (0.50, (0.73, 0.21, 0.33)),
    (0.75, (0.98, 0.55, 0.04)),
    (1.00, (0.99, 1.00, 0.64)),
)
HEATMAP_OPACITY = 0.6
# Input-gradient maps are spiky: scaled by their single hottest pixel they would leave
# everything else invisible. Smooth maps (Grad-CAM) barely change.
HEATMAP_DISPLAY_PERCENTILE = 95.0


def heatmap_css_gradient(direction: str = "to right") -> str:
    """HEATMAP_COLORMAP as a CSS linear-gradient, low heat first: a viewer's colour scale."""
    stops = ", ".join(
        f"rgb({', '.join(str(round(255 * c)) for c in rgb)}) {100 * stop:g}%" for stop, rgb in HEATMAP_COLORMAP
    )
    return f"linear-gradient({direction}, {stops})"
