"""Text generation and chat on a 4-bit base model, with or without a LoRA adapter.

``generate(model, tokenizer, prompt, ...)`` renders the prompt, decodes with a KV cache, stops at EOS
or an end-of-turn token and returns the decoded answer; ``stream`` receives the text as it is produced
(the pieces concatenate to exactly the returned text). On a CUDA device decoding runs
:func:`qlora.decoding.decode` (static KV cache, each step replayed from a CUDA graph); on the CPU, or
where that does not apply, transformers' ``model.generate``. 4-bit weights are dequantized once per call
(:class:`qlora.linear.dequant_cache`) except where the CUDA GEMV reads them directly (Hopper).

Prompt layouts (``chat`` argument, ``--template`` flag):

* ``chat``  -- the tokenizer's chat template, ``add_generation_prompt=True``; the rendered text is
  tokenized without extra special tokens (the template writes its own BOS), as in training;
* ``plain`` -- the ``### Instruction:`` / ``### Response:`` layout that ``qlora train`` uses for
  tokenizers without a chat template (:mod:`qlora.data`), BOS in front;
* ``none``  -- raw text continuation (BOS in front); earlier turns, if any, are joined by newlines.

``auto`` (``chat=None``) is ``chat`` when the tokenizer has a template, else ``none`` (the chat
command uses ``plain`` instead of ``none``). ``True``/``False`` mean ``chat``/``none``.

Sampling: ``temperature == 0`` is greedy decoding; otherwise softmax(logits / T) restricted to the
smallest set of tokens whose probability reaches ``top_p`` (nucleus), top-k off.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import COMPUTE_DTYPES
from .errors import QLoraError

LAYOUTS = ("auto", "chat", "plain", "none")
# end-of-turn markers of common chat templates (ChatML, Llama 3, Phi-3, Gemma, GPT-style)
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>")


# ------------------------------------------------------------------------------------- prompts
def resolve_layout(tokenizer, chat: bool | str | None = None, fallback: str = "none") -> str:
    """Map ``chat`` (None/"auto", True/"chat", False/"none", "plain") to one of chat/plain/none."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is None or chat == "auto":
        return "chat" if has_template else fallback
    layout = {True: "chat", False: "none"}.get(chat, chat) if isinstance(chat, bool) else chat
    if layout not in LAYOUTS[1:]:
        raise QLoraError(f"unknown prompt template {chat!r}: choose one of {', '.join(LAYOUTS)}")
    if layout == "chat" and not has_template:
        raise QLoraError("the tokenizer has no chat template: use --template plain or --no-chat-template")
    return layout


def _bos_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts in front of a text (BOS for Llama-style tokenizers, often none)."""
    with_, without = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(without)
    starts = [i for i in range(len(with_) - n + 1) if with_[i:i + n] == without]
    return list(with_[:starts[0]]) if starts else []


def encode_messages(tokenizer, messages: list[dict], layout: str) -> list[int]:
    """Token ids of ``messages`` (``[{"role", "content"}]``, the last one a user turn) followed by
    the opening of the assistant's answer, in ``layout`` (chat, plain or none)."""
    if layout == "chat":
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja errors, raise_exception() inside templates
            raise QLoraError(f"the tokenizer's chat template rejected the conversation ({e}); "
                             "try --template plain") from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if layout == "plain":
        from .data import _plain_layout  # the exact layout `qlora train --template plain` learns
        text, spans = _plain_layout(list(messages) + [{"role": "assistant", "content": ""}])
        # training ends every assistant turn with EOS (this layout has no end-of-turn marker)
        ids, start = _bos_prefix(tokenizer), 0
        for _, end in spans[:-1]:
            ids += tokenizer(text[start:end], add_special_tokens=False)["input_ids"]
            if ids[-1:] != [tokenizer.eos_token_id]:
                ids.append(tokenizer.eos_token_id)
            start = end
        return ids + list(tokenizer(text[start:], add_special_tokens=False)["input_ids"])
    if layout == "none":
        text = "\n".join(m["content"] for m in messages)
    else:
        raise QLoraError(f"unknown prompt layout {layout!r}")
    return _bos_prefix(tokenizer) + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """EOS of the tokenizer and of the model's generation config, plus known end-of-turn tokens
    present in the vocabulary (e.g. ``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``)."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += [int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]) if i is not None]
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in _END_OF_TURN if t in vocab]
    if not ids:
        raise QLoraError("the tokenizer defines no EOS token, so generation could not stop: use a tokenizer "
                         "with eos_token")
    return sorted(set(ids))


# --------------------------------------------------------------------------------- generation
class _Streamer:
    """transformers streamer (``put``/``end``): decodes all new tokens so far and hands the
    callback what was not handed yet, holding back a trailing U+FFFD (an unfinished multi-byte
    character), so the pieces add up to the final decoded answer. The first ``put`` is the prompt."""

    def __init__(self, tokenizer, callback, stops: set[int]):
        self.tokenizer, self.callback, self.stops = tokenizer, callback, stops
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_seen = False
        self.stopped = False
        self.first_token_at: float | None = None

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.add(value.reshape(-1).tolist())

    def add(self, ids: list[int]) -> None:
        """New token ids (after the prompt)."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        for t in ids:
            if self.stopped or t in self.stops:
                self.stopped = True
                return
            self.ids.append(t)
        self._emit(self.text().rstrip("\ufffd"))

    def end(self) -> None:
        self._emit(self.text())

    def _emit(self, text: str) -> None:
        if self.callback is not None and text.startswith(self.sent) and len(text) > len(self.sent):
            piece, self.sent = text[len(self.sent):], text
            self.callback(piece)


