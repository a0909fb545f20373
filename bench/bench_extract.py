"""Extraction speed: the project's extraction against its bare encoder, and today's settings beside the chosen ones.

For each backbone, a CLIP of the real architecture with random weights (open_clip's initialisation, or with
--init unit the test fixtures'; either costs what the released weights cost) is saved in OpenAI's format and loaded
as the project loads a --clip-checkpoint, and a folder of photo-like JPEGs (500 x 375 by default) is written to a
temporary folder. In one process, interleaved
(each repeat runs every measurement, in alternating order), median of the repeats, in views per second:

    encoder      the bare encoder on pre-made tensors (pace.image_features: the layout, autocast, forward), for
                 each precision, layout and batch size of a small grid
    loader       decoding, preprocessing and augmentation alone: the project's DataLoader over the folder
                 (extraction.loader), nothing encoded
    end to end   the project's encoding of the folder (extraction.encode_images: loader, encoder, normalisation),
                 for training images (10 views each: CLIP's preprocessing and 9 augmented crops) and test images
                 (1 view); e2e / best = end to end over the best bare encoder of the grid
    today        the settings before issue 28: fp32, batch 256, min(8, cores) workers, the ResNet not channels-last
    fp32         the settings pace.choose_pace chooses for the device and the backbone at --precision fp32
    chosen       the settings it chooses at --precision auto (the default), where they differ

Each setting's features are compared with today's (fp32), row by row (cosine, minimum), and the README's main
command (DTD with RN50) is timed from the end-to-end rates. Last, one whole extract_features call with its defaults
(load, check batch, text, images, write) on a folder dataset, timed once.

    python bench/bench_extract.py                          # RN50 and ViT-B/32 on cpu (and cuda when there is one)
    python bench/bench_extract.py --backbones RN50 --repeats 5
    python bench/bench_extract.py --quick                  # a smoke run on tiny models (seconds)
"""
import argparse
import dataclasses
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fewshot import backbones, extraction, pace
from fewshot.features import Settings
from fewshot.pace import Pace
from fewshot.testing.fixtures import TINY_CLIPS, OpenAIArch, openai_state_dict

