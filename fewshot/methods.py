"""Every method of the comparison, one row each of METHODS: the model it builds, its published configuration
and training recipe per dataset, and the knobs a tuning search may turn.

The same tuning budget for every method: each row's knobs span a grid of at most TUNING_BUDGET points (the
values its authors tune or expose), which train.py's --search-val scores on the min(K, 4)-shot validation
subset and bench/real_features.py on its dev folds. Adding a method means adding its row here.
"""
import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from fewshot.baselines import (
    CLIPAdapter,
    CLIPAdapterConfig,
    GraphAdapter,
    GraphAdapterConfig,
    LinearProbe,
    LinearProbeConfig,
    NoConfig,
    TaskRes,
    TaskResConfig,
    TipAdapter,
    TipConfig,
    ZeroShot,
    fit_linear_probe,
)
from fewshot.coop import CoOp, CoOpConfig
from fewshot.errors import DataError
from hegraphadapter import HeGraphAdapter, HeGraphConfig

TUNING_BUDGET = 12   # grid points per method, the same for all
WARMUP_LR = 1e-5     # the warm-up epoch starts from this learning rate


# -----------------------------------------------------------------------------
# training recipes, as published

@dataclass(frozen=True)
class Recipe:
    epochs: int                  # training epochs (0: evaluate the model as built)
    lr: float                    # peak learning rate
    batch_size: int = 256        # training images per step
    optimizer: str = "adamw"     # "adamw"; "adam" (L2 added to the gradient, as Dassl's); "sgd" (momentum 0.9)
    weight_decay: float = 0.01   # AdamW's decoupled decay, or the L2 of adam / sgd
    eps: float = 1e-8            # Adam's epsilon
    warmup: bool = True          # one epoch rising linearly from WARMUP_LR, then cosine to 0 (per step)
    constant_warmup: bool = False  # the warm-up epoch stays at WARMUP_LR instead (Dassl's, as CoOp trains)
    leave_one_out: bool = False  # a training image's own cache key is left out of its cache logits


def paper_recipe(dataset, shots):
    """HeGraphAdapter (paper 4.1): AdamW, 100 epochs for EuroSAT, DTD, FGVCAircraft, else 30; lr 0.01 for
    FGVCAircraft, else 0.001. Leave-one-out: the training images are the cache's own."""
    epochs = 100 if dataset in ("eurosat", "dtd", "fgvc_aircraft") else 30
    return Recipe(epochs, 1e-2 if dataset == "fgvc_aircraft" else 1e-3, leave_one_out=True)


def tip_f_recipe(dataset, shots):
    """Tip-Adapter-F's configs/<dataset>.yaml: AdamW lr 0.001, eps 1e-4, 20 epochs (EuroSAT 100), batch 256,
    cosine per step, no warm-up; trained on the views against their own keys."""
    return Recipe(100 if dataset == "eurosat" else 20, 1e-3, eps=1e-4, warmup=False)


def taskres_recipe(dataset, shots):
    """TaskRes's configs adam_lr2e-3_B256_ep{100,200}.yaml: Adam (L2 5e-4), lr 0.002 (ImageNet 0.0002),
    100 epochs up to 4 shots, 200 from 8, batch 256, one warm-up epoch, cosine."""
    return Recipe(100 if shots <= 4 else 200, 2e-4 if dataset == "imagenet" else 2e-3, optimizer="adam",
                  weight_decay=5e-4)


def coop_recipe(dataset, shots):
    """CoOp's SGD recipe (lr 0.002, momentum 0.9, L2 5e-4, batch 32, one warm-up epoch, cosine), which
    CLIP-Adapter's README points to, with CoOp's epochs per shot count (its COOP.md, github.com/KaiyangZhou/CoOp
    at ff61507: configs/trainers/CoOp/rn50_ep50.yaml for K = 1, rn50_ep100.yaml for K = 2 and 4, rn50.yaml, 200
    epochs, from K = 8), except ImageNet and every task built from it: 50 epochs at every K ("for ImageNet, we use
    *_ep50.yaml for all settings")."""
    epochs = 50 if dataset == "imagenet" or shots <= 1 else 100 if shots <= 4 else 200
    return Recipe(epochs, 2e-3, batch_size=32, optimizer="sgd", weight_decay=5e-4)


