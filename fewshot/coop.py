"""
CoOp: context optimisation (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022).

A prompt "X X ... X {classname}." whose M context tokens X are learned vectors, passed with the token embeddings
of each class name through CLIP's frozen text encoder; the class's text feature t_c classifies as zero-shot CLIP
does: logits = s cos(f, t_c). Only the context learns: one [M, w] context shared by all classes, or with CSC
(class-specific context) one per class, [C, M, w] (w: the text transformer's width).

What its released code does (github.com/KaiyangZhou/CoOp, trainers/coop.py), and ours:
- PromptLearner: the prompts "X X ... X {name}." (names with "_" replaced by " ") are tokenised once and their
  token embeddings kept; the SOT embedding (token_prefix) and those of the class name, "." and EOT
  (token_suffix) are fixed, the M context vectors between them learned. Random context: N(0, 0.02^2). With
  CTX_INIT (configs/trainers/CoOp/rn50_ctxv1.yaml: "a photo of a"), the context starts as the token
  embeddings of those words and M is their count (4), so that the first prompt is the words' sentence.
- TextEncoder: prompts + positional embedding, the transformer, ln_final, the EOT token's feature @
  text_projection. Ours calls the same modules of the open_clip model the features were extracted with
  (model.transformer with its causal mask; the pooling of open_clip's text_global_pool, which for OpenAI's
  models is CoOp's argmax of the token ids).

Where ours differs:
- The image features are the features file's (stored views drawn per epoch, fewshot/training.py), not the
  image encoder on a fresh random crop each epoch; the text encoder runs once per step over the C prompts.
- The prompts are cut after the last class's pooled (EOT) token. Under the causal mask no position attends
  to a later one, so the pooled features are the same as over the whole context length (77 tokens), at a
  fraction of the cost (tested).
- The text encoder runs in float32 (CoOp's default PREC is fp16).
- With CSC and an initialisation from words, every class's context starts from the words' embeddings (CoOp's
  code then ignores CSC and learns one shared context).
- The recipe (fewshot/methods.py) steps its cosine per batch (Dassl: per epoch).
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fewshot import backbones, cache, extraction, pace
from fewshot.baselines import text_logits
from fewshot.errors import DataError
from fewshot.features import Settings

INIT_WORDS = "a photo of a"  # CoOp's CTX_INIT in configs/trainers/CoOp/*_ctxv1.yaml
INIT_STD = 0.02              # CoOp's random context: nn.init.normal_(std=0.02)
SAME_TEXT = 0.99             # the cosine a reloaded CLIP must give the features file's own text features


@dataclass(frozen=True)
class CoOpConfig:
    n_ctx: int = 16          # context tokens M (CoOp's N_CTX); with coop_init the words' count, 4
    csc: bool = False        # class-specific context: one context per class (CoOp's CSC)
    coop_init: bool = False  # start the context from the embeddings of "a photo of a" (else N(0, 0.02^2))


# -----------------------------------------------------------------------------
# CLIP's text encoder, frozen, fed token embeddings instead of token ids

class TextEncoder(nn.Module):
    """The text tower of an open_clip CLIP (CLIP, or CustomTextCLIP with a TextTransformer), frozen, in eval
    mode: embed(sentences) gives token ids and their embeddings, forward(embeddings, pooled) the text features
    that encode_text would give for them."""

    def __init__(self, model, tokenize, name="the CLIP"):
        super().__init__()
        tower = getattr(model, "text", model)
        parts = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")
        if not all(hasattr(tower, p) for p in parts) or getattr(tower, "cls_emb", None) is not None or \
                getattr(tower, "use_pad_mask", False):
            raise DataError(f"coop feeds learned token embeddings to CLIP's text transformer, and {name} has another "
                            f"kind of text encoder ({type(tower).__name__}); use another method or backbone")
        self.tokenize, self.name = tokenize, name
        for p in parts[:-1]:
            setattr(self, p, getattr(tower, p))
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)   # [L, L] causal, or None
        self.pool_type, self.eos_id = getattr(tower, "pool_type", "argmax"), getattr(tower, "eos_id", None)
        if self.pool_type not in ("argmax", "eos", "first", "last"):
            raise DataError(f"coop takes each prompt's pooled token, and {name} pools its text by "
                            f"{self.pool_type!r}; use another method or backbone")
        model.requires_grad_(False)   # every CLIP weight, the image tower's too (it is not kept)
        self.eval()   # and kept so: the CoOp model does not hold it as a submodule, so its train() never reaches it

    @property
    def width(self):
        return self.ln_final.weight.shape[0]

    @torch.no_grad()
    def embed(self, sentences):
        """Token ids [n, L] and their embeddings [n, L, w], on the encoder's device."""
        tokens = self.tokenize(sentences).to(self.positional_embedding.device)
        return tokens, self.token_embedding(tokens)

    def pooled(self, tokens):
        """The position whose output is the sentence's feature, [n] (open_clip's text_global_pool): the EOT token
        (the largest id for OpenAI's BPE), the end-of-text id, the first or the last position."""
        n, L = tokens.shape
        if self.pool_type == "argmax":
            return tokens.argmax(-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(-1)
        return torch.full((n,), 0 if self.pool_type == "first" else L - 1, device=tokens.device)

    def causal(self):
        """True when no position attends to a later one (CLIP's mask): a prompt may then be cut after its
        pooled token without changing that token's output."""
        mask = self.attn_mask
        if mask is None:
            return False
        above = torch.ones_like(mask, dtype=torch.bool).triu(1)
        return bool(torch.isinf(mask[above]).all() and torch.isfinite(mask[~above]).all())

    def forward(self, prompts, pooled):
        """Text features [C, d] of prompt embeddings [C, L', w] (L' <= the context length, cut after the last
        pooled position when causal), taken at the positions pooled [C]."""
        L = prompts.shape[1]
        x = prompts.to(self.transformer.get_cast_dtype()) + self.positional_embedding[:L]
        mask = None if self.attn_mask is None else self.attn_mask[:L, :L]
        x = self.ln_final(self.transformer(x, attn_mask=mask))                 # [C, L', w]
        x = x[torch.arange(len(x), device=x.device), pooled]                   # [C, w]
        if self.text_projection is None:
            return x
        return self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection


def load_text_encoder(data, device, source="the features file"):
    """The frozen text encoder of the CLIP a features file was extracted with, as its settings record it (the
    model, its weights tag or checkpoint), checked to give the file's own text features; or one DataError line
    saying what coop needs."""
    made = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    if not made.get("backbone"):
        raise DataError(f"coop learns prompts through the CLIP text encoder the features were extracted with, and "
                        f"{source} records no extraction settings naming that CLIP (made by another tool?); extract "
                        f"the features with extract_features.py (or train.py --dataset), or choose another --method")
    settings = Settings("", backbone=made["backbone"], pretrained=made.get("pretrained"),
                        clip_checkpoint=made.get("clip_checkpoint"))
    try:
        settings = backbones.resolve(settings)
        encoder = backbones.load(settings, torch.device(device))
    except (DataError, OSError) as e:
        raise DataError(f"coop needs the text encoder of the CLIP the features were extracted with "
                        f"({data.get('backbone')}, as {source} records it), and it cannot be loaded: {e}") from None
    check_same_clip(encoder, data, settings.name, source)
    return TextEncoder(encoder.model, encoder.tokenize, settings.name)


def check_same_clip(encoder, data, name, source):
    """The reloaded CLIP must encode the first class's prompts as the features file holds them: weights changed
    since the extraction (a checkpoint replaced at the same path) would train prompts for another model."""
    prompts = data.get("prompts", {}).get("positive") or []
    if not prompts:
        return
    device = encoder.model.logit_scale.device
    at = pace.Pace(cache.recorded_precision(data) or "fp32")                              # as the file was encoded
    ours = extraction.encode_text(encoder, prompts[:1], at, device).float()[0]            # [d]
    theirs = data["text"]["positive"][0].float()
    if ours.shape != theirs.shape or F.cosine_similarity(ours, theirs, dim=0) < SAME_TEXT:
        raise DataError(f"the CLIP {name} loaded for coop does not give the text features of {source} (its weights "
                        f"changed since the extraction?); extract the features again (--overwrite replaces them)")


# -----------------------------------------------------------------------------
# the model

class CoOp(nn.Module):
    """CoOp: logits = s norm(f) norm(T(ctx, names))^T with learned context vectors ctx ([M, w], or [C, M, w]
    with CSC) and CLIP's frozen text encoder T. The encoder is held outside the module tree, so neither
    parameters() nor the state_dict (what --save writes) holds a CLIP weight: only ctx."""

    def __init__(self, text_encoder, classnames, *, config=CoOpConfig(), logit_scale=100.0):
        super().__init__()
        if text_encoder is None:
            raise ValueError("coop needs CLIP's text encoder (the task's text_encoder; runs.run loads it)")
        if config.coop_init and config.n_ctx not in (CoOpConfig.n_ctx, len(INIT_WORDS.split())):
            raise ValueError(f"--coop-init starts the context from the {len(INIT_WORDS.split())} tokens of "
                             f"{INIT_WORDS!r}, so its length is theirs; drop --n-ctx {config.n_ctx} or --coop-init")
        length = text_encoder.positional_embedding.shape[0]                    # the text context, 77 for OpenAI's
        if config.n_ctx + 4 > length:   # SOT, the context, a name's first token, "." and EOT
            raise ValueError(f"--n-ctx {config.n_ctx} leaves no room for the class names in the {length} tokens of "
                             f"{text_encoder.name}'s text encoder; choose at most {length - 4}")
        self.__dict__["text_encoder"] = text_encoder     # not a submodule: frozen, never saved
        names = [name.replace("_", " ") for name in classnames]
        C, w = len(names), text_encoder.width
        if config.coop_init:
            words = INIT_WORDS
            n_ctx = len(words.split())
            ctx = text_encoder.embed([words])[1][0, 1:1 + n_ctx]                 # [M, w]
            ctx = ctx.expand(C, -1, -1).clone() if config.csc else ctx.clone()
        else:
            n_ctx = config.n_ctx
            words = " ".join(["X"] * n_ctx)
            ctx = torch.empty(*((C,) if config.csc else ()), n_ctx, w).normal_(std=INIT_STD)  # drawn on the CPU
        self.config = dataclasses.replace(config, n_ctx=n_ctx)                 # what is used
        self.logit_scale = float(logit_scale)
        tokens, embedding = text_encoder.embed([f"{words} {name}." for name in names])  # [C, L], [C, L, w]
        self._check_layout(tokens, words, n_ctx)
        pooled = text_encoder.pooled(tokens)                                    # [C]
        keep = int(pooled.max()) + 1 if text_encoder.causal() else tokens.shape[1]
        self.register_buffer("pooled", pooled, persistent=False)
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)            # [C, 1, w] SOT
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:keep], persistent=False)  # name, ".", EOT
        self.ctx = nn.Parameter(ctx.to(embedding))                              # [M, w] or [C, M, w]
        self._cache = None                                                      # (ctx version, [C, d]) in eval

    def _check_layout(self, tokens, words, n_ctx):
        """Each prompt must read a start token, the n_ctx tokens of the context words, then the class name (the
        words alone end there): the context replaces exactly those positions."""
        alone = self.text_encoder.tokenize([words]).to(tokens.device)[0]      # [L]
        fits = bool((tokens[:, :1 + n_ctx] == alone[:1 + n_ctx]).all() and
                    (tokens[:, 1 + n_ctx] != alone[1 + n_ctx]).all())
        if not fits:
            raise DataError(f"coop puts its {n_ctx} context vectors after the start token, one per word of "
                            f"{words!r}, and the tokenizer of {self.text_encoder.name} does not give one token "
                            f"per word there; use another method or backbone")

    def classifier(self):
        """The class text features [C, d] of the current context; computed once while evaluating."""
        if not self.training and not torch.is_grad_enabled():
            if self._cache is None or self._cache[0] != self.ctx._version:
                self._cache = (self.ctx._version, self._text_features())
            return self._cache[1]
        return self._text_features()

    def _text_features(self):
        C = self.token_prefix.shape[0]
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.expand(C, -1, -1)    # [C, M, w]
        prompts = torch.cat([self.token_prefix, ctx, self.token_suffix], 1)       # [C, L', w]
        return self.text_encoder(prompts, self.pooled)                            # [C, d]

    def forward(self, image_feats):
        return text_logits(self.logit_scale, image_feats, self.classifier())

    def loss(self, image_feats, labels):
        return F.cross_entropy(self(image_feats), labels.to(self.ctx.device))

