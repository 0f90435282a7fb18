"""Tests for opd.losses: brute-force references written as explicit loops over rows, tokens
and vocabulary entries, closed forms, invariances (chunking, micro-batching), robustness to
-inf and empty masks, and proofs that the SMPO stabilisers change the loss and gradient."""
import math

import pytest
import torch

from opd.losses import LOGP_FLOOR, margin_schedule, masked_token_mean, reverse_kl_pg_loss, sft_loss, smpo_loss
from opd.losses.reference import gather_logprobs, generalized_jsd, generalized_jsd_topk

DT = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=_gen(seed), dtype=DT) * scale


def _mask(b, t, seed=0):
    """Random float mask with weights in {0, 0.5, 1}; token (0, 0) always trained."""
    g = _gen(seed)
    keep = (torch.rand(b, t, generator=g, dtype=DT) > 0.3).to(DT)
    w = torch.where(torch.rand(b, t, generator=g, dtype=DT) > 0.5, 1.0, 0.5)
    m = keep * w
    return torch.where(torch.arange(b * t).reshape(b, t) == 0, torch.ones_like(m), m)


def _finite(*tensors):
    return all(bool(torch.isfinite(x).all()) for x in tensors)


# --------------------------------------------------------------- brute-force references
def _ref_div(ls, lt, beta):
    """Generalized JSD between lists of per-entry log-probs (0-dim tensors), entry by entry."""
    out = 0.0
    for lsv, ltv in zip(ls, lt):
        ps, pt = torch.exp(lsv), torch.exp(ltv)
        if beta == 0:
            out = out + pt * (ltv - lsv)
        elif beta == 1:
            out = out + ps * (lsv - ltv)
        else:
            lm = torch.log(beta * pt + (1 - beta) * ps)
            out = out + beta * pt * (ltv - lm) + (1 - beta) * ps * (lsv - lm)
    return out


def _ref_logsoftmax(row, temp):
    xs = [row[v] / temp for v in range(row.shape[0])]
    lse = torch.log(sum(torch.exp(x) for x in xs))
    return [x - lse for x in xs]


def _ref_gjsd(student, teacher, mask, beta, temp, normalizer=None):
    b_, t_, _ = student.shape
    total = 0.0
    for b in range(b_):
        for t in range(t_):
            if mask[b, t] > 0:
                d = _ref_div(_ref_logsoftmax(student[b, t], temp),
                             _ref_logsoftmax(teacher[b, t].detach(), temp), beta)
                total = total + mask[b, t] * d
    return total / (normalizer if normalizer is not None else max(mask.sum().item(), 1.0))


def _math_kl(p_logits, q_logits):
    """KL(p‖q) with Python floats (math.exp / math.log)."""
    zp = sum(math.exp(x) for x in p_logits)
    zq = sum(math.exp(x) for x in q_logits)
    return sum(math.exp(a) / zp * (math.log(math.exp(a) / zp) - math.log(math.exp(b) / zq))
               for a, b in zip(p_logits, q_logits))


def _jsd_inputs(b=3, t=4, v=6, seed=0):
    s = _randn(b, t, v, seed=seed, scale=2.0).requires_grad_(True)
    te = _randn(b, t, v, seed=seed + 1, scale=2.0)
    return s, te, _mask(b, t, seed + 2)


# ------------------------------------------------------------------------ generalized JSD
@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_gjsd_matches_bruteforce_value_and_grad(beta, temp):
    s, te, m = _jsd_inputs()
    loss, metrics = generalized_jsd(s, te, m, beta=beta, temperature=temp, chunk_size=5)
    (g,) = torch.autograd.grad(loss, s)
    s_ref = s.detach().clone().requires_grad_(True)
    ref = _ref_gjsd(s_ref, te, m, beta, temp)
    (g_ref,) = torch.autograd.grad(ref, s_ref)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-12)
    assert metrics["loss/jsd"] == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
    assert loss.item() > 0


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_gjsd_identical_is_zero(beta):
    s, _, m = _jsd_inputs()
    loss, _ = generalized_jsd(s, s.detach(), m, beta=beta)
    (g,) = torch.autograd.grad(loss, s)
    assert abs(loss.item()) < 1e-12
    assert g.abs().max().item() < 1e-12


def test_gjsd_endpoints_are_plain_kls():
    s, te, m = _jsd_inputs()
    fwd = rev = 0.0
    for b in range(3):
        for t in range(4):
            if m[b, t] > 0:
                sl, tl = s[b, t].tolist(), te[b, t].tolist()
                fwd += m[b, t].item() * _math_kl(tl, sl)      # KL(teacher‖student)
                rev += m[b, t].item() * _math_kl(sl, tl)      # KL(student‖teacher)
    n = m.sum().item()
    assert generalized_jsd(s, te, m, beta=0.0)[0].item() == pytest.approx(fwd / n, rel=1e-10)
    assert generalized_jsd(s, te, m, beta=1.0)[0].item() == pytest.approx(rev / n, rel=1e-10)
    assert abs(fwd - rev) > 1e-3    # the two directions really differ on this data


