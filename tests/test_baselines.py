"""Tests of baselines.py: each baseline against a hand-written reference and its known special cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from fewshot.baselines import (
    CLIPAdapter,
    CLIPAdapterConfig,
    GraphAdapter,
    GraphAdapterConfig,
    LinearProbe,
    LinearProbeConfig,
    TaskRes,
    TaskResConfig,
    TipAdapter,
    TipConfig,
    ZeroShot,
    fit_linear_probe,
    query_node_weights,
)
from fewshot.testing.fixtures import unit

S = 100.0



def data(C=5, d=8, per_class=3, B=7, seed=0):
    """Unnormalised random text features, cache features with labels, and a batch of image features."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    common = rnd(d)
    pos = 0.5 * common + rnd(C, d)
    labels = torch.arange(C).repeat_interleave(per_class)
    cache = 0.5 * common + pos[labels] + rnd(len(labels), d)
    x = 0.5 * common + rnd(B, d)
    return pos, cache, labels, x


def zero_shot(pos, x):
    return S * unit(x) @ unit(pos).T


def test_zeroshot_is_clips_cosine_classifier():
    pos, _, _, x = data()
    assert torch.allclose(ZeroShot(pos)(x), zero_shot(pos, x), atol=1e-10)


def test_tip_adapter_adds_alpha_times_the_cache():
    pos, cache, labels, x = data()
    model = TipAdapter(pos, cache, labels, config=TipConfig(alpha=2.5, gamma=3.0))
    affinity = torch.exp(-3.0 * (1 - unit(x) @ unit(cache).T))                 # [B, M]
    expected = zero_shot(pos, x) + 2.5 * affinity @ F.one_hot(labels, 5).double()
    assert torch.allclose(model(x), expected, atol=1e-10)
    assert list(dict(model.named_parameters())) == []                         # training-free
    learned = TipAdapter(pos, cache, labels, config=TipConfig(learn_keys=True))
    assert [n for n, _ in learned.named_parameters()] == ["keys"]


def test_taskres_is_the_normalised_residual_classifier():
    pos, _, _, x = data()
    model = TaskRes(pos, config=TaskResConfig(scale=0.5))
    assert torch.allclose(model(x), zero_shot(pos, x), atol=1e-10)            # R = 0: zero-shot
    with torch.no_grad():
        model.residual.copy_(torch.randn_like(model.residual))
    assert torch.allclose(model(x), S * unit(x) @ unit(unit(pos) + 0.5 * model.residual).T, atol=1e-10)


def test_clip_adapter_with_ratio_zero_is_zero_shot_and_otherwise_mixes():
    pos, _, _, x = data(d=8)
    assert torch.allclose(CLIPAdapter(pos, config=CLIPAdapterConfig(ratio=0.0))(x), zero_shot(pos, x), atol=1e-10)
    model = CLIPAdapter(pos, config=CLIPAdapterConfig(ratio=0.2, reduction=4))
    down, up = model.adapter[0].weight, model.adapter[2].weight                # [2, 8], [8, 2]
    assert down.shape == (2, 8) and model.adapter[0].bias is None
    f = unit(x)
    adapted = torch.relu(torch.relu(f @ down.T) @ up.T)
    assert torch.allclose(model(x), S * unit(0.2 * adapted + 0.8 * f) @ unit(pos).T, atol=1e-10)


def graph_row0_by_hand(query, nodes):
    """Row 0 of D^-1/2 (clamp(cos) + I) D^-1/2 for each class's (1 + C)-node graph, one graph at a time."""
    rows = []
    for k in range(query.shape[0]):
        X = unit(torch.cat([query[k:k + 1], nodes]))                           # [1 + C, d]
        A = (X @ X.T).clamp(min=0) + torch.eye(len(X), dtype=X.dtype)
        deg = A.sum(1)
        rows.append(A[0] / torch.sqrt(deg[0] * deg))
    return torch.stack(rows)


