"""Shared test fixtures, built on disk by fewshot/testing/fixtures.py: tiny random CLIP checkpoints, tiny datasets
in CoOp's layout, synthetic features files; and `run` / `fail`, train.py's command line in this process.

    def test_something(tiny_vit_checkpoint, make_dataset):
        root = make_dataset("dtd")                       # 3 classes, unequal counts

This checkout's modules come first (pytest's pythonpath, pyproject.toml), here and in the commands the tests
run (PYTHONPATH below), whatever copy of the package is installed.
"""
import os
import shlex
from pathlib import Path

# no test downloads: open_clip would ask the Hugging Face hub (read when huggingface_hub is imported; also
# inherited by the commands the tests run)
os.environ["HF_HUB_OFFLINE"] = "1"
REPO = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])

import pytest  # noqa: E402  (after the environment is set)
import torch  # noqa: E402

from fewshot import cli, runs  # noqa: E402
from fewshot.features import load_features  # noqa: E402
from fewshot.testing.fixtures import (  # noqa: E402
    synthetic_features,
    tiny_clip,
    tiny_open_clip,
    write_dataset,
    write_image_folder,
)

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning OpenMP threads made a
# 32-px ResNet forward 100x slower (1 s instead of 10 ms).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _away_from_the_working_folder(tmp_path, monkeypatch):
    """Every test runs in its own empty folder, so that what a user left in theirs (features/, results/, a
    data/ folder) can change nothing: default paths resolve inside tmp_path."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_vit_checkpoint(tmp_path_factory) -> Path:
    """A ViT-style CLIP in OpenAI's format: 32 px input, 16 px patches, one layer, d = 32 (about 6 MB); its name,
    read from its weights, is ViT-l1-w64-p16-32px-d32."""
    return tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_vit.pt", "vit")


@pytest.fixture(scope="session")
def tiny_resnet_checkpoint(tmp_path_factory) -> Path:
    """A ResNet-style CLIP in OpenAI's format (ModifiedResNet, attention pool): 32 px input, width 16, d = 32
    (about 7 MB); its name is RN-l1.1.1.1-w16-32px-d32."""
    return tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_resnet.pt", "resnet")


@pytest.fixture(scope="session")
def tiny_open_clip_dir(tmp_path_factory) -> Path:
    """An open_clip-native CLIP folder (--backbone local-dir:FOLDER): 48 px input, d = 24, its own mean, std,
    resampling and resize mode, context length 32, logit scale 50 (about 6 MB)."""
    return tiny_open_clip(tmp_path_factory.mktemp("clip") / "tiny_openclip")


@pytest.fixture(scope="session")
def make_dataset(tmp_path_factory):
    """Factory: make_dataset(key, num_classes=3, counts=None, subset=None) -> a fresh root folder."""
    def make(key: str, **kwargs) -> Path:
        return write_dataset(tmp_path_factory.mktemp(f"data_{key}"), key, **kwargs)
    return make


def readme_command(start):
    """The arguments of the README's command line that starts with `start` (e.g. "python predict.py")."""
    line = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith(start))
    return shlex.split(line)[2:]


@pytest.fixture(name="readme_command")
def _readme_command():
    """readme_command(start): the arguments of the README's command line that starts with `start`."""
    return readme_command


