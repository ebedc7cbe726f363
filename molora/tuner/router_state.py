"""Router statistics of a forward pass, the MoLA auxiliary loss and how its gradient reaches the routers.

Each MoLoRA module records the :class:`molora_kernels.RouterStats` of its call in the :class:`ForwardRecord` of
the current forward pass (a new record starts at every top-level model forward). The aux loss of a decoder
layer takes all MoLoRA modules of that layer together (their tokens concatenated), as the original MoLA code:

    aux = sum over layers l with E_l > k_l of  E_l * sum_e f_e * P̄_e     (E_l <= k_l: a constant, left out)
    f_e = (top-k selections of e) / (k_l * tokens)      (no gradient)
    P̄_e = (sum of softmax probabilities of e) / tokens

Its gradient reaches the routers through :class:`AuxLossGrad`, an identity on each module's output delta
whose backward adds ``coef * dAux/dprob_sum`` to the module's ``prob_sum``. The layer's ``f_e`` is only known
after every module of the layer has run, which is the case by the time backward runs. Injecting the gradient
this way (instead of adding a differentiable term to the loss) keeps it correct under reentrant gradient
checkpointing, where the first forward runs without autograd and the recomputation happens inside backward.
The loss a model returns includes ``coef * aux`` as a value (for logging and for the total the optimiser sees).

Whatever scales the returned loss after the forward -- ``loss / gradient_accumulation_steps``, fp16 loss
scaling (``GradScaler``, DeepSpeed), ``loss * 7`` -- must scale the injected gradient too, or an fp16 run
would see its aux gradient divided by the loss scale. The model therefore passes its loss through
:class:`LossGradProbe`, whose backward runs first (it is the root of the graph) and records
``d(final objective) / d(loss)`` in the forward's :class:`ForwardRecord`; :class:`AuxLossGrad` multiplies its
gradient by it (and by ``ForwardRecord.grad_multiplier``, set by trainers whose task loss is already
normalised over a whole step). When the returned loss is not used (a custom loss on the logits), the factor
is 1.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from molora_kernels import RouterStats
from molora_kernels.routing import merge_stats


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a checkpointed layer being recomputed). False while
    torch.compile traces: a traced forward is never a recomputation (compiled checkpointing recomputes inside
    the compiled backward graph, which runs no Python forward)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def load_loss_applies(num_experts: int, top_k: int, fixed_k: bool = True) -> bool:
    """Whether the load-balancing loss can move a group's routing: more than one expert and, for a router that gives
    every token exactly ``top_k`` experts, more experts than ``top_k``. With E <= k every token takes every expert,
    f_e = 1/k for all e and the group's term E * sum_e f_e * P̄_e is the constant E / k: it carries no gradient (the
    P̄_e sum to 1) and would only add a per-allocation constant to the logged aux loss and to the loss (30 for a
    30-layer LoRA-shaped adapter with E = 1)."""
    return num_experts > 1 and (num_experts > top_k or not fixed_k)


@dataclass
class LayerEntry:
    num_experts: int
    top_k: int
    stats: list[RouterStats] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    #: every token has exactly top_k experts (False: a dynamic router, e.g. top-p)
    fixed_k: bool = True
    #: the group's router trains with the MoLA load-balancing loss (False: e.g. the soft router)
    aux: bool = True
    #: the router selects top-k experts (False: it weights every expert; telemetry then reports the gate mass)
    selects_top_k: bool = True

    @property
    def balances(self) -> bool:
        """The load-balancing loss can move this group's routing (:func:`load_loss_applies`)."""
        return load_loss_applies(self.num_experts, self.top_k, self.fixed_k)

    def selection_fraction(self, m: RouterStats) -> torch.Tensor:
        """f_e: the fraction of the group's expert selections that went to e ([E], sums to 1; no gradient).
        ``counts / (tokens * k)`` for fixed-k routers (MoLA), ``counts / total selections`` for dynamic ones."""
        if self.fixed_k:
            return m.counts / (m.n_tokens.clamp_min(1.0) * self.top_k)
        return m.counts / m.counts.sum().clamp_min(1.0)


