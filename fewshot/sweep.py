"""
The paper's protocol in one command (bench/reproduce.py): every dataset, K, method and seed, then the tables
and figures (report.py). Resumable, and safe to run several times at once on one results folder.

    python bench/reproduce.py                        # 11 datasets x K 1 2 4 8 16 x every method, seeds 1 2 3
    python bench/reproduce.py --shift                # ... and Table 1: ImageNet 16-shot -> -V2/-Sketch/-A/-R
    python bench/reproduce.py --datasets dtd eurosat --shots 1 2 -- --epochs 10   # train.py flags after --
    python bench/reproduce.py --features my.pt --shots 1 2 4                      # K over one features file
    python bench/reproduce.py --report               # the outputs again, from results/runs/*.json alone

A run is one call of train.py's own code, in this process: runs.run(request) for one (dataset, method, K) over
all --seeds, its RunRequest built from this command's flags and the train.py flags given after --. It writes
results/runs/<dataset>_<backbone>_<method>_<K>shot_<hash>.json (train.py's results plus a "reproduce" record
holding the request), the hash being that of the run's configuration (dataset, backbone, method, K, seeds,
extraction settings, prompts, the train.py flags after --) and of the identity of the features it reads (the
CLIP's weights by content, the view recipe, the path and content of every image it reads: features.identity).
A run whose file exists is skipped, so a rerun or an interrupted sweep continues where it stopped, and a run
whose features changed (a checkpoint replaced, an image fixed) is another run, run again. Each run is checked, run
and written under its own lock; a sweep that finds a run locked by another sweep leaves it, goes on, and
at the end waits for it (and runs it if that sweep died). So sweeps on one results folder, e.g. one per
GPU with --datasets split between them, never run a run twice.

Features are extracted (or reused, or grown) once per (dataset, backbone) before the runs, with all --seeds and
--max-shots = the largest --shots (the default here; a larger --max-shots is kept), and reused by every K and
method. (runs.run loads the file again in each run; that takes 0.2 s for 430 MB, so it is left as it is.) A
log gets the runs' progress lines (extraction, training) and the sweep's own, at a steady pace (progress.py).
"""

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import Timeout
from tqdm import tqdm

from fewshot import features, progress, report, runs
from fewshot.cli import (
    Parser,
    add_extraction_args,
    dataset_arg,
    extraction_from_args,
    fail,
    guarded,
    overrides_from_args,
    path_arg,
    train_parser,
)
from fewshot.datasets import SHIFT_DATASETS, dataset_folder, dataset_name
from fewshot.download import DOWNLOADS
from fewshot.errors import DataError
from fewshot.features import features_path
from fewshot.files import check_output, file_lock, file_sha256, write_atomic
from fewshot.methods import METHODS, config_fields
from fewshot.prompts import CUPL, CUPL_PROMPTS

# train.py flags a sweep sets itself, per run; the extraction flags are given to this script instead
SWEEP_FLAGS = {"--dataset", "--method", "--shots", "--features", "--out", "--save", "--eval-only", "--load",
               "--eval-datasets"}


@dataclass
class Run:
    """One runs.run call: its request, its result file and what identifies it."""
    dataset: str
    method: str
    shots: int
    request: runs.RunRequest  # what train.py's code runs
    key: dict            # the configuration; its hash names the result file
    name: str            # <dataset>_<backbone>_<method>_<K>shot[_shift]: the result file's name, before the hash
    path: Path           # results/runs/<name>_<hash>.json
    features: Path       # the features file the run reads
    checkpoint: Path | None = None   # train.py --save folder (the run the t-SNE figure is drawn from)


# -----------------------------------------------------------------------------
# command line

def extraction_defaults():
    """{dest: default} of the extraction flags, as declared by cli.add_extraction_args."""
    probe = argparse.ArgumentParser(add_help=False)
    add_extraction_args(probe)
    return vars(probe.parse_args([]))


