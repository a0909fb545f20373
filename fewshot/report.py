"""
The outputs of the sweep (bench/reproduce.py), rebuilt from its run files alone (no training).

    python bench/report.py --results results/        # or: python bench/reproduce.py --report

reads results/runs/*.json (one per run, written by the sweep) and writes
    results/README.md     Table A few-shot (one block per K), Table B ablation, Table C domain
                          generalisation, cost; the paper's numbers (paper_numbers.csv, beside this file)
                          beside ours
    results/runs.csv      one row per (run, seed), for pandas
    results/fewshot.png   the paper's Fig. 2: accuracy vs shots, one panel per dataset and the average
    results/tsne.png      the paper's Fig. 3: t-SNE of the positive text nodes before and after adaptation
                          (needs the features file and the checkpoint the sweep saved; else left as it is)
"""

import argparse
import csv
import datetime
import io
import json
import math
import re
import statistics
import textwrap
from collections import defaultdict
from pathlib import Path

import torch

from fewshot import checkpoints
from fewshot.cli import Parser, guarded
from fewshot.datasets import DATASETS, SHIFT_DATASETS
from fewshot.errors import DataError
from fewshot.files import write_atomic
from fewshot.methods import METHODS

PAPER_NUMBERS = Path(__file__).with_name("paper_numbers.csv")
FEWSHOT_DATASETS = [d for d, spec in DATASETS.items() if spec.layout != "shift"]
PAPER_BACKBONE = "RN50"  # the paper's default: its rows are shown (without Δ) when ours differs
TITLES = {"imagenet": "ImageNet", "caltech101": "Caltech101", "oxford_pets": "OxfordPets",
          "stanford_cars": "StanfordCars", "oxford_flowers": "Flowers102", "food101": "Food101",
          "fgvc_aircraft": "FGVCAircraft", "sun397": "SUN397", "dtd": "DTD", "eurosat": "EuroSAT",
          "ucf101": "UCF101", "imagenetv2": "-V2", "imagenet-sketch": "-Sketch",
          "imagenet-adversarial": "-A", "imagenet-rendition": "-R", "average": "Average"}
# the paper's ablation rows (Table 2) and the method of each
ABLATION = {"zeroshot": "Base", "hegraph-tn": "T-N", "hegraph-tp": "T-P", "hegraph-t": "T", "hegraph": "full",
            "hegraph-bias": "full, every W at zero"}  # the last: our ablation of the graph, not the paper's


# -----------------------------------------------------------------------------
# reading: run files and the paper's numbers

def load_runs(results):
    """Every run file under results/runs, newest last; one clear error for a file that is not one."""
    files = sorted(Path(results, "runs").glob("*.json"))
    if not files:
        raise DataError(f"no run files in {Path(results, 'runs')}: run the sweep first")
    runs = []
    for path in files:
        try:
            run = json.loads(path.read_text())
        except ValueError as e:
            raise DataError(f"{path} is not a json file ({e}); move it out of {path.parent}") from None
        problem = run_file_problem(run)
        if problem:
            raise DataError(f"{path} is not a run file of this version of bench/reproduce.py ({problem}); move it "
                            f"out of {path.parent}, or rerun the sweep into a new --results folder")
        run["name"] = path.stem
        run.setdefault("reproduce", {})
        runs.append(run)
    return sorted(runs, key=lambda r: r["reproduce"].get("finished", ""))


def _numbers(value, allow_none=False):
    """True for a {seed: number} dict (None allowed as a value where a seed has no number to give)."""
    return isinstance(value, dict) and all(
        (v is None and allow_none) or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
        for v in value.values())


