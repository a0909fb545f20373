"""Which CLIP encodes a dataset, and that model loaded with its own preprocessing and tokenizer.

The encoder library is open_clip (Ilharco et al., "OpenCLIP", 2021), which loads OpenAI's CLIP (Radford et al.,
2021) and the models trained since (LAION, DataComp, MetaCLIP, SigLIP, ...). A model is named one of four ways:

    --backbone ViT-B/16                                 OpenAI's weights under OpenAI's names (default RN50)
    --backbone ViT-B-16 --pretrained laion2b_s34b_b88k  an open_clip model and its weights: a tag or a file
    --backbone hf-hub:ORG/REPO or local-dir:FOLDER      a model folder in open_clip's layout, on the hub or on disk
    --clip-checkpoint PATH                              an OpenAI-format checkpoint (state dict or TorchScript, as
                                                        clip.load caches them), named from the sizes of its weights

resolve() turns the flags into the (backbone, pretrained) pair a features file records; weights() says which
weights those are, by content; load() builds the model.
Importing this module is cheap: open_clip (seconds to import) is imported when a model is read or loaded.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import threading
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fewshot import files
from fewshot.errors import DataError
from fewshot.files import check_regular, load_torch_file

if TYPE_CHECKING:  # the features file's Settings name the model; that module imports this one
    from fewshot.features import Settings

OPENAI_NAMES = {  # OpenAI's names of its CLIP models (clip.available_models()) -> open_clip's names of them
    "RN50": "RN50", "RN101": "RN101", "RN50x4": "RN50x4", "RN50x16": "RN50x16", "RN50x64": "RN50x64",
    "ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14", "ViT-L/14@336px": "ViT-L-14-336",
}
OPENAI_TAG = "openai"                   # open_clip's tag of OpenAI's weights
SCHEMAS = ("hf-hub:", "local-dir:")     # open_clip's model folders: on the Hugging Face hub, on disk


@contextlib.contextmanager
def quiet_logging():
    """open_clip logs the errors it then raises, which this project reports once, in one line."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def import_open_clip():
    """open_clip, imported on first use (it imports timm and torchvision, which train.py needs only to extract
    features or to run coop)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # timm's and huggingface_hub's deprecation notices
        import open_clip
    return open_clip


# ----------------------------------------------------------------------------- names

def resolve(settings: Settings) -> Settings:
    """The settings with the model named as a features file records it, or one DataError line.

    backbone: OpenAI's name for OpenAI's weights (ViT-B-32 and ViT-B/32 are one model), open_clip's name for
    other weights, hf-hub:ORG/REPO, local-dir:/absolute/folder, or for a --clip-checkpoint the architecture read
    from its weights. pretrained: "openai" for OpenAI's names, another tag, a weights file's absolute path, or
    None (the model brings its weights). Resolving resolved settings changes nothing.
    """
    backbone, pretrained, checkpoint = settings.backbone, settings.pretrained, settings.clip_checkpoint
    if checkpoint:
        if pretrained is not None:
            raise DataError(f"--pretrained {pretrained} names weights for --backbone, and --clip-checkpoint "
                            f"{checkpoint} brings its own: drop one of them")
        found = arch_name(openai_arch(read_checkpoint(checkpoint), checkpoint))
        if backbone is not None and _openai_spelling(backbone) != found:
            raise DataError(f"--backbone {backbone} does not match --clip-checkpoint {checkpoint}, whose weights are "
                            f"a {found}: drop --backbone (a checkpoint's name is read from its weights)")
        return dataclasses.replace(settings, backbone=found, pretrained=None)
    backbone = backbone or "RN50"
    if backbone.startswith(SCHEMAS):
        if pretrained is not None:
            raise DataError(f"--pretrained {pretrained}: --backbone {backbone} brings its own weights; drop "
                            f"--pretrained")
        if backbone.startswith("local-dir:"):
            folder = Path(backbone.removeprefix("local-dir:")).expanduser().resolve()
            if not (folder / "open_clip_config.json").is_file():
                raise DataError(f"--backbone {backbone}: {folder} holds no open_clip_config.json; a local-dir: "
                                f"model is a folder in open_clip's layout: open_clip_config.json and its weights "
                                f"(open_clip_model.safetensors or open_clip_pytorch_model.bin)")
            backbone = f"local-dir:{folder}"
        return dataclasses.replace(settings, backbone=backbone)
    if pretrained is None and _openai_spelling(backbone) in OPENAI_NAMES:
        pretrained = OPENAI_TAG                       # the paper's backbones: OpenAI's weights by default
    if pretrained == OPENAI_TAG and _openai_spelling(backbone) in OPENAI_NAMES:
        backbone = _openai_spelling(backbone)         # ViT-B-32 + openai is OpenAI's ViT-B/32
    elif backbone in OPENAI_NAMES:
        backbone = OPENAI_NAMES[backbone]             # ViT-B/32 + laion2b_e16 is open_clip's ViT-B-32
    if pretrained and Path(pretrained).expanduser().is_file():
        pretrained = str(Path(pretrained).expanduser().resolve())
    return dataclasses.replace(settings, backbone=backbone, pretrained=pretrained)


def _openai_spelling(name: str) -> str:
    """OpenAI's name of an open_clip name of one of OpenAI's models (ViT-L-14-336 -> ViT-L/14@336px), else name."""
    return next((openai for openai, ours in OPENAI_NAMES.items() if ours == name), name)


# ----------------------------------------------------------------------------- which weights, by content

def weights(settings: Settings, known: dict | None = None) -> dict:
    """The weights of resolved `settings`, identified by their content: what every feature made with them depends on.

    {"at": where they are read from, "content": what is compared, "files": {path: (sha256, stat)}}. A
    --clip-checkpoint or a --pretrained file is its sha256, a local-dir: folder the sha256 of each of its files
    (config, weights, tokenizer), so that the same weights copied elsewhere are the same and a file replaced at
    the same path is not; a hub tag is its name and tag (open_clip downloads and caches the file itself), an
    hf-hub: model its name. known: an earlier record, whose hashes a file keeps while its size, times and inode
    are unchanged (files.fingerprints).
    """
    old = {p: tuple(v) for p, v in (known or {}).get("files", {}).items()}
    single = settings.clip_checkpoint or (settings.pretrained if settings.pretrained and
                                          Path(settings.pretrained).is_file() else None)
    if single:
        path = str(Path(single).resolve())
        found = files.fingerprints([path], old)
        return {"at": path, "content": {"sha256": found[path][0]}, "files": found}
    if settings.backbone.startswith("local-dir:"):
        folder = Path(settings.backbone.removeprefix("local-dir:"))
        paths = sorted(str(p) for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        found = files.fingerprints(paths, old)
        return {"at": str(folder), "content": {"sha256": {Path(p).name: found[p][0] for p in paths}}, "files": found}
    if settings.backbone.startswith("hf-hub:"):
        return {"at": None, "content": {"hub": settings.backbone}, "files": {}}
    return {"at": None, "content": {"tag": f"{settings.backbone}:{settings.pretrained}"}, "files": {}}


# ----------------------------------------------------------------------------- OpenAI-format checkpoints

def _is_torchscript(path: Path) -> bool:
    """True for a TorchScript archive (OpenAI's released files): a zip holding constants.pkl."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_checkpoint(path) -> dict:
    """The tensors of an OpenAI-format checkpoint: a state dict saved by torch.save (mapped, not read), also
    inside {"state_dict": ...} with or without DataParallel's "module." prefix, or a TorchScript archive."""
    path = Path(path)
    check_regular(path, "--clip-checkpoint")
    if _is_torchscript(path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")         # torch.jit.load is deprecated, not gone
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except Exception as e:
            raise DataError(f"--clip-checkpoint {path} is a TorchScript archive that cannot be read "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    state = load_torch_file(path, "--clip-checkpoint", mmap=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DataError(f"--clip-checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def openai_arch(state: dict, path) -> dict:
    """The sizes of the CLIP in an OpenAI-format state dict, read as open_clip's build_model_from_openai_state_dict
    reads them: embed_dim, vision (layers, width, patch_size, image_size) and text (context_length, vocab_size,
    width, layers)."""
    try:
        if "visual.proj" in state:   # a VisionTransformer
            patch = state["visual.conv1.weight"].shape[-1]
            vision = dict(layers=sum(k.startswith("visual.") and k.endswith(".attn.in_proj_weight") for k in state),
                          width=state["visual.conv1.weight"].shape[0], patch_size=patch,
                          image_size=patch * round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5))
        else:                        # a ModifiedResNet: bottlenecks per stage, stem width, attention pool grid
            vision = dict(layers=[len({k.split(".")[2] for k in state if k.startswith(f"visual.layer{b}.")})
                                  for b in (1, 2, 3, 4)],
                          width=state["visual.layer1.0.conv1.weight"].shape[0], patch_size=None,
                          image_size=32 * round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5))
        text = dict(context_length=state["positional_embedding"].shape[0],
                    vocab_size=state["token_embedding.weight"].shape[0], width=state["ln_final.weight"].shape[0],
                    layers=len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}))
        return dict(embed_dim=state["text_projection"].shape[1], vision=vision, text=text)
    except (KeyError, AttributeError, IndexError) as e:
        raise DataError(f"--clip-checkpoint {path} is a torch file but not an OpenAI CLIP checkpoint (a state dict "
                        f"or TorchScript archive as clip.load reads; it lacks {e})") from None


def arch_name(arch: dict) -> str:
    """OpenAI's name of the architecture (ViT-B/32, RN50, ...) if it is one of OpenAI's, every size equal;
    else a name built from its sizes: ViT-l{layers}-w{width}-p{patch}-{image}px-d{embed_dim}, or for a ResNet
    RN-l{blocks per stage, dotted}-w{width}-{image}px-d{embed_dim}."""
    config = import_open_clip().get_model_config
    for openai, name in OPENAI_NAMES.items():
        c = config(name)
        known = dict(embed_dim=c["embed_dim"], vision={k: c["vision_cfg"][k] for k in arch["vision"]},
                     text={k: c["text_cfg"][k] for k in arch["text"]})
        if known == arch:
            return openai
    v, d = arch["vision"], arch["embed_dim"]
    if v["patch_size"]:
        return f"ViT-l{v['layers']}-w{v['width']}-p{v['patch_size']}-{v['image_size']}px-d{d}"
    return f"RN-l{'.'.join(map(str, v['layers']))}-w{v['width']}-{v['image_size']}px-d{d}"


# ----------------------------------------------------------------------------- loading

@dataclass(frozen=True)
class Preprocess:
    """How a model wants its images: open_clip's preprocessing configuration of the model."""
    size: tuple[int, int]                 # input height and width in pixels
    mean: tuple[float, ...]               # per-channel mean subtracted after scaling to 0..1
    std: tuple[float, ...]                # per-channel std divided by
    interpolation: str = "bicubic"        # resampling of every resize: "bicubic" or "bilinear"


@dataclass(frozen=True)
class Encoder:
    """A loaded CLIP: the model (encode_image, encode_text, logit_scale), its tokenizer and its preprocessing."""
    model: torch.nn.Module                        # in eval mode, float32, on the device asked for
    tokenize: Callable[[list[str]], torch.Tensor]  # sentences -> [n, context_length] token ids
    preprocess: Preprocess                        # what the augmented views use
    transform: Callable                           # view 0: the model's own eval transform, PIL image -> [3, H, W]
    config: dict | None = None                    # open_clip's preprocessing configuration of it, as plain values
    channels_last: bool = False                   # the image tower is convolutional and laid out channels-last


def load(settings: Settings, device: torch.device) -> Encoder:
    """The CLIP of resolved `settings` on `device`, or one DataError line (a name open_clip does not know,
    weights that cannot be downloaded or read)."""
    oc = import_open_clip()
    if settings.clip_checkpoint:
        model = _load_openai_checkpoint(oc, settings.clip_checkpoint)
        source = f"--clip-checkpoint {settings.clip_checkpoint}"
        tokenizer = oc.SimpleTokenizer(context_length=model.context_length)  # OpenAI's BPE, as clip.tokenize
    else:
        name = OPENAI_NAMES.get(settings.backbone, settings.backbone)  # open_clip's name of it
        with quiet_logging():
            model, source = _create(oc, name, settings.pretrained, settings.name)
            tokenizer = oc.get_tokenizer(name)
    check_finite(model, source)
    model = model.to(device).float().eval().requires_grad_(False)  # frozen: no autograd state is ever kept
    channels_last = is_convolutional(model.visual)
    if channels_last:  # oneDNN's and cuDNN's fast convolutions read NHWC: the same arithmetic, in another order
        model.visual.to(memory_format=torch.channels_last)
    cfg = oc.get_model_preprocess_cfg(model)                                # [size, mean, std, ...]
    size = cfg["size"] if isinstance(cfg["size"], (tuple, list)) else (cfg["size"], cfg["size"])
    preprocess = Preprocess(size=tuple(size), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                            interpolation=cfg.get("interpolation", "bicubic"))
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in {**cfg, "size": preprocess.size}.items()}
    return Encoder(model, tokenizer, preprocess, eval_transform(config), config, channels_last)


