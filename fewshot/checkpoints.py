"""Model files: train.py --save DIR writes DIR/seed<N>.pt, a model that stands alone; predict.py
(fewshot/classify.py) and train.py --eval-only --load DIR read them back.

A model file is one torch.save'd dict of plain tensors and containers, read with weights_only=True:

    format        "hegraphadapter-model-v1"
    seed          the few-shot seed it was trained on
    run           what makes seeds one run (and one folder): method, shots, no_negatives, dataset, backbone,
                  num_classes, dim, classnames_sha256, config, search_val, recipe
    model_config  the configuration the model held (after any --search-val)
    state_dict    the learned tensors
    classnames    [C] the class names
    text          {positive [C, d], negative [C, d] (absent when the model reads none)}  float32
    cache         {features [M, d] float32, labels [M]}: the few-shot images' cache keys
    logit_scale   CLIP's
    clip          {name, backbone, pretrained, clip_checkpoint, weights, preprocess, probe, prompts}: the CLIP that
                  encodes an image for it (as the features file named it and identified its weights by content),
                  its preprocessing (open_clip's configuration), the features it gave two fixed probe images
                  (extraction.probe_images) and the sentences of its text features; weights, preprocess and probe
                  are None for features files that do not record them
    features      {path, settings, text_set}: the features file it was trained on, its extraction settings and
                  the prompt set of it the model used (its sha256 and flags)

The model is rebuilt by its METHODS row's builder from these tensors (build_model), so that neither the features
file nor the dataset is read. A folder holds the seeds of one run only: another run's files are refused, or
replaced with --overwrite.
"""
import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path

import torch

from fewshot import cache
from fewshot.errors import DataError
from fewshot.files import load_torch_file, write_atomic
from fewshot.methods import METHODS, ROW_FIELDS, build
from fewshot.ranges import RANGES
from fewshot.tasks import Task

FORMAT = "hegraphadapter-model-v1"
SAME_FEATURES = 0.99  # a saved feature and the features file's are one image (or class) at this cosine or above


def seed_path(folder, seed) -> Path:
    return Path(folder) / f"seed{seed}.pt"


def checkpoint_files(folder):
    """The model files of a folder, by seed."""
    return sorted(Path(folder).glob("seed*.pt"), key=lambda p: (len(p.name), p.name))


def seed_of_name(path):
    """The seed a file's name says (seed12.pt -> 12), or None."""
    match = re.fullmatch(r"seed(\d+)\.pt", Path(path).name)
    return int(match[1]) if match else None


# ----------------------------------------------------------------------------- writing

def classnames_sha256(classnames):
    """What a model file records of its classes: two files of the same dataset and size may still differ."""
    return hashlib.sha256(json.dumps(list(classnames)).encode()).hexdigest()


def clip_identity(data):
    """The CLIP an image must be encoded with for a model trained on the features `data`: the features file's
    name of it, the settings that load it, its weights by content (the file's identity), its preprocessing, what
    it made of the probe images, the sentences its text features are made of, and the precision it encoded at."""
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    identity = data.get("identity") if isinstance(data.get("identity"), dict) else {}
    return {"name": data["backbone"], "backbone": settings.get("backbone"), "pretrained": settings.get("pretrained"),
            "clip_checkpoint": settings.get("clip_checkpoint"), "weights": identity.get("model"),
            "preprocess": data.get("preprocess"), "probe": data.get("probe"), "prompts": data.get("prompts"),
            "precision": cache.recorded_precision(data) or "fp32"}


