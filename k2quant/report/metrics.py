"""Per-token quantities and their statistics, as llama-perplexity --kl-divergence defines them.

Per scored token: nll = logsumexp(logits) - logits[next]; KLD = sum_i p_ref,i (log p_ref,i -
log p_cand,i) over the entries with log p_ref,i > -16; same_top = argmax agreement;
delta_p = p_cand(next) - p_ref(next). Statistics use llama.cpp's mean_and_uncertainty
(sqrt((E[x^2] - E[x]^2) / (n - 1)), 0 when n <= 10) and percentiles by linear
interpolation at p * (n - 1) on the sorted values.
"""

from __future__ import annotations

import math

import torch

LOG_P_FLOOR = -16.0


def token_quantities(ref_logits: torch.Tensor, cand_logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Logits [N, V] (float32) and next tokens [N] -> per-token tensors [N] in float64."""
    lr = ref_logits.double().log_softmax(-1)
    lc = cand_logits.double().log_softmax(-1)
    nll_ref = -lr.gather(1, targets[:, None]).squeeze(1)
    nll_cand = -lc.gather(1, targets[:, None]).squeeze(1)
    keep = lr > LOG_P_FLOOR
    kld = torch.where(keep, lr.exp() * (lr - lc), torch.zeros_like(lr)).sum(-1)
    same_top = (ref_logits.argmax(-1) == cand_logits.argmax(-1)).double()
    delta_p = torch.exp(-nll_cand) - torch.exp(-nll_ref)
    return {"nll_ref": nll_ref, "nll_cand": nll_cand, "kld": kld, "same_top": same_top, "delta_p": delta_p}


def mean_and_uncertainty(x: torch.Tensor) -> tuple[float, float]:
    n = x.numel()
    f = x.mean().item()
    if n <= 10:
        return f, 0.0
    var = (x.pow(2).mean().item() - f * f) / (n - 1)
    return f, math.sqrt(max(var, 0.0))


def percentile(sorted_x: torch.Tensor, p: float) -> float:
    n = sorted_x.numel()
    pos = p * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return (sorted_x[lo] * (1 - frac) + sorted_x[hi] * frac).item()


def summarize(q: dict) -> dict:
    """metrics.json's top-level statistics from the concatenated per-token quantities."""
    n = q["kld"].numel()
    a, b = q["nll_cand"], q["nll_ref"]
    mean_a, unc_a = mean_and_uncertainty(a)
    mean_b, unc_b = mean_and_uncertainty(b)
    cov = ((a * b).mean().item() - mean_a * mean_b) / (n - 1) if n > 10 else 0.0
    ppl_cand, ppl_ref = math.exp(mean_a), math.exp(mean_b)
    log_ratio = mean_a - mean_b
    log_ratio_unc = math.sqrt(max(unc_a**2 + unc_b**2 - 2 * cov, 0.0))
    ratio = math.exp(log_ratio)
    kld = q["kld"]
    k_mean, k_unc = mean_and_uncertainty(kld)
    ks = kld.sort().values
    same = q["same_top"].mean().item()
    dp = q["delta_p"]
    dp_mean, dp_unc = mean_and_uncertainty(dp)
    dp2_mean, dp2_unc = mean_and_uncertainty(dp.pow(2))
    rms = math.sqrt(dp2_mean)
    return {
        "tokens": n,
        "ppl": {
            "ref": ppl_ref,
            "ref_unc": ppl_ref * unc_b,
            "cand": ppl_cand,
            "cand_unc": ppl_cand * unc_a,
            "ratio": ratio,
            "ratio_unc": ratio * log_ratio_unc,
            "ln_ratio": log_ratio,
            "ln_ratio_unc": log_ratio_unc,
            "cor_ln_ppl": cov / (unc_a * unc_b) if unc_a and unc_b else 1.0,
        },
        "kld": {
            "mean": k_mean,
            "stderr": k_unc,
            "max": ks[-1].item(),
            "p999": percentile(ks, 0.999),
            "p99": percentile(ks, 0.99),
            "p95": percentile(ks, 0.95),
            "p90": percentile(ks, 0.90),
            "median": percentile(ks, 0.5),
            "p10": percentile(ks, 0.10),
            "min": ks[0].item(),
        },
        "top1_agreement": same,
        "top1_agreement_unc": math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
        "delta_p": {
            "mean": dp_mean,
            "mean_unc": dp_unc,
            "rms": rms,
            "rms_unc": 0.5 / rms * dp2_unc if rms > 0 else 0.0,
        },
    }
