"""qlora.decoding: the static-cache decoding loop (CUDA graphs on a GPU) against transformers' generate on
the same model, its sampler against the distribution computed in float64, and the cases it declines."""
import pytest
import torch

from qlora.decoding import decode, kv_bytes, pick, unsupported
from qlora.generate import generate_full, load_for_inference
from helpers import EOS, USER, chat_ids, make_model_dir

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_model_dir(tmp_path_factory.mktemp("dec") / "m")
    model, tok = load_for_inference(str(path), None, device="cpu", dtype="fp32", progress=False)
    return path, model.eval(), tok


def hf_greedy(model, ids, n, stops=()):
    """transformers' generate on the same model: greedy, dynamic KV cache, exactly n tokens unless a stop comes."""
    x = torch.tensor([ids], device=next(model.parameters()).device)
    kw = dict(eos_token_id=list(stops)) if stops else dict(eos_token_id=None, min_new_tokens=n)
    with torch.no_grad():
        return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                              pad_token_id=0, use_cache=True, **kw)[0, len(ids):].tolist()


def test_greedy_tokens_equal_transformers_generate(tiny):
    _, model, tok = tiny
    for prompt in ("what color is the sky ?", "tell me a story about a cat and then", "hello"):
        ids = tok(prompt)["input_ids"]
        want = hf_greedy(model, ids, 24)
        seen = []
        with torch.no_grad():
            got = decode(model, ids, 24, on_token=seen.append, graph=False)
        assert got == want and seen == got
    # a one-token answer is the prompt's forward alone
    with torch.no_grad():
        assert decode(model, ids, 1) == want[:1]
    from qlora.errors import QLoraError
    for bad in (([], 4), (ids, 0)):
        with pytest.raises(QLoraError):
            decode(model, *bad)


def test_stops_at_the_first_stop_token(tiny):
    _, model, tok = tiny
    ids = chat_ids(tok, USER)
    free = hf_greedy(model, ids, 12)
    stop = free[3]  # a token the greedy answer reaches: the loop ends there, the stop token last
    with torch.no_grad():
        got = decode(model, ids, 12, stops={stop, EOS})
    want = hf_greedy(model, ids, 12, stops=(stop, EOS))
    assert got == want and got[-1] == stop and len(got) <= 4


def test_eager_attention_gets_an_additive_mask(tiny):
    """With eager attention the mask is added to the scores (0 / dtype min), not a boolean: same tokens."""
    _, model, tok = tiny
    ids = tok("the sky is")["input_ids"]
    with torch.no_grad():
        want = decode(model, ids, 16)
        model.config._attn_implementation = "eager"
        try:
            assert unsupported(model, 64) is None
            assert decode(model, ids, 16) == want == hf_greedy(model, ids, 16)
        finally:
            model.config._attn_implementation = "sdpa"


def test_sampler_matches_the_nucleus_distribution():
    """pick() draws from softmax(logits / T) restricted to the smallest top set reaching top_p: frequencies over
    many rows against that distribution computed in float64."""
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 200_000
    for t, top_p in ((1.0, 1.0), (0.7, 1.0), (1.3, 0.8), (1.0, 0.5)):
        p = torch.softmax(logits.double() / t, -1)
        order = p.argsort(descending=True)
        before = p[order].cumsum(0) - p[order]
        keep = torch.zeros_like(p, dtype=torch.bool)
        keep[order[before < top_p]] = True
        want = torch.where(keep, p, 0.0)
        want /= want.sum()
        got = torch.bincount(pick(logits.expand(rows, -1), t, top_p), minlength=len(logits)).double() / rows
        assert (got[~keep] == 0).all(), (t, top_p)  # tokens outside the nucleus never drawn
        assert torch.allclose(got, want, atol=4e-3), (t, top_p, got, want)
    assert (pick(logits.expand(100, -1), 0.0, 1.0) == 0).all()  # greedy
    assert (pick(logits.expand(100, -1), 2.0, 1e-6) == 0).all()  # a tiny nucleus is the top token


