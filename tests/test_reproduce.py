"""bench/reproduce.py and bench/report.py (fewshot/sweep.py, fewshot/report.py): a real sweep on two tiny
datasets (shared by the tests of this module), its rerun, an interrupted sweep, two sweeps at once in two
processes, --shift, and the report rebuilt from the run files alone."""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from fewshot import progress, report, runs, sweep
from fewshot.testing.fixtures import TINY_NAMES

VIT = TINY_NAMES["vit"]  # the tiny checkpoint's name, read from its weights

METHODS = ["zeroshot", "tip", "hegraph"]


def sweep_argv(root, checkpoint, features, results, datasets=("dtd", "eurosat"), methods=METHODS, shots=(1, 2),
               seeds=(1, 2), epochs=2):
    """The command line of a tiny sweep."""
    return ["--datasets", *datasets, "--shots", *map(str, shots), "--methods", *methods, "--seeds", *map(str, seeds),
            "--results", str(results), "--root", str(root), "--clip-checkpoint", str(checkpoint),
            "--features-dir", str(features), "--views", "2", "--max-shots", "2", "--workers", "0", "--device", "cpu",
            "--tsne-dataset", "dtd", "--", "--epochs", str(epochs)]


def main(argv):
    """bench/reproduce.py's main in this process; returns what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        sweep.main(argv)
    return out.getvalue()


def ran(output):
    """The run files a sweep says it ran."""
    return re.findall(r"^ran (\S+\.json):", output, flags=re.M)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """dtd and eurosat, 3 classes each, under one root."""
    from conftest import write_dataset
    root = tmp_path_factory.mktemp("data")
    for key in ("dtd", "eurosat"):
        write_dataset(root, key)
    return root


@pytest.fixture(scope="module")
def swept(data_root, tiny_vit_checkpoint, tmp_path_factory):
    """One sweep: 2 datasets x K 1 2 x zeroshot tip hegraph, seeds 1 2, 2 epochs; features extracted here."""
    tmp = tmp_path_factory.mktemp("sweep")
    argv = sweep_argv(data_root, tiny_vit_checkpoint, tmp / "features", tmp / "results")
    return {"argv": argv, "output": main(argv), "results": tmp / "results", "features": tmp / "features"}


def run_files(results):
    return sorted(Path(results, "runs").glob("*.json"))


def test_sweep_writes_one_file_per_run_and_a_rerun_skips_them(swept):
    files = run_files(swept["results"])
    assert len(files) == 12 and sorted(ran(swept["output"])) == [f.name for f in files]
    cells = set()
    for f in files:
        r = json.loads(f.read_text())
        cells.add((r["dataset"], r["method"], r["shots"]))
        assert set(r["seeds"]) == {"1", "2"} and r["backbone"] == VIT
        assert r["reproduce"]["key"]["train_args"] == ["--epochs", "2"]
        assert f.name.startswith(f"{r['dataset']}_{VIT}_{r['method']}_{r['shots']}shot_")
    assert len(cells) == 12
    # one features file per dataset, made once with the largest K
    assert sorted(p.name for p in swept["features"].glob("*.pt")) == [f"dtd_{VIT}.pt", f"eurosat_{VIT}.pt"]
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = main(swept["argv"])
    assert "skipped 12 finished already" in again and ran(again) == []
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    for name in ("README.md", "runs.csv", "fewshot.png", "fewshot.svg", "tsne.png"):
        assert (swept["results"] / name).is_file(), name


def markdown_cells(readme):
    """{(section, row label, column title): cell} of every table, section = the last heading above it;
    a "Δ vs paper" row is labelled "Δ <the row of ours above it>"."""
    cells, section, header, ours = {}, None, None, None
    for line in readme.splitlines():
        if line.startswith("#"):
            section, header = line.lstrip("# "), None
        elif line.startswith("|") and not line.startswith("|---"):
            row = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = row
                continue
            if row[0] == "Δ vs paper":
                row[0] = f"Δ {ours}"
            elif not row[0].startswith("paper:"):
                ours = row[0]
            cells.update({(section, row[0], h): c for h, c in zip(header[1:], row[1:])})
        elif not line.startswith("|"):
            header = None
    return cells


def test_the_tables_hold_the_numbers_of_the_run_files(swept):
    cells = markdown_cells((swept["results"] / "README.md").read_text())
    for f in run_files(swept["results"]):
        r = json.loads(f.read_text())
        cell = cells[(f"K = {r['shots']}", f"`{r['method']}`", report.TITLES[r["dataset"]])]
        mean, std = map(float, cell.split(" ± "))
        assert mean == pytest.approx(r["test_accuracy"], abs=0.005) and std == pytest.approx(r["std"], abs=0.005)
        if r["shots"] == 2 and r["method"] in ("zeroshot", "hegraph"):  # Table B, at the largest K swept
            label = f"{report.ABLATION[r['method']]} (`{r['method']}`)"
            assert cells[(f"B. Ablation ({VIT}, K = 2)", label, report.TITLES[r["dataset"]])] == cell
    # the average over datasets: per seed, then mean ± std
    runs = [json.loads(f.read_text()) for f in run_files(swept["results"])]
    hegraph1 = [r["seeds"] for r in runs if r["method"] == "hegraph" and r["shots"] == 1]
    per_seed = [(hegraph1[0][s] + hegraph1[1][s]) / 2 for s in ("1", "2")]
    assert cells[("K = 1", "`hegraph`", "Average")] == report.fmt(per_seed)
    rows = (swept["results"] / "runs.csv").read_text().splitlines()
    assert len(rows) == 1 + 12 * 2 and rows[0].startswith("run,dataset,backbone,method,shots,seed,test_accuracy")


def test_report_is_rebuilt_from_the_run_files_alone(swept):
    results = swept["results"]
    for name in ("README.md", "runs.csv", "fewshot.png", "fewshot.svg"):
        (results / name).unlink()
    hidden = swept["features"].with_name("features-hidden")
    swept["features"].rename(hidden)  # no features: the report must not need them
    try:
        output = main(["--report", "--results", str(results)])
    finally:
        hidden.rename(swept["features"])
    assert "README.md" in output
    readme = (results / "README.md").read_text()
    # the t-SNE is redrawn from the hegraph model file alone, which needs no features file
    assert f"## A. Few-shot classification ({VIT})" in readme and "t-SNE (Fig. 3): `hegraph`" in readme
    with Image.open(results / "fewshot.png") as png:
        png.verify()
    with Image.open(results / "fewshot.png") as png:
        assert png.format == "PNG" and png.width >= 800 and png.height >= 300
    assert (results / "fewshot.svg").read_text().lstrip().startswith("<?xml")


def test_an_interrupted_sweep_continues_where_it_stopped(swept, data_root, tiny_vit_checkpoint, tmp_path,
                                                         monkeypatch, capsys):
    argv = sweep_argv(data_root, tiny_vit_checkpoint, swept["features"], tmp_path / "results", datasets=["dtd"],
                      methods=["zeroshot", "tip"])
    real_run, calls = runs.run, []

    def dies_on_the_second_run(request):
        calls.append(request.method)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as Ctrl-C in the middle of the second run
        return real_run(request)

    monkeypatch.setattr(runs, "run", dies_on_the_second_run)
    with pytest.raises(SystemExit):
        main(argv)
    assert "interrupted" in capsys.readouterr().err
    first = run_files(tmp_path / "results")
    assert len(first) == 1
    before = first[0].read_text()
    monkeypatch.setattr(runs, "run", real_run)
    output = main(argv)
    assert "skipped 1 finished already, 3 to do" in output and len(ran(output)) == 3
    assert first[0].name not in ran(output) and first[0].read_text() == before
    assert len(run_files(tmp_path / "results")) == 4


def test_two_sweeps_at_once_run_each_run_exactly_once(swept, data_root, tiny_vit_checkpoint, tmp_path, monkeypatch):
    """Two processes, this one and a child, started together on one results folder: every run is run by
    one of them only. (The reports at the end are left out: other tests check them.)"""
    go = tmp_path / "go"
    argv = sweep_argv(data_root, tiny_vit_checkpoint, swept["features"], tmp_path / "results", datasets=["dtd"],
                      methods=["zeroshot", "tip-f", "hegraph-t"], epochs=10)
    # the child imports, says it is ready, and waits for the go, so that both sweeps start together
    starter = ("import sys, time, pathlib; from fewshot import report, sweep\n"
               "report.write_report = lambda *args: 'no report'\n"
               "go = pathlib.Path(sys.argv[1]); go.with_suffix('.ready').touch()\n"
               "while not go.exists(): time.sleep(0.005)\n"
               "sweep.main(sys.argv[2:])")
    child = subprocess.Popen([sys.executable, "-c", starter, str(go), *argv],
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not go.with_suffix(".ready").exists() and time.monotonic() < deadline:
        assert child.poll() is None, child.communicate()[1][-1500:]
        time.sleep(0.01)
    monkeypatch.setattr(report, "write_report", lambda *args: "no report")
    go.touch()
    ours = main(argv)
    theirs, errors = child.communicate(timeout=240)
    assert child.returncode == 0, errors[-1500:]
    files = [f.name for f in run_files(tmp_path / "results")]
    assert len(files) == 6
    assert sorted(ran(ours) + ran(theirs)) == sorted(files)  # each run once, by one process
    assert "done: ran" in ours and "done: ran" in theirs
    pids = {json.loads((tmp_path / "results" / "runs" / f).read_text())["reproduce"]["pid"] for f in files}
    assert pids <= {os.getpid(), child.pid}


def test_shift_runs_hegraph_t_and_the_baselines_on_imagenet(tiny_vit_checkpoint, tmp_path):
    from conftest import write_dataset
    root = tmp_path / "data"
    write_dataset(root, "imagenet")
    for key in report.SHIFT_DATASETS:
        write_dataset(root, key, subset=[0, 2])
    output = main(["--shift", "--datasets", "--methods", "zeroshot", "tip", "hegraph", "hegraph-t", "--shots", "2",
                   "--seeds", "1", "--results", str(tmp_path / "results"), "--root", str(root),
                   "--clip-checkpoint", str(tiny_vit_checkpoint), "--features-dir",
                   str(tmp_path / "features"), "--views", "1", "--workers", "0", "--device", "cpu",
                   "--", "--epochs", "2"])
    runs = [json.loads(f.read_text()) for f in run_files(tmp_path / "results")]
    assert sorted(r["method"] for r in runs) == ["hegraph-t", "tip", "zeroshot"] and len(ran(output)) == 3
    assert all(r["dataset"] == "imagenet" and set(r["shift"]) == set(report.SHIFT_DATASETS) for r in runs)
    cells = markdown_cells((tmp_path / "results" / "README.md").read_text())
    section = f"C. Domain generalisation ({VIT}, ImageNet K = 2 → shift sets)"
    t = next(r for r in runs if r["method"] == "hegraph-t")
    assert cells[(section, "`hegraph-t`", "-Sketch")] == f"{t['shift']['imagenet-sketch']['1']:.2f}"
    assert cells[(section, "paper: HeGraphAdapter(T)", "-A")] == "23.59"


def test_features_mode_sweeps_k_over_one_file_and_draws_the_tsne(tmp_path):
    from fewshot.testing.fixtures import synthetic_features
    feats = synthetic_features(tmp_path / "synthetic.pt", C=12, max_shots=4, seeds=(1, 2))
    argv = ["--features", str(feats), "--shots", "1", "4", "--methods", "zeroshot", "hegraph", "--seeds", "1", "2",
            "--results", str(tmp_path / "results"), "--device", "cpu", "--", "--epochs", "3"]
    output = main(argv)
    runs = [json.loads(f.read_text()) for f in run_files(tmp_path / "results")]
    assert len(ran(output)) == 4 and {(r["dataset"], r["shots"]) for r in runs} == {("synthetic", 1), ("synthetic", 4)}
    assert all(r["reproduce"]["key"]["features_sha256"] for r in runs)
    readme = (tmp_path / "results" / "README.md").read_text()
    assert "| method | synthetic |\n" in readme and "Average" not in readme    # one dataset: no average of it
    assert "t-SNE (Fig. 3): `hegraph` on synthetic, K = 4, seed 1" in readme   # from the 4-shot hegraph checkpoint
    with Image.open(tmp_path / "results" / "tsne.png") as png:
        assert png.width >= 600 and png.height >= 300
    # a checkpoint an older train.py wrote (no class names or text features) costs the t-SNE, not the report
    import torch
    model_file = next((tmp_path / "results" / "checkpoints").glob("*hegraph*4*/seed1.pt"))
    old = torch.load(model_file, weights_only=True)
    torch.save({k: old[k] for k in ("run", "seed", "state_dict", "model_config")}, model_file)
    report.write_report(tmp_path / "results")
    assert "t-SNE not redrawn: " in (tmp_path / "results" / "README.md").read_text()
    # another train.py flag is another configuration: new run files, none skipped
    assert "skipped 0 finished already, 4 to do" in main(argv + ["--lr", "0.01"])
    assert len(run_files(tmp_path / "results")) == 8


def fake_run(results, dataset, method, shots, seeds, backbone="RN50", shift=None, params=None):
    """A run file as the sweep writes it, with chosen numbers."""
    body = {"dataset": dataset, "method": method, "shots": shots, "backbone": backbone, "seeds": seeds,
            "test_accuracy": sum(seeds.values()) / len(seeds), "std": 0.0, "epoch_seconds": {s: 0.5 for s in seeds},
            "shift": shift or {}, "params": params,
            "reproduce": {"wall_seconds": 2.0, "device": "NVIDIA H200", "finished": "2026-01-01T00:00:00",
                          "key": {"train_args": []}}}
    path = Path(results, "runs", f"{dataset}_{method}_{shots}{'_shift' if shift else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))


def test_report_puts_the_paper_beside_ours_with_the_difference(tmp_path):
    """RN50 at 16 shots: the paper's rows, Δ = ours − paper, and methods train.py may gain later."""
    fake_run(tmp_path, "dtd", "hegraph", 16, {"1": 70.0, "2": 72.0}, params=1234)
    fake_run(tmp_path, "eurosat", "hegraph", 16, {"1": 80.0, "2": 82.0})
    fake_run(tmp_path, "dtd", "graphadapter", 16, {"1": 60.0, "2": 60.0})   # a baseline of the rewrite
    fake_run(tmp_path, "dtd", "hegraph", 4, {"1": 50.0, "2": 52.0})
    fake_run(tmp_path, "imagenet", "hegraph-t", 16, {"1": 66.0, "2": 67.0},
             shift={"imagenetv2": {"1": 57.0, "2": 57.0}, "imagenet-sketch": {"1": 35.0, "2": 36.0},
                    "imagenet-adversarial": {"1": 23.0, "2": 24.0}, "imagenet-rendition": {"1": 59.0, "2": 60.0}})
    report.write_report(tmp_path)
    cells = markdown_cells((tmp_path / "README.md").read_text())
    a16 = "K = 16"
    assert cells[(a16, "`hegraph`", "DTD")] == "71.00 ± 1.41"
    assert cells[(a16, "paper: HeGraphAdapter", "DTD")] == "69.15"
    assert cells[(a16, "paper: HeGraphAdapter", "Average")] == f"{(69.15 + 86.75) / 2:.2f}"  # over the same two
    assert (cells[(a16, "Δ `hegraph`", "DTD")] == "+1.85"
            and cells[(a16, "Δ `hegraph`", "Average")] == f"{76 - 77.95:+.2f}")
    assert cells[(a16, "Δ `graphadapter`", "DTD")] == "-7.90" and cells[(a16, "Δ `graphadapter`", "EuroSAT")] == ""
    assert cells[(a16, "paper: CoOp", "EuroSAT")] == "83.53"                          # no run of ours
    assert cells[(a16, "`graphadapter`", "Average")] == "–"                           # no eurosat run
    ablation = "B. Ablation (RN50, K = 16)"
    assert cells[(ablation, "full (`hegraph`)", "EuroSAT")] == "81.00 ± 1.41"
    assert cells[(ablation, "paper: HeGraphAdapter(T-N)", "DTD")] == "56.03"
    shift = "C. Domain generalisation (RN50, ImageNet K = 16 → shift sets)"
    assert cells[(shift, "`hegraph-t`", "ImageNet")] == "66.50 ± 0.71"
    assert cells[(shift, "paper: HeGraphAdapter(T)", "Average")] == "48.26"           # printed, 5 columns
    assert cells[(shift, "`hegraph-t`", "Average")] == report.fmt([(66 + 57 + 35 + 23 + 59) / 5,
                                                                    (67 + 57 + 36 + 24 + 60) / 5])
    assert cells[("Cost", "`hegraph`", "device")] == "NVIDIA H200"
    assert cells[("Cost", "`hegraph`", "tunable parameters")] == "1,234"
    assert "K = 4" in (tmp_path / "README.md").read_text()                           # no paper row, no note
    assert not (tmp_path / "tsne.png").exists()                                       # no checkpoint: said so


