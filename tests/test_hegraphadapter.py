"""Tests of hegraphadapter.py against the equations of its module docstring.

Every expected value here is computed independently from those equations (loops, explicit one-hot
matmuls, hand-computed numbers), never with the module's own helpers. CPU only, small sizes, a few seconds.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fewshot.testing.fixtures import unit
from hegraphadapter import HeGraphAdapter, HeGraphConfig

VARIANTS = ("full", "t", "tn", "tp")
S = 100.0  # CLIP logit scale used throughout


# -----------------------------------------------------------------------------
# data and independent reference computations (written from the equations)

def make_data(C, d, counts, seed=0, dtype=torch.float64, B=6):
    """Random CLIP-like features: a shared direction plus noise (mostly positive, some negative cosines).

    counts[c] = number of cache samples of class c (unequal on purpose). Features are NOT normalised, so
    the model's own normalisation is exercised. The cache rows are shuffled (labels not sorted).
    """
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=g, dtype=dtype)
    rnd = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=dtype) * scale
    pos = 0.4 * common + rnd(C, d)
    neg = 0.4 * common + rnd(C, d)
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    feats = 0.4 * common + 0.5 * pos[labels] + rnd(len(labels), d)
    feats = feats * (0.5 + torch.rand(len(labels), 1, generator=g, dtype=dtype))  # varying lengths
    x = 0.4 * common + rnd(B, d)
    y = torch.randint(0, C, (B,), generator=g)
    return pos, neg, feats, labels, x, y


def ref_class_means(feats, labels, C):
    """V_c = norm(mean of the (normalised) features of class c), one class at a time in a loop."""
    rows = []
    for c in range(C):
        members = [unit(feats[i]) for i in range(len(labels)) if int(labels[i]) == c]
        rows.append(unit(torch.stack(members).mean(0)))
    return torch.stack(rows)


def ref_raw_edges(targets, sources, negative):
    """A_ij = cos(target_i, source_j); with negative=True the diagonal is 1 - cos(target_i, source_i)."""
    T, Sx = unit(targets), unit(sources)
    C = T.shape[0]
    A = torch.empty(C, C, dtype=T.dtype)
    for i in range(C):
        for j in range(C):
            c = float(torch.dot(T[i], Sx[j]))
            A[i, j] = 1.0 - c if (negative and i == j) else c
    return A


def ref_normalise(A, self_loops):
    """Clamp to >= 0, optional +I, then D_r^-1/2 A D_c^-1/2 (row sums, column sums; empty row/col -> 0)."""
    A = A.clamp(min=0)
    if self_loops:
        A = A + torch.eye(A.shape[0], dtype=A.dtype)
    r, c = A.sum(1), A.sum(0)
    inv = lambda deg: torch.where(deg > 0, 1.0 / torch.sqrt(torch.where(deg > 0, deg, 1.0)), 0.0)
    return inv(r)[:, None] * A * inv(c)[None, :]


def ref_design_edges(raw, self_loops, cfg=HeGraphConfig(), path=""):
    """Â of one meta-path with the docstring's designs E1-E4, one entry at a time, then ref_normalise.

    E1: only the diagonal on the paths in cfg.own_class_paths. E2: row i keeps (i, i) and the ν largest
    raw[i, j], j != i, found by sorting. E3: exp((raw - the largest kept raw) / τ) on the kept entries.
    E4: every row minus the mean of the rows.
    """
    C = raw.shape[0]
    own_only = path in cfg.own_class_paths.split(",")
    keep = [[not own_only or i == j for j in range(C)] for i in range(C)]
    if cfg.neighbours > 0 and not own_only:
        for i in range(C):
            ranked = sorted((j for j in range(C) if j != i), key=lambda j: float(raw[i, j]), reverse=True)
            chosen = {i, *ranked[:cfg.neighbours]}
            keep[i] = [j in chosen for j in range(C)]
    top = max(float(raw[i, j]) for i in range(C) for j in range(C) if keep[i][j])
    A = torch.zeros(C, C, dtype=raw.dtype)
    for i in range(C):
        for j in range(C):
            if keep[i][j]:
                w = float(raw[i, j])
                A[i, j] = math.exp((w - top) / cfg.edge_temperature) if cfg.edge_temperature > 0 else w
    A = ref_normalise(A, self_loops)
    if cfg.centre_messages:
        mean_row = sum(A[i] for i in range(C)) / C
        A = torch.stack([A[i] - mean_row for i in range(C)])
    return A


def ref_all_edges(pos, neg, feats, labels, cfg=HeGraphConfig()):
    """{name: Â} of the six meta-paths (three without negatives), from the features, with cfg's designs."""
    P, V = unit(pos), ref_class_means(feats, labels, pos.shape[0])
    edges = {"A_pp": ref_design_edges(ref_raw_edges(P, P, False), True, cfg, "pp"),
             "A_vv": ref_design_edges(ref_raw_edges(V, V, False), True, cfg, "vv"),
             "A_vp": ref_design_edges(ref_raw_edges(P, V, False), False, cfg, "vp")}
    if neg is not None:
        N = unit(neg)
        edges.update(A_np=ref_design_edges(ref_raw_edges(P, N, True), False, cfg, "np"),
                     A_pn=ref_design_edges(ref_raw_edges(N, P, True), False, cfg, "pn"),
                     A_vn=ref_design_edges(ref_raw_edges(N, V, True), False, cfg, "vn"))
    return edges