@dataclass
class Generation:
    """One answer: its text, token counts, and timings in seconds (``first_token`` is the time
    from the call to the first new token, i.e. the prefill; ``seconds`` the whole call)."""
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    first_token: float

    @property
    def decode_tokens_per_s(self) -> float:
        dt = self.seconds - self.first_token
        return (self.new_tokens - 1) / dt if self.new_tokens > 1 and dt > 0 else 0.0


CACHE_RESERVE_GIB = 2.0       # GPU memory left free beside the dequant cache (at least; or this share of it:)
CACHE_RESERVE_SHARE = 0.10


def inference_cache(model, enabled: bool = True):
    """``dequant_cache(model)`` unless disabled or already active (nested caches would drop it), for the
    layers that need it: a layer whose one-token steps read its 4-bit weight through the CUDA GEMV
    (Hopper and newer, ``QLoRALinear.prepare_decode``) gets none. The GEMV's GPU time is under half of
    cuBLAS's on a 16-bit copy (W 14336x4096 on an H200: 13.1 against 31.5 us), which is what counts in
    CUDA-graph decoding, and the copy would triple the memory (8B shape: 18.8 against 5.8 GiB).

    On a GPU the copies take only the memory there is: free memory less a reserve for activations, the KV
    cache and the CUDA graph (``CACHE_RESERVE_GIB``, or ``CACHE_RESERVE_SHARE`` of the GPU if more). Layers
    beyond that are dequantized at every forward instead (slower, never out of memory), and stderr says
    how many got a copy: an 8B model's copies need ~15 GiB, more than a 16 GB GPU has beside the model.
    None for a model whose weights are streamed (qlora.stream): they are on the device only while their block runs."""
    from .linear import QLoRALinear, dequant_cache
    if not enabled or any(m._wcache is not None for m in model.modules() if isinstance(m, QLoRALinear)):
        return contextlib.nullcontext()
    from .stream import streamer_of
    if streamer_of(model) is not None:  # weights streamed (qlora.stream): only the resident
        return contextlib.nullcontext()  # blocks' are on the device, each dequantized as it runs
    cache = dequant_cache(model)
    cache.layers = [m for m in cache.layers if not m.prepare_decode()]
    packed = [m for m in cache.layers if m.weight_packed is not None]
    budget = cache_budget(packed[0].weight_packed.device) if packed else None
    if budget is not None:
        kept, used = [], 0
        for m in cache.layers:
            size = m.out_features * m.in_features * m.compute_dtype.itemsize if m.weight_packed is not None else 0
            if used + size <= budget:
                kept.append(m)
                used += size
        if len(kept) < len(cache.layers):
            print(f"qlora: GPU memory holds a dequantized copy of {sum(m.weight_packed is not None for m in kept)} of "
                  f"{len(packed)} 4-bit layers ({used / 2**30:.1f} GiB); the others are dequantized at every "
                  "forward", file=sys.stderr)
        cache.layers = kept
    return cache