def test_a_folder_of_images_is_swept_by_its_name_and_its_images(tiny_vit_checkpoint, tmp_path):
    from fewshot.testing.fixtures import write_image_folder
    folder = write_image_folder(tmp_path / "my_images", {"red_panda": 10, "snow-leopard": 10})
    argv = sweep_argv(tmp_path, tiny_vit_checkpoint, tmp_path / "features", tmp_path / "results",
                      datasets=[str(folder)], methods=["zeroshot"], shots=[1], seeds=[1])
    [name] = ran(main(argv))
    assert name.startswith(f"my_images_{VIT}_zeroshot_1shot_")
    run = json.loads((tmp_path / "results" / "runs" / name).read_text())
    assert run["dataset"] == "my_images" and run["reproduce"]["key"]["dataset"] == "my_images"
    (folder / "red_panda" / "0.jpg").rename(folder / "red_panda" / "renamed.jpg")  # another split: another run
    output = main(argv)                                   # the features file grows by what the new split needs
    assert "the folder's split changed (1 images added, 1 removed)" in output
    [second] = ran(output)
    assert second != name and second.startswith(f"my_images_{VIT}_zeroshot_1shot_")


def test_bad_command_lines_fail_with_one_clear_line(capsys, tmp_path):
    def fails(*argv):
        with pytest.raises(SystemExit) as e:
            sweep.main(list(argv))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code != 0 and len(err) == 1 and err[0].startswith("error: "), err
        return err[0]

    assert "--shots is set by the sweep" in fails("--datasets", "dtd", "--", "--shots", "4")
    assert "--seeds is set by the sweep" in fails("--datasets", "dtd", "--", "--seeds=4")
    assert "nothing to run" in fails("--datasets")
    assert "invalid choice" in fails("--methods", "nope")
    assert "unrecognized arguments: --nope" in fails("--datasets", "dtd", "--root", str(tmp_path), "--", "--nope")
    assert str(tmp_path / "dtd") in fails("--datasets", "dtd", "--root", str(tmp_path), "--features-dir",
                                          str(tmp_path), "--results", str(tmp_path / "r"))
    assert "no run files" in fails("--report", "--results", str(tmp_path / "empty"))
    assert "imagenetv2 is a test-only set" in fails("--datasets", "imagenetv2")
    assert "unknown dataset 'widgets'" in fails("--datasets", "widgets")
    assert "pass --download" in fails("--datasets", "dtd", "--root", str(tmp_path), "--results", str(tmp_path / "r"))
    assert "does not exist" in fails("--features", str(tmp_path / "absent.pt"))
    (tmp_path / "text.pt").write_text("not a torch file")
    assert "not a readable features file" in fails("--features", str(tmp_path / "text.pt"))