def ref_logits(pos, neg, feats, labels, x, params, cfg, training):
    """logits_t, logits_v from the module docstring's equations (1)-(5), unfused, variant-aware, with the
    graph designs E1-E5 of cfg.

    params: {"W_n", "W_p", "W_v", "b_n", "b_p", "b_v"} (those a variant lacks may be NaN: they must be unused).
    """
    C = pos.shape[0]
    v, s_W, s_b = cfg.variant, cfg.weight_scale, cfg.bias_scale
    sigma = torch.tanh if cfg.message_activation == "tanh" else (lambda m: m)
    P, Fk, f = unit(pos), unit(feats), unit(x)
    V = ref_class_means(feats, labels, C)
    A = ref_all_edges(pos, neg, feats, labels, cfg)
    b_vp, b_pp = (0.0, 0.0) if v == "tn" else (cfg.beta_vp, cfg.beta_pp)
    Wp = s_W * params["W_p"]
    messages = b_vp * (A["A_vp"] @ V @ Wp) + b_pp * (A["A_pp"] @ P @ Wp)
    if neg is not None and v != "tp":
        N, Wn = unit(neg), s_W * params["W_n"]
        N2 = unit(N + sigma(cfg.beta_pn * (A["A_pn"] @ P @ Wn) + cfg.beta_vn * (A["A_vn"] @ V @ Wn))
                  + s_b * params["b_n"])                                                          # (1)
        b_np = cfg.beta_np if training else cfg.beta_np_test
        messages = messages + b_np * (A["A_np"] @ N2 @ Wp)
    P2 = unit(P + sigma(messages) + s_b * params["b_p"])                                       # (2)
    logits_t = S * f @ P2.T
    if v != "full":
        return logits_t, None
    delta = sigma(cfg.beta_vv * (A["A_vv"] @ V @ (s_W * params["W_v"]))) + s_b * params["b_v"]          # (3)
    K = unit(Fk + delta[labels])
    L = F.one_hot(labels, C).to(x.dtype)
    logits_v = torch.exp(-cfg.gamma * (1.0 - f @ K.T)) @ L
    return logits_t, logits_v


def all_params(model, found):
    """found ({name: value} of the model's parameters) completed with NaN for the ones it lacks."""
    C, d = model.P.shape
    nan = lambda *shape: torch.full(shape, float("nan"), dtype=model.P.dtype)
    return {**{f"W_{t}": nan(d, d) for t in "npv"}, **{f"b_{t}": nan(C, d) for t in "npv"}, **found}


def random_W(d, seed, dtype=torch.float64, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.eye(d, dtype=dtype) + scale * torch.randn(d, d, generator=g, dtype=dtype)


def set_params(model, seed, scale=0.3):
    """Move every W away from the identity and every b away from zero; return {name: value}."""
    params = {}
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for k, (name, p) in enumerate(sorted(model.named_parameters())):
            if name.startswith("W_"):
                p.copy_(random_W(p.shape[0], seed + k, p.dtype, scale))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
            params[name] = p.detach().clone()
    return params


# -----------------------------------------------------------------------------
# shapes

SHAPE_CASES = [  # (C, d, counts)
    (47, 24, [1 + (c * 7) % 4 for c in range(47)]),
    (37, 40, [1 + (c * 5) % 16 for c in range(37)]),
    (5, 8, [3, 1, 2, 5, 1]),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("negatives", [True, False])
@pytest.mark.parametrize("C,d,counts", SHAPE_CASES, ids=["C47d24", "C37d40", "C5d8"])
def test_shapes(C, d, counts, variant, negatives):
    pos, neg, feats, labels, x, y = make_data(C, d, counts, dtype=torch.float32, B=7)
    cfg = HeGraphConfig(variant=variant)
    if variant == "tn" and not negatives:
        with pytest.raises(ValueError, match="needs neg_text"):
            HeGraphAdapter(pos, None, feats, labels, config=cfg)
        return
    model = HeGraphAdapter(pos, neg if negatives else None, feats, labels, config=cfg)
    assert model.V.shape == (C, d) and model.cache_keys.shape == (sum(counts), d)
    out = model(x)
    assert out.shape == (7, C) and torch.isfinite(out).all()
    logits_t, logits_v = model.logits(x)
    assert logits_t.shape == (7, C)
    assert (logits_v is None) == (variant != "full")
    if logits_v is not None:
        assert logits_v.shape == (7, C)
    loss = model.loss(x, y)
    assert loss.shape == () and torch.isfinite(loss)
    model.eval()
    assert model(x).shape == (7, C)


# -----------------------------------------------------------------------------
# edges: a hand-computed example (C = 3, d = 2)

def hand_model():
    """P, N, V chosen so that every cosine is a simple number (see the comments in test_edges_by_hand)."""
    P = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.6, 0.8]], dtype=torch.float64)
    N = torch.tensor([[0.0, -1.0], [0.6, 0.8], [0.8, -0.6]], dtype=torch.float64)
    # class 0 has two samples whose mean (0.6, 0) normalises to V_0 = (1, 0); classes 1, 2 one each
    cache = torch.tensor([[0.6, 0.8], [0.8, 0.6], [-1.0, 0.0], [0.6, -0.8]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0])
    # scale the text rows: the model must normalise them
    model = HeGraphAdapter(P * torch.tensor([[2.0], [0.5], [3.0]], dtype=torch.float64),
                           N * torch.tensor([[1.5], [1.0], [0.2]], dtype=torch.float64),
                           cache, labels, config=HeGraphConfig())
    return model