class ForwardRecord:
    """Router statistics of one forward pass, grouped by router group: the layer index (None: a model without
    numbered layers), or ``"3.attn"`` / ``"3.mlp"`` when a layer's attention and MLP projections have separate
    expert counts (each kind then is its own aux-loss group)."""

    def __init__(self) -> None:
        self.layers: dict[Any, LayerEntry] = {}
        #: d(objective)/d(returned loss), recorded by LossGradProbe in backward (None: loss not used)
        self.loss_grad: Optional[torch.Tensor] = None
        #: d(objective)/d(outputs.aux_loss) / aux_loss_coef, recorded when a trainer weights ``outputs.aux_loss``
        #: itself (TRL; see :mod:`molora.tuner.aux_output`); None: not used
        self.aux_out_grad: Optional[torch.Tensor] = None
        #: extra factor on the injected aux gradient (e.g. 1 / gradient-accumulation steps)
        self.grad_multiplier: float = 1.0
        #: detached values of router regularisers already weighted (the top-p router's entropy term)
        self.regularizers: list[torch.Tensor] = []

    def regularizer(self) -> Optional[torch.Tensor]:
        """Sum of the weighted router regularisers of this forward (float32 scalar), or None."""
        if not self.regularizers:
            return None
        return torch.stack([r.float() for r in self.regularizers]).sum()

    def aux_grad_scale(self) -> torch.Tensor | float:
        """The factor on the injected aux gradient: ``(loss_grad + aux_out_grad) * grad_multiplier``, i.e.
        ``d objective / d (coef * aux)`` through every output that carries the aux term (the returned loss, the
        ``aux_loss`` output). When neither output reached the objective (a custom loss on the logits) it is
        ``grad_multiplier``: the aux term then counts as if added to the objective with weight ``coef``."""
        parts = [g for g in (self.loss_grad, self.aux_out_grad) if g is not None]
        if not parts:
            return self.grad_multiplier
        total = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        return total * self.grad_multiplier

    def record(self, layer: Any, module: str, stats: RouterStats, num_experts: int, top_k: int,
               fixed_k: bool = True, aux: bool = True, selects_top_k: bool = True) -> None:
        entry = self.layers.get(layer)
        if entry is None:
            entry = self.layers[layer] = LayerEntry(num_experts=num_experts, top_k=top_k, fixed_k=fixed_k, aux=aux,
                                                    selects_top_k=selects_top_k)
        entry.stats.append(stats)
        entry.modules.append(module)

    def merged(self, layer: Any) -> RouterStats:
        return merge_stats(self.layers[layer].stats)

    def aux_loss(self, differentiable: bool = False) -> Optional[torch.Tensor]:
        """Sum over layers of the MoLA aux loss (float32 scalar) or None when nothing was recorded. Only groups whose
        router trains with the load-balancing loss and has a choice to balance count (:attr:`LayerEntry.balances`:
        a layer with one expert, or with E <= top_k, adds nothing), so the value is comparable across allocations;
        with none such it is 0 (a LoRA-shaped adapter). With only routers that have no load-balancing loss
        (``soft``) the soft router's value is reported (it is constant: 1 per layer at any routing) and never
        added to the loss by the tuner.

        ``differentiable=True`` keeps the graph through ``prob_sum`` (for direct use as a loss term when no
        gradient checkpointing is involved); the default returns a detached value.
        """
        if not self.layers:
            return None
        total = None
        with_load_loss = any(entry.aux for entry in self.layers.values())
        for entry in self.layers.values():
            if with_load_loss and not (entry.aux and entry.balances):
                continue
            m = merge_stats(entry.stats)
            n = m.n_tokens.clamp_min(1.0)
            f = entry.selection_fraction(m)
            p = m.prob_sum if differentiable else m.prob_sum.detach()
            term = entry.num_experts * (f * (p / n)).sum()
            total = term if total is None else total + term
        if total is None:  # routers with a load loss, none with a choice to balance
            device = next(iter(self.layers.values())).stats[0].prob_sum.device
            total = torch.zeros((), dtype=torch.float32, device=device)
        return total

    def has_aux(self) -> bool:
        """Some group's router trains with the load-balancing loss and has a choice to balance (the loss is then
        added to the model's loss)."""
        return any(entry.aux and entry.balances for entry in self.layers.values())

    def aux_grad(self, layer: Any) -> torch.Tensor:
        """d aux / d prob_sum of any module of ``layer``: ``E * f_e / n`` ([E] float32)."""
        entry = self.layers[layer]
        m = merge_stats(entry.stats)
        n = m.n_tokens.clamp_min(1.0)
        return entry.num_experts * entry.selection_fraction(m) / n