def run_file_problem(run):
    """What keeps a parsed json from being a run file the report can read, or "" (an older layout, a hand-made
    file, a results.json of train.py's own dropped there)."""
    if not isinstance(run, dict):
        return f"a json {type(run).__name__}, not an object"
    kinds = {"dataset": str, "backbone": str, "method": str, "shots": int, "seeds": dict}
    for key, kind in kinds.items():
        if not isinstance(run.get(key), kind) or isinstance(run.get(key), bool):
            return f"its {key!r} is {'missing' if key not in run else type(run[key]).__name__}, not {kind.__name__}"
    checks = {"seeds": _numbers(run["seeds"]) and bool(run["seeds"]),
              "epoch_seconds": _numbers(run.get("epoch_seconds", {}), allow_none=True),
              "train_seconds": _numbers(run.get("train_seconds") or {}, allow_none=True),
              "shift": (isinstance(run.get("shift", {}), dict)
                        and all(_numbers(v) for v in run.get("shift", {}).values())),
              "reproduce": isinstance(run.get("reproduce", {}), dict),
              "params": (run.get("params") is None
                         or (isinstance(run["params"], int) and not isinstance(run["params"], bool)))}
    bad = [key for key, fine in checks.items() if not fine]
    return f"its {bad[0]!r} is not what a run file holds" if bad else ""


def latest_per_cell(runs):
    """One run per (backbone, dataset, method, shots, shift or not): the newest; and how many were dropped.

    A results folder may hold runs of several configurations (e.g. a rerun with other recipe flags); the
    tables show the newest of each cell, runs.csv lists them all.
    """
    cells = {}
    for run in runs:  # sorted oldest first, so the newest wins
        cells[(run["backbone"], run["dataset"], run["method"], run["shots"], bool(run.get("shift")))] = run
    return list(cells.values()), len(runs) - len(cells)


def load_paper_numbers(path=PAPER_NUMBERS):
    """The rows of paper_numbers.csv (comment lines start with #), accuracy as float and shots as int."""
    lines = [line for line in Path(path).read_text().splitlines() if line and not line.startswith("#")]
    rows = list(csv.DictReader(lines))
    for row in rows:
        row["shots"], row["accuracy"] = int(row["shots"]), float(row["accuracy"])
    return rows


def paper_rows(paper, tables, backbone, shots):
    """The paper's rows for one of our tables: {paper_row: {"method": m, dataset: accuracy, ...}}, the
    backbone they are for, and whether they are comparable with ours (same backbone and K).

    tables: the paper's tables to draw from, by priority (the first with rows for our backbone wins);
    when none has our backbone, the paper's default backbone is shown, for reference only.
    """
    for wanted, comparable in ((backbone, True), (PAPER_BACKBONE, False)):
        for table in tables:
            picked = [r for r in paper if r["table"] == table and r["backbone"] == wanted and r["shots"] == shots]
            if picked:
                rows = {}
                for r in picked:
                    rows.setdefault(r["paper_row"], {"method": r["method"]})[r["dataset"]] = r["accuracy"]
                return rows, wanted, comparable
    return {}, None, False


# -----------------------------------------------------------------------------
# numbers: mean ± std over seeds

def mean_std(values):
    """Mean and sample standard deviation (n - 1, as train.py), 0 for one value."""
    values = list(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values):
    """A table cell: "mean ± std" over seeds ("mean" for one seed, "–" for none)."""
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.2f} ± {std:.2f}" if len(values) > 1 else f"{mean:.2f}"


def signed(difference):
    """A difference with its sign, "0.00" when it rounds to zero."""
    text = f"{difference:+.2f}"
    return "0.00" if text in ("+0.00", "-0.00") else text


def per_seed(run, target=None):
    """{seed: accuracy} of a run on its own test set, or on a shift set (target)."""
    return run["seeds"] if target is None else run.get("shift", {}).get(target, {})


def average_per_seed(seed_dicts):
    """{seed: mean over the dicts} on the seeds they all have: the average over datasets, per seed."""
    common = set.intersection(*(set(d) for d in seed_dicts)) if seed_dicts else set()
    return {s: statistics.mean(d[s] for d in seed_dicts) for s in sorted(common)}


def method_order(methods):
    """train.py's order first (its METHODS), then any other name alphabetically."""
    known = list(METHODS)
    return sorted(set(methods), key=lambda m: (known.index(m) if m in known else len(known), m))


