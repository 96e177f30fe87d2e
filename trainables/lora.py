"""LoRA specifics as pure functions: alpha rules, target presets, parameter counts, and attaching.

What can carry a LoRA (`linear_layers`): every nn.Linear / GPT-2 Conv1D except the output head,
and on mixture-of-experts models (transformers 5) the experts' fused 3-D weights and the router's
weight, which PEFT adapts as `target_parameters` (one LoRA per expert: A is r*E x in, B is
out x r*E). Presets select by the layer's *place*, not its name:

- attention-qv: the attention block's query and value (or its fused q/k/v) projection;
- attention: every linear layer of the attention block;
- mlp: the MLP / feed-forward block's linear layers (gate/up/down, c_fc + mlp.c_proj, fc1/fc2,
  dense_h_to_4h/dense_4h_to_h) and, on MoE models, the experts' weights (not the router);
- experts: the experts' weights only (MoE models);
- all-linear: everything above plus the router - what PEFT's own `all-linear` adapts on MoE models
  (PEFT 0.21 on transformers 5), including its rule that the fused `gate_up_proj` gets rank 2r and
  alpha 2*alpha (gate and up each keep rank r, as when they were separate layers).

Explicit names follow PEFT's rule: a name selects every layer equal to it or ending in `.name`.
Either way the selection is handed to PEFT as the shortest dotted suffixes that select exactly
those layers (`attn.c_proj` on GPT-2, so the MLP's `c_proj` is not hit); expert and router weights
are written `param:<suffix>` in the list and go to LoraConfig.target_parameters.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Mapping, Optional, Sequence, Union

# the preset names, the `param:` prefix of expert / router weights and PEFT's fused-weight rule:
# defined once with the schema (the analysis side reads them too); split_targets re-exported
from lora_rank_search.contract.config import FUSED_PARAMS, PARAM_PREFIX, fused_patterns, split_targets  # noqa: F401
from lora_rank_search.contract.config import TARGET_PRESETS as PRESETS

RSLORA_ALPHA = 16.0  # lora_alpha used with the 'rslora' rule: scale = 16 / sqrt(r)

_OUTPUT_HEADS = {"lm_head", "embed_out", "output", "score", "classifier"}
_Q = {"q_proj", "query", "q", "wq", "q_lin"}
_V = {"v_proj", "value", "v", "wv", "v_lin"}
_FUSED_QKV = {"qkv_proj", "c_attn", "query_key_value", "Wqkv", "W_pack", "qkv"}
_ATTENTION = re.compile(r"attn|attention", re.I)
_MLP = re.compile(r"mlp|feed_?forward|ffn|moe|expert", re.I)


class TargetError(ValueError):
    """target_modules names something the model does not have."""


class Layers(dict):
    """`linear_layers`' answer: full name -> (in, out) of every nn.Linear/Conv1D (a plain dict for
    callers that only want those), plus what presets and PEFT need to know about the rest.

    Attributes:
        params: expert / router weights PEFT adapts as parameters: full parameter name ->
            (in, out, experts, index among its module's parameters).
        place: full name (module or parameter) -> 'attention' | 'mlp' | 'experts' | 'router' | 'other'.
        modules, param_names: every module / parameter name of the model (what a suffix could hit).
        renamed: linear layers PEFT cannot target on this model: PEFT 0.21 on transformers 5
            rewrites a target ending in these names (e.g. `gate_proj` on Qwen-MoE models) into the
            experts' fused weights, so a dense or shared-expert layer of that name is never adapted.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params: dict = {}
        self.place: dict = {}
        self.modules: frozenset = frozenset()
        self.param_names: frozenset = frozenset()
        self.renamed: dict = {}
        self.model_type: str = ""


def lora_alpha(rule: Union[float, str], r: int) -> tuple[float, bool]:
    """(lora_alpha, use_rslora) for an alpha rule at rank r.

    'r' gives scale alpha/r = 1, '2r' gives scale 2 (the same effective step size at every rank,
    so early stopping compares ranks fairly); 'rslora' gives alpha 16 with PEFT's alpha/sqrt(r) scaling; a
    number is used as is (PEFT's default behaviour: the scale shrinks as r grows).
    """
    if rule == "r":
        return float(r), False
    if rule == "2r":
        return 2.0 * r, False
    if rule == "rslora":
        return RSLORA_ALPHA, True
    return float(rule), False


def alpha_label(rule: Union[float, str]) -> str:
    """The alpha rule as reports show it: '16' for a fixed alpha, else the rule's name."""
    return f"{rule:g}" if isinstance(rule, (int, float)) else str(rule)


def lora_scale(rule: Union[float, str], r: int) -> float:
    """The factor PEFT multiplies B·A by: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    alpha, rs = lora_alpha(rule, r)
    return alpha / (math.sqrt(r) if rs else r)


def _peft_renames(model_type: str) -> set:
    """Target names PEFT rewrites into expert parameters on this model type (see `Layers.renamed`)."""
    try:
        from peft.utils.transformers_weight_conversion import (
            _MODEL_TO_CONVERSION_PATTERN,
            _MOE_TARGET_MODULE_MAPPING,
            get_checkpoint_conversion_mapping,
        )
    except ImportError:  # pragma: no cover - an older PEFT, or the private module moved
        return set()
    if get_checkpoint_conversion_mapping(model_type) is None:  # PEFT converts nothing on this model type
        return set()
    return set(_MOE_TARGET_MODULE_MAPPING.get(_MODEL_TO_CONVERSION_PATTERN.get(model_type, ""), {}))


def _place_of(name: str, classes: Mapping[str, str]) -> str:
    """'attention' or 'mlp' from the names and classes of a layer's enclosing modules, else 'other'."""
    parts = name.split(".")
    ancestors = [".".join(parts[:i]) for i in range(1, len(parts))]
    words = [(a.rsplit(".", 1)[-1], classes.get(a, "")) for a in ancestors]
    if any(_ATTENTION.search(attr) or "Attention" in cls for attr, cls in words):
        return "attention"
    if any(_MLP.search(attr) or re.search(r"MLP|FeedForward|Moe|MoE|Expert", cls) for attr, cls in words):
        return "mlp"
    return "other"


def linear_layers(model) -> Layers:
    """Every layer a LoRA can sit on (meta device is fine); see `Layers`.

    The dict holds torch Linear (including bitsandbytes Linear4bit/Linear8bitLt, which subclass it)
    and GPT-2 style Conv1D: full name -> (in, out). Output heads (lm_head, ...) are excluded: LoRA
    is not put there. Expert weights (3-D parameters) and routers go to `.params`.
    """
    import torch

    modules = dict(model.named_modules())
    classes = {name: type(m).__name__ for name, m in modules.items()}
    out = Layers()
    out.model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    moe_blocks = set()
    for name, module in modules.items():
        own = list(module.named_parameters(recurse=False))
        experts = [(i, p_name, p) for i, (p_name, p) in enumerate(own) if p.dim() == 3]
        for index, p_name, p in experts:  # (experts, out, in) as PEFT's ParamWrapper reads it
            full = f"{name}.{p_name}"
            out.params[full] = (int(p.shape[2]), int(p.shape[1]), int(p.shape[0]), index)
            out.place[full] = "experts"
        if experts and "." in name:
            moe_blocks.add(name.rsplit(".", 1)[0])
    for name, module in modules.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _OUTPUT_HEADS or not name:
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if isinstance(module, torch.nn.Linear):
            out[name] = (int(module.in_features), int(module.out_features))
        elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            weight = module.weight  # Conv1D stores (in, out)
            out[name] = (int(weight.shape[0]), int(weight.shape[1]))
        elif parent in moe_blocks and not any(p.dim() == 3 for p in module.parameters(recurse=False)):
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.nn.Parameter) and weight.dim() == 2:  # the router (E x hidden)
                index = [n for n, _ in module.named_parameters(recurse=False)].index("weight")
                out.params[f"{name}.weight"] = (int(weight.shape[1]), int(weight.shape[0]), 1, index)
                out.place[f"{name}.weight"] = "router"
            continue
        else:
            continue
        out.place[name] = "router" if parent in moe_blocks else _place_of(name, classes)
    out.modules = frozenset(modules)
    out.param_names = frozenset(n for n, _ in model.named_parameters(remove_duplicate=False))
    renames = _peft_renames(out.model_type) if out.params else set()
    out.renamed = {n: n.rsplit(".", 1)[-1] for n in out if n.rsplit(".", 1)[-1] in renames}
    return out