def coop_own_recipe(dataset, shots):
    """CoOp's own (github.com/KaiyangZhou/CoOp): configs/trainers/CoOp/rn50_ep50.yaml (K = 1), rn50_ep100.yaml
    (K = 2, 4), rn50.yaml (K = 8, 16) as COOP.md's commands pick them, and *_ep50.yaml for ImageNet at every K:
    SGD lr 0.002 (Dassl's momentum 0.9, weight decay 5e-4), batch 32, cosine, one warm-up epoch at a constant
    1e-5 (WARMUP_TYPE constant, WARMUP_CONS_LR 1e-5)."""
    return dataclasses.replace(coop_recipe(dataset, shots), constant_warmup=True)  # ImageNet: 50 epochs there too


# -----------------------------------------------------------------------------
# published configurations and the knobs each method's authors tune

# Tip-Adapter's configs/<dataset>.yaml (github.com/gaopengcuhk/Tip-Adapter at d0e2d6f8c5feb8b6ce937b757810761f7155d4d5):
# init_alpha, and search_scale = [largest β (our γ), largest α] of the search it runs after training; every
# dataset starts at init_beta = 1. Datasets it has no config for (your own) take the middle of the range.
TIP_CONFIGS = {  # dataset -> (init α, largest γ searched, largest α searched)
    "imagenet": (1.17, 7, 3), "caltech101": (3, 12, 5), "oxford_pets": (1.17, 7, 3), "stanford_cars": (3, 20, 10),
    "oxford_flowers": (10, 50, 50), "food101": (1.17, 10, 10), "fgvc_aircraft": (5, 30, 30), "sun397": (1.17, 12, 10),
    "dtd": (2, 13, 13), "eurosat": (2, 12, 10), "ucf101": (3, 7, 3),
}
TIP_DEFAULT = (1.0, 10, 10)
TIP_INIT_GAMMA = 1.0  # init_beta in every config


def tip_config(learn_keys):
    """dataset -> Tip-Adapter's published starting point: its dataset's init α, γ = 1."""
    return lambda dataset: TipConfig(alpha=TIP_CONFIGS.get(dataset, TIP_DEFAULT)[0], gamma=TIP_INIT_GAMMA,
                                     learn_keys=learn_keys)


TIP_SEARCH_LOW = 0.1  # where Tip-Adapter's search starts, for β (our γ) and α alike


def tip_search(largest, steps):
    """Tip-Adapter's search list (utils.py search_hp): [i * (largest - 0.1) / steps + 0.1 for i in range(steps)],
    from 0.1 up to below `largest` (its search_scale), with `steps` points instead of its search_step (200 β x 20
    α), so that the grid fits the budget; rounded to 3 decimals."""
    return tuple(round(i * (largest - TIP_SEARCH_LOW) / steps + TIP_SEARCH_LOW, 3) for i in range(steps))


def tip_knobs(dataset, recipe):
    """Tip-Adapter and Tip-Adapter-F: 4 γ x 3 α of Tip-Adapter's own search over its config's range (both are set
    after training: search_hp is what its authors tune, for the training-free and the fine-tuned cache alike)."""
    _, gamma_max, alpha_max = TIP_CONFIGS.get(dataset, TIP_DEFAULT)
    return {"gamma": tip_search(gamma_max, 4), "alpha": tip_search(alpha_max, 3)}


def _times(value, *factors):
    return tuple(value * f for f in factors)


def lr_and(name, values):
    """A baseline's own knob (its 3 values) x its learning rate x 0.5, 1, 2, 4."""
    return lambda dataset, recipe: {name: values, "lr": _times(recipe.lr, 0.5, 1, 2, 4)}


def hegraph_config(variant):
    return lambda dataset: HeGraphConfig(variant=variant)


def hegraph_knobs(with_cache):
    """HeGraphAdapter: s_b x 0.5, 1, 2 of its default, then α x 1, 2 and γ 3, 5 (the cache), or s_W x 0.3, 1, 3,
    10 of its default (text-only variants, which have no cache)."""
    d = HeGraphConfig()
    if with_cache:
        return lambda dataset, recipe: {"bias_scale": _times(d.bias_scale, 0.5, 1, 2), "alpha": (1.0, 2.0),
                                        "gamma": (3.0, 5.0)}
    return lambda dataset, recipe: {"bias_scale": _times(d.bias_scale, 0.5, 1, 2),
                                    "weight_scale": _times(d.weight_scale, 0.3, 1, 3, 10)}


