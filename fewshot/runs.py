"""One train.py run, planned from plain values (a RunRequest; the command line is one way to fill it): load
the features, plan the run, then for each seed build the K-shot task, build the model, train it (or search its
knobs on the validation subset, or load it from a checkpoint), evaluate it, and record.

The number reported is the test accuracy after the last epoch, as mean and standard deviation (n - 1) over the
seeds. Every method is one row of methods.METHODS.
"""
import contextlib
import dataclasses
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewshot import checkpoints, coop, files, perclass, training
from fewshot.datasets import dataset_folder, dataset_name
from fewshot.devices import deterministic, resolve_device
from fewshot.errors import DataError
from fewshot.extraction import Extraction
from fewshot.features import identity, load_features
from fewshot.methods import METHODS, Recipe, build, configure, effective_recipe, grid
from fewshot.prompts import NAMED
from fewshot.tasks import make_task


@dataclass(frozen=True)
class RunRequest:
    """What a run is asked for, in plain values: train.py's flags fill it, and so do the bench and the tests."""
    features: Path | None = None          # train on this features file, or else
    dataset: str | None = None            # on the features of this dataset (a key or a folder), extracted or reused
    extraction: Extraction = Extraction()  # how the features of `dataset` are extracted (seeds: the run's)
    method: str | None = None             # a row of METHODS; None: hegraph (with `load`: the checkpoints')
    shots: int | None = None              # K; None: 16 (with `load`: the checkpoints')
    seeds: tuple[int, ...] = (1, 2, 3)    # one model each
    no_negatives: bool = False            # run without the negative text nodes
    recipe: dict = field(default_factory=dict)   # {epochs | lr | batch_size: value} over the method's recipe
    config: dict = field(default_factory=dict)   # {config field: value} over the method's published config
    search_val: bool = False              # tune the method's knobs on the min(K, 4)-shot validation subset
    out: Path | None = None               # write the results json here
    plots: bool = False                   # also draw confusion.png beside `out`
    save: Path | None = None              # write each seed's model file to DIR/seed<N>.pt
    load: Path | None = None              # evaluate the model files of this folder instead of training
    eval_datasets: tuple[str, ...] = ()   # also evaluate on these ImageNet shift sets
    device: str | None = None             # torch device; None: cuda if available, else cpu
    overwrite: bool = False               # extract the features afresh, and replace another run's checkpoints


@dataclass(frozen=True)
class Plan:
    """One run, resolved from the request, the features and any checkpoints: what the record says was used."""
    method: str              # its row in METHODS
    shots: int               # K
    no_negatives: bool       # --no-negatives
    dataset: str             # the features file's dataset
    recipe: Recipe | None    # the effective recipe (overrides applied); None: nothing trained by gradient steps
    config: object           # the model's config: the row's published one with the overrides applied
    grid: tuple = ()         # the knob settings --search-val tries; () without it


def make_plan(dataset, method=None, shots=None, *, no_negatives=False, config=None, recipe=None, search_val=False,
              has_val=True, checkpoints=None):
    """What a run of `method` (default hegraph) with K = `shots` (default 16) on `dataset` does: the row's
    published config and recipe with the `config` and `recipe` overrides ({name: value}) applied, and with
    search_val the grid it tunes (has_val: whether the features have a validation split). checkpoints: the
    identity of the checkpoints a run evaluates, whose method, K and negatives it takes."""
    config, recipe = config or {}, recipe or {}
    if checkpoints and (config or recipe):
        flag = f"--{sorted({**config, **recipe})[0].replace('_', '-')}"
        raise DataError(f"{flag} sets how a model is built or trained, and --eval-only evaluates the saved models as "
                        f"they were trained: drop {flag}, or train again with it")
    name = checkpoints["method"] if checkpoints else method or "hegraph"
    shots = checkpoints["shots"] if checkpoints else shots or 16
    no_negatives = checkpoints["no_negatives"] if checkpoints else no_negatives
    if METHODS[name].negatives == "required" and no_negatives:
        raise DataError(f"{name} aggregates only the negative nodes, so it cannot run with --no-negatives")
    effective = None if checkpoints else effective_recipe(name, dataset, shots, recipe)
    points = check_search(name, dataset, effective, {**config, **recipe}, has_val, checkpoints) if search_val else []
    return Plan(name, shots, no_negatives, dataset, effective, configure(name, dataset, config), tuple(points))


