"""Routing of tokens to LoRA experts: the MoLA gate and the statistics of the auxiliary loss.

Shapes: T tokens (any leading dims flattened), E experts of one layer, k = top-k.

The routers are registered in :mod:`molora_kernels.routers` (what each may be assumed to do); their math is here.

MoLA router ("topk", the default)::

    p      = softmax(float32(logits))          # [T, E]
    v, idx = topk(p, k)                         # [T, k]
    g      = v / v.sum(-1, keepdim=True)        # renormalised weights of the chosen experts
    gates  = scatter(zeros[T, E], idx, g)       # dense gate matrix, zero outside the top-k

Soft router ("soft", LoRAMoE style): ``gates = p`` (every expert, softmax weights). Noisy top-k ("noisy_topk"):
MoLA's on logits perturbed in training (:func:`route_noisy_topk`).

Over 400 lines: every router's forward and its hand-written backward live side by side, with the statistics the
load loss reads from them; splitting them would separate each forward from the backward that must match it.

Everything here is float32 regardless of the input dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .routers import get_router


@dataclass
class Routing:
    """Result of routing T tokens over E experts.

    gates:    [T, E] float32, the weight of each expert for each token (zero outside the top-k).
    probs:    [T, E] float32, the full softmax (the aux loss needs it, with gradient).
    topk_idx: [T, k] int64 chosen experts (for "soft", all E experts in order).
    """

    gates: torch.Tensor
    probs: torch.Tensor
    topk_idx: torch.Tensor


@dataclass
class RouterStats:
    """Per-expert routing statistics of one MoLoRA module for one forward pass.

    All sums run over the real (unmasked) tokens only.
    prob_sum:    [E] float32, sum_t P[t, e] — keeps the gradient (the aux loss differentiates it).
    counts:      [E] float32, number of top-k selections of each expert (no gradient).
    gate_sum:    [E] float32, sum_t gates[t, e] (no gradient): the "load" of a soft router.
    entropy_sum: []  float32, sum_t H(P[t]) in nats (no gradient).
    n_tokens:    []  float32, number of real tokens.
    dropped:     []  float32, number of real tokens that no expert computed (all gates 0: over a Switch
                 capacity, or picked by no expert under expert choice; always 0 for top-k, top-p, soft, hash).
    """

    prob_sum: torch.Tensor
    counts: torch.Tensor
    gate_sum: torch.Tensor
    entropy_sum: torch.Tensor
    n_tokens: torch.Tensor
    dropped: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.prob_sum.shape[-1]


def route(logits: torch.Tensor, top_k: int, router: str = "topk", options: Optional[dict] = None,
          token_ids: Optional[torch.Tensor] = None, token_mask: Optional[torch.Tensor] = None,
          training: bool = True) -> Routing:
    """Route tokens given router logits.

    Args:
        logits: [T, E] router logits, any float dtype (cast to float32 here).
        top_k: experts per token for routers that select top-k, 1 <= top_k <= E.
        router: a registered router name (:mod:`molora_kernels.routers`): "topk" (MoLA: softmax, top-k,
            renormalise), "soft" (all experts, softmax weights), "topp" (dynamic top-p), ...
        options: the router's options (e.g. ``{"top_p": 0.8}``), checked against its declared ranges.
        token_ids: [T] int64 token ids, for routers that route by them (``hash``).
        token_mask: [T] bool, True = real token: routers whose routing depends on the batch (``switch``,
            ``expert_choice``) give padding no capacity. None: every token is real.
        training: those routers route per token at inference (``False``): batch size, order and padding do not
            change a token's output.
    Returns:
        Routing with float32 ``gates`` and ``probs`` [T, E] and ``topk_idx`` [T, k].
    """
    r = get_router(router)
    num_experts = logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and the number of experts ({num_experts})")
    return r.route(logits, top_k, options, token_ids, token_mask, training)


def _all_experts(logits: torch.Tensor) -> torch.Tensor:
    num_experts = logits.shape[-1]
    return torch.arange(num_experts, device=logits.device).expand(*logits.shape[:-1], num_experts)


def route_soft(logits: torch.Tensor, top_k: int, **_: float) -> Routing:
    """Soft router: ``gates = probs = softmax(float32(logits))``, every expert (``top_k`` unused)."""
    probs = torch.softmax(logits.float(), dim=-1)
    return Routing(gates=probs, probs=probs, topk_idx=_all_experts(logits))


def route_topk(logits: torch.Tensor, top_k: int, **_: float) -> Routing:
    """MoLA router: softmax, top-k, renormalise (see the module doc)."""
    probs = torch.softmax(logits.float(), dim=-1)
    if top_k == logits.shape[-1]:
        # Renormalising all E weights gives back the softmax; skip the top-k and the scatter.
        return Routing(gates=probs, probs=probs, topk_idx=_all_experts(logits))
    vals, idx = torch.topk(probs, top_k, dim=-1)
    weights = vals / vals.sum(dim=-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(-1, idx, weights)
    return Routing(gates=gates, probs=probs, topk_idx=idx)


def route_noisy_topk(logits: torch.Tensor, top_k: int, noise_std: float = 0.5, expert_dropout: float = 0.0,
                     training: bool = False, **_: float) -> Routing:
    """Noisy top-k with expert dropout: MoLA's router with exploration in training (noisy top-k gating, Shazeer et
    al. 2017, with a fixed noise scale; expert dropout as in gating dropout, Liu et al. 2022)::

        z          = float32(logits) + noise_std * N(0, 1)           # [T, E], logit units; a draw per token, expert
        u          ~ U[0, 1)                                          # [T, E]
        dropped    = u < expert_dropout, except each token's k experts of largest u (k always remain)
        z[dropped] = -inf                                             # probability 0: never chosen, no gradient
        Routing    = route_topk(z)                                    # softmax, top-k, renormalise

    In training only (``training=True``); at inference it is exactly :func:`route_topk` of the logits, so merged
    and decoded models route as the plain ``topk`` router would. The probabilities it returns (what the load
    loss and the statistics see) are those of the perturbed logits. The backward is :func:`topk_logits_grad`:
    the noise is additive, so d loss / d logits = d loss / d z (0 for dropped experts)."""
    if not training or (noise_std == 0 and expert_dropout == 0):
        return route_topk(logits, top_k)
    z = logits.float()
    if noise_std:
        z = z + noise_std * torch.randn_like(z)
    if expert_dropout:
        u = torch.rand_like(z)
        kth = torch.topk(u, top_k, dim=-1).values[:, -1:]
        z = z.masked_fill((u < expert_dropout) & (u < kth), float("-inf"))
    return route_topk(z, top_k)


def route_topp(logits: torch.Tensor, top_k: int, top_p: float = 0.75, **_: float) -> Routing:
    """Dynamic top-p router (Huang et al. 2024, "Harder Tasks Need More Experts"; MoE-PEFT's dynamic MixLoRA)::

        p          = softmax(float32(logits))                       # [T, E]
        sorted     = p sorted descending
        selected   = the shortest prefix of ``sorted`` whose mass reaches top_p (the expert that crosses top_p is
                     in it), and at most top_k experts
        gates      = p on the selected experts, 0 elsewhere         # not renormalised, as the paper

    ``topk_idx`` [T, top_k] lists the selected experts in order; a token with fewer than ``top_k`` repeats its
    first expert in the unused slots (a set, so the statistics count each selection once).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    vals, order = torch.sort(probs, dim=-1, descending=True)
    vals, order = vals[..., :top_k], order[..., :top_k]
    before = vals.cumsum(-1) - vals                                  # mass of the experts ranked above
    keep = before < top_p                                            # the first always stays (before = 0)
    idx = torch.where(keep, order, order[..., :1])
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, idx, True)
    gates = torch.where(mask, probs, torch.zeros_like(probs))
    return Routing(gates=gates, probs=probs, topk_idx=idx)