def test_declines_what_it_cannot_run(tiny):
    _, model, _ = tiny
    assert unsupported(model, 64) is None
    cfg = model.config
    for attr, value, needle in (("layer_types", ["full_attention", "sliding_attention"], "sliding"),
                                ("sliding_window", 32, "sliding-window"),
                                ("rope_parameters" if hasattr(cfg, "rope_parameters") else "rope_scaling",
                                 {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, "RoPE"),
                                ("_attn_implementation", "flash_attention_2", "flash_attention_2")):
        old = getattr(cfg, attr, None)
        setattr(cfg, attr, value)
        try:
            assert needle in unsupported(model, 64)
        finally:
            setattr(cfg, attr, old)
    cfg.sliding_window = 32  # Mistral's config: use_sliding_window unset (None) means on; Qwen2's: False = off
    try:
        for flag, ok in ((None, False), (True, False), (False, True)):
            cfg.use_sliding_window = flag
            assert (unsupported(model, 64) is None) == ok, flag
    finally:
        cfg.sliding_window = None
        del cfg.use_sliding_window
    assert unsupported(model, 64) is None
    # 2 layers x (k, v) x 2 kv heads x head_dim 16 x fp32
    assert kv_bytes(model, 100) == 2 * 2 * 2 * 16 * 100 * 4


def test_generate_uses_it_on_cuda_only(tiny, monkeypatch):
    """On the CPU generate_full keeps transformers' generate (decode is not called)."""
    import qlora.decoding as D
    _, model, tok = tiny
    monkeypatch.setattr(D, "decode", lambda *a, **k: pytest.fail("decode() on the CPU"))
    assert generate_full(model, tok, "hello", max_new_tokens=4).new_tokens >= 1


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_graph_decoding_equals_eager_steps(tiny, dtype):
    """The graph replays give the tokens of the same loop run eagerly and of transformers' generate; the
    capture succeeds (no fallback); generate_full takes this path and streams the same text."""
    path, _, tok = tiny
    model, _ = load_for_inference(str(path), None, device="cuda", dtype=dtype, progress=False)
    model.eval()
    ids = chat_ids(tok, USER)
    from qlora.linear import lora_cast
    failed = []
    with torch.no_grad(), lora_cast(model):
        eager = decode(model, ids, 20, graph=False)
        graphed = decode(model, ids, 20, graph=True, log=failed.append)
        if dtype == "fp32":
            assert eager == hf_greedy(model, ids, 20)
    assert failed == [] and graphed == eager
    pieces = []
    g = generate_full(model, tok, USER[0]["content"], max_new_tokens=20, stream=pieces.append)
    off = generate_full(model, tok, USER[0]["content"], max_new_tokens=20, graph=False)
    assert g.text == off.text == "".join(pieces)
    # sampling inside the graph: seeded runs repeat, different seeds differ
    with torch.no_grad(), lora_cast(model):
        runs = []
        for seed in (5, 5, 6, 7):
            torch.manual_seed(seed)
            runs.append(decode(model, ids, 20, temperature=1.5, log=failed.append))
    assert failed == [] and runs[0] == runs[1] and len({tuple(r) for r in runs}) > 1


@pytest.mark.gpu
@cuda
def test_repeated_graph_decoding_keeps_no_memory(tiny):
    """Each call captures its own graph and cache; nothing stays behind (a new side stream per call once left
    cuBLAS's 32 MiB workspace behind every time)."""
    path, _, tok = tiny
    model, _ = load_for_inference(str(path), None, device="cuda", dtype="bf16", progress=False)
    model.eval()
    ids = chat_ids(tok, USER)
    seen = []
    with torch.no_grad():
        for n in (10, 20, 10, 30):
            decode(model, ids, n)
            torch.cuda.synchronize()
            seen.append(torch.cuda.memory_allocated())
    assert seen[1] == seen[2] == seen[3], seen


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_graph_decoding_with_an_adapter(tiny, adapter_dir, dtype, monkeypatch):
    """With LoRA factors (q_proj, down_proj) the graph adds them through the one-row kernel: the same tokens as
    the eager loop, and in fp32 as transformers' generate (torch's LoRA path)."""
    from qlora.kernels import lora_row
    from qlora.linear import lora_cast
    path, _, tok = tiny
    model, _ = load_for_inference(str(path), str(adapter_dir), device="cuda", dtype=dtype, progress=False)
    model.eval()
    calls = []
    real = lora_row.lora_row_
    monkeypatch.setattr(lora_row, "lora_row_", lambda *a: calls.append(1) or real(*a))
    ids = chat_ids(tok, USER)
    failed = []
    with torch.no_grad(), lora_cast(model):
        eager = decode(model, ids, 20, graph=False)
        graphed = decode(model, ids, 20, log=failed.append)
        if dtype == "fp32":
            assert graphed == hf_greedy(model, ids, 20)
    assert failed == [] and graphed == eager and calls


@pytest.mark.slow
def test_real_model_tokens_equal_transformers_generate():
    """The embedded SmolLM2-135M (real weights, 4-bit, fp32 compute): the static-cache loop's greedy tokens for a chat
    prompt are transformers' generate's (the loop that CUDA graphs replay on a GPU, run eagerly here). In bf16
    the two differ in rounding (attention over the static cache's masked length against the dynamic cache's),
    so a greedy choice between two nearly equal tokens can go the other way: here at the 21st token."""
    from qlora.embedded import embedded_model_path
    from qlora.errors import QLoraError
    from qlora.generate import encode_messages, resolve_layout
    try:
        embedded_model_path()
    except QLoraError as e:
        pytest.skip(str(e))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # several times faster on a small busy CPU (docs/generate.md)
    try:
        model, tok = load_for_inference(None, None, device="cpu", dtype="fp32", progress=False)
        model.eval()
        ids = encode_messages(tok, [{"role": "user", "content": "Explain what a GPU is in two sentences."}],
                              resolve_layout(tok, None))
        want = hf_greedy(model, ids, 24)
        with torch.no_grad():
            assert decode(model, ids, 24) == want
    finally:
        torch.set_num_threads(threads)
