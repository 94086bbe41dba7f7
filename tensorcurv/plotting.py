"""One plotting style for every report figure (study, unlearning, demo, training runs).

matplotlib is imported inside the functions only, so ``import tensorcurv`` works without it. Nothing
here changes matplotlib's global state: figures are drawn inside :func:`style` (a ``rc_context``).

* colours: Paul Tol's *muted* qualitative palette (9 colours, distinguishable under the common forms of
  colour blindness); black is kept for references (exact, floor, Pareto front, retraining);
* series: :func:`series_styles` gives every label a (colour, marker, line style) triple, the (colour,
  marker) pairs distinct for up to 63 labels; with groups (e.g. the structure of each variant) the
  colour names the group and the marker and line style the member inside it (``kron_sum(rank=1..4)``:
  one colour, four markers, four line styles);
* legends sit outside the axes (:func:`legend_outside`), never as text next to the points;
* log axes: :func:`log_limits` sets limits that contain every positive value given (with a small margin),
  instead of fixed limits that clip.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

Label = TypeVar("Label", bound=Hashable)

#: Paul Tol's muted palette (https://personal.sron.nl/~pault/), colour-blind safe, reordered so that
#: neighbours in the cycle differ most (indigo, rose, teal, sand, wine, cyan, olive, purple, green).
PALETTE = ("#332288", "#CC6677", "#44AA99", "#DDCC77", "#882255", "#88CCEE", "#999933", "#AA4499", "#117733")
#: Colour of reference curves and lines (exact value, floor, front, retraining).
REFERENCE = "black"
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", "-.", ":")
DPI = 120

RC: dict[str, Any] = {
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "font.size": 9.5,
    "axes.titlesize": 10,
    "axes.labelsize": 9.5,
    "legend.fontsize": 8.5,
    "legend.frameon": False,
    "xtick.labelsize": 8.5,
    "ytick.labelsize": 8.5,
    "axes.grid": True,
    "axes.grid.which": "both",
    "grid.alpha": 0.25,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.5,
    "lines.markersize": 5,
    "errorbar.capsize": 2.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


@contextmanager
def style():
    """Context in which report figures are drawn and saved: the rcParams of :data:`RC` and the palette as
    the colour cycle. Restores the previous rcParams on exit."""
    import matplotlib as mpl

    with mpl.rc_context({**RC, "axes.prop_cycle": mpl.cycler(color=list(PALETTE))}):
        yield


def subplots(nrows: int = 1, ncols: int = 1, **kwargs):
    """``Figure`` and a 2-D array of axes (``squeeze=False``), with a constrained layout so that titles,
    labels and outside legends are never cut off. Drawn off-screen (no pyplot figure manager)."""
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained", figsize=kwargs.pop("figsize", None))
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def save(fig, path: str | Path) -> Path:
    """Write ``fig`` as PNG at :data:`DPI`; the bounding box grows to include outside legends."""
    path = Path(path)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.08)
    return path


def series_styles(
    labels: Iterable[Label], groups: Mapping[Label, Hashable] | None = None
) -> dict[Label, dict[str, Any]]:
    """``{label: {"color", "marker", "linestyle"}}`` with a distinct (colour, marker) pair for each of the
    first 63 labels (first-seen order).

    Without ``groups``: label i gets colour ``i mod 9`` and marker ``i mod 7`` (coprime cycles), solid
    lines. With ``groups`` (label → group; a label missing from it is its own group): the g-th group gets
    colour ``g mod 9``; its k-th member gets line style ``k mod 4`` and the k-th marker not yet used with
    that colour (groups past the ninth share a colour with an earlier group but not a marker)."""
    labels = list(dict.fromkeys(labels))
    if groups is None:
        return {
            lab: {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)], "linestyle": "-"}
            for i, lab in enumerate(labels)
        }
    group_index: dict[Hashable, int] = {}
    members: dict[Hashable, int] = {}
    used: set[tuple[str, str]] = set()
    out = {}
    for lab in labels:
        g = groups.get(lab, lab)
        color = PALETTE[group_index.setdefault(g, len(group_index)) % len(PALETTE)]
        k = members.get(g, 0)
        members[g] = k + 1
        free = [m for m in MARKERS if (color, m) not in used] or list(MARKERS)
        marker = free[0]
        used.add((color, marker))
        out[lab] = {"color": color, "marker": marker, "linestyle": LINESTYLES[k % len(LINESTYLES)]}
    return out


def legend_outside(
    fig, axes: Sequence | Any, *, where: str = "right", ncols: int | None = None, title: str | None = None
):
    """One figure legend with the unique labels of all ``axes`` (first-seen order), placed outside them:
    ``where="right"`` (a column to the right) or ``"bottom"`` (rows under the panels). Needs the constrained
    layout of :func:`subplots`, which makes room for it. Returns it."""
    flat = list(getattr(axes, "flat", axes))
    handles: dict[str, Any] = {}
    for ax in flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if not lab.startswith("_"):
                handles.setdefault(lab, h)
    if where == "bottom":
        ncols = ncols or min(len(handles), 5) or 1
        return fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=ncols, title=title)
    return fig.legend(handles.values(), handles.keys(), loc="outside right upper", ncols=ncols or 1, title=title)


def log_limits(ax, values: Iterable[float], axis: str = "y") -> tuple[float, float]:
    """Put ``axis`` on a log scale with limits containing every finite positive value of ``values``, widened
    on each side by 0.02 decade plus 5 % of the decades spanned (markers at the extremes stay whole).
    Within one decade the tick labels are plain numbers (0.95, 1, 1.05) rather than 9.5×10⁻¹.
    Returns the limits."""
    from matplotlib.ticker import FuncFormatter

    pos = [float(v) for v in values if v is not None and math.isfinite(float(v)) and float(v) > 0]
    if not pos:
        raise ValueError("log_limits needs at least one finite positive value")
    lo, hi = min(pos), max(pos)
    f = 10 ** (0.02 + 0.05 * math.log10(hi / lo))
    lim = (lo / f, hi * f)
    axis_obj = ax.yaxis if axis == "y" else ax.xaxis
    if axis == "y":
        ax.set_yscale("log")
        ax.set_ylim(*lim)
    else:
        ax.set_xscale("log")
        ax.set_xlim(*lim)
    if lim[1] / lim[0] < 10:
        plain = FuncFormatter(lambda v, _: f"{v:.4g}")
        axis_obj.set_major_formatter(plain)
        axis_obj.set_minor_formatter(plain)
    return lim