def parse_args(argv=None):
    """This script's flags, and the train.py flags given after -- (as written: they name the run files)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = Parser(prog="bench/reproduce.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="*", type=dataset_arg, metavar="DATASET", help="few-shot datasets: keys, "
                   "or folders of class subfolders (default: the 11 of the paper; none with --shift: Table 1 alone)")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="K values (default 1 2 4 8 16)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   metavar="METHOD", help=f"train.py methods (default all: {' '.join(METHODS)})")
    p.add_argument("--results", type=path_arg, default=Path("results"), help="results folder (default results/)")
    p.add_argument("--shift", action="store_true", help="also Table 1: ImageNet at the largest K with hegraph-t "
                   "and the baselines, evaluated on the four ImageNet shift sets")
    p.add_argument("--features", type=path_arg, help="sweep K over this one features file (no extraction)")
    p.add_argument("--tsne-dataset", default="food101", help="dataset whose hegraph run saves a checkpoint for "
                   "the t-SNE figure (default food101, else the first dataset swept)")
    p.add_argument("--report", action="store_true", help="only rebuild the outputs from the run files")
    add_extraction_args(p)
    p.set_defaults(max_shots=None)  # here: the largest --shots, so that one features file serves every K
    args = p.parse_args(ours)
    reserved = SWEEP_FLAGS | {f"--{d.replace('_', '-')}" for d in extraction_defaults()}
    clash = [a.split("=")[0] for a in extra if a.split("=")[0] in reserved]
    if clash:
        p.error(f"{clash[0]} is set by the sweep; give it before -- (the flags after -- go to every train.py run)")
    shift = [d for d in args.datasets or [] if d in SHIFT_DATASETS]
    if shift:
        p.error(f"--datasets {shift[0]} is a test-only set: --shift evaluates on it")
    if args.features and (args.datasets is not None or args.shift):
        p.error("--features sweeps its own file: it goes without --datasets and --shift")
    for flag, path in (("--features", args.features), ("--prompts", args.prompts)):
        if isinstance(path, Path) and not path.is_file():  # --prompts may also name a set (cupl, imagenet7)
            p.error(f"{flag} {path} does not exist")
    if args.datasets is None:
        args.datasets = [] if args.features else report.FEWSHOT_DATASETS
    if not args.report and not (args.datasets or args.shift or args.features):
        p.error("nothing to run: give --datasets, --shift or --features")
    if min(args.shots) < 1:
        p.error("--shots must be at least 1")
    if args.max_shots is None:
        args.max_shots = max(args.shots)
    elif args.max_shots < max(args.shots):
        p.error(f"--max-shots {args.max_shots} is below the largest --shots {max(args.shots)}")
    return args, extra


# -----------------------------------------------------------------------------
# planning: the runs of a sweep, each with its configuration and file name

def shared_key(args, extra, backbone):
    """The part of every run's configuration that the whole sweep shares; backbone: the CLIP's name (its weights
    are in each run's features identity, filled in once the features are extracted: identify).

    Left out on purpose: where things are (--root, --features-dir, --results), how fast (--device,
    --workers, --encode-batch-size) and --max-shots (K shots are the first K of any larger max-shots).
    """
    if args.features:  # a file's content (prompts, a --features file): a changed file is another configuration
        return {"features_sha256": file_sha256(args.features), "seeds": sorted(set(args.seeds)), "train_args": extra}
    key = {"backbone": backbone, "seeds": sorted(set(args.seeds)), "views": args.views,
           "prompts_sha256": file_sha256(args.prompts) if isinstance(args.prompts, Path) else None,
           "negative_template": args.negative_template, "allow_repeats": args.allow_repeats, "train_args": extra}
    if args.template:  # only when given: the runs of sweeps without it keep their names
        key["template"] = args.template
    if isinstance(args.prompts, str):  # a named set; CuPL's content is its pinned sha256, per dataset (make_run)
        key["prompts"] = args.prompts
    return key


def run_template(args, extra):
    """What every run of the sweep shares, as a RunRequest: the extraction flags of this command and the train.py
    flags after -- (parsed by train.py's own parser, so a bad one gets train.py's one line before any run)."""
    after = train_parser().parse_args(extra)
    recipe, config = overrides_from_args(after)
    return runs.RunRequest(extraction=extraction_from_args(args), seeds=tuple(args.seeds),
                           no_negatives=after.no_negatives, recipe=recipe, config=config, search_val=after.search_val,
                           device=args.device, overwrite=args.overwrite)


def settings_of(method, config):
    """The config settings after -- that apply to `method`: a setting of another method's config (--beta-vp
    for tip) is left out of its run, which would refuse it; every other flag goes to every run."""
    owners = config_fields()
    return {name: value for name, value in config.items() if method in owners[name][1]}


def run_path(args, key, name):
    """results/runs/<name>_<hash of the key>.json"""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return args.results / "runs" / f"{name}_{digest}.json"


def make_run(args, shared, template, dataset, method, shots, backbone, eval_datasets=()):
    """A Run: its request, the configuration and the file name derived from it."""
    key = {**shared, "dataset": dataset_name(dataset), "method": method, "shots": shots,
           "eval_datasets": list(eval_datasets)}
    if shared.get("prompts") == CUPL:
        key["prompts_sha256"] = CUPL_PROMPTS.get(dataset_name(dataset), ("", None))[1]  # unpinned: plan() says
    name = features_path("", dataset, backbone).stem + f"_{method}_{shots}shot{'_shift' if eval_datasets else ''}"
    if args.features:
        source, read = {"features": args.features}, args.features
    else:
        source, read = {"dataset": dataset}, features_path(args.features_dir, dataset, backbone)
    request = dataclasses.replace(template, **source, method=method, shots=shots,
                                  config=settings_of(method, template.config), eval_datasets=tuple(eval_datasets))
    return Run(dataset, method, shots, request, key, name, run_path(args, key, name), read.resolve())


def identify(planned, args):
    """Extract (or reuse, or grow) the features of every dataset the runs read, once, and put their identity
    (features.identity: the weights by content, the view recipe, every image the run reads by content) into each
    run's key and file name: a run whose features changed is another run. The runs then reuse the files as they
    are (so --overwrite extracts once, here, not in every run)."""
    if args.features or not planned:
        return planned
    extraction = planned[0].request.extraction

    known = {}  # dataset -> its features file's dict (tensors mapped, not read)
    for run in planned:
        for dataset in (run.dataset, *run.request.eval_datasets):
            if dataset not in known:
                like = known[run.dataset] if dataset != run.dataset else None  # a shift set: ImageNet's CLIP
                known[dataset] = features.existing(extraction.extract(dataset, args.seeds, args.device,
                                                                      args.overwrite, like))
        run.key["features"] = features.identity(known[run.dataset], args.seeds, run.shots)  # what its K reads
        if run.request.eval_datasets:
            run.key["shift_features"] = {name: features.identity(known[name], (), 0)
                                         for name in run.request.eval_datasets}
        run.path = run_path(args, run.key, run.name)
        if run.checkpoint:
            run.checkpoint = args.results / "checkpoints" / run.path.stem
        run.request = dataclasses.replace(run.request, overwrite=False, save=run.checkpoint)
    return planned


def plan(args, extra):
    """Every run of the sweep, few-shot first, each checked by train.py's own parser before anything runs."""
    if args.features:
        try:
            data = torch.load(args.features, map_location="cpu", weights_only=True, mmap=True)
            datasets, backbone = [data.get("dataset", args.features.stem)], data.get("backbone", "unknown")
        except Exception as e:  # torch raises many types for a file that is not a torch.save'd dict
            raise DataError(f"{args.features} is not a readable features file ({type(e).__name__})") from None
    else:  # the model's name, as train.py will record it (a --clip-checkpoint's is read from its weights)
        datasets, backbone = args.datasets, extraction_from_args(args).backbone_name()
    shared, template = shared_key(args, extra, backbone), run_template(args, extra)
    tsne_dataset = args.tsne_dataset if args.tsne_dataset in datasets else (datasets or [None])[0]
    planned = []
    for dataset in datasets:
        for shots in args.shots:
            for method in args.methods:
                run = make_run(args, shared, template, dataset, method, shots, backbone)
                if method == "hegraph" and dataset == tsne_dataset and shots == max(args.shots):
                    run.checkpoint = args.results / "checkpoints" / run.path.stem
                    run.request = dataclasses.replace(run.request, save=run.checkpoint)
                planned.append(run)
    if args.shift:
        # Table 1: hegraph-t (the paper's HeGraphAdapter(T)) and the baselines, not the other variants
        methods = [m for m in args.methods if not m.startswith("hegraph") or m == "hegraph-t"]
        planned += [make_run(args, shared, template, "imagenet", m, max(args.shots), backbone, SHIFT_DATASETS)
                    for m in methods]
    if not args.features:
        needed = dict.fromkeys(r.dataset for r in planned) | dict.fromkeys(SHIFT_DATASETS if args.shift else [])
        unpinned = [dataset_name(d) for d in needed if dataset_name(d) not in CUPL_PROMPTS]
        if args.prompts == CUPL and unpinned:  # before any run, not when the sweep reaches that dataset
            raise DataError(f"--prompts cupl: no CuPL descriptions are pinned for {', '.join(unpinned)} (there are "
                            f"for {', '.join(CUPL_PROMPTS)}); leave {'them' if len(unpinned) > 1 else 'it'} out of "
                            f"--datasets (and --shift), and sweep {'them' if len(unpinned) > 1 else 'it'} with "
                            f"--prompts FILE.json")
        for dataset in needed:  # missing data stops the sweep now, not hours into it (unless it is downloaded)
            folder = dataset_folder(dataset, args.root)
            if not folder.exists() and not features_path(args.features_dir, dataset, backbone).exists() \
                    and not (args.download and dataset in DOWNLOADS):
                raise DataError(f"dataset folder not found: expected {folder} for '{dataset}' (or its features "
                                f"file in {args.features_dir}); pass --download, or see docs/datasets.md")
    return planned


