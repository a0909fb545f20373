"""Training-step speed and memory: HeGraphAdapter (full, with negatives), or CoOp (--coop), against Tip-Adapter-F.

What is measured: one training step = forward + backward + torch.optim.AdamW step, on the same random
L2-normalised features (C classes, d = 1024, K = 16 shots, so N = C K cache entries), the batch images
being cache images, trained as train.py trains them (HeGraphAdapter leaves each image's own key out), for
    HeGraphAdapter: variant "full" with negative nodes; parameters W_n, W_p, W_v and b_n, b_p, b_v (3 d^2 + 3 C d).
    Tip-Adapter-F:  baselines.TipAdapter(config=TipConfig(learn_keys=True)); parameters the cache keys (N d).
    CoOp (--coop):  coop.CoOp with its defaults (16 context tokens shared by the classes) through the text encoder
                    of a random CLIP of --coop-backbone's architecture (default RN50: 12 layers of width 512),
                    stepped by SGD as CoOp trains (lr 2e-3, momentum 0.9, L2 5e-4). Its class names are
                    --name-tokens words of one token each, so every prompt is 1 + 16 + names + 2 tokens
                    ("." and EOT); --full-context runs the prompts over the whole context (77 tokens), as
                    CoOp's own code does, instead of cutting them after the EOT token.
The two are timed in the same process, interleaved (after warm-up steps each, the repeats alternate
between the two, swapping which goes first), and the median over the repeats is reported. Batch: 256
for every C, and the whole few-shot set (B = N) where it fits in time and memory.

How to read the ratio: full / Tip-F = milliseconds per HeGraphAdapter step divided by milliseconds per
Tip-Adapter-F step. Below 1 means HeGraphAdapter's step is cheaper. Both share the O(B N d) cache
similarity f F^T; HeGraphAdapter adds O(C^2 d + C d^2) for the graph, Tip-F adds the backward through the
keys (another O(B N d)) and an AdamW update of N d parameters.

Peak memory: on CUDA, torch.cuda.max_memory_allocated during building the model and optimizer and one
step, minus what was allocated before (the input features are not counted). On CPU, the process's peak resident
set (VmHWM, reset to the current RSS with /proc/self/clear_refs just before) minus the RSS at that point,
measured in a fresh subprocess per (method, C, batch), so that the two methods never share a high-water
mark. RSS counts pages touched, so it includes allocator slack and is an upper-bound-ish figure.

    python bench/bench_speed.py                 # C = 47, 1000, 5000 (a few minutes on 2 CPU cores)
    python bench/bench_speed.py --quick         # smoke run: C = 47 only, few repeats
    python bench/bench_speed.py --coop --classes 47 1000 --repeats 3   # CoOp against Tip-F
"""

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from fewshot import backbones
from fewshot.baselines import TipAdapter, TipConfig
from fewshot.coop import CoOp, TextEncoder
from hegraphadapter import HeGraphAdapter, HeGraphConfig

METHODS = ("full", "tipf")   # what is timed, against Tip-F; main() makes it ("coop", "tipf") with --coop
LABELS = {"full": "full", "coop": "CoOp", "tipf": "Tip-F"}
COOP = {"backbone": "RN50", "name_tokens": 6, "full_context": False}   # --coop-backbone, --name-tokens, ...
WORDS = "red blue green small large old young dark light tall short round flat soft hard bright".split()


def unit_randn(rows, d, gen, device):
    """Random unit rows, normalised in place (no second full-size copy, keeps the CPU RSS baseline honest)."""
    x = torch.randn(rows, d, generator=gen)
    x /= x.norm(dim=1, keepdim=True)
    return x.to(device)


def make_features(C, d, K, device, seed=0):
    """pos_text, neg_text [C, d], cache features [C K, d] and their labels [C K], all unit rows."""
    gen = torch.Generator().manual_seed(seed)
    pos, neg = unit_randn(C, d, gen, device), unit_randn(C, d, gen, device)
    cache = unit_randn(C * K, d, gen, device)
    labels = torch.arange(C, device=device).repeat_interleave(K)
    return pos, neg, cache, labels


@functools.cache
def coop_text_encoder(backbone, full_context):
    """The frozen text encoder of a random CLIP of open_clip's architecture `backbone` (its weights do not change
    the time); full_context: never cut the prompts (as CoOp's own code runs them)."""
    oc = backbones.import_open_clip()
    with backbones.quiet_logging():   # "No pretrained weights loaded": random, on purpose
        text = TextEncoder(oc.create_model(backbone), oc.get_tokenizer(backbone), backbone)
    if full_context:
        text.causal = lambda: False   # then CoOp keeps every position of the context
    return text