def by_hand(clamped, rows, cols):
    """D_r^-1/2 A D_c^-1/2 from hand-written clamped weights and hand-written row / column sums."""
    A = torch.tensor(clamped, dtype=torch.float64)
    assert torch.allclose(A.sum(1), torch.tensor(rows, dtype=torch.float64))  # checks the hand arithmetic
    assert torch.allclose(A.sum(0), torch.tensor(cols, dtype=torch.float64))
    r = torch.tensor(rows, dtype=torch.float64)
    c = torch.tensor(cols, dtype=torch.float64)
    return A / torch.sqrt(r[:, None] * c[None, :])


def test_edges_by_hand():
    m = hand_model()
    # P0=(1,0) P1=(0,1) P2=(-.6,.8);  N0=(0,-1) N1=(.6,.8) N2=(.8,-.6);  V0=(1,0) V1=(.8,.6) V2=(-1,0)
    assert torch.allclose(m.V, torch.tensor([[1.0, 0.0], [0.8, 0.6], [-1.0, 0.0]], dtype=torch.float64))

    # P -> P: raw [[1, 0, -.6], [0, 1, .8], [-.6, .8, 1]]; clamp, +I
    A_pp = by_hand([[2, 0, 0], [0, 2, .8], [0, .8, 2]], rows=[2, 2.8, 2.8], cols=[2, 2.8, 2.8])
    assert torch.allclose(A_pp, torch.tensor([[1, 0, 0], [0, 2 / 2.8, .8 / 2.8], [0, .8 / 2.8, 2 / 2.8]],
                                             dtype=torch.float64))
    # V -> V: raw [[1, .8, -1], [.8, 1, -.8], [-1, -.8, 1]]; clamp, +I
    A_vv = by_hand([[2, .8, 0], [.8, 2, 0], [0, 0, 2]], rows=[2.8, 2.8, 2], cols=[2.8, 2.8, 2])
    # V -> P, A[i,j] = cos(P_i, V_j): raw [[1, .8, -1], [0, .6, 0], [-.6, 0, .6]]; clamp, no self-loops.
    # Not symmetric: row sums (1.8, .6, .6) differ from column sums (1, 1.4, .6).
    A_vp = by_hand([[1, .8, 0], [0, .6, 0], [0, 0, .6]], rows=[1.8, .6, .6], cols=[1, 1.4, .6])
    assert torch.allclose(A_vp, torch.tensor([[1 / math.sqrt(1.8), .8 / math.sqrt(1.8 * 1.4), 0],
                                              [0, .6 / math.sqrt(.6 * 1.4), 0],
                                              [0, 0, 1]], dtype=torch.float64))
    # N -> P, A[i,j] = cos(P_i, N_j), diagonal 1 - cos(P_i, N_i):
    # raw [[1-0, .6, .8], [-1, 1-.8, -.6], [-.8, .28, 1-(-.96)]]; clamp
    A_np = by_hand([[1, .6, .8], [0, .2, 0], [0, .28, 1.96]], rows=[2.4, .2, 2.24], cols=[1, 1.08, 2.76])
    # P -> N, A[i,j] = cos(N_i, P_j), diagonal 1 - cos(N_i, P_i):
    # raw [[1, -1, -.8], [.6, .2, .28], [.8, -.6, 1.96]]; clamp
    A_pn = by_hand([[1, 0, 0], [.6, .2, .28], [.8, 0, 1.96]], rows=[1, 1.08, 2.76], cols=[2.4, .2, 2.24])
    # V -> N, A[i,j] = cos(N_i, V_j), diagonal 1 - cos(N_i, V_i):
    # raw [[1-0, -.6, 0], [.6, 1-.96, -.6], [.8, .28, 1-(-.8)]]; clamp
    A_vn = by_hand([[1, 0, 0], [.6, .04, 0], [.8, .28, 1.8]], rows=[1, .64, 2.88], cols=[2.4, .32, 1.8])

    for name, expected in [("A_pp", A_pp), ("A_vv", A_vv), ("A_vp", A_vp),
                           ("A_np", A_np), ("A_pn", A_pn), ("A_vn", A_vn)]:
        assert torch.allclose(getattr(m, name), expected, atol=1e-12), name


def test_edges_random_match_loop_reference():
    """The same construction on random features with unequal class counts, against the loop reference."""
    pos, neg, feats, labels, _, _ = make_data(6, 5, [2, 1, 4, 1, 3, 2], seed=3)
    m = HeGraphAdapter(pos, neg, feats, labels, config=HeGraphConfig())
    P, N, V = unit(pos), unit(neg), ref_class_means(feats, labels, 6)
    expected = {"A_pp": ref_normalise(ref_raw_edges(P, P, False), True),
                "A_vv": ref_normalise(ref_raw_edges(V, V, False), True),
                "A_vp": ref_normalise(ref_raw_edges(P, V, False), False),
                "A_np": ref_normalise(ref_raw_edges(P, N, True), False),
                "A_pn": ref_normalise(ref_raw_edges(N, P, True), False),
                "A_vn": ref_normalise(ref_raw_edges(N, V, True), False)}
    for name, A in expected.items():
        assert torch.allclose(getattr(m, name), A, atol=1e-12), name
        assert getattr(m, name).requires_grad is False


# -----------------------------------------------------------------------------
# visual nodes