def check_search(name, dataset, recipe, overrides, has_val, checkpoints):
    """The grid --search-val tries, or one line why it cannot run."""
    if checkpoints:
        raise DataError("--search-val trains and --eval-only evaluates saved checkpoints; drop one of them")
    points = grid(METHODS[name], dataset, recipe)
    if not points:
        raise DataError(f"--search-val tunes a method's knobs, and {name} has none (it trains nothing); drop it")
    if not has_val:
        raise DataError(f"--search-val needs a validation split, and the features of {dataset!r} have none")
    searched = [k for k in points[0] if k in overrides]
    if searched:
        raise DataError(f"--{searched[0].replace('_', '-')} is a knob --search-val tunes for {name}; drop one of them")
    return points


def run_id_of(plan, data, task):
    """What makes seeds one run (and checkpoints one folder): method, K, flags and recipe on the same features."""
    return dict(method=plan.method, shots=plan.shots, no_negatives=plan.no_negatives, dataset=plan.dataset,
                backbone=data["backbone"], num_classes=task.pos_text.shape[0], dim=task.pos_text.shape[1],
                classnames_sha256=checkpoints.classnames_sha256(data["classnames"]),
                config=dataclasses.asdict(plan.config), search_val=bool(plan.grid),
                recipe=plan.recipe and dataclasses.asdict(plan.recipe))


def model_for_seed(plan, task, seed, ckpt=None, folder=None, features=None):
    """The seed's model: rebuilt from its model file (once checked to be trained on these features), searched on
    the validation subset, or built and fit. Returns (model, info, search record or None)."""
    method = METHODS[plan.method]
    if ckpt is not None:
        path = checkpoints.seed_path(folder, seed)
        checkpoints.check_trained_on(ckpt, task, path, features)
        return checkpoints.build_model(ckpt, path, task.pos_text.device, checkpoints.again_with(folder),
                                       task.text_encoder), {}, None
    if plan.grid:
        return training.search(method, task, plan.config, plan.recipe, list(plan.grid), seed)
    model, info = training.fit_at(method, task, plan.config, plan.recipe, {}, seed)
    return model.eval(), info, None


def evaluate(model, task, shifts, device):
    """Test accuracy %, the test confusion matrix ("confusion" [C, C]: rows the true class, columns the predicted
    one), and the accuracy on each ImageNet shift set among its own classes."""
    feats, labels = task.test
    confusion = training.confusion_matrix(training.predictions(model, feats), labels, task.pos_text.shape[0])
    scores = {"test": 100.0 * confusion.diag().sum().item() / max(1, labels.numel()), "confusion": confusion}
    for name, shift in shifts.items():
        feats = shift["test"]["features"].to(device, torch.float32)
        scores[name] = training.accuracy(model, feats, shift["test"]["labels"], classes=shift["class_map"].to(device))
    return scores


def prompts_identity(data):
    """For a file without a text_set (another tool's): the prompts setting its settings record, the templates, and
    the sha256 of its sentences."""
    made = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    sentences = json.dumps(data.get("prompts"), default=str).encode()
    digest = made.get("prompts_sha256") or hashlib.sha256(sentences).hexdigest()
    return {"prompts": made.get("prompts"), "template": made.get("template"),
            "negative_template": made.get("negative_template"), "sha256": digest}


def new_record(plan, data, request, device, shifts, source):
    """The results dict before any seed: what the run uses. source: the features file read (given or extracted)."""
    return {"method": plan.method, "dataset": plan.dataset, "backbone": data["backbone"], "shots": plan.shots,
            "classnames": list(data["classnames"]), "test_size": len(data["test"]["labels"]), "split_sizes": {},
            "seeds": {}, "per_class": {}, "confusion": {},
            "epoch_seconds": {}, "train_seconds": {}, "model_config": {}, "effective_recipe": {}, "fit": {},
            "search": {}, "shift": {name: {} for name in shifts},
            "recipe": plan.recipe and dataclasses.asdict(plan.recipe), "no_negatives": plan.no_negatives,
            "search_val": bool(plan.grid), "grid": list(plan.grid), "device": str(device),
            "features": str(source) if source else None, "extracted": not request.features,
            "prompts": data.get("text_set") or prompts_identity(data),  # the prompt set used: its sha256, the flags
            "views": int(data["train"]["features"].shape[0]) if "train" in data else None,
            "features_identity": identity(data, request.seeds, plan.shots)}  # the weights and images it read


