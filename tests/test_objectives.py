"""GRPO and OPSD formulas against hand-computed values and direct computations."""

import math

import pytest
import torch

from stages.engine.objectives.grpo import aggregate, clipped_surrogate, group_advantages, kl_k3, sequence_loss
from stages.engine.objectives.opsd import chunked_clipped_forward_kl, clipped_forward_kl


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- GRPO


def test_group_advantages_hand_values():
    # group a: rewards 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(1/3) = 0.57735
    # group b: rewards 1, 1 -> std 0 -> advantages 0 / (0 + eps) = 0
    # group c: a single rollout -> 0
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    g = ["a", "a", "a", "a", "b", "b", "c"]
    adv = group_advantages(r, g, eps=1e-4)
    s = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert adv.tolist() == pytest.approx([s, -s, -s, s, 0.0, 0.0, 0.0], abs=1e-6)
    assert adv[:4].tolist() == pytest.approx([0.86588, -0.86588, -0.86588, 0.86588], abs=1e-4)


def test_group_advantages_without_std_scaling():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    adv = group_advantages(r, [0, 0, 0, 0], scale_std=False)
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_clipped_surrogate_hand_values():
    # ratios e^{log r}: 1.5, 0.5, 1.1, 0.7 ; eps 0.2 -> clip to [0.8, 1.2]
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7]))
    # A = +2: min(r A, clip(r) A) = min(3, 2.4)=2.4, min(1, 1.6)=1.0, min(2.2,2.2)=2.2, min(1.4,1.6)=1.4
    loss, clipped = clipped_surrogate(logp, old, 2.0, 0.2)
    assert loss.tolist() == pytest.approx([-2.4, -1.0, -2.2, -1.4], abs=1e-6)
    assert clipped.tolist() == [True, False, False, False]
    # A = -1: min(-1.5, -1.2) = -1.5, min(-0.5, -0.8) = -0.8, -1.1, min(-0.7, -0.8) = -0.8
    loss, clipped = clipped_surrogate(logp, old, -1.0, 0.2)
    assert loss.tolist() == pytest.approx([1.5, 0.8, 1.1, 0.8], abs=1e-6)
    assert clipped.tolist() == [False, True, False, True]


def test_clipped_surrogate_gradient_vanishes_when_clipped():
    logp = torch.log(torch.tensor([1.5, 1.1])).requires_grad_(True)
    loss, _ = clipped_surrogate(logp, torch.zeros(2), 1.0, 0.2)
    loss.sum().backward()
    # d(-r A)/dlogp = -r A for the unclipped token, 0 for the clipped one
    assert logp.grad.tolist() == pytest.approx([0.0, -1.1], abs=1e-6)


def test_kl_k3_hand_value():
    new, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.0])
    # d = ref - new = [0, 1]: e^0 - 0 - 1 = 0 ; e^1 - 1 - 1 = 0.71828
    assert kl_k3(new, ref).tolist() == pytest.approx([0.0, math.e - 2], abs=1e-6)


def test_grpo_batch_loss_tiny_batch_token_and_sequence_mean():
    # two completions, advantages +1 / -1, ratios at 1 (on-policy): per-token loss = -A
    lp1, lp2 = torch.zeros(3), torch.zeros(2)
    m1, m2 = torch.tensor([True, True, False]), torch.tensor([True, True])
    s1, _ = sequence_loss(lp1, lp1.clone(), 1.0, m1)
    s2, _ = sequence_loss(lp2, lp2.clone(), -1.0, m2)
    assert s1.item() == pytest.approx(-2.0) and s2.item() == pytest.approx(2.0)
    # token-mean: (-2 + 2) / 4 tokens = 0 ; sequence-mean: (-2/2 + 2/2) / 2 = 0
    assert aggregate([s1, s2], [2, 2], "token-mean", 4).item() == pytest.approx(0.0)
    # unequal lengths: A = +1 on 2 valid tokens, A = -1 on 1 valid token
    s3, _ = sequence_loss(torch.zeros(1), torch.zeros(1), -1.0, torch.tensor([True]))
    assert aggregate([s1, s3], [2, 1], "token-mean", 3).item() == pytest.approx((-2 + 1) / 3)
    assert aggregate([s1, s3], [2, 1], "sequence-mean", 2).item() == pytest.approx((-1 + 1) / 2)


def test_grpo_loss_with_ratio_and_beta():
    logp = torch.log(torch.tensor([1.5, 0.9]))
    old = torch.zeros(2)
    ref = torch.tensor([0.0, 0.0])
    s, st = sequence_loss(logp, old, 1.0, torch.tensor([True, True]), beta=0.1, ref_logp=ref)
    # surrogate: -min(1.5, 1.2) - min(0.9, 0.9) = -2.1 ; k3 with d = -logp: e^{-log1.5}+log1.5-1, e^{-log0.9}+log0.9-1
    k = (1 / 1.5 + math.log(1.5) - 1) + (1 / 0.9 + math.log(0.9) - 1)
    assert s.item() == pytest.approx(-2.1 + 0.1 * k, abs=1e-6)
    assert st["clipped"] == 1.0


