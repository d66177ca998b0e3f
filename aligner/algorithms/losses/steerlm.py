"""SteerLM 2.0: importance weights, baseline and loss, and the Beta model of attribute
likelihoods (docs/steerlm.md).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from aligner.algorithms.losses.common import Group, _check_pairs, group_ids, group_softmax, group_sum


def steerlm2_weights(
    log_p_attr: torch.Tensor,
    log_p_y: torch.Tensor,
    log_q_prime: torch.Tensor,
    log_q_theta: torch.Tensor,
    group: Group,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SteerLM 2.0 importance weights (docs/steerlm.md), within each prompt's group:

    ``w'_i = softmax_i(log P(a|x,y_i) + log P(y_i|x) − log Q'(y_i|a,x))`` and
    ``b'_i = softmax_i(log Q_θ(y_i|a,x) − log Q'(y_i|a,x))`` (no gradient).
    All inputs [b] sequence log-probs; ``group``: k consecutive rows, or [b] group ids.
    Returns ``(w', b')`` [b], detached.
    """
    _check_pairs(log_p_attr=log_p_attr, log_p_y=log_p_y, log_q_prime=log_q_prime, log_q_theta=log_q_theta)
    q_prime = log_q_prime.detach()
    w = group_softmax((log_p_attr.detach() + log_p_y.detach() - q_prime).double(), group)
    b = group_softmax((log_q_theta.detach() - q_prime).double(), group)
    return w.to(log_q_theta.dtype), b.to(log_q_theta.dtype)


def steerlm2_loss(
    policy_logps: torch.Tensor,
    num_tokens: torch.Tensor,
    log_p_attr: torch.Tensor,
    log_p_y: torch.Tensor,
    log_q_prime: torch.Tensor,
    group: Group,
) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """SteerLM 2.0 loss (docs/steerlm.md), as ``(loss_sum, token_count, sums)``.

    The gradient ``−Σ_i (w'_i − b'_i) ∇log Q_θ(y_i|a,x)`` per prompt, implemented as each
    sequence's NLL times ``(w' − b')`` divided by the average number of valid tokens:

    ``L = (1/G) Σ_groups Σ_i (w'_i − b'_i) · (−log Q_θ(y_i|a,x)) / T̄``

    over G groups of n responses with ``T̄`` their mean token count. It is returned as
    ``loss_sum = Σ_groups n_g Σ_i (w'_i − b'_i)(−log Q_θ(y_i|a,x))`` and ``token_count =
    Σ_i num_tokens_i`` (``L = loss_sum / token_count``): sums over the samples, so that the
    training loop, which adds both over micro-batches and data-parallel ranks before
    dividing, optimises the formula over the global batch (groups of unequal size weigh by
    their size).

    policy_logps: [b] summed response log-probs under the model being trained (with
    grad; ``b'`` uses them detached); num_tokens: [b] valid response tokens; the other
    inputs [b] precomputed; group: k consecutive rows, or [b] group ids.

    ``sums``: ``kl_w_b`` (Σ over groups of ``Σ_i w'_i log(w'_i / b'_i)``), ``weight_max``
    (Σ over groups of the largest w'), ``groups`` (G): divide by ``groups`` for the means.
    """
    _check_pairs(policy_logps=policy_logps, num_tokens=num_tokens)
    ids, g = group_ids(group, policy_logps.shape[0], policy_logps.device)
    w, b = steerlm2_weights(log_p_attr, log_p_y, log_q_prime, policy_logps, ids)
    sizes = group_sum(torch.ones_like(policy_logps), ids, g)[ids]
    loss_sum = ((w - b).to(policy_logps.dtype) * sizes * -policy_logps).sum()
    token_count = num_tokens.sum()
    with torch.no_grad():
        wd, bd = w.double(), b.double()
        terms = torch.where(wd > 0, wd * (wd.log() - bd.log()), torch.zeros_like(wd))
        w_max = torch.zeros(g, dtype=torch.float64, device=wd.device).scatter_reduce(
            0, ids, wd, reduce="amax", include_self=False)
        sums = {"kl_w_b": group_sum(terms, ids, g).sum(), "weight_max": w_max.sum(),
                "groups": torch.tensor(float(g), dtype=torch.float64)}
    return loss_sum, token_count, sums


