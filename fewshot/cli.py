"""The command line: what every command shares (its argument parser, one-line errors, the types of its flags,
the extraction flags) and the flags of extract_features.py and train.py, turned into plain values.

Each command builds its flags with Parser, so that a bad command line gets one line, not argparse's whole usage;
every number a flag feeds into a formula is checked once, where it enters, against its row of ranges.RANGES;
and each command runs inside guarded(), which turns every error into one line: the user's (a UserError, an
OSError) with what to do, and an unforeseen one with the path of a log holding its traceback. train.py's flags
become a runs.RunRequest and the extraction flags an extraction.Extraction: the library never sees argparse.
"""
import argparse
import codecs
import contextlib
import os
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

from fewshot.datasets import SHIFT_DATASETS, resolve_dataset
from fewshot.errors import DataError
from fewshot.extraction import Extraction
from fewshot.features import AUTO, PRECISIONS, Settings
from fewshot.methods import METHODS, RECIPE_FIELDS, config_fields
from fewshot.prompts import NAMED
from fewshot.ranges import RANGES
from fewshot.runs import RunRequest, run


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line gets one line, not the whole usage. prog: the script's path."""

    def error(self, message):
        fail(f"{message} (python {self.prog} --help lists the options)")


def _escape_bytes(error):
    """The codec error handler "escapebytes": a file name's bytes that are not UTF-8 (which Python keeps as
    surrogate escapes) are written as \\xNN, instead of ending the program with "surrogates not allowed"."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    bad = error.object[error.start:error.end]
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else f"\\u{ord(c):04x}"
                   for c in bad), error.end


codecs.register_error("escapebytes", _escape_bytes)


def printable(text) -> str:
    """`text` with the bytes of names that are not UTF-8 written as \\xNN."""
    return str(text).encode("utf-8", "escapebytes").decode("utf-8")


def fail(message):
    """Exit non-zero with one clear line."""
    print(f"error: {printable(message)}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def plain_output():
    """While a command runs: what it prints escapes the bytes of names that are not UTF-8 (a file named in
    Latin-1 is shown, not a crash), and the libraries' warnings, which a user cannot act on, are not shown (what
    they mean is said in our words where it matters: a huge image, NaN pixels)."""
    streams = [s for s in (sys.stdout, sys.stderr) if hasattr(s, "reconfigure")]
    errors = [s.errors for s in streams]
    for stream in streams:
        stream.reconfigure(errors="escapebytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for stream, before in zip(streams, errors):
            stream.reconfigure(errors=before)


def guarded(prog, body):
    """Run a command's body; every exception ends in one line. What the user can fix (DataError and the models'
    ValueErrors, an OSError: permissions, a full disk, a name too long, ...) says so; anything else is a bug of
    ours, whose traceback goes to a log file that the line names, so that nothing reaches the user as a traceback."""
    try:
        with plain_output():
            return body()
    except ValueError as e:  # DataError, and the models' checks of their inputs (a ValueError naming the input)
        fail(e)
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        fail(f"cannot use{where}: {e.strerror or e}; check the path, its permissions and the free space")
    except KeyboardInterrupt:
        fail("interrupted; files are written whole or not at all, so the same command can run again")
    except Exception as e:
        fd, log = tempfile.mkstemp(prefix=f"hegraphadapter-{Path(prog).stem}-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(f"python {prog} {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
        fail(f"unexpected {type(e).__name__} ({str(e).splitlines()[0][:200] if str(e) else 'no message'}); this is a "
             f"bug: the full traceback is in {log}, please report it with the command you ran")


def number_arg(name, kind=float):
    """argparse type of the flag of RANGES[name]: a `kind` number within its range, or one line saying which."""
    bounds = RANGES[name]

    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not bounds.holds(x):
            raise argparse.ArgumentTypeError(f"must be {bounds.describe()}, got {text}")
        return x
    return parse


def path_arg(text: str) -> Path:
    """argparse type of every path flag: ~ is expanded, in "--flag ~/x" and "--flag=~/x" alike."""
    return Path(text).expanduser()


def dataset_arg(text: str) -> str:
    """argparse type of --dataset: a dataset key as it is, or a folder of class subfolders as its absolute path."""
    try:
        return resolve_dataset(text)
    except DataError as e:
        raise argparse.ArgumentTypeError(str(e)) from None



def prompts_arg(text: str):
    """argparse type of --prompts: a named set ("cupl": CuPL's descriptions, downloaded; "imagenet7": Tip-Adapter's
    ImageNet templates) or a json file's path."""
    return text if text in NAMED else path_arg(text)