def dataset_order(datasets):
    """The paper's order of the datasets, then any other name (e.g. of a --features file)."""
    known = list(DATASETS) + ["average"]
    return sorted(set(datasets), key=lambda d: (known.index(d) if d in known else len(known), d))


# -----------------------------------------------------------------------------
# markdown tables

def markdown_table(header, rows):
    """A markdown table; the first column left-aligned, the numbers right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def paper_values(row, columns, average_of):
    """{column: the paper's number} of one paper row; its "average" is its own printed one when our columns
    are exactly the ones it averaged, else the mean of its numbers over the same columns (if it has them)."""
    out = {c: row[c] for c in columns if c in row}
    if "average" in row and {c for c in row if c not in ("method", "average")} == set(average_of):
        out["average"] = row["average"]
    elif all(c in row for c in average_of):
        out["average"] = statistics.mean(row[c] for c in average_of)
    return out


def accuracy_block(cells, columns, methods, label, paper, comparable, average_of=None):
    """Rows of one accuracy table: per method ours, then "paper: ..." and "Δ vs paper" where the paper
    has the method; then the paper's rows of methods we did not run. Paper rows with no number in our
    columns are left out.

    cells: {method: {column: {seed: accuracy}}}; average_of: the columns averaged into "Average" (default
    all; a method gets an average only when it has every one of them), per seed, then mean ± std.
    """
    average_of = columns if average_of is None else average_of
    header = columns + (["average"] if len(average_of) > 1 else [])  # the average of one column is itself
    theirs = {name: paper_values(row, columns, average_of) for name, row in paper.items()}
    theirs = {name: values for name, values in theirs.items() if values}

    def paper_row(name):
        return [f"paper: {name}"] + [f"{theirs[name][c]:.2f}" if c in theirs[name] else "" for c in header]

    rows, shown = [], set()
    for method in methods:
        ours = dict(cells[method])
        if "average" in header and all(c in ours for c in average_of):
            ours["average"] = average_per_seed([ours[c] for c in average_of])
        rows.append([label(method)] + [fmt(list(ours.get(c, {}).values())) for c in header])
        for name in theirs:
            if paper[name]["method"] != method:
                continue
            shown.add(name)
            rows.append(paper_row(name))
            if comparable:
                rows.append(["Δ vs paper"] + [signed(statistics.mean(ours[c].values()) - theirs[name][c])
                                              if ours.get(c) and c in theirs[name] else "" for c in header])
    rows += [paper_row(name) for name in theirs if name not in shown]
    return markdown_table(["method"] + [TITLES.get(c, c) for c in header], rows), bool(theirs)


def paper_note(backbone, shots, paper_backbone, comparable, paper_shots=16):
    """The line under a table that says which of the paper's numbers are shown, and why no Δ if none."""
    if comparable:
        return ["", f"`paper:` rows: the paper's {paper_backbone} numbers; Δ = ours − paper."]
    why = [] if paper_backbone == backbone else [f"backbone {backbone} here, {paper_backbone} in the paper"]
    why += [] if shots == paper_shots else [f"K = {shots} here, {paper_shots} in the paper"]
    return ["", f"`paper:` rows ({paper_backbone}, K = {paper_shots}) for reference only, no Δ: {'; '.join(why)}."]


def fewshot_section(runs, backbone, paper):
    """Table A: one block per K; rows = methods, columns = the datasets present and their average."""
    mine = [r for r in runs if r["backbone"] == backbone and not r.get("shift")]
    columns = dataset_order(r["dataset"] for r in mine)
    out = [f"## A. Few-shot classification ({backbone})", ""]
    for shots in sorted({r["shots"] for r in mine}):
        cells = defaultdict(dict)
        for r in mine:
            if r["shots"] == shots:
                cells[r["method"]][r["dataset"]] = per_seed(r)
        tables = ["Table 2", "Table 4"] if shots == 16 else ["Sec. 4.2 (Fig. 2)"]
        rows, paper_bb, comparable = paper_rows(paper, tables, backbone, shots)
        out += [f"### K = {shots}", ""]
        table, with_paper = accuracy_block(cells, columns, method_order(cells), lambda m: f"`{m}`", rows, comparable)
        out += table + (paper_note(backbone, shots, paper_bb, comparable, shots) if with_paper else []) + [""]
    return out


def ablation_section(runs, backbone, paper):
    """Table B: Base, T-N, T-P, T and full at 16 shots (else the largest K present), per dataset."""
    mine = [r for r in runs if r["backbone"] == backbone and not r.get("shift") and r["method"] in ABLATION]
    if not mine:
        return []
    shots = 16 if any(r["shots"] == 16 for r in mine) else max(r["shots"] for r in mine)
    columns = dataset_order(r["dataset"] for r in mine)
    cells = defaultdict(dict)
    for r in mine:
        if r["shots"] == shots:
            cells[r["method"]][r["dataset"]] = per_seed(r)
    rows, paper_bb, comparable = paper_rows(paper, ["Table 2"], backbone, 16)
    rows = {name: row for name, row in rows.items() if row["method"] in ABLATION}
    comparable = comparable and shots == 16
    methods = [m for m in ABLATION if m in cells]
    out = [f"## B. Ablation ({backbone}, K = {shots})", ""]
    table, with_paper = accuracy_block(cells, columns, methods, lambda m: f"{ABLATION[m]} (`{m}`)", rows, comparable)
    return out + table + (paper_note(backbone, shots, paper_bb, comparable) if with_paper else []) + [""]


def shift_section(runs, backbone, paper):
    """Table C: trained on ImageNet, tested on it (source) and on -V2/-Sketch/-A/-R (text classifier)."""
    mine = [r for r in runs if r["backbone"] == backbone and r.get("shift")]
    if not mine:
        return []
    targets = [t for t in SHIFT_DATASETS if any(t in r["shift"] for r in mine)]
    columns = ["imagenet"] + targets
    out = []
    for shots in sorted({r["shots"] for r in mine}):
        cells = defaultdict(dict)
        for r in mine:
            if r["shots"] == shots:
                cells[r["method"]] = {"imagenet": per_seed(r),
                                      **{t: per_seed(r, t) for t in targets if t in r["shift"]}}
        rows, paper_bb, comparable = paper_rows(paper, ["Table 1"], backbone, 16)
        comparable = comparable and shots == 16
        out += [f"## C. Domain generalisation ({backbone}, ImageNet K = {shots} → shift sets)", ""]
        table, with_paper = accuracy_block(cells, columns, method_order(cells), lambda m: f"`{m}`", rows,
                                           comparable, average_of=["imagenet", *SHIFT_DATASETS])
        out += table + ["", "ImageNet = the source's own test set; the shift sets are scored with the text "
                        "classifier only. Average = of the source and the four targets, as the paper's Table 1."]
        out += (paper_note(backbone, shots, paper_bb, comparable)[1:] if with_paper else []) + [""]
    return out


def cost_section(runs):
    """Seconds per epoch and training time per method, and the device that ran them."""
    groups = defaultdict(list)
    for r in runs:
        groups[(r["backbone"], r["method"])].append(r)
    order = method_order(m for _, m in groups)
    rows = []
    for (backbone, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]))):
        per_epoch = [s for r in rs for s in r.get("epoch_seconds", {}).values() if s]  # None: no epochs
        trained = [s for r in rs for s in (r.get("train_seconds") or {}).values()]
        params = sorted({r["params"] for r in rs if r.get("params") is not None})
        rows.append([f"`{method}`", backbone, str(len(rs)),
                     f"{statistics.mean(per_epoch):.3f}" if per_epoch else "–",
                     f"{sum(trained):.1f}" if trained else "–",
                     f"{sum(r['reproduce'].get('wall_seconds', 0) for r in rs):.1f}",
                     "–" if not params else f"{params[0]:,}" if len(params) == 1 else f"{params[0]:,}–{params[-1]:,}",
                     ", ".join(sorted({r["reproduce"].get("device", "?") for r in rs}))])
    out = ["## Cost", ""]
    out += markdown_table(["method", "backbone", "runs", "s / epoch (mean)", "training s (total)",
                           "wall s (total)", "tunable parameters", "device"], rows)
    return out + ["", "s / epoch: mean over the runs and seeds that train; training s: train.py's per-seed "
                  "training time, summed (– where train.py does not report it); wall s: each whole run "
                  "(loading, training, evaluation), summed.", ""]


