"""Candidate changes to a CUDA-graph decoding step (``qlora/decoding.py``), ready to measure on a GPU.

Each variant replaces one of decoding's hooks (``_mask``, ``_cache_len``); the runner builds one random-weight
model (``bench/decode_speed.py``'s ``build_ours``: NF4+DQ, LoRA r=16 with non-zero B), checks that greedy
decoding gives the library's tokens, then times library and variants alternately with decode_speed's timing
(a ``--new``-token call against a 1-token call, best of two, the graph's capture included). Nothing here
changes the library; adopt a variant by editing the hook once it has measured faster.

Variants (written in session 10 after its GPU time ran out, from the profile in ``qlora/kernels/NOTES.md``;
not measured yet):

* ``float-mask``: the mask as an additive tensor in the compute dtype (0 / dtype min), built once per step.
  With a boolean mask PyTorch's SDPA converts it in every layer (``zeros_like``, ``logical_not``,
  ``masked_fill``): the ~66 fill and 32 ``where`` kernels per 8B step in the profile.
* ``aligned``: the static cache's length rounded up to a multiple of 16 positions (the extra ones stay
  masked). The memory-efficient attention kernel pads a mask whose last dimension is not aligned: a copy
  per layer.
* ``both``.

Usage (GPU): ``python bench/decode_experiments.py [--shape 8b] [--variants float-mask,aligned,both]``.
"""
from __future__ import annotations

import argparse
import sys

from qlora.decoding import _mask as _library_mask  # noqa: E402 (the hook as the library defines it)


def float_mask(allowed, dtype, eager: bool):
    return _library_mask(allowed, dtype, True)  # the additive form eager attention gets, for SDPA too


def aligned(positions: int) -> int:
    return -(-positions // 16) * 16


VARIANTS = {"float-mask": {"_mask": float_mask}, "aligned": {"_cache_len": aligned},
            "both": {"_mask": float_mask, "_cache_len": aligned}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8b", help="a shape of qlora.plan (default 8b)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    ap.add_argument("--new", type=int, default=128, help="generated tokens (default 128)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)} (default: all)")
    ap.add_argument("--rounds", type=int, default=2, help="timing rounds, library and variants alternating (default 2)")
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or args.new < 2:
        ap.error(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}" if bad else "--new must be at least 2")
    import torch
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")

    from qlora import decoding
    from qlora.linear import lora_cast
    from qlora.plan import shape_config
    from decode_speed import build_ours, time_generate

    cfg = shape_config(args.shape)
    model = build_ours(cfg, "cuda")
    library = {hook: getattr(decoding, hook) for hook in ("_mask", "_cache_len")}

    def use(name):
        for hook, fn in library.items():
            setattr(decoding, hook, VARIANTS.get(name, {}).get(hook, fn))

    ids = torch.randint(10, cfg.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | shape {args.shape} | prompt {args.prompt} + "
          f"{args.new} new tokens, greedy, batch 1", flush=True)
    times = {name: [] for name in ["library"] + names}
    try:
        with torch.no_grad(), lora_cast(model):
            use("library")
            want = decoding.decode(model, ids, args.new)
            for name in names:
                use(name)
                got = decoding.decode(model, ids, args.new)
                same = sum(a == b for a, b in zip(got, want))
                print(f"{name}: {'same tokens' if got == want else f'tokens differ ({same}/{len(want)} equal)'}",
                      flush=True)
            for _ in range(args.rounds):
                for name in times:
                    use(name)
                    times[name].append(time_generate(model, cfg, args.prompt, args.new, "cuda", graph=True)["ms_per_token"])
    finally:
        use("library")
    for name, v in times.items():
        print(f"{name:>12}: {min(v):6.2f} ms per token {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
