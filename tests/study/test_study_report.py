"""A tiny study run end to end: run_study + write_report produce the report files with the expected columns."""

import csv

import pytest
import torch

from tensorcurv.study.report import write_report
from tensorcurv.study.runner import checkpoint_steps, run_study
from tensorcurv.study.variants import make_variants

TINY = {
    "seed": 0,
    "dtype": "float64",
    "data": {"name": "digits", "limit": 200},
    "model": {"name": "mlp", "hidden_sizes": [6]},
    "train": {"steps": 4, "batch_size": 16, "lr": 1e-2},
    "study": {
        "kinds": ["empirical", "ggn"],
        "batch_size": 12,
        "checkpoints": [0, 1.0],
        "structures": ["kfac", "diagonal", "dense"],
        "damping_rel": [1e-2, 1.0],
        "floor_ranks": [1, 2],
        "spectral_max_iter": 30,
        "spectrum_k": 10,
    },
}


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("study")
    result = run_study(TINY, log=lambda msg: None)
    path = write_report(result, out, command="python scripts/study.py (tiny test)")
    return out, path, result


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_report_files_are_written(tiny_report):
    out, path, _ = tiny_report
    for name in (
        "report.md",
        "metrics.csv",
        "floor.csv",
        "spectra.csv",
        "training.csv",
        "error_vs_rank.png",
        "error_vs_memory.png",
        "error_over_training.png",
        "spectrum.png",
        "inverse_vs_damping.png",
    ):
        assert (out / name).stat().st_size > 0, name


def test_report_starts_with_the_command_and_embeds_every_figure(tiny_report):
    out, path, _ = tiny_report
    text = path.read_text()
    assert "python scripts/study.py (tiny test)" in text.split("##")[0]
    for fig in ("error_vs_rank", "error_vs_memory", "error_over_training", "spectrum", "inverse_vs_damping"):
        assert f"]({fig}.png)" in text


def test_metrics_csv_has_the_expected_columns_and_rows(tiny_report):
    out, _, _ = tiny_report
    rows = _read(out / "metrics.csv")
    for col in (
        "step",
        "kind",
        "layer",
        "structure",
        "variant",
        "nbytes",
        "fit_time",
        "solve_time",
        "fro_rel",
        "spec_rel",
        "cos@0.01",
        "relerr@0.01",
        "cos@1",
        "relerr@1",
        "fro_rel_full",
    ):
        assert col in rows[0], col
    # 2 checkpoints x 2 kinds x 3 structures x (2 layers + model row)
    assert len(rows) == 2 * 2 * 3 * 3
    assert {r["step"] for r in rows} == {"0", "4"}


def test_dense_structure_is_exact_in_the_study(tiny_report):
    out, _, _ = tiny_report
    for r in _read(out / "metrics.csv"):
        if r["structure"] == "dense" and r["layer"] != "(model)":
            assert float(r["fro_rel"]) < 1e-6 and float(r["cos@0.01"]) > 1 - 1e-9


def test_floor_csv_has_one_row_per_layer_rank_kind_step(tiny_report):
    out, _, _ = tiny_report
    rows = _read(out / "floor.csv")
    assert set(rows[0]) >= {"step", "kind", "layer", "rank", "floor"}
    assert len(rows) == 2 * 2 * 2 * 2


def test_checkpoint_fractions_map_to_start_early_middle_end():
    assert checkpoint_steps(200, [0, 0.1, 0.5, 1.0]) == [0, 20, 100, 200]


def test_sweeps_expand_to_a_cartesian_product_and_validate_keys():
    vs = make_variants(["kfac"], sweeps={"kfac": {"weight_sharing": ["expand", "reduce"]}})
    assert [v.label for v in vs] == ["kfac(weight_sharing=expand)", "kfac(weight_sharing=reduce)"]
    with pytest.raises(ValueError, match="does not take"):
        make_variants(["kfac"], sweeps={"kfac": {"rnk": [1]}})


def test_report_can_be_re_rendered_from_its_csvs(tiny_report, tmp_path):
    from tensorcurv.study.report import read_result

    out, _, result = tiny_report
    back = read_result(out)
    assert len(back["metrics"]) == len(result["metrics"])
    assert all(isinstance(r["layer"], str) and isinstance(r["step"], int) for r in back["metrics"])
    assert back["metrics"][0]["fro_rel"] == pytest.approx(result["metrics"][0]["fro_rel"], rel=1e-5)
    path = write_report(back, tmp_path, command="again")
    assert (tmp_path / "error_vs_memory.png").stat().st_size > 0 and "again" in path.read_text()