@pytest.fixture(scope="session")
def own_model(tmp_path_factory, tiny_vit_checkpoint):
    """The README's own-images path on fixtures: in a folder `home`, its command `python train.py --dataset
    path/to/my_images --shots 4 --save models/my_images` as written, on 3 classes of 20 images with the tiny ViT
    (seeds 1 2, 5 epochs, 2 views), and `--eval-only --load models/my_images` on its features; then the dataset
    folder is moved to photos/ and the features file to kept.pt, so that predict.py finds neither. Returns a dict:
    home, models, photos, features (kept.pt), data (its dict), trained and evaluated (the two runs' results)."""
    home = tmp_path_factory.mktemp("own")
    argv = readme_command("python train.py --dataset path/to/my_images")
    folder = home / argv[argv.index("--dataset") + 1]
    write_image_folder(folder, {"red_panda": 20, "snow-leopard": 20, "tabby_cat": 20})
    tiny = ["--clip-checkpoint", str(tiny_vit_checkpoint), "--max-shots", "4", "--views", "2", "--seeds", "1", "2",
            "--epochs", "5", "--device", "cpu", "--workers", "0"]
    cwd = os.getcwd()
    os.chdir(home)
    try:
        trained = runs.run(cli.train_request([*argv, *tiny]))
        features = next((home / "features").glob("my_images_*.pt"))
        evaluated = runs.run(cli.train_request(["--features", str(features), "--eval-only", "--load",
                                                argv[argv.index("--save") + 1], "--seeds", "1", "2", "--device",
                                                "cpu"]))
    finally:
        os.chdir(cwd)
    folder.rename(home / "photos")
    features = features.rename(home / "kept.pt")
    return {"home": home, "models": home / argv[argv.index("--save") + 1], "photos": home / "photos",
            "features": features, "data": load_features(features), "trained": trained, "evaluated": evaluated}


@pytest.fixture
def feats(tmp_path):
    """A synthetic features file: 10 Gaussian classes, d = 32, max-shots 4, seeds 1 2 3, with negatives."""
    return synthetic_features(tmp_path / "synthetic.pt")


@pytest.fixture
def run():
    """run(*argv): train.py's run of the command-line arguments, in this process; returns the results dict."""
    return lambda *argv: runs.run(cli.train_request([*map(str, argv)]))


@pytest.fixture
def fail(capsys):
    """fail(*argv): train.py's command on bad arguments, which must exit non-zero with one 'error:' line; returns it."""
    def fail(*argv):
        capsys.readouterr()                                       # forget what earlier runs printed
        with pytest.raises(SystemExit) as e:
            cli.train_command([*map(str, argv)])
        assert e.value.code != 0
        # what a terminal shows: a progress bar redraws its line after "\r" and is cleared when closed
        err = [shown for line in capsys.readouterr().err.split("\n") if (shown := line.split("\r")[-1].strip())]
        assert len(err) == 1 and err[0].startswith("error: "), err
        return err[0]
    return fail


class Tripped(BaseException):
    """A call that must not happen happened (a BaseException: the commands' guarded() lets it through)."""


class Tripwire:
    """`owner.name` replaced by a call that must not happen: calling it fails the test. A tripwire only guards
    while the code still calls `owner.name`; proven(action) shows that it does, by running `action` (the same
    command on a valid input, or one that gets that far), which must trip it. Each tripwire must be proven."""

    def __init__(self, monkeypatch, owner, name, why):
        self.owner, self.name, self.why, self.fired, self.live = owner, name, why, 0, False
        monkeypatch.setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        self.fired += 1
        raise Tripped(f"{self.why} ({getattr(self.owner, '__name__', self.owner)}.{self.name} was called)")

    def proven(self, action):
        """Run action(), which must call the patched name: the tripwire is live, so its guard can fail."""
        fired = self.fired
        try:
            action()
        except Tripped:
            pass
        assert self.fired > fired, f"the tripwire on {self.name} never fired: the code no longer calls it there"
        self.live = True


@pytest.fixture
def tripwire(monkeypatch):
    """tripwire(owner, name, why): owner.name must not be called (else the test fails with `why`); prove each one
    live with .proven(action) in the same test, or the test fails."""
    wires = []

    def make(owner, name, why):
        wires.append(Tripwire(monkeypatch, owner, name, why))
        return wires[-1]
    yield make
    dead = [w.name for w in wires if not w.live]
    assert not dead, f"tripwires never proven live with .proven(): {dead}"


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plotting functions close, kept open to be measured: [figure]."""
    import matplotlib.pyplot as plt
    kept, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    yield kept
    for fig in kept:
        close(fig)