class RouterCollector:
    """Owned by a MoLoRA model; its modules record into :attr:`current` during a forward pass.

    ``token_mask`` ([batch, seq] bool, True = real token) is set from the model's ``attention_mask`` at the start
    of each forward so that padding is excluded from the statistics (``aux_loss_mode="masked"``).
    """

    def __init__(self) -> None:
        self.current = ForwardRecord()
        self.token_mask: Optional[torch.Tensor] = None
        #: the forward's input_ids [batch, seq] (routers that route by token id read them)
        self.token_ids: Optional[torch.Tensor] = None
        #: what the user asked for: None (default) records in every forward but pure inference, True in every forward,
        #: False in none (``MoLoRAModel.record_router_stats``)
        self.mode: Optional[bool] = None
        #: whether the current forward records (set by :meth:`start_forward` from ``mode`` and the model's mode)
        self.enabled = True

    def start_forward(self, attention_mask: Optional[torch.Tensor], input_ids: Optional[torch.Tensor] = None,
                      training: bool = True) -> None:
        if in_backward():  # a checkpointed recomputation, not a new forward
            return
        self.enabled = training if self.mode is None else self.mode
        self.current = ForwardRecord()
        self.token_mask = None if attention_mask is None or attention_mask.dim() != 2 else attention_mask.bool()
        self.token_ids = input_ids if input_ids is not None and input_ids.dim() == 2 else None

    def ids_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The token ids of x's positions [batch, seq] (x: [batch, seq, d]), or None when they cannot be matched."""
        ids = self.token_ids
        if ids is None or x.dim() != 3 or ids.shape != x.shape[:2]:
            return None
        return ids.to(x.device)

    def mask_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The token mask matching x's leading dims [batch, seq], or None when it cannot be matched."""
        m = self.token_mask
        if m is None or x.dim() != 3 or m.shape[0] != x.shape[0] or m.device != x.device:
            return None
        if m.shape[1] == x.shape[1]:
            return m
        if m.shape[1] > x.shape[1]:  # generation with a KV cache: the mask covers past + new positions
            return m[:, -x.shape[1]:]
        return None


class AuxLossGrad(torch.autograd.Function):
    """Identity on ``delta``; in backward adds ``coef * d aux / d prob_sum`` to the router's ``prob_sum``."""

    @staticmethod
    def forward(ctx, delta, prob_sum, record: ForwardRecord, layer: Optional[int], coef: float):
        ctx.record, ctx.layer, ctx.coef = record, layer, coef
        return delta.view_as(delta)

    @staticmethod
    def backward(ctx, grad_delta):
        g = ctx.record.aux_grad(ctx.layer) * (ctx.coef * ctx.record.aux_grad_scale())
        return grad_delta, g, None, None, None