def model_file(model, task, seed, run_id, data, features_path=None) -> dict:
    """Everything inference needs of one seed's trained model, as plain tensors and containers."""
    cpu = lambda t: t.detach().to("cpu", torch.float32).contiguous()
    text = {"positive": cpu(task.pos_text)} | ({"negative": cpu(task.neg_text)} if task.neg_text is not None else {})
    return {"format": FORMAT, "seed": seed, "run": run_id, "model_config": dataclasses.asdict(model.config),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "classnames": list(data["classnames"]), "text": text,
            "cache": {"features": cpu(task.cache_feats), "labels": task.cache_labels.detach().cpu().long()},
            "logit_scale": float(task.logit_scale), "clip": clip_identity(data),
            "features": {"path": str(Path(features_path).resolve()) if features_path else None,
                         "settings": data.get("settings") if isinstance(data.get("settings"), dict) else None,
                         "text_set": data.get("text_set")}}


def file_bytes(task, state):
    """About what model_file() of this task and state_dict takes on disk."""
    tensors = [task.pos_text, task.cache_feats, *([task.neg_text] if task.neg_text is not None else []),
               *state.values()]
    return sum(t.numel() * 4 for t in tensors) + task.cache_labels.numel() * 8


def other_runs(folder, run_id, overwrite):
    """--save never mixes runs: the seed files in `folder` of another method or configuration are refused,
    or with overwrite returned, to be removed once the first new file is written. A file this version cannot
    read (an older train.py's) counts as another run's."""
    def other(path):
        try:
            return read_model(path)["run"] != run_id
        except DataError:
            return True
    others = [p for p in checkpoint_files(folder) if other(p)]
    if others and not overwrite:
        try:
            theirs = read_model(others[0])["run"]
            what = f"{theirs['method']}, {theirs['shots']} shots on {theirs['dataset']}, or another configuration"
        except DataError:
            what = "a file this version of train.py does not read"
        raise DataError(f"{folder} holds the models of another run ({what}), e.g. {others[0].name}; choose another "
                        f"--save folder or pass --overwrite to replace them")
    return others


def save_model(folder, record, stale):
    """Write DIR/seed<N>.pt atomically; then remove the other run's files (`stale`) that --overwrite replaces."""
    target = seed_path(folder, record["seed"])
    write_atomic(target, lambda f: torch.save(record, f))
    for path in stale:
        if path != target:
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- reading and checking

AGAIN = "train the model again"  # what to do about a file that cannot be used (train.py says how: again_with)


def again_with(folder):
    """train.py's advice for its --save folder's files."""
    return f"train again with --save {folder} --overwrite"


def _changed(path, what, again=AGAIN):
    return DataError(f"model file {path}: {what}; it is not as train.py --save wrote it (changed since, or another "
                     f"version's): {again}")


