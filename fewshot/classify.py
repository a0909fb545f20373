"""Classify new images with the models train.py --save wrote: predict.py's command, and the same from Python.

    from fewshot.classify import load_classifier
    classifier = load_classifier("models/my_images")      # every seed of the folder, ensembled
    probs = classifier.predict(["photo.jpg"])               # [n, C] probabilities (paths or PIL images)
    probs = classifier.predict_features(feats)              # [n, C] from CLIP features [n, d] (no CLIP is loaded)

The model files hold all a model needs (checkpoints.py), so neither the features file nor the dataset is read.
An image is encoded as evaluation encodes a test image: the model's own CLIP (the backbone, weights or
checkpoint the features file named; --clip-checkpoint when that file lies elsewhere now), its recorded
preprocessing (view 0), L2-normalised and stored as float16, as in a features file. Before any image is
encoded, the CLIP is checked to be the model's by what it computes: two fixed probe images must encode into the
features the extraction recorded, and some classes' prompts into the model's text features. Several seeds are
ensembled by the mean of their probabilities.
"""
import csv
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fewshot import backbones, checkpoints, coop, files, pace
from fewshot.cli import Parser, guarded, number_arg, path_arg
from fewshot.datasets import IMAGE_SUFFIXES
from fewshot.devices import resolve_device
from fewshot.errors import DataError
from fewshot.extraction import encode_probe, encode_text, to_rgb
from fewshot.features import Settings
from fewshot.methods import METHODS

CHECKED_CLASSES = 8   # classes whose prompts are encoded again to check that the CLIP is the model's


# ----------------------------------------------------------------------------- the models of a folder

def model_files(model, seed=None):
    """{seed: (path, model file)} of a --save folder (or of one seed<N>.pt file), all of one run; one line
    otherwise."""
    model = Path(model)
    if model.is_file():
        paths = [model]
    elif model.is_dir():
        paths = [p for p in checkpoints.checkpoint_files(model) if checkpoints.seed_of_name(p) is not None]
        if not paths:
            raise DataError(f"--model {model} holds no model file (seed<N>.pt): give the folder that train.py --save "
                            f"wrote")
    else:
        raise DataError(f"--model {model}: no such file or folder; give the folder that train.py --save wrote")
    found = {}
    for path in paths:
        record = checkpoints.read_model(path)
        named = checkpoints.seed_of_name(path)
        if named is not None and named != record["seed"]:
            raise DataError(f"{path} holds the model of seed {record['seed']}, not of seed {named} (a renamed file?): "
                            f"name it seed{record['seed']}.pt")
        found[record["seed"]] = (path, record)
    if seed is not None:
        if seed not in found:
            raise DataError(f"--seed {seed}: {model} holds the models of seeds {' '.join(map(str, sorted(found)))}; "
                            f"pass one of those, or drop --seed to ensemble them")
        found = {seed: found[seed]}
    if len({json.dumps(record["run"], sort_keys=True) for _, record in found.values()}) > 1:
        raise DataError(f"{model} holds the models of different runs (method, shots or configuration differ between "
                        f"seeds): pick one with --seed")
    return dict(sorted(found.items()))