def test_visual_nodes_are_class_means_with_unequal_counts():
    counts = [1, 5, 2, 9, 3, 1, 4]
    pos, neg, feats, labels, _, _ = make_data(7, 6, counts, seed=1)
    m = HeGraphAdapter(pos, neg, feats, labels, config=HeGraphConfig())
    assert torch.bincount(labels).tolist() == counts
    assert torch.allclose(m.V, ref_class_means(feats, labels, 7), atol=1e-12)
    assert torch.allclose(m.V.norm(dim=-1), torch.ones(7, dtype=torch.float64))


# -----------------------------------------------------------------------------
# gradients

def small_model(variant="full", negatives=True, seed=0, **cfg):
    pos, neg, feats, labels, x, y = make_data(4, 5, [3, 1, 2, 3], seed=seed, B=3)
    model = HeGraphAdapter(pos, neg if negatives else None, feats, labels, config=HeGraphConfig(variant=variant, **cfg))
    return model, (pos, neg if negatives else None, feats, labels, x, y)


class LossCall(torch.nn.Module):
    """forward = model.loss, so that torch.func.functional_call can swap the W's of the loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y, exclude=None):
        return self.model.loss(x, y, exclude)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradcheck_logits_and_loss(mode):
    model, (_, _, feats, labels, x, y) = small_model(beta_vv=0.5)
    model.train(mode == "train")
    Ws = set_params(model, seed=10)
    names = ["W_n", "W_p", "W_v", "b_n", "b_p", "b_v"]
    assert sorted(Ws) == sorted(names)
    inputs = tuple(Ws[n].clone().requires_grad_(True) for n in names)

    wrapped = LossCall(model)  # functional_call calls forward(); this forward is model.loss
    rows = torch.tensor([0, 4, 8])

    def logits(*ws):
        return functional_call(model, dict(zip(names, ws)), (x,))

    def loss(*ws):
        return functional_call(wrapped, {f"model.{n}": w for n, w in zip(names, ws)}, (x, y))

    def loss_loo(*ws):  # leave-one-out: the -inf entries must not poison the gradient
        return functional_call(wrapped, {f"model.{n}": w for n, w in zip(names, ws)},
                               (feats[rows], labels[rows], rows))

    assert torch.autograd.gradcheck(logits, inputs, fast_mode=mode == "eval")
    assert torch.autograd.gradcheck(loss, inputs, fast_mode=True)
    assert torch.autograd.gradcheck(loss_loo, inputs, fast_mode=True)


def grads_of_loss(model, x, y):
    model.zero_grad(set_to_none=True)
    model.loss(x, y).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant,negatives,layers", [
    ("full", True, "npv"),
    ("full", False, "pv"),
    ("t", True, "np"),
    ("t", False, "p"),
    ("tn", True, "np"),
    ("tp", True, "p"),
    ("tp", False, "p"),
])
def test_which_parameters_learn(variant, negatives, layers):
    """Each node type present has its layer (W and b) and both get gradient; absent ones are not created."""
    model, (_, _, _, _, x, y) = small_model(variant, negatives)
    set_params(model, seed=5)
    grads = grads_of_loss(model, x, y)
    expected = {f"{kind}_{t}" for t in layers for kind in "Wb"}
    assert set(grads) == expected
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_biases_are_per_class():
    """With W = 0, row c of b_p moves only class c's text logits and row c of b_v only class c's cache logits."""
    model, (_, _, _, _, x, _) = small_model("full", bias_scale=0.7)
    base_t, base_v = model.logits(x)
    for name, changed in (("b_p", 0), ("b_v", 1)):
        with torch.no_grad():
            getattr(model, name)[2] = torch.linspace(-1, 1, model.P.shape[1], dtype=torch.float64)
        out = model.logits(x)
        diff = (out[changed] - (base_t, base_v)[changed]).abs()
        assert diff[:, 2].min() > 1e-6 and diff[:, [0, 1, 3]].max() < 1e-12, name
        assert torch.equal(out[1 - changed], (base_t, base_v)[1 - changed])   # the other classifier is untouched
        with torch.no_grad():
            getattr(model, name).zero_()
    # b_n reaches P' through Â_NP N' W_p: with W_p = 0 it changes nothing, with W_p != 0 it does
    with torch.no_grad():
        model.b_n[2] = 1.0
    assert torch.equal(model.logits(x)[0], base_t)
    with torch.no_grad():
        model.W_p.copy_(torch.eye(model.P.shape[1]))
    with_bias = model.logits(x)[0]
    with torch.no_grad():
        model.b_n.zero_()
    assert not torch.allclose(model.logits(x)[0], with_bias)


@pytest.mark.parametrize("kind,field", [("b", "bias_scale"), ("W", "weight_scale")])
def test_scale_scales_its_parameters(kind, field):
    """s_b b and s_W W are what enter: doubling a scale and halving its parameters gives the same model."""
    model, (_, _, _, _, x, _) = small_model("full", **{field: 0.2})
    twin, _ = small_model("full", **{field: 0.4})
    params = set_params(model, seed=3)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            p.copy_(params[name] / 2 if name.startswith(kind + "_") else params[name])
    assert torch.allclose(model(x), twin(x), atol=1e-12)
    with torch.no_grad():
        getattr(twin, kind + "_p").mul_(2)
    assert not torch.allclose(model(x), twin(x), atol=1e-6)


def test_tn_ignores_visual_and_positive_messages():
    """tn with β_VN = 0: P' sees only N', which sees only P, so the cache (V) cannot change the output;
    variant t (same β) does depend on it, which shows the check can fail."""
    pos, neg, feats, labels, x, _ = make_data(5, 6, [2, 3, 1, 2, 2], seed=4)
    _, _, feats2, labels2, _, _ = make_data(5, 6, [1, 1, 4, 2, 3], seed=5)
    out = {}
    for variant in ("tn", "t"):
        cfg = HeGraphConfig(variant=variant, beta_vn=0.0)
        a = HeGraphAdapter(pos, neg, feats, labels, config=cfg)
        b = HeGraphAdapter(pos, neg, feats2, labels2, config=cfg)
        set_params(a, 1), set_params(b, 1)
        out[variant] = (a(x), b(x))
    assert torch.allclose(*out["tn"], atol=1e-12)
    assert not torch.allclose(*out["t"], atol=1e-6)


# -----------------------------------------------------------------------------
# forward against the reference

def test_zero_parameters_give_zero_shot_plus_tip_adapter():
    for dtype, atol in ((torch.float32, 5e-5), (torch.float64, 1e-10)):
        for negatives in (True, False):
            pos, neg, feats, labels, x, _ = make_data(6, 10, [2, 1, 3, 4, 1, 2], seed=2, dtype=dtype)
            cfg = HeGraphConfig(alpha=1.7, gamma=3.0)
            model = HeGraphAdapter(pos, neg if negatives else None, feats, labels, config=cfg)
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
            f = unit(x)
            onehot = F.one_hot(labels, 6).to(dtype)
            expected = S * f @ unit(pos).T + 1.7 * torch.exp(-3.0 * (1 - f @ unit(feats).T)) @ onehot
            for mode in (True, False):
                model.train(mode)
                assert torch.allclose(model(x), expected, rtol=0, atol=atol), (dtype, negatives, mode)


@pytest.mark.parametrize("variant,negatives", [(v, n) for v in VARIANTS for n in (True, False)
                                               if not (v == "tn" and not n)])  # tn needs negatives
def test_forward_and_loss_match_reference(variant, negatives):
    cfg = HeGraphConfig(variant=variant, beta_pn=0.3, beta_vn=0.25, beta_np=0.6, beta_np_test=0.1,
                        beta_vp=0.35, beta_pp=0.2, beta_vv=0.4, weight_scale=0.6, bias_scale=0.3, alpha=1.3, gamma=4.0,
                        lam=0.3)
    pos, neg, feats, labels, x, y = make_data(6, 7, [2, 4, 1, 3, 2, 1], seed=7, B=5)
    neg = neg if negatives else None
    model = HeGraphAdapter(pos, neg, feats, labels, config=cfg, logit_scale=S)
    params = all_params(model, set_params(model, seed=20, scale=0.5))  # NaN for what the variant lacks
    for training in (True, False):
        model.train(training)
        lt, lv = ref_logits(pos, neg, feats, labels, x, params, cfg, training)
        mt, mv = model.logits(x)
        assert torch.allclose(mt, lt, atol=1e-10)
        expected = lt if lv is None else lt + cfg.alpha * lv
        assert torch.allclose(model(x), expected, atol=1e-10)
        ref_loss = F.cross_entropy(lt, y) + (0 if lv is None else cfg.lam * F.cross_entropy(lv, y))
        assert torch.allclose(model.loss(x, y), ref_loss, atol=1e-10)
        if lv is not None:
            assert torch.allclose(mv, lv, atol=1e-10)


def test_permutation_equivariance():
    C = 6
    pos, neg, feats, labels, x, _ = make_data(C, 8, [2, 1, 3, 2, 4, 1], seed=11)
    model = HeGraphAdapter(pos, neg, feats, labels, config=HeGraphConfig())
    Ws = set_params(model, seed=3, scale=0.5)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])           # new class k = old class perm[k]
    inv = torch.argsort(perm)                          # old class c -> new class inv[c]
    rows = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))  # shuffle the cache too
    permuted = HeGraphAdapter(pos[perm], neg[perm], feats[rows], inv[labels[rows]], config=HeGraphConfig())
    with torch.no_grad():
        for n, p in permuted.named_parameters():
            p.copy_(Ws[n][perm] if n.startswith("b_") else Ws[n])    # a bias has one row per class
    for mode in (True, False):
        model.train(mode), permuted.train(mode)
        assert torch.allclose(permuted(x), model(x)[:, perm], atol=1e-10)
    # sanity: the permutation is not trivially invisible
    assert not torch.allclose(permuted(x), model(x), atol=1e-3)


def test_beta_np_switches_with_train_and_eval():
    pos, neg, feats, labels, x, _ = make_data(5, 6, [2, 2, 1, 3, 2], seed=6)
    for beta_np, beta_np_test, differ in ((0.6, 0.1, True), (0.3, 0.3, False)):
        config = HeGraphConfig(beta_np=beta_np, beta_np_test=beta_np_test)
        model = HeGraphAdapter(pos, neg, feats, labels, config=config)
        set_params(model, seed=2)
        train_out = model.train()(x)
        eval_out = model.eval()(x)
        assert torch.allclose(train_out, eval_out, atol=1e-12) != differ
        # eval() with beta_np_test = a train() model built with beta_np = beta_np_test
        twin = HeGraphAdapter(pos, neg, feats, labels, config=HeGraphConfig(beta_np=beta_np_test))
        set_params(twin, seed=2)
        assert torch.allclose(twin.train()(x), eval_out, atol=1e-12)


def test_leave_one_out_removes_exactly_the_own_key():
    cfg = HeGraphConfig(gamma=4.0, lam=0.5, beta_vv=0.5)
    pos, neg, feats, labels, _, _ = make_data(5, 6, [3, 2, 2, 4, 1], seed=8)
    model = HeGraphAdapter(pos, neg, feats, labels, config=cfg)
    Ws = set_params(model, seed=9)
    rows = torch.tensor([0, 3, 5, 11, 7])
    x, y = feats[rows], labels[rows]            # the cache's own images
    lt_ref, lv_full = ref_logits(pos, neg, feats, labels, x, Ws, cfg, True)
    # reference: same graph (V from the whole cache), but each image's own cache row dropped from the keys
    V = ref_class_means(feats, labels, 5)
    Bias = (cfg.beta_vv * ref_normalise(ref_raw_edges(V, V, False), True) @ V @ (cfg.weight_scale * Ws["W_v"])
            + cfg.bias_scale * Ws["b_v"])
    lv_loo = []
    for b, r in enumerate(rows.tolist()):
        keep = [i for i in range(len(labels)) if i != r]
        K = unit(unit(feats[keep]) + Bias[labels[keep]])
        onehot = F.one_hot(labels[keep], 5).to(x.dtype)
        lv_loo.append(torch.exp(-cfg.gamma * (1 - unit(x[b]) @ K.T)) @ onehot)
    lv_loo = torch.stack(lv_loo)
    lt, lv = model.logits(x, exclude=rows)
    assert torch.allclose(lv, lv_loo, atol=1e-10)
    assert torch.allclose(lt, lt_ref, atol=1e-10)
    # the removed amount is the own key's affinity, ~exp(0) = 1 for an unrefined key, all in the own class
    removed = lv_full - lv
    assert torch.allclose(removed.sum(1), removed[torch.arange(5), y], atol=1e-10)
    assert (removed[torch.arange(5), y] > 0.5).all()
    loss = model.loss(x, y, exclude=rows)
    assert torch.allclose(loss, F.cross_entropy(lt_ref, y) + cfg.lam * F.cross_entropy(lv_loo, y), atol=1e-10)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# -----------------------------------------------------------------------------
# graph designs E1-E5 (module docstring)

DESIGNS = {  # id -> HeGraphConfig fields: each moves designs off their defaults
    "own-vp": dict(own_class_paths="vp"),
    "own-all": dict(own_class_paths="pp,vv,vp,np,pn,vn"),
    "neighbours": dict(neighbours=2),
    "temperature": dict(edge_temperature=0.1),
    "neighbours+temperature": dict(neighbours=3, edge_temperature=0.05),
    "centre": dict(centre_messages=True),
    "tanh": dict(message_activation="tanh"),
    "all": dict(own_class_paths="vn,vv", neighbours=2, edge_temperature=0.2, centre_messages=True,
                message_activation="tanh"),
}
EDGES = ("A_pp", "A_vv", "A_vp", "A_np", "A_pn", "A_vn")
MESSAGES = ("msg_to_pos", "msg_to_neg", "msg_to_vis")
CHANGED = {  # the buffers each design must change (all others must stay bit for bit)
    "own-vp": {"A_vp", "msg_to_pos"},
    "tanh": set(),
}


@pytest.mark.parametrize("neighbours", [1, 2, 4, 7])
def test_sparse_edges_match_a_loop_reference(neighbours):
    """E2 on all six meta-paths: each target row keeps its own class and its ν most similar other sources."""
    C = 9
    pos, neg, feats, labels, _, _ = make_data(C, 6, [2, 1, 3, 1, 2, 2, 1, 3, 1], seed=12)
    cfg = HeGraphConfig(neighbours=neighbours)
    model = HeGraphAdapter(pos, neg, feats, labels, config=cfg)
    for name, expected in ref_all_edges(pos, neg, feats, labels, cfg).items():
        A = getattr(model, name)
        assert torch.allclose(A, expected, atol=1e-12), name
        assert (A.ne(0).sum(1) <= neighbours + 1).all(), name                # at most ν + the own class
    dense = ref_all_edges(pos, neg, feats, labels)
    assert sum(not torch.allclose(getattr(model, n), dense[n], atol=1e-6) for n in EDGES) >= 3  # not dense


def test_sparse_edges_keep_the_own_class_negative_edge():
    """Negative prompts close to the positive ones (as CLIP's are) make 1 - cos(P_i, N_i) one of the
    smallest weights of row i; E2 keeps it all the same, and drops other-class edges larger than it."""
    C = 9
    pos, _, feats, labels, _, _ = make_data(C, 6, [2, 1, 3, 1, 2, 2, 1, 3, 1], seed=12)
    neg = pos + 0.3 * torch.randn(pos.shape, generator=torch.Generator().manual_seed(1), dtype=pos.dtype)
    model = HeGraphAdapter(pos, neg, feats, labels, config=HeGraphConfig(neighbours=2))
    for name, raw in (("A_np", ref_raw_edges(unit(pos), unit(neg), True)),
                      ("A_pn", ref_raw_edges(unit(neg), unit(pos), True))):
        A = getattr(model, name)
        outranked = [i for i in range(C) if 0 < raw[i, i] < raw[i].sort().values[-3]]  # not in the top 2 + 1
        assert len(outranked) >= C // 2, name                                # the data does what it should
        for i in outranked:
            assert A[i, i] > 0, (name, i)
            dropped = [j for j in range(C) if j != i and A[i, j] == 0 and raw[i, j] > raw[i, i]]
            assert dropped, (name, i)


@pytest.mark.parametrize("neighbours", [8, 30])
def test_neighbours_c_minus_1_or_more_is_the_dense_model_bit_for_bit(neighbours):
    """The sparse code path with every edge kept changes no bit of today's model (C = 9, so C - 1 = 8)."""
    pos, neg, feats, labels, x, y = make_data(9, 6, [2, 1, 3, 1, 2, 2, 1, 3, 1], seed=12)
    dense = HeGraphAdapter(pos, neg, feats, labels, config=HeGraphConfig())
    sparse = HeGraphAdapter(pos, neg, feats, labels, config=HeGraphConfig(neighbours=neighbours))
    for (name, a), (_, b) in zip(dense.named_buffers(), sparse.named_buffers()):
        assert torch.equal(a, b), name
    params = set_params(dense, seed=4)
    with torch.no_grad():
        for name, p in sparse.named_parameters():
            p.copy_(params[name])
    assert torch.equal(dense(x), sparse(x)) and torch.equal(dense.loss(x, y), sparse.loss(x, y))


@pytest.mark.parametrize("design", list(DESIGNS))
def test_each_design_matches_the_reference(design):
    """Every edge matrix, the forward and the loss against the loop / explicit references, in train and eval."""
    for variant, negatives in (("full", True), ("tp", False)):
        cfg = HeGraphConfig(variant=variant, beta_vv=0.4, weight_scale=0.6, bias_scale=0.3, **DESIGNS[design])
        pos, neg, feats, labels, x, y = make_data(6, 7, [2, 4, 1, 3, 2, 1], seed=7, B=5)
        neg = neg if negatives else None
        model = HeGraphAdapter(pos, neg, feats, labels, config=cfg)
        for name, expected in ref_all_edges(pos, neg, feats, labels, cfg).items():
            assert torch.allclose(getattr(model, name), expected, atol=1e-12), name
        params = all_params(model, set_params(model, seed=20, scale=0.5))
        for training in (True, False):
            model.train(training)
            lt, lv = ref_logits(pos, neg, feats, labels, x, params, cfg, training)
            expected = lt if lv is None else lt + cfg.alpha * lv
            assert torch.allclose(model(x), expected, atol=1e-10), (variant, training)
            ref_loss = F.cross_entropy(lt, y) + (0 if lv is None else cfg.lam * F.cross_entropy(lv, y))
            assert torch.allclose(model.loss(x, y), ref_loss, atol=1e-10), (variant, training)


@pytest.mark.parametrize("design", list(DESIGNS))
def test_each_design_changes_what_it_should_and_nothing_else(design):
    """Against today's model on the same features: the design changes its own buffers and no other; with
    every W at zero it changes no output bit (so the bias-only ablation is one model under every design);
    with W != 0 it changes the outputs."""
    pos, neg, feats, labels, x, y = make_data(6, 7, [2, 4, 1, 3, 2, 1], seed=7, B=5)
    today = HeGraphAdapter(pos, neg, feats, labels, config=HeGraphConfig(beta_vv=0.4))
    model = HeGraphAdapter(pos, neg, feats, labels, config=HeGraphConfig(beta_vv=0.4, **DESIGNS[design]))
    changed = {n for (n, a), (_, b) in zip(today.named_buffers(), model.named_buffers()) if not torch.equal(a, b)}
    assert changed == CHANGED.get(design, set(EDGES + MESSAGES))
    params = set_params(today, seed=6, scale=0.5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name] if name.startswith("b_") else torch.zeros_like(p))
        for name, p in today.named_parameters():
            if name.startswith("W_"):
                p.zero_()
    for training in (True, False):
        today.train(training), model.train(training)
        assert torch.equal(today(x), model(x)) and torch.equal(today.loss(x, y), model.loss(x, y))
    with torch.no_grad():
        for module in (today, model):
            for name, p in module.named_parameters():
                p.copy_(params[name])
    assert not torch.allclose(today(x), model(x), atol=1e-6)
    if DESIGNS[design].get("centre_messages"):  # E4: every message has zero mean over the classes
        for name in MESSAGES:
            assert getattr(model, name).mean(0).abs().max() < 1e-12, name
        assert (model.A_np @ torch.randn(6, 7, dtype=torch.float64)).mean(0).abs().max() < 1e-12