def split_sizes(task):
    """The images one seed's run uses of each split: the K-shot training images, the min(K, 4)-shot validation
    subset (0 without one) and the whole test split."""
    return {"train": len(task.train_labels), "val": 0 if task.val is None else len(task.val[1]),
            "test": len(task.test[1])}


def record_seed(results, seed, model, info, searched, scores, seconds, recipe=None):
    """One seed's numbers, and what it ran with: its model's config and its effective recipe (the plan's, with
    what its search chose)."""
    results["params"] = training.tunable_parameters(model)
    results["seeds"][seed] = scores.pop("test")
    confusion = scores.pop("confusion")                                       # [C, C]
    results["confusion"][seed] = confusion.tolist()
    results["per_class"][seed] = [100.0 * row[c].item() / row.sum().item() if row.sum() else None
                                  for c, row in enumerate(confusion)]
    for name, acc in scores.items():
        results["shift"][name][seed] = acc
    results["train_seconds"][seed] = seconds
    results["epoch_seconds"][seed] = info.pop("epoch_seconds", None)     # None: no epochs (tip, the probe)
    results["model_config"][seed] = dataclasses.asdict(model.config)
    chosen = searched["chosen"] if searched else {}
    results["effective_recipe"][seed] = recipe and dataclasses.asdict(training.recipe_at(recipe, chosen))
    results["fit"][seed] = info
    if searched is not None:
        results["search"][seed] = searched


def summarise(results):
    """Mean and sample standard deviation (n - 1) of the seeds' test accuracies (None for one seed)."""
    accs = torch.tensor(list(results["seeds"].values()), dtype=torch.float64)
    results.update(test_accuracy=accs.mean().item(), std=accs.std(correction=1).item() if len(accs) > 1 else None)
    return results


def run(request: RunRequest):
    """Train and evaluate one method over the seeds; returns the results dict (also written to request.out)."""
    device = prepare(request)
    with contextlib.ExitStack() as held:
        if request.save:  # one run at a time writes a --save folder: a second waits, then checks what it holds
            held.enter_context(files.acquire(files.file_lock(Path(request.save).resolve()), Path(request.save)))
        return run_seeds(request, device)


def run_seeds(request, device):
    """run()'s body: the features, the plan, then each seed's task, model, evaluation and record; the outputs."""
    data = load_features(request.features) if request.features else features_for(request, request.dataset)
    features = request.features or request.extraction.path(request.dataset)   # its path, for the record and lines
    check_dataset(request, data)
    ckpts, run_id = (checkpoints.load_checkpoints(request.load, request.seeds, data, request.method, request.shots,
                                                  request.no_negatives) if request.load else (None, None))
    wanted = ckpts and checkpoints.prompt_set(next(iter(ckpts.values())))
    if wanted and wanted in (data.get("texts") or {}) and wanted != (data.get("text_set") or {}).get("sha256"):
        data = load_features(features, text=wanted)   # the file's prompt set the models were trained with
    plan = make_plan(data["dataset"], request.method, request.shots, no_negatives=request.no_negatives,
                     config=request.config, recipe=request.recipe, search_val=request.search_val,
                     has_val="val_fewshot" in data, checkpoints=run_id)
    if plan.grid:
        check_val_subsets(request.seeds, data, features)
    shifts = shift_sets(request, data)
    results, trained = new_record(plan, data, request, device, shifts, features), {}
    negatives = not plan.no_negatives and bool(METHODS[plan.method].negatives)
    text_encoder = text_encoder_for(request, plan, data, device)
    for seed in request.seeds:
        torch.manual_seed(seed)
        if ckpts:  # the model carries its own negatives: they are compared where the file has them too
            negatives = checkpoints.compare_negatives(ckpts[seed], data)
        task = make_task(data, seed, plan.shots, device, negatives, text_encoder)
        if seed == request.seeds[0]:
            stale = check_room(request, plan, data, task) if not ckpts else []
            results["split_sizes"] = split_sizes(task)
        start = time.perf_counter()
        model, info, searched = model_for_seed(plan, task, seed, ckpts and ckpts[seed], request.load, features)
        seconds = 0.0 if ckpts else time.perf_counter() - start
        record_seed(results, seed, model, info, searched, evaluate(model, task, shifts, device), seconds, plan.recipe)
        if request.save and not ckpts:
            trained[seed] = checkpoints.model_file(model, task, seed, run_id_of(plan, data, task), data, features)
    summarise(results)
    print_table(results)
    write_outputs(request, results, trained, stale)
    return results