def mean_entropy(probs: torch.Tensor, weights: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
    """``mean_t H(probs_t)`` over tokens with weight 1 (probs [T, E], weights [T]); float32, no gradient unless
    ``differentiable`` (then autograd's gradient equals the one :class:`RegularizerGrad` injects)."""
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        p = probs.float()
        h = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
        return (h * weights).sum() / weights.sum().clamp_min(1.0)


def mean_z(logits: torch.Tensor, weights: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
    """``mean_t logsumexp(logits_t)^2`` over tokens with weight 1 (the Switch router z-loss); no gradient unless
    ``differentiable``."""
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        z = torch.logsumexp(logits.float(), dim=-1) ** 2
        return (z * weights).sum() / weights.sum().clamp_min(1.0)


def _entropy_grad(probs: torch.Tensor) -> torch.Tensor:
    p = probs.detach().float()
    return -(torch.log(p.clamp_min(1e-30)) + 1.0)                      # d H / d p, per token


def _z_grad(logits: torch.Tensor) -> torch.Tensor:
    lf = logits.detach().float()
    return 2.0 * torch.logsumexp(lf, -1, keepdim=True) * torch.softmax(lf, -1)   # d lse^2 / d logits


class RegularizerGrad(torch.autograd.Function):
    """Identity on ``delta``; in backward adds the gradient of ``coef * mean_t R(t_t)`` (over the real tokens,
    ``weights`` [T] of 1/0) to ``t`` [T, E], scaled like the aux gradient (see :class:`AuxLossGrad`), for a router
    regulariser R: ``"entropy"`` (t = probs; the top-p router's dynamic-routing term, Huang et al. 2024) or ``"z"``
    (t = router logits; the Switch z-loss ``logsumexp^2``, Fedus et al. 2021)."""

    GRADS = {"entropy": _entropy_grad, "z": _z_grad}

    @staticmethod
    def forward(ctx, delta, t, weights, record: ForwardRecord, coef: float, kind: str):
        ctx.save_for_backward(t, weights)
        ctx.record, ctx.coef, ctx.kind = record, coef, kind
        return delta.view_as(delta)

    @staticmethod
    def backward(ctx, grad_delta):
        t, weights = ctx.saved_tensors
        n = weights.sum().clamp_min(1.0)
        g = RegularizerGrad.GRADS[ctx.kind](t) * (weights[:, None] / n) * (ctx.coef * ctx.record.aux_grad_scale())
        return grad_delta, g.to(t.dtype), None, None, None, None


class LossGradProbe(torch.autograd.Function):
    """Identity on the model's (scalar) loss; in backward stores the incoming gradient in the record.

    The returned loss is the last node the model's forward creates, so its backward runs before any
    module's: every :class:`AuxLossGrad` of that forward sees the factor.
    """

    @staticmethod
    def forward(ctx, loss, record: ForwardRecord):
        ctx.record = record
        return loss.clone()  # a view would forbid in-place ops on the loss (the Trainer does `loss *= n`)

    @staticmethod
    def backward(ctx, grad_loss):
        ctx.record.loss_grad = grad_loss.detach().float()
        return grad_loss, None


def summarize(record: ForwardRecord) -> dict[Optional[int], dict[str, object]]:
    """Per-layer telemetry of one forward: load (fraction of routed weight per expert), entropy, imbalance.

    load: [E] list, fraction of the top-k selections (topk router) per expert, sums to 1.
    entropy: mean router entropy per token in nats; entropy_norm: divided by log(E) (1 = uniform router).
    imbalance: max load / mean load (1 = perfectly balanced).
    dropped: fraction of the tokens that no expert computed (capacity routers: Switch, expert choice; else 0).
    """
    out = {}
    for layer, entry in record.layers.items():
        m = merge_stats(entry.stats)
        n = float(m.n_tokens.clamp_min(1.0))
        total = float(m.counts.sum()) or 1.0
        load = (m.counts / total).tolist()
        e = entry.num_experts
        ent = float(m.entropy_sum) / n
        out[layer] = {
            "num_experts": e,
            "selects_top_k": entry.selects_top_k,
            "top_k": entry.top_k,
            "tokens": n,
            "load": load,
            "gate_load": (m.gate_sum / max(float(m.gate_sum.sum()), 1e-12)).tolist(),
            "entropy": ent,
            "entropy_norm": ent / float(torch.log(torch.tensor(float(e)))) if e > 1 else 1.0,
            "imbalance": max(load) * e if e > 0 else 1.0,
            "dropped": float(m.dropped) / n,
        }
    return out
