"""`qlora plan`: the byte counts of the frozen model, LoRA, gradients and optimizer states equal
those of a model really built (and stepped) on the CPU; the activation terms follow their
formulas; the CLI prints a breakdown and a verdict; bad input gives one-line errors."""
import json

import pytest
import torch
import transformers

from qlora import cli, plan
from qlora.errors import QLoraError
from qlora.linear import QLoRALinear
from qlora.model import LoraSettings, QuantSettings, build_random
from qlora.optim import make_optimizer

GiB = 1 << 30


def _llama(tied=False):
    # odd sizes: short last quantization blocks, scales that do not fill a DQ block of 256
    return transformers.LlamaConfig(hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=101, tie_word_embeddings=tied)


def _qwen2():  # q/k/v biases
    return transformers.Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=80, tie_word_embeddings=False)


def _storages(tensors) -> int:
    seen = {}
    for t in tensors:
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    return sum(seen.values())


@pytest.mark.parametrize("cfg_fn,target,dq,tied", [
    (_llama, "all-linear", True, False), (_llama, "q_proj,v_proj", False, True), (_qwen2, "all-linear", True, False)])
def test_model_bytes_equal_a_built_model(cfg_fn, target, dq, tied):
    cfg = cfg_fn(tied) if cfg_fn is _llama else cfg_fn()
    model = build_random(cfg, QuantSettings(double_quant=dq, compute_dtype="bf16"), LoraSettings(r=4, target=target),
                         dtype="bf16", progress=False)  # the plan counts bf16 (a GPU's auto), whatever this CPU's is
    counts = plan.count_model(cfg, rank=4, target=target, double_quant=dq, device="cpu")
    q = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    assert counts["weights_4bit"] == _storages(m.weight_packed for m in q)
    dq_tensors = [t for m in q for t in (m.absmax, m.code, m.nested_absmax, m.nested_code) if t is not None]
    assert counts["dq_constants"] == _storages(dq_tensors)
    lora = [p for p in model.parameters() if p.requires_grad]
    assert counts["lora_params"] == _storages(lora)
    assert sorted(counts["lora_numels"]) == sorted(p.numel() for p in lora)
    everything = list(model.parameters()) + list(model.buffers())
    assert counts["weights_4bit"] + counts["dq_constants"] + counts["frozen_16bit"] + counts["lora_params"] \
        == _storages(everything)
    assert counts["tied"] == tied
    assert counts["quantized_params"] == sum(m.in_features * m.out_features for m in q)