# ---------------------------------------------------------------------------------------------- OPSD


def _direct_kl(t_logits, s_logits, clip, top_k=0, temperature=1.0):
    """The definition written out with loops over positions and vocabulary entries.  top_k: both distributions
    renormalised over the teacher's k most likely tokens (the reference's generalized_jsd_loss)."""
    out = []
    for i in range(t_logits.shape[0]):
        tl, sl = t_logits[i].double() / temperature, s_logits[i].double() / temperature
        pt, ps = torch.softmax(tl, -1), torch.softmax(sl, -1)
        vocab = range(t_logits.shape[1])
        if top_k:
            vocab = torch.topk(pt, top_k).indices.tolist()
            zt = sum(math.exp(float(tl[v])) for v in vocab)
            zs = sum(math.exp(float(sl[v])) for v in vocab)
            pt, ps = torch.exp(tl) / zt, torch.exp(sl) / zs
        total = 0.0
        for v in vocab:
            term = float(pt[v] * (torch.log(pt[v]) - torch.log(ps[v])))
            total += min(term, clip) if clip > 0 else term
        out.append(total)
    return out


def test_clipped_forward_kl_hand_value_two_token_vocab():
    # teacher p = (0.8, 0.2), student q = (0.5, 0.5): terms 0.8 ln 1.6 = 0.37600, 0.2 ln 0.4 = -0.18326
    t = torch.log(torch.tensor([[0.8, 0.2]]))
    s = torch.log(torch.tensor([[0.5, 0.5]]))
    assert clipped_forward_kl(t, s, clip=0.0).item() == pytest.approx(0.37600 - 0.18326, abs=1e-5)
    assert clipped_forward_kl(t, s, clip=0.05).item() == pytest.approx(0.05 - 0.18326, abs=1e-5)


@pytest.mark.parametrize("clip,top_k,temperature", [(0.05, 0, 1.0), (0.0, 0, 1.0), (0.05, 3, 1.0), (0.0, 3, 1.1),
                                                     (0.05, 0, 1.1)])
def test_clipped_forward_kl_matches_direct_computation(clip, top_k, temperature):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 11, generator=g) * 2
    s = torch.randn(5, 11, generator=g) * 2
    got = clipped_forward_kl(t, s, clip=clip, top_k=top_k, temperature=temperature)
    assert got.tolist() == pytest.approx(_direct_kl(t, s, clip, top_k, temperature), abs=1e-5)


def test_top_k_kl_hand_value_is_renormalised():
    # teacher logits ln(0.5, 0.3, 0.2), student ln(0.2, 0.2, 0.6), k = 2: renormalised p = (5/8, 3/8),
    # q = (1/2, 1/2): KL = 5/8 ln(5/4) + 3/8 ln(3/4) = 0.139465 - 0.107881 = 0.031584
    t = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    s = torch.log(torch.tensor([[0.2, 0.2, 0.6]]))
    assert clipped_forward_kl(t, s, clip=0.0, top_k=2).item() == pytest.approx(0.031584, abs=1e-5)


def test_kl_is_zero_when_student_equals_teacher():
    x = torch.randn(4, 9)
    assert clipped_forward_kl(x, x.clone()).abs().max().item() < 1e-6


@pytest.mark.parametrize("top_k", [0, 4])
def test_chunked_kl_equals_unchunked_values_and_gradients(top_k):
    torch.manual_seed(0)
    H, V, N = 8, 37, 23
    head = torch.nn.Linear(H, V, bias=False)
    sh = torch.randn(N, H, requires_grad=True)
    th = torch.randn(N, H)
    full = clipped_forward_kl(head(th), head(sh), clip=0.05, top_k=top_k)
    (full * torch.arange(N)).sum().backward()
    g_full_h, g_full_w = sh.grad.clone(), head.weight.grad.clone()
    sh.grad = None
    head.weight.grad = None
    for chunk in (3, 64):
        got = chunked_clipped_forward_kl(sh, th, head, clip=0.05, top_k=top_k, chunk=chunk)
        assert torch.allclose(got, full, atol=1e-5)
        (got * torch.arange(N)).sum().backward()
        assert torch.allclose(sh.grad, g_full_h, atol=1e-5)
        assert torch.allclose(head.weight.grad, g_full_w, atol=1e-5)
        sh.grad = None
        head.weight.grad = None


def test_chunked_kl_student_entropy_from_the_same_chunks():
    """OPSD's loss pass logs the student's token entropy from its own logits chunks: per position
    ``torch.special.entr(softmax(head(h) / T)).sum()`` (independent formula), one value per position however the
    chunks are recomputed in backward, and the KL and its gradients unchanged."""
    torch.manual_seed(3)
    H, V, N, T = 8, 29, 11, 1.3
    head = torch.nn.Linear(H, V, bias=False)
    sh = torch.randn(N, H, requires_grad=True)
    th = torch.randn(N, H)
    want = torch.special.entr(torch.softmax(head(sh).detach().double() / T, -1)).sum(-1)
    plain = chunked_clipped_forward_kl(sh, th, head, temperature=T, chunk=4)
    plain.sum().backward()
    g = sh.grad.clone()
    sh.grad = None
    ents: list = []
    got = chunked_clipped_forward_kl(sh, th, head, temperature=T, chunk=4, entropy_out=ents)
    got.sum().backward()
    assert len(ents) == 1 and ents[0].shape == (N,) and not ents[0].requires_grad
    assert torch.allclose(ents[0].double(), want, atol=1e-5)
    assert torch.allclose(got, plain) and torch.allclose(sh.grad, g)


