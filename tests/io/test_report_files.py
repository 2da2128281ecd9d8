"""Plots, tune reports and tuned recipes replace only a file mmer wrote, never a user's file or a link's target."""

from __future__ import annotations

import pytest

from mmer.errors import OutputExistsError
from mmer.io.report_files import PNG_SOFTWARE, check_png, save_figure, text_written_by, write_report_file

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SIGNED = text_written_by("# written by mmer")


def figure():
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    return fig


def test_a_plot_is_signed_so_the_next_run_may_replace_it(tmp_path):
    png = tmp_path / "chart.png"
    save_figure(figure(), png, dpi=30)
    assert b"Software\x00" + PNG_SOFTWARE.encode() in png.read_bytes()[:4096]
    save_figure(figure(), png, dpi=40)  # replaced: mmer wrote it
    assert png.read_bytes().startswith(b"\x89PNG")


def test_a_png_mmer_did_not_write_is_never_replaced(tmp_path):
    png = tmp_path / "holiday.png"
    fig = figure()
    fig.savefig(png, dpi=30)  # matplotlib's own signature, not mmer's
    before = png.read_bytes()
    with pytest.raises(OutputExistsError, match="did not write"):
        save_figure(figure(), png, dpi=30)
    with pytest.raises(OutputExistsError):
        check_png(png)
    assert png.read_bytes() == before


def test_a_link_at_the_path_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep")
    link = tmp_path / "chart.png"
    link.symlink_to(target)
    with pytest.raises(OutputExistsError, match="link"):
        save_figure(figure(), link, dpi=30)
    assert target.read_text() == "keep" and link.is_symlink()


def test_a_missing_directory_is_named_not_created(tmp_path):
    with pytest.raises(OutputExistsError, match="mkdir -p"):
        check_png(tmp_path / "no" / "such" / "chart.png")
    assert not (tmp_path / "no").exists()


def test_text_reports_are_replaced_only_when_they_carry_mmer_s_first_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    write_report_file(path, b"# written by mmer\nk: 0.8\n", SIGNED, "recipe")
    write_report_file(path, b"# written by mmer\nk: 0.6\n", SIGNED, "recipe")
    assert path.read_text().endswith("k: 0.6\n")
    path.write_text("# my hand-tuned recipe\nk: 0.7\n")
    with pytest.raises(OutputExistsError, match="did not write"):
        write_report_file(path, b"# written by mmer\n", SIGNED, "recipe")
    assert path.read_text() == "# my hand-tuned recipe\nk: 0.7\n"


def test_a_written_file_gets_the_mode_of_a_new_file_and_no_temporary_is_left(tmp_path):
    path = write_report_file(tmp_path / "r.txt", b"# written by mmer\n", SIGNED, "report")
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.txt"]


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