def topp_logits_grad(dgates: Optional[torch.Tensor], dprobs: Optional[torch.Tensor], probs: torch.Tensor,
                     idx: torch.Tensor, top_k: int) -> torch.Tensor:
    """d loss / d logits [T, E] (fp32) of :func:`route_topp`: gates = p on the (fixed) selection, so both
    gradients go through the softmax, the gates' only on the selected experts."""
    dp = torch.zeros_like(probs) if dprobs is None else dprobs.clone()
    if dgates is not None:
        mask = torch.zeros_like(probs).scatter(-1, idx, 1.0)
        dp = dp + dgates * mask
    return _softmax_backward(dp, probs)


def route_switch(logits: torch.Tensor, top_k: int, capacity_factor: float = 1.25,
                 token_mask: Optional[torch.Tensor] = None, training: bool = True, **_: float) -> Routing:
    """Switch router (Fedus et al. 2021)::

        p        = softmax(float32(logits))                  # [T, E]
        e_t      = argmax_e p[t, e]                          # one expert per token
        training:
          T_real   = number of real tokens (token_mask; padding takes no place in any queue)
          capacity = ceil(capacity_factor * T_real / E)
          kept_t   = real_t and (number of real tokens s <= t with e_s = e_t) <= capacity   # earlier tokens first
        inference (``training=False``): kept_t = 1, dropless, so a token's output depends on it alone
        gates    = p[t, e_t] on kept tokens, 0 elsewhere     # a dropped token skips the adapter (delta 0)

    ``topk_idx`` [T, 1] is e_t for every token, dropped or not: the load loss counts what the router asked for, as
    Switch's does. ``top_k`` must be 1.
    """
    if top_k != 1:
        raise ValueError(f"the switch router sends each token to one expert: top_k={top_k} must be 1")
    probs = torch.softmax(logits.float(), dim=-1)
    tokens, num_experts = probs.shape[-2], probs.shape[-1]
    idx = probs.argmax(dim=-1, keepdim=True)                        # [T, 1]
    onehot = torch.zeros_like(probs).scatter(-1, idx, 1.0)
    if not training:
        return Routing(gates=probs * onehot, probs=probs, topk_idx=idx)
    if token_mask is None:
        counted, capacity = onehot, math.ceil(capacity_factor * tokens / num_experts)
    else:
        real = token_mask.reshape(-1).to(device=probs.device, dtype=probs.dtype)
        counted = onehot * real[:, None]
        capacity = torch.ceil(capacity_factor * real.sum(dtype=torch.float64) / num_experts)
    position = (counted.cumsum(dim=-2) * counted).sum(-1)            # 1-based place in its expert's queue, 0: padding
    kept = ((position > 0) & (position <= capacity)).to(probs.dtype)
    gates = probs * onehot * kept[..., None]
    return Routing(gates=gates, probs=probs, topk_idx=idx)