def add_extraction_args(parser):
    """The extraction flags, declared once for every command that may extract (extract_features.py, train.py,
    bench/reproduce.py), so that an error naming one of them names a flag of the command that was run."""
    g = parser.add_argument_group("feature extraction (when the features file does not exist yet)")
    g.add_argument("--root", type=path_arg, default=Path("data"),
                   help="folder holding the dataset folders in CoOp's layout (default data/)")
    g.add_argument("--download", action="store_true", help="first download the dataset into --root if it is not "
                   "there: its images from their official location and CoOp's split file, each checked "
                   "(docs/datasets.md); for ImageNet, Stanford Cars and the shift sets, print the steps to take")
    g.add_argument("--backbone", help="the CLIP (docs/backbones.md): one of OpenAI's names (RN50, RN101, "
                   "ViT-B/32, ViT-B/16, ViT-L/14, ...) for OpenAI's weights, an open_clip model name with "
                   "--pretrained, hf-hub:ORG/REPO or local-dir:FOLDER; its name is in the features file's name "
                   "(default RN50, or with --clip-checkpoint the architecture read from its weights)")
    g.add_argument("--pretrained", help="the weights of an open_clip --backbone: a tag (e.g. laion2b_s34b_b88k; "
                   "default openai for OpenAI's names) or a weights file")
    g.add_argument("--features-dir", type=path_arg, default=Path("features"),
                   help="where features files are written and looked up (default features/)")
    g.add_argument("--clip-checkpoint", type=path_arg, help="a local OpenAI-format CLIP checkpoint (a state dict or "
                   "TorchScript file, as clip.load caches them) instead of downloading weights; named from its "
                   "weights")
    g.add_argument("--prompts", type=prompts_arg, help="positive prompts instead of the dataset's template: "
                   "'cupl' (CuPL's class descriptions, downloaded once into ~/.cache/hegraphadapter), 'imagenet7' "
                   "(Tip-Adapter's and TaskRes's 7 ImageNet templates, averaged) or a json file {classname: "
                   "[sentence, ...]}; a class without sentences keeps the template")
    g.add_argument("--template", help="template of the positive prompts, e.g. 'a photo of a {}, a type of bird.' "
                   "(default: the dataset's, CoOp's; 'a photo of a {}.' for a folder of your own)")
    g.add_argument("--negative-template", default="a photo of no {}.",
                   help="template of the negative prompts (default 'a photo of no {}.')")
    g.add_argument("--seeds", type=number_arg("seeds", int), nargs="+", default=[1, 2, 3],
                   help="few-shot seeds (default 1 2 3)")
    g.add_argument("--max-shots", type=number_arg("max_shots", int),
                   help="training images per class sampled per seed; K shots are the first K (default 16; train.py "
                   "on a folder of your own: --shots); a features file grows when a run asks for more")
    g.add_argument("--views", type=number_arg("views", int), default=10,
                   help="views per training image: CLIP's preprocessing + augmented crops (default 10)")
    g.add_argument("--precision", choices=[AUTO, *PRECISIONS], default=AUTO,
                   help="the encoder's arithmetic: fp32, or autocast to bf16 / fp16; auto (default): an existing "
                   "features file's own, else bf16 on a CPU that has it in hardware and fp16 on CUDA, each only where "
                   "its features match fp32's to cosine >= 0.9999 on a check batch, else fp32 (docs/speed.md)")
    g.add_argument("--encode-batch-size", type=number_arg("encode_batch_size", int),
                   help="images (views) per CLIP forward pass (default: the device's and backbone's, docs/speed.md)")
    g.add_argument("--workers", type=number_arg("workers", int),
                   help="data loading processes (default: on a CPU one per 8 cores, on a GPU the CPU count, at most "
                   "8)")
    g.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--allow-repeats", action="store_true",
                   help="let a class with fewer images than --max-shots repeat its images instead of failing")
    g.add_argument("--overwrite", action="store_true", help="extract afresh, replacing an existing features file "
                   "(one of other weights or another view recipe, or of an older format; train.py: also another "
                   "run's checkpoints in --save)")
    return g


def extraction_from_args(args) -> Extraction:
    """The Extraction that the flags of add_extraction_args ask for (the settings not resolved yet)."""
    settings = Settings(dataset="", backbone=args.backbone, pretrained=args.pretrained,
                        clip_checkpoint=str(args.clip_checkpoint.resolve()) if args.clip_checkpoint else None,
                        prompts=None if args.prompts is None else str(args.prompts), template=args.template,
                        negative_template=args.negative_template, seeds=tuple(args.seeds),
                        max_shots=args.max_shots, views=args.views, allow_repeats=args.allow_repeats,
                        precision=args.precision)
    return Extraction(settings, args.root, args.features_dir, args.encode_batch_size, args.workers, args.download)


# ----------------------------------------------------------------------------- extract_features.py

def extract_parser(description=None) -> Parser:
    """extract_features.py's flags."""
    p = Parser(prog="extract_features.py", description=description or "Extract frozen CLIP features of a few-shot "
               "dataset into one file (its layout: docs/features-file.md).",
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, type=dataset_arg, help="a dataset key (e.g. dtd; docs/datasets.md "
                   "lists them) or a folder holding one subfolder of images per class")
    add_extraction_args(p)
    return p