def cache_budget(device) -> int | None:
    """Bytes the dequant cache may take on ``device``: None (no limit) off a GPU; on one, its free memory less
    ``max(CACHE_RESERVE_GIB, CACHE_RESERVE_SHARE x total)``, at least 0."""
    import torch
    if torch.device(device).type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return max(0, int(free - max(CACHE_RESERVE_GIB * 2**30, CACHE_RESERVE_SHARE * total)))


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise QLoraError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise QLoraError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise QLoraError(f"top_p must be in (0, 1], got {top_p}")


def context_limit(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def generate_full(model, tokenizer, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0,
                  top_p: float = 1.0, chat: bool | str | None = None, stream=None,
                  history: list[dict] | None = None, cache: bool = True, graph: bool | None = None) -> Generation:
    """:func:`generate` returning a :class:`Generation` (text, token counts, timings)."""
    import torch

    from .linear import lora_cast
    check_sampling(max_new_tokens, temperature, top_p)
    if not isinstance(prompt, str):
        raise QLoraError(f"the prompt must be a string, got {type(prompt).__name__}")
    layout = resolve_layout(tokenizer, chat)
    messages = list(history or []) + [{"role": "user", "content": prompt}]
    ids = encode_messages(tokenizer, messages, layout)
    limit = context_limit(model)
    if limit is not None:
        if len(ids) >= limit:
            raise QLoraError(f"the prompt has {len(ids)} tokens, the model takes at most {limit}")
        max_new_tokens = min(max_new_tokens, limit - len(ids))
    stops = stop_token_ids(tokenizer, model)
    device = next(model.parameters()).device
    streamer = _Streamer(tokenizer, stream, set(stops))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), inference_cache(model, cache), lora_cast(model):  # LoRA factors cast once
            # (asked here: the static KV cache must fit in what the dequant cache left free)
            graphed = _graph_decoding(model, device, len(ids) + max_new_tokens, graph)
            t0 = time.perf_counter()  # after the one-off dequantization
            if graphed:
                from .decoding import decode
                new = decode(model, ids, max_new_tokens, temperature=float(temperature), top_p=float(top_p),
                             stops=stops, on_token=lambda t: streamer.add([t]),
                             log=lambda m: print(f"qlora: {m}", file=sys.stderr))
                streamer.end()
            else:
                input_ids = torch.tensor([ids], dtype=torch.long, device=device)
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
                kw = dict(max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad, do_sample=temperature > 0,
                          use_cache=True)  # (generation_config may say otherwise)
                if temperature > 0:
                    kw.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
                out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **kw)
                new = out[0, len(ids):].tolist()
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    cut = next((i for i, t in enumerate(new) if t in streamer.stops), len(new))
    text = tokenizer.decode(new[:cut], skip_special_tokens=True)
    first = (streamer.first_token_at - t0) if streamer.first_token_at else seconds
    return Generation(text, len(ids), cut + (cut < len(new)), seconds, first)


def _graph_decoding(model, device, max_len: int, graph: bool | None) -> bool:
    """Whether to decode with :func:`qlora.decoding.decode` (CUDA graphs): on CUDA devices, unless turned off
    (``graph=False``, ``QLORA_CUDA_GRAPH_DECODE=0``) or the model cannot (then says why on stderr, once)."""
    from .settings import switches
    if device.type != "cuda" or graph is False or (graph is None and not switches().cuda_graph_decode):
        return False
    from .decoding import unsupported
    why = unsupported(model, max_len)
    if why is not None:
        if getattr(model, "_qlora_graph_why", None) != why:
            print(f"qlora: decoding with transformers' generate (no CUDA graph): {why}", file=sys.stderr)
            model._qlora_graph_why = why
        return False
    return True


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, chat: bool | str | None = None, stream=None,
             history: list[dict] | None = None, cache: bool = True, graph: bool | None = None) -> str:
    """The model's answer to ``prompt`` (after ``history``, a list of ``{"role", "content"}``
    messages, system first if any), decoded without special tokens.

    ``chat``: prompt layout (module docstring). ``stream``: a callable receiving text pieces as
    they are generated. ``cache=False`` dequantizes the 4-bit weights at every forward instead
    of once per call (less memory, much slower). ``graph``: on a CUDA device, decode with
    :func:`qlora.decoding.decode` (a static KV cache, each step replayed from a CUDA graph) rather than
    transformers' ``generate``; None = yes unless ``QLORA_CUDA_GRAPH_DECODE=0``."""
    return generate_full(model, tokenizer, prompt, max_new_tokens, temperature, top_p, chat, stream,
                         history, cache, graph).text