@dataclass
class Classifier:
    """The models of one run (one per seed), ensembled; the CLIP that encodes images for them, loaded on first use."""
    models: dict                         # seed -> the model, in eval mode on `device`
    records: dict                        # seed -> its model file's dict
    where: Path                          # the folder (or file) the models were read from
    device: torch.device
    clip_checkpoint: Path | None = None  # a copy of the model's CLIP checkpoint, used instead of the recorded path
    _encoder: object = field(default=None, repr=False)

    @property
    def first(self) -> dict:
        return next(iter(self.records.values()))

    @property
    def classnames(self) -> list:
        return self.first["classnames"]

    @property
    def precision(self) -> str:
        """The precision the model's features were encoded at, which a new image is encoded at too."""
        return self.first["clip"].get("precision", "fp32")

    @property
    def seeds(self) -> list:
        return list(self.models)

    @torch.no_grad()
    def predict_features(self, feats, batch_size=4096) -> torch.Tensor:
        """[n, C] class probabilities of CLIP image features [n, d] (as a features file holds them): each seed's
        softmax of its logits, averaged over the seeds."""
        feats = torch.as_tensor(feats)
        d = self.first["run"]["dim"]
        if feats.ndim != 2 or feats.shape[1] != d:
            raise DataError(f"the models in {self.where} classify features [n, {d}], not {list(feats.shape)}")
        out = []
        for chunk in feats.split(batch_size):
            chunk = chunk.to(self.device, torch.float32)
            out.append(torch.stack([m(chunk).softmax(-1) for m in self.models.values()]).mean(0).cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.classnames))

    def predict(self, images, batch_size=64) -> torch.Tensor:
        """[n, C] class probabilities of images (paths or PIL images); one DataError naming those that cannot be
        read."""
        feats, problems = self.encode(list(images), batch_size)
        if problems:
            raise DataError(f"{len(problems)} of {len(feats)} images cannot be read: {'; '.join(problems[:3])}")
        return self.predict_features(torch.stack(feats) if feats else torch.zeros(0, self.first["run"]["dim"]))

    # ------------------------------------------------------------------------- the CLIP

    def encoder(self) -> backbones.Encoder:
        """The model's CLIP, loaded once, and checked to be the model's."""
        if self._encoder is None:
            self._encoder = load_clip(self.first, self.where, self.device, self.clip_checkpoint)
        return self._encoder

    def encode(self, images, batch_size=64, workers=0, bar=False):
        """CLIP features of images (paths or PIL images), as the features file stores a test image's: a list with a
        [d] tensor per image (None where it cannot be read), and a line for each that cannot."""
        encoder = self.encoder()
        recorded = self.first["clip"].get("preprocess")
        transform = backbones.eval_transform(recorded) if recorded else encoder.transform
        loader = DataLoader(Images(images, transform, encoder.preprocess.size), batch_size=batch_size,
                            num_workers=workers, collate_fn=as_list)
        feats, problems = [None] * len(images), []
        with torch.no_grad(), tqdm(total=len(images), unit="img", disable=None if bar else True) as progress:
            for batch in loader:
                good = [(i, x) for i, x, error in batch if not error]
                problems += [error for _, _, error in batch if error]
                if good:
                    x = torch.stack([x for _, x in good])
                    f = pace.image_features(encoder, x, self.precision, self.device)
                    f = F.normalize(f, dim=-1).half().float().cpu()             # [B, d] as a features file's
                    for (i, _), row in zip(good, f):
                        feats[i] = row
                progress.update(len(batch))
        return feats, problems