def _as_layers(layer_names: Iterable[str]) -> Layers:
    """A Layers view of bare names (pure-function callers and tests): places from the names only."""
    if isinstance(layer_names, Layers):
        return layer_names
    layers = Layers({n: (0, 0) for n in layer_names})
    layers.place = {n: _place_of(n, {}) for n in layers}
    layers.modules = frozenset(layers)
    return layers


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _matches(name: str, suffix: str) -> bool:
    """PEFT's rule for target_modules / target_parameters lists."""
    return name == suffix or name.endswith("." + suffix)


def _shortest_suffixes(chosen: set, universe: Iterable[str]) -> list[str]:
    """The shortest dotted suffixes that, by PEFT's rule, select every chosen name and nothing else."""
    universe = list(universe)
    verdict: dict[str, bool] = {}
    out = set()
    for name in chosen:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if suffix not in verdict:
                verdict[suffix] = all(u in chosen for u in universe if _matches(u, suffix))
            if verdict[suffix]:
                out.add(suffix)
                break
    return sorted(out)


def _preset(spec: str, layers: Layers) -> set:
    place = layers.place
    attention = {n for n in layers if place.get(n) == "attention"}
    experts = {n for n in layers.params if place.get(n) == "experts"}
    if spec == "all-linear":
        return set(layers) | set(layers.params)
    if spec == "attention":
        return attention
    if spec == "attention-qv":
        chosen = {n for n in attention if _leaf(n) in _Q | _V}
        return chosen or {n for n in attention if _leaf(n) in _FUSED_QKV}
    if spec == "mlp":
        return {n for n in layers if place.get(n) == "mlp"} | experts
    if spec == "experts":
        return experts
    raise TargetError(f"unknown target preset {spec!r}; presets are: {', '.join(PRESETS)}")


