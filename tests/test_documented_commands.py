"""Every command of README's "Reproducing the paper" and of docs/reproduce.md runs as written, in this process
(fewshot.sweep.main, fewshot.report.main), from a working folder holding a tiny data/ of every dataset: the
commands are read from the pages, so a command added or changed there is run here. Only what sets the size is
added where a command leaves it at its default (one K, one seed, two methods, one view, one epoch), and the
CLIP is a tiny one whatever --backbone names; CuPL's files are served from 127.0.0.1 under their pinned sha256.
The figures are only counted here (their drawing is tests/test_reproduce.py's), which keeps this module fast."""
import contextlib
import hashlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from test_download import Server

from fewshot import backbones, prompts, report, sweep
from fewshot.datasets import DATASETS, SHIFT_DATASETS
from fewshot.features import Settings
from fewshot.testing.fixtures import write_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = {"--shots": ["1"], "--methods": ["zeroshot", "hegraph"], "--seeds": ["1"], "--views": ["1"],
        "--workers": ["0"], "--device": ["cpu"]}


def commands(text: str) -> list[str]:
    """The bench commands of a page's bash blocks: continued lines joined, comments, environment variables and
    a trailing & dropped."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#.*$", "", line).strip().rstrip("&").strip()
            line = re.sub(r"^(\w+=\S+\s+)+", "", line)
            if line.startswith(("python bench/reproduce.py", "python bench/report.py")):
                found.append(line)
    return found


README = (REPO / "README.md").read_text()
SECTION = README[README.index("## Reproducing the paper"):]
SECTION = SECTION[:SECTION.index("\n## ", 3)]
DOCUMENTED = list(dict.fromkeys(commands(SECTION) + commands((REPO / "docs" / "reproduce.md").read_text())))


def sized(argv: list[str]) -> list[str]:
    """The command's flags, with TINY's where it gives none, and one epoch for every run."""
    given = {a.split("=")[0] for a in argv}
    added = [x for flag, values in TINY.items() if flag not in given for x in (flag, *values)]
    return argv + added + ["--", "--epochs", "1"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_vit_checkpoint):
    """A working folder with data/ (every dataset, 3 classes), CuPL's files on a local server and ImageNet's
    CuPL file by hand, the tiny CLIP for any --backbone; the commands run in it in the pages' order."""
    tmp = tmp_path_factory.mktemp("documented")
    for key in DATASETS:
        write_dataset(tmp / "data", key, subset=[0, 2] if key in SHIFT_DATASETS else None)
    names = [f"Class {chr(97 + c)} {c}" for c in range(3)]                 # CuPL's spelling of "class a_0"
    cupl = json.dumps({n: [f"a photo that shows {n.lower()}."] for n in names}).encode()
    (tmp / "CuPL_prompts_imagenet.json").write_bytes(cupl)
    server = Server()
    encoder = backbones.load(backbones.resolve(Settings("dtd", clip_checkpoint=str(tiny_vit_checkpoint))),
                             torch.device("cpu"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp / "cache"))
        pinned = {d: (f"{server.url}/CuPL_{d}.json", hashlib.sha256(cupl).hexdigest()) for d in prompts.CUPL_PROMPTS}
        server.files.update({f"/CuPL_{d}.json": cupl for d in pinned})
        patch.setattr(prompts, "CUPL_PROMPTS", pinned)
        patch.setattr(sweep, "CUPL_PROMPTS", pinned)
        patch.setattr(backbones, "load", lambda settings, device: encoder)   # RN50 is not here: a tiny CLIP
        drawn = tmp / "drawn.txt"
        patch.setattr(report, "plot_fewshot", lambda runs, backbone, paper, path: drawn.open("a").write(f"{path}\n"))
        patch.setattr(report, "plot_tsne", lambda *args, **kwargs: drawn.open("a").write("tsne\n"))
        yield tmp
    server.close()


def run_command(line: str) -> str:
    """The command, in this process; what it printed. A failure (one error line, a crash) fails the test."""
    script, *argv = shlex.split(line)[1:]
    main = {"bench/reproduce.py": lambda: sweep.main(sized(argv)), "bench/report.py": lambda: report.main(argv)}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main[script]()
    return out.getvalue()


def test_the_pages_show_the_commands_this_module_runs():
    assert len(DOCUMENTED) >= 8 and any("--prompts cupl" in c for c in DOCUMENTED)
    assert any("--shift" in c for c in DOCUMENTED) and any("bench/report.py" in c for c in DOCUMENTED)


@pytest.mark.parametrize("line", DOCUMENTED)
def test_every_documented_command_runs_as_written(workdir, line, monkeypatch):
    monkeypatch.chdir(workdir)
    output = run_command(line)
    assert "wrote" in output, output[-2000:]
    argv = shlex.split(line)
    results = Path(argv[argv.index("--results") + 1]) if "--results" in argv else Path("results")
    assert (workdir / results / "README.md").is_file()
    assert f"{results / 'fewshot.png'}" in (workdir / "drawn.txt").read_text()
    if "--prompts" in argv:  # the features hold the prompts asked for
        features = Path(argv[argv.index("--features-dir") + 1])
        after = argv[argv.index("--datasets") + 1:]
        datasets = after[:next((i for i, a in enumerate(after) if a.startswith("-")), len(after))]
        for dataset in datasets[:2]:
            f = torch.load(workdir / features / f"{dataset}_RN50.pt", weights_only=True)
            assert f["prompts"]["positive"][0][0].startswith("a photo that shows class a 0") or \
                len(f["prompts"]["positive"][0]) == 7, f["prompts"]["positive"][0]


def test_a_cupl_sweep_refuses_an_unpinned_dataset_before_any_run(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    with pytest.raises(SystemExit):
        sweep.main(sized(["--root", "data", "--results", "results/refused", "--prompts", "cupl", "--features-dir",
                          "features/refused", "--datasets", "dtd", "imagenet"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--prompts cupl: no CuPL descriptions are pinned for imagenet" in err[0], err
    assert not (workdir / "results" / "refused" / "runs").exists()