def check_val_subsets(seeds, data, features):
    """--search-val scores on each seed's validation subset: one line for a seed that has none (before any
    training; a seed without a training subset either is make_task's to name)."""
    have = data.get("val_fewshot", {})
    missing = [s for s in seeds if s in data.get("fewshot", {}) and s not in have]
    if missing:
        raise DataError(f"--search-val tunes on each seed's validation subset, and {features} has none for seed "
                        f"{missing[0]} (it has them for seeds {' '.join(map(str, sorted(have))) or 'none'}): run "
                        f"those --seeds, or extract the features again with --seeds {' '.join(map(str, seeds))} "
                        f"(--overwrite replaces the file)")


def record_json(results) -> bytes:
    """The results as json, each list of numbers (a confusion matrix's row, the per-class accuracies) on one line."""
    text = json.dumps(results, indent=2)
    return re.sub(r"\[[^\[\]{}\"]*\]", lambda m: " ".join(m[0].split()).replace("[ ", "[").replace(" ]", "]"),
                  text).encode()


def text_encoder_for(request, plan, data, device):
    """CLIP's frozen text encoder, loaded once per run from the features file's recorded CLIP, for a row that runs
    it (coop); None for every other row, which never imports or loads a CLIP."""
    if not METHODS[plan.method].text_encoder:
        return None
    source = request.features or request.extraction.path(request.dataset) or "the features file"
    return coop.load_text_encoder(data, device, source)


def write_outputs(request, results, trained, stale):
    """--save's model files, --out's results and --plots' figure, once the numbers are printed: a write that still
    fails (a disk filled meanwhile) loses nothing that was measured, and says where it could not write."""
    try:
        for record in trained.values():
            checkpoints.save_model(request.save, record, stale)
            stale = []
        if request.out:
            files.write_atomic(request.out, lambda f: f.write(record_json(results)))
            if request.plots:
                perclass.plot_confusion(results, confusion_path(request.out))
    except OSError as e:
        raise DataError(f"the results are printed above, but {e.filename or request.out or request.save} could not be "
                        f"written ({e.strerror}); free some space or choose another --out / --save") from None


def print_table(results):
    """The run's size (test images, classes, training and validation images per seed), then per-seed test
    accuracy, mean and standard deviation, seconds per epoch, tunable parameters; then the weakest classes."""
    sizes, C = results["split_sizes"], len(results["classnames"])
    print(f"\n{results['method']} on {results['dataset']} ({results['backbone']}), {results['shots']} shots, "
          f"{results['params']:,} tunable parameters")
    val = f", its validation subset holds {sizes['val']:,}" if sizes["val"] else ""
    print(f"test set {results['test_size']:,} images of {C:,} classes; each seed trains on {sizes['train']:,} images "
          f"({results['shots']} per class){val}")
    print(f"{'seed':>6} {'test acc %':>11} {'s/epoch':>8}" + "".join(f" {n:>21}" for n in results["shift"]))
    for seed, acc in results["seeds"].items():
        shift = "".join(f" {results['shift'][n][seed]:>21.2f}" for n in results["shift"])
        epoch = results["epoch_seconds"][seed]
        print(f"{seed:>6} {acc:>11.2f} {'–' if epoch is None else f'{epoch:.3f}':>8}{shift}")
    spread = "(1 seed)" if results["std"] is None else f"± {results['std']:.2f} (std over seeds)"
    print(f"{'mean':>6} {results['test_accuracy']:>11.2f}  {spread}")
    print("\n".join(perclass.weakest_lines(results)))