def _float_tensor(t, shape, path, key, again):
    """A float tensor of `shape` (None: any size there), all finite, or one line naming `key`."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim != len(shape) or \
            any(s is not None and s != n for s, n in zip(shape, t.shape)) or 0 in t.shape:
        got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        want = " x ".join("n" if s is None else str(s) for s in shape)
        raise _changed(path, f"{key} must be a float tensor [{want}], and is {got}", again)
    if not torch.isfinite(t).all():
        raise _changed(path, f"{key} holds NaN or infinite numbers", again)
    return t


def check_model(m, path, again=AGAIN):
    """One DataError line naming the first entry of a model file that is not as train.py --save writes it."""
    if isinstance(m, dict) and m.get("format") != FORMAT:
        if "format" not in m and {"run", "state_dict", "seed", "model_config"} <= set(m):
            raise DataError(f"{path} is a checkpoint of an older train.py, before model files stood alone (it holds "
                            f"no class names, text features or cache): {again}")
        if "format" in m:
            raise DataError(f"{path} is a file of format {str(m['format'])[:60]!r}, not a model file of format "
                            f"{FORMAT!r} (another version, or another kind of file): {again}")
    if not isinstance(m, dict) or "format" not in m:
        raise DataError(f"{path} is not a model file written by train.py --save (it holds "
                        f"{type(m).__name__ if not isinstance(m, dict) else 'a dict without a format'})")
    kinds = {"seed": int, "run": dict, "model_config": dict, "state_dict": dict, "classnames": list, "text": dict,
             "cache": dict, "logit_scale": (int, float), "clip": dict, "features": dict}
    for key, kind in kinds.items():
        if key not in m:
            raise _changed(path, f"it lacks {key!r}", again)
        if not isinstance(m[key], kind) or isinstance(m[key], bool):
            raise _changed(path, f"its {key!r} is a {type(m[key]).__name__}, not a "
                                 f"{kind.__name__ if isinstance(kind, type) else 'number'}", again)
    run = m["run"]
    for key, kind in (("method", str), ("shots", int), ("no_negatives", bool), ("dataset", str), ("backbone", str),
                      ("num_classes", int), ("dim", int), ("classnames_sha256", str)):
        if not isinstance(run.get(key), kind) or (kind is int and isinstance(run.get(key), bool)):
            raise _changed(path, f"its run's {key!r} is {run.get(key)!r}, not a {kind.__name__}", again)
    if run["method"] not in METHODS:
        raise DataError(f"{path} holds a model of method {run['method'][:40]!r}, which this version of train.py does "
                        f"not have (it has {', '.join(METHODS)})")
    names = m["classnames"]
    if not names or not all(isinstance(n, str) for n in names) or classnames_sha256(names) != run["classnames_sha256"]:
        raise _changed(path, "its class names are not the ones its run records", again)
    C, d = len(names), run["dim"]
    if run["num_classes"] != C:
        raise _changed(path, f"it holds {C} class names and its run records {run['num_classes']} classes", again)
    _float_tensor(m["text"].get("positive"), (C, d), path, "text.positive", again)
    reads_negatives = bool(METHODS[run["method"]].negatives) and not run["no_negatives"]
    if reads_negatives != ("negative" in m["text"]):
        raise _changed(path, f"{run['method']} {'reads' if reads_negatives else 'has no'} negative text features, and "
                             f"the file {'lacks' if reads_negatives else 'holds'} them", again)
    if reads_negatives:
        _float_tensor(m["text"]["negative"], (C, d), path, "text.negative", again)
    keys = _float_tensor(m["cache"].get("features"), (None, d), path, "cache.features", again)
    labels = m["cache"].get("labels")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool or \
            labels.shape != keys.shape[:1] or labels.min() < 0 or labels.max() >= C:
        raise _changed(path, f"cache.labels must be {len(keys)} class indices below {C}", again)
    if not (math.isfinite(m["logit_scale"]) and m["logit_scale"] > 0):
        raise _changed(path, f"its logit_scale {m['logit_scale']!r} is not a finite number above 0", again)
    bad = [k for k, t in m["state_dict"].items() if not isinstance(k, str) or not isinstance(t, torch.Tensor)
           or (t.is_floating_point() and not torch.isfinite(t).all())]
    if bad:
        raise _changed(path, f"state_dict entry {str(bad[0])[:40]!r} is not a tensor of finite numbers ({len(bad)} "
                             f"such)", again)
    return m


def read_model(path, again=AGAIN):
    """A model file written by --save, checked entry by entry, or one clear line."""
    return check_model(load_torch_file(path, "model file"), path, again)


def saved_config(configured, ckpt, path, again=AGAIN):
    """The configuration a model file's model was built with, as this code's config class; one clear error for a
    file of another version whose config has other fields: a field it lacks would silently take today's default
    (weight_scale changed from 1 to 0.1), not the value it was trained with."""
    fields = {f.name: f for f in dataclasses.fields(configured)}
    saved = ckpt["model_config"]
    if set(saved) != set(fields):
        differ = " and ".join(f"{what} {', '.join(sorted(names))}" for what, names in
                              (("lacks", set(fields) - set(saved)), ("has the unknown", set(saved) - set(fields)))
                              if names)
        raise DataError(f"{path} was written by another version of train.py: its model configuration {differ}; "
                        f"{again}")
    for name, value in saved.items():
        kind = fields[name].type
        fits = (isinstance(value, bool) if kind is bool else isinstance(value, str) if kind is str else
                isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or
                                                                                      isinstance(value, int)))
        if not fits or (name in RANGES and not RANGES[name].holds(value)):
            allowed = RANGES[name].describe() if name in RANGES and fits else f"a {kind.__name__}"
            raise _changed(path, f"its model configuration holds {name} = {value!r}, which must be {allowed}", again)
        if name in ROW_FIELDS and value != getattr(configured, name):
            raise _changed(path, f"its {name} is {value!r}, and a {ckpt['run']['method']} model's is "
                                 f"{getattr(configured, name)!r}", again)
    return dataclasses.replace(configured, **saved)


def saved_task(ckpt, device, text_encoder=None) -> Task:
    """A Task of the saved tensors alone: what the METHODS row's builder reads (text features, cache, class names,
    logit scale). It has no training views beyond the cache keys, and no validation or test images.
    text_encoder: CLIP's frozen text encoder, for a row that runs it (coop), which its caller loads."""
    f32 = lambda t: t.to(device=device, dtype=torch.float32)
    keys = f32(ckpt["cache"]["features"])
    text = ckpt["text"]
    return Task(pos_text=f32(text["positive"]), neg_text=f32(text["negative"]) if "negative" in text else None,
                train_views=keys[None], train_labels=ckpt["cache"]["labels"].to(device, torch.long), cache_feats=keys,
                val=None, test=None, logit_scale=float(ckpt["logit_scale"]), classnames=list(ckpt["classnames"]),
                text_encoder=text_encoder)


