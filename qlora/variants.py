"""LoRA variants on the 4-bit base: LoftQ and PiSSA initialisation, DoRA's weight norm, and the stored init base.

* **LoftQ** (Li et al., 2023; peft ``init_lora_weights="loftq"``): alternately quantize ``W - B A`` and take the
  top-r SVD of ``W - dequant(Q)``, so ``dequant(Q) + B A ≈ W``. As in peft, ``A = R``, ``B = L`` with no division
  by the LoRA scaling (so the start is exact only at ``alpha = r``; peft's convention, kept for parity).
* **PiSSA** (Meng et al., 2024; peft ``"pissa"``): ``W = V S U^T``, ``A = sqrt(S_r / s) U_r^T``,
  ``B = V_r sqrt(S_r / s)``, base ``W - s B A``, which the run then quantizes (QPiSSA).
  Both follow peft's SVD path exactly (``torch.linalg.svd(full_matrices=False)`` in fp32), so A, B and the
  residual equal peft's for the same weight and rank.
* **DoRA** (Liu et al., 2024; peft ``use_dora=True``): ``y = m / ||W + s B A||_row * (W x + s B A x) + bias``,
  the norm detached from the graph (the paper's section 4.3, as peft does); :func:`dora_norm` computes it over
  blocks of rows so no second full-size fp32 weight exists.

The base of a LoftQ/PiSSA run is not the model's own weights: it is written once to ``OUT/qlora_base.safetensors``
(the packed 4-bit tensors of every adapted layer, exactly as trained on; an SVD is not bit-reproducible across
devices or libraries, so the run keeps the result, not the recipe) and linked into every adapter folder it saves,
where ``load_adapter`` / ``merge`` / ``export`` / ``--resume`` find it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import nf4
from .errors import QLoraError

INITS = ("gaussian", "loftq", "pissa")
BASE_FILE = "qlora_base.safetensors"
_NORM_ROWS = 2048  # rows per block of dora_norm: bounds its fp32 temporary at 2048 x in_features


def low_rank(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's ``_low_rank_decomposition``: ``(L [out, r], R [r, in])`` with ``L R`` the best rank-r approximation."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    return u @ torch.sqrt(torch.diag(s)[:, 0:r]), torch.sqrt(torch.diag(s)[0:r, :]) @ vh


@torch.no_grad()
def loftq(weight: torch.Tensor, r: int, iters: int = 1, blocksize: int = 64, quant_type: str = "nf4",
          double_quant: bool = True):
    """LoftQ of ``weight`` [out, in]: ``(A [r, in], B [out, r], packed, state)``, the base quantized as the run
    stores it (peft quantizes with bitsandbytes NF4, block 64, no double quant: ``double_quant=False`` is theirs)."""
    w = weight.float()
    res = w.clone()
    for i in range(iters):
        packed, state = nf4.quantize_4bit(res, blocksize, quant_type, double_quant)
        res = w - nf4.dequantize_4bit(packed, state, torch.float32)
        lo, ro = low_rank(res, r)
        if i + 1 == iters:
            break
        res = w - torch.mm(lo, ro)
    return ro, lo, packed, state


@torch.no_grad()
def pissa(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA of ``weight`` [out, in]: ``(A, B, residual W - scaling * B A)`` in fp32, peft's ``pissa_init``."""
    w = weight.float()
    v, s, uh = torch.linalg.svd(w, full_matrices=False)
    sr = s[:r] / scaling
    a = torch.diag(torch.sqrt(sr)) @ uh[:r]
    b = v[:, :r] @ torch.diag(torch.sqrt(sr))
    return a, b, w - scaling * b @ a