def is_convolutional(visual: torch.nn.Module) -> bool:
    """True for a convolutional image tower (CLIP's ModifiedResNet, a ConvNeXt): more convolutions than a vision
    transformer's single patch embedding."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in visual.modules()) > 1


def eval_transform(config: dict) -> Callable:
    """View 0 of a preprocessing configuration (Encoder.config, as a features file and a model file record it):
    what open_clip's create_model_and_transforms gives as the model's eval transform (resize mode too)."""
    oc = import_open_clip()
    known = {f.name for f in dataclasses.fields(oc.transform.PreprocessCfg)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in known}
    return oc.transform.image_transform_v2(oc.transform.PreprocessCfg(**values), is_train=False)


def _load_openai_checkpoint(oc, path: str):
    """An OpenAI-format checkpoint built by open_clip's builder (QuickGELU, as OpenAI trained), with OpenAI's
    preprocessing: bicubic resize of the short side, centre crop, OpenAI's mean and std."""
    state = read_checkpoint(path)
    try:
        model = oc.model.build_model_from_openai_state_dict(state, cast_dtype=None)
    except (KeyError, RuntimeError, AssertionError) as e:
        first = misfit(e) or (str(e).strip().splitlines()[0] if str(e).strip() else "")
        raise DataError(f"--clip-checkpoint {path} is a torch file but not an OpenAI CLIP checkpoint (a state dict "
                        f"or TorchScript archive as clip.load reads; {type(e).__name__}: {first[:200]})") from None
    size = model.visual.image_size
    oc.set_model_preprocess_cfg(model, dataclasses.asdict(oc.transform.PreprocessCfg(size=size)))
    return model