ARCHS = {  # OpenAI's sizes (backbones.arch_name names them RN50 and ViT-B/32), and the tiny test CLIPs for --quick
    "RN50": OpenAIArch(vision_layers=(3, 4, 6, 3), vision_width=64, patch_size=None, image_size=224, embed_dim=1024,
                       text_width=512, text_layers=12),
    "ViT-B/32": OpenAIArch(vision_layers=12, vision_width=768, patch_size=32, image_size=224, embed_dim=512,
                           text_width=512, text_layers=12),
    **{f"tiny-{kind}": arch for kind, arch in TINY_CLIPS.items()},
}
DTD = (1694 * 10, 471 + 1692)  # the README's main command: training views, and one-view (val, test) images
GRID = {"RN50": (16, 32, 64, 256), "ViT-B/32": (32, 64, 128, 256)}  # batch sizes of the bare encoder's grid
MIN_VIEWS = 64  # each timing encodes at least this many views (whole batches)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like image: smooth colour regions, edges and sensor noise (JPEG sizes and decode times of a photo,
    not of flat colour or of pure noise)."""
    coarse = Image.fromarray(rng.integers(0, 256, (height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8))
    x = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
    x[: height // 2, : width // 3] *= 0.6                                   # an edge
    return Image.fromarray((x + rng.normal(0, 6, x.shape)).clip(0, 255).astype(np.uint8))


def write_folder(folder: Path, classes: int, per_class: int, size: tuple[int, int]) -> list[str]:
    """folder/<class>/<i>.jpg (quality 90); returns the relative paths, class by class."""
    rng, paths = np.random.default_rng(0), []
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            photo(rng, *size).save(folder / f"class{c}" / f"{i}.jpg", quality=90)
            paths.append(f"class{c}/{i}.jpg")
    return paths


def random_weights(name: str, init: str) -> dict:
    """A random CLIP `name` as an OpenAI-format state dict (float16, as released). init "open_clip": open_clip's
    initialisation (create_model without weights; a ResNet's residual branches start at zero); "unit": the test
    fixtures' weights, every layer's activations near unit size (a chaotic network: each layer amplifies rounding
    errors). The tiny test CLIPs have the fixtures' weights."""
    if init == "unit" or name.startswith("tiny-"):
        return openai_state_dict(ARCHS[name])
    with torch.random.fork_rng(devices=[]), backbones.quiet_logging():
        torch.manual_seed(0)
        model = backbones.import_open_clip().create_model(backbones.OPENAI_NAMES[name], pretrained=None)
    return {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}


def checkpoint(name: str, init: str, folder: Path) -> Path:
    """The backbone's random CLIP in OpenAI's format in `folder` (what --clip-checkpoint reads), written once."""
    path = folder / f"{name.replace('/', '-')}-{init}.pt"
    if not path.exists():
        torch.save(random_weights(name, init), path)
    return path


def load_encoders(path: Path, device: torch.device):
    """The backbone as the project loads it (chosen) and as it was loaded before issue 28 (today: contiguous)."""
    settings = backbones.resolve(Settings("bench", clip_checkpoint=str(path)))
    chosen = backbones.load(settings, device)
    today = backbones.load(settings, device)
    today.model.visual.to(memory_format=torch.contiguous_format)
    return chosen, dataclasses.replace(today, channels_last=False)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader's workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(run, views: int, device: torch.device) -> tuple[float, float]:
    """Views per second of wall-clock time, and CPU milliseconds per view (every thread and worker: the work,
    which other processes on the cores inflate less than the wall-clock time)."""
    sync(device)
    start, cpu = time.perf_counter(), cpu_seconds()
    run()
    sync(device)
    return views / (time.perf_counter() - start), (cpu_seconds() - cpu) * 1e3 / views


def bare(encoder, precision: str, batch: int, device: torch.device):
    """A timing of the bare encoder: pre-made tensors [batch, 3, H, W], whole batches up to MIN_VIEWS views."""
    x = torch.randn(batch, 3, *encoder.preprocess.size, generator=torch.Generator().manual_seed(0)).to(device)
    passes = -(-MIN_VIEWS // batch)

    def run():
        for _ in range(passes):
            pace.image_features(encoder, x, precision, device)
    return run, passes * batch


def loader_only(files, how: Pace, device: torch.device):
    """A timing of decoding, preprocessing and augmentation alone, through the project's DataLoader."""
    def run():
        for x, *_ in extraction.loader(files, how, device):
            x.to(device)
    return run, len(files) * files.views.views


def end_to_end(encoder, files, how: Pace, device: torch.device, out: dict, key):
    """A timing of the project's encoding; its features are kept in out[key]."""
    def run():
        out[key] = extraction.encode_images(encoder, files, how, device, "")
    return run, len(files) * files.views.views


def measure(timings: dict, repeats: int, device: torch.device) -> tuple[dict, dict]:
    """{key: median views/s} and {key: median CPU ms per view} of the timings {key: (run, views)}, interleaved:
    each repeat runs all of them, in alternating order, after one untimed warm-up run of each bare encoder's (the
    loader and end-to-end runs start their own DataLoader and workers each time, as an extraction does)."""
    for key, (run, _) in timings.items():
        if key[0] == "bare":
            run()
    found = {key: [] for key in timings}
    keys = list(timings)
    for r in range(repeats):
        for key in keys if r % 2 == 0 else keys[::-1]:
            found[key].append(timed(*timings[key], device))
        print(f"  repeat {r + 1} of {repeats} done, load average {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    median = lambda i: {key: statistics.median(t[i] for t in v) for key, v in found.items()}
    return median(0), median(1)


def bench_backbone(name: str, args, tmp: Path, paths: list[str], device: torch.device):
    """The tables' rows of one backbone on one device: the bare encoder's grid, and the loader alone and end to
    end at today's settings, at the chosen ones with --precision fp32, and at the chosen ones (auto)."""
    chosen, today = load_encoders(checkpoint(name, args.init, tmp), device)
    folder = tmp / "images"
    check = extraction.check_batch(chosen, folder, paths, [f"a photo of a {c}." for c in ("cat", "dog", "car")])
    # extract_features' defaults before issue 28 (it autocast to fp16 on CUDA)
    before = Pace("fp16" if device.type == "cuda" else "fp32", 256, 256, args.today_workers)
    precision = pace.choose_precision(chosen, pace.fast_precision(device), device, check)  # as --precision auto
    auto = pace.choose_pace(chosen, precision, args.batch_size, args.workers, device)
    exact = pace.choose_pace(chosen, "fp32", args.batch_size, args.workers, device)
    settings = {"today": (today, before), "fp32": (chosen, exact), "chosen": (chosen, auto)}
    if auto == exact:  # auto fell back to fp32: one row
        del settings["fp32"]
    grid = args.batches or GRID.get(name, (auto.batch_size,))
    configs = [(before.precision, False, before.batch_size)] if chosen.channels_last else []  # today's encoder
    configs += [(p, chosen.channels_last, b) for p in dict.fromkeys(["fp32", pace.fast_precision(device)])
                for b in grid]
    timings = {("bare", *c): bare(chosen if c[1] else today, c[0], c[2], device) for c in configs}
    sets = {"train": (paths[:args.train_images], args.views), "test": (paths[:args.test_images], 1)}
    features = {}
    for split, (subset, views) in sets.items():
        for label, (encoder, p) in settings.items():
            files = extraction.ImageFiles(folder, subset, extraction.Views(encoder.transform, encoder.preprocess,
                                                                           views))
            timings[("loader", split, label)] = loader_only(files, p, device)
            timings[("e2e", split, label)] = end_to_end(encoder, files, p, device, features, (split, label))
    rates, cpu = measure(timings, args.repeats, device)
    best = max((r, k) for k, r in rates.items() if k[0] == "bare")
    rows = []
    for label, (encoder, p) in settings.items():
        train, test = (rates[("e2e", split, label)] for split in sets)
        row = dict(backbone=name, settings=label, pace=p, channels_last=encoder.channels_last,
                   dtd_s=DTD[0] / train + DTD[1] / test)
        for split in sets:
            cos = F.cosine_similarity(features[(split, label)].float(), features[(split, "today")].float(), dim=-1)
            e2e = rates[("e2e", split, label)]
            rows.append(dict(row, split=split, views=sets[split][1], loader=rates[("loader", split, label)], e2e=e2e,
                             ratio=e2e / best[0], speedup=e2e / rates[("e2e", split, "today")],
                             cosine=cos.min().item(), loader_ms=cpu[("loader", split, label)],
                             e2e_ms=cpu[("e2e", split, label)]))
    grid_rows = [dict(backbone=name, precision=k[1], channels_last=k[2], batch=k[3], rate=r, ms=cpu[k],
                      best=k == best[1], today=k[1:] == (before.precision, False, before.batch_size))
                 for k, r in rates.items() if k[0] == "bare"]
    return grid_rows, rows


def whole_call(name: str, args, tmp: Path, device: torch.device) -> str:
    """One extract_features call with its defaults on a folder dataset of 4 classes (train 50 %, val 20 %, test
    30 %, as datasets.py splits a folder), timed once: what a user waits for, fixed costs included."""
    images = tmp / "dataset"
    if not images.exists():
        write_folder(images, 4, args.whole_per_class, tuple(args.size))
    settings = Settings(str(images), clip_checkpoint=str(checkpoint(name, args.init, tmp)), seeds=(1,),
                        max_shots=args.whole_shots, views=args.views)
    start = time.perf_counter()
    path = extraction.extract_features(settings, tmp, tmp / f"features-{device.type}", workers=args.workers,
                                       batch_size=args.batch_size, device=device)
    seconds = time.perf_counter() - start
    f = torch.load(path, weights_only=True)
    n = sum(f[s]["features"].shape[-2] * (f[s]["features"].shape[0] if s == "train" else 1)
            for s in ("train", "val", "test") if s in f)
    e = f["encoding"]
    return (f"{name}: extract_features on {images.name}/ ({n} views): {seconds:.1f} s in all, {n / seconds:.1f} "
            f"views/s with the load and the check batch; recorded precision {f['settings']['precision']}, batch "
            f"{e['batch_size']}, workers {e['workers']}, threads {e['threads']}, channels_last {e['channels_last']}")


def ms(x: float) -> str:
    """CPU milliseconds, to 2 or 3 significant digits."""
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def print_tables(device: torch.device, grid_rows: list, rows: list, wholes: list):
    print(f"\nbare encoder on {device}, views/s (median; * the best, today: the setting before issue 28)", flush=True)
    print("| backbone | precision | layout | batch | views/s | CPU ms/view |\n|---|---|---|---:|---:|---:|")
    for g in grid_rows:
        mark = " *" if g["best"] else " (today)" if g["today"] else ""
        layout = "channels_last" if g["channels_last"] else "contiguous"
        print(f"| {g['backbone']} | {g['precision']} | {layout} | {g['batch']} | {g['rate']:.1f}{mark} | "
              f"{ms(g['ms'])} |")
    print(f"\nextraction on {device}, views/s (median; CPU ms per view in brackets): loader alone, end to end, end "
          f"to end / best bare encoder, speed-up over today, min cosine to today's (fp32) features")
    print("| backbone | images | settings | precision, batch, workers | loader | end to end | e2e / best | "
          "speed-up | cosine |\n|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        p = r["pace"]
        what = f"{p.precision}{' channels_last' if r['channels_last'] else ''}, {p.batch_size}, {p.workers}"
        print(f"| {r['backbone']} | {r['split']} ({r['views']} view{'s' if r['views'] > 1 else ''}) | "
              f"{r['settings']} | {what} | {r['loader']:.1f} ({ms(r['loader_ms'])}) | {r['e2e']:.1f} "
              f"({ms(r['e2e_ms'])}) | {r['ratio']:.2f} | {r['speedup']:.2f}x | {r['cosine']:.5f} |")
    print(f"\nthe README's main command on {device} (DTD: {DTD[0]:,} training views, {DTD[1]:,} one-view images), "
          f"from the end-to-end rates above")
    print("| backbone | settings | images/s | time | speed-up |\n|---|---|---:|---:|---:|")
    for r in rows[::2]:
        today = next(t for t in rows if t["backbone"] == r["backbone"] and t["settings"] == "today")
        print(f"| {r['backbone']} | {r['settings']} | {sum(DTD) / r['dtd_s']:.1f} | {r['dtd_s'] / 60:.0f} min | "
              f"{today['dtd_s'] / r['dtd_s']:.2f}x |")
    print()
    for line in wholes:
        print(line, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["RN50", "ViT-B/32"], choices=list(ARCHS))
    p.add_argument("--devices", nargs="+", default=["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of every measurement (default 3)")
    p.add_argument("--train-images", type=int, default=50, help="training images, 10 views each (default 50)")
    p.add_argument("--test-images", type=int, default=256, help="test images, 1 view each (default 256)")
    p.add_argument("--views", type=int, default=10, help="views per training image (default 10, as extraction)")
    p.add_argument("--size", type=int, nargs=2, default=[500, 375], help="JPEG width and height (default 500 375)")
    p.add_argument("--init", choices=["open_clip", "unit"], default="open_clip",
                   help="the random weights (random_weights; default open_clip's initialisation)")
    p.add_argument("--batches", type=int, nargs="+", help="the bare encoder's batch sizes (default per backbone)")
    p.add_argument("--batch-size", type=int, help="the chosen settings' batch size (default: choose_pace's)")
    p.add_argument("--workers", type=int, help="the chosen settings' workers (default: choose_pace's)")
    p.add_argument("--today-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="today's workers (default min(8, CPU count), extract_features' default before issue 28)")
    p.add_argument("--threads", type=int, default=pace.cpu_cores(),
                   help="torch's CPU threads (default: the cores this process may use)")
    p.add_argument("--whole-per-class", type=int, default=20, help="images per class of the whole call's folder")
    p.add_argument("--whole-shots", type=int, default=4, help="max-shots of the whole call (default 4)")
    p.add_argument("--quick", action="store_true", help="a smoke run: the tiny models, small images, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.backbones, args.repeats, args.size = ["tiny-resnet", "tiny-vit"], 1, [64, 48]
        args.train_images, args.test_images, args.batches, args.whole_per_class, args.whole_shots = 4, 8, [8], 10, 2
        args.workers = args.today_workers = 0  # no worker processes to start: seconds each on a busy machine
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    images = max(args.train_images, args.test_images)
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {pace.cpu_cores()} cores, {torch.get_num_threads()} threads, native "
          f"bf16: {pace.native_bf16()}, nice {os.nice(0)}, load average before: {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}; {images} JPEGs {args.size[0]} x {args.size[1]}; weights: {args.init}; median of "
          f"{args.repeats}", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        tmp = Path(tmp)
        paths = write_folder(tmp / "images", 1, images, tuple(args.size))
        for device in map(torch.device, args.devices):
            grid_rows, rows, wholes = [], [], []
            for name in args.backbones:
                g, r = bench_backbone(name, args, tmp, paths, device)
                grid_rows += g
                rows += r
                wholes.append(whole_call(name, args, tmp, device))
            print_tables(device, grid_rows, rows, wholes)
    load = os.getloadavg()
    print(f"total {time.perf_counter() - start:.0f} s; load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
