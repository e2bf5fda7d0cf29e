"""Activation offload: exactly the same losses and gradients as plain checkpointing (CPU, through
the same pack/unpack path with CPU copies), the block inputs are what is offloaded, and on a GPU
the peak memory drops."""
import pytest
import torch
import transformers

from qlora.errors import QLoraError
from qlora.model import LoraSettings, QuantSettings, build_random
from qlora.offload import ActivationOffloader, HostEmbedding, enable_checkpointing, offload_activations, offload_embeddings
from qlora.loss import loss_sum

from helpers import DequantCounter, nonzero_lora_b


def _config(layers=3, hidden=64, vocab=96):
    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden + 32, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                    max_position_embeddings=512, tie_word_embeddings=False)


def _model(cfg, device="cpu", r=4):
    # bf16 as on a GPU (the byte counts below are bf16's), whatever the CPU's auto dtype; tiny, so fast anywhere
    m = build_random(cfg, QuantSettings(compute_dtype="bf16"), LoraSettings(r=r, alpha=8, dropout=0.0), device=device,
                     dtype="bf16", progress=False)
    return nonzero_lora_b(m)


def _batch(cfg, b=2, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "labels": labels}


def _loss_and_grads(model, batch, device="cpu", outer=None):
    model.zero_grad(set_to_none=True)
    ctx = outer.hooks() if outer is not None else torch.enable_grad()
    with ctx:
        loss = loss_sum(model, batch, device)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_offloaded_checkpointing_is_exact():
    cfg = _config()
    model = _model(cfg)
    batch = _batch(cfg)
    enable_checkpointing(model, offload=False)
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    assert all(g.abs().sum() > 0 for g in ref_grads.values())

    off = ActivationOffloader(min_bytes=0, include_cpu=True)
    assert enable_checkpointing(model, offload=True, offloader=off) is off
    loss, grads = _loss_and_grads(model, batch)
    assert torch.equal(loss, ref_loss)
    for n, g in ref_grads.items():
        assert torch.equal(grads[n], g), n
    # exactly the block inputs went out, came back, and all but the first were prefetched
    hidden = 2 * 24 * cfg.hidden_size * 2  # B*T*H bf16
    assert off.stats["packed"] == cfg.num_hidden_layers
    assert off.stats["bytes_out"] == cfg.num_hidden_layers * hidden
    assert off.stats["unpacked"] == cfg.num_hidden_layers
    assert off.stats["prefetched"] == cfg.num_hidden_layers - 1
    assert off.stats["bytes_in"] == off.stats["bytes_out"]

    # checkpointing without offload again: the wrap is undone
    assert enable_checkpointing(model, offload=False) is None
    before = dict(off.stats)
    loss2, _ = _loss_and_grads(model, batch)
    assert torch.equal(loss2, ref_loss) and dict(off.stats) == before


def test_static_buffers_are_reused_step_after_step():
    """static=True (what enable_checkpointing makes): each step's block inputs go to the same host
    buffers, with or without begin_step(); losses and gradients stay exact."""
    cfg = _config()
    model = _model(cfg)
    enable_checkpointing(model, offload=False)
    refs = [_loss_and_grads(model, _batch(cfg, seed=s)) for s in range(3)]
    off = ActivationOffloader(min_bytes=0, include_cpu=True, static=True)
    enable_checkpointing(model, offload=True, offloader=off)
    for s, (ref_loss, ref_grads) in enumerate(refs):
        if s == 2:
            off.begin_step()  # optional: the pack after a backward starts a new pass anyway
        loss, grads = _loss_and_grads(model, _batch(cfg, seed=s))
        assert torch.equal(loss, ref_loss)
        for n, g in ref_grads.items():
            assert torch.equal(grads[n], g), n
        assert len(off._slots) == cfg.num_hidden_layers  # reused, not grown
    assert off.stats["packed"] == 3 * cfg.num_hidden_layers


def test_offload_outside_blocks_is_exact_and_skips_parameters():
    cfg = _config(layers=2)
    model = _model(cfg)
    batch = _batch(cfg, seed=1)
    enable_checkpointing(model, offload=False)
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    off = ActivationOffloader(min_bytes=0, include_cpu=True, exclude=model)
    enable_checkpointing(model, offload=True, offloader=off)
    loss, grads = _loss_and_grads(model, batch, outer=off)  # the whole loss under the hooks too
    assert torch.equal(loss, ref_loss)
    for n, g in ref_grads.items():
        assert torch.equal(grads[n], g), n
    # block inputs + what the final norm and the loss save; never the (large) lm_head weight
    assert off.stats["packed"] > cfg.num_hidden_layers
    assert off.stats["bytes_out"] < 40 * 2 * 24 * cfg.hidden_size * 4
    # no checkpointing: every saved activation of the blocks goes through the hooks
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    off2 = ActivationOffloader(min_bytes=0, include_cpu=True, exclude=model)
    loss3, grads3 = _loss_and_grads(model, batch, outer=off2)
    assert torch.equal(loss3, ref_loss)
    for n, g in ref_grads.items():
        assert torch.equal(grads3[n], g), n
    assert off2.stats["packed"] > 5 * off.stats["packed"]


