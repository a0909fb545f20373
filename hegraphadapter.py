"""
HeGraphAdapter: tuning CLIP for few-shot classification with a heterogeneous graph adapter.

One self-contained PyTorch file, on frozen L2-normalised CLIP features. It implements
    Y. Zhao, B. Jiang, X. Wang, Q. Xu, J. Tang, "HeGraphAdapter: Tuning Multi-Modal Vision-Language Models
    with Heterogeneous Graph Adapter", arXiv:2410.07854, 2024,
whose graph layer is GraphAdapter's (X. Li et al., "GraphAdapter: Tuning Vision-Language Models With Dual
Knowledge Graph", NeurIPS 2023) and whose visual classifier is Tip-Adapter's cache (R. Zhang et al.,
"Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification", ECCV 2022). The paper's text
gives no equations; those below are our reading of it, and every choice it leaves open says "choice:".

Notation: C classes, d feature size, s = CLIP's logit scale, norm() = row-wise L2 normalisation,
cos(a, b) = norm(a) . norm(b). A batch holds B image features f; the cache holds M few-shot image features.

Nodes, one of each type per class:
    P [C, d]  positive text nodes: mean of the normalised positive-prompt embeddings, normalised
    N [C, d]  negative text nodes: the same for negative prompts ("a photo of no {}.")
    V [C, d]  visual nodes: norm(mean of the class's few-shot image features)

Edges: six C x C matrices, row = target node i, column = source node j, dense by default:
    P->P  cos(P_i, P_j)       V->V  cos(V_i, V_j)       V->P  cos(P_i, V_j)
    N->P  1 - cos(P_i, N_i) if i = j, else cos(P_i, N_j)
    P->N  1 - cos(N_i, P_i) if i = j, else cos(N_i, P_j)
    V->N  1 - cos(N_i, V_i) if i = j, else cos(N_i, V_j)
normalised as in GraphAdapter: negative weights clamped to 0, self-loops on P->P and V->V, then
Â = D_r^-1/2 A D_c^-1/2 (D_r, D_c: row and column sums). They depend only on the initial nodes, so they
are constants built once.

Graph designs. The paper's edges are cosine similarities; it does not say that they are dense. These
options of HeGraphConfig change the graph; at its default each one leaves the model above unchanged.
The first three act on a meta-path's raw weights A, in this order, before the clamp:
    (E1) own_class_paths: on the meta-paths named (e.g. "vp" = V->P), A_ij = 0 for i != j: a node hears
         only its own class's node of that type (then Â = I wherever A_ii > 0).
    (E2) neighbours ν > 0: row i keeps A_ii and its ν largest A_ij, j != i; the others are 0. The own-class
         edge is always kept and not counted in ν: on P->P and V->V it is the node itself (cos = 1, it would
         always rank first, and gets its self-loop as before); on the negative paths it is the paper's
         dissimilarity edge 1 - cos, which would rank near the bottom but is the one edge the paper singles
         out; on V->P it is the class's own visual node.
    (E3) edge_temperature τ > 0: every kept weight becomes exp((A_ij - max A) / τ), the max taken over the
         kept edges: exp(A / τ) up to a constant factor, which the normalisation cancels. The factor makes
         the strongest edge weigh 1, so that a self-loop (+1) weighs as much as it, as with cosines
         (cos(P_i, P_i) = 1). The own-class 1 - cos of a negative path is sharpened like every other weight,
         so a small τ all but removes it.
The fourth acts on the normalised matrix:
    (E4) centre_messages: Â <- Â - (1/C) 1 1^T Â, every row minus the mean row, so that every message Â X
         (Â_NP N' included) loses its mean over the classes and keeps its class-specific part.
The fifth acts on the messages:
    (E5) message_activation = "tanh": σ = tanh in (1)-(3) below, on the projected message. GraphAdapter's
         layer is tanh(Â X W + b); the bias stays outside σ here, so that the bias-only ablation (every W
         at zero) is the same model under every design. By default σ is the identity.
E1-E4 are folded into the constant matrices, so a training step costs what it did; E5 adds one elementwise
tanh per layer. With every W at zero no design changes the model: the graph reaches it only through the W's.

Message passing, three steps in this order. Each target node type has one GraphAdapter layer Â X W + b:
a learnable d x d projection shared by its meta-paths (W_n, W_p, W_v) and a learnable per-class bias
[C, d] (b_n, b_p, b_v). Each meta-path has a fixed fusion weight β. The update is residual and the message
linear (choice; σ = identity unless E5 makes it tanh):
    N' = norm(N + σ(s_W (β_PN Â_PN P + β_VN Â_VN V) W_n) + s_b b_n)                           (1)
    P' = norm(P + σ(s_W (β_NP Â_NP N' + β_VP Â_VP V + β_PP Â_PP P) W_p) + s_b b_p)            (2)
    Δ  = σ(s_W β_VV Â_VV V W_v) + s_b b_v           the class visual bias, [C, d]            (3)
The fixed scales s_W and s_b (choice) set the layers' step sizes. Adam moves every entry of a parameter
by about the learning rate, whatever its gradient's size, so one step moves an entry of s_b b by s_b lr,
but an entry of s_W m W (m a message row) by up to s_W lr |m|_1, which grows with d: on CLIP ViT-B/32
features |m|_1 is about 2.6, so unscaled projections would step 26 times as far as biases at s_b = 0.1.
β_NP is larger in training and 0.1 at test (paper 4.1); the module switches with train() / eval().

Classifiers and loss (paper 3.2), for an image feature f with label y:
    logits_t = s norm(f) P'^T                                              text classifier        (4)
    logits_v = exp(-γ (1 - norm(f) K'^T)) L,   K' = norm(K + Δ[y_K])       cache, refined keys    (5)
    loss     = CE(logits_t, y) + λ CE(logits_v, y)                                                 (6)
    predict  = logits_t + α logits_v                                                              (7)
where K [M, d] are the cache's keys (the few-shot image features), y_K [M] their labels and
L = onehot(y_K) the values. With every W and b at zero the prediction is exactly zero-shot CLIP plus the
training-free Tip-Adapter.

Variants (paper Table 2): "full" is everything above; "t" uses logits_t alone; "tn" is "t" with only the
negative path feeding P' (β_VP = β_PP = 0); "tp" is "t" without negative nodes (β_NP = 0). Negative text
features may be None: then the negative nodes and their meta-paths are absent.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = ("full", "t", "tn", "tp")
META_PATHS = ("pp", "vv", "vp", "np", "pn", "vn")  # source then target: "vp" = V->P, edges A_vp
ACTIVATIONS = ("linear", "tanh")                   # σ of (1)-(3), design E5


@dataclass(frozen=True)  # frozen: several fields are folded into constants when the model is built
class HeGraphConfig:
    variant: str = "full"      # "full"; "t" text classifier only; "tn" t with the negative path only; "tp" t, no N
    beta_pn: float = 0.1       # β of meta-path P -> N (step 1)
    beta_vn: float = 0.1       # β of meta-path V -> N (step 1)
    beta_np: float = 0.2       # β of meta-path N -> P during training; the paper makes it larger than at test
    beta_np_test: float = 0.1  # β of meta-path N -> P at test time (paper 4.1)
    beta_vp: float = 0.3       # β of meta-path V -> P; the paper finds β_VP > β_PP
    beta_pp: float = 0.2       # β of meta-path P -> P
    beta_vv: float = 0.1       # β of meta-path V -> V, the scale of the graph part of Δ (step 3)
    weight_scale: float = 0.1  # s_W, the scale of the projections W_n, W_p, W_v; under Adam, their step size
    bias_scale: float = 0.1    # s_b, the scale of the per-class biases b_n, b_p, b_v; under Adam, their step size
    alpha: float = 1.0         # cache residual ratio α in the prediction logits_t + α logits_v
    gamma: float = 5.0         # cache sharpness γ in exp(-γ (1 - cos)) (Tip-Adapter's "beta")
    lam: float = 0.1           # weight λ of the cache loss CE(logits_v, y)
    # graph designs (E1)-(E5) of the module docstring; each default keeps the dense, linear graph
    own_class_paths: str = ""          # (E1) meta-paths (comma-separated, "vp" = V->P) joining a class's own nodes only
    neighbours: int = 0                # (E2) ν: each target keeps its own class's source and its ν most similar; 0: all
    edge_temperature: float = 0.0      # (E3) τ: edge weights A -> exp((A - max A) / τ), sharpened; 0 keeps the cosines
    centre_messages: bool = False      # (E4) every message minus its mean over classes: the class-specific part
    message_activation: str = "linear" # (E5) σ on the projected messages: "linear" (identity) or "tanh"

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}: choose one of {', '.join(VARIANTS)}")
        unknown = [name for name in self.own_class_paths.split(",") if name and name not in META_PATHS]
        if unknown:
            raise ValueError(f"own_class_paths: unknown meta-path {unknown[0]!r}: choose among "
                             f"{', '.join(META_PATHS)} (source then target), comma-separated")
        if self.neighbours < 0 or self.edge_temperature < 0:
            raise ValueError(f"neighbours and edge_temperature must be >= 0 (0 turns them off), got "
                             f"{self.neighbours} and {self.edge_temperature}")
        numbers = {f.name: getattr(self, f.name) for f in fields(self) if f.type in (int, float)}
        bad = [name for name, x in numbers.items() if not (math.isfinite(x) and x >= 0)] + \
            ([] if self.gamma > 0 else ["gamma"])   # γ = 0 would give every cache key the same affinity
        if bad:
            raise ValueError(f"{bad[0]} must be a finite number >= 0 (gamma > 0), got {numbers[bad[0]]}")
        if self.message_activation not in ACTIVATIONS:
            raise ValueError(f"unknown message_activation {self.message_activation!r}: choose one of "
                             f"{', '.join(ACTIVATIONS)}")

    def own_class_only(self, path):
        """Whether meta-path `path` ("vp" = V->P) keeps only its own-class edges (E1)."""
        return path in [name for name in self.own_class_paths.split(",") if name]


# -----------------------------------------------------------------------------
# the graph: nodes, edges, normalisation

def normalize(x):
    """Rows to unit L2 norm."""
    return F.normalize(x, dim=-1)


def class_means(feats, labels, num_classes):
    """Visual nodes: norm(mean of each class's features). [M, d], [M] -> [C, d].

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
    """GraphAdapter's normalisation: clamp to >= 0, optional self-loops, D_r^-1/2 A D_c^-1/2.

    [C, C] -> [C, C], or a batch of graphs [..., C, C]. A node without edges gets a zero row/column.
    """
    a = a.clamp(min=0)
    if self_loops:
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    inv_sqrt = lambda deg: torch.where(deg > 0, deg.clamp(min=torch.finfo(deg.dtype).tiny).rsqrt(), 0.0)
    return inv_sqrt(a.sum(-1)).unsqueeze(-1) * a * inv_sqrt(a.sum(-2)).unsqueeze(-2)


def kept_edges(a, own_class_only=False, neighbours=0):
    """Designs E1 and E2: which edges of a meta-path's raw weights a [C, C] (row = target) are kept.

    Returns a bool mask [C, C], or None when every edge is kept (the dense graph). The own-class edge (the
    diagonal) is always kept and does not count in ν.
    """
    C = a.shape[-1]
    own = torch.eye(C, dtype=torch.bool, device=a.device)                  # [C, C] own-class edges
    if own_class_only:
        return own
    if neighbours == 0:
        return None
    others = a.masked_fill(own, float("-inf"))                             # [C, C] rank the other classes only
    top = others.topk(min(neighbours, C - 1), dim=-1).indices              # [C, ν] each target's most similar
    return own.scatter(-1, top, True)                                      # [C, C]


def graph_adjacency(a, self_loops, own_class_only=False, neighbours=0, temperature=0.0, centre=False):
    """Â of one meta-path from its raw weights a [C, C]: designs E1-E3, the normalisation, then E4. [C, C].

    With the defaults this is normalize_adjacency(a, self_loops), the dense graph, operation for operation.
    """
    keep = kept_edges(a, own_class_only, neighbours)                       # [C, C] bool, or None: all
    if temperature > 0:  # E3; the largest kept weight is subtracted, so exp cannot overflow
        a = a.sub(a.max() if keep is None else a[keep].max()).div(temperature).exp()  # [C, C]
    if keep is not None:
        a = a.masked_fill(~keep, 0.0)                                      # [C, C]
    a = normalize_adjacency(a, self_loops)                                 # [C, C]
    return a - a.mean(-2, keepdim=True) if centre else a                   # E4: minus the mean row


def cache_logits(similarity, cache_labels, num_classes, gamma, exclude=None):
    """Tip-Adapter's cache classifier (5) from cosine similarities to the keys: exp(-γ(1 - sim)) L.

    [B, M] similarities, [M] key labels -> [B, C]. Summing per class with index_add_ costs O(B M);
    multiplying by the one-hot L [M, C] would cost O(B M C). exclude [B] (optional): the cache row each
    image came from, whose affinity is taken back out (leave-one-out) in O(B), not by masking [B, M].
    """
    affinity = similarity.mul(gamma).sub_(gamma).exp_()  # [B, M] exp(γ sim - γ), in one buffer: B may be M
    logits = affinity.new_zeros(similarity.shape[0], num_classes).index_add_(1, cache_labels, affinity)
    if exclude is not None:
        own = affinity.gather(1, exclude.view(-1, 1))                          # [B, 1]
        logits = logits.scatter_add(1, cache_labels[exclude].view(-1, 1), -own)
    return logits


# -----------------------------------------------------------------------------
# the adapter

class HeGraphAdapter(nn.Module):
    """The adapter on frozen CLIP features: graph over class nodes + text and cache classifiers.

    pos_text [C, d], neg_text [C, d] or None, cache_feats [M, d], cache_labels [M] in [0, C); then, by
    keyword, config and CLIP's logit_scale. Device and dtype follow pos_text; the other inputs are moved to it.
    """

    def __init__(self, pos_text, neg_text, cache_feats, cache_labels, *, config=HeGraphConfig(),
                 logit_scale=100.0):
        super().__init__()
        _check_inputs(pos_text, neg_text, cache_feats, cache_labels, config)
        like = dict(device=pos_text.device, dtype=pos_text.dtype)
        cfg = self._config = config
        self.logit_scale = float(logit_scale)
        self.text_only = cfg.variant != "full"
        self.has_negatives = neg_text is not None and cfg.variant != "tp"

        P = normalize(pos_text)                                                  # [C, d]
        C, d = P.shape
        keys = normalize(cache_feats.to(**like))                                 # [M, d]
        cache_labels = cache_labels.to(device=P.device, dtype=torch.long)        # [M]
        V = class_means(keys, cache_labels, C)                                   # [C, d]
        # Constants, rebuilt from the features, so they stay out of the state_dict (persistent=False).
        buffer = lambda name, t: self.register_buffer(name, t, persistent=False)
        buffer("P", P)
        buffer("V", V)
        buffer("cache_keys", keys)
        buffer("cache_sq_norms", keys.square().sum(-1))                          # [M], 1 up to rounding
        buffer("cache_labels", cache_labels)
        self._build_graph(P, normalize(neg_text.to(**like)) if self.has_negatives else None, V)

        # choice: every W and b starts at zero, so training starts exactly at zero-shot CLIP + Tip-Adapter
        # and AdamW's weight decay pulls back towards it. On real CLIP features this beat starting W at the
        # identity by 0.2-0.4 points (tuned on training images only, with s_W = 1).
        zeros = lambda *shape: nn.Parameter(torch.zeros(*shape, **like))
        if self.has_negatives:
            self.W_n, self.b_n = zeros(d, d), zeros(C, d)  # [d, d], [C, d] layer of the negative nodes (1)
        self.W_p, self.b_p = zeros(d, d), zeros(C, d)      # [d, d], [C, d] layer of the positive nodes (2)
        if not self.text_only:
            self.W_v, self.b_v = zeros(d, d), zeros(C, d)  # [d, d], [C, d] layer of the visual nodes (3)

    def _build_graph(self, P, N, V):
        """The constants of the graph from the nodes P, N (None without negatives) and V [C, d]: one normalised
        [C, C] matrix per meta-path (name = source, target; designs E1-E4), and the aggregations of the fixed
        nodes, fused with their β and s_W once. Buffers, rebuilt from the features (persistent=False)."""
        cfg = self.config
        buffer = lambda name, t: self.register_buffer(name, t, persistent=False)
        beta_vp, beta_pp = (0.0, 0.0) if cfg.variant == "tn" else (cfg.beta_vp, cfg.beta_pp)
        edges = lambda path, a, self_loops: graph_adjacency(
            a, self_loops, own_class_only=cfg.own_class_only(path), neighbours=cfg.neighbours,
            temperature=cfg.edge_temperature, centre=cfg.centre_messages)
        buffer("A_pp", edges("pp", similarity_edges(P, P), self_loops=True))
        buffer("A_vv", edges("vv", similarity_edges(V, V), self_loops=True))
        buffer("A_vp", edges("vp", similarity_edges(P, V), self_loops=False))
        if self.has_negatives:
            buffer("N", N)                                                       # [C, d]
            buffer("A_np", edges("np", negative_edges(P, N), self_loops=False))
            buffer("A_pn", edges("pn", negative_edges(N, P), self_loops=False))
            buffer("A_vn", edges("vn", negative_edges(N, V), self_loops=False))

        # Aggregations of the fixed nodes P and V are constants too: fuse them with their β and s_W once
        # here, so that a training step only multiplies them by the W's. Only N' changes with the parameters.
        # (This folding is why the config is frozen: a β changed later would be silently ignored.)
        s_W = cfg.weight_scale
        buffer("msg_to_pos", s_W * (beta_vp * self.A_vp @ V + beta_pp * self.A_pp @ P))  # [C, d]
        if self.has_negatives:
            buffer("msg_to_neg", s_W * (cfg.beta_pn * self.A_pn @ P + cfg.beta_vn * self.A_vn @ V))  # [C, d]
        if not self.text_only:
            buffer("msg_to_vis", s_W * cfg.beta_vv * self.A_vv @ V)              # [C, d]

    @property
    def config(self):
        """The HeGraphConfig the model was built with; read-only (build a new model to change it)."""
        return self._config

    @property
    def num_classes(self):
        return self.P.shape[0]

    def extra_repr(self):
        C, d = self.P.shape
        return (f"classes={C}, dim={d}, cache={self.cache_keys.shape[0]}, variant={self.config.variant!r}, "
                f"negatives={self.has_negatives}")

    def sigma(self, message):
        """σ of (1)-(3) on a projected message [C, d]: the identity, or tanh (design E5)."""
        return torch.tanh(message) if self.config.message_activation == "tanh" else message

    def propagate(self):
        """The three aggregation steps. Returns P' [C, d] and the visual bias Δ [C, d] (None if text-only)."""
        s_W, s_b = self.config.weight_scale, self.config.bias_scale
        messages = self.msg_to_pos                                               # [C, d], s_W folded in
        if self.has_negatives:
            neg = normalize(self.N + self.sigma(self.msg_to_neg @ self.W_n) + s_b * self.b_n)  # (1) N' [C, d]
            beta_np = self.config.beta_np if self.training else self.config.beta_np_test
            messages = messages + s_W * beta_np * (self.A_np @ neg)              # uses the updated N'
        pos = normalize(self.P + self.sigma(messages @ self.W_p) + s_b * self.b_p)  # (2) P' [C, d]
        if self.text_only:
            return pos, None
        return pos, self.sigma(self.msg_to_vis @ self.W_v) + s_b * self.b_v     # (3) Δ [C, d]

    def cache_similarity(self, f, delta):
        """cos(f, K') with K' = norm(K + Δ[y_K]), without materialising the refined keys. [B, M].

        f K'^T = (f K^T + (f Δ^T)[:, y_K]) / |K + Δ[y_K]|, with |K_m + Δ_y|^2 = |K_m|^2 + 2 K_m.Δ_y + |Δ_y|^2.
        The one [B, M, d] product, f K^T, holds no parameter, so backward skips it; through K' it would
        pay that product a second time.
        """
        y = self.cache_labels
        dots = (self.cache_keys * delta.index_select(0, y)).sum(-1)             # [M]  K_m . Δ_y
        key_norm = (self.cache_sq_norms + 2 * dots + delta.square().sum(-1).index_select(0, y)).sqrt()  # [M]
        return (f @ delta.T).index_select(1, y).add_(f @ self.cache_keys.T) / key_norm  # [B, M]

    def logits(self, image_feats, exclude=None):
        """logits_t [B, C] (4) and logits_v [B, C] (5, None for text-only variants) for image_feats [B, d].

        exclude [B] (optional): for each image, the cache row it came from, left out of its cache
        logits (leave-one-out), so that a training image cannot match its own key.
        """
        if image_feats.ndim != 2 or image_feats.shape[1] != self.P.shape[1]:
            raise ValueError(f"image_feats must be [B, {self.P.shape[1]}], got {list(image_feats.shape)}")
        f = normalize(image_feats.to(self.P))                                    # [B, d]
        pos, delta = self.propagate()
        logits_t = self.logit_scale * f @ pos.T                                  # [B, C]
        if self.text_only:
            return logits_t, None
        exclude = None if exclude is None else exclude.to(f.device)
        logits_v = cache_logits(self.cache_similarity(f, delta), self.cache_labels, self.num_classes,
                                self.config.gamma, exclude)
        return logits_t, logits_v

    def forward(self, image_feats):
        """Class logits [B, C] for image features [B, d]: (7) logits_t + α logits_v (logits_t if text-only)."""
        logits_t, logits_v = self.logits(image_feats)
        return logits_t if logits_v is None else logits_t + self.config.alpha * logits_v

    def loss(self, image_feats, labels, exclude=None):
        """(6) CE(logits_t, y) + λ CE(logits_v, y) (text-only variants: the first term). Scalar.

        labels [B] in [0, C): not range-checked here, which would cost a GPU -> CPU sync every step
        (F.cross_entropy itself refuses them on the CPU). exclude [B] (optional): see logits().
        """
        if labels.shape != image_feats.shape[:1]:
            raise ValueError(f"labels must be [{image_feats.shape[0]}], got {list(labels.shape)}")
        labels = labels.to(self.P.device)
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
        raise ValueError(f"cache_feats must be [M, d] with d = {d} (the text feature size), got "
                         f"{list(cache_feats.shape)}: are the image and text features from the same encoder?")
    if cache_labels.shape != cache_feats.shape[:1] or cache_labels.is_floating_point():
        raise ValueError(f"cache_labels must be integers [M] = [{cache_feats.shape[0]}], got "
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