# -----------------------------------------------------------------------------
# runs.csv

def write_runs_csv(runs, path):
    """One row per (run, seed), every run file (also those the tables leave out), for pandas."""
    targets = [t for t in SHIFT_DATASETS if any(t in r.get("shift", {}) for r in runs)]
    header = ["run", "dataset", "backbone", "method", "shots", "seed", "test_accuracy", "epoch_seconds",
              "train_seconds", "params"] + [f"shift_{t}" for t in targets] + [
              "device", "run_wall_seconds", "finished", "train_args"]
    lines = []
    for r in runs:
        rep = r["reproduce"]
        for seed, acc in r["seeds"].items():
            lines.append([r["name"], r["dataset"], r["backbone"], r["method"], r["shots"], seed, acc,
                          r.get("epoch_seconds", {}).get(seed, ""), (r.get("train_seconds") or {}).get(seed, ""),
                          r.get("params", "")] + [r.get("shift", {}).get(t, {}).get(seed, "") for t in targets]
                         + [rep.get("device", ""), rep.get("wall_seconds", ""), rep.get("finished", ""),
                            " ".join(rep.get("key", {}).get("train_args", []))])

    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(lines)
    write_atomic(path, lambda f: f.write(text.getvalue().encode()))


# -----------------------------------------------------------------------------
# figures

