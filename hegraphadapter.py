"""
HeGraphAdapter: tuning CLIP for few-shot classification with a heterogeneous graph adapter.

One self-contained PyTorch file. It implements "HeGraphAdapter: Tuning Multi-Modal Vision-Language
Models with Heterogeneous Graph Adapter" (Jiang et al.) as reconstructed in METHOD.md, on frozen,
L2-normalised CLIP features. C classes, features of size d, s = CLIP's logit scale, norm() = row-wise
L2 normalisation, cos(a, b) = norm(a) . norm(b).

Nodes, one of each type per class:
    P [C, d]  positive text nodes: mean of the normalised positive-prompt embeddings, normalised
    N [C, d]  negative text nodes: the same for negative prompts ("a photo of no {}.")
    V [C, d]  visual nodes: norm(mean of the class's few-shot image features)

Edges: six dense C x C matrices, row = target node i, column = source node j:
    P->P  cos(P_i, P_j)       V->V  cos(V_i, V_j)       V->P  cos(P_i, V_j)
    N->P  1 - cos(P_i, N_i) if i = j, else cos(P_i, N_j)
    P->N  1 - cos(N_i, P_i) if i = j, else cos(N_i, P_j)
    V->N  1 - cos(N_i, V_i) if i = j, else cos(N_i, V_j)
normalised as in GraphAdapter: negative weights clamped to 0, self-loops on P->P and V->V, then
Â = D_r^-1/2 A D_c^-1/2 (D_r, D_c: row and column sums). They depend only on the initial nodes, so they
are constants built once.

Message passing, three steps in this order, with learnable d x d projections W_n, W_p, W_v and a fixed
fusion weight β per meta-path (the update is residual and the message linear):
    N' = norm(N + β_PN Â_PN P W_n + β_VN Â_VN V W_n)                                  (1)
    P' = norm(P + β_NP Â_NP N' W_p + β_VP Â_VP V W_p + β_PP Â_PP P W_p)               (2)
    B  = β_VV Â_VV V W_v                          the class visual bias, [C, d]       (3)
β_NP is larger in training and 0.1 at test; the module switches with train() / eval().

Classifiers and loss, for an image feature f with label y:
    logits_t = s norm(f) P'^T                                              text classifier
    logits_v = exp(-γ (1 - norm(f) K'^T)) L,   K' = norm(F + B[y_F])       Tip-Adapter cache, refined keys
    loss     = CE(logits_t, y) + λ CE(logits_v, y)
    predict  = logits_t + α logits_v
where F [N, d] are the few-shot (cache) image features, y_F [N] their labels and L = onehot(y_F).
With W_n = W_p = W_v = 0 the prediction is exactly zero-shot CLIP plus the training-free Tip-Adapter.

Variants (paper Table 2): "full" is everything above; "t" uses logits_t alone; "tn" is "t" with only the
negative path feeding P' (β_VP = β_PP = 0); "tp" is "t" without negative nodes (β_NP = 0). Negative text
features may be None: then the negative nodes and their meta-paths are absent.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = ("full", "t", "tn", "tp")


@dataclass
class HeGraphConfig:
    variant: str = "full"      # "full"; "t" text classifier only; "tn" t with the negative path only; "tp" t, no N
    beta_pn: float = 0.1       # β of meta-path P -> N (step 1)
    beta_vn: float = 0.1       # β of meta-path V -> N (step 1)
    beta_np: float = 0.2       # β of meta-path N -> P during training; the paper makes it larger than at test
    beta_np_test: float = 0.1  # β of meta-path N -> P at test time (paper 4.1)
    beta_vp: float = 0.3       # β of meta-path V -> P; the paper finds β_VP > β_PP
    beta_pp: float = 0.2       # β of meta-path P -> P
    beta_vv: float = 0.1       # β of meta-path V -> V, the scale of the class visual bias (step 3)
    alpha: float = 1.0         # cache residual ratio α in the prediction logits_t + α logits_v
    gamma: float = 5.0         # cache sharpness γ in exp(-γ (1 - cos)) (Tip-Adapter's "beta")
    lam: float = 0.1           # weight λ of the cache loss CE(logits_v, y)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}: choose one of {', '.join(VARIANTS)}")


# -----------------------------------------------------------------------------
# the graph: nodes, edges, normalisation

def normalize(x):
    """Rows to unit L2 norm."""
    return F.normalize(x, dim=-1)


def class_means(feats, labels, num_classes):
    """Visual nodes: norm(mean of each class's features). [N, d], [N] -> [C, d].

    Sums with index_add_, never a reshape, so classes may have unequal counts. The mean is not divided
    out because normalising the sum gives the same direction.
    """
    sums = feats.new_zeros(num_classes, feats.shape[1]).index_add_(0, labels, feats)  # [C, d]
    return normalize(sums)


def similarity_edges(targets, sources):
    """A_ij = cos(target_i, source_j): P->P, V->V, V->P. [C, d], [C, d] -> [C, C]."""
    return normalize(targets) @ normalize(sources).T


def negative_edges(targets, sources):
    """A_ij = cos(target_i, source_j), but 1 - cos on the diagonal: N->P, P->N, V->N.

    A node and its own class's negative node encode opposite things, so their edge is the dissimilarity.
    """
    cos = similarity_edges(targets, sources)  # [C, C]
    return cos + torch.diag(1.0 - 2.0 * cos.diagonal())


def normalize_adjacency(a, self_loops):
    """GraphAdapter's normalisation: clamp to >= 0, optional self-loops, D_r^-1/2 A D_c^-1/2. [C, C]."""
    a = a.clamp(min=0)
    if self_loops:
        a = a + torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    inv_sqrt = lambda deg: torch.where(deg > 0, deg.clamp(min=torch.finfo(deg.dtype).tiny).rsqrt(), 0.0)
    return inv_sqrt(a.sum(1))[:, None] * a * inv_sqrt(a.sum(0))[None, :]


def cache_logits(similarity, cache_labels, num_classes, gamma, exclude=None):
    """Tip-Adapter's cache classifier from cosine similarities to the keys: exp(-γ(1 - sim)) L.

    [B, N] similarities, [N] key labels -> [B, C]. Summing per class with index_add_ costs O(B N);
    multiplying by the one-hot L [N, C] would cost O(B N C). exclude [B] (optional): the cache row each
    image came from, whose affinity is taken back out (leave-one-out) in O(B), not by masking [B, N].
    """
    affinity = similarity.mul(gamma).sub_(gamma).exp_()  # [B, N] exp(γ sim - γ), in one buffer: B may be N
    logits = affinity.new_zeros(similarity.shape[0], num_classes).index_add_(1, cache_labels, affinity)
    if exclude is not None:
        own = affinity.gather(1, exclude.view(-1, 1))                          # [B, 1]
        logits = logits.scatter_add(1, cache_labels[exclude].view(-1, 1), -own)
    return logits


# -----------------------------------------------------------------------------
# the adapter

class HeGraphAdapter(nn.Module):
    """The adapter on frozen CLIP features: graph over class nodes + text and cache classifiers.

    pos_text [C, d], neg_text [C, d] or None, cache_feats [N, d], cache_labels [N] in [0, C).
    Device and dtype follow pos_text; the other inputs are moved to it.
    """

    def __init__(self, pos_text, neg_text, cache_feats, cache_labels, config, logit_scale=100.0):
        super().__init__()
        _check_inputs(pos_text, neg_text, cache_feats, cache_labels, config)
        like = dict(device=pos_text.device, dtype=pos_text.dtype)
        cfg = self.config = config
        self.logit_scale = float(logit_scale)
        self.text_only = cfg.variant != "full"
        self.has_negatives = neg_text is not None and cfg.variant != "tp"
        beta_vp, beta_pp = (0.0, 0.0) if cfg.variant == "tn" else (cfg.beta_vp, cfg.beta_pp)

        P = normalize(pos_text)                                                  # [C, d]
        C, d = P.shape
        cache_feats = normalize(cache_feats.to(**like))                          # [N, d]
        cache_labels = cache_labels.to(device=P.device, dtype=torch.long)        # [N]
        V = class_means(cache_feats, cache_labels, C)                            # [C, d]
        # Constants, rebuilt from the features, so they stay out of the state_dict (persistent=False).
        buffer = lambda name, t: self.register_buffer(name, t, persistent=False)
        buffer("P", P)
        buffer("V", V)
        buffer("cache_keys", cache_feats)
        buffer("cache_sq_norms", cache_feats.square().sum(-1))                  # [N], 1 up to rounding
        buffer("cache_labels", cache_labels)

        # Edges, one dense normalised matrix per meta-path (name = source, target).
        buffer("A_pp", normalize_adjacency(similarity_edges(P, P), self_loops=True))
        buffer("A_vv", normalize_adjacency(similarity_edges(V, V), self_loops=True))
        buffer("A_vp", normalize_adjacency(similarity_edges(P, V), self_loops=False))
        if self.has_negatives:
            N = normalize(neg_text.to(**like))                                   # [C, d]
            buffer("N", N)
            buffer("A_np", normalize_adjacency(negative_edges(P, N), self_loops=False))
            buffer("A_pn", normalize_adjacency(negative_edges(N, P), self_loops=False))
            buffer("A_vn", normalize_adjacency(negative_edges(N, V), self_loops=False))

        # Aggregations of the fixed nodes P and V are constants too: fuse them with their β once here,
        # so that a training step only multiplies them by the W's. Only N' changes with the parameters.
        buffer("msg_to_pos", beta_vp * self.A_vp @ V + beta_pp * self.A_pp @ P)  # [C, d]
        if self.has_negatives:
            buffer("msg_to_neg", cfg.beta_pn * self.A_pn @ P + cfg.beta_vn * self.A_vn @ V)  # [C, d]
        if not self.text_only:
            buffer("msg_to_vis", cfg.beta_vv * self.A_vv @ V)                    # [C, d]

        # choice: the W's start at zero, so training starts exactly at zero-shot CLIP + Tip-Adapter and
        # AdamW's weight decay pulls back towards it. On real ViT-B/32 features this beat starting at the
        # identity by 0.2-0.4 points (the tuning protocol of bench/real_features.py --dev).
        zeros = lambda: nn.Parameter(torch.zeros(d, d, **like))
        if self.has_negatives:
            self.W_n = zeros()  # [d, d] projection of the messages to negative nodes
        self.W_p = zeros()      # [d, d] projection of the messages to positive nodes
        if not self.text_only:
            self.W_v = zeros()  # [d, d] projection of the visual-node message (the class visual bias)

    @property
    def num_classes(self):
        return self.P.shape[0]

    def extra_repr(self):
        C, d = self.P.shape
        return (f"classes={C}, dim={d}, cache={self.cache_keys.shape[0]}, variant={self.config.variant!r}, "
                f"negatives={self.has_negatives}")

    def propagate(self):
        """The three aggregation steps. Returns P' [C, d] and the visual bias B [C, d] (None if text-only)."""
        messages = self.msg_to_pos                                               # [C, d]
        if self.has_negatives:
            neg = normalize(self.N + self.msg_to_neg @ self.W_n)                 # (1) N' [C, d]
            beta_np = self.config.beta_np if self.training else self.config.beta_np_test
            messages = messages + beta_np * (self.A_np @ neg)                    # uses the updated N'
        pos = normalize(self.P + messages @ self.W_p)                            # (2) P' [C, d]
        bias = None if self.text_only else self.msg_to_vis @ self.W_v            # (3) B [C, d]
        return pos, bias

    def cache_similarity(self, f, bias):
        """cos(f, K') with K' = norm(F + B[y_F]), without materialising the refined keys. [B, N].

        f K'^T = (f F^T + (f B^T)[:, y_F]) / |F + B[y_F]|, with |F_n + B_y|^2 = |F_n|^2 + 2 F_n.B_y + |B_y|^2.
        The one [B, N, d] product, f F^T, holds no parameter, so backward skips it; through K' it would
        pay that product a second time. (bench/bench_speed.py measures the step.)
        """
        y = self.cache_labels
        dots = (self.cache_keys * bias.index_select(0, y)).sum(-1)                # [N]  F_n . B_y
        key_norm = (self.cache_sq_norms + 2 * dots + bias.square().sum(-1).index_select(0, y)).sqrt()  # [N]
        return (f @ bias.T).index_select(1, y).add_(f @ self.cache_keys.T) / key_norm  # [B, N]

    def logits(self, image_feats, exclude=None):
        """logits_t [B, C] and logits_v [B, C] (None for text-only variants) for image_feats [B, d].

        exclude [B] (optional): for each image, the cache row it came from, left out of its cache
        logits (leave-one-out), so that a training image cannot match its own key.
        """
        if image_feats.ndim != 2 or image_feats.shape[1] != self.P.shape[1]:
            raise ValueError(f"image_feats must be [B, {self.P.shape[1]}], got {list(image_feats.shape)}")
        f = normalize(image_feats.to(self.P))                                    # [B, d]
        pos, bias = self.propagate()
        logits_t = self.logit_scale * f @ pos.T                                  # [B, C]
        if self.text_only:
            return logits_t, None
        exclude = None if exclude is None else exclude.to(f.device)
        logits_v = cache_logits(self.cache_similarity(f, bias), self.cache_labels, self.num_classes,
                                self.config.gamma, exclude)
        return logits_t, logits_v

    def forward(self, image_feats):
        """Class logits [B, C] for image features [B, d]: logits_t + α logits_v (logits_t if text-only)."""
        logits_t, logits_v = self.logits(image_feats)
        return logits_t if logits_v is None else logits_t + self.config.alpha * logits_v

    def loss(self, image_feats, labels, exclude=None):
        """CE(logits_t, y) + λ CE(logits_v, y) (text-only variants: the first term). Scalar.

        exclude [B] (optional): the cache row of each image, see logits().
        """
        labels = labels.to(self.P.device)
        if labels.shape != image_feats.shape[:1]:
            raise ValueError(f"labels must be [{image_feats.shape[0]}], got {list(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {labels.min().item()}.."
                             f"{labels.max().item()}")
        logits_t, logits_v = self.logits(image_feats, exclude)
        loss = F.cross_entropy(logits_t, labels)
        if logits_v is not None:
            loss = loss + self.config.lam * F.cross_entropy(logits_v, labels)
        return loss


def _check_inputs(pos_text, neg_text, cache_feats, cache_labels, config):
    """One clear ValueError for inputs the adapter cannot use."""
    if not isinstance(config, HeGraphConfig):
        raise ValueError(f"config must be a HeGraphConfig, got {type(config).__name__}")
    if pos_text.ndim != 2 or not pos_text.is_floating_point():
        raise ValueError(f"pos_text must be a float tensor [C, d], got {pos_text.dtype} {list(pos_text.shape)}")
    C, d = pos_text.shape
    if neg_text is not None and neg_text.shape != pos_text.shape:
        raise ValueError(f"neg_text must be [C, d] = {[C, d]} like pos_text (one negative feature per class), "
                         f"got {list(neg_text.shape)}; pass None if you have no negative prompts")
    if neg_text is None and config.variant == "tn":
        raise ValueError("variant 'tn' aggregates only the negative nodes: it needs neg_text, got None")
    if cache_feats.ndim != 2 or cache_feats.shape[1] != d:
        raise ValueError(f"cache_feats must be [N, d] with d = {d} (the text feature size), got "
                         f"{list(cache_feats.shape)}: are the image and text features from the same encoder?")
    if cache_labels.shape != cache_feats.shape[:1] or cache_labels.is_floating_point():
        raise ValueError(f"cache_labels must be integers [N] = [{cache_feats.shape[0]}], got "
                         f"{cache_labels.dtype} {list(cache_labels.shape)}")
    if cache_labels.numel() and (cache_labels.min() < 0 or cache_labels.max() >= C):
        raise ValueError(f"cache_labels must lie in [0, {C}), got {cache_labels.min().item()}.."
                         f"{cache_labels.max().item()}")
    missing = torch.bincount(cache_labels.long().clamp(0, C - 1).cpu(), minlength=C).eq(0).nonzero().flatten()
    if len(missing):
        raise ValueError(f"{len(missing)} of {C} classes have no cache sample (first: {missing[:10].tolist()}); "
                         "every class needs at least one few-shot image")
    for name, t in (("pos_text", pos_text), ("neg_text", neg_text), ("cache_feats", cache_feats)):
        if t is not None and not (torch.isfinite(t).all() and t.norm(dim=-1).gt(0).all()):
            raise ValueError(f"{name} has non-finite (NaN/inf) or all-zero rows; check the feature extraction")