@torch.no_grad()
def dora_norm(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``||W + scaling * B A||`` of each output row (fp32, no gradient), a block of rows at a time. On a GPU
    the plan is the dequant kernel's pass: dequantize a row block, add ``s B A`` and reduce it in registers."""
    a = a.detach().float()
    b = b.detach().float()
    out = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for i in range(0, w.shape[0], _NORM_ROWS):
        j = min(i + _NORM_ROWS, w.shape[0])
        out[i:j] = torch.linalg.norm(w[i:j].float() + scaling * (b[i:j] @ a), dim=1)
    return out


@torch.no_grad()
def dora_norm_factored(wn2: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       scaling: float) -> torch.Tensor:
    """``||W + s B A||_row`` (fp32, no gradient) without forming ``B A``: ``||W||^2 + 2 s <B, W A^T> +
    s^2 <B, B A A^T>`` per row, with ``wn2 = ||W||^2_row`` (the frozen base's, computed once). Costs one
    ``out x in x r`` product on the ``W`` the forward already has, instead of full-size fp32 temporaries."""
    a32, b32 = a.detach().float(), b.detach().float()
    cross = (b32 * (w @ a.detach().to(w.dtype).t()).float()).sum(1)
    ba2 = ((b32 @ (a32 @ a32.t())) * b32).sum(1)
    return (wn2 + (2 * scaling) * cross + (scaling * scaling) * ba2).clamp_min_(0).sqrt_()


def dora_merge(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, magnitude: torch.Tensor):
    """The merged DoRA weight ``m / ||W + s B A||_row * (W + s B A)`` in fp32 (peft's ``merge_safe``)."""
    merged = w.float() + scaling * (b.float() @ a.float())
    return (magnitude.float() / dora_norm(w, a, b, scaling)).view(-1, 1) * merged


# ------------------------------------------------------------------------------------------------
# the stored base of a LoftQ / PiSSA run


def save_base(model, path: str | os.PathLike) -> Path:
    """Write the base of every adapted layer (packed 4-bit tensors and their state, or the 16-bit weight) to
    ``path`` (safetensors, JSON metadata per layer), atomically."""
    from safetensors.torch import save_file

    from .model import lora_modules
    tensors, meta = {}, {}
    for name, m in lora_modules(model).items():
        for k in m.BASE_TENSORS:
            t = m._raw(k)
            if t is not None and k != "bias":
                t = t.detach().contiguous().cpu()
                tensors[f"{name}.{k}"] = t.clone() if t.numel() <= 256 else t  # code books are shared by layers
        meta[name] = {"quant_type": m.quant_type, **{k: (str(v).split(".")[-1] if k == "dtype" else
                                                      (list(v) if k == "shape" else v)) for k, v in m._meta.items()}}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"layers": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def load_base(model, path: str | os.PathLike) -> list[str]:
    """Put the base stored by :func:`save_base` into ``model``'s layers (on their device); the layer names."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["layers"])
        tensors = load_file(str(path))
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise QLoraError(f"{path}: not a readable qlora init base ({e})") from None
    for name, info in meta.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise QLoraError(f"{path}: layer {name} is not in this model (a base stored for another model)") from None
        dev = m._device()
        if info["quant_type"] is None:
            w = tensors[f"{name}.weight"]
            if tuple(w.shape) != (m.out_features, m.in_features):
                raise QLoraError(f"{path}: {name} has shape {tuple(w.shape)}, the model's layer "
                                 f"{(m.out_features, m.in_features)}")
            m.weight = w.to(dev, m.compute_dtype)
            continue
        if tuple(info["shape"]) != (m.out_features, m.in_features):
            raise QLoraError(f"{path}: {name} has shape {tuple(info['shape'])}, the model's layer "
                             f"{(m.out_features, m.in_features)}")
        get = lambda k: tensors[f"{name}.{k}"].to(dev) if f"{name}.{k}" in tensors else None  # noqa: E731
        if get("weight_packed") is None or get("absmax") is None:
            raise QLoraError(f"{path}: {name} lacks its packed weight or scales (a damaged file)")
        state = nf4.QuantState(quant_type=info["quant_type"], absmax=get("absmax"), code=get("code"),
                               shape=torch.Size(info["shape"]), dtype=getattr(torch, info["dtype"]),
                               blocksize=info["blocksize"], nested_absmax=get("nested_absmax"),
                               nested_code=get("nested_code"), nested_blocksize=info["nested_blocksize"],
                               offset=info["offset"])
        m.weight = None
        m._set_quantized(get("weight_packed"), state)
        m._gemv = None
    return list(meta)


def stored_base(path: str | os.PathLike, name: str) -> torch.Tensor | None:
    """The stored base weight of layer ``name`` in fp32 (None when ``path`` does not hold it): what
    ``merge`` and ``export`` fold the adapter into."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        info = json.loads(f.metadata()["layers"]).get(name)
        if info is None:
            return None
        get = lambda k: f.get_tensor(f"{name}.{k}") if f"{name}.{k}" in f.keys() else None  # noqa: E731
        if info["quant_type"] is None:
            return get("weight").float()
        state = nf4.QuantState(quant_type=info["quant_type"], absmax=get("absmax"), code=get("code"),
                               shape=torch.Size(info["shape"]), dtype=getattr(torch, info["dtype"]),
                               blocksize=info["blocksize"], nested_absmax=get("nested_absmax"),
                               nested_code=get("nested_code"), nested_blocksize=info["nested_blocksize"],
                               offset=info["offset"])
        return nf4.dequantize_4bit(get("weight_packed"), state, torch.float32)


def init_layer(layer, weight: torch.Tensor, init: str, iters: int, quant) -> None:
    """Initialise ``layer`` (a fresh QLoRALinear with an adapter) from the original ``weight`` by LoftQ or
    PiSSA: its A, B and its base (quantized per ``quant``, a QuantSettings) are replaced."""
    if init not in INITS[1:]:
        raise QLoraError(f"unknown LoRA init {init!r}: choose one of {', '.join(INITS)}")
    if init == "loftq" and quant.quant_type is None:
        raise QLoraError("--init loftq needs a 4-bit base (LoftQ corrects the quantization error): use --quant-type nf4")
    if init == "loftq":
        a, b, packed, state = loftq(weight, layer.r, iters, quant.blocksize, quant.quant_type, quant.double_quant)
        layer.weight = None
        layer._set_quantized(packed.to(layer._device()), state.to(layer._device()))
    else:
        a, b, res = pissa(weight, layer.r, layer.scaling)
        if quant.quant_type is None:
            layer.weight = res.to(layer._device(), layer.compute_dtype)
        else:
            packed, state = nf4.quantize_4bit(res, quant.blocksize, quant.quant_type, quant.double_quant)
            layer._set_quantized(packed.to(layer._device()), state.to(layer._device()))
    layer.lora_A.data.copy_(a)
    layer.lora_B.data.copy_(b)