def _saved_bytes(fn, model) -> int:
    """Bytes of the tensors autograd saves while ``fn`` runs, but ``model``'s own (weights saved by reference)."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            seen.setdefault(t.untyped_storage().data_ptr(), t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dora_bytes_equal_a_built_model_and_its_saved_outputs(dropout):
    """DoRA: a magnitude per output row (trained, in the LoRA dtype), the base's squared row norms (fp32) and,
    per token, each adapted linear's 16-bit output saved for the magnitude's gradient (with dropout: two outputs,
    the dropped input in place of the input)."""
    cfg = _llama()
    model = build_random(cfg, QuantSettings(compute_dtype="bf16"), LoraSettings(r=4, dora=True, dropout=0.0),
                         dtype="bf16", progress=False)
    model(input_ids=torch.randint(0, 101, (1, 5)))  # the row norms are computed on first use
    plain, dora = plan.count_model(cfg, rank=4, device="cpu"), plan.count_model(cfg, rank=4, device="cpu", dora=True)
    q = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    lora = [p for p in model.parameters() if p.requires_grad]
    assert dora["lora_params"] == _storages(lora) and sorted(dora["lora_numels"]) == sorted(p.numel() for p in lora)
    assert dora["frozen_16bit"] - plain["frozen_16bit"] == sum(m._dora_wn2[1].numel() * 4 for m in q)
    assert dora["adapted_out"] == sum(m.out_features for m in q) // cfg.num_hidden_layers
    drop = build_random(cfg, QuantSettings(compute_dtype="bf16"), LoraSettings(r=4, dora=True, dropout=dropout),
                        dtype="bf16", progress=False) if dropout else model
    layer = next(m for m in drop.modules() if isinstance(m, QLoRALinear) and m.in_features != m.out_features)

    def extra(n: int) -> int:  # saved bytes of DoRA's forward over plain LoRA's, on n tokens
        x = torch.randn(n, layer.in_features, dtype=torch.bfloat16)
        with_dora = _saved_bytes(lambda: layer(x), drop)
        magnitude, layer.lora_magnitude = layer.lora_magnitude, None
        layer.lora_dropout.eval()  # plain LoRA, its dropout fused into its products as on a GPU: nothing more saved
        without = _saved_bytes(lambda: layer(x), drop)
        layer.lora_magnitude = magnitude
        layer.lora_dropout.train()
        return with_dora - without
    # per token (the rank- and row-sized terms cancel between two lengths)
    assert extra(15) - extra(7) == 8 * 2 * layer.out_features * (2 if dropout else 1)
    big = plan.shape_config("llama-3.1-8b")
    outs = 3 * 4096 + 2 * 1024 + 2 * 14336
    a, b = plan.estimate(big, 2048, 2, 16, dropout=dropout), plan.estimate(big, 2048, 2, 16, dropout=dropout, dora=True)
    assert b["details"]["one_block"] - a["details"]["one_block"] == 4096 * 2 * outs * (2 if dropout else 1)
    assert sum(b["components"].values()) == b["peak"] and b["settings"]["dora"]


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit"])
def test_gradient_and_optimizer_bytes_equal_a_real_step(optim):
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64)
    model = build_random(cfg, QuantSettings(compute_dtype="bf16"), LoraSettings(r=16, dropout=0.0), dtype="bf16",
                         progress=False)  # some tensors >= 4096
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optim)
    ids = torch.randint(0, 64, (1, 8))
    model(input_ids=ids).logits.float().sum().backward()
    counts = plan.count_model(cfg, rank=16, device="cpu")
    assert counts["lora_params"] == sum(p.grad.numel() * p.grad.element_size() for p in params)
    opt.step()
    assert plan.optimizer_state_bytes(counts["lora_numels"], optim) == opt.state_bytes()["device"]
    assert plan.optimizer_state_bytes(counts["lora_numels"], "paged_" + optim) == opt.state_bytes()["device"]
    if optim == "adamw8bit":
        assert any(n < 4096 for n in counts["lora_numels"]) and any(n >= 4096 for n in counts["lora_numels"])


def test_activation_terms_follow_their_formulas():
    cfg = plan.shape_config("llama-3.1-8b")
    L, H = 32, 4096
    a = plan.estimate(cfg, 2048, 2, 16, "adamw")
    assert a["details"]["saved_block_inputs"] == L * 4096 * H * 2
    assert a["host"] == {"activations": 0, "optimizer_states": 0, "embeddings": 0, "weights": 0}
    b = plan.estimate(cfg, 2048, 2, 16, "adamw", offload=True, embed_offload=True)
    assert b["details"]["saved_block_inputs"] == 0
    assert b["host"]["activations"] >= L * 4096 * H * 2 and b["host"]["embeddings"] == 128256 * H * 2
    assert b["peak"] < a["peak"] - 128256 * H * 2
    # twice the tokens: the token-proportional part doubles
    c = plan.estimate(cfg, 4096, 2, 16, "adamw")
    assert abs(c["details"]["one_block"] - 2 * a["details"]["one_block"]) <= 2
    # 8-bit states are ~4x smaller; a paged budget keeps only that much on the GPU
    d = plan.estimate(cfg, 2048, 2, 16, "adamw8bit")
    assert 3.8 < a["components"]["optimizer_states"] / d["components"]["optimizer_states"] < 4.0
    e = plan.estimate(cfg, 2048, 2, 16, "paged_adamw", page_budget=1000)
    assert e["components"]["optimizer_states"] == 1000 and e["host"]["optimizer_states"] == 8 * 41943040 - 1000
    # LoRA dropout: a dropped copy per adapted input only where it is not fused into the LoRA products
    f = plan.estimate(cfg, 2048, 2, 16, "adamw", dropout=0.05)
    g = plan.estimate(cfg, 2048, 2, 16, "adamw", dropout=0.05, fused_dropout=False)
    assert f["peak"] == a["peak"]
    assert g["details"]["one_block"] - a["details"]["one_block"] == pytest.approx(4096 * (14.4 * H + 0.6 * 14336), abs=2)
    # the components add up to the peak
    for est in (a, b, c, d, e, f, g):
        assert sum(est["components"].values()) == est["peak"]


def test_tiled_mlp_terms():
    """Long micro-batches: the MLP's I-sized tensors are modelled for one chunk, not for every token; shorter
    ones are estimated as before. Issue 29: 8B at 409,600 tokens (batch 1, r 16, offload) fits 80 GB."""
    from qlora.tiled import CHUNK_ELEMENTS, tile_rows
    cfg = plan.shape_config("llama-3.1-8b")
    H, I = 4096, 14336
    kw = dict(rank=16, dropout=0.0, offload=True, gpu_mem=80 * 10 ** 9)
    for n in (4096, 16384):  # untiled: the same estimate with tiling modelled or not
        assert tile_rows(n, I) == 0
        assert plan.estimate(cfg, n, 1, **kw) == plan.estimate(cfg, n, 1, mlp_tiling=False, **kw)
    n = 409600
    tiled, untiled = plan.estimate(cfg, n, 1, **kw), plan.estimate(cfg, n, 1, mlp_tiling=False, **kw)
    rows = CHUNK_ELEMENTS // I
    assert tiled["details"]["mlp_chunk_tokens"] == rows and untiled["details"]["mlp_chunk_tokens"] == 0
    assert untiled["details"]["one_block"] - tiled["details"]["one_block"] == pytest.approx(
        (n - rows) * plan.ACT["block_i"] * I, abs=2)
    assert plan.fits(tiled, 80 * 10 ** 9) and not plan.fits(untiled, 80 * 10 ** 9)
    assert tiled["settings"]["mlp_tiled"] and not untiled["settings"]["mlp_tiled"]
    assert plan.max_fit(cfg, 80 * 10 ** 9, batch=1, rank=16, dropout=0.0, offload=True) >= 400_000
    # a block kept without recompute saves no I-sized tensor when tiled
    c = plan.counts_for(cfg, rank=16)
    kept = plan.activation_model(c, n, 32, offload=False)
    assert kept["saved"] == pytest.approx(32 * n * plan.ACT["saved_h"] * H, abs=32)
    # a mixture of experts is modelled untiled
    moe = plan.counts_for(plan.shape_config("mixtral-8x7b"), rank=16)
    assert plan.tiled_rows(moe, n) == 0


def test_max_fit_is_the_edge_of_fitting():
    cfg = plan.shape_config("llama-3.2-1b")
    kw = dict(rank=16, optim="paged_adamw8bit")
    mem = 12 * GiB
    b = plan.max_fit(cfg, mem, seq=2048, **kw)
    assert b >= 1
    assert plan.fits(plan.estimate(cfg, 2048, b, gpu_mem=mem, **kw), mem)
    assert not plan.fits(plan.estimate(cfg, 2048, b + 1, gpu_mem=mem, **kw), mem)
    s = plan.max_fit(cfg, mem, batch=1, **kw)
    assert s % 128 == 0 and plan.fits(plan.estimate(cfg, s, 1, gpu_mem=mem, **kw), mem)
    assert not plan.fits(plan.estimate(cfg, s + 128, 1, gpu_mem=mem, **kw), mem)
    assert plan.check_fits(cfg, 2048, b, mem, **kw) is None
    msg = plan.check_fits(cfg, 2048, 4 * b + 4, mem, **kw)
    assert "--batch-size" in msg and "\n" not in msg


def test_cli_breakdown_and_verdict(capsys):
    assert cli.main(["plan", "--shape", "llama-3.1-8b", "--seq", "2048", "--batch", "2", "--gpu-mem", "24GiB"]) == 0
    out = capsys.readouterr().out
    for label in ("4-bit weights", "DQ constants", "16-bit embeddings", "LoRA parameters", "LoRA gradients",
                  "optimizer states", "activations", "workspace", "predicted peak"):
        assert label in out
    assert "fits in 24.0 GiB" in out and "largest batch at seq 2048" in out
    assert cli.main(["plan", "--shape", "llama-3.1-70b", "--seq", "2048", "--batch", "1", "--gpu-mem", "4GiB"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit in 4.0 GiB" in out and "smaller model" in out and "GPU with" in out
    # a tight budget for the 8B shape: the message names the changes that fit
    assert cli.main(["plan", "--shape", "8b", "--seq", "8192", "--batch", "2", "--dropout", "0",
                     "--gpu-mem", "14GB"]) == 1
    out = capsys.readouterr().out
    assert "--batch-size" in out and "--offload-activations" in out
    assert cli.main(["plan", "--shape", "8b", "--seq", "2048", "--batch", "2", "--json", "--gpu-mem", "80GB"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["fits"] is True and js["max_batch"] >= 2 and sum(js["components"].values()) == js["peak"]


def test_cli_offload_optimizer_takes_the_states_off_the_peak(capsys):
    base = ["plan", "--shape", "8b", "--seq", "2048", "--batch", "2", "--rank", "16", "--dropout", "0",
            "--offload", "true", "--json", "--gpu-mem", "80GB"]
    assert cli.main(base) == 0
    on_gpu = json.loads(capsys.readouterr().out)
    assert cli.main(base + ["--offload-optimizer", "true"]) == 0
    paged = json.loads(capsys.readouterr().out)
    states = on_gpu["components"]["optimizer states"] if "optimizer states" in on_gpu["components"] else None
    # 41.9M LoRA parameters x 8 bytes of AdamW moments leave the GPU
    assert paged["peak"] == pytest.approx(on_gpu["peak"] - 41_943_040 * 8, rel=0.01), (on_gpu, paged)
    assert states is None or states > 0
    assert cli.main(["plan", "--shape", "8b", "--optim", "adamw", "--offload-optimizer", "true"]) != 0


def test_cli_takes_train_s_shape_spelling(capsys):
    """`--model shape:NAME`, as `qlora train` takes it, plans the same as `--shape NAME`."""
    args = ["--seq", "2048", "--batch", "2", "--rank", "16", "--json", "--gpu-mem", "24GiB"]
    assert cli.main(["plan", "--shape", "llama-3.1-8b"] + args) == 0
    by_shape = json.loads(capsys.readouterr().out)
    assert cli.main(["plan", "--model", "shape:llama-3.1-8b"] + args) == 0
    by_model = json.loads(capsys.readouterr().out)
    assert by_model == by_shape and by_shape["peak"] > 5 * 2**30


def test_cli_reads_only_the_config_of_a_model_dir(tmp_path, capsys):
    from tests.tiny import make_tiny_model
    d = make_tiny_model(tmp_path / "m")
    assert cli.main(["plan", "--model", str(d), "--seq", "64", "--batch", "2", "--gpu-mem", "8GiB"]) == 0
    assert "fits in 8.0 GiB" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["plan", "--shape", "llama-9000"], "unknown shape 'llama-9000'"),
    (["plan", "--shape", "8b", "--gpu-mem", "24XB"], "cannot read the memory size '24XB'"),
    (["plan", "--shape", "8b", "--seq", "0"], "seq must be a positive integer"),
    (["plan", "--model", "/nonexistent/model"], "no such file or directory"),
    (["plan", "--model", "shape:llama-9000"], "unknown shape 'llama-9000'"),
])
def test_errors_are_one_line(argv, needle, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_parse_size():
    assert plan.parse_size("24GiB") == 24 * GiB == plan.parse_size("24G") == plan.parse_size("24")
    assert plan.parse_size("80GB") == 80 * 10**9
    assert plan.parse_size("512MiB") == 512 << 20 and plan.parse_size("1.5TiB") == int(1.5 * (1 << 40))
    for bad in ("", "-3G", "G", "3 parsecs", "0"):
        with pytest.raises(QLoraError):
            plan.parse_size(bad)


def test_constants_follow_the_code_they_model():
    from qlora import optim
    from qlora.kernels import loss
    assert plan.PAGED_CHUNK == optim.PAGED_CHUNK_BYTES
    assert plan.CE_CHUNK_ELEMENTS == loss.CHUNK_ELEMENTS