def test_gjsd_chunk_sizes_identical():
    s, te, m = _jsd_inputs()
    results = []
    for chunk in (1, 3, 10_000):
        loss, _ = generalized_jsd(s, te, m, beta=0.3, temperature=1.5, chunk_size=chunk)
        results.append((loss, torch.autograd.grad(loss, s)[0]))
    for loss, g in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g, results[0][1], rtol=1e-12, atol=1e-14)
    with torch.no_grad():   # the non-checkpointed path gives the same value
        assert generalized_jsd(s, te, m, beta=0.3, temperature=1.5)[0].item() == pytest.approx(
            results[0][0].item(), rel=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_gjsd_microbatch_invariance(beta):
    s, te, m = _jsd_inputs(b=4)
    full, _ = generalized_jsd(s, te, m, beta=beta)
    (g_full,) = torch.autograd.grad(full, s)
    n = m.sum().item()
    parts = [generalized_jsd(s[a:b], te[a:b], m[a:b], beta=beta, normalizer=n)[0]
             for a, b in ((0, 1), (1, 3), (3, 4))]
    total = sum(parts)
    (g_parts,) = torch.autograd.grad(total, s)
    torch.testing.assert_close(total, full, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_parts, g_full, rtol=1e-12, atol=1e-14)


def test_gjsd_teacher_is_constant_and_vocab_mismatch_raises():
    s, te, m = _jsd_inputs()
    te = te.clone().requires_grad_(True)
    generalized_jsd(s, te, m)[0].backward()
    assert te.grad is None and s.grad is not None
    with pytest.raises(ValueError, match="slice"):
        generalized_jsd(torch.zeros(1, 2, 7), torch.zeros(1, 2, 6), torch.ones(1, 2))
    with pytest.raises(ValueError, match="vocab"):
        generalized_jsd(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6), torch.ones(1, 2))
    with pytest.raises(ValueError):
        generalized_jsd(s, te, m, beta=1.5)


# ------------------------------------------------------------------------------- top-k JSD
def _ref_topk(student, t_lp, t_ids, mask, beta, temp, tail):
    b_, t_, _ = student.shape
    total = 0.0
    for b in range(b_):
        for t in range(t_):
            if mask[b, t] <= 0:
                continue
            full = _ref_logsoftmax(student[b, t], temp)
            ls = [full[int(i)] for i in t_ids[b, t]]
            lt = [t_lp[b, t, k] for k in range(t_lp.shape[-1])]
            if tail:
                ls.append(torch.log(1 - sum(torch.exp(x) for x in ls)))
                lt.append(torch.log(1 - sum(torch.exp(x) for x in lt)))
            else:
                zs, zt = torch.log(sum(torch.exp(x) for x in ls)), torch.log(sum(torch.exp(x) for x in lt))
                ls, lt = [x - zs for x in ls], [x - zt for x in lt]
            total = total + mask[b, t] * _ref_div(ls, lt, beta)
    return total / max(mask.sum().item(), 1.0)