# the linear probe's C (sklearn's inverse L2 strength): 12 half-decades 0.1 ... 10^4.5 inside CoOp's search range
# (1e-6 ... 1e6), the default 0.316 among them, in increasing order, so that a tie keeps the stronger L2 (the first
# of equal scores), as CoOp's search does
PROBE_C = tuple(round(10.0 ** (k / 2), 4) for k in range(-2, 10))


def fit_probe(model, task, seed):
    """The linear probe: L-BFGS on view 0 (CLIP's own preprocessing) of the images, at the config's C."""
    return {"inverse_l2": fit_linear_probe(model, task.train_views[0], task.cache_labels)}


# -----------------------------------------------------------------------------
# how each model is built from a task (tasks.Task): the tensors it takes, then its config and CLIP's logit scale

def text_model(model):
    """A model of the text features alone (zero-shot, the linear probe, TaskRes, CLIP-Adapter)."""
    return lambda task, config: model(task.pos_text, config=config, logit_scale=task.logit_scale)


def cache_model(model):
    """A model of the text features and the few-shot cache (Tip-Adapter, GraphAdapter)."""
    return lambda task, config: model(task.pos_text, task.cache_feats, task.cache_labels, config=config,
                                      logit_scale=task.logit_scale)


def prompt_model(model):
    """A model of learned prompts through CLIP's frozen text encoder (CoOp): the class names and the encoder."""
    return lambda task, config: model(task.text_encoder, task.classnames, config=config, logit_scale=task.logit_scale)


def hegraph_model(task, config):
    """HeGraphAdapter: the positive and negative text features (None without negatives) and the cache."""
    return HeGraphAdapter(task.pos_text, task.neg_text, task.cache_feats, task.cache_labels, config=config,
                          logit_scale=task.logit_scale)


# -----------------------------------------------------------------------------
# the methods: one row each

@dataclass(frozen=True)
class Method:
    """One row of METHODS: how a method builds its model, configures it, trains and is tuned."""
    model: Callable                  # (task, config) -> the nn.Module, built from the task tensors it names
    config: Callable                 # dataset -> the model's published (default) frozen config
    about: str                       # one line for --help
    recipe: Callable | None = None   # (dataset, shots) -> Recipe; None: nothing to train by gradient steps
    fit: Callable | None = None      # (model, task, seed) -> info dict, instead of gradient steps
    knobs: Callable | None = None    # (dataset, recipe) -> {knob: values}, a grid of <= TUNING_BUDGET points
    post_hoc: tuple = ()             # knobs set after training without retraining (a cache's α, γ)
    negatives: str = ""              # "optional": reads the negative nodes unless --no-negatives; "required"
    frozen: tuple = ()               # names of parameters kept at their initial value (the bias-only ablation)
    text_encoder: bool = False       # runs CLIP's text encoder (task.text_encoder): runs.run loads it once per run


def hegraph(variant, about, frozen=()):
    """A row of HeGraphAdapter, the paper's recipe; frozen=("W_",) keeps every projection at zero."""
    return Method(hegraph_model, hegraph_config(variant), about, paper_recipe,
                  knobs=hegraph_knobs(with_cache=variant == "full"), post_hoc=("alpha",) if variant == "full" else (),
                  negatives="required" if variant == "tn" else "" if variant == "tp" else "optional", frozen=frozen)