def clip_below_zeroshot(ax, stats):
    """Start the y-axis a little below zero-shot's lowest point, so that the adapters, which differ by a
    point or two above it, are not squeezed flat by a method far below (a linear probe at 1 shot); such a
    method is named in the panel instead. stats: method -> [(mean, std) per K]. No zero-shot: automatic."""
    if not stats.get("zeroshot"):
        return
    zeroshot = min(m for m, _ in stats["zeroshot"])
    top = max(m + s for points in stats.values() for m, s in points)
    floor = zeroshot - max(1.0, 0.25 * (top - zeroshot))
    below = [name for name, points in stats.items() if any(m < floor for m, _ in points)]
    if below:
        ax.set_ylim(floor, top + 0.05 * (top - floor))
        ax.text(0.98, 0.03, "below the axis: " + ", ".join(below), transform=ax.transAxes, ha="right",
                va="bottom", fontsize=7, color="dimgray")


MARKERS = "osD^vP*X<>hp"
LINESTYLES = ("-", "--", "-.", ":")


def method_styles(methods):
    """One look per method: its own colour, marker and line style; hegraph in red, drawn thicker and on top.
    Red is hegraph's alone: the others take tab10 without its red, then tab20's light shades."""
    import matplotlib.pyplot as plt
    tab10, tab20 = plt.get_cmap("tab10").colors, plt.get_cmap("tab20").colors
    colours = [c for i, c in enumerate(tab10) if i != 3] + [c for i, c in enumerate(tab20) if i % 2 and i != 7]
    others = [m for m in methods if m != "hegraph"]
    styles = {m: dict(color=colours[i % len(colours)], marker=MARKERS[i % len(MARKERS)], ms=4, lw=1.3,
                      ls=LINESTYLES[i % len(LINESTYLES)], zorder=3) for i, m in enumerate(others)}
    styles["hegraph"] = dict(color="crimson", marker="*", ms=9, lw=2.4, ls="-", zorder=5)
    return styles


