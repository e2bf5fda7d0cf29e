"""CPU training throughput on the demo's work, ours beside a plain-torch bf16 LoRA reference.

Same model (the embedded SmolLM2-135M-Instruct), same batches (the demo's 216 questions, batch 8,
length-grouped), LoRA r=16 alpha 32 on every block linear, AdamW lr 1e-3, no gradient
checkpointing. Tokens/s counts real (non-pad) input tokens per second of step time, the way
`qlora train` does. Rows:

* ``ours``: the `qlora train` step (NF4 + DQ base, dequant cache, chunked loss) with the attention
  implementation given (``--attention``; the CPU default is eager);
* ``plain``: a transformers LlamaForCausalLM in bf16 whose block linears get a minimal LoRA written
  here in plain torch (bf16 factors), loss from the model's own ``labels`` path — the "plain bf16
  torch LoRA" the issue compares against.
* ``reference``: the issue's reference stack: transformers + bitsandbytes NF4 + DQ (bf16 compute) +
  peft LoRA r=64 alpha 16 on all linear layers, torch AdamW lr 2e-4 (needs bitsandbytes and peft,
  the test extras).

    python bench/cpu_train_speed.py                       # ours (eager, sdpa) and plain, 3 rounds each
    python bench/cpu_train_speed.py --rows ours:eager,plain:eager,reference:eager --batch-size 16
"""
import argparse
import json
import math
import statistics
import time
from pathlib import Path



def _batches(tok, path, batch_size=8):
    from qlora.data import Batches, load_examples
    ex, _ = load_examples(path, tok, max_length=128)
    return Batches(ex, batch_size, tok.pad_token_id, seed=0).epoch(0)


def _time(step, batches, steps: int, rounds: int) -> list[float]:
    step(batches[0])  # warm-up
    out = []
    for r in range(rounds):
        n, t = 0, time.time()
        for i in range(steps):
            n += step(batches[(1 + r * steps + i) % len(batches)])
        out.append(n / (time.time() - t))
    return out


def _embedded_bf16(attention: str | None = None):
    """The embedded model as a plain transformers model in bf16, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora.embedded import embedded_model_path
    from qlora.sources import open_source
    src = open_source(embedded_model_path())
    m = AutoModelForCausalLM.from_config(src.config, dtype=torch.bfloat16, attn_implementation=attention)
    m.load_state_dict({n: src.get(n).to(torch.bfloat16) for n in src.names()}, strict=False)
    m.tie_weights()
    return m, src.load_tokenizer()


def _hf_step(m, opt, params, clip: float | None):
    """One step of a transformers model through its own ``labels`` loss; returns the real tokens."""
    import torch

    def step(b):
        out = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"], use_cache=False)
        out.loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(b["attention_mask"].sum())
    return step


COMPUTE = ["auto"]  # --compute-dtype of the ``ours`` rows


def ours(attention: str, batches_of, steps: int, rounds: int) -> list[float]:
    import torch

    from qlora.linear import dequant_cache, lora_cast
    from qlora.model import LoraSettings, QuantSettings, load_model
    from qlora.optim import make_optimizer
    from qlora.loss import loss_sum
    torch.manual_seed(0)
    from qlora.hardware import resolve
    dt = resolve(COMPUTE[0], "cpu").dtype
    m, tok = load_model(None, QuantSettings(compute_dtype=dt), LoraSettings(16, 32, 0.0), "cpu", dt, progress=False)
    m.set_attn_implementation(attention)
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = make_optimizer(params, "adamw", 1e-3)
    batches = batches_of(tok)

    casts = lora_cast(m)

    def step(b):
        with casts:  # as qlora train does
            loss = loss_sum(m, b, "cpu") / int(b["num_tokens"])
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(b["attention_mask"].sum())
    with dequant_cache(m, training=True):
        return _time(step, batches, steps, rounds)


def plain(attention: str, batches_of, steps: int, rounds: int) -> list[float]:
    import torch
    import torch.nn as nn

    class LoRA(nn.Module):
        def __init__(self, base: nn.Linear, r=16, alpha=32):
            super().__init__()
            self.base = base
            self.a = nn.Parameter(torch.empty(r, base.in_features, dtype=torch.bfloat16))
            self.b = nn.Parameter(torch.zeros(base.out_features, r, dtype=torch.bfloat16))
            nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
            self.scale = alpha / r

        def forward(self, x):
            return self.base(x) + (x @ self.a.t()) @ self.b.t() * self.scale

    torch.manual_seed(0)
    m, tok = _embedded_bf16(attention)
    for p in m.parameters():
        p.requires_grad_(False)
    for name, mod in list(m.named_modules()):
        for child, lin in list(mod.named_children()):
            if isinstance(lin, nn.Linear) and ".layers." in f"{name}.":
                setattr(mod, child, LoRA(lin))
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    return _time(_hf_step(m, opt, params, clip=0.3), batches_of(tok), steps, rounds)


def reference(attention: str, batches_of, steps: int, rounds: int) -> list[float]:
    import tempfile

    import peft
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    m, tok = _embedded_bf16()
    d = tempfile.mkdtemp(prefix="qlora-cpu-ref-")
    m.save_pretrained(d)
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(d, quantization_config=q, dtype=torch.bfloat16,
                                                attn_implementation=attention)
    m = peft.get_peft_model(base, peft.LoraConfig(r=64, lora_alpha=16, target_modules="all-linear",
                                                  lora_dropout=0.0)).train()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    return _time(_hf_step(m, opt, params, clip=None), batches_of(tok), steps, rounds)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="ours:eager,ours:sdpa,plain:eager,plain:sdpa")
    ap.add_argument("--steps", type=int, default=6, help="steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8, help="examples per step (the demo's is 8)")
    ap.add_argument("--compute-dtype", default="auto", choices=["auto", "bf16", "fp32"],
                    help="compute dtype of the ours rows (default auto: what qlora train picks here)")
    a = ap.parse_args()
    COMPUTE[0] = a.compute_dtype
    import os
    import tempfile

    from qlora.demo_data import write
    data = Path(tempfile.mkdtemp(prefix="qlora-cpu-speed-"))
    train_file, _, _ = write(data)
    load = os.getloadavg()[0]
    res = {}
    for row in a.rows.split(","):
        kind, attention = row.split(":")
        fn = {"ours": ours, "plain": plain, "reference": reference}[kind]
        r = fn(attention, lambda tok: _batches(tok, train_file, a.batch_size), a.steps, a.rounds)
        res[row] = r
        print(json.dumps({"row": row, "tok_s": [round(x, 1) for x in r], "median": round(statistics.median(r), 1)}),
              flush=True)
    from qlora.hardware import cpu_flags, resolve
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"\nCPU {model} ({os.cpu_count()} cores, flags: {', '.join(sorted(cpu_flags())) or 'no avx512_bf16/amx_bf16'}; "
          f"torch capability {__import__('torch').backends.cpu.get_cpu_capability()}), load average {load:.2f} at start; "
          f"demo batches of {a.batch_size}, r=16; ours: {resolve(a.compute_dtype, 'cpu').header()}; plain/reference: bf16")
    print("| row | tokens/s (median of rounds) | rounds |")
    print("|---|---|---|")
    for row, r in res.items():
        print(f"| {row} | {statistics.median(r):.0f} | {', '.join(f'{x:.0f}' for x in r)} |")


if __name__ == "__main__":
    main()