# -----------------------------------------------------------------------------
# running: one run under its lock, the sweep with its progress bar

def device_name(device):
    """The device in words, for the cost table: the GPU's name, or the CPU's architecture and core count."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def execute(run):
    """runs.run on the run's request (its printed table kept back, its progress lines passed through to the sweep's
    log); the result with a "reproduce" record."""
    start = time.perf_counter()
    printed = io.StringIO()
    try:
        with progress.to(sys.stdout), contextlib.redirect_stdout(printed):
            result = runs.run(run.request)
    except ValueError as e:  # DataError, and the model's checks of its inputs: say which run
        raise DataError(f"{run.path.stem}: {e}") from None
    except BaseException:
        print(printed.getvalue(), end="")  # what train.py said before it failed
        raise
    device = result["device"]
    result["reproduce"] = {
        "key": run.key, "request": plain(dataclasses.asdict(run.request)), "wall_seconds": time.perf_counter() - start,
        "device": device_name(device), "host": socket.gethostname(), "pid": os.getpid(),
        "finished": datetime.datetime.now().isoformat(timespec="seconds"), "features": str(run.features),
        "checkpoint": run.checkpoint.relative_to(run.path.parents[1]).as_posix() if run.checkpoint else None,
    }
    return result


def plain(value):
    """A request's values as json has them: paths and other objects as strings, tuples as lists."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def attempt(run, args, wait):
    """Check, run and write one run under its lock: "ran", "exists", or "busy" (locked by another sweep,
    when not waiting)."""
    lock = file_lock(run.path)
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        return "busy"
    try:
        if run.path.exists():
            return "exists"
        result = execute(run)
        write_atomic(run.path, lambda f: f.write(json.dumps(result, indent=2, default=str).encode()))
        spread = "(1 seed)" if result["std"] is None else f"± {result['std']:.2f}"
        tqdm.write(f"ran {run.path.name}: {result['test_accuracy']:.2f} % {spread} "
                   f"({result['reproduce']['wall_seconds']:.1f} s)")
        return "ran"
    finally:
        lock.release()