def fewshot_seeds(runs, datasets, methods, shots):
    """{(method, panel, K): {seed: accuracy}}, the average panel (per seed, over every dataset, only where all
    are present) included."""
    seeds = {(r["method"], r["dataset"], r["shots"]): per_seed(r) for r in runs}
    for m in methods:
        for k in shots:
            got = [seeds[m, d, k] for d in datasets if (m, d, k) in seeds]
            if len(got) == len(datasets) > 1:
                seeds[m, "average", k] = average_per_seed(got)
    return seeds


def identical_curves(curves):
    """Groups of methods whose mean curves coincide exactly (to the printed 0.01), which hide one another."""
    groups = defaultdict(list)
    for m, points in curves.items():
        groups[tuple((k, round(mean, 2)) for k, mean, _ in points)].append(m)
    return [tuple(g) for g in groups.values() if len(g) > 1]


def draw_panel(ax, curves, styles, shots):
    """One panel: each method's mean ± std (error bars) at K, shifted sideways by a few percent of an octave
    per method so that lines and bars that coincide stay visible side by side. Returns the groups of methods
    whose curves coincide (identical_curves), for the figure to name below its panels."""
    n = len(curves)
    for i, (m, points) in enumerate(curves.items()):
        shift = 2 ** (0.05 * (i - (n - 1) / 2))  # log-x axis: a constant factor is a constant offset
        xs = [k * shift for k, _, _ in points]
        ax.errorbar(xs, [mean for _, mean, _ in points], yerr=[std for _, _, std in points], label=m,
                    capsize=2, elinewidth=0.8, **styles[m])
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    return identical_curves(curves)


def same_curve_notes(same, panels):
    """One sentence naming the curves that coincide, each group with the panels it coincides in ("" if none).
    same: {panel: [group of methods]}."""
    where = defaultdict(list)
    for panel, groups in same.items():
        for group in groups:
            where[group].append(TITLES.get(panel, panel))
    notes = [f"{' = '.join(g)} ({'every panel' if len(p) == len(panels) > 1 else ', '.join(p)})"
             for g, p in where.items()]
    return "Curves that coincide (to 0.01), drawn one over the other: " + "; ".join(notes) if notes else ""