# -----------------------------------------------------------------------------
# files: features (extracted on demand) and outputs

def prepare(request):
    """Before any file is read: determinism, the device, and outputs that can be written."""
    device = resolve_device(request.device)
    deterministic()
    if request.load and request.save:
        raise DataError("--save writes the models a run trains, and --eval-only trains none (its models are in "
                        "--load): drop --save")
    if request.plots and not request.out:
        raise DataError("--plots draws confusion.png beside the --out file: give --out FILE.json too")
    check_outputs(request)
    shots, max_shots = request.shots or 16, request.extraction.settings.max_shots
    if not request.features and not request.load and max_shots is not None and shots > max_shots:
        raise DataError(f"--shots {shots} is above --max-shots {max_shots}, the largest K extracted; "
                        f"pass --max-shots {shots}")
    return device


def features_for(request, dataset, like=None):
    """The features of a dataset in the features folder, extracted first or reused when they were made with the
    settings asked for (the extraction checks, also when the dataset folder is absent). like: a features
    file's dict whose CLIP to use instead of the one the request names."""
    return request.extraction.features(dataset, request.seeds, request.device, request.overwrite, like,
                                       shots=request.shots or 16)


def check_dataset(request, data):
    if request.features and request.dataset and dataset_name(request.dataset) != data["dataset"]:
        raise DataError(f"--features {request.features} holds {data['dataset']!r}, not --dataset "
                        f"{request.dataset!r}; drop --dataset or pass that dataset's features")


def shift_sets(request, data):
    """The --eval-datasets features, found by the main features' backbone."""
    shifts = {name: features_for(request, name, like=data) for name in request.eval_datasets}
    C = len(data["classnames"])
    for name, shift in shifts.items():
        if "class_map" not in shift:
            raise DataError(f"{name}: its features file has no class_map; re-extract it")
        if int(shift["class_map"].max()) >= C:
            raise DataError(f"{name}: its class_map names class {int(shift['class_map'].max())}, and the features the "
                            f"model is trained on have {C} classes; evaluate a model of the full ImageNet on it")
    return shifts


def run_inputs(request):
    """Every file or folder a run reads, {what: path}: no output may be written over (or into) one of them."""
    settings, extraction = request.extraction.settings, request.extraction
    return {"the --features file": request.features, "the --load folder": request.load,
            "the --clip-checkpoint": settings.clip_checkpoint,
            "the --prompts file": settings.prompts if settings.prompts not in (None, *NAMED) else None,
            "the dataset folder": request.dataset and dataset_folder(request.dataset, extraction.root),
            "the features file": None if request.features or not request.dataset else
            extraction.path(request.dataset)}


def check_outputs(request):
    """Fail now, before any work, if --out or --save would destroy an input or cannot be written (check_output)."""
    inputs = run_inputs(request)
    seed_files = {f"the --save model file of seed {s}": Path(request.save) / f"seed{s}.pt" for s in request.seeds} \
        if request.save and not request.load else {}
    if request.out:
        files.check_output("--out", request.out, inputs | seed_files)
        if request.plots:
            files.check_output("--plots", confusion_path(request.out), inputs | seed_files | {"the --out file":
                                                                                          request.out})
    if seed_files:
        files.check_output("--save", request.save, inputs, folder=True)
    for path in seed_files.values():
        files.check_output("--save", path, inputs | {"the --out file": request.out})


def confusion_path(out):
    """Where --plots draws the confusion matrix: confusion.png beside the --out file."""
    return Path(out).with_name("confusion.png")


def check_room(request, plan, data, task):
    """Before training: room on the disk for --save's model files (the first seed's, its model built untrained,
    times the seeds); returns the other run's files there that --overwrite replaces."""
    if not request.save:
        return []
    state = build(METHODS[plan.method], task, plan.config).state_dict()
    size = checkpoints.file_bytes(task, state) * len(request.seeds) + (1 << 20)
    files.check_output("--save", request.save, run_inputs(request), folder=True, needed_bytes=size)
    return checkpoints.other_runs(request.save, run_id_of(plan, data, task), request.overwrite)