@pytest.mark.parametrize("design", list(DESIGNS))
def test_gradcheck_with_each_design(design):
    model, (_, _, feats, labels, x, y) = small_model(beta_vv=0.5, **DESIGNS[design])
    Ws = set_params(model, seed=10)
    names = sorted(Ws)
    inputs = tuple(Ws[n].clone().requires_grad_(True) for n in names)
    wrapped = LossCall(model)

    def logits(*ws):
        return functional_call(model, dict(zip(names, ws)), (x,))

    def loss(*ws):
        return functional_call(wrapped, {f"model.{n}": w for n, w in zip(names, ws)}, (x, y))

    assert torch.autograd.gradcheck(logits, inputs, fast_mode=True)
    assert torch.autograd.gradcheck(loss, inputs, fast_mode=True)


def test_design_options_are_checked():
    for bad, match in ((dict(own_class_paths="vp,xy"), "unknown meta-path 'xy'"),
                       (dict(own_class_paths="V->P"), "unknown meta-path 'V->P'"),
                       (dict(neighbours=-1), "must be >= 0"), (dict(edge_temperature=-0.1), "must be >= 0"),
                       (dict(message_activation="relu"), "unknown message_activation 'relu'")):
        with pytest.raises(ValueError, match=match):
            HeGraphConfig(**bad)
    assert HeGraphConfig(own_class_paths="vp,vn").own_class_only("vn")
    assert not HeGraphConfig(own_class_paths="vp,vn").own_class_only("pn")
    assert not HeGraphConfig().own_class_only("")