METHODS = {
    "zeroshot": Method(text_model(ZeroShot), lambda dataset: NoConfig(),
                       "CLIP zero-shot with the positive prompts (the paper's Base)"),
    "linear-probe": Method(text_model(LinearProbe), lambda dataset: LinearProbeConfig(),
                           "CLIP's linear probe: L2 logistic regression (its C a knob)", fit=fit_probe,
                           knobs=lambda dataset, recipe: {"inverse_l2": PROBE_C}),
    "tip": Method(cache_model(TipAdapter), tip_config(False), "Tip-Adapter, training-free", knobs=tip_knobs,
                  post_hoc=("alpha", "gamma")),
    "tip-f": Method(cache_model(TipAdapter), tip_config(True), "Tip-Adapter-F: the cache keys are learned",
                    tip_f_recipe, knobs=tip_knobs, post_hoc=("alpha", "gamma")),
    "taskres": Method(text_model(TaskRes),
                      lambda dataset: TaskResConfig(scale=1.0 if dataset == "oxford_flowers" else 0.5),
                      "TaskRes: a learned per-class residual on the text classifier", taskres_recipe,
                      knobs=lr_and("scale", (0.25, 0.5, 1.0))),
    "clip-adapter": Method(text_model(CLIPAdapter), lambda dataset: CLIPAdapterConfig(),
                           "CLIP-Adapter: a residual bottleneck MLP on the image feature", coop_recipe,
                           knobs=lr_and("ratio", (0.2, 0.4, 0.6))),
    "coop": Method(prompt_model(CoOp), lambda dataset: CoOpConfig(),
                   "CoOp: learned prompt context through CLIP's frozen text encoder", coop_own_recipe,
                   knobs=lr_and("csc", (False, True)), text_encoder=True),
    "graphadapter": Method(cache_model(GraphAdapter), lambda dataset: GraphAdapterConfig(),
                           "GraphAdapter: textual and visual knowledge graphs refine the text classifier",
                           taskres_recipe, knobs=lr_and("beta", (0.5, 0.7, 0.9))),
    "hegraph": hegraph("full", "HeGraphAdapter, the full model"),
    "hegraph-t": hegraph("t", "HeGraphAdapter(T): the text classifier only"),
    "hegraph-tn": hegraph("tn", "HeGraphAdapter(T-N): only the negative nodes feed P'"),
    "hegraph-tp": hegraph("tp", "HeGraphAdapter(T-P): no negative nodes"),
    "hegraph-bias": hegraph("full", "ablation: the full model with every W kept at zero, only the biases learn",
                            frozen=("W_",)),
}
ROW_FIELDS = ("variant", "learn_keys")  # config fields a row fixes, never a flag


def grid(method, dataset, recipe):
    """The knob settings a search tries, as a list of {knob: value}; [] for a method without knobs."""
    if method.knobs is None:
        return []
    knobs = method.knobs(dataset, recipe)
    points = [dict(zip(knobs, values)) for values in itertools.product(*knobs.values())]
    assert len(points) <= TUNING_BUDGET, f"{len(points)} grid points: over the budget of {TUNING_BUDGET}"
    return points


def build(method, task, config):
    """The method's model for this task, with the parameters the row freezes kept at their initial value."""
    model = method.model(task, config)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(method.frozen))
    return model


# -----------------------------------------------------------------------------
# settings a run may change: every field of every config, the recipe's epochs, lr and batch size

RECIPE_FIELDS = ("epochs", "lr", "batch_size")  # what a run may change of a method's recipe


def config_fields():
    """Every field of every method's config, but those a row fixes: name -> (type, [methods it configures])."""
    fields = {}
    for name, method in METHODS.items():
        for f in dataclasses.fields(method.config("")):
            if f.name not in ROW_FIELDS:
                fields.setdefault(f.name, (f.type, []))[1].append(name)
    return fields


def configure(name, dataset, overrides):
    """The row's published config for this dataset with `overrides` ({field: value}) applied; a field that is
    not this method's is refused rather than silently ignored."""
    config = METHODS[name].config(dataset)
    fields = {f.name for f in dataclasses.fields(config)}
    for field in sorted(set(overrides) - fields):
        owners = ", ".join(config_fields()[field][1]) if field in config_fields() else "no method"
        raise DataError(f"--{field.replace('_', '-')} sets nothing of {name} (it configures {owners}); drop it")
    return dataclasses.replace(config, **overrides)


def effective_recipe(name, dataset, shots, overrides):
    """The method's recipe for this dataset and K with `overrides` ({epochs, lr, batch_size: value}) applied;
    None if it has nothing to train by gradient steps."""
    method = METHODS[name]
    if method.recipe is None:
        return None
    unknown = sorted(set(overrides) - set(RECIPE_FIELDS))
    if unknown:
        raise DataError(f"--{unknown[0].replace('_', '-')} is not a setting of a recipe ({', '.join(RECIPE_FIELDS)})")
    return dataclasses.replace(method.recipe(dataset, shots), **overrides)
