"""Stage `report`: every evaluation's metrics and figures in one page, next to the paper's numbers.

``python -m stages.report [--params params.yaml]`` reads ``<paths.metrics>/<stage>.json`` for each
stage of ``report.inputs`` (a listed file that does not exist is shown as "not run", an unreadable
one as "unreadable"; neither is an error), the pretraining curves logged by dvclive
(``<paths.dvclive>/plots/metrics/train/<name>.tsv``), and the figures the stages left under
``paths.plots`` (attention maps, t-SNE, anything else in PNG). It writes the folder
``paths.report`` atomically:

- ``index.html``: one table per table of the paper (Caron et al. 2021) with the paper's published
  number as a reference column (ViT-S/16 on ImageNet unless noted), the training curves, the
  attention maps, the t-SNE, and every metric of every file; images are files next to it
  (``figures/``), referenced by relative paths, so the folder is self-contained;
- ``summary.md``: the same tables in Markdown, with links to the figures;
- ``figures/``: the curves rendered with matplotlib (loss, learning rate, teacher entropy, KL) and
  copies of the PNGs found under ``paths.plots`` (same relative paths).

The paper's numbers are a reference, not a target: a run on a small dataset and a small model is not
expected to reach them. Metrics keys are read as the stages write them (stable, flat).
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from stages.atomic import atomic_dir, atomic_file, write_text
from stages.cli import run_stage
from stages.params import Params

logger = logging.getLogger(__name__)

NOT_RUN = "not run"
UNREADABLE = "unreadable"
MISSING_KEY = "n/a"
FIGURES = "figures"
LEGEND = (f"{NOT_RUN}: the stage's metrics file does not exist; {UNREADABLE}: it is not a JSON object; "
          f"{MISSING_KEY}: the stage ran without this metric (e.g. other k values); —: no published number.")


@dataclass(frozen=True)
class Row:
    """One line of a paper table: our metric `key` of `stage`'s metrics file, and the paper's value."""

    label: str
    stage: str
    key: str
    paper: float | None = None
    setting: str = ""


@dataclass(frozen=True)
class PaperTable:
    title: str
    rows: tuple[Row, ...]
    note: str = ""


VIT_S = "ViT-S/16, ImageNet"
#: The paper's tables, with its published numbers where the issue fixed them (None: no reference).
PAPER_TABLES: tuple[PaperTable, ...] = (
    PaperTable("Table 2: linear and k-NN classification", (
        Row("k-NN top-1 (k = 20)", "knn", "top1_k20", 74.5, VIT_S),
        Row("k-NN top-5 (k = 20)", "knn", "top5_k20"),
        # eval_linear.py reports its best evaluation's top-1, the paper's number
        Row("Linear top-1 (best epoch)", "linear", "top1_best", 77.0, VIT_S),
        Row("Linear top-1 (last epoch)", "linear", "top1"),
        Row("Linear top-5", "linear", "top5"),
        Row("Baseline: k-NN on raw pixels, top-1 (k = 20)", "knn", "pixels_top1_k20"),
        Row("Baseline: k-NN on a random-init backbone, top-1 (k = 20)", "knn", "random_top1_k20"),
    ), "k-NN: weighted 20-NN, T = 0.07, on frozen CLS features; linear: on the frozen backbone."),
    PaperTable("Low-shot: logistic regression on frozen features", (
        Row("Top-1 with 1% of the labels", "fewshot", "top1_1pct"),
        Row("Top-1 with 10% of the labels", "fewshot", "top1_10pct"),
    )),
    PaperTable("Table 3: image retrieval (mAP)", (
        Row("rOxford Medium", "retrieval", "roxford5k_M_mAP", 41.8, "ViT-S/16, ImageNet pretraining"),
        Row("rOxford Hard", "retrieval", "roxford5k_H_mAP", 13.7, "ViT-S/16, ImageNet pretraining"),
        Row("rParis Medium", "retrieval", "rparis6k_M_mAP", 63.1, "ViT-S/16, ImageNet pretraining"),
        Row("rParis Hard", "retrieval", "rparis6k_H_mAP", 34.4, "ViT-S/16, ImageNet pretraining"),
    )),
    PaperTable("Table 4: copy detection on Copydays (mAP)", (
        Row("Copydays strong", "copydetect", "strong_mAP", 81.7, "ViT-B/16, 224 px (paper's best: ViT-B/8, 320 px)"),
    )),
    PaperTable("Table 5: DAVIS-2017 video object segmentation", (
        Row("J&F mean", "davis", "J&F-Mean", 61.8, "ViT-S/16"),
        Row("J mean", "davis", "J-Mean"),
        Row("F mean", "davis", "F-Mean"),
    )),
    PaperTable("Table 6: transfer learning by fine-tuning", (
        Row("Top-1 (last epoch)", "transfer", "top1"),
        Row("Top-1 (best epoch)", "transfer", "top1_best"),
        Row("Top-5 (last epoch)", "transfer", "top5"),
    ), "The paper's numbers depend on the target dataset (CIFAR, Flowers, Cars, iNaturalist)."),
    PaperTable("Self-attention masks: Jaccard similarity with the segmentation (Fig. 4)", (
        Row("Best head", "attention", "jaccard_best_head"),
        Row("Mean over heads", "attention", "jaccard_mean_heads"),
        Row("Baseline: random-init backbone, best head", "attention", "random_jaccard_best_head"),
    )),
)

#: Pretraining curves: (dvclive metric under train/, title, log-scale y).
CURVES: tuple[tuple[str, str, bool], ...] = (
    ("loss", "Training loss", False),
    ("lr", "Learning rate", False),
    ("teacher_entropy", "Teacher entropy", False),
    ("kl", "KL(teacher || student)", False),
)


@dataclass
class Sources:
    """What the report found: each listed stage's metrics (or a status string), and figures."""

    metrics: dict[str, dict[str, float] | str] = field(default_factory=dict)
    curves: list[tuple[str, str]] = field(default_factory=list)  # (title, relative path)
    missing_curves: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)  # relative paths
    tsne: list[str] = field(default_factory=list)
    other_figures: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------