# -----------------------------------------------------------------------------
# dtype / device

def test_dtype_follows_inputs():
    pos, neg, feats, labels, x, y = make_data(4, 5, [1, 2, 3, 1], dtype=torch.float64)
    m64 = HeGraphAdapter(pos, neg, feats, labels, config=HeGraphConfig())
    assert all(p.dtype == torch.float64 for p in m64.parameters())
    assert all(b.dtype == torch.float64 for n, b in m64.named_buffers() if n != "cache_labels")
    assert m64(x.float()).dtype == torch.float64
    assert m64.loss(x, y).dtype == torch.float64
    # float32 text decides, even with float64 cache features
    m32 = HeGraphAdapter(pos.float(), neg.float(), feats, labels.int(), config=HeGraphConfig())
    assert all(p.dtype == torch.float32 for p in m32.parameters())
    assert m32(x).dtype == torch.float32 and m32.A_np.dtype == torch.float32
    assert m32.cache_labels.dtype == torch.long
    assert all(t.device.type == "cpu" for t in list(m32.parameters()) + list(m32.buffers()))
    # only the W's and b's are state; the graph constants are rebuilt from features
    assert set(m64.state_dict()) == {"W_n", "W_p", "W_v", "b_n", "b_p", "b_v"}


# -----------------------------------------------------------------------------
# bad inputs

