"""Mixture-of-experts models: routed experts as one 4-bit linear (and optional LoRA pair) per expert.

transformers 5 holds a layer's routed experts as two fused 3-D parameters, ``experts.gate_up_proj``
[E, 2I, H] and ``experts.down_proj`` [E, H, I] (Llama 4: transposed, [E, H, 2I] and [E, I, H]), and
publishes checkpoints per expert (``mlp.experts.N.gate_proj/up_proj/down_proj.weight``; Mixtral's
``block_sparse_moe.experts.N.w1/w3/w2.weight``). Here:

* :func:`split_experts` swaps each fused experts module for :class:`QLoRAExperts`, whose
  ``gate_up_proj`` and ``down_proj`` are ``nn.ModuleList``\\ s of one ``nn.Linear`` per expert
  (``[2I, H]`` and ``[H, I]``, the layout of ``nn.functional.linear``). The model code then treats
  every expert projection as an ordinary block linear: quantized NF4 + DQ exactly as a Linear
  weight (one expert's bytes are ``quantize_4bit`` of its 2-D slice), LoRA per expert, saved and
  merged like the others. The routing (router, top-k, weights) stays the family's own code: only
  the experts module is replaced, with the same forward signature.
* :class:`ExpertSource` presents a checkpoint of either layout under those per-expert names:
  a fused tensor is read once and handed out one expert slice at a time, per-expert gate and up
  weights are concatenated as soon as both were read.
* routers and gates (``gate``, ``router``, ``shared_expert_gate``) are never quantized nor adapted;
  shared experts are plain MLPs and are treated as such; a vision-language checkpoint's vision
  tower and projector stay as loaded (:func:`outside_language_model`).
"""
from __future__ import annotations

import inspect
import re

import torch
import torch.nn as nn

from .errors import QLoraError

PROJS = ("gate_up_proj", "down_proj")
TRANSPOSED = ("Llama4TextExperts",)  # fused [E, in, out] and a dense forward over every expert
ROUTERS = ("gate", "router", "shared_expert_gate")  # last name component of routing linears
_NOT_LANGUAGE = re.compile(r"(^|\.)(vision_tower|vision_model|visual|vision_encoder|multi_modal_projector|"
                           r"mm_projector|audio_tower|audio_model|embed_vision|embed_audio)(\.|$)")
_EXPERT_LINEAR = re.compile(r"(^|\.)experts\.(gate_up_proj|down_proj)\.\d+$")
# per-expert checkpoint names: <experts>.<N>.<part>.weight (Mixtral: block_sparse_moe. and w1/w3/w2)
_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def is_router(name: str, module: nn.Module) -> bool:
    """A routing linear (kept 16-bit, never adapted): Llama 4's ``router`` is an ``nn.Linear``,
    Qwen2-MoE's ``shared_expert_gate`` too."""
    return name.rsplit(".", 1)[-1] in ROUTERS or type(module).__name__.endswith("Router")


def outside_language_model(name: str) -> bool:
    """A module of a vision-language model's vision/audio tower or projector (left as loaded)."""
    return bool(_NOT_LANGUAGE.search(name))


def target_kind(name: str) -> str:
    """What ``--target`` calls a block linear: ``experts.gate_up_proj`` / ``experts.down_proj`` for a
    routed expert's projection, else the module's last name component (``q_proj``)."""
    m = _EXPERT_LINEAR.search(name)
    return f"experts.{m.group(2)}" if m else name.rsplit(".", 1)[-1]


def is_expert_linear(name: str) -> bool:
    return bool(_EXPERT_LINEAR.search(name))


# ---------------------------------------------------------------------------------------------
# the module


