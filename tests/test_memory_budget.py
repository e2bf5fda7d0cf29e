"""--memory-budget: blocks kept without recompute give the same losses and gradients as recomputing them, bit for
bit; the chooser keeps more blocks for more budget and never picks a policy the plan says does not fit; a budget
nothing fits is one line before the model loads; the header, metrics, CLI and `qlora plan --memory-budget`."""
import json

import pytest
import torch
import transformers

import qlora.linear as lin
from qlora.budget import auto_budget, choose, for_train, parse_budget
from qlora.cli import main
from qlora.errors import QLoraError
from qlora.loss import loss_sum
from qlora.model import LoraSettings, QuantSettings, build_random
from qlora.offload import ActivationOffloader, enable_checkpointing
from qlora.plan import (GiB, activation_model, counts_for, estimate, fits, kept_block_bytes_per_token, parse_size,
                        plan_kwargs, required_bytes, shape_config)
from qlora.train import TrainConfig, train

from helpers import DequantCounter, cfg, losses, nonzero_lora_b

LAYERS = 3


def _config(layers=LAYERS, hidden=64):
    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden + 32, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                    max_position_embeddings=512, tie_word_embeddings=False)


def _model(dtype):
    m = build_random(_config(), QuantSettings(compute_dtype=dtype), LoraSettings(r=4, alpha=8, dropout=0.0),
                     device="cpu", dtype=dtype, progress=False)
    return nonzero_lora_b(m)


def _batch(b=2, t=16):
    ids = torch.randint(0, 96, (b, t), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "labels": labels}


def _loss_and_grads(model, batch, count: DequantCounter | None = None):
    """Loss, LoRA gradients and, with ``count``, how often each block's layers dequantize in backward (its
    counts start again)."""
    model.zero_grad(set_to_none=True)
    loss = loss_sum(model, batch, "cpu")
    if count is not None:
        count.counts.clear()
        count.on = True
    loss.backward()
    if count is not None:
        count.on = False
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("offload", [False, True])
def test_kept_blocks_give_the_same_losses_and_gradients_bit_for_bit(monkeypatch, dtype, offload):
    """For K = 0..L kept blocks (with and without offload of the others' inputs): the same loss and gradients as
    no checkpointing at all, bit for bit; kept blocks dequantize each layer once in backward (no recompute), while
    checkpointed ones still skip down_proj in their recompute (test_offload's early-stop optimisation); only the
    checkpointed blocks' inputs are offloaded."""
    model, batch = _model(dtype), _batch()
    ref_loss, ref_grads = _loss_and_grads(model, batch)  # no checkpointing: nothing is recomputed
    count = DequantCounter(monkeypatch, model, on=False)
    for k in range(LAYERS + 1):
        keep = range(LAYERS - k, LAYERS)
        off = ActivationOffloader(min_bytes=0, include_cpu=True) if offload else None
        got = enable_checkpointing(model, offload=offload, offloader=off, keep=keep)
        loss, grads = _loss_and_grads(model, batch, count)
        assert torch.equal(loss, ref_loss), k
        for n, g in ref_grads.items():
            assert torch.equal(grads[n], g), (k, n)
        for layer in range(LAYERS):
            kept = layer in keep
            assert count.counts[(layer, "down_proj")] == 1, (k, layer, count.counts)
            for name in ("q_proj", "o_proj", "gate_proj", "up_proj"):
                assert count.counts[(layer, name)] == (1 if kept else 2), (k, layer, name, count.counts)
        if offload and k < LAYERS:
            assert got is off and off.stats["packed"] == LAYERS - k
        elif offload:
            assert got is None  # every block kept: nothing to offload