def test_graphadapter_query_node_weights_match_a_loop_over_classes():
    pos, cache, labels, _ = data(C=6, d=5)
    V = unit(torch.stack([unit(cache[labels == c]).sum(0) for c in range(6)]))
    for nodes in (unit(pos), V):
        assert torch.allclose(query_node_weights(unit(pos), nodes, chunk=4), graph_row0_by_hand(pos, nodes),
                              atol=1e-12)


def test_graphadapter_reference_and_zero_weights_give_zero_shot():
    pos, cache, labels, x = data(C=6, d=5)
    cfg = GraphAdapterConfig(beta=0.6, fusion=0.7)
    model = GraphAdapter(pos, cache, labels, config=cfg)
    V = unit(torch.stack([unit(cache[labels == c]).sum(0) for c in range(6)]))
    P = unit(pos)
    w_text, w_vis = graph_row0_by_hand(P, P), graph_row0_by_hand(P, V)
    agg_text = w_text[:, :1] * P + w_text[:, 1:] @ P
    agg_vis = w_vis[:, :1] * P + w_vis[:, 1:] @ V
    g = (0.7 * torch.tanh(agg_text @ model.W_text + model.b_text)
         + 0.3 * torch.tanh(agg_vis @ model.W_visual + model.b_visual))
    assert torch.allclose(model(x), S * unit(x) @ unit(0.6 * P + 0.4 * g).T, atol=1e-10)
    assert model.W_text.abs().max() <= 1 / math.sqrt(5) and model.W_text.abs().sum() > 0   # its code's init
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert torch.allclose(model(x), zero_shot(pos, x), atol=1e-10)            # tanh(0) = 0: t' = β P


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    C, d = 4, 6
    centres = torch.eye(C, d, dtype=torch.float64) * 3
    train_y = torch.arange(C).repeat_interleave(3)
    test_y = torch.arange(C).repeat_interleave(10)
    noise = lambda n: 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    train_x, test_x = centres[train_y] + noise(len(train_y)), centres[test_y] + noise(len(test_y))
    model = LinearProbe(torch.randn(C, d, dtype=torch.float64))
    assert fit_linear_probe(model, train_x, train_y) == model.config.inverse_l2
    assert (model(test_x).argmax(1) == test_y).all()


def test_linear_probe_minimises_sklearns_objective():
    """At the optimum of C sum CE + |W|^2 / 2 the gradient vanishes: C sum_i (p_i - y_i) f_i^T + W = 0."""
    pos, cache, labels, _ = data(C=3, d=4, per_class=5)
    model = LinearProbe(pos, config=LinearProbeConfig(inverse_l2=0.5))
    fit_linear_probe(model, cache, labels)                                    # no val: the config's C
    f = unit(cache)
    residual = torch.softmax(model(cache), 1) - F.one_hot(labels, 3).double()
    assert torch.allclose(0.5 * residual.T @ f + model.weight, torch.zeros(3, 4, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(residual.sum(0), torch.zeros(3, dtype=torch.float64), atol=1e-4)   # b unpenalised
    sklearn = pytest.importorskip("sklearn.linear_model")
    ref = sklearn.LogisticRegression(C=0.5, max_iter=5000, tol=1e-10).fit(f.numpy(), labels.numpy())
    assert torch.allclose(model.weight, torch.from_numpy(ref.coef_), atol=1e-3)


@pytest.mark.parametrize("build", [
    lambda pos, cache, labels: TipAdapter(pos, cache, labels, config=TipConfig(learn_keys=True)),
    lambda pos, cache, labels: TaskRes(pos),
    lambda pos, cache, labels: CLIPAdapter(pos),
    lambda pos, cache, labels: GraphAdapter(pos, cache, labels),
], ids=["tip-f", "taskres", "clip-adapter", "graphadapter"])
def test_every_parameter_gets_gradient_and_moves(build):
    pos, cache, labels, _ = data(C=5, d=32)
    torch.manual_seed(0)     # the random initialisations: CLIP-Adapter's ReLU units could all start dead
    model = build(pos, cache, labels)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert before
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model.loss(cache, labels).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