def check_finite(model: torch.nn.Module, source: str):
    """One line naming the weights' source if any tensor of the model holds NaN or infinite values (a damaged or
    diverged checkpoint): such a model encodes every image as NaN."""
    bad = [k for k, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise DataError(f"{source}: {len(bad)} of the model's tensors hold NaN or infinite values (e.g. {bad[0]}), so "
                        f"every feature would be NaN; the weights are damaged: replace the file")


def misfit(e: Exception) -> str:
    """What load_state_dict's error says in a few words: the tensors missing, unexpected, or of another shape
    ("" if it is not such an error)."""
    text = str(e)
    found = []
    for what, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*?)\.\s*$"),
                          ("unexpected", r"Unexpected key\(s\) in state_dict: (.*?)\.\s*$")):
        for match in re.finditer(pattern, text, flags=re.M):
            keys = re.findall(r'"([^"]+)"', match[1])
            found.append(f"{len(keys)} {what} tensors (e.g. {', '.join(keys[:2])})")
    shapes = re.findall(r"size mismatch for ([^:]+):", text)
    if shapes:
        found.append(f"{len(shapes)} tensors of another shape (e.g. {shapes[0]})")
    return "; ".join(found)


# ----------------------------------------------------------------------------- weights from the hub, or not

HUB_TIMEOUT_S = 5  # how long the hub may take to answer the one question whether it can be reached


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache() -> Path:
    """Where huggingface_hub keeps its downloads, as it reads the environment (HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "huggingface"
    return Path(home).expanduser() / "hub"


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


@functools.cache
def _hub_unreachable(endpoint: str) -> str:
    """Why the hub cannot be reached ("" if it answers): asked once per process, and never longer than
    HUB_TIMEOUT_S (a name lookup can hang for longer than any socket timeout, so it runs in a thread)."""
    answer = []

    def ask():
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_TIMEOUT_S).close()
            answer.append("")
        except urllib.error.HTTPError:  # it answered, if only with an error: it can be reached
            answer.append("")
        except Exception as e:
            answer.append(f"{endpoint} does not answer: {getattr(e, 'reason', e)}")
    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    asker.join(HUB_TIMEOUT_S + 1)
    return answer[0] if answer else f"{endpoint} did not answer within {HUB_TIMEOUT_S} s"


def offline_reason() -> str:
    """Why no download can be made now ("" if the hub can be reached): HF_HUB_OFFLINE, or no answer."""
    if _env_true("HF_HUB_OFFLINE"):
        return "HF_HUB_OFFLINE is set"
    return _hub_unreachable(hub_endpoint())


def _cached(repo: str, names) -> bool:
    """True if one of the files `names` of hub repository `repo` is in the local cache."""
    from huggingface_hub import try_to_load_from_cache
    return any(isinstance(try_to_load_from_cache(repo, n, cache_dir=hub_cache()), str) for n in names)


def _weight_names(filename: str | None) -> tuple[str, ...]:
    """The weights files open_clip looks for in a hub repository (a .safetensors twin first)."""
    filename = filename or "open_clip_pytorch_model.bin"
    safe = "open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin" else \
        filename.rsplit(".", 1)[0] + ".safetensors"
    return safe, filename


def check_downloadable(oc, name: str, pretrained: str | None, shown: str):
    """Before open_clip tries (and retries, for close to a minute) to download weights it cannot get: one line
    naming the file to fetch by hand, and how to use it, when the weights are not cached and the hub cannot
    be reached. Weights that are cached, or a hub that answers, pass."""
    if name.startswith("hf-hub:"):
        repo = name.removeprefix("hf-hub:")
        if _cached(repo, ("open_clip_config.json",)) and _cached(repo, _weight_names(None)):
            return
        why = offline_reason()
        if why:
            raise DataError(f"cannot load CLIP {shown}: it is not in the Hugging Face cache ({hub_cache()}) and {why}; "
                            f"where there is a network, download open_clip_config.json and open_clip_model.safetensors "
                            f"(or open_clip_pytorch_model.bin) from {hub_endpoint()}/{repo}/tree/main into a folder, "
                            f"and pass --backbone local-dir:FOLDER")
        return
    cfg = oc.get_pretrained_cfg(name, pretrained) if pretrained and not Path(pretrained).is_file() else {}
    if not cfg.get("hf_hub"):
        return  # a weights file, or a tag downloaded from its own URL (open_clip's cache ~/.cache/clip)
    repo, filename = os.path.split(cfg["hf_hub"])
    names = _weight_names(filename or None)
    if _cached(repo, names):
        return
    why = offline_reason()
    if not why:
        return
    url = f"{hub_endpoint()}/{repo}/resolve/main/{names[-1]}"
    use = (f"download {cfg['url']} (OpenAI's own file) and pass --clip-checkpoint PATH to it"
           if pretrained == OPENAI_TAG and cfg.get("url") else
           f"download {url} and pass --backbone {name} --pretrained PATH to it")
    raise DataError(f"cannot load CLIP {shown}: its weights are not in the Hugging Face cache ({hub_cache()}) and "
                    f"{why}; where there is a network, {use} (or run once there and copy {hub_cache()} here)")


def _local_weights(folder: Path) -> list[Path]:
    """The weights files open_clip would pick from in a local-dir: folder (.safetensors, .bin, .pth)."""
    return sorted(p for suffix in ("safetensors", "bin", "pth") for p in folder.glob(f"*.{suffix}"))


def _create_local(oc, folder: Path, shown: str):
    """A local-dir: model, its config and weights checked first: open_clip builds a model with random weights
    when the folder has a config and no weights file (and only logs it), and says little of a bad config."""
    config = folder / "open_clip_config.json"
    check_regular(config, f"--backbone {shown}:")
    try:
        model_cfg = json.loads(config.read_text())["model_cfg"]
        if not isinstance(model_cfg, dict):
            raise TypeError("'model_cfg' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = f"it has no {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise DataError(f"--backbone {shown}: {config} is not an open_clip config ({reason}); it must be a json "
                        f"object with a 'model_cfg', as open_clip writes it: fix or replace the file") from None
    weights = _local_weights(folder)
    if not weights:
        raise DataError(f"--backbone {shown}: {folder} holds open_clip_config.json but no weights file "
                        f"(open_clip_model.safetensors, open_clip_pytorch_model.bin, or another .safetensors, .bin "
                        f"or .pth), and open_clip would build the model with random weights; put the weights file "
                        f"beside the config")
    for path in weights:
        check_regular(path, f"--backbone {shown}: the weights file")
    source = f"--backbone {shown}: the weights in {folder}" if len(weights) > 1 else \
        f"--backbone {shown}: {weights[0]}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return oc.create_model(f"local-dir:{folder}"), source
    except Exception as e:
        what = misfit(e)
        if what:
            raise DataError(f"{source} does not fit {config}: {what}; the weights and the config must be of one model"
                            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{source} cannot be loaded ({type(e).__name__}: {first[:200]}); replace the file") from None


def _create(oc, name: str, pretrained: str | None, shown: str):
    """open_clip's model `name` with its `pretrained` weights (QuickGELU where those weights were trained with
    it), and where its weights come from (for messages); shown: the model's name in messages."""
    schema = name.startswith(SCHEMAS)
    if not schema and name not in oc.list_models():
        raise DataError(f"--backbone {name}: not one of OpenAI's names ({', '.join(OPENAI_NAMES)}) nor a model "
                        f"open_clip knows (python -c \"import open_clip; print(open_clip.list_models())\"), nor "
                        f"hf-hub:ORG/REPO or local-dir:FOLDER")
    if name.startswith("local-dir:"):
        return _create_local(oc, Path(name.removeprefix("local-dir:")), shown)
    if not schema and pretrained:
        check_regular(pretrained, "--pretrained")
    tags = oc.list_pretrained_tags_by_model(name)
    if not schema and pretrained is None:
        raise DataError(f"--backbone {name} has no default weights: pass --pretrained with one of its tags "
                        f"({', '.join(tags) or 'none known'}) or a weights file")
    if not schema and not Path(pretrained).is_file() and not oc.is_pretrained_cfg(name, pretrained):
        raise DataError(f"--pretrained {pretrained} is neither a weights file nor a tag of {name} "
                        f"({', '.join(tags) or 'it has none'})")
    is_file = not schema and Path(pretrained).is_file()
    check_downloadable(oc, name, pretrained, shown)
    source = f"--pretrained {pretrained}" if is_file else f"the weights of {shown}"
    quick_gelu = bool(not schema and oc.get_pretrained_cfg(name, pretrained).get("quick_gelu"))
    try:
        if name.startswith("hf-hub:"):  # open_clip would build a model with random weights if these were absent
            oc.pretrained.download_pretrained_from_hf(name.removeprefix("hf-hub:"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return oc.create_model(name, pretrained=None if schema else pretrained, force_quick_gelu=quick_gelu), source
    except Exception as e:
        what = misfit(e)
        if what:
            raise DataError(f"{source}: the weights do not fit {shown}: {what}") from None
        first = str(e).strip().splitlines()[0].split(". Last error")[0] if str(e).strip() else type(e).__name__
        local = ("--clip-checkpoint PATH to a local copy of OpenAI's file" if pretrained == OPENAI_TAG else
                 "--backbone local-dir:FOLDER holding a copy of the repository" if schema else
                 "--pretrained FILE with a local copy of the weights")
        raise DataError(f"cannot load CLIP {shown}: {first[:300]}; run once where the Hugging Face hub can be "
                        f"reached (the download is cached), or pass {local}") from None