def test_kept_blocks_stay_on_the_device_under_an_offloader_around_the_whole_step():
    """The training step wraps its whole loss in the offloader's hooks (qlora.train.MicroStep): a kept block's
    activations must still stay where they are (the plan counts them on the device), so each block kept instead of
    checkpointed packs exactly one tensor less (its input), and the results are those without offload."""
    model, batch = _model("fp32"), _batch()
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    packed = []
    for k in range(LAYERS):
        off = ActivationOffloader(min_bytes=0, include_cpu=True)
        enable_checkpointing(model, offload=True, offloader=off, keep=range(LAYERS - k, LAYERS))
        model.zero_grad(set_to_none=True)
        with off.hooks():
            loss = loss_sum(model, batch, "cpu")
        loss.backward()
        assert torch.equal(loss.detach(), ref_loss)
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert torch.equal(p.grad, ref_grads[n]), (k, n)
        assert off.stats["unpacked"] == off.stats["packed"]
        packed.append(off.stats["packed"])
    assert packed == [packed[0] - k for k in range(LAYERS)], packed


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("offload", [False, True])
def test_blocks_keeping_their_mlp_gemms_give_the_same_losses_and_gradients_bit_for_bit(monkeypatch, dtype, offload):
    """keep_gemms (selective recompute): the same loss and gradients as no checkpointing, bit for bit, whichever
    blocks keep their gate/up outputs; those blocks' recompute dequantizes gate and up no more (backward only),
    the others' still do; a forward without gradients keeps nothing; two forwards before one backward (a DPO
    step's policy passes) each get their own outputs back."""
    model, batch = _model(dtype), _batch()
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    count = DequantCounter(monkeypatch, model, on=False)
    for gemms in ([0], [0, 2], list(range(LAYERS))):
        off = ActivationOffloader(min_bytes=0, include_cpu=True) if offload else None
        enable_checkpointing(model, offload=offload, offloader=off, keep=[1] if 1 not in gemms else [],
                             keep_gemms=gemms)
        loss, grads = _loss_and_grads(model, batch, count)
        assert torch.equal(loss, ref_loss), gemms
        for n, g in ref_grads.items():
            assert torch.equal(grads[n], g), (gemms, n)
        for layer in range(LAYERS):
            whole = layer == 1 and 1 not in gemms  # kept whole: nothing recomputed
            for name in ("gate_proj", "up_proj"):
                assert count.counts[(layer, name)] == (1 if layer in gemms or whole else 2), (gemms, layer, count.counts)
            assert count.counts[(layer, "q_proj")] == (1 if whole else 2), (gemms, layer, count.counts)
    with torch.no_grad():  # (evaluation, a DPO reference pass): nothing kept for a backward that never comes
        loss_sum(model, batch, "cpu")
    assert all(m._outputs == (None, None) for m in model.modules() if isinstance(m, lin.QLoRALinear))
    other = _batch(t=16)
    other["input_ids"] = other["input_ids"].flip(1)
    model.zero_grad(set_to_none=True)
    (loss_sum(model, batch, "cpu") + 0.5 * loss_sum(model, other, "cpu")).backward()
    both = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    enable_checkpointing(model)  # every block recomputed
    model.zero_grad(set_to_none=True)
    (loss_sum(model, batch, "cpu") + 0.5 * loss_sum(model, other, "cpu")).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, both[n]), n


def test_bad_keep_indices_are_one_line():
    with pytest.raises(QLoraError, match=r"blocks to keep must be indices in \[0, 3\)"):
        enable_checkpointing(_model("fp32"), keep=[3])
    with pytest.raises(QLoraError, match=r"blocks to keep must be indices in \[0, 3\)"):
        enable_checkpointing(_model("fp32"), keep_gemms=[-1])
    with pytest.raises(QLoraError, match=r"both kept whole and kept for their MLP GEMMs: \[2\]"):
        enable_checkpointing(_model("fp32"), keep=[2], keep_gemms=[2])


