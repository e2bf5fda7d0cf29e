"""Which SDPA kernel runs causal training attention fastest on this GPU (forward + backward, Llama-3.1-8B heads).

    python bench/attention_backends.py                       # seq 2048 x 2, 32768 x 1, 131072 x 1
    python bench/attention_backends.py --shapes 4096x2 --heads 32,8,128

For each shape and each backend (``default``: torch's own choice, as a training step gets it; flash, cuDNN,
memory-efficient), one JSON line: the aten op it dispatched to, the median time of
forward + backward after warm-up, the attention TFLOP/s on the causal count (forward 2 * S^2 * H * D, backward 2.5x
that), and the largest difference of the output and of the query gradient from the first backend's (bf16). GQA is
given as torch's ``enable_gqa`` where the backend takes it (keys/values repeated otherwise, as transformers does).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def allowed(name: str):
    """``default`` leaves torch's own choice (what a training step gets); the others force one kernel."""
    return contextlib.nullcontext() if BACKENDS[name] is None else sdpa_kernel([BACKENDS[name]])


def kernel_of(q, k, v, gqa: bool) -> str:
    """The aten attention op torch dispatched to (``_cudnn_attention_forward``, ``_flash_attention_forward``, ...)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(q, k, v, gqa)
    names = {e.name for e in prof.events() if e.name.endswith("attention_forward")}
    return ",".join(sorted(names)) or "?"


def step(q, k, v, gqa: bool):
    if not gqa and k.shape[1] != q.shape[1]:  # repeat_kv, as transformers does where enable_gqa is not taken
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    out.backward(torch.ones_like(out))
    return out


def time_backend(name: str, q, k, v, reps: int) -> dict:
    for gqa in (True, False):
        try:
            with allowed(name):
                kernel = kernel_of(q, k, v, gqa)
                out = step(q, k, v, gqa)
                torch.cuda.synchronize()
                times = []
                for _ in range(reps):
                    for t in (q, k, v):
                        t.grad = None
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    out = step(q, k, v, gqa)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
            return dict(backend=name, kernel=kernel, gqa=gqa, s=sorted(times)[len(times) // 2], out=out.detach(), dq=q.grad.clone())
        except RuntimeError as e:
            err = str(e).splitlines()[0][:160]
    return dict(backend=name, error=err)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="2048x2,32768x1,131072x1", help="SEQxBATCH list")
    ap.add_argument("--heads", default="32,8,128", help="query heads, key/value heads, head dim")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {', '.join(BACKENDS)}")
    a = ap.parse_args()
    hq, hkv, d = map(int, a.heads.split(","))
    print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                          cudnn=torch.backends.cudnn.version())), flush=True)
    for shape in a.shapes.split(","):
        s, b = map(int, shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                   for h in (hq, hkv, hkv))
        flops = 2 * s * s * hq * d * b * 3.5  # causal forward 2 S^2 H D, backward 2.5x
        ref = None
        for name in a.backends.split(","):
            r = time_backend(name, q, k, v, a.reps if s <= 32768 else 1)
            if "error" not in r:
                out, dq = r.pop("out"), r.pop("dq")
                ref = ref or (out, dq)
                r.update(tflops=round(flops / r["s"] / 1e12, 1), s=round(r["s"], 4),
                         max_diff_out=float((out.float() - ref[0].float()).abs().max()),
                         max_diff_dq=float((dq.float() - ref[1].float()).abs().max()))
            print(json.dumps(dict(seq=s, batch=b, **r)), flush=True)


if __name__ == "__main__":
    main()
