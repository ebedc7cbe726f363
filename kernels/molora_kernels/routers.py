"""The router registry: name -> one :class:`Router` that says how to route and what the rest of molora may assume.

Registered here: ``topk`` (MoLA), ``noisy_topk`` (top-k with noise and expert dropout in training), ``soft``
(LoRAMoE), ``topp`` (dynamic top-p), ``switch`` (Switch Transformers),
``expert_choice`` (Zhou et al. 2022), ``hash`` (Roller et al. 2021; needs the token ids).
Every place that used to compare router names as strings asks the router instead:

* ``route`` / ``logits_grad``: the forward (``logits -> Routing``) and, for backends with a hand-written backward,
  ``d loss / d logits`` from the gradients of the gates and of the softmax (None: the router is autograd-only,
  and only the ``reference`` backend runs it);
* ``selects_top_k``: the router picks ``top_k`` experts per token (``top_k`` must be <= the layer's experts,
  telemetry counts top-k selections); False: every expert is weighted (telemetry reports the gate mass);
* ``aux_loss``: the load-balancing loss the router trains with (``"mola"``: the MoLA loss of
  :func:`molora_kernels.routing.load_balancing_loss`), or None;
* ``backends``: the backends that implement it (``auto`` skips the others; naming one of them is refused with
  this list). The Triton kernels compute "softmax, then top-k renormalised or every expert" (switched by
  :meth:`Router.gates_are_probs`): list ``"triton"`` only for a router of that form.

Pure Python: functions are named as ``"module:function"`` inside ``molora_kernels`` and imported on first use, so
torch-free code (recipe validation) can read the registry by file path. Adding a router is one
:func:`register_router` call (tests register one of their own).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

__all__ = ["Router", "RouterOption", "ROUTERS", "register_router", "get_router", "router_names", "options_for"]

ALL_BACKENDS = ("torch", "reference", "sparse", "triton")
#: load-balancing losses the tuner implements (molora.tuner.router_state)
AUX_LOSSES = ("mola",)


@dataclass(frozen=True)
class RouterOption:
    """A float option of a router (``top_p``, ...), with its default and allowed interval."""

    name: str
    default: float
    low: float
    high: float
    low_open: bool = True      # the interval excludes ``low``
    high_open: bool = False    # the interval excludes ``high``
    doc: str = ""
    #: the option changes the routing itself (passed to ``route_fn``); False: a loss weight the tuner applies
    #: (``z_loss_coef``, ``entropy_coef``), which any backend can run with
    routing: bool = True

    def interval(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def check(self, value, router: str) -> float:
        import math

        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok:
            v = float(value)
            ok = (v > self.low if self.low_open else v >= self.low) and (v < self.high if self.high_open
                                                                          else v <= self.high)
        if not ok:
            raise ValueError(f"router {router!r}: {self.name}={value!r} must be a number in {self.interval()} "
                             f"({self.doc})")
        return float(value)


@dataclass(frozen=True)
class Router:
    name: str
    summary: str
    route_fn: object                       # "module:function" in molora_kernels (or a function):
    #                                        fn(logits [T, E], top_k) -> Routing
    logits_grad_fn: Optional[object]       # same: fn(dgates, dprobs, probs, idx, top_k) -> d logits [T, E] fp32
    selects_top_k: bool
    aux_loss: Optional[str]
    backends: tuple[str, ...] = ALL_BACKENDS
    #: float options passed to ``route_fn`` as keywords (``router_options`` in MoLoRAConfig and recipes)
    options: tuple[RouterOption, ...] = ()
    #: True: every token gets exactly ``top_k`` experts (the MoLA aux loss divides selections by k); False: the
    #: count varies per token (it divides by the mean count instead)
    fixed_k: bool = True
    #: the hand-written backward needs the forward's gates (the selection is not all of ``idx``)
    needs_gates: bool = False
    #: the only top_k the router works with (switch: 1), or None
    required_top_k: Optional[int] = None
    #: routes by the token ids (``token_ids`` [T] int64 passed to ``route_fn``), not by the logits
    needs_token_ids: bool = False
    #: a token's routing depends on the other tokens of the micro-batch (expert capacity): ``route_fn`` also gets
    #: ``token_mask`` ([T] bool or None, True = real token; padding takes no capacity) and ``training`` (at
    #: inference it routes every token on its own, so outputs do not depend on batch size, order or padding)
    batch_dependent: bool = False
    #: draws random numbers in training (``route_fn`` also gets ``training``; at inference it must be
    #: deterministic, so decoding, merging and evaluation see the router's expected routing)
    stochastic: bool = False
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def _resolve(self, spec) -> Callable:
        if callable(spec):  # a function given directly (e.g. a router registered by a test)
            return spec
        fn = self._cache.get(spec)
        if fn is None:
            module, _, attr = spec.partition(":")
            mod = importlib.import_module(module if "." in module and not module.startswith(".")
                                          else f"{__package__ or 'molora_kernels'}.{module}")
            fn = self._cache[spec] = getattr(mod, attr)
        return fn

    def resolve_functions(self) -> "Router":
        """Import ``route_fn`` and ``logits_grad_fn`` now (they are named as strings and imported on first use).
        Called where a router is attached to a layer, outside any ``torch.compile`` trace: inside one, the first
        use would call ``importlib``, which dynamo does not trace (a fresh model compiled with fullgraph=True failed
        in its first backward)."""
        for spec in (self.route_fn, self.logits_grad_fn):
            if spec is not None:
                self._resolve(spec)
        return self

    def resolve_options(self, given=None) -> dict:
        """The full, checked options (defaults filled in); ValueError naming an unknown or out-of-range one."""
        given = dict(given or {})
        known = {o.name: o for o in self.options}
        unknown = [k for k in given if k not in known]
        if unknown:
            allowed = ", ".join(f"{o.name} in {o.interval()}" for o in self.options) or "none"
            raise ValueError(f"router {self.name!r} has no option {unknown[0]!r}; its options: {allowed}")
        return {name: o.check(given.get(name, o.default), self.name) for name, o in known.items()}

    def routing_options(self, options=None) -> dict:
        """The options that change the routing (what ``route_fn`` and the backends see); loss weights dropped."""
        names = {o.name for o in self.options if o.routing}
        return {k: v for k, v in (options or {}).items() if k in names}

    def route(self, logits, top_k: int, options=None, token_ids=None, token_mask=None, training: bool = True):
        """``Routing`` of [T, E] logits (float32 inside); ``options`` as :meth:`resolve_options` takes them;
        ``token_ids`` [T] for routers that route by them (refused naming the router when missing); ``token_mask``
        [T] bool (True = real token) and ``training`` for :attr:`batch_dependent` routers (others ignore them)."""
        kw = self.resolve_options(options)
        if self.batch_dependent:
            kw["token_mask"] = token_mask
        if self.batch_dependent or self.stochastic:
            kw["training"] = training
        if self.needs_token_ids:
            if token_ids is None:
                raise ValueError(f"router {self.name!r} routes by token id, but no token ids reached this layer: call "
                                 f"the model with input_ids (inputs_embeds cannot be hashed)")
            kw["token_ids"] = token_ids
        return self._resolve(self.route_fn)(logits, top_k, **kw)

    def logits_grad(self, dgates, dprobs, probs, idx, top_k: int, gates=None):
        """d loss / d logits [T, E] (fp32) for backends with a hand-written backward. ``gates``: the forward's
        gates (any nonzero scale of them), for routers whose selection ``idx`` alone does not tell (``switch``
        drops tokens over capacity)."""
        if self.logits_grad_fn is None:
            raise NotImplementedError(f"router {self.name!r} has no hand-written backward; backends: "
                                      f"{', '.join(self.backends)}")
        fn = self._resolve(self.logits_grad_fn)
        if self.needs_gates:
            return fn(dgates, dprobs, probs, idx, top_k, gates=gates)
        return fn(dgates, dprobs, probs, idx, top_k)

    def gates_are_probs(self, top_k: int, num_experts: int) -> bool:
        """True when the gates equal the softmax (every expert weighted: a soft router, or top-k with k = E)."""
        if self.needs_gates or not self.fixed_k:  # a selection that is not "k of E for every token"
            return False
        return (not self.selects_top_k) or top_k >= num_experts

    def effective_top_k(self, top_k: int, num_experts: int) -> int:
        """Experts each token is computed with (the cost model's k)."""
        return top_k if self.selects_top_k else num_experts


ROUTERS: dict[str, Router] = {}


def register_router(router: Router, replace: bool = False) -> Router:
    """Add a router to the registry (``replace=True`` to overwrite one of the same name)."""
    if router.name in ROUTERS and not replace:
        raise ValueError(f"a router named {router.name!r} is already registered")
    unknown = [b for b in router.backends if b not in ALL_BACKENDS]
    if unknown:
        raise ValueError(f"router {router.name!r}: unknown backends {unknown}; known: {', '.join(ALL_BACKENDS)}")
    if router.logits_grad_fn is None and set(router.backends) - {"reference"}:
        raise ValueError(f"router {router.name!r} has no hand-written backward, so only the 'reference' backend "
                         f"(autograd) can run it; backends={router.backends}")
    if router.aux_loss is not None and router.aux_loss not in AUX_LOSSES:
        raise ValueError(f"router {router.name!r}: aux_loss={router.aux_loss!r}; known: {', '.join(AUX_LOSSES)} or None")
    ROUTERS[router.name] = router
    return router


#: Switch Transformers (Fedus et al., 2021)
CAPACITY_FACTOR = RouterOption("capacity_factor", 1.25, 0.0, 1e6, low_open=True, high_open=False,
                               doc="expert capacity = ceil(capacity_factor x tokens / experts); tokens beyond it "
                                   "skip the adapter")
Z_LOSS_COEF = RouterOption("z_loss_coef", 0.0, 0.0, 1e6, low_open=False, high_open=False,
                           doc="weight of the router z-loss mean(logsumexp(logits)^2) added to the loss (0 disables "
                               "it; the paper uses 0.001)", routing=False)

#: Expert choice (Zhou et al., 2022): the average number of experts per token
EC_CAPACITY = RouterOption("capacity_factor", 2.0, 0.0, 1e6, low_open=True, high_open=False,
                           doc="tokens per expert = ceil(capacity_factor x tokens / experts): experts per token on "
                               "average")

#: "Harder Tasks Need More Experts" (Huang et al., 2024) / MoE-PEFT's dynamic MixLoRA
TOP_P = RouterOption("top_p", 0.75, 0.0, 1.0, low_open=True, high_open=False,
                     doc="probability mass the selected experts must reach")
#: Noisy top-k (Shazeer et al. 2017, a fixed noise scale) and expert dropout (gating dropout, Liu et al. 2022)
NOISE_STD = RouterOption("noise_std", 0.5, 0.0, 1e3, low_open=False, high_open=False,
                         doc="standard deviation of the Gaussian noise added to the router logits in training "
                             "(logit units; 0 disables it)")
EXPERT_DROPOUT = RouterOption("expert_dropout", 0.0, 0.0, 1.0, low_open=False, high_open=True,
                              doc="probability that an expert is hidden from a token's routing in training (the "
                                  "token always keeps top_k experts; 0 disables it)")
ENTROPY_COEF = RouterOption("entropy_coef", 0.0, 0.0, 1e6, low_open=False, high_open=False,
                            doc="weight of the mean router entropy added to the loss (the dynamic-routing "
                                "regulariser; 0 disables it)", routing=False)


def router_names() -> list[str]:
    return list(ROUTERS)


def options_for(names, options=None) -> dict:
    """``{router name: its resolved options}`` for the routers a model uses, from one flat ``options`` dict: each
    router takes the keys it declares. A key no used router declares is refused naming what they accept."""
    routers = [get_router(n) for n in dict.fromkeys(names)]
    options = dict(options or {})
    declared = {o.name for r in routers for o in r.options}
    unknown = [k for k in options if k not in declared]
    if unknown:
        tag = (lambda r: f" ({r.name})") if len(routers) > 1 else (lambda r: "")
        allowed = ", ".join(f"{o.name} in {o.interval()}{tag(r)}" for r in routers for o in r.options) or "none"
        which = ", ".join(repr(r.name) for r in routers)
        raise ValueError(f"router {which} has no option {unknown[0]!r}; its options: {allowed}")
    return {r.name: r.resolve_options({k: v for k, v in options.items() if k in {o.name for o in r.options}})
            for r in routers}


def get_router(name: str) -> Router:
    """The registered router ``name``; ValueError naming the known ones otherwise."""
    router = ROUTERS.get(name) if isinstance(name, str) else None
    if router is None:
        raise ValueError(f"router={name!r} is not a known router; allowed: {', '.join(ROUTERS)}")
    return router


register_router(Router(
    "topk", "MoLA: softmax over the experts, top-k, renormalise the chosen weights (the default)",
    route_fn="routing:route_topk", logits_grad_fn="routing:topk_logits_grad", selects_top_k=True, aux_loss="mola",
    options=(Z_LOSS_COEF,)))
register_router(Router(
    "soft", "LoRAMoE-style dense softmax: every expert, weighted by its probability (no load-balancing loss)",
    route_fn="routing:route_soft", logits_grad_fn="routing:soft_logits_grad", selects_top_k=False, aux_loss=None,
    options=(Z_LOSS_COEF,)))
register_router(Router(
    "topp", "dynamic top-p: experts in order of probability until their mass reaches top_p (at most top_k), "
            "weighted by their probabilities (Huang et al. 2024; MoE-PEFT's dynamic MixLoRA)",
    route_fn="routing:route_topp", logits_grad_fn="routing:topp_logits_grad", selects_top_k=True, aux_loss="mola",
    backends=("torch", "reference"), options=(TOP_P, ENTROPY_COEF), fixed_k=False))
register_router(Router(
    "switch", "Switch Transformers: top-1 weighted by its probability, at most capacity_factor x T / E tokens per "
              "expert in training (later tokens skip the adapter; padding takes no place), dropless at inference, the "
              "load loss (MoLA's with k = 1) and an optional z-loss",
    route_fn="routing:route_switch", logits_grad_fn="routing:switch_logits_grad", selects_top_k=True,
    aux_loss="mola", backends=("torch", "reference"), options=(CAPACITY_FACTOR, Z_LOSS_COEF), needs_gates=True,
    required_top_k=1, batch_dependent=True))
register_router(Router(
    "expert_choice", "expert choice: each expert takes the capacity_factor x T / E tokens it scores highest (tokens "
                     "get 0..E experts; balanced by construction, no load loss; sees the whole micro-batch in "
                     "training, so not causal; at inference each token takes its round(capacity_factor) most "
                     "probable experts)",
    route_fn="routing:route_expert_choice", logits_grad_fn="routing:switch_logits_grad", selects_top_k=False,
    aux_loss=None, backends=("torch", "reference"), options=(EC_CAPACITY,), needs_gates=True, batch_dependent=True))
register_router(Router(
    "hash", "hash layers (Roller et al. 2021): each token id goes to a fixed expert (a multiplicative hash of the id "
            "mod E), weight 1; the router weights are not used (their gradient is zero); top_k must be 1",
    route_fn="routing:route_hash", logits_grad_fn="routing:hash_logits_grad", selects_top_k=True, aux_loss=None,
    backends=("torch", "reference"), required_top_k=1, needs_token_ids=True))
register_router(Router(
    "noisy_topk", "MoLA's top-k with exploration in training: Gaussian noise of noise_std on the logits and each "
                  "expert hidden from a token with probability expert_dropout (top_k always remain); exactly topk "
                  "at inference",
    route_fn="routing:route_noisy_topk", logits_grad_fn="routing:topk_logits_grad", selects_top_k=True,
    aux_loss="mola", backends=("torch", "reference"), options=(NOISE_STD, EXPERT_DROPOUT, Z_LOSS_COEF),
    stochastic=True))