def test_kept_block_count_matches_what_autograd_saves():
    """The first-principles count of a kept (not checkpointed) block's saved bytes per token equals what autograd
    saves inside one bf16 block on the CPU (saved-tensor hooks, distinct storages, parameters and the RoPE tables
    made outside the block left out; the per-token slope of two lengths, so the per-layer LoRA casts cancel)."""
    h, i, heads, kvh = 128, 352, 4, 2
    config = transformers.LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=2, num_attention_heads=heads,
                                      num_key_value_heads=kvh, vocab_size=96, max_position_embeddings=512)
    config._attn_implementation = "sdpa"
    model = build_random(config, QuantSettings(compute_dtype="bf16"), LoraSettings(r=4, alpha=8, dropout=0.0),
                         device="cpu", dtype="bf16", progress=False).train()
    skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    block, saved = model.model.layers[1], {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def pre(mod, args, kw):
        for t in kw["position_embeddings"]:  # cos/sin: made once outside the blocks, shared by all
            skip.add(t.untyped_storage().data_ptr())
        hooks.__enter__()
    block.register_forward_pre_hook(pre, with_kwargs=True)
    block.register_forward_hook(lambda *a: hooks.__exit__(None, None, None))
    per = []
    for t in (32, 96):
        saved.clear()
        model(input_ids=torch.randint(0, 96, (2, t)))
        per.append(sum(saved.values()))
    slope = (per[1] - per[0]) / (2 * (96 - 32))
    assert slope == kept_block_bytes_per_token(h, i, heads, kvh, h // heads, rank=4)


def test_activation_model_ends_are_the_old_estimates_and_memory_grows_with_kept_blocks():
    """keep=0 is plain checkpointing and keep=L no checkpointing (the estimate as before); every kept block adds
    memory, and offload lowers what stays on the device."""
    config = shape_config("8b")
    kw = dict(rank=16, dropout=0.0)
    c = counts_for(config, **kw)
    ckpt = estimate(config, 2048, 2, counts=c, **kw)
    assert estimate(config, 2048, 2, counts=c, keep_blocks=0, **kw)["peak"] == ckpt["peak"]
    nockpt = estimate(config, 2048, 2, counts=c, grad_checkpointing=False, **kw)
    assert estimate(config, 2048, 2, counts=c, keep_blocks=32, **kw)["peak"] == nockpt["peak"]
    peaks = [estimate(config, 2048, 2, counts=c, keep_blocks=k, **kw)["peak"] for k in range(33)]
    assert all(a < b for a, b in zip(peaks, peaks[1:]))
    act = activation_model(c, 4096, 10, offload=True)
    assert act["host"] == 22 * 4096 * 4096 * 2  # the 22 checkpointed inputs, 16-bit
    from qlora.plan import ACT
    assert act["saved"] == pytest.approx(10 * 4096 * (ACT["saved_h"] * 4096 + ACT["saved_i"] * 14336), abs=1)
    with pytest.raises(QLoraError, match="kept without recompute"):
        activation_model(c, 4096, 33, offload=False)


def test_more_budget_saves_more_recompute_and_the_choice_fits_and_is_the_best_that_does():
    """For each budget the chosen mix of kept blocks and blocks keeping their MLP GEMMs fits, saves the most
    recompute (kept + share x GEMM-keeping) of every mix that fits (each number of kept blocks with the most
    GEMM-keeping blocks that fit beside it), and more budget never saves less."""
    from qlora.budget import GEMM_TIME_OVER_FLOPS, gemm_flop_share, gemm_share
    config = shape_config("8b")
    kw = dict(rank=16, dropout=0.0, counts=counts_for(shape_config("8b"), rank=16))
    share = gemm_share(config, 2048)
    assert 0.6 < gemm_flop_share(config, 2048) < 0.8  # gate/up: ~3/4 of a Llama-3-8B block's recompute FLOPs
    assert share == pytest.approx(gemm_flop_share(config, 2048) * GEMM_TIME_OVER_FLOPS)
    saved = []
    for gib in range(8, 44, 2):
        budget = gib * GiB
        p = choose(config, 2048, 2, budget, **kw)
        est = estimate(config, 2048, 2, keep_blocks=p.keep, keep_gemms=p.gemms, offload=p.offload, gpu_mem=budget, **kw)
        assert fits(est, budget) and p.peak == est["peak"] and p.required <= budget
        assert list(p.gemm_indices) == list(range(32 - p.keep - p.gemms, 32 - p.keep))
        for keep in range(33):  # no other mix that fits saves more (any count of offloaded inputs, at some budgets)
            for off in range(33 - keep) if gib in (8, 12, 16) else (False, True):
                fit = [g for g in range(33 - keep) if fits(estimate(config, 2048, 2, keep_blocks=keep, keep_gemms=g,
                                                                    offload=off, gpu_mem=budget, **kw), budget)]
                if fit:
                    assert keep + share * max(fit) <= p.keep + share * p.gemms + 1e-9, (gib, keep, off, p)
        saved.append(p.keep + share * p.gemms)
    assert saved == sorted(saved) and saved[-1] == 32, saved
    small = choose(config, 2048, 2, 12 * GiB, **kw)
    assert small.keep > 0 and small.gemms > 0  # the room left beside the kept blocks goes to GEMM-keeping ones
    forced = choose(config, 2048, 2, 24 * GiB, offload=True, **kw)
    assert forced.offload
    assert choose(config, 2048, 2, 80 * GiB, checkpointing=False, **kw).keep == 32
    assert choose(config, 2048, 2, 24 * GiB, most_kept=4, **kw).keep == 4  # (29 without the bound)
    assert choose(config, 2048, 2, 24 * GiB, most_kept=0, **kw).keep == 0
    # gate/up without a plain adapter (q,v only; DoRA): no GEMM-keeping blocks
    qv = dict(kw, target="q_proj,v_proj", counts=counts_for(config, rank=16, target="q_proj,v_proj"))
    assert choose(config, 2048, 2, 12 * GiB, **qv).gemms == 0
    dora = dict(kw, dora=True, counts=counts_for(config, rank=16, dora=True))
    assert choose(config, 2048, 2, 12 * GiB, **dora).gemms == 0


def test_too_small_a_budget_is_one_line_before_the_model_loads(setup, tmp_path, monkeypatch, capsys):
    import qlora.model
    monkeypatch.setattr(qlora.model, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(QLoraError, match=r"--memory-budget 0\.0 GiB is too small for this run: even with every block "
                                         r"recomputed.*needs about"):
        train(cfg(setup, tmp_path / "o", memory_budget="1MiB"), log=lambda m: None)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    rc = main(["train", "--data", str(setup / "data.jsonl"), "--model", str(setup / "model"), "--output",
               str(tmp_path / "c"), "--memory-budget", "1MiB", "--progress", "false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "too small" in err[-1] and not any("Traceback" in line for line in err)
    assert sum("memory-budget" in line for line in err) == 1


@pytest.mark.parametrize("value", ["lots", "-3GiB", "0", "24XB"])
def test_bad_budget_values_are_one_line(setup, tmp_path, value):
    with pytest.raises(QLoraError, match="--memory-budget must be off, auto or a size"):
        train(cfg(setup, tmp_path / "o", memory_budget=value), log=lambda m: None)


def test_parse_budget_and_auto_on_the_cpu():
    assert parse_budget("off") == "off" and parse_budget(" AUTO ") == "auto"
    assert parse_budget("24GiB") == 24 * GiB and parse_budget("80GB") == 80 * 10**9 and parse_budget(24) == 24 * GiB
    avail = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))
    assert 0 < auto_budget(torch.device("cpu")) < avail


def test_train_header_policy_and_same_losses_as_without_a_budget(setup, tmp_path, monkeypatch):
    """A budget that keeps 1 of the tiny model's 2 blocks: the header says so, the run keeps the last block (what
    enable_checkpointing receives), metrics.jsonl has no memory columns on the CPU, and the losses are those of
    the run without a budget (full recompute), exactly."""
    from qlora import offload
    from qlora.plan import model_config
    ref = tmp_path / "ref"
    run = dict(max_steps=2, grad_accum=1, save_every=0, max_length=8192)  # the plan counts max-length rows: activations dominate
    train(cfg(setup, ref, **run), log=lambda m: None)
    c = cfg(setup, tmp_path / "b", **run)
    config = model_config(c.model)
    kw = plan_kwargs(c)
    kw.pop("grad_checkpointing")
    need = [required_bytes(estimate(config, c.max_length, c.batch_size, keep_blocks=k, **kw), 0) for k in (1, 2)]
    assert need[0] < need[1]
    budget = (need[0] + need[1]) / 2 / 2**20  # MiB: keeps 1 block on a CPU (no CUDA context), not 2
    seen, real = {}, offload.enable_checkpointing

    def record(model, offload=False, **kw):
        seen.update(kw, offload=offload)
        return real(model, offload=offload, **kw)
    monkeypatch.setattr(offload, "enable_checkpointing", record)
    log = []
    train(cfg(setup, tmp_path / "b", memory_budget=f"{budget:.3f}MiB", **run), log=log.append)
    header = [m for m in log if m.startswith("memory budget")]
    assert len(header) == 1 and "1 of 2 blocks keep their activations, 1 recomputed" in header[0], log
    assert list(seen["keep"]) == [1] and seen["offload"] == 0
    assert losses(tmp_path / "b") == losses(ref)
    rows = [json.loads(r) for r in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("mem_gib" not in r and "plan_peak_gib" not in r for r in rows)
    assert "memory_budget:" in (tmp_path / "b" / "config.yaml").read_text()


def test_train_help_lists_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--memory-budget off|auto|SIZE" in out


def test_plan_prints_the_policy_train_would_choose(capsys):
    args = ["plan", "--shape", "8b", "--seq", "2048", "--batch", "2", "--rank", "16", "--dropout", "0"]
    assert main(args + ["--memory-budget", "24GiB"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    p = choose(shape_config("8b"), 2048, 2, 24 * GiB, rank=16, dropout=0.0)
    assert lines[-1] == p.describe()
    assert f"({p.keep} blocks kept without recompute)" in lines[0]
    assert main(args + ["--memory-budget", "24GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"]["keep"] == p.keep and out["peak"] == p.peak and out["required"] <= parse_size("24GiB")
    assert main(args + ["--memory-budget", "2GiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "too small" in err[0]


# ------------------------------------------------------------------ launch reductions (issue 29)

def _xa_zero_fills(layer, x):
    """Gradients of one backward of ``layer`` and the zero-fill ops of xa's shape [tokens, r] it ran."""
    from torch.profiler import ProfilerActivity, profile
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = layer(x)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        (y.float() ** 2).sum().backward()
    shape = [x.numel() // x.shape[-1], layer.r]
    fills = [e.name for e in prof.events() if e.name in ("aten::zero_", "aten::fill_") and e.input_shapes
             and e.input_shapes[0] == shape]
    return fills, [x.grad, layer.lora_A.grad, layer.lora_B.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_zero_gradient_is_materialised_for_xa(monkeypatch, dtype):
    """The fused LoRA node's second output (xa) gets no gradient: autograd no longer fills a zero tensor for it in
    every backward (a launch per adapted linear); the gradients are bit for bit those with the zero fill (the
    behaviour before, restored here by making set_materialize_grads a no-op)."""
    torch.manual_seed(0)
    layer = lin.QLoRALinear.from_linear(torch.nn.Linear(64, 96, bias=False), r=8, alpha=16, compute_dtype=dtype)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 10, 64)
    fills, grads = _xa_zero_fills(layer, x)
    assert fills == []
    with monkeypatch.context() as m:
        m.setattr(torch.autograd.function.FunctionCtx, "set_materialize_grads", lambda self, value: None)
        old_fills, old_grads = _xa_zero_fills(layer, x)
    assert old_fills  # the profile does see the fill when autograd makes it
    for g, ref in zip(grads, old_grads):
        assert g is not None and torch.equal(g, ref)


def test_plan_page_budget_without_a_budget_leaves_the_steps_peak_room():
    """Without --memory-budget, qlora train gives the paged optimizer the state the plan leaves beside the step's
    peak where not all of it fits (70B r=64 at 2048 on a 46 GiB card: measured on an H100, BENCHMARKS), and no
    limit where it does or where the state lives on the host anyway."""
    from qlora.budget import plan_page_budget
    from qlora.plan import page_budget
    from qlora.train import TrainConfig
    c70 = shape_config("llama-3.1-70b")
    run = TrainConfig(rank=64, max_length=2048, batch_size=1, offload_embeddings=True, dropout=0.0)
    pages = plan_page_budget(run, c70, 46 * GiB)
    kw = dict(plan_kwargs(run), page_budget=None)
    est = estimate(c70, 2048, 1, gpu_mem=46 * GiB, **kw)
    assert pages == page_budget(c70, 2048, 1, 46 * GiB, **{k: v for k, v in kw.items() if k != "page_budget"})
    assert 0 < pages < est["details"]["optimizer_states_total"]
    assert fits(estimate(c70, 2048, 1, gpu_mem=46 * GiB, **dict(kw, page_budget=pages)), 46 * GiB)
    assert plan_page_budget(run, c70, 80 * GiB) is None  # it all fits on an 80 GB card: the pager decides
    off = TrainConfig(rank=64, max_length=2048, batch_size=1, offload_optimizer=True)
    assert plan_page_budget(off, c70, 46 * GiB) is None
    plain = TrainConfig(rank=64, max_length=2048, batch_size=1, optim="adamw")
    assert plan_page_budget(plain, c70, 46 * GiB) is None


def test_some_offloaded_inputs_give_the_same_losses_and_only_the_first_blocks_leave():
    """enable_checkpointing(offload=K): the first K checkpointed blocks' inputs go to the offloader, the others stay
    on the device although the whole loss runs inside the offloader's hooks (as qlora.train.MicroStep runs it): each
    K packs one tensor more than K - 1, all of them as many as offload=True; losses and gradients are bit for bit
    those without checkpointing; kept blocks are not counted among the checkpointed."""
    from qlora.compat import checkpoint_function
    model, batch = _model("fp32"), _batch()
    ref_loss, ref_grads = _loss_and_grads(model, batch)

    def run(offload, keep=()):
        off = ActivationOffloader(min_bytes=0, include_cpu=True)
        got = enable_checkpointing(model, offload=offload, offloader=off, keep=keep)
        model.zero_grad(set_to_none=True)
        with off.hooks():
            loss = loss_sum(model, batch, "cpu")
        loss.backward()
        assert torch.equal(loss.detach(), ref_loss), offload
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert torch.equal(p.grad, ref_grads[n]), (offload, n)
        names = [checkpoint_function(b).__name__ for b in model.model.layers]
        return got is off, off.stats["packed"], names

    packed = []
    for k in range(1, LAYERS + 1):
        returned, n, names = run(k)
        assert returned and names == ["offloaded_checkpoint"] * k + ["resident_checkpoint"] * (LAYERS - k), names
        packed.append(n)
    assert packed == [packed[0] + k for k in range(LAYERS)], packed
    assert run(True)[1] == packed[-1]
    returned, n, names = run(1, keep=[2])  # block 2 kept: of blocks 0 and 1, only block 0's input leaves
    assert returned and names[:2] == ["offloaded_checkpoint", "resident_checkpoint"] and n == packed[0]
    assert enable_checkpointing(model, offload=0) is None


@pytest.mark.parametrize("value", [-1, LAYERS + 1, 1.5, "2"])
def test_bad_offload_counts_are_one_line(value):
    with pytest.raises(QLoraError, match=r"count in \[0, 3\]") as e:
        enable_checkpointing(_model("fp32"), offload=value)
    assert "\n" not in str(e.value)
    with pytest.raises(QLoraError, match=r"count in \[0, 2\]"):
        enable_checkpointing(_model("fp32"), offload=3, keep=[2])


def test_activation_model_counts_the_offloaded_inputs():
    """K offloaded inputs: K inputs in CPU memory (plus the tail's tensors, as with all of them), the rest on the
    device; the device's peak falls with every input offloaded past the first (which costs a copy's room in its
    backward), K = all is offload=True; the plan prints the partial count."""
    from qlora.plan import format_plan, host_bytes
    config = shape_config("8b")
    kw = dict(rank=16, dropout=0.0, counts=counts_for(config, rank=16))
    c, inp = kw["counts"], 4096 * 4096 * 2
    for k in (0, 1, 7, 22):
        act = activation_model(c, 4096, 10, offload=k)
        assert act["offload"] == k and act["host"] == k * inp
        assert act["saved"] == activation_model(c, 4096, 10, offload=False)["saved"] - k * inp
    assert activation_model(c, 4096, 10, offload=22) == activation_model(c, 4096, 10, offload=True)
    peaks = [estimate(config, 2048, 2, keep_blocks=4, offload=k, **kw)["peak"] for k in range(29)]
    assert all(a > b for a, b in zip(peaks[1:28], peaks[2:28])), peaks
    est = estimate(config, 2048, 2, keep_blocks=4, offload=5, **kw)
    assert est["settings"]["offload_blocks"] == 5 and est["host"]["activations"] == 5 * inp + 4096 * 4096 * 6
    assert host_bytes(est) == sum(est["host"].values())
    assert "offload on for 5 of the 28 checkpointed blocks' inputs" in format_plan(est, "8b", None)[0]
    assert format_plan(estimate(config, 2048, 2, offload=True, **kw), "8b", None)[0].endswith(", offload on")


def test_the_budget_offloads_the_fewest_inputs_that_fit_within_the_cpu_memory():
    """Of the policies that save the most recompute, the one with the fewest offloaded inputs (none fewer fits the
    same mix without paging out more optimizer state, whose copies do not overlap the compute); ``host_mem`` bounds what the policy puts in CPU memory, less of it never saves more, and a budget
    whose policies all need more CPU memory than there is is one line that says so."""
    from qlora.plan import host_bytes
    config = shape_config("8b")
    kw = dict(rank=16, dropout=0.0, counts=counts_for(config, rank=16))
    partial = 0
    for gib in (8, 10, 12, 16):
        p = choose(config, 2048, 2, gib * GiB, **kw)
        partial += 0 < p.offload < 32 - p.keep  # some, not all: the rest stay on the device
        for fewer in range(p.offload):  # fewer inputs offloaded: it does not fit, or pages out more optimizer state
            e = estimate(config, 2048, 2, keep_blocks=p.keep, keep_gemms=p.gemms, offload=fewer, gpu_mem=gib * GiB, **kw)
            assert not fits(e, gib * GiB) or e["host"]["optimizer_states"] > p.states_on_host, (gib, fewer, p)
        assert (f"the inputs of the first {p.offload} in CPU memory" if p.offload < 32 - p.keep else
                "their inputs in CPU memory") in p.describe()
    assert partial >= 2
    saved = []
    for host in (None, 8, 6, 4, 2):
        p = choose(config, 8192, 4, 24 * GiB, host_mem=host and host * GiB, **kw)
        est = estimate(config, 8192, 4, keep_blocks=p.keep, keep_gemms=p.gemms, offload=p.offload, gpu_mem=24 * GiB,
                       offload_weights=p.stream, **kw)
        assert (host is None or host_bytes(est) <= host * GiB) and p.peak == est["peak"], (host, p)
        saved.append(p.keep + p.gemms)
    assert saved == sorted(saved, reverse=True) and saved[0] > saved[-1] > 0, saved
    with pytest.raises(QLoraError, match=r"need more CPU memory than the 2\.0 GiB available") as e:
        choose(config, 8192, 4, 16 * GiB, host_mem=2 * GiB, **kw)
    assert "\n" not in str(e.value)
    # 8B at 409,600 tokens on an 80 GB card: ~91 GiB of CPU memory (most inputs offloaded), not less
    long = choose(config, 409600, 1, 74 * GiB, host_mem=100 * GiB, **kw)
    assert long.offload and 80 * GiB < long.host <= 100 * GiB
    assert f"; {long.host / GiB:.2f} GiB in CPU memory in all" in long.describe()
    with pytest.raises(QLoraError, match="CPU memory"):
        choose(config, 409600, 1, 74 * GiB, host_mem=80 * GiB, **kw)


def test_check_host_memory_names_the_parts_and_the_processes(monkeypatch):
    """The run's CPU-memory parts, times this machine's processes, against what is available: one line naming them."""
    from qlora import budget
    from qlora.train import _check_host_memory
    monkeypatch.setattr(budget, "host_available", lambda: 10 * GiB)
    _check_host_memory({"activations": 4 * GiB, "weights": 0, "optimizer_states": GiB, "embeddings": 0}, 2)
    with pytest.raises(QLoraError, match=r"needs 12\.0 GiB of CPU memory \(offloaded activations 4\.0 GiB; paged-out "
                                         r"optimizer state 2\.0 GiB, each of 2 processes\) but 10\.0 GiB") as e:
        _check_host_memory({"activations": 4 * GiB, "weights": 0, "optimizer_states": 2 * GiB, "embeddings": 0}, 2)
    assert "\n" not in str(e.value)


def test_plan_prints_and_checks_the_cpu_memory(capsys, monkeypatch):
    """`qlora plan` prints what the run keeps in CPU memory; --host-mem checks it (exit 1, one line naming both
    sizes), bounds the longest sequence and goes to --memory-budget's choice."""
    args = ["plan", "--shape", "8b", "--seq", "409600", "--batch", "1", "--rank", "16", "--dropout", "0",
            "--gpu-mem", "80GB"]
    assert main(args + ["--offload", "true"]) == 0
    out = capsys.readouterr().out
    need = float(next(line for line in out.splitlines() if "CPU memory needed" in line).split()[3])
    assert 100 < need < 120  # every one of the 32 inputs (3.1 GiB each) and the tail's tensors
    longest = int(out.rsplit("longest sequence at batch 1: ", 1)[1])
    assert main(args + ["--offload", "true", "--host-mem", f"{need + 1}GiB"]) == 0
    bounded = int(capsys.readouterr().out.rsplit("longest sequence at batch 1: ", 1)[1])
    assert 409600 <= bounded < longest
    assert main(args + ["--offload", "true", "--host-mem", "64GiB"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("does NOT fit in --host-mem 64.0 GiB of CPU memory: it needs 109.4 GiB")
    assert main(args + ["--offload", "true", "--host-mem", "64GiB", "--json"]) == 1
    js = json.loads(capsys.readouterr().out)
    assert js["host_required"] == pytest.approx(need * GiB, rel=1e-3) and js["host_mem"] == 64 * GiB
    from qlora import budget
    monkeypatch.setattr(budget, "host_available", lambda: 64 * GiB)  # --host-mem auto: this machine's available
    assert main(args + ["--offload", "true", "--host-mem", "auto"]) == 1
    assert "does NOT fit in --host-mem 64.0 GiB" in capsys.readouterr().out
    assert main(args + ["--memory-budget", "74GiB", "--host-mem", "100GiB"]) == 0
    out = capsys.readouterr().out
    assert "the inputs of the first" in out.splitlines()[-1]
    assert float(next(line for line in out.splitlines() if "CPU memory needed" in line).split()[3]) <= 100


def test_on_a_cpu_the_budget_offloads_nothing():
    """On a CPU device the block inputs are in CPU memory already (the offloader leaves CPU tensors where they are):
    a budget there never counts on offloading them, while the same budget on a GPU does."""
    c = TrainConfig(data="x", model="shape:8b", max_length=2048, batch_size=2, rank=16, dropout=0.0,
                    memory_budget="12GiB")
    config = shape_config("8b")
    cpu, gpu = (for_train(c, torch.device(d), config) for d in ("cpu", "cuda"))
    assert cpu.offload == 0 and gpu.offload > 0
    assert "inputs on the device" in cpu.describe() and (cpu.keep, cpu.gemms) < (gpu.keep, gpu.gemms)