def expert_choice_eval_k(capacity_factor: float, num_experts: int) -> int:
    """Experts per token of the expert-choice router at inference: round(capacity_factor) (half up), in [1, E]."""
    return max(1, min(num_experts, math.floor(capacity_factor + 0.5)))


def route_expert_choice(logits: torch.Tensor, top_k: int, capacity_factor: float = 2.0,
                        token_mask: Optional[torch.Tensor] = None, training: bool = True, **_: float) -> Routing:
    """Expert-choice router (Zhou et al. 2022): the experts pick the tokens::

        p        = softmax(float32(logits))                       # [T, E]
        training:
          C        = min(T_real, ceil(capacity_factor * T_real / E))   # tokens per expert (capacity_factor: experts
                                                                  #   per token on average); T_real: real tokens
          chosen   = for each expert e, the C real tokens with the largest p[:, e]  (ties: the earlier token;
                     padding is never chosen)
        inference (``training=False``): each token takes its k = :func:`expert_choice_eval_k` most probable experts
                   (the experts a token gets on average in training, chosen without looking at the other tokens)
        gates    = p on the chosen (token, expert) pairs, 0 elsewhere   # a token may get 0 .. E experts

    Perfectly balanced in training by construction (no load loss). ``top_k`` is not used. Causal-LM caveat: in
    training a token's experts depend on the other tokens of the micro-batch, later positions and other rows
    included, which a left-to-right decoder does not have; inference therefore routes per token, as above, and
    so differs from the training routing. ``topk_idx`` lists every expert (as the soft router: statistics report
    the gate mass).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    tokens, num_experts = probs.shape[-2], probs.shape[-1]
    idx = torch.arange(num_experts, device=logits.device).expand(*logits.shape[:-1], num_experts)
    if not training:
        vals, top = torch.topk(probs, expert_choice_eval_k(capacity_factor, num_experts), dim=-1)
        return Routing(gates=torch.zeros_like(probs).scatter(-1, top, vals), probs=probs, topk_idx=idx)
    score = probs
    real = tokens
    if token_mask is not None:
        mask = token_mask.reshape(-1).to(probs.device)
        real = int(mask.sum())                                      # host sync: capacity sets a shape
        score = probs.masked_fill(~mask[:, None], -1.0)             # below every probability: never chosen
    cap = min(real, math.ceil(capacity_factor * real / num_experts))
    if cap == 0:
        return Routing(gates=torch.zeros_like(probs), probs=probs, topk_idx=idx)
    # [E, C] token indices; a stable sort breaks ties (the same token id twice in layer 0) by the earlier token, so
    # padding anywhere does not change which of two equal tokens an expert takes
    chosen = torch.sort(score.transpose(-1, -2), dim=-1, descending=True, stable=True).indices[..., :cap]
    mask = torch.zeros_like(probs.transpose(-1, -2)).scatter(-1, chosen, 1.0).transpose(-1, -2)
    gates = probs * mask
    return Routing(gates=gates, probs=probs, topk_idx=idx)


#: Knuth's multiplicative hash constant (2^32 / golden ratio): consecutive ids spread over the experts
_HASH_MULT = 2654435761


def hash_experts(token_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The fixed expert of each token id: ``((id * 2654435761) mod 2^32) mod E`` (int64, same shape)."""
    return ((token_ids.long() * _HASH_MULT) % (2 ** 32)) % num_experts


