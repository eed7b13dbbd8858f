"""Stage `report`: built from a folder of fake metrics files (some missing, one broken), fake dvclive
curves and fake plots; the tables' values, the "not run" rows, and an HTML page whose images exist."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import report
from stages.params import Params, validate_params
from tiny_config import tiny_params, write_params

KNN = {"top1_k20": 81.234, "top5_k20": 97.5, "pixels_top1_k20": 84.6, "random_top1_k20": 40.0, "n_train": 300}
RETRIEVAL = {"roxford5k_M_mAP": 12.3456, "roxford5k_H_mAP": 5.0, "rparis6k_M_mAP": 33.333, "rparis6k_H_mAP": 0.004}
DAVIS = {"J&F-Mean": 55.55, "J-Mean": 50.0, "F-Mean": 61.1}


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)


@pytest.fixture
def built(tmp_path: Path) -> tuple[Params, dict, Path]:
    raw = tiny_params(tmp_path)
    raw["paths"]["report"] = str(tmp_path / "report")
    params = validate_params(raw)
    metrics = Path(params.paths.metrics)
    metrics.mkdir(parents=True)
    (metrics / "knn.json").write_text(json.dumps(KNN))
    (metrics / "retrieval.json").write_text(json.dumps(RETRIEVAL))
    (metrics / "davis.json").write_text(json.dumps(DAVIS))
    (metrics / "linear.json").write_text("{not json")  # broken: shown as unreadable
    # linear is broken; copydetect, fewshot, transfer, attention, tsne, pretrain are missing
    curves = Path(params.paths.dvclive) / "plots/metrics/train"
    curves.mkdir(parents=True)
    (curves / "loss.tsv").write_text("step\tloss\n0\t5.0\n10\t4.0\n20\t3.5\n")
    (curves / "lr.tsv").write_text("timestamp\tstep\tlr\n1\t0\t0.0001\n2\t10\t0.0002\n")
    plots = Path(params.paths.plots)
    _png(plots / "tsne.png", 10)
    _png(plots / "attention/astronaut/attn-head0.png", 20)
    _png(plots / "attention/astronaut/mask-head0.png", 30)
    return params, report.run(params), tmp_path


class _Page(HTMLParser):
    """Collects every <img src>, and the cells of every table row, from an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self.open_tags: list[str] = []

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in ("img", "meta"):
            if tag == "img":
                self.images.append(dict(attrs)["src"])
            return
        self.open_tags.append(tag)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        assert self.open_tags and self.open_tags[-1] == tag, (self.open_tags, tag)
        self.open_tags.pop()
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _md_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[cells[0]] = cells[1:]
    return rows


def test_tables_show_our_values_beside_the_papers(built) -> None:
    params, _, _ = built
    rows = _md_rows((Path(params.paths.report) / "summary.md").read_text())
    assert rows["k-NN top-1 (k = 20)"][:2] == ["81.23", "74.5"]
    assert rows["Baseline: k-NN on raw pixels, top-1 (k = 20)"][:2] == ["84.60", "—"]
    assert rows["Baseline: k-NN on a random-init backbone, top-1 (k = 20)"][:2] == ["40", "—"]
    assert rows["rOxford Medium"][:2] == ["12.35", "41.8"]
    assert rows["rOxford Hard"][:2] == ["5", "13.7"]
    assert rows["rParis Medium"][:2] == ["33.33", "63.1"]
    assert rows["rParis Hard"][:2] == ["0.004", "34.4"]
    assert rows["J&F mean"][:2] == ["55.55", "61.8"]
    assert rows["Copydays strong"][:2] == ["not run", "81.7"]
    assert rows["Linear top-1 (best epoch)"][:2] == ["unreadable", "77.0"]
    assert rows["Linear top-1 (last epoch)"][:2] == ["unreadable", "—"]
    assert rows["Top-1 with 1% of the labels"][0] == "not run"
    assert rows["Top-1 (last epoch)"][0] == "not run"
    assert rows["transfer"] == ["not run"] and rows["knn"] == ["5 metrics"] and rows["linear"] == ["unreadable"]


def test_html_parses_and_its_images_exist(built) -> None:
    params, counts, _ = built
    folder = Path(params.paths.report)
    page = _Page()
    page.feed((folder / "index.html").read_text())
    page.close()
    assert page.open_tags == []
    assert page.images, "no images referenced"
    for src in page.images:
        assert not src.startswith(("/", "http")), src
        assert (folder / src).is_file(), src
    assert set(page.images) == {
        "figures/curves/loss.png", "figures/curves/lr.png", "figures/tsne.png",
        "figures/attention/astronaut/attn-head0.png", "figures/attention/astronaut/mask-head0.png",
    }
    # copies, byte for byte
    assert (folder / "figures/tsne.png").read_bytes() == (Path(params.paths.plots) / "tsne.png").read_bytes()
    assert Image.open(folder / "figures/curves/loss.png").size[0] > 100
    cells = {tuple(r[:3]) for r in page.rows}
    assert ("k-NN top-1 (k = 20)", "81.23", "74.5") in cells
    assert ("Copydays strong", "not run", "81.7") in cells
    assert ("J&F mean", "55.55", "61.8") in cells
    assert ("copydetect.json", "not run") in {tuple(r) for r in page.rows}
    assert ("n_train", "300") in {tuple(r) for r in page.rows}  # every metric of every file
    assert counts == {"stages_reported": 3.0, "stages_not_run": 7.0, "figures": 5.0}


def test_curves_not_logged_are_named(built) -> None:
    params, _, _ = built
    text = (Path(params.paths.report) / "index.html").read_text()
    assert "Not logged: Teacher entropy, KL(teacher || student)." in html_unescape(text)


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)


def test_read_curve_takes_the_value_column() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kl.tsv"
        path.write_text("timestamp\tstep\tkl\n5\t0\t1.5\n6\t10\tnan\n7\t20\tbad\n8\t30\t0.25\n")
        steps, values = report.read_curve(path)
    assert steps == [0.0, 10.0, 30.0]
    assert values[0] == 1.5 and np.isnan(values[1]) and values[2] == 0.25


@pytest.mark.parametrize("value,text", [(None, "—"), (74.5, "74.50"), (3.0, "3"), (0.004, "0.004"),
                                        (float("nan"), "nan"), (12.345, "12.35"), (-0.5, "-0.50")])
def test_format_value(value, text) -> None:
    assert report.format_value(value) == text


def test_nothing_run_is_not_an_error_and_stale_files_go(tmp_path: Path) -> None:
    raw = tiny_params(tmp_path, report={"inputs": ["knn", "davis"]})
    raw["paths"]["report"] = str(tmp_path / "report")
    stale = tmp_path / "report/figures/old.png"
    _png(stale, 1)
    path = write_params(tmp_path / "params.yaml", raw)
    assert report.main(["--params", str(path)]) == 0
    assert not stale.exists()  # the folder is replaced whole
    rows = _md_rows((tmp_path / "report/summary.md").read_text())
    assert rows["k-NN top-1 (k = 20)"][0] == "not run" and rows["J&F mean"][0] == "not run"
    assert "rOxford Medium" not in rows  # retrieval is not among report.inputs
    page = _Page()
    page.feed((tmp_path / "report/index.html").read_text())
    assert page.images == []


def test_non_numeric_values_are_left_out(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"a": 1, "b": "text", "c": True, "d": 2.5}))
    assert report.read_metrics(path) == {"a": 1.0, "d": 2.5}
    path.write_text("[1, 2]")
    assert report.read_metrics(path) == report.UNREADABLE
    assert report.read_metrics(tmp_path / "absent.json") == report.NOT_RUN