def _known(layers: Layers) -> str:
    leaves = sorted({_leaf(n) for n in layers})
    params = sorted({".".join(n.split(".")[-2:]) for n in layers.params})
    return ", ".join(leaves) + (f"; weights adapted as parameters: {', '.join(params)}" if params else "")


def resolve_targets(spec: Union[str, Sequence[str]], layer_names: Iterable[str]) -> list[str]:
    """Resolve a preset or explicit list to the sorted targets PEFT should be given (see the module doc).

    `layer_names` is `linear_layers(model)` (or bare layer names). Raises TargetError (listing the
    model's layers) when nothing matches, or when a name is one PEFT cannot target on this model.
    """
    layers = _as_layers(layer_names)
    renamed = set(layers.renamed)
    if isinstance(spec, str):
        chosen = _preset(spec, layers) - renamed
        if not chosen:
            raise TargetError(f"preset {spec!r} matches no layer of this model; its linear layers are: {_known(layers)}")
    else:
        chosen, missing = set(), []
        routers = {n.rsplit(".", 1)[0]: n for n in layers.params}  # `gate` names the router module: adapt its weight
        for s in spec:
            hit = {n for n in list(layers) + list(layers.params) if _matches(n, s)}
            hit |= {p for m, p in routers.items() if _matches(m, s)}
            if not hit:
                missing.append(s)
            elif hit & renamed:
                raise TargetError(
                    f"{s!r} selects {', '.join(sorted(hit & renamed)[:3])}, which PEFT cannot adapt on a "
                    f"{layers.model_type} model: it rewrites targets named {', '.join(sorted(set(layers.renamed.values())))} "
                    f"into the experts' weights; use the 'experts' preset for those")
            chosen |= hit
        if missing:
            raise TargetError(f"{', '.join(repr(m) for m in missing)} not found; the model's linear layers are: {_known(layers)}")
    modules = _shortest_suffixes({n for n in chosen if n in layers}, layers.modules or layers)
    params = _shortest_suffixes({n for n in chosen if n in layers.params}, layers.param_names or layers.params)
    return modules + [PARAM_PREFIX + p for p in params]