def class_names(C, tokens):
    """C distinct class names of `tokens` one-token words each."""
    return [" ".join(WORDS[(c // len(WORDS) ** k) % len(WORDS)] for k in range(tokens)) for c in range(C)]


def build(method, feats):
    """The model and its optimizer: AdamW, or for CoOp its SGD."""
    pos, neg, cache, labels = feats
    cfg = HeGraphConfig(variant="full")
    if method == "coop":
        text = coop_text_encoder(COOP["backbone"], COOP["full_context"])
        model = CoOp(text, class_names(len(pos), COOP["name_tokens"]))
        model.train()
        return model, torch.optim.SGD([model.ctx], lr=2e-3, momentum=0.9, weight_decay=5e-4)
    if method == "full":
        model = HeGraphAdapter(pos, neg, cache, labels, config=cfg)
    else:
        model = TipAdapter(pos, cache, labels, config=TipConfig(learn_keys=True))
    model.train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def make_batch(feats, B, seed=1):
    """B cache images (all of them when B = N), their labels and their own cache rows (left out)."""
    _, _, cache, labels = feats
    N = len(labels)
    rows = torch.arange(N) if B >= N else torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:B]
    rows = rows.to(cache.device)
    return cache[rows], labels[rows], rows


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, opt, batch):
    """forward + backward + AdamW step, as train.py takes it (leave-one-out for HeGraphAdapter only)."""
    x, y, rows = batch
    opt.zero_grad(set_to_none=True)
    extra = {"exclude": rows} if isinstance(model, HeGraphAdapter) else {}
    model.loss(x, y, **extra).backward()
    opt.step()


def timed_step(model, opt, batch, device):
    sync(device)
    t0 = time.perf_counter()
    train_step(model, opt, batch)
    sync(device)
    return time.perf_counter() - t0


def time_pair(feats, B, device, warmup, repeats, max_step_s=float("inf")):
    """Median seconds per step of each method, interleaved in one process.

    The first step of each method is a warm-up and a probe: if either takes longer than max_step_s,
    return (None, probe seconds). Slow steps get one warm-up and fewer repeats (> 2 s: 3, > 10 s: 2).
    """
    batch = make_batch(feats, B)
    models = {m: build(m, feats) for m in METHODS}
    probe = {m: timed_step(*models[m], batch, device) for m in METHODS}
    if max(probe.values()) > max_step_s:
        return None, probe
    if max(probe.values()) > 2.0:
        warmup, repeats = 1, min(repeats, 3 if max(probe.values()) < 10.0 else 2)
    for _ in range(warmup - 1):
        for m in METHODS:
            train_step(*models[m], batch)
    times = {m: [] for m in METHODS}
    for r in range(repeats):
        for m in (METHODS if r % 2 == 0 else METHODS[::-1]):
            times[m].append(timed_step(*models[m], batch, device))
    return {m: statistics.median(t) for m, t in times.items()}, len(times[METHODS[0]])


def peak_memory_here(method, C, d, K, B, device):
    """Bytes of peak memory for building `method` and one training step, in this process.

    A step of a tiny model of the same method runs first, so that one-off lazy initialisation (kernels,
    thread pools, autograd engine: ~150-200 MiB of RSS on CPU) is not counted.
    """
    small = make_features(2, d, 1, device)
    train_step(*build(method, small), make_batch(small, 2))
    del small
    feats = make_features(C, d, K, device)
    batch = make_batch(feats, B)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        train_step(*build(method, feats), batch)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    base = reset_peak_rss()
    train_step(*build(method, feats), batch)
    return peak_rss() - base


def _status_kib(key):
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(key + ":")))


def reset_peak_rss():
    """Reset the peak-RSS mark to the current RSS (Linux clear_refs 5) and return the baseline in bytes.

    Without /proc (or without permission) fall back to ru_maxrss: the baseline is then the peak so far,
    and the delta can only under-count.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss():
    try:
        return _status_kib("VmHWM") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def peak_memory(method, C, d, K, B, device):
    """Peak memory in bytes: in-process on CUDA, a fresh subprocess on CPU (ru_maxrss is a high-water mark)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return peak_memory_here(method, C, d, K, B, device)
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory", method, str(C), str(d), str(K), str(B),
           "--device", str(device), "--threads", str(torch.get_num_threads()), "--coop-backbone", COOP["backbone"],
           "--name-tokens", str(COOP["name_tokens"])] + (["--full-context"] if COOP["full_context"] else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["bytes"]


def free_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # MemAvailable counts reclaimable page cache, unlike the free pages
        with open("/proc/meminfo") as f:
            return int(next(line.split()[1] for line in f if line.startswith("MemAvailable:"))) * 1024
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--classes", type=int, nargs="+", default=[47, 1000, 5000],
                   help="class counts C to time (default 47 1000 5000: DTD, ImageNet, a large task)")
    p.add_argument("--dim", type=int, default=1024, help="feature size d (default 1024, RN50's)")
    p.add_argument("--shots", type=int, default=16, help="K shots per class; the cache holds N = C K (default 16)")
    p.add_argument("--batch", type=int, default=256, help="training batch (default 256, the paper's)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each method first (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps of each method; the median is reported")
    p.add_argument("--max-step-s", type=float, default=30.0,
                   help="skip the whole-set batch (B = N) when one step takes longer than this (default 30)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--quick", action="store_true", help="smoke run: C = 47, 1 warm-up, 3 repeats")
    p.add_argument("--coop", action="store_true", help="time CoOp against Tip-F instead of the full model")
    p.add_argument("--coop-backbone", default="RN50", help="open_clip architecture of CoOp's random text encoder, "
                   "or local-dir:FOLDER (default RN50; its output size must be --dim)")
    p.add_argument("--name-tokens", type=int, default=6, help="tokens per class name in CoOp's prompts (default 6)")
    p.add_argument("--full-context", action="store_true", help="CoOp over the whole context, not cut after EOT")
    p.add_argument("--_memory", nargs=5, help=argparse.SUPPRESS)  # internal: method C d K B, one measurement
    args = p.parse_args(argv)
    if args.quick:
        args.classes, args.warmup, args.repeats = [47], 1, 3
    return args