def test_chunked_kl_separate_teacher_head_gets_no_grad():
    torch.manual_seed(1)
    s_head, t_head = torch.nn.Linear(4, 7, bias=False), torch.nn.Linear(4, 7, bias=False)
    sh, th = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4)
    got = chunked_clipped_forward_kl(sh, th, s_head, t_head, chunk=2, clip=0.0)
    want = clipped_forward_kl(t_head(th), s_head(sh), clip=0.0)
    assert torch.allclose(got, want, atol=1e-6)
    got.sum().backward()
    assert t_head.weight.grad is None and s_head.weight.grad is not None


def test_chunked_kl_never_holds_two_full_logit_tensors():
    """Peak memory of the chunked loss stays near one chunk's logits, not the whole batch's."""
    torch.manual_seed(0)
    H, V, N, chunk = 8, 2048, 256, 32
    head = torch.nn.Linear(H, V, bias=False)
    sh = torch.randn(N, H, requires_grad=True)
    th = torch.randn(N, H)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_clipped_forward_kl(sh, th, head, chunk=chunk).sum()
    # tensors saved for backward: never a [N, V] one (the chunks are recomputed)
    assert max(sizes) < N * V // 4


# ---------------------------------------------------------------------------------------------- the registry


def test_registry_holds_the_three_objectives_in_order():
    from stages.engine.objectives import base
    from stages.train import OBJECTIVES, TrainConfig

    assert base.names() == ("sgsd", "opsd", "grpo") == OBJECTIVES
    assert [base.get(n).name for n in OBJECTIVES] == ["sgsd", "opsd", "grpo"]
    with pytest.raises(base.InputError, match="objective must be one of sgsd, opsd, grpo, got 'dpo'"):
        base.get("dpo")
    # the defaults each objective declares, as TrainConfig.resolved applies them
    got = {n: (c.teacher_mode, c.lora_dropout) for n in OBJECTIVES
           for c in [TrainConfig(model="m", objective=n).resolved()]}
    assert got == {"sgsd": ("live", 0.0), "opsd": ("fixed", 0.0), "grpo": ("live", 0.05)}


def test_a_registered_objective_is_found_by_name():
    from stages.engine.objectives import base

    @base.register
    class Toy(base.Objective):
        name = "toy-test"
        order = 99

    try:
        assert base.get("toy-test") is Toy and base.names()[-1] == "toy-test"
        with pytest.raises(TypeError, match="registered twice"):
            base.register(type("Other", (base.Objective,), {"name": "toy-test"}))
    finally:
        base._REGISTRY.pop("toy-test")


@pytest.mark.parametrize("objective,mode,kl_beta,lora,want", [
    ("sgsd", "live", 0.0, False, False), ("sgsd", "fixed", 0.0, False, False),  # fixed sgsd: stored log-probs
    ("opsd", "fixed", 0.0, False, True), ("opsd", "fixed", 0.0, True, False),    # LoRA: the adapter switched off
    ("opsd", "live", 0.0, False, False),
    ("grpo", "live", 0.0, False, False), ("grpo", "live", 0.1, False, True), ("grpo", "live", 0.1, True, False),
])
def test_frozen_copy_rules(objective, mode, kl_beta, lora, want):
    from stages.engine.objectives import base
    from stages.train import TrainConfig

    cfg = TrainConfig(model="m", objective=objective, teacher_mode=mode, kl_beta=kl_beta).resolved()
    assert base.get(objective)(cfg).needs_frozen_copy(lora) is want


def test_normalisers_hand_values():
    """sgsd: rollouts; opsd: masked tokens; grpo: rollouts (sequence-mean) or masked tokens (token-mean)."""
    from stages.engine.objectives import base
    from stages.train import TrainConfig

    items = [base.Item("a", "g", (1,), (2, 3, 4), [True, False, True]), base.Item("b", "g", (1,), (5,), [True])]
    norms = {(o, agg): base.get(o)(TrainConfig(model="m", objective=o, loss_agg=agg).resolved()).normaliser(items)
             for o in ("sgsd", "opsd", "grpo") for agg in ("sequence-mean", "token-mean")}
    assert norms == {("sgsd", "sequence-mean"): 2.0, ("sgsd", "token-mean"): 2.0, ("opsd", "sequence-mean"): 3.0,
                     ("opsd", "token-mean"): 3.0, ("grpo", "sequence-mean"): 2.0, ("grpo", "token-mean"): 3.0}
