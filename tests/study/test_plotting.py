"""The report plotting style (tensorcurv.plotting) and every report figure drawn with it, on tiny tables:
each figure writes a PNG, has a legend, keeps every data point inside its axes limits, and tells its
series apart."""

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tensorcurv import plotting
from tensorcurv.study import figures as study_fig
from tensorcurv.study.tables import MODEL
from tensorcurv.unlearn import report as unlearn_report

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- helpers
def data_points(ax):
    """(x, y) of every point drawn in data coordinates: lines (errorbar caps included) and scatter offsets.
    Reference lines drawn with axhline/axvline live in axes coordinates on one side and are left out."""
    pts = []
    for line in ax.lines:
        if line.get_transform() == ax.transData:
            pts += [(float(x), float(y)) for x, y in line.get_xydata()]
    for coll in ax.collections:
        if coll.get_offset_transform() == ax.transData:
            pts += [(float(x), float(y)) for x, y in coll.get_offsets()]
    return [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]


def points_outside_limits(fig):
    assert any(data_points(ax) for ax in fig.axes), "the figure draws no data points"
    out = []
    for ax in fig.axes:
        (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        out += [(ax.get_title(), x, y) for x, y in data_points(ax) if not (x0 <= x <= x1 and y0 <= y <= y1)]
    return out


def legend_labels(fig):
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return [t.get_text() for lg in legends for t in lg.get_texts()]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- tiny tables
#: 14 variants of 8 structures, as in the committed studies.
VARIANTS = [
    ("dense", "dense", ""),
    ("diagonal", "diagonal", ""),
    ("ekfac", "ekfac", ""),
    ("kfac", "kfac", ""),
    *[(f"kron_sum(rank={r})", "kron_sum", str(r)) for r in (1, 2, 3, 4)],
    *[(f"tt(ranks={r})", "tt", str(r)) for r in (1, 2)],
    *[(f"tucker(ranks={r})", "tucker", str(r)) for r in (2, 4, 8)],
    ("two_level", "two_level", ""),
]
KINDS = ("empirical", "ggn")
LAYERS = ("1", "3")
STEPS = (0, 10)


def _error(i, kind, step):
    return 1.35 if i == 5 and kind == "ggn" else 0.05 + 0.06 * i + 0.01 * step / 10  # one value above 1.2


@pytest.fixture(scope="module")
def study_tables():
    metrics, floor, spectra = [], [], []
    for step in STEPS:
        for kind in KINDS:
            for layer in (*LAYERS, MODEL):
                for i, (variant, structure, rank) in enumerate(VARIANTS):
                    metrics.append(
                        {
                            "step": step,
                            "kind": kind,
                            "layer": layer,
                            "structure": structure,
                            "variant": variant,
                            "rank": rank,
                            "m": 4,
                            "n": 5,
                            "T": 1,
                            "nbytes": 10.0 ** (2 + 0.3 * i),
                            "fro_rel": _error(i, kind, step),
                            "cos@0.01": 0.1 + 0.05 * i,
                            "cos@1": 0.3 + 0.04 * i,
                            "skipped": "",
                        }
                    )
            for layer in LAYERS:
                floor += [{"step": step, "kind": kind, "layer": layer, "rank": r, "floor": 0.5 / r} for r in (1, 2, 4)]
    for kind in KINDS:
        for label in ("exact", *(v for v, _, _ in VARIANTS)):
            spectra += [
                {
                    "step": 10,
                    "kind": kind,
                    "layer": "1",
                    "structure": label,
                    "index": k,
                    "eigenvalue": 10.0 ** (-k / 3) * (1 + 0.01 * len(label)),
                }
                for k in range(12)
            ]
    return {"metrics": metrics, "floor": floor, "spectra": spectra, "directions": _directions(), "training": []}


def _directions():
    """Whole-model direction rows: every variant at k = 0, 5, 20, two dampings, both steps, plus the
    exact references."""
    rows = []
    for step in STEPS:
        for kind in KINDS:
            for rho in (1e-3, 1e-1):
                for i, (variant, structure, _) in enumerate(VARIANTS):
                    for k in (0, 5, 20):
                        rows.append(
                            {
                                "step": step,
                                "kind": kind,
                                "scope": "model",
                                "layer": MODEL,
                                "structure": structure,
                                "variant": variant,
                                "damping_rel": rho,
                                "refine_steps": k,
                                "nbytes": 10.0 ** (2 + 0.3 * i),
                                "cos": min(0.1 + 0.04 * i + 0.02 * k, 1.0),
                                "step_time": 1e-4 * (1 + i) * (1 + k),
                            }
                        )
                for variant, t in (("exact (full solve)", 2e-3), ("exact (block-diagonal solve)", 1e-3)):
                    rows.append(
                        {
                            "step": step,
                            "kind": kind,
                            "scope": "model",
                            "layer": MODEL,
                            "structure": "exact",
                            "variant": variant,
                            "damping_rel": rho,
                            "refine_steps": 0,
                            "nbytes": None,
                            "cos": 1.0 if "full" in variant else 0.5,
                            "step_time": t,
                        }
                    )
    return rows


STUDY_FIGURES = {
    "error_vs_rank": lambda t, p: study_fig.fig_error_vs_rank(t["metrics"], t["floor"], p),
    "error_vs_memory": lambda t, p: study_fig.fig_error_vs_memory(t["metrics"], p),
    "error_over_training": lambda t, p: study_fig.fig_error_over_training(t["metrics"], p),
    "spectrum": lambda t, p: study_fig.fig_spectrum(t["spectra"], p),
    "inverse_vs_damping": lambda t, p: study_fig.fig_inverse_vs_damping(t["metrics"], p, "1"),
    "cosine_vs_memory": lambda t, p: study_fig.fig_cosine_vs_memory(t["directions"], p),
    "direction_pareto": lambda t, p: study_fig.fig_direction_pareto(t["directions"], p),
}


@pytest.fixture(scope="module")
def study_figures(study_tables, tmp_path_factory):
    out = tmp_path_factory.mktemp("study_figures")
    return {
        name: (draw(study_tables, out / f"{name}.png"), out / f"{name}.png") for name, draw in STUDY_FIGURES.items()
    }


def _unlearn_rows():
    rows = []
    for seed in range(2):
        for j, method in enumerate(
            ("original", "retrain", "first_order", "exact", "lissa", "kfac", "kfac+refine", "kfac (cached)", "dense")
        ):
            rel = {"original": 1.0, "retrain": 0.0}.get(method, 0.2 + 0.15 * j + 0.01 * seed)
            rows.append(
                {
                    "scenario": "label_flip",
                    "seed": seed,
                    "method": method,
                    "status": "ok",
                    "time": 1e-3 * (1 + j) ** 2 * (1 + 0.1 * seed),
                    "rel_dist": rel,
                }
            )
    return rows


@pytest.fixture(scope="module")
def unlearn_figure(tmp_path_factory):
    path = tmp_path_factory.mktemp("unlearn") / "fidelity.png"
    entries = unlearn_report.summarize(_unlearn_rows())["label_flip"]
    return unlearn_report.plot_fidelity_vs_time(entries, path, "label_flip"), path, entries


FIDELITY_SUMMARY = [
    ("exact", 650, 0.289, 0.048, 0.0),
    ("lissa", 300, 0.303, 0.05, math.nan),
    *[
        ("kron_sum psd=none", r, m, sd, 0.5)
        for r, m, sd in ((1, 0.56, 0.03), (4, 1.43, 0.65), (8, 1.06, 0.94), (16, 0.34, 0.04))
    ],
    *[("kron_sum psd=shrink", r, m, 0.04, 0.3) for r, m in ((1, 0.56), (4, 0.45), (16, 0.35))],
    *[("kfac deflated", k, m, 0.04, 0.3) for k, m in ((0, 0.54), (40, 0.51), (320, 0.3))],
]


@pytest.fixture(scope="module")
def structure_fidelity_figure(tmp_path_factory):
    path = tmp_path_factory.mktemp("structure_fidelity") / "fidelity.png"
    return load_script("unlearn_fidelity").plot(FIDELITY_SUMMARY, path, "tiny"), path


def _evals(scale):
    return [
        {
            "epoch": str(e),
            "wall_time": str(0.1 * e),
            "train_loss": str(scale / (1 + e)),
            "test_loss": str(scale / (1 + e) + 1e-4),
        }
        for e in range(4)
    ]


@pytest.fixture(scope="module")
def demo_figure(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "loss_curves.png"
    curves = {
        (race, label): _evals(scale)
        for race, scale in (("classifier: tiny", 2.0), ("autoencoder: tiny", 0.3))
        for label in ("NaturalGradient + K-FAC", "Adam")
    }
    return load_script("demo").loss_curves_figure(curves, path), path


# ----------------------------------------------------------------------------- the style module
def test_importing_the_plotting_module_does_not_import_matplotlib():
    code = "import sys, tensorcurv.plotting; print('matplotlib' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )
    assert out.stdout.strip() == "False"


def test_importing_the_report_modules_does_not_import_matplotlib():
    code = (
        "import sys, tensorcurv.study.report, tensorcurv.study.figures, tensorcurv.unlearn.report; "
        "print('matplotlib' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )
    assert out.stdout.strip() == "False"


def test_the_style_context_leaves_global_rcparams_unchanged():
    import matplotlib as mpl

    before = dict(mpl.rcParams)
    with plotting.style():
        assert mpl.rcParams["legend.frameon"] is False
    assert dict(mpl.rcParams) == before


def test_palette_colours_are_distinct_and_none_is_the_reference_colour():
    import matplotlib.colors as mc

    rgb = [mc.to_hex(c) for c in plotting.PALETTE]
    assert len(set(rgb)) == len(rgb) and mc.to_hex(plotting.REFERENCE) not in rgb


def test_fourteen_ungrouped_series_get_distinct_colour_marker_pairs():
    styles = plotting.series_styles(f"s{i}" for i in range(14))
    assert len({(s["color"], s["marker"]) for s in styles.values()}) == 14


def test_sixty_three_ungrouped_series_get_distinct_colour_marker_pairs():
    styles = plotting.series_styles(range(63))
    assert len({(s["color"], s["marker"]) for s in styles.values()}) == 63


def test_grouped_series_share_their_group_colour():
    groups = {v: s for v, s, _ in VARIANTS}
    styles = plotting.series_styles(groups, groups)
    assert {styles[f"kron_sum(rank={r})"]["color"] for r in (1, 2, 3, 4)} == {styles["kron_sum(rank=1)"]["color"]}


def test_grouped_series_past_the_palette_still_get_distinct_colour_marker_pairs():
    groups = {f"g{g}/{k}": f"g{g}" for g in range(12) for k in range(3)}
    styles = plotting.series_styles(groups, groups)
    assert len({(s["color"], s["marker"]) for s in styles.values()}) == len(groups)


def test_log_limits_contain_every_positive_value():
    _, axes = plotting.subplots()
    values = [3e-5, 0.2, 1.43, 2.37, 0.0, -1.0, math.nan]
    lo, hi = plotting.log_limits(axes[0][0], values)
    assert lo < 3e-5 and hi > 2.37 and axes[0][0].get_yscale() == "log"


def test_log_limits_refuse_values_with_nothing_positive():
    _, axes = plotting.subplots()
    with pytest.raises(ValueError, match="positive"):
        plotting.log_limits(axes[0][0], [0.0, -1.0])


def test_outside_legend_does_not_overlap_the_axes(tmp_path):
    with plotting.style():
        fig, axes = plotting.subplots(1, 2)
        for ax in axes[0]:
            ax.plot([0, 1], [0, 1], label="a long series label")
        legend = plotting.legend_outside(fig, axes)
        plotting.save(fig, tmp_path / "f.png")
    fig.draw_without_rendering()
    box = legend.get_window_extent()
    assert not any(box.overlaps(ax.get_window_extent()) for ax in axes[0])


# ----------------------------------------------------------------------------- study figures
@pytest.mark.parametrize("name", STUDY_FIGURES)
def test_study_figure_is_written_as_png(study_figures, name):
    assert study_figures[name][1].read_bytes()[:8] == PNG


@pytest.mark.parametrize("name", STUDY_FIGURES)
def test_study_figure_has_a_legend(study_figures, name):
    assert legend_labels(study_figures[name][0])


@pytest.mark.parametrize("name", STUDY_FIGURES)
def test_study_figure_axes_contain_every_data_point(study_figures, name):
    assert points_outside_limits(study_figures[name][0]) == []


def test_error_over_training_tells_fourteen_variants_apart(study_figures):
    ax = study_figures["error_over_training"][0].axes[0]
    looks = {(line.get_color(), line.get_marker(), line.get_linestyle()) for line in ax.lines}
    assert len(ax.lines) == len(VARIANTS) == len(looks)


@pytest.mark.parametrize("name", ["error_vs_memory", "cosine_vs_memory"])
def test_small_multiples_have_one_panel_per_checkpoint_and_kind(study_figures, name):
    titles = [ax.get_title() for ax in study_figures[name][0].axes]
    assert titles == [f"{kind}, step {step}" for kind in KINDS for step in STEPS]


def test_error_vs_memory_names_variants_in_the_legend_not_as_text_on_the_axes(study_figures):
    fig = study_figures["error_vs_memory"][0]
    assert {v for v, _, _ in VARIANTS} <= set(legend_labels(fig)) and not any(ax.texts for ax in fig.axes)


# ----------------------------------------------------------------------------- unlearning figures
def test_unlearning_figure_is_written_as_png(unlearn_figure):
    assert unlearn_figure[1].read_bytes()[:8] == PNG


def test_unlearning_figure_names_every_method_in_the_legend(unlearn_figure):
    fig, _, entries = unlearn_figure
    labels = legend_labels(fig)
    assert all(any(lab.startswith(e["method"]) for lab in labels) for e in entries if e["method"] != "original")


def test_unlearning_figure_draws_no_text_labels_on_the_axes(unlearn_figure):
    assert not unlearn_figure[0].axes[0].texts


def test_unlearning_figure_axes_contain_every_data_point(unlearn_figure):
    assert points_outside_limits(unlearn_figure[0]) == []


def test_unlearning_figure_draws_retraining_as_a_vertical_line_at_its_time(unlearn_figure):
    fig, _, entries = unlearn_figure
    t = next(e["time"][0] for e in entries if e["method"] == "retrain")
    ax = fig.axes[0]
    vertical = [line for line in ax.lines if line.get_transform() == ax.get_xaxis_transform()]
    assert [line.get_xdata()[0] for line in vertical] == [pytest.approx(t)]


def test_unlearning_figure_puts_no_point_at_an_artificial_floor(unlearn_figure):
    ys = [y for _, y in data_points(unlearn_figure[0].axes[0])]
    assert min(ys) > 0.1


def test_unlearning_results_csv_reads_back_into_the_same_figures(tmp_path):
    rows = _unlearn_rows()
    unlearn_report.write_csv(rows, tmp_path / "results.csv")
    back = unlearn_report.read_csv(tmp_path / "results.csv")
    assert back[3]["rel_dist"] == pytest.approx(rows[3]["rel_dist"]) and back[3]["method"] == rows[3]["method"]
    assert [p.name for p in unlearn_report.write_figures(back, tmp_path)] == ["fidelity_vs_time_label_flip.png"]


# ----------------------------------------------------------------------------- structure fidelity (script)
def test_structure_fidelity_figure_is_written_as_png(structure_fidelity_figure):
    assert structure_fidelity_figure[1].read_bytes()[:8] == PNG


def test_structure_fidelity_figure_has_a_legend(structure_fidelity_figure):
    assert "kfac deflated" in legend_labels(structure_fidelity_figure[0])


def test_structure_fidelity_axes_contain_every_mean_and_error_bar(structure_fidelity_figure):
    assert points_outside_limits(structure_fidelity_figure[0]) == []


def test_structure_fidelity_table_reads_back_from_its_markdown(tmp_path):
    fid = load_script("unlearn_fidelity")
    md = tmp_path / "fidelity.md"
    md.write_text("# t\n\nintro\n\n" + fid.table([(f, s, m, sd, e) for f, s, m, sd, e in FIDELITY_SUMMARY]) + "\n")
    back = fid.read_table(md)
    assert [(f, s) for f, s, *_ in back] == [(f, s) for f, s, *_ in FIDELITY_SUMMARY]


# ----------------------------------------------------------------------------- demo and training runs
def test_demo_figure_is_written_as_png(demo_figure):
    assert demo_figure[1].read_bytes()[:8] == PNG


def test_demo_figure_has_a_legend_with_both_optimizers(demo_figure):
    assert set(legend_labels(demo_figure[0])) == {"NaturalGradient + K-FAC", "Adam"}


def test_demo_figure_draws_train_and_test_losses_on_separate_axes(demo_figure):
    titles = [ax.get_title() for ax in demo_figure[0].axes]
    assert sum("train loss" in t for t in titles) == sum("test loss" in t for t in titles) == 4


def test_demo_figure_axes_contain_every_data_point(demo_figure):
    assert points_outside_limits(demo_figure[0]) == []


def test_training_run_figure_draws_test_loss_in_another_line_style_than_train_loss():
    from tensorcurv.experiments.run_records import loss_figure

    rows = [{"step": s, "loss": 1.0 / (1 + s), "step_time": 0.01} for s in range(5)]
    rows += [{"step": s, "train_loss": 1.0 / (1 + s), "test_loss": 1.0 / (1 + s)} for s in (0, 4)]
    ax = loss_figure(rows).axes[0]
    style = {line.get_label(): line.get_linestyle() for line in ax.lines}
    assert style["train loss"] != style["test loss"]