def test_offload_activations_context_on_plain_autograd():
    x = torch.randn(64, 64, requires_grad=True)
    w = torch.randn(64, 64, requires_grad=True)
    ref = torch.autograd.grad((torch.tanh(x @ w) ** 2).sum(), (x, w))
    with offload_activations(enabled=False) as none:
        assert none is None
    off = ActivationOffloader(min_bytes=0, include_cpu=True)
    with off.hooks():
        y = (torch.tanh(x @ w) ** 2).sum()
    got = torch.autograd.grad(y, (x, w))
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert off.stats["packed"] >= 1  # parameters are skipped, but x and w are plain tensors here
    with offload_activations(min_bytes=0) as o:  # CPU tensors are not offloaded by default
        (x * 2).sum()
    assert o.stats["packed"] == 0


def test_embeddings_in_host_memory_are_exact():
    cfg = _config(layers=2)
    model = _model(cfg)
    batch = _batch(cfg, seed=2)
    enable_checkpointing(model, offload=False)
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    table = model.get_input_embeddings().weight
    n_params = sum(p.numel() for p in model.parameters())
    assert offload_embeddings(model) is True
    emb = model.get_input_embeddings()
    assert isinstance(emb, HostEmbedding) and emb.weight is not None and torch.equal(emb.weight, table)
    assert sum(p.numel() for p in model.parameters()) == n_params - table.numel()  # no longer a model tensor
    loss, grads = _loss_and_grads(model, batch)
    assert torch.equal(loss, ref_loss)
    for n, g in ref_grads.items():
        assert torch.equal(grads[n], g), n
    model.to("cpu")  # the table is not moved with the model
    assert emb.host_weight.device.type == "cpu"
    tied = build_random(_config(layers=1).__class__(**{**_config(layers=1).to_dict(), "tie_word_embeddings": True}),
                        QuantSettings(), LoraSettings(r=2), progress=False)
    assert offload_embeddings(tied) is False


def test_bad_settings_are_user_errors():
    with pytest.raises(QLoraError, match="min_bytes"):
        ActivationOffloader(min_bytes=-1)
    with pytest.raises(QLoraError, match="checkpointing"):
        enable_checkpointing(torch.nn.Linear(2, 2), offload=True)


@pytest.mark.gpu
def test_gpu_offload_lowers_peak_and_is_exact():
    import gc
    gc.collect()
    torch.cuda.empty_cache()
    cfg = _config(layers=8, hidden=512, vocab=512)
    model = _model(cfg, device="cuda", r=8)
    batch = _batch(cfg, b=2, t=2048)
    peaks, results = {}, {}
    for offload in (False, True):
        off = enable_checkpointing(model, offload=offload, min_bytes=0)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        results[offload] = _loss_and_grads(model, batch, device="cuda")
        torch.cuda.synchronize()
        peaks[offload] = torch.cuda.max_memory_allocated() - base
        if offload:
            assert off.stats["packed"] == cfg.num_hidden_layers
    saved = cfg.num_hidden_layers * 2 * 2048 * cfg.hidden_size * 2
    assert peaks[False] - peaks[True] > 0.5 * saved
    table_bytes = model.get_input_embeddings().weight.untyped_storage().nbytes()
    import gc
    gc.collect()  # garbage of earlier tests must not be freed inside the measured window
    before = torch.cuda.memory_allocated()
    assert offload_embeddings(model)
    gc.collect()
    assert before - torch.cuda.memory_allocated() == table_bytes
    assert torch.equal(results[True][0], results[False][0])
    for n, g in results[False][1].items():
        assert torch.equal(results[True][1][n], g), n


@pytest.mark.parametrize("target", ["all-linear", "q_proj,v_proj"])
def test_recompute_skips_the_last_layer_s_gemm(monkeypatch, target):
    """A checkpointed block's recompute stops once the block's last saved tensor is saved again (torch's
    early stop). Our layers record their autograd node before they run their GEMM, so the recompute never
    dequantizes or multiplies down_proj, the last layer of a Llama block, with or without an adapter on it:
    in backward down_proj's weight is dequantized once (for the input gradient), every other layer's twice
    (recompute, input gradient); losses and gradients equal those without checkpointing, bit for bit."""
    cfg = _config()
    batch = _batch(cfg)

    def build():
        m = build_random(cfg, QuantSettings(), LoraSettings(r=4, alpha=8, dropout=0.0, target=target),
                         device="cpu", progress=False)
        return nonzero_lora_b(m)

    plain = build()
    ref_loss, ref_grads = _loss_and_grads(plain, batch)
    model = build()
    enable_checkpointing(model, offload=False)
    count = DequantCounter(monkeypatch, model, on=False)
    model.zero_grad(set_to_none=True)
    loss = loss_sum(model, batch, "cpu")
    count.on = True
    loss.backward()
    counts = count.by_name()
    layers = cfg.num_hidden_layers
    assert counts["down_proj"] == layers, counts
    for name in ("o_proj", "gate_proj", "up_proj"):  # their inputs need gradients in every block
        assert counts[name] == 2 * layers, (name, counts)
    assert torch.equal(loss.detach(), ref_loss)
    for n, g in ref_grads.items():
        assert torch.equal(dict(model.named_parameters())[n].grad, g), n