def test_bad_inputs_raise_helpful_errors():
    C, d = 4, 5
    pos, neg, feats, labels, x, y = make_data(C, d, [1, 2, 3, 1], dtype=torch.float32)
    cfg = HeGraphConfig()
    with pytest.raises(ValueError, match="neg_text must be"):
        HeGraphAdapter(pos, neg[:, :-1], feats, labels, config=cfg)
    with pytest.raises(ValueError, match="neg_text must be"):
        HeGraphAdapter(pos, neg[:-1], feats, labels, config=cfg)
    with pytest.raises(ValueError, match="cache_feats must be .*d = 5"):
        HeGraphAdapter(pos, neg, feats[:, :-1], labels, config=cfg)
    with pytest.raises(ValueError, match="cache_labels must"):
        HeGraphAdapter(pos, neg, feats, labels[:-1], config=cfg)
    bad = labels.clone()
    bad[0] = C
    with pytest.raises(ValueError, match=r"cache_labels must lie in \[0, 4\)"):
        HeGraphAdapter(pos, neg, feats, bad, config=cfg)
    bad[0] = -1
    with pytest.raises(ValueError, match=r"cache_labels must lie in \[0, 4\)"):
        HeGraphAdapter(pos, neg, feats, bad, config=cfg)
    with pytest.raises(ValueError, match=r"no cache sample \(first: \[3\]\)"):
        HeGraphAdapter(pos, neg, feats, labels.clamp(max=2), config=cfg)
    for name in ("pos_text", "neg_text", "cache_feats"):
        args = dict(pos_text=pos.clone(), neg_text=neg.clone(), cache_feats=feats.clone())
        args[name][1, 2] = float("nan")
        with pytest.raises(ValueError, match=f"{name} has non-finite"):
            HeGraphAdapter(cache_labels=labels, config=cfg, **args)
    with pytest.raises(ValueError, match="unknown variant 'T-N'"):
        HeGraphConfig(variant="T-N")

    model = HeGraphAdapter(pos, neg, feats, labels, config=cfg)
    with pytest.raises(ValueError, match=r"image_feats must be \[B, 5\]"):
        model(torch.randn(3, d + 1))
    with pytest.raises(ValueError, match=r"image_feats must be \[B, 5\]"):
        model.loss(torch.randn(3, d + 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be"):
        model.loss(x, y[:-1])


def test_config_is_a_keyword_with_a_default_and_cannot_change_after_construction():
    """β_VP and β_VV are folded into constants at construction: changing them later must be impossible."""
    pos, neg, feats, labels, x, _ = make_data(4, 5, [1, 2, 3, 1], dtype=torch.float32)
    model = HeGraphAdapter(pos, neg, feats, labels)                  # the default config
    assert model.config == HeGraphConfig()
    with pytest.raises(TypeError):
        HeGraphAdapter(pos, neg, feats, labels, HeGraphConfig())     # config only by keyword
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.config.beta_vv = 0.9
    with pytest.raises(AttributeError):
        model.config = HeGraphConfig(beta_vp=0.9)
    assert model.config == HeGraphConfig()


@pytest.mark.parametrize("field, value", [("alpha", float("nan")), ("beta_vp", float("inf")), ("bias_scale", -0.1),
                                          ("gamma", 0.0), ("lam", -1.0)])
def test_a_config_refuses_numbers_no_formula_can_use(field, value):
    """The file is copied alone: its config checks its own numbers, with one line naming the field."""
    with pytest.raises(ValueError, match=f"^{field} must be a finite number >= 0"):
        HeGraphConfig(**{field: value})
