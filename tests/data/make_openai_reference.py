"""Made tests/data/openai_reference.json: features of two tiny random CLIPs in OpenAI's checkpoint format, as the
extraction of commit 2d1868d computed them with OpenAI's own code (clip-anytorch 2.6.0, `clip.load(PATH)`), before
the project moved to open_clip. tests/test_backbones.py rebuilds the same checkpoints and images and checks that
today's extraction gives the same rows (cosine >= 0.999).

It was run once, at that commit, in a venv with clip-anytorch (torch 2.14.1, torchvision 0.29.1, Pillow 13.0.0):

    python tests/data/make_openai_reference.py tests/data/openai_reference.json

Run with today's code it would record today's features, which proves nothing: keep the file it made.
The checkpoints come from bench/fixtures.py's openai_state_dict (no CLIP library: every tensor drawn from a
generator seeded by its key) and the images from write_dataset(root, "dtd"): 3 classes, random JPEGs. Kept: the
text features (positive and negative, 3 classes each), 4 test rows and 4 view-0 training rows (seed 1,
2 shots), each row with its image's path and the sha256 of its decoded pixels, rounded to 5 decimals.
"""
import hashlib
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
import features_file as ff  # noqa: E402
import fewshot_data as fd  # noqa: E402
from fixtures import TINY_CLIPS, openai_state_dict, state_dict_sha256, tiny_clip, write_dataset  # noqa: E402

import extract_features as ef  # noqa: E402

SETTINGS = dict(seeds=(1,), max_shots=2, views=2)  # view 0: the model's preprocessing; view 1: one augmented crop
ROWS = 4                                            # test and view-0 training rows kept per model


def pixels_sha256(path: Path) -> str:
    """sha256 of an image's decoded RGB pixels (not its bytes: a JPEG encoder may write other bytes)."""
    with Image.open(path) as image:
        return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def rows(t: torch.Tensor) -> list:
    return [[round(v, 5) for v in row] for row in t.float().tolist()]


def reference(tmp: Path) -> dict:
    root = write_dataset(tmp / "data", "dtd")
    images = fd.load_splits("dtd", root).images
    out = {"dataset": "write_dataset(root, 'dtd')", "settings": {**SETTINGS, "seeds": [1]}, "models": {}}
    for kind, arch in TINY_CLIPS.items():
        checkpoint = tiny_clip(tmp / f"{kind}.pt", kind)
        settings = ff.Settings("dtd", f"tiny-{kind}", clip_checkpoint=str(checkpoint), **SETTINGS)
        f = torch.load(ef.extract_features(settings, root, tmp / "features", workers=0, device="cpu"),
                       weights_only=True)
        split = lambda name, feats, f=f: {"paths": f["paths"][name][:ROWS], "rows": rows(feats[:ROWS]),
                                          "pixels_sha256": [pixels_sha256(images / p) for p in f["paths"][name][:ROWS]]}
        out["models"][kind] = {
            "arch": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(arch).items()},
            "state_dict_sha256": state_dict_sha256(openai_state_dict(arch)), "logit_scale": f["logit_scale"],
            "text": {"positive": rows(f["text"]["positive"]), "negative": rows(f["text"]["negative"]),
                     "sentences": f["prompts"]},
            "test": split("test", f["test"]["features"]), "train_view0": split("train", f["train"]["features"][0])}
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        text = json.dumps(reference(Path(tmp)), indent=1)
    text = re.sub(r"\[([-0-9.,\s]+)\]", lambda m: "[" + " ".join(m[1].split()) + "]", text)  # a row per line
    Path(sys.argv[1]).write_text(text + "\n") if len(sys.argv) > 1 else print(text)