@pytest.mark.parametrize("content, words", [
    ('{"dataset": "dtd", "backbone": "RN50", "method": "tip", "shots": "16", "seeds": {"1": 60.0}}',
     "its 'shots' is str, not int"),
    ('{"dataset": "dtd", "backbone": "RN50", "method": "tip", "shots": 16, "seeds": {"1": "60"}}',
     "its 'seeds' is not what a run file holds"),
    ('{"dataset": "dtd", "backbone": "RN50", "method": "tip", "shots": 16, "seeds": {"1": 60.0}, "shift": [1]}',
     "its 'shift' is not what a run file holds"),
    ("[1, 2, 3]", "a json list, not an object"),
    ("{not json", "is not a json file"),
])
def test_a_run_file_of_another_layout_is_named_in_one_line(tmp_path, capsys, content, words):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "old.json").write_text(content)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        report.main(["--results", str(tmp_path)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and words in err[0] and "move it out of" in err[0], err


def test_results_that_is_a_file_is_refused_before_the_sweep(tmp_path, capsys):
    (tmp_path / "results").write_text("a file")
    with pytest.raises(SystemExit):
        sweep.main(["--datasets", "dtd", "--root", str(tmp_path), "--results", str(tmp_path / "results")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--results" in err[0] and "is a file; give a folder" in err[0]
    assert (tmp_path / "results").read_text() == "a file"


def test_a_logged_sweep_has_one_line_per_run_and_no_progress_bars(tiny_vit_checkpoint, make_dataset, tmp_path,
                                                                  monkeypatch):
    """Redirected to a file, a sweep writes no progress bar: what happened, one line per run, and at a steady pace
    (here a fake clock: every reading 40 s on) the progress lines of its extraction, its runs' training and its own,
    passed through from the runs whose printed tables it keeps back."""
    seconds = iter(range(0, 10**6, 40))
    monkeypatch.setattr(progress, "clock", lambda: next(seconds))
    root = make_dataset("dtd")
    argv = sweep_argv(root, tiny_vit_checkpoint, tmp_path / "features", tmp_path / "results", datasets=["dtd"],
                      methods=["zeroshot", "tip-f"], shots=[1], seeds=[1], epochs=2)
    log = tmp_path / "sweep.log"
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):  # not a terminal
        sweep.main(argv)
    text = log.read_text()
    assert b"\r" not in log.read_bytes() and "%|" not in text, text[-2000:]     # no bar: no carriage return
    assert len([line for line in text.splitlines() if line.startswith("ran ")]) == 2
    for step in ("dtd train: ", "dtd test: ", "training seed 1: 1/2 epochs (50 %), ", "sweep: 1/2 runs (50 %), "):
        assert re.search(rf"^{re.escape(step)}.* (left|done in .*)", text, re.M), (step, text[-2000:])
    assert "test acc %" not in text                                          # the runs' tables are kept back


def test_a_run_whose_features_changed_is_run_again(tiny_vit_checkpoint, make_dataset, tmp_path, monkeypatch):
    """The run key holds the features' identity: a checkpoint replaced at its path, or an image changed under its
    name, makes the runs that read them new runs (their features are encoded again first), not skipped ones."""
    from fewshot.testing.fixtures import TINY_CLIPS, openai_state_dict, write_image
    monkeypatch.setattr(report, "write_report", lambda *args: "no report")   # other tests check the report
    root, checkpoint = make_dataset("dtd"), tmp_path / "clip.pt"
    checkpoint.write_bytes(tiny_vit_checkpoint.read_bytes())
    argv = sweep_argv(root, checkpoint, tmp_path / "features", tmp_path / "results", datasets=["dtd"],
                      methods=["zeroshot"], shots=[1], seeds=[1])
    [first] = ran(main(argv))
    assert "skipped 1 finished already" in main(argv)                        # nothing changed: skipped
    state = openai_state_dict(TINY_CLIPS["vit"])
    state["text_projection"] = -state["text_projection"]
    torch.save(state, checkpoint)                                             # other weights at the same path
    output = main(argv)
    assert f"the weights at {checkpoint} changed since the features were made" in output
    [second] = ran(output)
    assert second != first
    write_image(root / "dtd" / "images" / "class a_0" / "test_0.jpg", 99)      # a test image fixed
    output = main(argv)
    assert "1 image changed content since it was encoded (class a_0/test_0.jpg)" in output
    [third] = ran(output)
    assert third not in (first, second) and len(run_files(tmp_path / "results")) == 3


def fits(fig, artist):
    """True if an artist (a title) lies inside the figure, once drawn."""
    box, frame = artist.get_window_extent(fig.canvas.get_renderer()), fig.bbox
    return box.x0 >= frame.x0 - 1 and box.x1 <= frame.x1 + 1 and box.y1 <= frame.y1 + 1


@pytest.mark.parametrize("datasets", [["dtd", "eurosat"], ["dtd", "eurosat", "caltech101", "ucf101", "food101"]])
def test_fig2_keeps_its_panels_full_size_whatever_the_notes_say(datasets, tmp_path, drawn):
    """Seven methods whose curves coincide in every panel: the note naming them lies under the panels (the
    legend's title), never across them, so constrained layout lays every panel out at full size (a note across
    the panels collapsed them to strips: "constrained_layout not applied"); the title fits."""
    import warnings
    same = ("zeroshot", "tip", "tip-f", "taskres", "hegraph-t", "hegraph-tn", "hegraph-tp")
    runs_ = [{"method": m, "dataset": d, "backbone": "RN50", "shots": k,
              "seeds": {"1": 60.0 + (0 if m in same else k + i / 5), "2": 60.0 + (0 if m in same else k + i / 5)}}
             for d in datasets for i, m in enumerate(report.METHODS) for k in (1, 2, 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # "constrained_layout not applied" is a UserWarning
        report.plot_fewshot(runs_, "RN50", [], tmp_path / "fewshot.png")
        fig = drawn[0]
        fig.canvas.draw()
    panels = [ax for ax in fig.axes if ax.get_visible()]
    columns = min(4, len(panels))
    assert all(ax.get_position().width > 0.6 / columns for ax in panels)
    notes = fig.legends[0].get_title().get_text().replace("\n", " ")
    assert " = ".join(same) in notes and ("every panel" in notes or "(DTD)" in notes)
    assert not any("same curve" in t.get_text() for ax in panels for t in ax.texts)
    assert fits(fig, fig._suptitle) and "mean ± std over seeds" in fig._suptitle.get_text()