def read_metrics(path: Path) -> dict[str, float] | str:
    """A flat metrics JSON as {key: float}; NOT_RUN when the file is absent, UNREADABLE when it is
    not a JSON object (logged). Non-numeric values are dropped with a warning."""
    if not path.is_file():
        return NOT_RUN
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        logger.warning("%s: unreadable metrics file (%s)", path, exc)
        return UNREADABLE
    if not isinstance(data, dict):
        logger.warning("%s: expected a JSON object, got %s", path, type(data).__name__)
        return UNREADABLE
    out: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            logger.warning("%s: %s = %r is not a number; left out", path, key, value)
            continue
        out[str(key)] = float(value)
    return out


def read_curve(path: Path) -> tuple[list[float], list[float]]:
    """(steps, values) of a dvclive metric TSV (columns [timestamp], step, <name>).

    Rows whose value does not parse are skipped.
    """
    steps, values = [], []
    with path.open(newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = next(reader, None)
        if not header or "step" not in header:
            return steps, values
        step_col = header.index("step")
        value_col = len(header) - 1
        for row in reader:
            try:
                step, value = float(row[step_col]), float(row[value_col])
            except (IndexError, ValueError):
                continue
            steps.append(step)
            values.append(value)
    return steps, values


def plot_curve(steps: Sequence[float], values: Sequence[float], title: str, log_y: bool = False) -> bytes:
    """A line plot of one curve as PNG bytes (matplotlib, no pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    ax.plot(steps, values, linewidth=1.2)
    ax.set_title(title)
    ax.set_xlabel("step")
    if log_y and all(v > 0 for v in values):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------------


def format_value(value: float | None) -> str:
    """Whole numbers as integers, others with two decimals (small ones with 3 significant digits)."""
    if value is None:
        return "—"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    if abs(value) < 0.01:
        return f"{value:.3g}"
    return f"{value:.2f}"


def cell(metrics: dict[str, dict[str, float] | str], stage: str, key: str) -> str:
    """Our value of `key` in `stage`'s metrics: the number, NOT_RUN / UNREADABLE, or MISSING_KEY."""
    found = metrics.get(stage, NOT_RUN)
    if isinstance(found, str):
        return found
    return format_value(found[key]) if key in found else MISSING_KEY


def table_rows(table: PaperTable, sources: Sources, inputs: Sequence[str]) -> list[tuple[str, str, str, str]]:
    """(label, ours, paper, setting) of the table's rows whose stage is among `inputs`; the paper's
    numbers as published (one decimal)."""
    return [
        (row.label, cell(sources.metrics, row.stage, row.key), "—" if row.paper is None else f"{row.paper:.1f}",
         row.setting)
        for row in table.rows if row.stage in inputs
    ]


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(title: str, context: dict[str, str], sources: Sources, inputs: Sequence[str]) -> str:
    """summary.md: the run, one Markdown table per paper table, the figures' links, the stages."""
    lines = [f"# {title}", ""]
    lines += [f"- **{_md_escape(k)}**: {_md_escape(v)}" for k, v in context.items()]
    lines += ["", "Paper numbers: Caron et al. 2021, as published (a reference, not a target).", "", LEGEND, ""]
    for table in PAPER_TABLES:
        rows = table_rows(table, sources, inputs)
        if not rows:
            continue
        lines += [f"## {table.title}", "", "| Metric | Ours | Paper | Paper setting |", "|---|---:|---:|---|"]
        lines += [f"| {' | '.join(_md_escape(c) for c in r)} |" for r in rows]
        if table.note:
            lines += ["", table.note]
        lines.append("")
    lines += ["## Stages", "", "| Stage | Metrics file |", "|---|---|"]
    for stage in inputs:
        found = sources.metrics.get(stage, NOT_RUN)
        lines.append(f"| {stage} | {found if isinstance(found, str) else f'{len(found)} metrics'} |")
    lines.append("")
    figures = [("Training curves", [p for _, p in sources.curves]), ("Attention maps", sources.attention),
               ("t-SNE", sources.tsne), ("Other figures", sources.other_figures)]
    for heading, paths in figures:
        if paths:
            lines += [f"## {heading}", ""] + [f"![{p}]({p})" for p in paths] + [""]
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.status { color: #999; font-style: italic; text-align: right; }
figure { display: inline-block; margin: 0.3em; vertical-align: top; } figure img { max-width: 480px; }
.gallery img { max-width: 160px; image-rendering: pixelated; }
p.note { color: #555; font-size: 0.9em; }
"""


def _td(value: str) -> str:
    status = value in (NOT_RUN, UNREADABLE, MISSING_KEY, "—")
    return f'<td class="{"status" if status else "num"}">{html.escape(value)}</td>'


def _img(path: str, caption: str, css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return (f'<figure{cls}><img src="{html.escape(path, quote=True)}" alt="{html.escape(caption, quote=True)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def render_html(title: str, context: dict[str, str], sources: Sources, inputs: Sequence[str]) -> str:
    """index.html: the same content as summary.md plus the images and every metric of every file."""
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{esc(title)}</title>",
           f"<style>{_CSS}</style>", "</head>", "<body>", f"<h1>{esc(title)}</h1>", "<ul>"]
    out += [f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in context.items()]
    out += ["</ul>", '<p class="note">Paper numbers: Caron et al. 2021, as published (a reference, not a '
            "target: this run's model and data are its own).</p>", f'<p class="note">{esc(LEGEND)}</p>']
    for table in PAPER_TABLES:
        rows = table_rows(table, sources, inputs)
        if not rows:
            continue
        out += [f"<h2>{esc(table.title)}</h2>", "<table>",
                "<tr><th>Metric</th><th>Ours</th><th>Paper</th><th>Paper setting</th></tr>"]
        out += [f"<tr><td>{esc(label)}</td>{_td(ours)}{_td(paper)}<td>{esc(setting)}</td></tr>"
                for label, ours, paper, setting in rows]
        out.append("</table>")
        if table.note:
            out.append(f'<p class="note">{esc(table.note)}</p>')
    out.append("<h2>Pretraining curves</h2>")
    if sources.curves:
        out += [_img(path, caption) for caption, path in sources.curves]
    if sources.missing_curves:
        out.append(f'<p class="note">Not logged: {esc(", ".join(sources.missing_curves))}.</p>')
    for heading, paths, css in (("Attention maps", sources.attention, "gallery"), ("t-SNE of the class means",
                                sources.tsne, ""), ("Other figures", sources.other_figures, "")):
        out.append(f"<h2>{esc(heading)}</h2>")
        if not paths:
            out.append(f'<p class="note">{NOT_RUN}</p>')
            continue
        out.append("<div>" + "".join(_img(p, p.removeprefix(f"{FIGURES}/"), css) for p in paths) + "</div>")
    out.append("<h2>All metrics</h2>")
    for stage in inputs:
        found = sources.metrics.get(stage, NOT_RUN)
        out.append(f"<h3>{esc(stage)}</h3>")
        if isinstance(found, str):
            out.append(f'<table><tr><td>{esc(stage)}.json</td>{_td(found)}</tr></table>')
            continue
        out.append("<table><tr><th>Key</th><th>Value</th></tr>")
        out += [f"<tr><td>{esc(k)}</td>{_td(format_value(v))}</tr>" for k, v in found.items()]
        out.append("</table>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------


def _copy_figures(plots: Path, target: Path, sources: Sources) -> None:
    """Copy every PNG under `plots` to target/figures/<same relative path>, sorted into sections."""
    if not plots.is_dir():
        return
    for png in sorted(plots.rglob("*.png")):
        relative = png.relative_to(plots)
        dest = target / FIGURES / relative
        with atomic_file(dest, "wb") as handle, png.open("rb") as source:
            shutil.copyfileobj(source, handle)
        ref = f"{FIGURES}/{relative.as_posix()}"
        if relative.parts[0] == "attention":
            sources.attention.append(ref)
        elif relative.name.startswith("tsne"):
            sources.tsne.append(ref)
        else:
            sources.other_figures.append(ref)


def _render_curves(dvclive: Path, target: Path, sources: Sources) -> None:
    folder = dvclive / "plots" / "metrics" / "train"
    for name, title, log_y in CURVES:
        path = folder / f"{name}.tsv"
        steps, values = read_curve(path) if path.is_file() else ([], [])
        if not values:
            sources.missing_curves.append(title)
            continue
        ref = f"{FIGURES}/curves/{name}.png"
        with atomic_file(target / ref, "wb") as handle:
            handle.write(plot_curve(steps, values, title, log_y))
        sources.curves.append((title, ref))


def _context(params: Params) -> dict[str, str]:
    model, data = params.model, params.dataset
    size = ", ".join(f"{k} {getattr(model, k)}" for k in ("embed_dim", "depth", "num_heads") if getattr(model, k))
    return {
        "Model": f"{model.arch}/{model.patch_size}" + (f" ({size})" if size else ""),
        "Pretraining data": f"{data.source}" + (f" ({data.root})" if data.root else ""),
        "Pretraining": f"{params.pretrain.epochs} epochs, batch {params.pretrain.batch_size_per_gpu} per GPU, "
                       f"out_dim {params.pretrain.out_dim}",
    }


def run(params: Params) -> dict[str, float]:
    """Build the report folder (module docstring).

    Returns:
        Counts: ``stages_reported`` (metrics files read), ``stages_not_run`` (absent or unreadable),
        ``figures`` (images in the report).
    """
    cfg = params.report
    inputs = list(dict.fromkeys(cfg.inputs))
    sources = Sources()
    metrics_dir = Path(params.paths.metrics)
    for stage in inputs:
        sources.metrics[stage] = read_metrics(metrics_dir / f"{stage}.json")
        if isinstance(sources.metrics[stage], str):
            logger.info("%s: %s", metrics_dir / f"{stage}.json", sources.metrics[stage])
    context = _context(params)
    with atomic_dir(params.paths.report) as tmp:
        _render_curves(Path(params.paths.dvclive), tmp, sources)
        _copy_figures(Path(params.paths.plots), tmp, sources)
        write_text(tmp / "index.html", render_html(cfg.title, context, sources, inputs))
        write_text(tmp / "summary.md", render_markdown(cfg.title, context, sources, inputs))
    reported = sum(not isinstance(m, str) for m in sources.metrics.values())
    figures = len(sources.curves) + len(sources.attention) + len(sources.tsne) + len(sources.other_figures)
    logger.info("report: %d of %d metrics files, %d figures -> %s", reported, len(inputs), figures,
                Path(params.paths.report) / "index.html")
    return {"stages_reported": float(reported), "stages_not_run": float(len(inputs) - reported),
            "figures": float(figures)}


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage("report", run, list(argv) if argv is not None else None)


if __name__ == "__main__":
    raise SystemExit(main())