def figure_legend(fig, axes, width, notes=""):
    """One legend for the whole figure, under its panels, with the notes (wrapped to the figure's width) as its
    title: notes never lie across the panels, so that constrained layout keeps every panel its full size."""
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    title = "\n".join(textwrap.wrap(notes, int(width * 13))) if notes else None
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", frameon=False,
               ncol=max(1, min(len(handles), 5, int(width // 1.8))), title=title, title_fontsize=8)


def figure_title(fig, text, fontsize=12):
    """The figure's title, wrapped (as measured by the renderer) to 95 % of the figure's width: never cut."""
    title = fig.suptitle(text, fontsize=fontsize)
    renderer, chars = fig.canvas.get_renderer(), len(text)
    while title.get_window_extent(renderer).width > 0.95 * fig.bbox.width and chars > 20:
        chars = int(chars * 0.9)
        title.set_text("\n".join(textwrap.wrap(text, chars)))


def paper_points(paper, backbone, panel, shots, datasets):
    """{K: the paper's HeGraphAdapter} for a panel, where it printed one for our backbone (its average is of
    the 11 datasets: shown only when ours is too)."""
    points = {r["shots"]: r["accuracy"] for r in paper if r["method"] == "hegraph" and r["backbone"] == backbone
              and r["dataset"] == panel and r["shots"] in shots}
    return {} if panel == "average" and set(datasets) != set(FEWSHOT_DATASETS) else points


def plot_fewshot(runs, backbone, paper, path):
    """The paper's Fig. 2: accuracy vs K (log-spaced), one panel per dataset plus their average (when there
    are several), one line per method with mean ± std over seeds; HeGraphAdapter drawn most prominent.
    Writes .png and .svg."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in runs if r["backbone"] == backbone and not r.get("shift")]
    datasets, methods = dataset_order(r["dataset"] for r in mine), method_order(r["method"] for r in mine)
    shots = sorted({r["shots"] for r in mine})
    seeds, styles = fewshot_seeds(mine, datasets, methods, shots), method_styles(methods)
    panels = datasets + (["average"] if len(datasets) > 1 else [])
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    width = max(3.6 * ncols, 7.0)  # room for the title and the legend, even with one panel
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, 3.1 * nrows + 1.0), squeeze=False, layout="constrained")
    same = {}
    for ax, panel in zip(axes.flat, panels):
        curves = {m: [(k, *mean_std(seeds[m, panel, k].values())) for k in shots if seeds.get((m, panel, k))]
                  for m in methods}
        curves = {m: points for m, points in curves.items() if points}
        clip_below_zeroshot(ax, {m: [(mean, std) for _, mean, std in points] for m, points in curves.items()})
        same[panel] = draw_panel(ax, curves, styles, shots)
        points = paper_points(paper, backbone, panel, shots, datasets)
        if points:
            ax.plot(sorted(points), [points[k] for k in sorted(points)], ls="none", marker="*", ms=11,
                    mfc="none", mec="black", zorder=6, label=f"paper: HeGraphAdapter ({backbone})")
        ax.set_title(TITLES.get(panel, panel), fontweight="bold" if panel == "average" else None)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (%)")
    for ax in axes[-1, :]:
        ax.set_xlabel("shots per class (K)")
    figure_legend(fig, axes.flat, width, same_curve_notes(same, panels))
    spread = "mean ± std over seeds" if max(len(r["seeds"]) for r in mine) > 1 else "1 seed"
    figure_title(fig, f"Few-shot test accuracy ({backbone}), {spread}")
    fig.savefig(path, dpi=130)
    fig.savefig(Path(path).with_suffix(".svg"))
    plt.close(fig)


def text_nodes_before_after(checkpoint):
    """The positive text nodes P and P' [C, d] and the class names, from train.py --save's model file of a
    HeGraphAdapter run (which holds all it needs: no features file is read)."""
    ckpt = checkpoints.read_model(checkpoint)
    model = checkpoints.build_model(ckpt, checkpoint)
    with torch.no_grad():
        return ckpt["text"]["positive"], model.propagate()[0], ckpt["classnames"]


def plot_tsne(before, after, classnames, dataset, path, num_classes=20):
    """The paper's Fig. 3: 2-D t-SNE of P (zero-shot, 'Base') and P' (adapted) for 20 random classes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    C = before.shape[0]
    pick = torch.randperm(C, generator=torch.Generator().manual_seed(0))[:num_classes].sort().values
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), layout="constrained")
    colours = plt.get_cmap("tab20").colors
    for ax, nodes, title in zip(axes, (before, after), ("Base: P (prompts)", "HeGraphAdapter: P' (adapted)")):
        x = torch.nn.functional.normalize(nodes[pick].float(), dim=-1)
        cos = x @ x.T
        spread = (1 - cos[~torch.eye(len(pick), dtype=torch.bool)]).mean().item()  # mean inter-class distance
        xy = TSNE(n_components=2, perplexity=min(5.0, len(pick) - 1.0), init="pca", random_state=0).fit_transform(
            x.numpy())
        for j, c in enumerate(pick.tolist()):
            ax.scatter(*xy[j], color=colours[j % len(colours)], s=60, edgecolors="black", linewidths=0.4,
                       label=classnames[c][:28])
        ax.set_title(f"{title}\nmean inter-class cosine distance {spread:.3f}")
        ax.set_xticks([]), ax.set_yticks([])
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", frameon=False, fontsize=8)
    fig.suptitle(f"t-SNE of the positive text nodes, {len(pick)} classes of {TITLES.get(dataset, dataset)}")
    fig.savefig(path, dpi=130)
    plt.close(fig)


def tsne_from_runs(runs, results, dataset):
    """Draw results/tsne.png from the checkpoint of a hegraph run (of `dataset` if there is one);
    returns a line for the README saying what was drawn, or why not."""
    candidates = [r for r in runs if r["method"] == "hegraph" and r["reproduce"].get("checkpoint")]
    if not candidates:
        return "No t-SNE: no `hegraph` run saved a checkpoint (the sweep saves one for --tsne-dataset)."
    run = max(candidates, key=lambda r: (r["dataset"] == dataset, r["shots"]))
    checkpoint_dir = Path(results, run["reproduce"]["checkpoint"])
    seed = min(run["seeds"], key=int)
    checkpoint = checkpoint_dir / f"seed{seed}.pt"
    if not checkpoint.is_file():
        return f"t-SNE not redrawn: {checkpoint} is absent (tsne.png, if any, is from an earlier report)."
    try:
        before, after, classnames = text_nodes_before_after(checkpoint)
    except DataError as e:  # a checkpoint of an older train.py, one changed since: the tables do not need it
        return f"t-SNE not redrawn: {e}."
    plot_tsne(before, after, classnames, run["dataset"], Path(results, "tsne.png"))
    return (f"![t-SNE](tsne.png)\n\nt-SNE (Fig. 3): `hegraph` on {TITLES.get(run['dataset'], run['dataset'])}, "
            f"K = {run['shots']}, seed {seed} ({run['backbone']}).")


# -----------------------------------------------------------------------------
# the whole report

def write_report(results, tsne_dataset="food101"):
    """results/README.md, runs.csv, fewshot.png/.svg and tsne.png from results/runs/*.json."""
    results = Path(results)
    all_runs = load_runs(results)
    runs, dropped = latest_per_cell(all_runs)
    paper = load_paper_numbers()
    backbones = sorted({r["backbone"] for r in runs})
    lines = ["# Results", "",
             f"Written by `python bench/reproduce.py --report --results {results}` from {len(all_runs)} run "
             f"files in `runs/` on {datetime.date.today()}. Test accuracy %, mean ± std over seeds (n − 1; a cell "
             "of one seed gives its accuracy alone); "
             "the number of a run is its accuracy after the last epoch (nothing is selected on test images). "
             + ("Average = over the datasets of the table, per seed, then mean ± std; for the paper's rows, its "
                "printed average when the table has all its datasets, else the mean of its numbers over the same "
                "datasets. " if len({r["dataset"] for r in runs}) > 1 else "")
             + "`runs.csv` has one row per run and seed.", ""]
    if dropped:
        lines += [f"Note: {dropped} run files repeat a cell with another configuration; the tables show the "
                  "newest of each (runs.csv lists all).", ""]
    for backbone in backbones:
        lines += fewshot_section(runs, backbone, paper)
        lines += ablation_section(runs, backbone, paper)
        lines += shift_section(runs, backbone, paper)
    lines += cost_section(runs)
    lines += ["## Figures", ""]
    for backbone in backbones:
        if any(r["backbone"] == backbone and not r.get("shift") for r in runs):
            name = "fewshot.png" if len(backbones) == 1 else f"fewshot_{re.sub(r'[^A-Za-z0-9_.-]', '-', backbone)}.png"
            plot_fewshot(runs, backbone, paper, results / name)
            lines += [f"![few-shot accuracy, {backbone}]({name})", "",
                      f"Fig. 2 ({backbone}): test accuracy vs shots, mean ± std (error bars) over seeds; "
                      "`hegraph` in red; methods are shifted sideways a little so that equal points stay "
                      "visible, and curves that coincide exactly are named under the panels.", ""]
    lines += [tsne_from_runs(runs, results, tsne_dataset), ""]
    write_runs_csv(all_runs, results / "runs.csv")
    write_atomic(results / "README.md", lambda f: f.write("\n".join(lines).encode()))
    return results / "README.md"


def main(argv=None):
    p = Parser(prog="bench/report.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("results"),
                   help="the results folder of bench/reproduce.py, holding runs/*.json (default results/)")
    p.add_argument("--tsne-dataset", default="food101",
                   help="the dataset whose hegraph checkpoint the t-SNE figure is drawn from (default food101)")
    args = p.parse_args(argv)
    guarded("bench/report.py", lambda: print(f"wrote {write_report(args.results, args.tsne_dataset)}"))