class QLoRAExperts(nn.Module):
    """A layer's routed experts, one linear per expert and projection (``QLoRALinear`` once built).

    ``forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`` as transformers' fused
    experts: tokens are grouped by expert (one sort), and each *active* expert runs its gate_up and
    down linears once on its tokens, so the cost follows the active parameters. Llama 4's dense form
    ``forward(routed_in [E*T, H])`` (each expert's rows pre-scaled by its sigmoid score, exactly zero
    where the token is not routed to it) runs each expert on its non-zero rows only: a zero row's
    output is exactly zero (no biases, act(0) * 0 = 0), so skipping it changes nothing."""

    def __init__(self, num_experts: int, hidden: int, inter: int, act_fn, dense: bool = False,
                 device: torch.device | str | None = "meta", dtype: torch.dtype | None = None):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden, inter
        self.act_fn, self.dense = act_fn, dense
        kw = dict(bias=False, device=device, dtype=dtype)  # skip_init: the weights are filled from the source
        self.gate_up_proj = nn.ModuleList(nn.utils.skip_init(nn.Linear, hidden, 2 * inter, **kw)
                                          for _ in range(num_experts))
        self.down_proj = nn.ModuleList(nn.utils.skip_init(nn.Linear, inter, hidden, **kw) for _ in range(num_experts))

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj[e](x).chunk(2, dim=-1)
        return self.down_proj[e](self.act_fn(gate) * up)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None) -> torch.Tensor:
        if self.dense:
            return self._dense(hidden_states)
        out = torch.zeros_like(hidden_states)
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = flat.argsort(stable=True)
        # one host sync per layer for the group sizes; index num_experts (expert-parallel padding) is skipped
        counts = torch.bincount(flat, minlength=self.num_experts + 1).tolist()
        tokens, weights = order // k, top_k_weights.reshape(-1)[order]
        start = 0
        for e, c in enumerate(counts[:self.num_experts]):
            if c:
                idx = tokens[start:start + c]
                y = self._expert(e, hidden_states[idx]) * weights[start:start + c, None]
                out.index_add_(0, idx, y.to(out.dtype))
            start += c
        return out

    def _dense(self, routed_in: torch.Tensor) -> torch.Tensor:
        x = routed_in.view(self.num_experts, -1, self.hidden_dim)
        out = torch.zeros_like(x)
        live = (x != 0).any(-1)  # [E, T]: rows routed to each expert
        for e in range(self.num_experts):
            rows = live[e].nonzero().squeeze(-1)
            if rows.numel():
                out[e].index_copy_(0, rows, self._expert(e, x[e, rows]).to(out.dtype))
        return out.view(-1, self.hidden_dim)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_dim}, inter={self.intermediate_dim}, "
                f"dense={self.dense}")


def fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    """transformers' fused experts modules of ``model`` by name (3-D ``gate_up_proj`` and ``down_proj``)."""
    out = {}
    for n, m in model.named_modules():
        gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
        if isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == 3:
            out[n] = m
    return out