def extract_command(argv=None, description=None):
    """extract_features.py: parse the flags, extract (or reuse) the dataset's features file."""
    args = extract_parser(description).parse_args(argv)
    guarded("extract_features.py", lambda: extraction_from_args(args).extract(args.dataset, args.seeds, args.device,
                                                                             args.overwrite))


# ----------------------------------------------------------------------------- train.py

def add_config_flags(parser):
    """One flag per setting of the methods' configs (default: the method's published value for the dataset)."""
    g = parser.add_argument_group("method settings (default: each method's published value; see fewshot/methods.py)")
    for name, (kind, owners) in config_fields().items():
        where = ", ".join(owners) if len(owners) < 4 else f"{owners[0]}, ... ({len(owners)} methods)"
        number = kind in (int, float)  # every number has its row in RANGES: checked here, where it enters
        extra = ({"action": argparse.BooleanOptionalAction} if kind is bool else
                 {"type": number_arg(name, kind) if number else kind})
        g.add_argument(f"--{name.replace('_', '-')}", dest=name, help=f"{name} of {where}", **extra)


def train_parser(description=None) -> Parser:
    """train.py's flags."""
    methods = "\n".join(f"  {name:<14} {m.about}" for name, m in METHODS.items())
    p = Parser(prog="train.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=f"methods:\n{methods}")
    p.add_argument("--dataset", type=dataset_arg, help="a dataset key, e.g. dtd, or a folder holding one subfolder "
                   "of images per class (docs/datasets.md); optional with --features")
    p.add_argument("--shots", type=number_arg("shots", int), help="K, training images per class (default 16)")
    p.add_argument("--method", choices=list(METHODS), help="default hegraph (the full model); list below")
    p.add_argument("--no-negatives", action="store_true", help="run without the negative text nodes")
    p.add_argument("--features", type=path_arg, help="train on this features file instead of extracting one")
    add_extraction_args(p)
    g = p.add_argument_group("recipe (default: each method's published one; see fewshot/methods.py)")
    g.add_argument("--epochs", type=number_arg("epochs", int), help="training epochs; 0 evaluates the model as built")
    g.add_argument("--lr", type=number_arg("lr"), help="peak learning rate")
    g.add_argument("--batch-size", type=number_arg("batch_size", int), help="training images per step")
    g.add_argument("--search-val", action="store_true", help="tune the method's knobs (fewshot/methods.py, at most "
                   "12 settings) on the min(K, 4)-shot validation subset, never on test images")
    add_config_flags(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", type=path_arg, help="write the results json here (per-seed and per-class accuracy, "
                   "confusion matrices, what was used)")
    g.add_argument("--plots", action="store_true", help="also draw the test confusion matrix as confusion.png "
                   "beside the --out file")
    g.add_argument("--save", type=path_arg, help="write each seed's model to DIR/seed<N>.pt: everything predict.py "
                   "needs to classify new images (no features file, no dataset)")
    g.add_argument("--eval-only", action="store_true", help="evaluate the models in --load, no training")
    g.add_argument("--load", type=path_arg, help="model folder written by --save (with --eval-only)")
    g.add_argument("--eval-datasets", nargs="+", default=[], choices=SHIFT_DATASETS,
                   help="also evaluate on these ImageNet shift sets, restricted to their classes")
    return p


def overrides_from_args(args) -> tuple[dict, dict]:
    """The recipe and config settings the flags give: ({epochs | lr | batch_size: value}, {field: value})."""
    given = lambda names: {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    return given(RECIPE_FIELDS), given(config_fields())


def train_request(argv=None, description=None) -> RunRequest:
    """train.py's flags as a RunRequest, or one line (SystemExit) for a command line that cannot be one."""
    p = train_parser(description)
    args = p.parse_args(argv)
    if args.dataset is None and args.features is None:
        p.error("give --dataset (features are extracted if needed) or --features FILE")
    if args.dataset in SHIFT_DATASETS:
        p.error(f"--dataset {args.dataset} is a test-only set: train on imagenet and pass "
                f"--eval-datasets {args.dataset}")
    if args.eval_only != bool(args.load):
        p.error("--eval-only and --load DIR go together")
    recipe, config = overrides_from_args(args)
    return RunRequest(features=args.features, dataset=args.dataset, extraction=extraction_from_args(args),
                      method=args.method, shots=args.shots, seeds=tuple(args.seeds), no_negatives=args.no_negatives,
                      recipe=recipe, config=config, search_val=args.search_val, out=args.out, plots=args.plots,
                      save=args.save,
                      load=args.load, eval_datasets=tuple(args.eval_datasets), device=args.device,
                      overwrite=args.overwrite)


def train_command(argv=None, description=None):
    """train.py: parse the flags into a RunRequest and run it."""
    guarded("train.py", lambda: run(train_request(argv, description)))
