"""Generation and chat: greedy output against transformers' own generate on the dequantized
model, streaming, stopping, history, layouts shared with training, sampling, adapters, CLI."""
import copy
import io
import sys

import pytest
import torch

from qlora.cli import build_parser, main
from qlora.data import IGNORE, tokenize_records
from qlora.errors import QLoraError
from qlora.generate import encode_messages, generate, generate_full, load_for_inference, stop_token_ids
from qlora.linear import QLoRALinear

from helpers import EOS, USER, chat_ids, load, make_model_dir, make_tokenizer, reference_model


def ref_answer(ref, tok, ids, max_new_tokens, eos=(EOS,)):
    """Greedy new tokens from transformers' generate, cut at the first EOS."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                           eos_token_id=list(eos), pad_token_id=0)[0, len(ids):].tolist()
    cut = next((i for i, t in enumerate(out) if t in eos), len(out))
    return out[:cut]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_model_dir(tmp_path_factory.mktemp("gen") / "m")
    model, tok = load(path)
    return path, model, tok, reference_model(path, model)




# ------------------------------------------------------------------------------ generation
def test_greedy_equals_transformers_generate(tiny):
    path, model, tok, ref = tiny
    ids = chat_ids(tok, USER)
    want = ref_answer(ref, tok, ids, 12)
    assert len(want) >= 3  # the test model says something before EOS
    g = generate_full(model, tok, USER[0]["content"], max_new_tokens=12)
    assert g.text == tok.decode(want, skip_special_tokens=True)
    assert g.prompt_tokens == len(ids) and g.new_tokens == len(want) + (len(want) < 12)
    # without the dequant cache: the same tokens (per-forward dequantization)
    assert generate(model, tok, USER[0]["content"], max_new_tokens=12, cache=False) == g.text
    assert all(m._wcache is None for m in model.modules() if isinstance(m, QLoRALinear))  # cache released


def test_streaming_pieces_add_up(tiny):
    _, model, tok, _ = tiny
    pieces = []
    text = generate(model, tok, "tell me a story", max_new_tokens=10, stream=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == text


def test_stops_at_eos_and_end_of_turn(tiny):
    path, model, tok, ref = tiny
    full = ref_answer(ref, tok, chat_ids(tok, USER), 8)
    assert len(full) >= 3
    stop_word = tok.convert_ids_to_tokens(full[2])
    t2 = copy.deepcopy(tok)
    t2.eos_token = stop_word  # the third greedy token now ends the answer
    assert full[2] in stop_token_ids(t2, model)
    pieces = []
    got = generate(model, t2, USER[0]["content"], max_new_tokens=8, stream=pieces.append)
    assert got == tok.decode(full[:2], skip_special_tokens=True) == "".join(pieces)
    # end-of-turn tokens of common templates count as stops when the vocabulary has them
    t3 = make_tokenizer()
    t3.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    assert t3.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(t3)


def test_history_is_applied(tiny):
    _, model, tok, ref = tiny
    history = [{"role": "system", "content": "you are a cat"}, {"role": "user", "content": "hello"},
               {"role": "assistant", "content": "hello how are you"}]
    prompt = "tell me a story about the dog"
    with_h = ref_answer(ref, tok, chat_ids(tok, history + [{"role": "user", "content": prompt}]), 10)
    without = ref_answer(ref, tok, chat_ids(tok, [{"role": "user", "content": prompt}]), 10)
    assert with_h != without  # the reference can tell whether history was used
    assert generate(model, tok, prompt, max_new_tokens=10, history=history) == tok.decode(with_h)
    assert generate(model, tok, prompt, max_new_tokens=10) == tok.decode(without)


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_prompt_layout_is_the_training_prefix(template):
    """The generation prompt is exactly the training sequence up to the first scored token."""
    tok = make_tokenizer()
    rec = {"messages": [{"role": "system", "content": "you are a dog"}, {"role": "user", "content": "hello"},
                        {"role": "assistant", "content": "yes one two"}, {"role": "user", "content": "the sky ?"},
                        {"role": "assistant", "content": "blue ."}]}
    (ex,), _ = tokenize_records([rec], "chat", tok, template=template)
    msgs = rec["messages"]
    for upto in (2, 4):  # before each assistant turn
        ids = encode_messages(tok, msgs[:upto], template)
        scored = [i for i, lab in enumerate(ex.labels) if lab != IGNORE]
        assert ex.input_ids[:len(ids)] == ids
        assert all(lab == IGNORE for lab in ex.labels[:len(ids)]) or upto == 4
        assert len(ids) in scored  # the next token is a scored (response) token
    raw = encode_messages(tok, [{"role": "user", "content": "the sky is"}], "none")
    assert raw == tok("the sky is")["input_ids"] and raw[0] == 1


def test_raw_and_plain_generation(tiny):
    _, model, tok, ref = tiny
    for layout in ("none", "plain"):
        ids = encode_messages(tok, [{"role": "user", "content": "the capital of france is"}], layout)
        want = tok.decode(ref_answer(ref, tok, ids, 6))
        assert generate(model, tok, "the capital of france is", max_new_tokens=6, chat=layout) == want
    assert generate(model, tok, "the capital of france is", max_new_tokens=6, chat=False) == \
        generate(model, tok, "the capital of france is", max_new_tokens=6, chat="none")


def test_sampling(tiny):
    _, model, tok, _ = tiny
    greedy = generate(model, tok, "hello", max_new_tokens=8)
    torch.manual_seed(3)
    a = generate(model, tok, "hello", max_new_tokens=8, temperature=1.5)
    torch.manual_seed(3)
    assert generate(model, tok, "hello", max_new_tokens=8, temperature=1.5) == a  # seeded
    outs = set()
    for s in range(6):
        torch.manual_seed(s)
        outs.add(generate(model, tok, "hello", max_new_tokens=8, temperature=1.5))
    assert len(outs) > 1  # it does sample
    torch.manual_seed(0)  # a nucleus this small holds only the most likely token: greedy
    assert generate(model, tok, "hello", max_new_tokens=8, temperature=1.5, top_p=1e-6) == greedy
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(max_new_tokens=0)):
        with pytest.raises(QLoraError):
            generate(model, tok, "hello", **bad)


def test_adapter_matches_merged_reference(tiny, adapter_dir):
    path, _, tok, plain_ref = tiny
    model, _ = load(path, adapter_dir)
    assert sum(1 for m in model.modules() if isinstance(m, QLoRALinear) and m.r) == 4
    ref = reference_model(path, model)
    ids = chat_ids(tok, USER)
    want = ref_answer(ref, tok, ids, 10)
    assert want != ref_answer(plain_ref, tok, ids, 10)  # the adapter changes the answer
    assert generate(model, tok, USER[0]["content"], max_new_tokens=10) == tok.decode(want)


# ------------------------------------------------------------------------------------- cli
def run_cli(capsys, argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_cli(tiny, capsys):
    path, model, tok, _ = tiny
    threads = torch.get_num_threads()
    try:
        rc, out, err = run_cli(capsys, ["generate", "--model", str(path), "--prompt", "hello", "--max-new-tokens",
                                        "9", "--device", "cpu", "--dtype", "fp32", "--threads", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, err
    assert out == generate(model, tok, "hello", max_new_tokens=9) + "\n"
    assert "loaded" in err and "tok/s" in err
    rc, out, _ = run_cli(capsys, ["generate", "--model", str(path), "--prompt", "the sky is", "--no-chat-template",
                                  "--max-new-tokens", "5", "--device", "cpu", "--dtype", "fp32"])
    assert rc == 0 and out == generate(model, tok, "the sky is", max_new_tokens=5, chat=False) + "\n"


def test_chat_cli_piped(tiny, capsys, monkeypatch):
    path, model, tok, _ = tiny
    argv = ["chat", "--model", str(path), "--max-new-tokens", "6", "--device", "cpu", "--dtype", "fp32",
            "--system", "you are a dog"]
    rc, out, err = run_cli(capsys, argv, "hello\n\nthe sky ?\n/reset\nhello\n/exit\nnever read\n", monkeypatch)
    assert rc == 0, err
    a1, a2, a3 = out.split("\n")[:3]
    assert out.count("\n") == 3 and "cleared" in err
    system = [{"role": "system", "content": "you are a dog"}]
    assert a1 == generate(model, tok, "hello", max_new_tokens=6, history=system) == a3
    hist = system + [{"role": "user", "content": "hello"}, {"role": "assistant", "content": a1.strip()}]
    assert a2 == generate(model, tok, "the sky ?", max_new_tokens=6, history=hist)
    assert a2 != generate(model, tok, "the sky ?", max_new_tokens=6, history=system)  # history mattered
    rc, out, _ = run_cli(capsys, argv, "hello\n", monkeypatch)  # EOF ends the session
    assert rc == 0 and out == a1 + "\n"


def test_dequant_cache_once_per_command_and_off_on_request(tiny, capsys, monkeypatch):
    from qlora import linear
    path = tiny[0]
    entered = []
    real = linear.dequant_cache.__enter__
    monkeypatch.setattr(linear.dequant_cache, "__enter__", lambda self: entered.append(1) or real(self))
    base = ["--model", str(path), "--max-new-tokens", "3", "--device", "cpu", "--dtype", "fp32"]
    for argv, stdin, want in ((["generate", "--prompt", "hello"], None, 1),
                              (["generate", "--prompt", "hello", "--no-dequant-cache"], None, 0),
                              (["chat"], "hello\nthe sky ?\nyes\n", 1),  # one cache for the whole session
                              (["chat", "--no-dequant-cache"], "hello\nthe sky ?\n", 0)):
        entered.clear()
        rc, _, err = run_cli(capsys, argv + base, stdin, monkeypatch)
        assert rc == 0 and len(entered) == want, (argv, entered, err)


def test_inference_cache_covers_layers_the_gemv_does_not_serve(tiny):
    """On a CPU no layer decodes through the CUDA GEMV, so the dequant cache holds every 4-bit layer."""
    from qlora.generate import inference_cache
    from qlora.linear import QLoRALinear
    model = tiny[1]
    layers = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    cache = inference_cache(model)
    assert layers and cache.layers == layers and not any(m.prepare_decode() for m in layers)
    with cache:
        assert all(m._wcache is not None for m in layers)
    assert all(m._wcache is None for m in layers)


def test_inference_cache_takes_only_the_memory_there_is(tiny, monkeypatch, capsys):
    """With a memory budget (on a GPU: free memory less a reserve) the dequant cache copies the layers that fit,
    in order, says so, and the others dequantize per forward: the same answer as with every layer cached."""
    import qlora.generate as G
    from qlora.linear import QLoRALinear
    model, tok = tiny[1], tiny[2]
    layers = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    want = generate(model, tok, "what color is the sky ?", max_new_tokens=10)
    sizes = [m.out_features * m.in_features * m.compute_dtype.itemsize for m in layers]
    monkeypatch.setattr(G, "cache_budget", lambda device: sum(sizes[:3]))
    cache = G.inference_cache(model)
    assert cache.layers == layers[:3]
    assert "dequantized copy of 3 of 14 4-bit layers" in capsys.readouterr().err
    with cache:
        assert generate(model, tok, "what color is the sky ?", max_new_tokens=10) == want
        assert [m._wcache is not None for m in layers] == [True] * 3 + [False] * 11
    monkeypatch.setattr(G, "cache_budget", lambda device: 0)
    assert G.inference_cache(model).layers == []


def test_cache_budget_leaves_a_reserve(monkeypatch):
    import qlora.generate as G
    gib = 2 ** 30
    assert G.cache_budget("cpu") is None
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 24 * gib))
    assert G.cache_budget(torch.device("cuda", 0)) == int(10 * gib - 2.4 * gib)  # 10% of 24 GiB > 2 GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 16 * gib))
    assert G.cache_budget("cuda") == 8 * gib  # at least 2 GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * gib, 80 * gib))
    assert G.cache_budget("cuda") == 0


def test_chat_plain_fallback_without_template(tmp_path, capsys, monkeypatch):
    path = make_model_dir(tmp_path / "nt", template=None)
    model, tok = load(path)
    rc, out, err = run_cli(capsys, ["chat", "--model", str(path), "--max-new-tokens", "5", "--device", "cpu",
                                    "--dtype", "fp32"], "hello\n", monkeypatch)
    assert rc == 0, err
    assert out == generate(model, tok, "hello", max_new_tokens=5, chat="plain") + "\n"
    rc, _, err = run_cli(capsys, ["generate", "--model", str(path), "--prompt", "hi", "--template", "chat",
                                  "--device", "cpu"])
    assert rc == 2 and "no chat template" in err


def test_cli_errors(tiny, tmp_path, capsys):
    path = tiny[0]
    other = make_model_dir(tmp_path / "other", hidden=32)
    from qlora.adapters import save_adapter
    from qlora.model import LoraSettings, load_model
    m, _ = load_model(str(other), lora=LoraSettings(r=2), dtype="fp32", progress=False)
    bad_adapter = save_adapter(m, tmp_path / "bad_adapter")
    cases = [
        (["--model", str(tmp_path / "nope")], "not found"),
        (["--model", str(path), "--adapter", str(tmp_path / "no_adapter")], "adapter directory not found"),
        (["--model", str(path), "--adapter", str(bad_adapter)], "does not fit the model"),
        (["--model", str(path), "--temperature", "-1"], "temperature"),
        (["--model", str(path), "--device", "tpu"], "unknown device"),
        (["--model", str(path), "--threads", "0"], "--threads"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--model", str(path), "--device", "cuda"], "no CUDA GPU"))
    for extra, needle in cases:
        rc, out, err = run_cli(capsys, ["generate", "--prompt", "hi", "--device", "cpu", *extra])
        assert rc == 2, (extra, err)
        lines = err.strip().splitlines()
        assert needle in lines[-1] and lines[-1].startswith("qlora generate: error:"), (extra, err)
        assert "Traceback" not in err


def test_every_option_documented():
    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("generate", "chat", "eval"):
        for a in subs[name]._actions:
            if a.option_strings and a.dest != "help":
                assert a.help and ("default" in a.help or "same as" in a.help or a.required), (name, a.dest)
                shown = {str(a.default), f"{a.default:g}" if isinstance(a.default, float) else ""}
                assert a.required or a.const is not None or a.default is None or any(
                    f"default: {s}" in a.help for s in shown if s), (name, a.dest)


@pytest.mark.gpu
def test_cuda_matches_cpu(tiny):
    """On the GPU (Triton dequant when available), fp32: the same greedy answers as on the CPU,
    and bf16 answers that are well-formed."""
    path, cpu_model, tok, _ = tiny
    model, _ = load_for_inference(str(path), None, device="cuda", dtype="fp32", progress=False)
    assert next(model.parameters()).is_cuda
    for prompt, hist in (("what color is the sky ?", None), ("tell me a story", [{"role": "system", "content": "a cat"}])):
        want = generate(cpu_model, tok, prompt, max_new_tokens=12, history=hist)
        assert generate(model, tok, prompt, max_new_tokens=12, history=hist) == want
        assert generate(model, tok, prompt, max_new_tokens=12, history=hist, cache=False) == want
    bf16, _ = load_for_inference(str(path), None, device="cuda", dtype="bf16", progress=False)
    pieces = []
    text = generate(bf16, tok, "hello", max_new_tokens=8, stream=pieces.append)
    assert "".join(pieces) == text


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9),
                    reason="the CUDA GEMV needs compute capability >= 9.0")
def test_hopper_decodes_from_4bit_weights_without_cache(tiny):
    """Where the CUDA GEMV runs, the dequant cache leaves the 4-bit layers out (one-token steps read them
    directly), and the answer is the one generated with the cache switched off."""
    from qlora.generate import inference_cache
    from qlora.linear import QLoRALinear
    path, _, tok, _ = tiny
    model, _ = load_for_inference(str(path), None, device="cuda", dtype="bf16", progress=False)
    layers = [m for m in model.modules() if isinstance(m, QLoRALinear) and m.weight_packed is not None]
    assert layers and inference_cache(model).layers == []
    assert all(m._gemv.ok for m in layers)
    want = generate(model, tok, "what color is the sky ?", max_new_tokens=12, cache=False)
    assert generate(model, tok, "what color is the sky ?", max_new_tokens=12) == want


# --------------------------------------------------------------------------- embedded model
@pytest.mark.slow
def test_embedded_model_knows_paris(capsys):
    from qlora.embedded import embedded_model_path
    try:
        embedded_model_path()
    except QLoraError as e:
        pytest.skip(str(e))
    threads = torch.get_num_threads()
    try:  # one thread: several times faster on a small busy CPU (docs/generate.md)
        rc = main(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "8", "--temperature", "0",
                   "--device", "cpu", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Paris" in out, out