def load_state(model, ckpt, path, again=AGAIN):
    """The saved parameters into the model, each of the shape the model expects, or one line."""
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:  # missing or unexpected keys, or a shape the model does not have
        reason = " ".join(str(e).split("\n\t", 1)[-1].split())[:300]
        raise DataError(f"model file {path} does not fit this {type(model).__name__}: {reason.rstrip('.')}; "
                        f"{again}") from None
    return model


def build_model(ckpt, path, device="cpu", again=AGAIN, text_encoder=None):
    """The saved model, rebuilt by its METHODS row's builder from the saved tensors, in eval mode on `device`.
    text_encoder: CLIP's frozen text encoder, which a row that runs it (coop) needs besides its file."""
    run = ckpt["run"]
    method = METHODS[run["method"]]
    config = saved_config(method.config(run["dataset"]), ckpt, path, again)
    try:
        model = build(method, saved_task(ckpt, device, text_encoder), config)
    except ValueError as e:      # the model's own checks of its inputs
        raise _changed(path, str(e), again) from None
    return load_state(model, ckpt, path, again).eval()


# ----------------------------------------------------------------------------- --eval-only --load DIR

def _seeds_text(seeds):
    return " ".join(map(str, seeds)) or "none"


def load_checkpoints(folder, seeds, data, method=None, shots=None, no_negatives=False):
    """--eval-only: the model files of `seeds` in `folder`, which must all be of one run on these features.
    Returns them and the run's identity, whose method and K the run takes; a conflicting --method, --shots
    or --no-negatives is refused, and so is a file whose recorded seed is not its name's."""
    folder = Path(folder)
    if folder.is_file():
        seed = seed_of_name(folder)
        hint = f" --seeds {seed}" if seed is not None else ""
        raise DataError(f"--load {folder} is a file; --load takes the folder that --save wrote: pass --load "
                        f"{folder.parent}{hint}")
    if not folder.is_dir():
        raise DataError(f"--load {folder}: no such folder; train with --save {folder} first")
    present = sorted(s for s in map(seed_of_name, checkpoint_files(folder)) if s is not None)
    missing = [s for s in seeds if s not in present]
    if missing:
        if not present:
            raise DataError(f"--load {folder} holds no model file (seed<N>.pt); train with --save {folder} first")
        raise DataError(f"--load {folder} holds no model of seed {missing[0]} (it holds seeds {_seeds_text(present)}): "
                        f"pass --seeds {_seeds_text(present)}, or train seed {missing[0]} with --save {folder}")
    ckpts = {}
    for seed in seeds:
        path = seed_path(folder, seed)
        ckpts[seed] = read_model(path, again_with(folder))
        if ckpts[seed]["seed"] != seed:
            raise DataError(f"{path} holds the model of seed {ckpts[seed]['seed']}, not of seed {seed} (a renamed "
                            f"file?): name it seed{ckpts[seed]['seed']}.pt, or train seed {seed} with --save {folder}")
    if len({json.dumps(c["run"], sort_keys=True) for c in ckpts.values()}) > 1:
        raise DataError(f"the models in {folder} are of different runs (method, shots or configuration differ "
                        f"between seeds); evaluate them separately")
    run_id = next(iter(ckpts.values()))["run"]
    if (run_id["dataset"], run_id["classnames_sha256"]) != (data["dataset"], classnames_sha256(data["classnames"])):
        raise DataError(f"the models in {folder} are of {run_id['dataset']!r} with other classes than the features "
                        f"of {data['dataset']!r}; evaluate them on the features they were trained on")
    C, d = data["text"]["positive"].shape
    if (run_id["backbone"], run_id["num_classes"], run_id["dim"]) != (data["backbone"], C, d):
        raise DataError(f"the models in {folder} are for backbone {run_id['backbone']} with {run_id['num_classes']} "
                        f"classes of size {run_id['dim']}, the features are {data['backbone']} with {C} classes of "
                        f"size {d}; evaluate them on the features they were trained on")
    for flag, given in (("method", method), ("shots", shots)):
        if given is not None and given != run_id[flag]:
            raise DataError(f"--{flag} {given} conflicts with the models in {folder}, which are {flag} "
                            f"{run_id[flag]}; drop --{flag} to evaluate them")
    if no_negatives and not run_id["no_negatives"] and METHODS[run_id["method"]].negatives:
        raise DataError(f"--no-negatives conflicts with the models in {folder}, trained with negative text features "
                        f"(which they carry); drop --no-negatives to evaluate them as trained")
    return ckpts, run_id