def beta_cdf(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, iterations: int = 300) -> torch.Tensor:
    """Regularised incomplete beta ``I_x(a, b)`` (the Beta(a, b) CDF at x), float64.

    Continued-fraction evaluation (modified Lentz), using ``I_x(a,b) = 1 − I_{1−x}(b,a)``
    on the side where the fraction converges fast. x in [0, 1], a, b > 0; broadcast.
    """
    x, a, b = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float64) for v in (x, a, b)))
    if bool(((x < 0) | (x > 1)).any()) or bool(((a <= 0) | (b <= 0)).any()):
        raise ValueError("beta_cdf needs x in [0, 1] and a, b > 0")
    flip = x > (a + 1.0) / (a + b + 2.0)
    xx, aa, bb = torch.where(flip, 1 - x, x), torch.where(flip, b, a), torch.where(flip, a, b)
    tiny = 1e-300
    inner = xx.clamp(tiny, 1 - 1e-16)
    log_front = (torch.lgamma(aa + bb) - torch.lgamma(aa) - torch.lgamma(bb)
                 + aa * torch.log(inner) + bb * torch.log1p(-inner))
    c = torch.ones_like(xx)
    d = 1.0 - (aa + bb) * xx / (aa + 1.0)
    d = 1.0 / torch.where(d.abs() < tiny, torch.full_like(d, tiny), d)
    h = d.clone()
    for m in range(1, iterations + 1):
        for coef in (m * (bb - m) * xx / ((aa + 2 * m - 1) * (aa + 2 * m)),
                     -(aa + m) * (aa + bb + m) * xx / ((aa + 2 * m) * (aa + 2 * m + 1))):
            d = 1.0 + coef * d
            d = 1.0 / torch.where(d.abs() < tiny, torch.full_like(d, tiny), d)
            c = 1.0 + coef / c
            c = torch.where(c.abs() < tiny, torch.full_like(c, tiny), c)
            h = h * d * c
        if bool(((d * c - 1.0).abs() < 1e-15).all()):
            break
    val = torch.exp(log_front) * h / aa
    val = torch.where(xx <= 0, torch.zeros_like(val), val)
    return torch.where(flip, 1.0 - val, val)


def attribute_log_likelihood(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    concentration: float = 24.0,
    num_levels: int = 5,
    max_value: float = 4.0,
    eps: float = 1e-4,
) -> torch.Tensor:
    """``log P(a | x, y)`` from a regression reward model (docs/steerlm.md).

    Each predicted attribute ``ŷ`` (on the 0..max_value scale) is scaled to
    ``r = ŷ / max_value`` (clamped to [eps, 1−eps]) and modelled as
    ``Beta(α = c·r, β = c − α)`` with ``c = concentration`` (24). The probability of level
    ``n`` of the 0..num_levels−1 scale is the Beta mass of bin n, with equal-width bins
    ``[n/num_levels, (n+1)/num_levels]`` on [0, 1] (the papers do not publish their bin
    edges; this is this module's choice). Attributes combine as a product: the result is
    ``Σ_j mask_j · log P(a_j = target_j)``.

    pred: [b, N] float; target: [b, N] integer levels; mask: [b, N] (1 = conditioned on).
    Returns [b] float64 (no gradient: a precomputed quantity).
    """
    if pred.shape != target.shape:
        raise ValueError(f"target has shape {tuple(target.shape)}; expected {tuple(pred.shape)} like pred")
    levels = torch.as_tensor(target).detach().double()
    if bool(((levels < 0) | (levels > num_levels - 1) | (levels != levels.round())).any()):
        raise ValueError(f"attribute targets must be integers in 0..{num_levels - 1}")
    r = (pred.detach().double() / max_value).clamp(eps, 1 - eps)
    alpha = concentration * r
    beta = concentration - alpha
    lo, hi = levels / num_levels, (levels + 1) / num_levels
    # mass of [lo, hi]: take the difference on the side of the lighter tail (precision)
    upper = lo >= r
    p_lower_side = beta_cdf(hi, alpha, beta) - beta_cdf(lo, alpha, beta)
    p_upper_side = beta_cdf(1 - lo, beta, alpha) - beta_cdf(1 - hi, beta, alpha)
    p = torch.where(upper, p_upper_side, p_lower_side).clamp(min=1e-300)
    logp = p.log()
    if mask is not None:
        m = torch.as_tensor(mask).to(logp.dtype)
        logp = torch.where(m != 0, logp * m, torch.zeros_like(logp))
    return logp.sum(-1)