def _replacement(name: str, mod: nn.Module) -> QLoRAExperts:
    """The :class:`QLoRAExperts` for one fused module (its weights copied per expert unless on meta)."""
    cls = type(mod).__name__
    transposed = cls in TRANSPOSED
    routed = "top_k_index" in inspect.signature(mod.forward).parameters  # follows the decorator's __wrapped__
    biased = getattr(mod, "has_bias", False) or getattr(mod, "gate_up_proj_bias", None) is not None
    if biased or not (routed or transposed):
        raise QLoraError(f"{name}: the experts of {cls} (biases or their own routing layout) are not supported: "
                         "see docs/moe.md for the supported families")
    gu = mod.gate_up_proj
    e = gu.shape[0]
    hidden, two_i = (gu.shape[1], gu.shape[2]) if transposed else (gu.shape[2], gu.shape[1])
    new = QLoRAExperts(e, hidden, two_i // 2, mod.act_fn, dense=transposed, device=gu.device, dtype=gu.dtype)
    if not gu.is_meta:
        with torch.no_grad():
            for i in range(e):
                for proj in PROJS:
                    w = getattr(mod, proj)[i]
                    getattr(new, proj)[i].weight.copy_(w.t() if transposed else w)
    return new


def split_experts(model: nn.Module) -> nn.Module:
    """Swap, in place, every fused experts module for a :class:`QLoRAExperts` (see the module doc)."""
    for name, mod in fused_experts(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, _replacement(name, mod))
    return model


def expert_layout(model: nn.Module) -> dict[str, tuple[int, bool]]:
    """{experts module name: (number of experts, transposed fused layout)} of a split model."""
    return {n: (m.num_experts, m.dense) for n, m in model.named_modules() if isinstance(m, QLoRAExperts)}


# ---------------------------------------------------------------------------------------------
# reading checkpoints of either layout


class ExpertSource:
    """A :class:`qlora.sources.Source` seen through per-expert names: ``<experts>.gate_up_proj.<N>.weight``
    [2I, H] and ``<experts>.down_proj.<N>.weight`` [H, I], whether the files hold fused 3-D tensors or
    one tensor per expert and projection; other names pass through. One fused tensor (one layer's
    experts of one projection, as stored) is held while its slices are handed out."""

    def __init__(self, source, layout: dict[str, tuple[int, bool]]):
        self.__dict__["_src"] = source
        self._layout = layout
        self._map: dict[str, tuple] = {}  # our name -> how to make it
        self._held: tuple[str, torch.Tensor] | None = None
        self._names: list[str] | None = None

    def __getattr__(self, attr):  # config, path, kind, nbytes, tokenizers...: the wrapped source's
        return getattr(self.__dict__["_src"], attr)

    def __setattr__(self, attr, value):
        if attr == "progress":
            setattr(self._src, attr, value)
        else:
            self.__dict__[attr] = value

    @staticmethod
    def _experts_name(prefix: str) -> str:
        return prefix.replace(".block_sparse_moe.", ".mlp.")

    def names(self) -> list[str]:
        if self._names is not None:
            return self._names
        out, halves = [], {}
        for name in self._src.names():
            base, _, proj = name.rpartition(".")
            m = _PER_EXPERT.match(name)
            if base in self._layout and proj in PROJS:  # fused [E, ...]
                n, transposed = self._layout[base]
                for e in range(n):
                    ours = f"{base}.{proj}.{e}.weight"
                    self._map[ours] = ("fused", name, e, transposed, e == n - 1)
                    out.append(ours)
            elif m and self._experts_name(m.group(1)) in self._layout:
                base, e, part = self._experts_name(m.group(1)), int(m.group(2)), _PART[m.group(3)]
                if part == "down":
                    ours = f"{base}.down_proj.{e}.weight"
                    self._map[ours] = ("one", name)
                    out.append(ours)
                    continue
                got = halves.setdefault((base, e), {})
                got[part] = name
                if len(got) == 2:  # gate and up both read: the fused [2I, H] slice is ready
                    ours = f"{base}.gate_up_proj.{e}.weight"
                    self._map[ours] = ("pair", got["gate"], got["up"])
                    out.append(ours)
                    del halves[(base, e)]
            elif ".block_sparse_moe." in name:  # Mixtral's published name of the MoE block (router included)
                ours = self._experts_name(name)
                self._map[ours] = ("one", name)
                out.append(ours)
            else:
                out.append(name)
        if halves:
            (base, e), got = next(iter(halves.items()))
            raise QLoraError(f"{self._src.path}: expert {e} of {base} has {', '.join(got.values())} "
                             "but not its other half (gate and up projections come in pairs)")
        self._names = out
        return out

    def get(self, name: str) -> torch.Tensor:
        self.names()
        how = self._map.get(name)
        if how is None:
            return self._src.get(name)
        if how[0] == "one":
            return self._src.get(how[1])
        if how[0] == "pair":
            return torch.cat([self._src.get(how[1]), self._src.get(how[2])], dim=0)
        _, src_name, e, transposed, last = how
        if self._held is None or self._held[0] != src_name:
            t = self._src.get(src_name)
            if t.dim() != 3:
                raise QLoraError(f"{self._src.path}: {src_name} should be a 3-D experts tensor, it is {list(t.shape)}")
            self._held = (src_name, t)
        t = self._held[1][e]
        if last:
            self._held = None
        return (t.t() if transposed else t).contiguous()

    def quantized(self, name: str):
        self.names()
        if name in self._map or not hasattr(self._src, "quantized"):
            return None
        return self._src.quantized(name)


def wrap_source(source, model: nn.Module):
    """``source`` seen through per-expert names when ``model`` (split) has routed experts, else itself."""
    layout = expert_layout(model)
    return ExpertSource(source, layout) if layout else source


_OURS = re.compile(r"^(.*)\.(gate_up_proj|down_proj)\.(\d+)\.weight$")


def fuse_experts(items, layout: dict[str, tuple[int, bool]]):
    """A stream of ``(name, tensor)`` with per-expert weights (:class:`ExpertSource`'s names) turned back
    into transformers' fused 3-D parameters (``<experts>.gate_up_proj`` [E, 2I, H], Llama 4 transposed),
    each yielded once its last expert arrives: a merged MoE model that ``from_pretrained`` loads."""
    held: dict = {}
    for name, t in items:
        m = _OURS.match(name)
        if m is None or m.group(1) not in layout:
            yield name, t
            continue
        base, proj, e = m.group(1), m.group(2), int(m.group(3))
        n, transposed = layout[base]
        got = held.setdefault((base, proj), {})
        got[e] = t.t() if transposed else t
        if len(got) == n:
            del held[(base, proj)]
            yield f"{base}.{proj}", torch.stack([got[i] for i in range(n)])


# ---------------------------------------------------------------------------------------------
# adapters in peft's layout (peft >= 0.17 ``target_parameters``: lora.ParamWrapper on a 3-D parameter)
#
# peft keeps one LoRA pair per targeted 3-D parameter [E, out, in]: ``lora_A`` [r*E, in] (expert e's A is rows
# e*r..e*r+r) and ``lora_B`` [out, r*E] (expert e's B is columns e, e+E, e+2E... : reshape(out, r, E)[..., e]),
# delta[e] = scaling * B_e @ A_e. Two targeted parameters of one module nest: the first registered
# (gate_up_proj) is wrapped first, so its keys are ``<experts>.base_layer.lora_A.weight`` and down_proj's are
# ``<experts>.lora_A.weight``. Llama 4's transposed experts are not described by that layout without a
# transposition peft does not make for them (it has no ``is_transposed`` flag): their adapters keep qlora's
# per-expert names.


def _peft_keys(experts: str, projs: list[str]) -> dict[str, str]:
    """{projection: peft module name} for the targeted projections of one experts module (nesting order)."""
    ordered = [p for p in PROJS if p in projs]
    return {p: experts + ".base_layer" * (len(ordered) - 1 - i) for i, p in enumerate(ordered)}


def to_peft_layout(pairs: dict, layout: dict[str, tuple[int, bool]]) -> tuple[dict, list[str]]:
    """qlora's per-expert ``{name: (A, B)}`` -> peft's (``{module: (A, B)}``, ``target_parameters``). Experts
    adapted only in part (never made by qlora: targets name whole projections) or transposed stay per expert."""
    out, grouped = {}, {}
    for name, ab in pairs.items():
        m = _EXPERT_LINEAR.search(name)
        experts = name[:m.start()] + ("." if m.group(1) else "") + "experts" if m else None
        if experts is None or experts not in layout or layout[experts][1]:
            out[name] = ab
            continue
        grouped.setdefault((experts, m.group(2)), {})[int(name.rsplit(".", 1)[1])] = ab
    targets = set()
    for (experts, proj), per in grouped.items():
        n = layout[experts][0]
        if len(per) != n:
            out.update({f"{experts}.{proj}.{e}": ab for e, ab in per.items()})
            continue
        key = _peft_keys(experts, [p for p in PROJS if (experts, p) in grouped])[proj]
        a = torch.cat([per[e][0] for e in range(n)], dim=0)
        b = torch.stack([per[e][1] for e in range(n)], dim=-1).reshape(per[0][1].shape[0], -1)
        out[key] = (a, b)
        targets.add(_param_suffix(experts, proj))
    return out, sorted(targets)


def _param_suffix(experts: str, proj: str) -> str:
    """peft's target_parameters entry: the experts' path inside a block (``mlp.experts.gate_up_proj``)."""
    m = re.search(r"\.\d+\.(.+)$", experts)
    return f"{m.group(1) if m else experts}.{proj}"


def from_peft_layout(pairs: dict, target_parameters: list[str] | None, r: int) -> dict:
    """peft's ParamWrapper pairs (see :func:`to_peft_layout`) -> qlora's per-expert ``{name: (A, B)}``."""
    if not target_parameters:
        return pairs
    out, by_experts = {}, {}
    for name, ab in pairs.items():
        experts = name.replace(".base_layer", "")
        projs = [p for p in PROJS if any(f"{experts}.{p}".endswith(t) for t in target_parameters)]
        if not projs:
            out[name] = ab
            continue
        by_experts.setdefault(experts, {})[name] = ab
        by_experts[experts]["__projs__"] = projs
    for experts, got in by_experts.items():
        projs = got.pop("__projs__")
        for proj, key in _peft_keys(experts, projs).items():
            if key not in got:
                raise QLoraError(f"the adapter targets {experts}.{proj} (target_parameters) but has no {key} weights")
            a, b = got[key]
            if a.shape[0] % r or b.shape[1] != a.shape[0]:
                raise QLoraError(f"{key}: A {tuple(a.shape)} and B {tuple(b.shape)} are not r={r} per expert")
            n = a.shape[0] // r
            bs = b.reshape(b.shape[0], r, n)
            for e in range(n):
                out[f"{experts}.{proj}.{e}"] = (a[e * r:(e + 1) * r].contiguous(), bs[..., e].contiguous())
    return out