def prompt_set(ckpt):
    """The sha256 of the prompt set the model was trained with (a key of a features file's texts), or None."""
    text_set = ckpt["features"].get("text_set")
    return text_set.get("sha256") if isinstance(text_set, dict) else None


def compare_negatives(ckpt, data):
    """Whether evaluation compares the model's negative text features with the features file's: when both have
    them (a file without them can still evaluate a model that carries its own)."""
    return "negative" in ckpt["text"] and "negative" in data["text"]


def check_trained_on(ckpt, task, path, features):
    """The model at `path` was trained on these features (its seed's few-shot images are the task's, its text
    features the file's), so that its test images are the ones it never saw; else one line naming both."""
    def differ(saved, there):
        there = there.to("cpu", torch.float32)
        return saved.shape != there.shape or bool((torch.nn.functional.cosine_similarity(saved, there, dim=-1)
                                                   < SAME_FEATURES).any())
    seed = ckpt["seed"]
    labels = task.cache_labels.cpu()
    if ckpt["cache"]["labels"].shape != labels.shape or not torch.equal(ckpt["cache"]["labels"], labels) or \
            differ(ckpt["cache"]["features"], task.cache_feats):
        raise DataError(f"{path} was trained on other images than seed {seed}'s few-shot images in {features} (its "
                        f"cache keys differ), so its test images there may include its own training images: evaluate "
                        f"it on the features it was trained on ({ckpt['features']['path'] or 'not recorded'})")
    for kind, there in (("positive", task.pos_text), ("negative", task.neg_text)):
        if there is not None and differ(ckpt["text"][kind], there):
            raise DataError(f"{path} was trained with other {kind} text features than those of {features} (other "
                            f"prompts or another CLIP): evaluate it on the features it was trained on "
                            f"({ckpt['features']['path'] or 'not recorded'})")
