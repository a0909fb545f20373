"""Shared test fixtures, built on disk by bench/fixtures.py: tiny random CLIP checkpoints, tiny datasets in
CoOp's layout, synthetic features files; and `run` / `fail`, train.py's command line in this process.

    def test_something(tiny_vit_checkpoint, make_dataset):
        root = make_dataset("dtd")                       # 3 classes, unequal counts
"""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # the scripts at the repository root, and bench/
from fixtures import synthetic_features, tiny_clip, write_dataset  # noqa: E402
import train  # noqa: E402

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
    """A ViT-style CLIP: 32 px input, 16 px patches, one layer, d = 32 (about 6 MB)."""
    return tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_vit.pt", "vit")


@pytest.fixture(scope="session")
def tiny_resnet_checkpoint(tmp_path_factory) -> Path:
    """A ResNet-style CLIP (ModifiedResNet, attention pool): 32 px input, width 16, d = 32 (about 7 MB)."""
    return tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_resnet.pt", "resnet")


@pytest.fixture(scope="session")
def make_dataset(tmp_path_factory):
    """Factory: make_dataset(key, num_classes=3, counts=None, subset=None) -> a fresh root folder."""
    def make(key: str, **kwargs) -> Path:
        return write_dataset(tmp_path_factory.mktemp(f"data_{key}"), key, **kwargs)
    return make


@pytest.fixture
def feats(tmp_path):
    """A synthetic features file: 10 Gaussian classes, d = 32, max-shots 4, seeds 1 2 3, with negatives."""
    return synthetic_features(tmp_path / "synthetic.pt")


@pytest.fixture
def run():
    """run(*argv): train.run on the command-line arguments; returns the results dict."""
    return lambda *argv: train.run(train.parse_args([*map(str, argv)]))


@pytest.fixture
def fail(capsys):
    """fail(*argv): train.main on bad arguments, which must exit non-zero with one 'error:' line; returns it."""
    def fail(*argv):
        capsys.readouterr()                                       # forget what earlier runs printed
        with pytest.raises(SystemExit) as e:
            train.main([*map(str, argv)])
        assert e.value.code != 0
        # what a terminal shows: a progress bar redraws its line after "\r" and is cleared when closed
        err = [shown for line in capsys.readouterr().err.split("\n") if (shown := line.split("\r")[-1].strip())]
        assert len(err) == 1 and err[0].startswith("error: "), err
        return err[0]
    return fail