def _topk_inputs(k=3, seed=0):
    s, te, m = _jsd_inputs(v=8, seed=seed)
    t_lp, t_ids = torch.log_softmax(te, -1).topk(k, -1)
    return s, t_lp, t_ids, m


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("beta,temp", [(0.0, 1.0), (0.5, 2.0), (1.0, 1.0), (0.3, 0.7)])
def test_topk_matches_bruteforce(tail, beta, temp):
    s, t_lp, t_ids, m = _topk_inputs()
    loss, metrics = generalized_jsd_topk(s, t_lp, t_ids, m, beta=beta, temperature=temp, tail_bucket=tail)
    (g,) = torch.autograd.grad(loss, s)
    s_ref = s.detach().clone().requires_grad_(True)
    ref = _ref_topk(s_ref, t_lp, t_ids, m, beta, temp, tail)
    (g_ref,) = torch.autograd.grad(ref, s_ref)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-12)
    assert metrics["loss/jsd_topk"] == pytest.approx(ref.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("beta,temp", [(0.0, 1.0), (0.5, 2.0), (1.0, 1.0)])
def test_topk_full_support_equals_full_jsd(beta, temp):
    s, te, m = _jsd_inputs(v=6)
    perm = torch.randperm(6, generator=_gen(3)).expand(3, 4, 6)
    t_lp = torch.log_softmax(te / temp, -1).gather(-1, perm)  # teacher log-probs at temperature
    full, _ = generalized_jsd(s, te, m, beta=beta, temperature=temp)
    top, _ = generalized_jsd_topk(s, t_lp, perm, m, beta=beta, temperature=temp, tail_bucket=False)
    tail, _ = generalized_jsd_topk(s, t_lp, perm, m, beta=beta, temperature=temp, tail_bucket=True)
    assert top.item() == pytest.approx(full.item(), rel=1e-10, abs=1e-12)
    assert tail.item() == pytest.approx(full.item(), rel=1e-6, abs=1e-9)
    g_full, g_top = torch.autograd.grad(full, s)[0], torch.autograd.grad(top, s)[0]
    torch.testing.assert_close(g_top, g_full, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("tail", [True, False])
def test_topk_duplicate_ids_and_padding_are_dropped(tail):
    s, t_lp, t_ids, m = _topk_inputs(k=3)
    base, _ = generalized_jsd_topk(s, t_lp, t_ids, m, beta=0.5, tail_bucket=tail)
    dup_ids = torch.cat([t_ids, t_ids[..., :1]], -1)            # repeat the first id
    dup_lp = torch.cat([t_lp, t_lp[..., :1]], -1)
    pad_ids = torch.cat([t_ids, (t_ids[..., :1] + 1) % 8], -1)  # any id, log-prob -inf
    pad_lp = torch.cat([t_lp, torch.full_like(t_lp[..., :1], -math.inf)], -1)
    for lp, ids in ((dup_lp, dup_ids), (pad_lp, pad_ids)):
        # dropped from the support: with a tail bucket the padded id's student mass stays
        # in the tail, exactly as when the id was never listed
        other, _ = generalized_jsd_topk(s, lp, ids, m, beta=0.5, tail_bucket=tail)
        assert other.item() == pytest.approx(base.item(), rel=1e-12)


# ---------------------------------------------------------------- sampled-token reverse KL
def _pg_inputs(b=3, t=5, seed=0):
    ls = -_randn(b, t, seed=seed).abs() - 0.1
    lp = (ls + 0.3 * _randn(b, t, seed=seed + 1)).requires_grad_(True)
    lt = ls + _randn(b, t, seed=seed + 2)
    return lp, ls, lt, _mask(b, t, seed + 3)


def _ref_adv(ls, lt, m, kl_coef, discount, seq_adv):
    b_, t_ = m.shape
    adv = [[0.0] * t_ for _ in range(b_)]
    for b in range(b_):
        a = [kl_coef * (max(lt[b, t].item(), LOGP_FLOOR) - ls[b, t].item()) if m[b, t] > 0 else 0.0
             for t in range(t_)]
        for t in range(t_):
            if m[b, t] > 0:
                adv[b][t] = sum(discount ** (u - t) * a[u] for u in range(t, t_) if m[b, u] > 0)
                adv[b][t] += 0.0 if seq_adv is None else seq_adv[b].item()
    return adv


def _ref_pg(lp, ls, lt, m, lo, hi, discount, kl_coef, seq_adv):
    adv = _ref_adv(ls, lt, m, kl_coef, discount, seq_adv)
    total = 0.0
    for b in range(m.shape[0]):
        for t in range(m.shape[1]):
            if m[b, t] > 0:
                r = torch.exp(lp[b, t] - ls[b, t])
                rc = r
                if lo is not None:
                    rc = torch.maximum(rc, torch.tensor(1 - lo, dtype=DT))
                if hi is not None:
                    rc = torch.minimum(rc, torch.tensor(1 + hi, dtype=DT))
                total = total + m[b, t] * -torch.minimum(r * adv[b][t], rc * adv[b][t])
    return total / m.sum().item()


@pytest.mark.parametrize("lo,hi", [(0.2, 0.2), (0.1, 0.3), (None, None), (None, 0.2)])
@pytest.mark.parametrize("discount,kl_coef,seq", [(0.0, 1.0, False), (0.9, 0.5, True), (1.0, 2.0, False)])
def test_pg_matches_bruteforce(lo, hi, discount, kl_coef, seq):
    lp, ls, lt, m = _pg_inputs()
    seq_adv = _randn(3, seed=9) if seq else None
    loss, metrics = reverse_kl_pg_loss(lp, ls, lt, m, clip_eps_low=lo, clip_eps_high=hi,
                                       discount=discount, kl_coef=kl_coef, seq_advantage_B=seq_adv)
    (g,) = torch.autograd.grad(loss, lp)
    lp_ref = lp.detach().clone().requires_grad_(True)
    ref = _ref_pg(lp_ref, ls, lt, m, lo, hi, discount, kl_coef, seq_adv)
    (g_ref,) = torch.autograd.grad(ref, lp_ref)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-12)
    assert metrics["loss/pg"] == pytest.approx(ref.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    adv = _ref_adv(ls, lt, m, kl_coef, discount, seq_adv)
    n = sum(m[b, t].item() for b in range(3) for t in range(5) if m[b, t] > 0)
    want = sum(m[b, t].item() * adv[b][t] for b in range(3) for t in range(5) if m[b, t] > 0) / n
    assert metrics["pg/adv_mean"] == pytest.approx(want, rel=1e-10)


def test_pg_clipping_zeroes_gradient_where_clipped_branch_wins():
    ls = torch.full((1, 5), -1.0, dtype=DT)
    lp = (ls + torch.tensor([[0.5, 0.5, -0.5, 0.0, -0.5]], dtype=DT)).requires_grad_(True)
    lt = ls + torch.tensor([[1.0, -1.0, 1.0, 0.3, -1.0]], dtype=DT)   # A = lt - ls
    m = torch.ones(1, 5, dtype=DT)
    loss, metrics = reverse_kl_pg_loss(lp, ls, lt, m, clip_eps_low=0.2, clip_eps_high=0.2)
    (g,) = torch.autograd.grad(loss, lp)
    r = torch.exp(lp.detach() - ls)
    adv = lt - ls
    # token 0: r > 1.2, A > 0 and token 4: r < 0.8, A < 0 -> clipped branch, no gradient
    assert g[0, 0].item() == 0.0 and g[0, 4].item() == 0.0
    for t in (1, 2, 3):   # unclipped branch: d/dlp of -r A / N = -r A / N
        assert g[0, t].item() == pytest.approx((-r[0, t] * adv[0, t] / 5).item(), rel=1e-12)
    assert metrics["pg/clip_frac"] == pytest.approx(2 / 5)
    assert metrics["pg/ratio_mean"] == pytest.approx(r.mean().item(), rel=1e-12)
    loss_off, m_off = reverse_kl_pg_loss(lp, ls, lt, m, clip_eps_low=None, clip_eps_high=None)
    g_off = torch.autograd.grad(loss_off, lp)[0]
    assert g_off[0, 0].item() != 0.0 and m_off["pg/clip_frac"] == 0.0


def test_pg_k3_and_advantage_metrics_by_hand():
    """kl/k3 and pg/adv_mean (= minus the k1 estimate at discount 0; the driver logs k1 as
    teacher/kl), as written out."""
    lp, ls, lt, m = _pg_inputs()
    _, metrics = reverse_kl_pg_loss(lp, ls, lt, m)
    k1 = k3 = w = 0.0
    for b in range(3):
        for t in range(5):
            if m[b, t] > 0:
                d = lt[b, t].item() - ls[b, t].item()
                k1 += m[b, t].item() * -d
                k3 += m[b, t].item() * (math.exp(d) - 1 - d)
                w += m[b, t].item()
    assert metrics["pg/adv_mean"] == pytest.approx(-k1 / w, rel=1e-6)
    assert metrics["kl/k3"] == pytest.approx(k3 / w, rel=1e-10)
    assert "kl/k1" not in metrics


@pytest.mark.parametrize("tis_cap", [None, 2.0])
@pytest.mark.parametrize("discount", [0.0, 0.7])
def test_pg_on_policy_gradient_is_policy_gradient(tis_cap, discount):
    _, ls, lt, m = _pg_inputs()
    lp = ls.clone().requires_grad_(True)                   # student == sampler
    loss, _ = reverse_kl_pg_loss(lp, ls, lt, m, tis_cap=tis_cap, discount=discount)
    (g,) = torch.autograd.grad(loss, lp)
    adv = torch.tensor(_ref_adv(ls, lt, m, 1.0, discount, None), dtype=DT)
    torch.testing.assert_close(g, -adv * m / m.sum(), rtol=1e-12, atol=1e-14)


def test_pg_truncated_importance_sampling():
    lp, ls, lt, m = _pg_inputs()
    cap = 1.1
    loss, metrics = reverse_kl_pg_loss(lp, ls, lt, m, tis_cap=cap)
    (g,) = torch.autograd.grad(loss, lp)
    adv = _ref_adv(ls, lt, m, 1.0, 0.0, None)
    n, val, trunc, cnt = m.sum().item(), 0.0, 0, 0
    g_ref = torch.zeros_like(g)
    for b in range(3):
        for t in range(5):
            if m[b, t] > 0:
                r = math.exp(lp[b, t].item() - ls[b, t].item())
                w = min(r, cap)                          # truncated importance weight
                val += m[b, t].item() * -w * adv[b][t]
                g_ref[b, t] = m[b, t].item() * -w * adv[b][t] / n
                trunc, cnt = trunc + (r > cap), cnt + 1
    assert loss.item() == pytest.approx(val / n, rel=1e-10)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    assert 0 < trunc < cnt   # the cap is engaged on some tokens only
    untruncated, _ = reverse_kl_pg_loss(lp, ls, lt, m, tis_cap=1e9)
    assert untruncated.item() != pytest.approx(loss.item())


def test_pg_microbatch_invariance():
    lp, ls, lt, m = _pg_inputs(b=4)
    seq = _randn(4, seed=5)
    full, _ = reverse_kl_pg_loss(lp, ls, lt, m, discount=0.8, seq_advantage_B=seq)
    g_full = torch.autograd.grad(full, lp)[0]
    n = m.sum().item()
    total = sum(reverse_kl_pg_loss(lp[a:b], ls[a:b], lt[a:b], m[a:b], discount=0.8,
                                   seq_advantage_B=seq[a:b], normalizer=n)[0] for a, b in ((0, 2), (2, 3), (3, 4)))
    torch.testing.assert_close(total, full, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(total, lp)[0], g_full, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------ SFT
def test_sft_by_hand_and_normalizer():
    lp = torch.tensor([[-1.0, -2.0, -math.inf], [-0.5, -3.0, -4.0]], dtype=DT, requires_grad=True)
    m = torch.tensor([[1.0, 1.0, 0.0], [0.5, 0.0, 1.0]], dtype=DT)
    loss, metrics = sft_loss(lp, m)
    want = (1.0 + 2.0 + 0.5 * 0.5 + 4.0) / 3.5
    assert loss.item() == pytest.approx(want) and metrics["loss/sft"] == pytest.approx(want)
    (g,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(g, -m / 3.5)
    assert sft_loss(lp, m, normalizer=10.0)[0].item() == pytest.approx(want * 3.5 / 10)
    assert masked_token_mean(lp, torch.zeros_like(m)).item() == 0.0
    with pytest.raises(ValueError):
        masked_token_mean(lp, m, normalizer=0.0)


# ----------------------------------------------------------------------------------- SMPO
EOS = 5


def _py_quantile(vals, q):
    s = sorted(vals)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def _ref_smpo(lc, mc, lr, mr, ids, beta=1.2, margin=0.35, rho=0.8, loss_type="smooth_lower_bound",
              sft_coef=1.0, eos_protection="exclude", lower_percentile=0.02, min_log_prob=-2.3,
              chosen_upper_percentile=None):
    """SMPO with Python floats, row by row, token by token."""
    lc, mc, lr, mr, ids = lc.tolist(), mc.tolist(), lr.tolist(), mr.tolist(), ids.tolist()
    prefs = []
    for b in range(len(lc)):
        ci = [t for t, w in enumerate(mc[b]) if w > 0]
        ri = [t for t, w in enumerate(mr[b]) if w > 0]
        if not ci or not ri:
            continue
        cv = {t: lc[b][t] for t in ci}
        if chosen_upper_percentile is not None:
            bound = _py_quantile(list(cv.values()), chosen_upper_percentile)
            cv = {t: min(v, bound) for t, v in cv.items()}
        rc = sum(mc[b][t] * cv[t] for t in ci) / sum(mc[b][t] for t in ci)
        prot = [t for t in ri if ids[b][t] == EOS and eos_protection != "none"]
        others = [t for t in ri if t not in prot]
        bound = (_py_quantile([lr[b][t] for t in others], lower_percentile)
                 if lower_percentile is not None and others else -math.inf)
        num = den = 0.0
        for t in ri:
            if t in prot:
                if eos_protection == "exclude":
                    continue
                v = -lr[b][t]
            else:
                v = max(lr[b][t], bound)
                v = v if min_log_prob is None else max(v, min_log_prob)
            num, den = num + mr[b][t] * v, den + mr[b][t]
        bz = beta * (rc - (num / den if den > 0 else 0.0) - margin)
        prefs.append({"smooth_lower_bound": max(-bz, 0.0) ** 2, "hinge": max(-bz, 0.0),
                      "sigmoid": math.log1p(math.exp(-bz)), "ipo": bz ** 2}[loss_type])
    pref = sum(prefs) / len(prefs) if prefs else 0.0

    def ce(lps, ms):
        tot = sum(-x * w for rl, rm in zip(lps, ms) for x, w in zip(rl, rm) if w > 0)
        return tot / max(sum(w for rm in ms for w in rm), 1.0)
    return pref + sft_coef * (rho * ce(lc, mc) + (1 - rho) * ce(lr, mr))


def _smpo_inputs(seed=0):
    b, tc, tr = 3, 5, 7
    lc = (-_randn(b, tc, seed=seed).abs() - 1.5).requires_grad_(True)
    lr = (-_randn(b, tr, seed=seed + 1).abs() * 1.5 - 0.2).requires_grad_(True)
    mc = (torch.arange(tc) < torch.tensor([[5], [3], [4]])).to(DT)
    mr = (torch.arange(tr) < torch.tensor([[7], [4], [6]])).to(DT)
    mr = torch.where((torch.arange(b).reshape(-1, 1) == 2) & (torch.arange(tr) == 1), 0.5, mr)
    ids = torch.randint(0, 5, (b, tr), generator=_gen(seed + 2))
    ids = torch.where(torch.arange(tr) == (mr > 0).sum(-1, keepdim=True) - 1, EOS, ids)  # EOS last
    return lc, mc, lr, mr, ids


SMPO_CONFIGS = [
    {},
    {"lower_percentile": None, "min_log_prob": None, "eos_protection": "none"},
    {"eos_protection": "flip", "chosen_upper_percentile": 0.7, "lower_percentile": 0.3, "min_log_prob": -3.0},
    {"eos_protection": "none", "lower_percentile": 0.1, "min_log_prob": None, "sft_coef": 0.3, "rho": 0.6},
]


@pytest.mark.parametrize("cfg", SMPO_CONFIGS)
@pytest.mark.parametrize("loss_type", ["smooth_lower_bound", "sigmoid", "hinge", "ipo"])
def test_smpo_matches_bruteforce(loss_type, cfg):
    lc, mc, lr, mr, ids = _smpo_inputs()
    loss, metrics = smpo_loss(lc, mc, lr, mr, ids, EOS, loss_type=loss_type, **cfg)
    ref = _ref_smpo(lc, mc, lr, mr, ids, loss_type=loss_type, **cfg)
    assert loss.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    assert metrics["loss/smpo_pref"] + cfg.get("sft_coef", 1.0) * metrics["loss/smpo_sft"] == pytest.approx(ref)
    assert metrics["smpo/margin"] == 0.35
    assert _finite(*torch.autograd.grad(loss, (lc, lr)))


def test_smpo_sft_amortization_term():
    lc, mc, lr, mr, ids = _smpo_inputs()
    with_sft, metrics = smpo_loss(lc, mc, lr, mr, ids, EOS, sft_coef=0.7, rho=0.8)
    no_sft, _ = smpo_loss(lc, mc, lr, mr, ids, EOS, sft_coef=0.0)
    ce_c = (-lc * mc).sum().item() / mc.sum().item()
    ce_r = (-lr * mr).sum().item() / mr.sum().item()   # raw rejected log-probs, no stabilisers
    assert metrics["loss/smpo_sft"] == pytest.approx(0.8 * ce_c + 0.2 * ce_r, rel=1e-12)
    assert (with_sft - no_sft).item() == pytest.approx(0.7 * (0.8 * ce_c + 0.2 * ce_r), rel=1e-10)


def test_smpo_metrics():
    lc, mc, lr, mr, ids = _smpo_inputs()
    _, m = smpo_loss(lc, mc, lr, mr, ids, EOS, margin=0.1)
    eos_vals = [lr[b, t].item() for b in range(3) for t in range(7) if ids[b, t] == EOS and mr[b, t] > 0]
    assert m["smpo/eos_logp_rejected"] == pytest.approx(sum(eos_vals) / len(eos_vals))
    assert m["smpo/z_mean"] == pytest.approx(m["smpo/chosen_reward"] - m["smpo/rejected_reward"] - 0.1)
    assert 0.0 <= m["smpo/acc"] <= 1.0 and 0.0 < m["smpo/clipped_frac"] < 1.0
    no_eos = torch.zeros_like(ids)
    assert smpo_loss(lc, mc, lr, mr, no_eos, EOS)[1]["smpo/eos_logp_rejected"] == 0.0


def test_margin_schedule():
    assert margin_schedule(0, 0.35) == 0.35
    assert margin_schedule(0, 0.35, start=0.0, ramp_steps=10) == 0.0
    assert margin_schedule(5, 0.4, start=0.0, ramp_steps=10) == pytest.approx(0.2)
    assert margin_schedule(5, 0.4, start=0.2, ramp_steps=10) == pytest.approx(0.3)
    assert margin_schedule(10, 0.4, start=0.2, ramp_steps=10) == 0.4
    assert margin_schedule(1000, 0.4, ramp_steps=10) == 0.4
    assert isinstance(margin_schedule(3, 1, ramp_steps=10), float)


# Proofs that the stabilisers act: each changes the loss and the gradient.
def _outlier_pair():
    lc = torch.full((1, 4), -8.0, dtype=DT, requires_grad=True)   # z < 0: the loss is active
    lr = torch.tensor([[-0.5, -0.6, -30.0, -0.4, -0.7]], dtype=DT, requires_grad=True)
    return lc, torch.ones(1, 4, dtype=DT), lr, torch.ones(1, 5, dtype=DT), torch.zeros(1, 5, dtype=torch.long)


@pytest.mark.parametrize("stab", [{"lower_percentile": 0.02, "min_log_prob": -2.3},
                                  {"lower_percentile": None, "min_log_prob": -2.3},
                                  {"lower_percentile": 0.02, "min_log_prob": None}])
def test_smpo_outlier_is_clipped_with_zero_gradient(stab):
    lc, mc, lr, mr, ids = _outlier_pair()
    on, m_on = smpo_loss(lc, mc, lr, mr, ids, EOS, sft_coef=0.0, **stab)
    off, m_off = smpo_loss(lc, mc, lr, mr, ids, EOS, sft_coef=0.0, lower_percentile=None, min_log_prob=None)
    g_on, g_off = torch.autograd.grad(on, lr)[0], torch.autograd.grad(off, lr)[0]
    assert abs(on.item() - off.item()) > 1.0
    assert g_on[0, 2].item() == 0.0 and g_off[0, 2].item() != 0.0
    assert g_on[0, 0].item() != 0.0      # unclipped tokens keep their gradient
    assert m_on["smpo/clipped_frac"] > 0 and m_off["smpo/clipped_frac"] == 0.0
    # with the SFT term on, the outlier's only gradient is the raw rejected SFT term
    full, _ = smpo_loss(lc, mc, lr, mr, ids, EOS, sft_coef=1.0, rho=0.8, **stab)
    assert torch.autograd.grad(full, lr)[0][0, 2].item() == pytest.approx(-0.2 / 5, rel=1e-12)


def test_smpo_eos_protection_gradient_signs():
    lc = torch.full((1, 4), -3.0, dtype=DT, requires_grad=True)
    lr = torch.tensor([[-0.5, -2.0, -1.0, -1.5]], dtype=DT, requires_grad=True)
    ids = torch.tensor([[1, 2, 3, EOS]])
    mc, mr = torch.ones(1, 4, dtype=DT), torch.ones(1, 4, dtype=DT)
    grads, losses = {}, {}
    for prot in ("exclude", "flip", "none"):
        loss, m = smpo_loss(lc, mc, lr, mr, ids, EOS, sft_coef=0.0, eos_protection=prot)
        losses[prot], grads[prot] = loss.item(), torch.autograd.grad(loss, lr)[0][0, 3].item()
        assert m["smpo/eos_logp_rejected"] == -1.5
    assert grads["exclude"] == 0.0         # EOS is out of r(rejected)
    assert grads["flip"] < 0.0             # gradient descent raises EOS
    assert grads["none"] > 0.0             # gradient descent would push EOS down (collapse)
    assert len({round(v, 12) for v in losses.values()}) == 3


def test_smpo_lower_winsorization_alone_spares_chosen():
    lc, mc, lr, mr, ids = _smpo_inputs()
    lr = torch.where((torch.arange(3).reshape(-1, 1) == 0) & (torch.arange(7) == 2), -30.0, lr.detach())
    lr.requires_grad_(True)
    lc_out = torch.where((torch.arange(3).reshape(-1, 1) == 0) & (torch.arange(5) == 1), -30.0, lc.detach())
    lc_out.requires_grad_(True)
    kw = dict(sft_coef=0.0, min_log_prob=None, loss_type="sigmoid")
    on, m_on = smpo_loss(lc_out, mc, lr, mr, ids, EOS, lower_percentile=0.02, **kw)
    off, m_off = smpo_loss(lc_out, mc, lr, mr, ids, EOS, lower_percentile=None, **kw)
    assert on.item() != pytest.approx(off.item())
    assert m_on["smpo/rejected_reward"] > m_off["smpo/rejected_reward"]
    assert m_on["smpo/chosen_reward"] == m_off["smpo/chosen_reward"]      # chosen untouched
    g_lc, g_lr = torch.autograd.grad(on, (lc_out, lr))
    assert g_lr[0, 2].item() == 0.0 and g_lc[0, 1].item() != 0.0         # chosen outlier trains


def test_smpo_chosen_upper_winsorization_only_when_enabled():
    lc, mc, lr, mr, ids = _smpo_inputs()
    lc_hi = torch.where(torch.arange(5) == 0, -0.01, lc.detach()).requires_grad_(True)
    kw = dict(sft_coef=0.0, loss_type="sigmoid")
    off, m_off = smpo_loss(lc_hi, mc, lr, mr, ids, EOS, **kw)
    same, _ = smpo_loss(lc_hi, mc, lr, mr, ids, EOS, chosen_upper_percentile=None, **kw)
    on, m_on = smpo_loss(lc_hi, mc, lr, mr, ids, EOS, chosen_upper_percentile=0.5, **kw)
    assert off.item() == same.item() and on.item() != pytest.approx(off.item())
    assert m_on["smpo/chosen_reward"] < m_off["smpo/chosen_reward"]
    assert m_on["smpo/rejected_reward"] == m_off["smpo/rejected_reward"]
    g_on, g_off = torch.autograd.grad(on, lc_hi)[0], torch.autograd.grad(off, lc_hi)[0]
    assert g_on[0, 0].item() == 0.0 and g_off[0, 0].item() != 0.0


def test_smpo_does_not_modify_inputs():
    lc, mc, lr, mr, ids = _smpo_inputs()
    lr = torch.where(torch.arange(7) == 2, -30.0, lr.detach())
    before = [x.detach().clone() for x in (lc, mc, lr, mr, ids)]
    smpo_loss(lc, mc, lr, mr, ids, EOS, eos_protection="flip", chosen_upper_percentile=0.8)
    for x, y in zip((lc, mc, lr, mr, ids), before):
        assert torch.equal(x.detach(), y)


def test_smpo_rejects_unknown_options():
    lc, mc, lr, mr, ids = _smpo_inputs()
    with pytest.raises(ValueError):
        smpo_loss(lc, mc, lr, mr, ids, EOS, loss_type="dpo")
    with pytest.raises(ValueError):
        smpo_loss(lc, mc, lr, mr, ids, EOS, eos_protection="raise")


# ----------------------------------------------------------------------------- robustness
def _masks(b, t):
    """A mask with one all-masked row, and a fully empty mask."""
    some = torch.ones(b, t, dtype=DT)
    some = torch.where(torch.arange(b).reshape(-1, 1) == 1, 0.0, some)
    return some, torch.zeros(b, t, dtype=DT)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_robust_gjsd(beta):
    s, te, _ = _jsd_inputs()
    te = torch.where(torch.arange(6) < 2, -math.inf, te)          # teacher gives zero prob
    s_inf = torch.where(torch.arange(6) == 5, -math.inf, s.detach()).requires_grad_(True)
    for mask in _masks(3, 4):
        for student in (s, s_inf):
            loss, _ = generalized_jsd(student, te, mask, beta=beta)
            assert _finite(loss, *torch.autograd.grad(loss, student))
    assert generalized_jsd(s, te, _masks(3, 4)[1], beta=beta)[0].item() == 0.0


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_robust_topk(tail, beta):
    s, t_lp, t_ids, _ = _topk_inputs()
    t_lp = torch.where(torch.arange(3) == 2, -math.inf, t_lp)
    t_lp = torch.where((torch.arange(4) == 0).reshape(1, -1, 1), -math.inf, t_lp)  # all -inf tokens
    for mask in _masks(3, 4):
        loss, _ = generalized_jsd_topk(s, t_lp, t_ids, mask, beta=beta, tail_bucket=tail)
        assert _finite(loss, *torch.autograd.grad(loss, s))


@pytest.mark.parametrize("tis_cap", [None, 2.0])
def test_robust_pg_and_sft(tis_cap):
    lp, ls, lt, _ = _pg_inputs()
    pad = torch.arange(5) == 4
    lt = torch.where(torch.arange(5) == 0, -math.inf, lt)               # teacher zero prob
    ls = torch.where(pad, -math.inf, ls)                                 # garbage in padding
    lp = torch.where(pad, -math.inf, lp.detach()).requires_grad_(True)
    for mask in _masks(3, 5):
        mask = torch.where(pad, 0.0, mask)
        loss, metrics = reverse_kl_pg_loss(lp, ls, lt, mask, tis_cap=tis_cap, discount=0.9)
        assert _finite(loss, *torch.autograd.grad(loss, lp))
        assert all(math.isfinite(v) for v in metrics.values())
        loss, _ = sft_loss(lp, mask)
        assert _finite(loss, *torch.autograd.grad(loss, lp))


def test_robust_smpo():
    lc, mc, lr, mr, ids = _smpo_inputs()
    lr_inf = torch.where(mr > 0, lr.detach(), -math.inf)
    lr_inf = torch.where(torch.arange(7) == 0, -math.inf, lr_inf).requires_grad_(True)  # collapsed token
    mc_row = torch.where(torch.arange(3).reshape(-1, 1) == 1, 0.0, mc)
    cases = [(mc, mr), (mc_row, mr), (torch.zeros_like(mc), torch.zeros_like(mr))]
    for (cm, rm) in cases:
        for cfg in SMPO_CONFIGS:
            loss, metrics = smpo_loss(lc, cm, lr_inf, rm, ids, EOS, **cfg)
            assert _finite(loss, *torch.autograd.grad(loss, (lc, lr_inf)))
            assert all(math.isfinite(v) for v in metrics.values())


def test_robust_gather_logprobs():
    logits = torch.where(torch.arange(6) == 0, -math.inf, _randn(2, 3, 6)).requires_grad_(True)
    ids = torch.randint(1, 6, (2, 3), generator=_gen(1))
    out = gather_logprobs(logits, ids, chunk_size=2)
    assert _finite(out, torch.autograd.grad(out.sum(), logits)[0])


# -------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("chunk", [1, 3, 1000])
@pytest.mark.parametrize("temp", [1.0, 0.7, 2.0])
def test_gather_logprobs_matches_log_softmax(chunk, temp):
    logits = _randn(3, 5, 11, scale=3.0).requires_grad_(True)
    ids = torch.randint(0, 11, (3, 5), generator=_gen(4))
    out = gather_logprobs(logits, ids, temperature=temp, chunk_size=chunk)
    ref = torch.log_softmax(logits / temp, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = _randn(3, 5, seed=7)
    g, g_ref = (torch.autograd.grad((x * w).sum(), logits)[0] for x in (out, ref))
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    assert out.shape == (3, 5) and gather_logprobs(logits.float(), ids).dtype == torch.float32


def test_sampler_mismatch_metrics_by_hand():
    """is/ratio_mean, is/clip_frac and is/kl_k3 over the masked tokens, as written out."""
    from opd.losses import sampler_mismatch_metrics

    lp, ls, _, m = _pg_inputs()
    got = sampler_mismatch_metrics(lp, ls, m, eps=0.2)
    r_sum = clip = k3 = w = 0.0
    for b in range(3):
        for t in range(5):
            if m[b, t] > 0:
                d = lp[b, t].item() - ls[b, t].item()
                r_sum += m[b, t].item() * math.exp(d)
                clip += m[b, t].item() * (abs(math.exp(d) - 1) > 0.2)
                k3 += m[b, t].item() * (math.exp(d) - 1 - d)
                w += m[b, t].item()
    assert got["is/ratio_mean"] == pytest.approx(r_sum / w, rel=1e-10)
    assert got["is/clip_frac"] == pytest.approx(clip / w, rel=1e-10)
    assert got["is/kl_k3"] == pytest.approx(k3 / w, rel=1e-10)
    same = sampler_mismatch_metrics(lp, lp, m)
    assert (same["is/ratio_mean"], same["is/clip_frac"], same["is/kl_k3"]) == (1.0, 0.0, 0.0)


def test_prefix_importance_weights_by_hand():
    """w_t = min(prod over the masked s < t of exp(l_student - l_sampler), cap)."""
    from opd.losses import prefix_importance_weights

    lp, ls, _, m = _pg_inputs()
    got = prefix_importance_weights(lp, ls, m, cap=1.5)
    for b in range(3):
        log_w = 0.0
        for t in range(5):
            if m[b, t] > 0:
                assert got[b, t].item() == pytest.approx(min(math.exp(log_w), 1.5), rel=1e-6)
                log_w += lp[b, t].item() - ls[b, t].item()
    assert torch.equal(prefix_importance_weights(lp, lp, m, cap=2.0), torch.ones_like(lp))

# --------------------------------------------------- from hidden states, chunked (issue 10)
def _hidden_inputs(dtype, b=3, t=5, h=4, v=9, k=3, seed=0):
    """Hidden states and an LM head; targets; a teacher's full logits and its top-k (one
    padded entry, one repeated id); a frozen model's hidden states and head; a float mask
    with an empty row (padding) and masked tokens."""
    g = _gen(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=dtype).requires_grad_(True)
    head, ref_head = (torch.nn.Linear(h, v, bias=False, dtype=dtype) for _ in range(2))
    with torch.no_grad():
        head.weight.copy_(2 * torch.randn(v, h, generator=g, dtype=dtype))
        ref_head.weight.copy_(2 * torch.randn(v, h, generator=g, dtype=dtype))
    tgt = torch.randint(0, v, (b, t), generator=g)
    teacher = 2 * torch.randn(b, t, v, generator=g, dtype=dtype)
    t_lp, t_ids = torch.log_softmax(teacher, -1).topk(k, -1)
    t_lp = torch.where(torch.arange(k) == k - 1, -math.inf, t_lp) if t > 1 else t_lp
    t_ids = torch.where((torch.arange(t) == 2).reshape(-1, 1) & (torch.arange(k) == 1), t_ids[..., :1], t_ids)
    mask = _mask(b, t, seed).to(dtype) * (torch.arange(b) != 1).reshape(-1, 1)
    return dict(hidden=hidden, head=head, tgt=tgt, teacher=teacher, t_lp=t_lp, t_ids=t_ids,
                ref_hidden=torch.randn(b, t, h, generator=g, dtype=dtype), ref_head=ref_head,
                mask=mask, w=torch.randn(b, t, generator=g, dtype=dtype))


def _old_path(x, t_s, t_j, beta, tail, n):
    """Logits [B, T, V] first, then the logits-level functions (what the learner did)."""
    logits = x["head"](x["hidden"])
    lp = gather_logprobs(logits, x["tgt"], temperature=t_s, chunk_size=2)
    return lp, [generalized_jsd_topk(logits, x["t_lp"], x["t_ids"], x["mask"], beta=beta, temperature=t_j,
                                     tail_bucket=tail, normalizer=n)[0],
                generalized_jsd(logits, x["teacher"], x["mask"], beta=beta, temperature=t_j,
                                normalizer=n, chunk_size=3)[0],
                generalized_jsd(logits, x["ref_head"](x["ref_hidden"]).detach(), x["mask"], beta=1.0,
                                normalizer=n)[0]]


def _new_path(x, t_s, t_j, beta, tail, n, chunk):
    """The trained tokens' hidden states, one chunked pass, then the losses of its outputs."""
    from opd.losses import Reference, divergence_loss, logprobs_from_hidden, topk_jsd_from_logprobs

    sel = x["mask"].reshape(-1).nonzero().squeeze(1)
    tok = {k: v.reshape(-1, *v.shape[2:])[sel] for k, v in x.items() if isinstance(v, torch.Tensor)}
    (lp, topk), (div, anchor) = logprobs_from_hidden(
        tok["hidden"], x["head"], [(tok["tgt"][:, None], t_s), (tok["t_ids"], t_j)],
        [Reference(tok["teacher"], (0.25, beta), t_j), Reference(tok["ref_hidden"], (1.0,), 1.0, x["ref_head"])],
        chunk_size=chunk)
    return sel, lp[:, 0], [
        topk_jsd_from_logprobs(topk, tok["t_lp"], tok["t_ids"], tok["mask"], beta=beta, tail_bucket=tail,
                               normalizer=n)[0],
        divergence_loss(div[:, 1], tok["mask"], n)[0], divergence_loss(anchor[:, 0], tok["mask"], n)[0]]


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("t_s,t_j,beta,n", [(1.0, 1.0, 0.5, None), (0.7, 2.0, 0.0, 9.0), (1.0, 1.0, 1.0, 4.0)])
@pytest.mark.parametrize("tail", [True, False])
def test_from_hidden_equals_logits_path(dtype, rtol, chunk, t_s, t_j, beta, n, tail):
    """Chunked from hidden states (only the trained tokens, one log_softmax per temperature)
    = logits first, then gather_logprobs / generalized_jsd_topk / generalized_jsd: every
    value, and the gradients of their sum w.r.t. the hidden states and the head."""
    x = _hidden_inputs(dtype)
    params = (x["hidden"], x["head"].weight)
    lp_old, old = _old_path(x, t_s, t_j, beta, tail, n)
    sel, lp_new, new = _new_path(x, t_s, t_j, beta, tail, n, chunk)
    torch.testing.assert_close(lp_new, lp_old.reshape(-1)[sel], rtol=rtol, atol=rtol)
    for a, b in zip(new, old):
        assert a.item() == pytest.approx(b.item(), rel=rtol, abs=rtol)
    w = x["w"].reshape(-1)[sel]
    g_old = torch.autograd.grad((w * lp_old.reshape(-1)[sel]).sum() + sum(old), params)
    g_new = torch.autograd.grad((w * lp_new).sum() + sum(new), params)
    for a, b in zip(g_new, g_old):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)


def test_from_hidden_without_grad_and_without_tokens():
    from opd.losses import Reference, logprobs_from_hidden

    x = _hidden_inputs(torch.float64)
    h, ids = x["hidden"].reshape(-1, 4), x["tgt"].reshape(-1, 1)
    ref = [Reference(x["teacher"].reshape(-1, 9), (0.0, 1.0), 2.0)]
    (lp,), (div,) = logprobs_from_hidden(h, x["head"], [(ids, 1.0)], ref, chunk_size=4)
    with torch.no_grad():
        (lp0,), (div0,) = logprobs_from_hidden(h, x["head"], [(ids, 1.0)], ref, chunk_size=4)
    assert lp.requires_grad and not lp0.requires_grad
    torch.testing.assert_close((lp0, div0), (lp.detach(), div.detach()), rtol=0, atol=0)
    (lp, top), (div,) = logprobs_from_hidden(h[:0], x["head"], [(ids[:0], 1.0), (ids[:0, [0, 0]], 2.0)],
                                             [Reference(x["teacher"][:0], (0.5,))])
    assert lp.shape == (0, 1) and top.shape == (0, 2) and div.shape == (0, 1)


def test_from_hidden_saves_no_vocabulary_sized_tensor_for_backward():
    """What forward leaves for backward: no (tokens, V) tensor, only chunk inputs (checkpoint)."""
    from opd.losses import Reference, logprobs_from_hidden

    x = _hidden_inputs(torch.float64, b=4, t=8, v=50)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        (lp,), (div,) = logprobs_from_hidden(x["hidden"].reshape(-1, 4), x["head"], [(x["tgt"].reshape(-1, 1), 1.0)],
                                             [Reference(x["teacher"].reshape(-1, 50), (0.5,))], chunk_size=8)
    assert saved and all(50 not in s for s in saved), saved
    (lp.sum() + div.sum()).backward()
    assert x["hidden"].grad is not None and x["head"].weight.grad is not None
