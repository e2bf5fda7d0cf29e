"""QLoRALinear: a frozen 4-bit (or 16-bit) base weight plus trainable LoRA factors.

    y = x @ dequant(W).T + bias + scaling * dropout(x) @ A.T @ B.T

* ``W`` [out, in] is stored packed (see :mod:`qlora.nf4`) and never receives a gradient;
  the custom autograd function below saves only the packed weight (not a 16-bit copy) and
  dequantizes again in backward to form ``grad_x = grad_y @ dequant(W)``.
* ``A`` [r, in] starts Kaiming-uniform (a = sqrt 5), ``B`` [out, r] starts at zero, so a fresh
  adapter leaves the base model unchanged (PEFT's initialisation).
* ``scaling = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.
* DoRA (``use_dora``, :meth:`init_dora`): a trainable magnitude ``m`` [out] (peft's ``lora_magnitude_vector``)
  rescales each output row: ``y = x W^T + (m/n - 1) xd W^T + (m/n) scaling (xd A^T) B^T + bias`` with
  ``n = ||W + scaling B A||_row`` detached (peft's ``use_dora=True`` forward; ``xd = x`` without dropout).
* Matmuls run in ``compute_dtype`` (bf16 default); LoRA factors are kept in ``lora_dtype``
  (fp32 default, so optimizer updates are not lost to bf16 rounding) and cast for the matmul.
  The output has the input's dtype.

Longer than 500 lines: the layer, its autograd node and the contexts that change its forward (dequant
cache, LoRA casts, keyed dropout) all work on the layer's own fields.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import nf4
from .config import is_int
from .errors import QLoraError
from .settings import switches


def _dequant(packed: torch.Tensor, state: nf4.QuantState, dtype: torch.dtype) -> torch.Tensor:
    if packed.is_cuda:
        try:
            from . import kernels
            if kernels.available(packed.device):
                return kernels.dequantize_4bit(packed, state, dtype)
        except ImportError:
            pass
    return nf4.dequantize_4bit(packed, state, dtype)


_DROPOUT_KEY: list = [None]  # the device key of keyed LoRA dropout while keyed_dropout() is active


class LoraDropout(nn.Dropout):
    """``nn.Dropout`` of a LoRA input; inside :func:`keyed_dropout` its mask is a hash of that context's key,
    this layer's ``salt`` and the element index (``kernels/dropout.py``): a checkpoint's recompute draws the
    same mask without restoring any RNG state, so the training step can be replayed from a CUDA graph."""

    salt = 0  # set by keyed_dropout: this layer's position among the model's LoRA dropouts

    def _key(self, x: torch.Tensor) -> torch.Tensor | None:
        """The active keyed_dropout context's key on x's device, or None (no context, eval, p = 0)."""
        key = _DROPOUT_KEY[0]
        if key is None or not self.training or self.p == 0:
            return None
        return key if key.device == x.device else key.to(x.device)

    def fused_args(self, x: torch.Tensor, a: torch.Tensor) -> tuple | None:
        """``(p, key, salt)`` when the keyed dropout of ``x`` can run inside the LoRA products of ``x`` and the
        factor ``a`` (kernels/lora_dropout.py: 16-bit on a GPU, in a keyed_dropout context, training), else
        None (then this module's forward makes the dropped copy). ``QLORA_FUSED_DROPOUT=0`` turns it off."""
        key = self._key(x) if switches().fused_dropout else None
        if key is None:
            return None
        from .kernels import lora_dropout
        return (self.p, key, self.salt) if lora_dropout.usable(x, a, key) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = self._key(x)
        if key is None:
            return super().forward(x)
        from .kernels import dropout as kd
        return kd.apply(x, self.p, key, self.salt)


def keyed_dropout_usable(device: torch.device) -> bool:
    """Whether keyed dropout runs as a GPU kernel on ``device`` (CUDA and Triton; elsewhere the trainer
    keeps ``nn.Dropout``, whose torch form is cheaper than the hash computed by torch ops)."""
    if torch.device(device).type != "cuda":
        return False
    from . import kernels
    return kernels.available(device)  # CUDA, Triton, compute capability >= 8.0, and not QLORA_KERNELS=0


@contextlib.contextmanager
def keyed_dropout(model: nn.Module, key: torch.Tensor | None):
    """Within this context every :class:`LoraDropout` of ``model`` draws its mask from ``key`` (a one-element
    int64 tensor on the model's device; one value per micro-batch, forward and backward both inside the
    context). ``None``: plain ``nn.Dropout``. Layers are salted by their order in ``model.modules()``."""
    if key is None:
        yield
        return
    for i, m in enumerate(m for m in model.modules() if isinstance(m, LoraDropout)):
        m.salt = i + 1
    with dropout_key_as(key):
        yield


def current_dropout_key() -> torch.Tensor | None:
    """The key of the active :func:`keyed_dropout` context (None outside one)."""
    return _DROPOUT_KEY[0]


@contextlib.contextmanager
def dropout_key_as(key: torch.Tensor | None):
    """Within this context keyed LoRA dropout draws from ``key`` (the layers' salts stay as
    :func:`keyed_dropout` set them): a tiled MLP gives each chunk a key of its own (qlora.tiled)."""
    prev, _DROPOUT_KEY[0] = _DROPOUT_KEY[0], key
    try:
        yield
    finally:
        _DROPOUT_KEY[0] = prev


def dropout_key(seed: int, index: int) -> int:
    """The keyed-dropout key of micro-batch ``index`` of a run seeded ``seed`` (so a resumed run, or a
    CUDA-graph replay of the same micro-batch, draws the same masks)."""
    return ((int(seed) & 0x7FFFFFFF) << 32) | (int(index) & 0xFFFFFFFF)


# Output after apply. The autograd nodes below save what backward needs and return their output *unfilled*; the
# caller (_frozen_matmul_4bit, _qlora_matmul) writes it once apply has returned. A checkpointed block's recompute
# (torch.utils.checkpoint, non-reentrant, early stop on by default) stops as soon as the block's last saved
# tensor is saved again, which happens as apply returns. For a Llama-style block that is the down_proj node:
# with its GEMM after apply, the recompute never runs down_proj's GEMM, dequant and LoRA update, whose output
# backward does not need (a ninth of the block's GEMM work per training step). Anywhere else the caller fills
# the output right away: the same math, the same kernels, in a different place.


class _FrozenMatmul4bit(torch.autograd.Function):
    """y = x @ dequant(W).T with W frozen; saves only the packed weight (no activations). The output comes
    back unfilled: see :func:`_frozen_matmul_4bit`."""

    @staticmethod
    def forward(ctx, x, packed, state_holder):
        ctx.state_holder = state_holder
        ctx.save_for_backward(packed)
        return x.new_empty(*x.shape[:-1], state_holder.out_features)

    @staticmethod
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ _dequant(packed, ctx.state_holder.state, grad_y.dtype)
        return grad_x, None, None


def _frozen_matmul_4bit(x: torch.Tensor, packed: torch.Tensor, holder) -> torch.Tensor:
    """``x @ dequant(W).T``, differentiable in x, W frozen; the GEMM runs after the node is recorded."""
    y = _FrozenMatmul4bit.apply(x, packed, holder)
    with torch.no_grad():
        w = _dequant(packed, holder.state, x.dtype)
        torch.mm(x.reshape(-1, x.shape[-1]), w.t(), out=y.view(-1, y.shape[-1]))
    return y


def _scaled_mm(m1: torch.Tensor, m2: torch.Tensor, s: float) -> torch.Tensor:
    """``s * m1 @ m2`` in one GEMM (the scaling in its epilogue; addmm with beta=0 never reads its
    input, so an uninitialised scalar stands in)."""
    if s == 1.0:
        return m1 @ m2
    return torch.addmm(torch.empty((), device=m1.device, dtype=m1.dtype), m1, m2, beta=0, alpha=s)


class _QLoRAMatmul(torch.autograd.Function):
    """``y = x @ W.T (+ bias) + scaling * (xd @ A.T) @ B.T`` as one autograd node, ``W`` frozen.

    ``W`` is ``weight`` when given (a 16-bit base or a dequant cache), else dequantized from
    ``packed`` in forward and again in backward (never saved). ``xd`` is the LoRA input when LoRA
    dropout is active (None: ``x`` itself). One node instead of the six or so that the same math
    makes in eager autograd, and backward in six kernels: ``gxa = s * g @ B`` and
    ``dB = s * g.T @ xa`` with the scaling in the GEMM epilogue, ``dA = gxa.T @ xd``, and
    ``dx = g @ W + gxa @ A`` as one matmul plus one in-place addmm (an out-of-place addmm first
    copies its input: one device-to-device copy of an output-sized tensor per call). On a GPU whose
    host is slow the per-node and per-launch costs were a third of an 8B step.

    Forward computes only ``xa`` and returns ``(y unfilled, xa)``; :func:`_qlora_matmul` writes ``y``
    after apply returns (see the comment above ``_FrozenMatmul4bit``)."""

    @staticmethod
    def forward(ctx, x, xd, a, b, scaling, weight, bias, packed, holder, drop=None):
        # drop: (p, key, salt) of a keyed LoRA dropout done inside the LoRA products (kernels/lora_dropout.py:
        # the dropped copy of x is never written); xd is then None
        n_in = x.shape[-1]
        x2 = x.reshape(-1, n_in)
        xd2 = x2 if xd is None else xd.reshape(-1, n_in)
        if drop is not None:
            from .kernels import lora_dropout
            xa = lora_dropout.down(x2, a, *drop)
        else:
            xa = xd2 @ a.t()
        ctx.scaling, ctx.holder, ctx.shared, ctx.x_shape = scaling, holder, xd is None and drop is None, x.shape
        ctx.drop = drop
        ctx.save_for_backward(xd2, xa, a, b, weight, packed)
        ctx.mark_non_differentiable(xa)
        # xa's gradient is never used: without this autograd fills a zero tensor of its shape for every
        # call's backward (an allocation and a launch per adapted linear); undefined gradients come as None
        ctx.set_materialize_grads(False)
        return x.new_empty(*x.shape[:-1], b.shape[0]), xa

    @staticmethod
    def backward(ctx, g, _g_xa=None):
        if g is None:  # y took no part in the loss (only possible with materialize_grads off)
            return (None,) * 10
        xd2, xa, a, b, weight, packed = ctx.saved_tensors
        s, drop = ctx.scaling, ctx.drop
        g2 = g.reshape(-1, g.shape[-1])
        need_x, need_xd, need_a, need_b = ctx.needs_input_grad[:4]
        need_xd = need_xd or ((ctx.shared or drop is not None) and need_x)
        gxa = _scaled_mm(g2, b, s) if (need_a or need_xd) else None
        gb = _scaled_mm(g2.t(), xa, s) if need_b else None
        if drop is not None:
            from .kernels import lora_dropout
        ga = None
        if need_a:
            ga = lora_dropout.grad_a(gxa, xd2, *drop) if drop is not None else gxa.t() @ xd2
        gx = gxd = None
        if need_x:
            w = weight if weight is not None else _dequant(packed, ctx.holder.state, g2.dtype)
            gx = g2 @ w
            if ctx.shared:
                gx.addmm_(gxa, a)
            elif drop is not None:
                lora_dropout.grad_x_add_(gx, gxa, a, *drop)
            gx = gx.view(ctx.x_shape)
        if not ctx.shared and drop is None and ctx.needs_input_grad[1]:
            gxd = (gxa @ a).view(ctx.x_shape)
        return gx, gxd, ga, gb, None, None, None, None, None, None


def _qlora_matmul(x, xd, a, b, scaling, weight, bias, packed, holder, drop=None, with_weight=False):
    """``x @ W.T (+ bias) + scaling * (xd @ A.T) @ B.T`` through :class:`_QLoRAMatmul`, its output written
    after the node is recorded (in place: an out-of-place addmm would copy y first). ``with_weight``: return
    ``(y, W)``, the (dequantized) base this call used (DoRA's row norm reuses it instead of dequantizing again)."""
    y, xa = _QLoRAMatmul.apply(x, xd, a, b, scaling, weight, bias, packed, holder, drop)
    # (holder: the layer, or None for a bare product; DoRA's with_weight needs the product and W: neither applies)
    into, take_from = (None, None) if with_weight else getattr(holder, "_outputs", (None, None))
    kept = take_from.get(holder) if take_from is not None else None
    if kept:  # the block's recompute: the output its forward kept (keep_outputs)
        with torch.no_grad():
            return y.copy_(kept.pop(0))
    if getattr(holder, "_output_unused", False) and not with_weight:  # only back-propagated through (output_unused)
        with torch.no_grad():
            return y.zero_()
    with torch.no_grad():
        w = weight if weight is not None else _dequant(packed, holder.state, x.dtype)
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        if bias is not None:
            torch.addmm(bias, x2, w.t(), out=y2)
        else:
            torch.mm(x2, w.t(), out=y2)
        y2.addmm_(xa, b.t(), alpha=scaling)
    if into is not None:
        into.setdefault(holder, []).append(y.detach())
    return (y, w) if with_weight else y


class QLoRALinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` inside a transformer block (see module docstring).

    Build with :meth:`from_linear` / :meth:`from_weight` (quantizes) or :meth:`from_quantized`
    (already packed). ``r = 0`` gives a frozen 4-bit layer without adapter.
    """

    # the frozen base: a packed 4-bit weight with its quantization state, or a 16-bit weight; and a bias
    BASE_TENSORS = ("weight_packed", "weight", "bias", "absmax", "code", "nested_absmax", "nested_code")

    def __init__(self, in_features: int, out_features: int, *, r: int = 16, alpha: float = 16.0,
                 dropout: float = 0.0, use_rslora: bool = False, compute_dtype: torch.dtype = torch.bfloat16,
                 lora_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.disable_adapter = False
        self.quant_type: str | None = None
        self._meta: dict = {}
        self._wcache: torch.Tensor | None = None  # see dequant_cache()
        self._gemv = None  # the CUDA GEMV prepared for one-row inference (see _decode_gemv), or a _NoGemv
        self._wcache_grad = False
        self._lora_c: tuple | None = None  # (A, B) in compute dtype while a lora_cast context is active
        self._lora_c_grad = False  # whether _lora_c was cast with gradients on (else: use it only with them off)
        self._carriers: dict = {}  # name -> (shape, dtype, nbytes) of integer tensors held as bf16 bytes (FSDP2)
        self.lora_magnitude: nn.Parameter | None = None  # DoRA's magnitude (see init_dora)
        self._output_unused = False  # see output_unused()
        self._outputs: tuple[dict | None, dict | None] = (None, None)  # see keep_outputs()
        # Frozen base: either a packed 4-bit weight with its state, or a 16-bit weight (buffers,
        # non-persistent: the base is always re-read from its source, adapters are saved apart).
        for k in self.BASE_TENSORS:
            self.register_buffer(k, None, persistent=False)
        self.set_lora(r, alpha, dropout, use_rslora, lora_dtype, device)

    def set_lora(self, r: int, alpha: float = 16.0, dropout: float = 0.0, use_rslora: bool = False,
                 lora_dtype: torch.dtype = torch.float32, device=None) -> None:
        """(Re)create the adapter: fresh A (Kaiming uniform) and B = 0; r = 0 removes it."""
        if not is_int(r) or r < 0:
            raise QLoraError(f"LoRA rank must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise QLoraError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scaling = (alpha / math.sqrt(r) if use_rslora else alpha / r) if r > 0 else 0.0
        self.lora_dropout = LoraDropout(dropout) if dropout > 0 else nn.Identity()
        if r > 0:
            self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=lora_dtype, device=device))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=lora_dtype, device=device))
            self.reset_lora_parameters()
        else:
            self.lora_A = self.lora_B = None
        self.lora_magnitude = None
        self._dora_wn2 = None  # DoRA: ((device, dtype), squared row norms of the frozen base in fp32), computed lazily

    def init_dora(self) -> None:
        """Turn the adapter into DoRA: magnitude ``m = ||dequant(W) + scaling B A||_row`` (so the output is
        unchanged), computed now from the current base and factors, as peft's ``dora_init``."""
        from .variants import dora_norm
        if self.r == 0:
            raise QLoraError("DoRA needs a LoRA adapter on the layer (rank > 0)")
        w = self.base_weight(torch.float32)
        self.lora_magnitude = nn.Parameter(dora_norm(w, self.lora_A, self.lora_B, self.scaling)
                                           .to(self.lora_A.dtype))

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, quant_type: str | None = "nf4",
                    blocksize: int = 64, double_quant: bool = True, **lora_kwargs) -> "QLoRALinear":
        """Quantize ``weight`` [out, in] (on its device) — or keep it 16-bit when quant_type is None."""
        out_f, in_f = weight.shape
        m = cls(in_f, out_f, device=weight.device, **lora_kwargs)
        if quant_type is None:
            m.weight = weight.detach().to(m.compute_dtype)
        else:
            packed, state = nf4.quantize_4bit(weight.detach(), blocksize, quant_type, double_quant)
            m._set_quantized(packed, state)
        if bias is not None:
            m.bias = bias.detach().to(m.compute_dtype)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "QLoRALinear":
        return cls.from_weight(linear.weight, linear.bias, **kwargs)

    @classmethod
    def from_quantized(cls, packed: torch.Tensor, state: nf4.QuantState, bias: torch.Tensor | None = None,
                       **lora_kwargs) -> "QLoRALinear":
        if len(state.shape) != 2:
            raise QLoraError(f"a quantized linear weight must be 2-D, got shape {tuple(state.shape)}")
        out_f, in_f = state.shape
        m = cls(in_f, out_f, device=packed.device, **lora_kwargs)
        m._set_quantized(packed, state)
        if bias is not None:
            m.bias = bias.detach().to(m.compute_dtype)
        return m

    def _set_quantized(self, packed: torch.Tensor, state: nf4.QuantState) -> None:
        self.weight_packed = packed
        self.absmax, self.code = state.absmax, state.code
        self.nested_absmax, self.nested_code = state.nested_absmax, state.nested_code
        self.quant_type = state.quant_type
        self._meta = dict(shape=state.shape, dtype=state.dtype, blocksize=state.blocksize,
                          nested_blocksize=state.nested_blocksize, offset=state.offset)

    def _raw(self, name: str) -> torch.Tensor | None:
        """Buffer ``name`` in its own dtype and shape (undoing the byte carrier of :meth:`to_carriers`)."""
        t = getattr(self, name)
        c = self._carriers.get(name)
        if t is None or c is None:
            return t
        shape, dtype, nbytes = c
        return t.view(torch.uint8)[:nbytes].view(dtype).view(shape)

    def to_carriers(self) -> None:
        """Hold each integer base tensor (packed 4-bit bytes, 8-bit double-quantized scales) as a flat
        bf16 tensor of the same bytes, registered as a frozen parameter: FSDP2 shards parameters only,
        and before torch 2.13 it cannot hold integer ones. The math reads them back bit for bit."""
        for name in self.BASE_TENSORS:
            t = self._buffers.pop(name, None) if name in self._buffers else getattr(self, name)
            if name in self._parameters:
                continue
            if t is not None and not t.is_floating_point():
                flat = t.contiguous().reshape(-1).view(torch.uint8)
                self._carriers[name] = (tuple(t.shape), t.dtype, flat.numel())
                if flat.numel() % 2:
                    flat = torch.cat([flat, flat.new_zeros(1)])
                t = flat.view(torch.bfloat16)
            elif t is not None and t.numel() <= 256:
                t = t.detach().clone()  # small shared tables (codebooks): one copy per layer
            self.register_parameter(name, None if t is None else nn.Parameter(t, requires_grad=False))

    @property
    def state(self) -> nf4.QuantState | None:
        """The quantization state, rebuilt from the (device-following) buffers."""
        if self.weight_packed is None:
            return None
        return nf4.QuantState(quant_type=self.quant_type, code=self.code, absmax=self._raw("absmax"),
                              nested_absmax=self._raw("nested_absmax"), nested_code=self.nested_code, **self._meta)

    def reset_lora_parameters(self) -> None:
        if self.r > 0:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    # -- math ------------------------------------------------------------------------------

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The frozen base weight [out, in] as a float tensor (dequantized if 4-bit)."""
        dtype = dtype or self.compute_dtype
        if self.weight_packed is None:
            return self.weight.to(dtype)
        return _dequant(self._raw("weight_packed"), self.state, dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32 (zeros without an adapter)."""
        if self.r == 0:
            return torch.zeros(self.out_features, self.in_features, device=self._device())
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def merged_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """dequant(W) + scaling * B @ A, summed in fp32, then cast (with DoRA, each row rescaled by m / norm)."""
        if self.lora_magnitude is not None:
            from .variants import dora_merge
            w = dora_merge(self.base_weight(torch.float32), self.lora_A, self.lora_B, self.scaling, self.lora_magnitude)
            return w.to(dtype)
        return (self.base_weight(torch.float32) + self.delta_weight()).to(dtype)

    def _device(self) -> torch.device:
        t = self.weight_packed if self.weight_packed is not None else self.weight
        return t.device

    def _lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B in the compute dtype: cast once per pass for the whole model when a lora_cast
        context is active, else here."""
        if self._lora_c is not None and (self._lora_c_grad or not torch.is_grad_enabled()):
            return self._lora_c
        return self.lora_A.to(self.compute_dtype), self.lora_B.to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_magnitude is not None and not self.disable_adapter:
            return self._dora_forward(x)
        in_dtype = x.dtype
        xc = x.to(self.compute_dtype)
        grad = torch.is_grad_enabled()
        cached = self._wcache is not None and (self._wcache_grad or not grad)
        # QLORA_FUSED_LORA=0: train through separate autograd ops (the same math) instead of _QLoRAMatmul
        if self.r > 0 and not self.disable_adapter and grad and switches().fused_lora:
            a, b = self._lora_factors()
            xd = drop = None
            if not isinstance(self.lora_dropout, nn.Identity):
                drop = self.lora_dropout.fused_args(xc, a)
                if drop is None:
                    xd = self.lora_dropout(xc)
            weight = self._wcache if cached else self.weight
            y = _qlora_matmul(xc, xd, a, b, self.scaling, weight, self.bias,
                              None if weight is not None else self._raw("weight_packed"), self, drop)
            return y.to(in_dtype)
        row = not grad and xc.is_cuda and xc.numel() == self.in_features  # one token's row when generating
        if cached:
            y = F.linear(xc, self._wcache)
        elif self.weight_packed is not None:
            y = self._decode_gemv(xc) if row else None  # read the 4-bit weight once
            if y is None:
                y = (_frozen_matmul_4bit(xc, self._raw("weight_packed"), self) if grad
                     else xc @ _dequant(self._raw("weight_packed"), self.state, xc.dtype).t())
        else:
            y = F.linear(xc, self.weight)
        if self.bias is not None:
            y = y + self.bias
        if self.r > 0 and not self.disable_adapter:
            a, b = self._lora_factors()
            dropout = not isinstance(self.lora_dropout, nn.Identity) and self.lora_dropout.training
            if row and _ROW_KERNELS[0] and not dropout and y.is_contiguous():
                from . import kernels  # in CUDA-graph decoding: two small launches, in place
                if kernels.lora_row_(y.view(-1), xc.reshape(-1), a, b, self.scaling):
                    return y if y.dtype == in_dtype else y.to(in_dtype)
            xd = self.lora_dropout(xc) if dropout else xc
            xa = xd.reshape(-1, self.in_features) @ a.t()
            # y + scaling * xa @ B.T in one GEMM (the addition and the scaling in its epilogue); in place
            # when no autograd graph records it (y is this call's own fresh tensor)
            y2 = y.reshape(-1, self.out_features)
            y = (y2.addmm_(xa, b.t(), alpha=self.scaling) if not grad and y2.data_ptr() == y.data_ptr() else
                 torch.addmm(y2, xa, b.t(), alpha=self.scaling)).view(y.shape)
        return y if y.dtype == in_dtype else y.to(in_dtype)

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """DoRA's output (see the module docstring). Without active dropout ``y = m / n * (W x + s B A x)``
        (+ bias): the plain LoRA product (the fused node when training, one dequantization) scaled per row,
        and ``n`` from that same dequantized W through :func:`variants.dora_norm_factored` (the base's row
        norms once, then only rank-sized products per call); with dropout the general form."""
        in_dtype, xc = x.dtype, x.to(self.compute_dtype)
        if not isinstance(self.lora_dropout, nn.Identity) and self.lora_dropout.training:
            return self._dora_forward_dropout(xc).to(in_dtype)
        from .variants import dora_norm_factored
        grad = torch.is_grad_enabled()
        cached = self._wcache is not None and (self._wcache_grad or not grad)
        a, b = self._lora_factors()
        weight = self._wcache if cached else self.weight
        if grad and switches().fused_lora:
            z, w = _qlora_matmul(xc, None, a, b, self.scaling, weight, None,
                                 None if weight is not None else self._raw("weight_packed"), self, with_weight=True)
        else:  # eval / generate, or QLORA_FUSED_LORA=0 (then W is dequantized once more, without a graph)
            with torch.no_grad():
                w = weight if weight is not None else self.base_weight(self.compute_dtype)
            z = F.linear(xc, w) + self.scaling * ((xc @ a.t()) @ b.t())
        if self._dora_wn2 is None or self._dora_wn2[0] != (w.device, w.dtype):  # the frozen base's, once
            with torch.no_grad():
                self._dora_wn2 = ((w.device, w.dtype), w.float().pow(2).sum(1))
        norm = dora_norm_factored(self._dora_wn2[1], w, a, b, self.scaling)
        del w
        y = z * (self.lora_magnitude / norm).to(self.compute_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y if y.dtype == in_dtype else y.to(in_dtype)

    def _dora_forward_dropout(self, xc: torch.Tensor) -> torch.Tensor:
        """DoRA with LoRA dropout (peft's form): ``y + (m/n - 1) W xd + m/n s B A xd``, ``xd`` the dropped
        input; the base products through the frozen 4-bit matmul (no dequantized copy saved for backward),
        the row norm from one transient dequantization, detached."""
        from .variants import dora_norm
        grad = torch.is_grad_enabled()
        cached = self._wcache is not None and (self._wcache_grad or not grad)
        a, b = self._lora_factors()

        def base(v):
            if cached:
                return F.linear(v, self._wcache)
            if self.weight_packed is None:
                return F.linear(v, self.weight)
            return _frozen_matmul_4bit(v, self._raw("weight_packed"), self) if grad else \
                v @ _dequant(self._raw("weight_packed"), self.state, v.dtype).t()
        w = self._wcache if cached else self.base_weight(self.compute_dtype)
        norm = dora_norm(w, self.lora_A, self.lora_B, self.scaling)
        del w
        scale = (self.lora_magnitude / norm).to(self.compute_dtype)
        xd = self.lora_dropout(xc)
        y = base(xc)
        lora = (xd @ a.t()) @ b.t()
        y = y + ((scale - 1) * base(xd) + scale * lora * self.scaling)
        if self.bias is not None:
            y = y + self.bias
        return y

    def _decode_gemv(self, xc: torch.Tensor) -> torch.Tensor | None:
        """``xc @ dequant(W).T`` for one row through the CUDA GEMV (``kernels.gemv_cuda``: Hopper and newer;
        ~13 us for W 14336x4096 on an H200 against ~30 for cuBLAS on a bf16 copy), None where it does not
        run (then the caller dequantizes). Validated and planned once per dtype and device, then kept
        (:meth:`_apply` drops it when the module moves); ``QLORA_CUDA_GEMV=0`` or ``QLORA_KERNELS=0``
        when it is first needed turn it off."""
        prep = self._gemv_for(xc)
        return prep.run(xc) if prep.ok else None  # (one row of its dtype on its device: checked by matches)

    def prepare_decode(self) -> bool:
        """Plan one-row inference through the CUDA GEMV now (what the first one-token step would do,
        see :meth:`_decode_gemv`); True when it runs for this layer, which then needs no dequant cache."""
        if self.weight_packed is None or not self.weight_packed.is_cuda:
            return False
        x = torch.empty(1, self.in_features, device=self.weight_packed.device, dtype=self.compute_dtype)
        return self._gemv_for(x).ok

    def _gemv_for(self, x: torch.Tensor):
        """The kept GEMV plan (or "not taken" marker) for one-row inputs like ``x``, made when missing or stale."""
        packed, absmax = self._raw("weight_packed"), self._raw("absmax")
        if self._gemv is None or not self._gemv.matches(x, packed, absmax):
            self._gemv = _prepare_gemv(x, packed, absmax, self)
        return self._gemv

    def _apply(self, fn, *args, **kwargs):
        self._gemv = None  # .to() / .cuda() / .half() move or replace the buffers it points at
        self._dora_wn2 = None
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        base = f"{self.quant_type}, block={self._meta.get('blocksize')}, dq={self.nested_absmax is not None}" \
            if self.weight_packed is not None else "16-bit"
        return (f"in={self.in_features}, out={self.out_features}, base={base}, r={self.r}, "
                f"alpha={self.alpha:g}{', rslora' if self.use_rslora else ''}"
                f"{', dora' if self.lora_magnitude is not None else ''}")


class _NoGemv:
    """Remembers that the CUDA GEMV does not take this layer's one-row inputs of one dtype and device."""
    ok = False

    def __init__(self, x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor):
        self.key = (x.dtype, x.get_device(), packed.data_ptr(), absmax.data_ptr())

    def matches(self, x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor) -> bool:
        return self.key == (x.dtype, x.get_device(), packed.data_ptr(), absmax.data_ptr())


def _prepare_gemv(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, layer: "QLoRALinear"):
    """``gemv_cuda.prepare`` for this layer (its ``ok`` True) or a :class:`_NoGemv`."""
    try:
        from . import kernels
        from .kernels import gemv_cuda
    except ImportError:
        return _NoGemv(x, packed, absmax)
    state = layer.state
    if not kernels.available(x.device) or not gemv_cuda.supported(x, state):
        return _NoGemv(x, packed, absmax)
    try:
        return gemv_cuda.prepare(x, packed, state)
    except gemv_cuda.CompileError:  # warned once; dequantize from now on
        return _NoGemv(x, packed, absmax)


class dequant_cache:
    """Keep each 4-bit weight dequantized (to ``compute_dtype``) while the context is active.

    Default (``training=False``): for inference under ``torch.no_grad()`` — each weight is
    dequantized once instead of once per token; ignored whenever gradients are enabled.
    ``training=True``: also used in training forward/backward. The math is unchanged (the cached
    values are exactly dequant(W)) but memory grows by a 16-bit copy of the weights: worth it on a
    CPU, where dequantizing every layer for every micro-batch dominates the step time of a small
    model, never on a GPU short of memory. Released on exit."""

    def __init__(self, model: nn.Module, enabled: bool = True, training: bool = False):
        from .stream import streamer_of
        if enabled and streamer_of(model) is not None:
            raise QLoraError("the model's weights are streamed from CPU memory (--offload-weights): only the blocks "
                             "running are on the device, so there is no dequantized copy of them to keep")
        self.layers = [m for m in model.modules() if isinstance(m, QLoRALinear)] if enabled else []
        self.training = training

    def __enter__(self):
        with torch.no_grad():
            for m in self.layers:
                m._wcache = m.base_weight()
                m._wcache_grad = self.training
        return self

    def __exit__(self, *exc):
        for m in self.layers:
            m._wcache = None
            m._wcache_grad = False


_ROW_KERNELS = [0]  # > 0 inside row_kernels()


@contextlib.contextmanager
def row_kernels():
    """Inside: a QLoRA layer's one-row, no-grad adapter product on a GPU runs the Triton kernel
    ``kernels.lora_row_`` (two launches, ~4 us of GPU time for the 8B shapes on an H200, against four
    cuBLAS/copy launches and ~8.6 us). Entered by CUDA-graph decoding (:func:`qlora.decoding.decode`),
    where launch cost on the host does not matter; outside, the torch path stays, since two Triton
    launches cost more host time than the cuBLAS calls and eager decoding is bound by the host."""
    _ROW_KERNELS[0] += 1
    try:
        yield
    finally:
        _ROW_KERNELS[0] -= 1


def adapter_factors(module: nn.Module) -> tuple[list["QLoRALinear"], list[torch.Tensor]]:
    """The QLoRA layers of ``module`` whose adapter is active and the LoRA factors each would use now, in
    its compute dtype: ``(layers, [A0, B0, A1, B1, ...])`` (views of one cast under :class:`lora_cast`,
    else fresh casts, or the parameters themselves when no cast is needed)."""
    layers = [m for m in module.modules() if isinstance(m, QLoRALinear) and m.r > 0 and not m.disable_adapter]
    return layers, [t for m in layers for t in m._lora_factors()]


def fused_node_layer(m: nn.Module) -> bool:
    """Whether ``m`` is a QLoRA layer whose training forward is the fused LoRA node (a plain adapter: rank > 0, no
    DoRA), the one :func:`output_unused` and :func:`keep_outputs` act on."""
    return isinstance(m, QLoRALinear) and m.r > 0 and m.lora_magnitude is None


@contextlib.contextmanager
def output_unused(layer: "QLoRALinear"):
    """Inside: ``layer``'s training forward (the fused LoRA node) leaves the frozen base's product out of its
    output, which comes back zeros: for a caller that only back-propagates through it (qlora.tiled's chunk
    backward, down_proj's output being the chunk's output). The gradients do not depend on that value (the
    input's needs W, not W x), so the base's dequantization and GEMM are saved."""
    before, layer._output_unused = layer._output_unused, True
    try:
        yield
    finally:
        layer._output_unused = before


@contextlib.contextmanager
def keep_outputs(layers: list["QLoRALinear"], into: dict | None = None, take_from: dict | None = None):
    """Selective recompute of a checkpointed block (qlora.offload.enable_checkpointing's ``keep_gemms``).
    With ``into`` (the block's forward, with gradients): each of ``layers`` appends its output (the fused
    LoRA node's) to ``into[layer]``. With ``take_from`` (that call's recompute in backward): a layer with an
    output there builds its autograd node as usual but copies that output instead of dequantizing and
    multiplying again, and drops it. One dict per checkpointed call, so forwards that run before their
    backwards (a DPO step's) each get their own outputs back. Same values as recomputing (the same GEMM on
    the same inputs), for the memory of the outputs between forward and backward."""
    before = [m._outputs for m in layers]
    for m in layers:
        m._outputs = (into, take_from)
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m._outputs = b


@contextlib.contextmanager
def lora_factors_as(layers: list["QLoRALinear"], factors: list[torch.Tensor]):
    """Inside: each of ``layers`` uses the given compute-dtype factors ``[A0, B0, A1, B1, ...]`` (forward,
    with or without gradients), as :func:`adapter_factors` lists them. A tiled MLP (qlora.tiled) passes
    leaves of its own chunk graph, so their gradients come back to it instead of to the parameters."""
    before = [(m._lora_c, m._lora_c_grad) for m in layers]
    for i, m in enumerate(layers):
        m._lora_c, m._lora_c_grad = (factors[2 * i], factors[2 * i + 1]), True
    try:
        yield
    finally:
        for m, (c, g) in zip(layers, before):
            m._lora_c, m._lora_c_grad = c, g


class lora_cast:
    """Cast every LoRA factor of ``model`` to its compute dtype once, for the forward and backward
    pass (checkpoint recomputation included) run inside the context.

    Without it each adapter casts its fp32 ``A`` and ``B`` on every forward call and casts their
    gradients back in backward: about 4 small kernels per layer per pass, several thousand launches
    per step for an 8B model, which on a GPU host with a slow CPU left the GPU idle for a third of
    the step. Here all factors go through one ``cat`` and one cast, and ``split`` hands each layer
    its views; backward gathers the gradients the same way (one split-backward and one cast). The
    values are those of the per-layer casts, bit for bit.

    Entered with gradients off (generation, evaluation), it keeps a plain cast of the factors, which
    the layers use only while gradients stay off (a forward with gradients on casts per call again);
    the factors must not change inside it then.

    One process only: under FSDP the parameters are gathered per block inside forward, and under
    DDP every gradient would reach its parameter only at the very end of backward (through the one
    cat), so the all-reduce could no longer overlap backward. Open it around forward *and*
    backward of each micro-batch. One instance can be entered again and again (the layers are
    found once)."""

    def __init__(self, model: nn.Module, enabled: bool = True):
        self.layers = [m for m in model.modules() if isinstance(m, QLoRALinear) and m.r > 0] if enabled else []

    def __enter__(self):
        grad = torch.is_grad_enabled()
        groups: dict = {}
        for m in self.layers:
            groups.setdefault((m.lora_A.device, m.compute_dtype), []).append(m)
        for (_, dtype), ms in groups.items():
            params = [t for m in ms for t in (m.lora_A, m.lora_B)]
            flat = torch.cat([t.reshape(-1) for t in params]).to(dtype)
            parts = flat.split([t.numel() for t in params])
            for i, m in enumerate(ms):
                m._lora_c = (parts[2 * i].view(m.lora_A.shape), parts[2 * i + 1].view(m.lora_B.shape))
                m._lora_c_grad = grad
        return self

    def __exit__(self, *exc):
        for m in self.layers:
            m._lora_c = None
            m._lora_c_grad = False