def load_clip(record, where, device, clip_checkpoint=None) -> backbones.Encoder:
    """The CLIP a model file names (or the copy of its checkpoint at clip_checkpoint), loaded and checked to be
    the one its features came from: it must give the model's feature size, encode the two probe images into the
    features the extraction recorded (the image tower and the preprocessing) and some classes' prompts into the
    model's text features (the text tower); one line otherwise."""
    clip = record["clip"]
    if not clip.get("backbone") and not clip.get("clip_checkpoint") and clip_checkpoint is None:
        raise DataError(f"the model in {where} was trained on features that do not say which CLIP made them "
                        f"({clip.get('name')!r}): it classifies CLIP features from Python "
                        f"(fewshot.classify.load_classifier(...).predict_features), not images")
    checkpoint = clip_checkpoint or clip.get("clip_checkpoint")
    if checkpoint and not Path(checkpoint).is_file():
        raise DataError(f"the model in {where} was trained on the features of the CLIP checkpoint {checkpoint}, which "
                        f"is not there: pass --clip-checkpoint with a copy of it")
    settings = Settings(dataset="", backbone=clip.get("backbone"), pretrained=None if checkpoint else
                        clip.get("pretrained"), clip_checkpoint=str(checkpoint) if checkpoint else None)
    encoder = backbones.load(settings, device)
    shown = f"--clip-checkpoint {checkpoint}" if checkpoint else f"CLIP {clip.get('name')}"
    advice = f"pass the CLIP its features were extracted with ({clip.get('name')})"
    text = record["text"]["positive"]                                                 # [C, d]
    with torch.no_grad():
        d = encoder.model.encode_text(encoder.tokenize(["a photo."]).to(device)).shape[-1]
    if d != text.shape[1]:
        raise DataError(f"{shown} encodes features of size {d}, and the model in {where} was trained on features of "
                        f"size {text.shape[1]}: {advice}")
    probe = clip.get("probe")
    if isinstance(probe, torch.Tensor) and probe.shape == (2, d):
        transform = backbones.eval_transform(clip["preprocess"]) if clip.get("preprocess") else None
        cosine = F.cosine_similarity(encode_probe(encoder, device, transform, clip.get("precision", "fp32")).float(),
                                     probe.float(), dim=-1)
        if (cosine < checkpoints.SAME_FEATURES).any():
            raise DataError(f"{shown} is not the CLIP the model in {where} was trained with: it encodes a fixed probe "
                            f"image into other features than the extraction did (cosine {cosine.min():.3f}); {advice}")
    prompts = (clip.get("prompts") or {}).get("positive") or []
    if len(prompts) == len(text):
        picked = sorted({round(i * (len(text) - 1) / max(1, CHECKED_CLASSES - 1)) for i in range(CHECKED_CLASSES)})
        again = encode_text(encoder, [prompts[c] for c in picked], pace.Pace(clip.get("precision", "fp32")),
                            device).float()                                                 # [k, d]
        cosine = F.cosine_similarity(again, text[picked], dim=-1)
        if (cosine < checkpoints.SAME_FEATURES).any():
            worst = int(cosine.argmin())
            raise DataError(f"{shown} is not the CLIP the model in {where} was trained with: it encodes the prompts of "
                            f"class {record['classnames'][picked[worst]]!r} into other text features (cosine "
                            f"{cosine[worst]:.3f} with the model's); {advice}")
    return encoder


def load_classifier(model, seed=None, device=None, clip_checkpoint=None) -> Classifier:
    """The models in `model` (a train.py --save folder, or one of its seed<N>.pt files): all its seeds, ensembled,
    or the one `seed`. device: default cuda if available, else cpu. clip_checkpoint: a copy of the CLIP checkpoint
    the model's features were extracted with, when it is no longer where the model file says."""
    device = resolve_device(device)
    found = model_files(model, seed)
    records = {s: record for s, (_, record) in found.items()}
    classifier = Classifier({}, records, Path(model), device, Path(clip_checkpoint) if clip_checkpoint else None)
    text_encoder = None
    if METHODS[classifier.first["run"]["method"]].text_encoder:   # coop: its classes' features need CLIP's text tower
        encoder = classifier.encoder()
        text_encoder = coop.TextEncoder(encoder.model, encoder.tokenize, classifier.first["clip"]["name"])
    classifier.models = {s: checkpoints.build_model(record, path, device, text_encoder=text_encoder)
                         for s, (path, record) in found.items()}
    return classifier


def as_list(batch):
    return batch


class Images(Dataset):
    """Images (paths or PIL images) -> (index, [3, H, W], "" or why it cannot be read)."""

    def __init__(self, images, transform, size):
        self.images, self.transform, self.size = images, transform, size

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        item = self.images[i]
        try:
            if isinstance(item, Image.Image):
                image = to_rgb(item)
            else:
                if not Path(item).is_file():   # a folder, a pipe or a device would not be an image (or would block)
                    raise OSError("no such file" if not Path(item).exists() else "not a regular file")
                with Image.open(item) as f:
                    image = to_rgb(f)
            return i, self.transform(image), ""
        except (OSError, ValueError) as e:
            return i, torch.zeros(3, *self.size), f"{item} ({e})"


# ----------------------------------------------------------------------------- predict.py

def image_paths(given) -> list:
    """The images to classify: each file as given, and every image under each folder (sorted, hidden ones left
    out), each once."""
    found = []
    for path in map(Path, given):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        else:
            found.append(path)
    return list(dict.fromkeys(found))


def top_k(probs, classnames, k):
    """[(class name, probability)] of the k most probable classes of each row."""
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [[(classnames[j], p) for p, j in zip(vs.tolist(), js.tolist())] for vs, js in zip(values, indices)]


