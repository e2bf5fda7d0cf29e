"""Size on disk and the error each GGUF export type adds, on the embedded SmolLM2-135M-Instruct:
mean |logit difference| against the source model and perplexity on text that ships with Python
(the pydoc_data topics), each file loaded back by transformers (``gguf_file=``).

    python bench/export_quality.py [--tokens 1024]
"""
import argparse
import json
import math
import tempfile
import time
from pathlib import Path



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--types", default="f16,bf16,q8_0,q4_k_m,q4_0")
    a = ap.parse_args()
    import gguf
    import torch
    from pydoc_data.topics import topics
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora.embedded import embedded_model_path
    from qlora.gguf_export import export_gguf
    p = embedded_model_path()
    src = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    pre = gguf.GGUFReader(str(p)).fields["tokenizer.ggml.pre"]
    pre = bytes(pre.parts[pre.data[0]]).decode()
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tok(text, return_tensors="pt").input_ids[:, : a.tokens]
    with torch.no_grad():
        ref = src(ids, labels=ids)
    print(json.dumps({"type": "source (Q4_1 GGUF, fp32)", "ppl": round(math.exp(ref.loss.item()), 3),
                      "mb": round(p.stat().st_size / 1e6, 1)}), flush=True)
    with tempfile.TemporaryDirectory() as d:
        for typ in a.types.split(","):
            out = Path(d) / f"smol-{typ}.gguf"
            t = time.time()
            export_gguf(src.config, src.state_dict().items(), tok, out, typ, progress=False, tokenizer_pre=pre)
            secs = time.time() - t
            m = AutoModelForCausalLM.from_pretrained(d, gguf_file=out.name, dtype=torch.float32).eval()
            with torch.no_grad():
                r = m(ids, labels=ids)
            print(json.dumps({"type": typ, "mb": round(out.stat().st_size / 1e6, 1),
                              "mean_abs_dlogit": round((r.logits - ref.logits).abs().mean().item(), 4),
                              "greedy_agree": round((r.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean().item(), 4),
                              "ppl": round(math.exp(r.loss.item()), 3), "export_s": round(secs, 1)}), flush=True)
            out.unlink()


if __name__ == "__main__":
    main()