def route_hash(logits: torch.Tensor, top_k: int, token_ids: Optional[torch.Tensor] = None, **_: float) -> Routing:
    """Hash router (Roller et al. 2021, "Hash Layers For Large Sparse Models"): token t goes to expert
    :func:`hash_experts` (id_t) with weight 1. The logits only feed ``probs`` (statistics); nothing depends on them,
    so the router weights get a zero gradient. ``top_k`` must be 1."""
    if top_k != 1:
        raise ValueError(f"the hash router sends each token to one expert: top_k={top_k} must be 1")
    probs = torch.softmax(logits.float(), dim=-1)
    ids = token_ids.reshape(-1).to(logits.device)
    if ids.shape[0] != probs.shape[0]:
        raise ValueError(f"hash router: {ids.shape[0]} token ids for {probs.shape[0]} tokens")
    idx = hash_experts(ids, probs.shape[-1])[:, None]
    gates = torch.zeros_like(probs).scatter(-1, idx, 1.0)
    return Routing(gates=gates, probs=probs, topk_idx=idx)


def hash_logits_grad(dgates, dprobs, probs: torch.Tensor, idx, top_k: int) -> torch.Tensor:
    """d loss / d logits of :func:`route_hash`: the gates do not depend on the logits; only ``probs`` does (the
    statistics' softmax), so its gradient passes and the gates' does not."""
    return _softmax_backward(dprobs, probs)