def print_header(device, d, K, warmup, repeats):
    """What is timed, where; a warning when other processes load the CPUs."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {device} ({name}), threads {torch.get_num_threads()}, "
          f"d = {d}, K = {K}, warm-up {warmup}, median of {repeats} interleaved steps")
    if device.type == "cpu":  # other processes on the cores distort CPU timings (each parallel op waits)
        load1, load5, load15 = os.getloadavg()
        print(f"load average before: {load1:.2f} {load5:.2f} {load15:.2f} on {os.cpu_count():d} CPUs")
        if os.getloadavg()[0] > 0.5 and torch.get_num_threads() > 1:
            print("warning: the CPUs are busy; multi-threaded ops then wait for preempted threads and small "
                  "steps slow down many-fold. Compare with --threads 1.")
    mem_what = ("peak CUDA allocated" if device.type == "cuda" else "peak RSS increase, own subprocess")
    first = LABELS[METHODS[0]]
    header = (f"{'C':>5} {'N':>6} {'batch':>6} {first + ' ms':>9} {'Tip-F ms':>9} {'ratio':>6} "
              f"{first + ' MiB':>9} {'Tip-F MiB':>9}   (ms: median per training step; MiB: {mem_what})")
    print(header)
    print("-" * len(header))


def too_big(feats, B, step_small, args, device):
    """Why the whole-set batch is not even tried, or "": B / 256 times the 256-batch step over-estimates
    (fixed costs do not grow with B), so only a step more than 4x over the limit, or [B, N] tensors that do
    not fit, are skipped."""
    N = feats[2].shape[0]
    est_s = max(step_small.values()) * B / args.batch
    est_bytes = 6 * B * N * feats[2].element_size()     # a handful of live [B, N] tensors
    if est_s > 4 * args.max_step_s or est_bytes > 0.6 * free_bytes(device):
        return (f"skipped: est. <= {est_s:.0f} s per step (limit {args.max_step_s:.0f} s), ~{est_bytes / 2**30:.1f} "
                f"GiB of [B, N] tensors ({free_bytes(device) / 2**30:.1f} GiB available)")
    return ""


def time_class_count(C, args, device):
    """The rows of one C: batch 256, then the whole few-shot set where it fits in time and memory."""
    d, K = args.dim, args.shots
    N = C * K
    feats = make_features(C, d, K, device)
    step_small = None
    for B in dict.fromkeys([min(args.batch, N), N]):
        row = f"{C:>5} {N:>6} {B:>6}"
        limit = float("inf")
        if B > args.batch:
            if why := too_big(feats, B, step_small, args, device):
                print(f"{row}   {why}")
                continue
            limit = args.max_step_s
        sec, n = time_pair(feats, B, device, args.warmup, args.repeats, limit)
        if sec is None:
            print(f"{row}   skipped: one step took {n[METHODS[0]]:.0f} s ({LABELS[METHODS[0]]}), {n['tipf']:.0f} s "
                  f"(Tip-F); limit {args.max_step_s:.0f} s")
            continue
        if B <= args.batch:
            step_small = sec
        mem = {m: float("nan") for m in METHODS}
        if not args.no_memory:
            mem = {m: peak_memory(m, C, d, K, B, device) / 2**20 for m in METHODS}
        first = METHODS[0]
        print(f"{row} {sec[first] * 1e3:>9.1f} {sec['tipf'] * 1e3:>9.1f} "
              f"{sec[first] / sec['tipf']:>6.2f} {mem[first]:>9.0f} {mem['tipf']:>9.0f}"
              + (f"   (median of {n})" if n != args.repeats else ""), flush=True)


def main(argv=None):
    global METHODS
    args = parse_args(argv)
    if args.coop:
        METHODS = ("coop", "tipf")
    COOP.update(backbone=args.coop_backbone, name_tokens=args.name_tokens, full_context=args.full_context)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory:
        method, *sizes = args._memory
        print(json.dumps({"bytes": peak_memory_here(method, *map(int, sizes), device)}))
        return
    print_header(device, args.dim, args.shots, args.warmup, args.repeats)
    t_start = time.perf_counter()
    for C in args.classes:
        time_class_count(C, args, device)
    load = f" load average after: {os.getloadavg()[0]:.2f}" if device.type == "cpu" else ""
    print(f"total {time.perf_counter() - t_start:.0f} s.{load}")


if __name__ == "__main__":
    main()