def sweep(planned, args):
    """Every run not finished yet; returns {"ran", "skipped", "by_others"} counts."""
    finished_before = {r.path for r in planned if r.path.exists()}
    todo = [r for r in planned if r.path not in finished_before]
    print(f"{len(planned)} runs: skipped {len(finished_before)} finished already, {len(todo)} to do "
          f"(results in {args.results})")
    counts = {"ran": 0, "skipped": len(finished_before), "by_others": 0}
    bar = progress.bar(total=len(planned), initial=len(finished_before), desc="sweep", unit="runs",
                       dynamic_ncols=True)  # a bar on a terminal; a log gets the one line per run and progress lines
    deferred = []
    try:
        for run in todo:
            status = attempt(run, args, wait=False)
            if status == "busy":
                deferred.append(run)  # another sweep runs it: come back at the end
                continue
            counts["ran" if status == "ran" else "by_others"] += 1
            bar.update()
        for run in deferred:  # wait for the other sweep; run it ourselves if that one died
            counts["ran" if attempt(run, args, wait=True) == "ran" else "by_others"] += 1
            bar.update()
    finally:
        bar.close()
    print(f"done: ran {counts['ran']}, skipped {counts['skipped']} finished before this sweep, "
          f"{counts['by_others']} finished by another sweep")
    return counts


def check_results(args):
    """--results receives the run files, the report and the checkpoints: a folder, writable, and none of the
    sweep's inputs (the --features file, the dataset folders, the prompts, the CLIP checkpoint)."""
    inputs = {"the --features file": args.features, "the --clip-checkpoint": args.clip_checkpoint,
              "the --prompts file": args.prompts if isinstance(args.prompts, Path) else None}
    inputs |= {f"the folder of {d}": dataset_folder(d, args.root) for d in args.datasets or []}
    check_output("--results", args.results, inputs, folder=True)


def main(argv=None):
    args, extra = parse_args(argv)

    def body():
        check_results(args)
        if not args.report:
            try:
                sweep(identify(plan(args, extra), args), args)
            except KeyboardInterrupt:
                fail("interrupted; the same command continues where this one stopped")
        print(f"wrote {report.write_report(args.results, args.tsne_dataset)}")
    guarded("bench/reproduce.py", body)