def targeted_layers(shapes: Mapping[str, tuple[int, int]], targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """The linear layers (modules) of `linear_layers` output that a resolved target list selects."""
    modules, _ = split_targets(targets)  # PEFT's rule: a layer matches a target equal to its name or a dotted suffix of it
    return {n: s for n, s in shapes.items() if any(_matches(n, t) for t in modules)}


def targeted_params(shapes: Mapping[str, tuple[int, int]], targets: Sequence[str]) -> dict[str, tuple]:
    """The expert / router weights a resolved target list selects: name -> (in, out, experts, index)."""
    _, params = split_targets(targets)
    return {n: s for n, s in getattr(shapes, "params", {}).items() if any(_matches(n, t) for t in params)}


def param_rank(name: str, r: int) -> int:
    """The rank PEFT gives a targeted parameter: 2r on a fused gate_up_proj (FUSED_PARAMS), else r."""
    return r * FUSED_PARAMS.get(_leaf(name), 1)


def lora_param_count(shapes: Mapping[str, tuple[int, int]], targets: Sequence[str], r: int) -> int:
    """Trainable LoRA parameters: r*(in+out) per targeted linear layer (A is r x in, B is out x r),
    plus r'*E*(in+out) per targeted expert weight (E experts, r' = param_rank) and r*(in+out) per router."""
    linear = sum(r * (i + o) for i, o in targeted_layers(shapes, targets).values())
    params = sum(param_rank(n, r) * e * (i + o) for n, (i, o, e, _) in targeted_params(shapes, targets).items())
    return linear + params


def dropout_problems(targets: Sequence[str], dropout: Union[float, Sequence[float]]) -> list[str]:
    """PEFT cannot put dropout on parameter targets (experts, routers): name the clash, or []
    (`lora.dropout` may be a list searched over: every value must then be 0)."""
    _, params = split_targets(targets)
    if params and any(dropout if isinstance(dropout, (list, tuple)) else [dropout]):
        return [f"lora.dropout: must be 0 when the targets include MoE expert or router weights "
                f"({', '.join(params)}): PEFT applies no dropout to target_parameters, got {dropout!r}"]
    return []


def peft_config(r: int, rule: Union[float, str], dropout: float, targets: Sequence[str]):
    """The peft.LoraConfig a trial uses: module targets as target_modules, `param:` ones as
    target_parameters, fused expert weights at rank 2r and alpha 2*alpha (PEFT's own rule)."""
    from peft import LoraConfig

    problems = dropout_problems(targets, dropout)
    if problems:
        raise ValueError(problems[0])
    alpha, rs = lora_alpha(rule, r)
    modules, params = split_targets(targets)
    fused = fused_patterns(params)
    return LoraConfig(
        r=int(r),
        lora_alpha=alpha,
        use_rslora=rs,
        lora_dropout=float(dropout),
        target_modules=list(modules) or None,
        target_parameters=list(params) or None,
        rank_pattern={k: int(r) * m for k, m in fused.items()},
        alpha_pattern={k: alpha * m for k, m in fused.items()},
        bias="none",
        task_type="CAUSAL_LM",
    )


def rank_problems(ranks: Sequence[int], shapes: Mapping[str, tuple[int, int]], targets: Sequence[str]) -> tuple[list[str], list[str]]:
    """(refusals, warnings) for ranks the targeted layers cannot use.

    A rank-r update B·A of a layer with `in` inputs and `out` outputs has rank at most
    min(in, out): a larger r adds parameters and no capacity. Ranks above that bound on *every*
    targeted layer are refused (naming the largest meaningful rank); ranks above it on some
    layers are warned about.
    """
    layers = targeted_layers(shapes, targets)
    if not layers:
        return [], []
    bounds = {name: min(i, o) for name, (i, o) in layers.items()}
    largest, smallest = max(bounds.values()), min(bounds.values())
    refused, warned = [], []
    for index, r in enumerate(ranks):
        if r > largest:
            refused.append(
                f"lora.ranks[{index}]: rank {r} is larger than the targeted layers allow; the largest meaningful rank is "
                f"{largest} (min(in, out) of the widest targeted layer; targets {', '.join(targets)})"
            )
        elif r > smallest:
            narrow = sorted({_leaf(n) for n, b in bounds.items() if b < r})
            warned.append(
                f"lora.ranks[{index}]: rank {r} exceeds min(in, out) = {smallest} of {', '.join(narrow)}: there it adds "
                "parameters but no capacity"
            )
    return refused, warned