def switch_logits_grad(dgates: Optional[torch.Tensor], dprobs: Optional[torch.Tensor], probs: torch.Tensor,
                       idx: torch.Tensor, top_k: int, gates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """d loss / d logits [T, E] (fp32) of :func:`route_switch` and :func:`route_expert_choice`: gates = p on the
    kept (token, expert) pairs (``gates != 0``), so the gates' gradient passes there only, then through the
    softmax."""
    dp = torch.zeros_like(probs) if dprobs is None else dprobs.clone()
    if dgates is not None:
        dp = dp + dgates * (gates != 0).to(dgates.dtype)
    return _softmax_backward(dp, probs)


def _softmax_backward(dp: Optional[torch.Tensor], probs: torch.Tensor) -> torch.Tensor:
    if dp is None:
        return torch.zeros_like(probs)
    return probs * (dp - (dp * probs).sum(-1, keepdim=True))


def soft_logits_grad(dgates: Optional[torch.Tensor], dprobs: Optional[torch.Tensor], probs: torch.Tensor,
                     idx: torch.Tensor, top_k: int) -> torch.Tensor:
    """d loss / d logits [T, E] (fp32) when the gates are the softmax: both gradients go through it."""
    if dgates is None:
        dp = dprobs
    elif dprobs is None:
        dp = dgates
    else:
        dp = dgates + dprobs
    return _softmax_backward(dp, probs)


def topk_logits_grad(dgates: Optional[torch.Tensor], dprobs: Optional[torch.Tensor], probs: torch.Tensor,
                     idx: torch.Tensor, top_k: int) -> torch.Tensor:
    """d loss / d logits [T, E] (fp32) of :func:`route_topk`: the renormalisation's Jacobian on the chosen
    experts, then the softmax's."""
    if top_k >= probs.shape[-1]:
        return soft_logits_grad(dgates, dprobs, probs, idx, top_k)
    dp = torch.zeros_like(probs) if dprobs is None else dprobs.clone()
    if dgates is not None:
        dw = dgates.gather(1, idx)
        vals = probs.gather(1, idx)
        ssum = vals.sum(-1, keepdim=True)
        w = vals / ssum
        dvals = (dw - (dw * w).sum(-1, keepdim=True)) / ssum
        dp.scatter_add_(1, idx, dvals)
    return _softmax_backward(dp, probs)


def routing_stats(routing: Routing, token_mask: Optional[torch.Tensor] = None) -> RouterStats:
    """Statistics of one module's routing, over the tokens where ``token_mask`` is true.

    Args:
        routing: the result of :func:`route` for T tokens.
        token_mask: [T] bool/int (True/1 = real token) or None (all tokens count).
    """
    probs, gates, idx = routing.probs, routing.gates, routing.topk_idx
    num_experts = probs.shape[-1]
    if token_mask is None:
        w = None
        n_tokens = torch.tensor(float(probs.shape[0]), device=probs.device)
    else:
        w = token_mask.reshape(-1).to(probs.dtype)
        n_tokens = w.sum()
    prob_sum = (probs if w is None else probs * w[:, None]).sum(0)
    with torch.no_grad():
        one_hot = torch.zeros_like(probs).scatter(1, idx, 1.0)
        ent = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
        if w is not None:
            one_hot = one_hot * w[:, None]
            ent = ent * w
            g = gates.detach() * w[:, None]
        else:
            g = gates.detach()
        counts = one_hot.sum(0)
        gate_sum = g.sum(0)
        entropy_sum = ent.sum()
        none = (gates.detach() == 0).all(-1).to(probs.dtype)           # [T] 1 where no expert took the token
        dropped = (none if w is None else none * w).sum()
    assert counts.shape[-1] == num_experts
    return RouterStats(prob_sum=prob_sum, counts=counts, gate_sum=gate_sum, entropy_sum=entropy_sum, n_tokens=n_tokens,
                       dropped=dropped)


def merge_stats(stats: Sequence[RouterStats]) -> RouterStats:
    """Sum the statistics of several modules (or micro-batches) that share E experts.

    Equal to the statistics of their token-concatenated routing, as the MoLA aux loss takes it.
    """
    if not stats:
        raise ValueError("merge_stats needs at least one RouterStats")
    sizes = {s.num_experts for s in stats}
    if len(sizes) != 1:
        raise ValueError(f"cannot merge router statistics of different expert counts: {sorted(sizes)}")
    return RouterStats(
        prob_sum=torch.stack([s.prob_sum for s in stats]).sum(0),
        counts=torch.stack([s.counts for s in stats]).sum(0),
        gate_sum=torch.stack([s.gate_sum for s in stats]).sum(0),
        entropy_sum=torch.stack([s.entropy_sum for s in stats]).sum(),
        n_tokens=torch.stack([s.n_tokens for s in stats]).sum(),
        dropped=torch.stack([s.dropped for s in stats]).sum(),
    )


def load_balancing_loss(stats: Sequence[RouterStats], top_k: int) -> torch.Tensor:
    """MoLA auxiliary load-balancing loss of one decoder layer.

    The routers of all MoLoRA modules of the layer are taken together (their tokens concatenated):
    ``f_e`` = fraction of the top-k selections that went to expert e (no gradient), ``P̄_e`` = mean
    softmax probability of e, and ``aux = E * sum_e f_e * P̄_e``. Uniform routing gives 1.0.

    Args:
        stats: the RouterStats of the modules of one layer (same E).
        top_k: the layer's top-k.
    Returns:
        A float32 scalar with gradient through ``prob_sum``.
    """
    merged = merge_stats(stats)
    n = merged.n_tokens.clamp_min(1.0)
    f = merged.counts / (n * top_k)
    p_mean = merged.prob_sum / n
    return merged.num_experts * (f * p_mean).sum()