# ------------------------------------------------------------------------------------- loading
def pick_device(name: str = "auto") -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise QLoraError("--device cuda asked for, but PyTorch sees no CUDA GPU: use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise QLoraError(f"unknown device {name!r}: use cpu, cuda or auto")
    return name


def load_for_inference(model_src=None, adapter=None, device: str = "auto", dtype: str = "auto",
                       progress: bool = True, log=None):
    """(model, tokenizer) ready for inference: the base quantized as the adapter's training run did
    (``qlora_config.json``, else NF4+DQ defaults), no LoRA layers but the adapter's. ``dtype``: the
    compute dtype, ``auto`` resolved for the device (:mod:`qlora.hardware`); ``log`` (if given) gets the
    choice and a warning where an explicit dtype is slow on this machine."""
    from .adapters import adapter_quant_settings, check_fits, load_adapter, read_adapter
    from .hardware import resolve
    from .hub import base_for, local
    from .model import QuantSettings, load_model
    device = pick_device(device)
    compute = resolve(dtype, device)  # a bad name or bf16 on a GPU without it fails here, before the load
    model_src = base_for(model_src, adapter)  # no --model: the base the adapter records
    if model_src is not None and not Path(local(model_src)).expanduser().exists():
        raise QLoraError(f"model not found: {model_src} (give an HF model directory, a .gguf file or a "
                         "qlora quantize output; leave --model out for the embedded SmolLM2-135M)")
    quant = QuantSettings()
    if adapter is not None:
        _, pairs = read_adapter(adapter)  # fail on a bad adapter before the (slow) model load
        quant = adapter_quant_settings(adapter)
        check_fits(adapter, model_src, pairs)  # its layers and shapes, from the model's config alone
    if log is not None:  # every check has passed: say how it will run
        log(compute.header())
        if device.startswith("cuda"):
            from .kernels import describe
            log(describe(device))
        if compute.warning:
            log(f"warning: {compute.warning}")
    quant.compute_dtype = dtype = compute.dtype
    model, tokenizer = load_model(model_src, quant=quant, lora=None, device=device, dtype=dtype, progress=progress)
    if tokenizer is None:
        raise QLoraError(f"{model_src} has no tokenizer files (tokenizer.json / tokenizer_config.json): "
                         "copy the tokenizer of the original model into that directory")
    if adapter is not None:
        load_adapter(model, adapter)
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------------------- cli
def add_model_args(p) -> None:
    """--model/--adapter/--device/--dtype/--no-dequant-cache (shared with ``qlora eval``)."""
    p.add_argument("--model", default=None, metavar="SRC",
                   help="base model: HF directory, .gguf file, qlora 4-bit checkpoint or Hub id org/name[@revision] "
                        "(default: the base the adapter records, else the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, metavar="DIR", help="LoRA adapter directory (default: none)")
    p.add_argument("--device", default="auto", metavar="DEV", help="cpu, cuda or auto (default: auto = cuda if available)")
    p.add_argument("--compute-dtype", "--dtype", dest="dtype", default="auto", choices=COMPUTE_DTYPES,
                   help="compute dtype of the model; auto = what the hardware runs fast (bf16 on GPUs of compute "
                        "capability >= 8.0 and CPUs with native bf16, fp16 on older GPUs, fp32 on other CPUs; "
                        "--dtype is the old spelling) (default: auto)")
    p.add_argument("--no-dequant-cache", dest="dequant_cache", action="store_false",
                   help="dequantize 4-bit weights at every forward instead of keeping a 16-bit copy while "
                        "generating (less memory, much slower; default: cache on). On GPUs of compute "
                        "capability 9.0+ (H100, H200) one-token steps read the 4-bit weights directly, "
                        "faster than from the copy, and those layers are never cached; on other GPUs only as "
                        "many layers get a copy as fit in free memory less a reserve")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for PyTorch (default: PyTorch's choice; on a busy or small CPU, 1 can "
                        "decode several times faster)")


def _add_sampling_args(p, default_template: str) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="most tokens per answer (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 = greedy decoding (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass, used when temperature > 0 "
                                                            "(default: 1.0)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed for sampling (default: 0)")
    p.add_argument("--template", default="auto", choices=LAYOUTS,
                   help=f"prompt layout: chat (tokenizer's template), plain (### Instruction:/### Response:), "
                        f"none (raw text); auto = chat if the tokenizer has a template, else {default_template} "
                        "(default: auto)")
    p.add_argument("--no-chat-template", dest="template", action="store_const", const="none",
                   help="same as --template none: feed the prompt as raw text")
    p.add_argument("--system", default=None, metavar="TEXT", help="system message (default: none, or the template's own)")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="on a GPU, decode with transformers' generate, one Python-driven step per token, instead "
                        "of replaying each step from a CUDA graph on a static KV cache (for debugging or comparison; "
                        "default: graphs on where the model allows, else generate, with the reason on stderr)")