def predictions_csv(rows, k) -> bytes:
    """image, class_1, probability_1, ..., class_k, probability_k."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["image"] + [f"{what}_{i}" for i in range(1, k + 1) for what in ("class", "probability")])
    for image, top in rows:
        writer.writerow([image] + [x for name, p in top for x in (name, f"{p:.6f}")])
    return text.getvalue().encode()


def predictions_json(rows, problems, classifier) -> bytes:
    run = classifier.first["run"]
    return json.dumps({"model": str(classifier.where), "method": run["method"], "shots": run["shots"],
                       "dataset": run["dataset"], "backbone": run["backbone"], "seeds": classifier.seeds,
                       "predictions": [{"image": image, "top": [{"class": n, "probability": p} for n, p in top]}
                                       for image, top in rows],
                       "unreadable": problems}, indent=1).encode()


def predict_parser() -> Parser:
    p = Parser(prog="predict.py", description="Classify images with the models train.py --save wrote (several seeds "
               "in the folder are ensembled: the mean of their probabilities).")
    p.add_argument("--model", required=True, type=path_arg, help="the folder train.py --save wrote (or one of its "
                   "seed<N>.pt files)")
    p.add_argument("images", nargs="+", type=path_arg, metavar="IMAGE_OR_FOLDER",
                   help="images, or folders whose images (all of them, in subfolders too) are classified")
    p.add_argument("--top-k", type=number_arg("top_k", int), default=5, help="classes shown per image (default 5)")
    p.add_argument("--out", type=path_arg, help="also write the predictions to this .csv or .json file")
    p.add_argument("--seed", type=number_arg("seeds", int), help="use the model of this seed only (default: every "
                   "seed in the folder, ensembled)")
    p.add_argument("--clip-checkpoint", type=path_arg, help="a copy of the CLIP checkpoint the model's features were "
                   "extracted with, when it is no longer at the path the model file records")
    p.add_argument("--batch-size", type=number_arg("encode_batch_size", int), default=64,
                   help="images per CLIP forward pass (default 64)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    return p


def predict(args):
    """predict.py: classify the images, print a line per image, write --out; returns [(image, top-k)]."""
    if args.out and args.out.suffix.lower() not in (".csv", ".json"):
        raise DataError(f"--out {args.out}: give a .csv or .json file")
    paths = image_paths(args.images)
    if not paths:
        raise DataError(f"no image in {' '.join(map(str, args.images))} (a folder's images end in "
                        f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    inputs = {"the --model folder": args.model, "the --clip-checkpoint": args.clip_checkpoint,
              **{f"the image {p}": p for p in args.images}}
    if args.out:
        files.check_output("--out", args.out, inputs)
    classifier = load_classifier(args.model, args.seed, args.device, args.clip_checkpoint)
    workers = 0 if len(paths) < 256 else min(8, os.cpu_count() or 1)
    feats, problems = classifier.encode([str(p) for p in paths], args.batch_size, workers, bar=True)
    read = [(str(p), f) for p, f in zip(paths, feats) if f is not None]
    if not read:
        raise DataError(f"none of the {len(paths)} images could be read: {'; '.join(problems[:3])}")
    for line in problems:
        print(f"skipped {line}", file=sys.stderr, flush=True)
    probs = classifier.predict_features(torch.stack([f for _, f in read]))
    rows = [(image, top) for (image, _), top in zip(read, top_k(probs, classifier.classnames, args.top_k))]
    for image, top in rows:
        print(f"{image}  " + ", ".join(f"{name} {100 * p:.1f} %" for name, p in top))
    if args.out:
        content = predictions_csv(rows, min(args.top_k, len(classifier.classnames))) \
            if args.out.suffix.lower() == ".csv" else predictions_json(rows, problems, classifier)
        files.write_atomic(args.out, lambda f: f.write(content))
        print(f"wrote {args.out}")
    return rows


def predict_command(argv=None):
    """predict.py: parse the flags and classify."""
    args = predict_parser().parse_args(argv)
    return guarded("predict.py", lambda: predict(args))
