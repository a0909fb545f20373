"""Checkpoints of train.py: --save DIR writes DIR/seed<N>.pt, --eval-only --load DIR reads them back.

A checkpoint holds the run's identity (method, K, flags' configuration, recipe, dataset, backbone, sizes),
the seed, the learned state_dict and the configuration the model held (after any --search-val). A folder
holds the seeds of one run only: another run's checkpoints are refused, or replaced with --overwrite.
"""
import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from fewshot.errors import DataError
from fewshot.files import load_torch_file, write_atomic
from fewshot.ranges import RANGES


def read_checkpoint(path):
    """A checkpoint written by --save, or one clear error."""
    ckpt = load_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or not {"run", "state_dict", "seed", "model_config"} <= set(ckpt):
        raise DataError(f"{path} is not a checkpoint written by train.py --save")
    return ckpt


def saved_config(configured, ckpt, folder):
    """The configuration a checkpoint's model was built with, as this code's config class; one clear error
    for a checkpoint of another version whose config has other fields: a field it lacks would silently take
    today's default (weight_scale changed from 1 to 0.1), not the value it was trained with."""
    fields, saved = {f.name for f in dataclasses.fields(configured)}, set(ckpt["model_config"])
    if saved != fields:
        differ = " and ".join(f"{what} {', '.join(sorted(names))}" for what, names in
                              (("lacks", fields - saved), ("has the unknown", saved - fields)) if names)
        raise DataError(f"the checkpoints in {folder} were written by another version of train.py: their model "
                        f"configuration {differ}; train again with --save {folder} --overwrite")
    bad = [k for k, v in ckpt["model_config"].items() if k in RANGES and not
           (isinstance(v, (int, float)) and not isinstance(v, bool) and RANGES[k].holds(v))]
    if bad:
        raise DataError(f"the checkpoints in {folder} hold {bad[0]} = {ckpt['model_config'][bad[0]]!r}, which must be "
                        f"{RANGES[bad[0]].describe()}; train again with --save {folder} --overwrite")
    return dataclasses.replace(configured, **ckpt["model_config"])


def classnames_sha256(classnames):
    """What a checkpoint records of its classes: two files of the same dataset and size may still differ."""
    return hashlib.sha256(json.dumps(list(classnames)).encode()).hexdigest()


def load_state(model, ckpt, path):
    """The checkpoint's parameters into the model, each finite and of the shape the model expects, or one line."""
    state = ckpt["state_dict"]
    bad = [k for k, t in state.items() if not isinstance(t, torch.Tensor) or
           (t.is_floating_point() and not torch.isfinite(t).all())]
    if bad:
        raise DataError(f"checkpoint {path}: {bad[0]} is not a tensor of finite numbers ({len(bad)} such); train "
                        f"again with --save --overwrite")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # missing or unexpected keys, or a shape the model does not have
        reason = " ".join(str(e).split("\n\t", 1)[-1].split())[:300]
        raise DataError(f"checkpoint {path} does not fit this {type(model).__name__}: {reason}") from None
    return model


def checkpoint_files(folder):
    return sorted(Path(folder).glob("seed*.pt"))


def other_runs(folder, run_id, overwrite):
    """--save never mixes runs: the seed files in `folder` of another method or configuration are refused,
    or with overwrite returned, to be removed once the first new checkpoint is written."""
    others = [p for p in checkpoint_files(folder) if read_checkpoint(p)["run"] != run_id]
    if others and not overwrite:
        theirs = read_checkpoint(others[0])["run"]
        raise DataError(f"{folder} holds checkpoints of another run ({theirs['method']}, {theirs['shots']} "
                        f"shots on {theirs['dataset']}, or another configuration), e.g. {others[0].name}; choose "
                        f"another --save folder or pass --overwrite to replace them")
    return others


def save_checkpoint(folder, seed, run_id, model, stale):
    """Write DIR/seed<N>.pt atomically; then remove the other run's files (`stale`) that --overwrite replaces."""
    ckpt = dict(run=run_id, seed=seed, state_dict=model.state_dict(),
                model_config=dataclasses.asdict(model.config))   # after --search-val: what the model holds
    target = Path(folder) / f"seed{seed}.pt"
    write_atomic(target, lambda f: torch.save(ckpt, f))
    for path in stale:
        if path != target:
            path.unlink(missing_ok=True)


def load_checkpoints(folder, seeds, data, method=None, shots=None, no_negatives=False):
    """--eval-only: the checkpoints of `seeds` in `folder`, which must all be of one run on these features.
    Returns them and the run's identity, whose method and K the run takes; a conflicting --method, --shots
    or --no-negatives is refused."""
    ckpts = {}
    for seed in seeds:
        path = Path(folder) / f"seed{seed}.pt"
        if not path.is_file():
            raise DataError(f"no checkpoint {path} for seed {seed}: train with --save {folder} first")
        ckpts[seed] = read_checkpoint(path)
    if len({json.dumps(c["run"], sort_keys=True) for c in ckpts.values()}) > 1:
        raise DataError(f"the checkpoints in {folder} are of different runs (method, shots or configuration "
                        f"differ between seeds); evaluate them separately")
    run_id = next(iter(ckpts.values()))["run"]
    if not isinstance(run_id, dict) or "classnames_sha256" not in run_id:
        raise DataError(f"the checkpoints in {folder} were written by another version of train.py (they do not "
                        f"record their classes); train again with --save {folder} --overwrite")
    if (run_id["dataset"], run_id["classnames_sha256"]) != (data["dataset"], classnames_sha256(data["classnames"])):
        raise DataError(f"the checkpoints in {folder} are of {run_id['dataset']!r} with other classes than the "
                        f"features of {data['dataset']!r}; evaluate them on the features they were trained on")
    C, d = data["text"]["positive"].shape
    if (run_id["backbone"], run_id["num_classes"], run_id["dim"]) != (data["backbone"], C, d):
        raise DataError(f"the checkpoints in {folder} are for backbone {run_id['backbone']} with "
                        f"{run_id['num_classes']} classes of size {run_id['dim']}, the features are "
                        f"{data['backbone']} with {C} classes of size {d}")
    for flag, given in (("method", method), ("shots", shots)):
        if given is not None and given != run_id[flag]:
            raise DataError(f"--{flag} {given} conflicts with the checkpoints in {folder}, which hold "
                            f"{flag} {run_id[flag]}; drop --{flag} to evaluate them")
    if no_negatives and not run_id["no_negatives"]:
        raise DataError(f"--no-negatives conflicts with the checkpoints in {folder}, trained with negatives")
    return ckpts, run_id