def add_cli(sub) -> None:
    g = sub.add_parser("generate", help="generate an answer to one prompt (streamed)",
                       description="Generate an answer to --prompt with the 4-bit base model (and an adapter), "
                                   "streaming it to stdout; load time and tokens/s go to stderr.")
    add_model_args(g)
    g.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt (required)")
    _add_sampling_args(g, "none")
    g.set_defaults(func=_run_generate)
    c = sub.add_parser("chat", help="interactive chat (reads lines from stdin; /reset, /exit)",
                       description="Chat with the model: each stdin line is a user turn, the answer streams to "
                                   "stdout. /reset clears the history, /exit or end of input quits. Works with "
                                   "piped input too.")
    add_model_args(c)
    _add_sampling_args(c, "plain")
    c.set_defaults(func=_run_chat)


def set_threads(n: int | None) -> None:
    if n is None:
        return
    import torch
    if n < 1:
        raise QLoraError(f"--threads must be a positive integer, got {n}")
    torch.set_num_threads(n)


def _load(args):
    import torch
    check_sampling(args.max_new_tokens, args.temperature, args.top_p)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, tok = load_for_inference(args.model, args.adapter, args.device, args.dtype, progress=sys.stderr.isatty(),
                                    log=lambda m: print(m, file=sys.stderr))
    print(f"loaded {getattr(model, 'qlora_source', args.model)}{' + ' + args.adapter if args.adapter else ''} "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return model, tok


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _run_generate(args) -> int:
    model, tok = _load(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    t0 = time.perf_counter()
    with inference_cache(model, args.dequant_cache):
        t_cache = time.perf_counter() - t0
        g = generate_full(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                          chat=args.template, stream=_write, history=history, cache=args.dequant_cache,
                          graph=None if args.cuda_graph else False)
    _write("\n")
    print(f"dequantized weights in {t_cache:.2f} s; " if args.dequant_cache else "", end="", file=sys.stderr)
    print(f"{g.prompt_tokens} prompt tokens, prefill {g.first_token:.2f} s; {g.new_tokens} new tokens in "
          f"{g.seconds:.2f} s ({g.new_tokens / g.seconds if g.seconds else 0:.1f} tok/s overall, "
          f"{g.decode_tokens_per_s:.1f} tok/s decoding)", file=sys.stderr)
    return 0


def _fit_history(tok, history: list[dict], prompt: str, layout: str, budget: int | None) -> list[dict]:
    """Drop the oldest turns (never the system message) until the prompt fits ``budget`` tokens."""
    if budget is None:
        return history
    head = history[:1] if history and history[0]["role"] == "system" else []
    turns = history[len(head):]
    while turns and len(encode_messages(tok, head + turns + [{"role": "user", "content": prompt}], layout)) > budget:
        turns = turns[2:] if len(turns) > 1 else []
    return head + turns


def _run_chat(args) -> int:
    model, tok = _load(args)
    layout = resolve_layout(tok, args.template, fallback="plain")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("type a message; /reset clears the history, /exit quits", file=sys.stderr)
    limit = context_limit(model)
    budget = None if limit is None else max(1, limit - min(args.max_new_tokens, limit // 2))
    with inference_cache(model, args.dequant_cache):  # dequantize once for the whole session
        while True:
            if interactive:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                history = list(system)
                print("(history cleared)", file=sys.stderr)
                continue
            history = _fit_history(tok, history, text, layout, budget)
            try:
                answer = generate(model, tok, text, args.max_new_tokens, args.temperature, args.top_p,
                                  chat=layout, stream=_write, history=history, cache=args.dequant_cache,
                                  graph=None if args.cuda_graph else False)
            except QLoraError as e:  # e.g. a message longer than the context: say so, keep chatting
                print(f"qlora chat: {e}", file=sys.stderr)
                continue
            _write("\n")
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer.strip()}]
    return 0
