"""Sequence-tiled MLP (qlora.tiled): forced on a tiny random Llama with tiny thresholds, the loss and every
LoRA gradient equal the untiled ones (fp32), with checkpointing, activation offload and the LoRA casts;
dropout masks agree between forward and backward; a checkpointed block's recompute stops before the
chunks; ordinary sizes never take the tiled path; the tiled block saves less; QLORA_TILE_ALL tiles every
call. (Under FSDP2: tests/test_distributed.py.)"""
import pytest
import torch
import transformers

from qlora.errors import QLoraError
from qlora.fast import tiled_calls, use_fused_kernels, use_tiled_mlp
from qlora.linear import keyed_dropout, lora_cast
from qlora.loss import loss_sum
from qlora.model import LoraSettings, QuantSettings, build_random
from qlora.offload import ActivationOffloader, enable_checkpointing
from qlora.tiled import CHUNK_ELEMENTS, FORCED_ROWS, TILE_ABOVE, chunk_bounds, chunk_key, tile_rows

from helpers import DequantCounter, nonzero_lora_b

HIDDEN, INTER, T = 64, 96, 40
CHUNK = 7  # tokens per chunk when forced: 2 x 40 tokens -> 12 chunks, of 6 or 7 tokens


def _config(layers=2):
    return transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                    max_position_embeddings=512, tie_word_embeddings=False)


def _model(dropout=0.0, dtype="fp32", dora=False):
    m = build_random(_config(), QuantSettings(compute_dtype=dtype),
                     LoraSettings(r=4, alpha=8, dropout=dropout, dora=dora), dtype=dtype, progress=False)
    return nonzero_lora_b(m)


def _force(model):
    use_tiled_mlp(model, above=1, chunk=CHUNK * INTER)


def _batch(b=2, t=T):
    ids = torch.randint(0, 96, (b, t), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "labels": labels}


def _loss_and_grads(model, batch, casts=False, off=None, key=None):
    model.zero_grad(set_to_none=True)
    with lora_cast(model, enabled=casts), (off.hooks() if off is not None else torch.enable_grad()), \
            keyed_dropout(model, key):
        loss = loss_sum(model, batch, "cpu")
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _close(got, ref, rtol=1e-5):
    loss, grads = got
    ref_loss, ref_grads = ref
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0)
    assert grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(grads[n], g, rtol=rtol, atol=rtol * g.abs().max().item(), msg=n)


@pytest.mark.parametrize("mode", ["plain", "checkpointing", "offload", "casts"])
def test_tiled_equals_untiled(mode):
    model, batch = _model(), _batch()
    off = None
    if mode != "plain":
        off = enable_checkpointing(model, offload=mode == "offload",
                                   offloader=ActivationOffloader(min_bytes=0, include_cpu=True))
    ref = _loss_and_grads(model, batch, casts=mode == "casts", off=off)
    assert tiled_calls(model) == 0
    _force(model)
    got = _loss_and_grads(model, batch, casts=mode == "casts", off=off)
    assert tiled_calls(model) > 0
    _close(got, ref)


def test_tiled_equals_untiled_with_dora():
    """DoRA's magnitude is a parameter the MLP uses as it is: an input of the tiled node of its own."""
    model, batch = _model(dora=True), _batch()
    ref = _loss_and_grads(model, batch)
    assert any("magnitude" in n for n in ref[1])
    _force(model)
    _close(_loss_and_grads(model, batch), ref)


def test_bf16_tiled_is_close_to_untiled():
    """bf16 compute (as on a GPU): the same values up to bf16 rounding of the chunks' GEMMs."""
    model, batch = _model(dtype="bf16"), _batch()
    ref = _loss_and_grads(model, batch, casts=True)
    _force(model)
    loss, grads = _loss_and_grads(model, batch, casts=True)
    torch.testing.assert_close(loss, ref[0], rtol=1e-2, atol=0)
    for n, g in ref[1].items():
        err = (grads[n].float() - g.float()).norm() / g.float().norm()
        assert err < 2e-2, (n, err)


def test_tiled_forward_without_grad_equals_untiled():
    model, batch = _model(), _batch()
    with torch.no_grad():
        ref = loss_sum(model, batch, "cpu")
        _force(model)
        got = loss_sum(model, batch, "cpu")
    assert tiled_calls(model) == 2
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)


def test_checkpoint_recompute_stops_before_the_chunks():
    """The node returns its output unfilled: the recompute of a checkpointed block ends there, so the MLP runs
    once per chunk in forward and once in backward, as an untiled checkpointed MLP runs (no third time)."""
    model, batch = _model(), _batch()
    enable_checkpointing(model)
    _force(model)
    calls = []
    for layer in model.model.layers:
        inner = layer.mlp._qlora_mlp_inner
        layer.mlp._qlora_mlp_inner = lambda mlp, x, inner=inner: calls.append(x.shape[0]) or inner(mlp, x)
    _loss_and_grads(model, batch)
    chunks = len(chunk_bounds(2 * T, CHUNK))
    assert len(calls) == 2 * chunks * len(model.model.layers)
    assert sum(calls) == 2 * 2 * T * len(model.model.layers)


def test_chunk_backward_leaves_down_projs_frozen_product_out(monkeypatch):
    """In each chunk's backward down_proj's output is only back-propagated through: its base weight is
    dequantized once per chunk (for the input's gradient), not twice, as gate's and up's are (their outputs
    feed the SwiGLU); the gradients stay those of the untiled MLP (test_tiled_equals_untiled)."""
    model, batch = _model(), _batch()
    enable_checkpointing(model)
    _force(model)
    count = DequantCounter(monkeypatch, model)
    loss = loss_sum(model, batch, "cpu")
    before = count.by_name()  # the forward's chunks: one dequantization of each weight per chunk
    loss.backward()
    counts = count.by_name()
    chunks, layers = len(chunk_bounds(2 * T, CHUNK)), len(model.model.layers)
    assert {n: before[n] for n in ("gate_proj", "down_proj")} == {"gate_proj": chunks * layers,
                                                                   "down_proj": chunks * layers}
    assert counts["gate_proj"] - before["gate_proj"] == 2 * chunks * layers  # recomputed forward + backward
    assert counts["down_proj"] - before["down_proj"] == chunks * layers  # backward only


def _mlp_reference(mlp, x, chunks, key=None):
    """The chunks' MLP with plain autograd (what the tiled node must reproduce, masks included)."""
    from qlora.linear import dropout_key_as
    outs = []
    for i, (a, b) in enumerate(chunks):
        with dropout_key_as(chunk_key(key, i) if key is not None else None):
            outs.append(mlp._qlora_mlp_inner(mlp, x.reshape(-1, HIDDEN)[a:b]))
    return torch.cat(outs).view(*x.shape[:-1], -1)


@pytest.mark.parametrize("keyed", [False, True])
def test_dropout_masks_agree_between_forward_and_backward(keyed):
    model = _model(dropout=0.3)
    _force(model)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, T, HIDDEN, generator=torch.Generator().manual_seed(1))
    w = torch.randn(2, T, HIDDEN, generator=torch.Generator().manual_seed(2))
    key = torch.tensor(12345, dtype=torch.int64) if keyed else None
    chunks = len(chunk_bounds(2 * T, CHUNK))

    def run(fn):
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        torch.manual_seed(7)
        with keyed_dropout(model, key):
            y = fn(xi)
            torch.manual_seed(99)  # backward must not depend on the RNG's state by then
            (y * w).sum().backward()
        return y.detach(), xi.grad, {n: p.grad.clone() for n, p in mlp.named_parameters() if p.grad is not None}

    y, gx, grads = run(mlp)
    ry, rgx, rgrads = run(lambda xi: _mlp_reference(mlp, xi, chunk_bounds(2 * T, CHUNK), key))
    assert chunks > 1 and (y == 0).sum() < y.numel()
    torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, rgx, rtol=1e-5, atol=1e-6)
    assert grads.keys() == rgrads.keys() and len(grads) == 6
    for n in grads:
        torch.testing.assert_close(grads[n], rgrads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_dropout_with_checkpointing_equals_without():
    """torch-RNG dropout: checkpointing restores the RNG for the block's recompute, the tiled node for its
    chunks: the same masks, so the same loss and gradients as the same tiled model without checkpointing."""
    model, batch = _model(dropout=0.2), _batch()
    _force(model)
    torch.manual_seed(3)
    ref = _loss_and_grads(model, batch)
    enable_checkpointing(model)
    torch.manual_seed(3)
    _close(_loss_and_grads(model, batch), ref)


def test_normal_sizes_take_the_untiled_path():
    model, batch = _model(), _batch()  # default thresholds
    model.model.layers[0].mlp.register_forward_hook(lambda m, args, out: seen.append(type(out.grad_fn).__name__))
    seen = []
    _loss_and_grads(model, batch)
    assert tiled_calls(model) == 0 and "TiledMLPBackward" not in seen[0]
    # Llama-3.1-8B: the usual 2 x 2048 tokens and 16k untiled; 400k tokens in chunks of 4681
    assert tile_rows(2 * 2048, 14336) == 0 and tile_rows(16384, 14336) == 0
    assert tile_rows(409600, 14336) == CHUNK_ELEMENTS // 14336 == 4681
    assert 2 * 2048 * 14336 < TILE_ABOVE < 32768 * 14336


def test_fused_kernels_patch_keeps_tiling():
    model, batch = _model(), _batch()
    ref = _loss_and_grads(model, batch)
    _force(model)
    use_fused_kernels(model)  # on a CPU the fused forward runs the torch reference
    mlp = model.model.layers[0].mlp
    assert mlp._qlora_mlp_inner.__name__ == "_mlp_forward"
    _close(_loss_and_grads(model, batch), ref)
    assert tiled_calls(model) > 0


def test_tiled_block_saves_less():
    """Without checkpointing a tiled MLP keeps only its input for backward, not its intermediates."""
    model, batch = _model(), _batch()

    def saved_bytes():
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_sum(model, batch, "cpu")
        return total[0]

    before = saved_bytes()
    _force(model)
    after = saved_bytes()
    # each layer's MLP no longer keeps gate, up, silu(gate) and the product (4 x N x I fp32), nor the normed
    # input twice more (gate/up/down LoRA inputs share it), only its input once
    assert before - after >= len(model.model.layers) * 4 * 2 * T * INTER * 4


def test_tile_all_switch_tiles_every_call(switch):
    """QLORA_TILE_ALL (how the torchrun tests tile a tiny model in their child processes): a loaded model's
    every MLP call runs tiled, FORCED_ROWS tokens a chunk, with the untiled loss and gradients."""
    batch = _batch()
    ref = _loss_and_grads(_model(), batch)
    switch("QLORA_TILE_ALL", "1")
    model = _model()
    assert [layer.mlp._qlora_tiling for layer in model.model.layers] == [(1, FORCED_ROWS * INTER)] * 2
    _close(_loss_and_grads(model, batch), ref)
    assert tiled_calls(model) == 2


def test_bad_thresholds_are_refused():
    model = _model()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(QLoraError, match="MLP tiling"):
            use_tiled_mlp(model, above=bad)
        with pytest.raises(QLoraError, match="MLP tiling"):
            use_tiled_mlp(model, chunk=bad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_tiled_equals_untiled_on_cuda_with_the_fused_kernels(dtype):
    """On a GPU (fused SwiGLU and norm kernels, keyed dropout off, checkpointing with offload): the tiled MLP
    gives the untiled loss and LoRA gradients (fp32 to 1e-4; bf16 to its rounding)."""
    m = build_random(_config(), QuantSettings(quant_type="nf4", compute_dtype=dtype), LoraSettings(r=4, alpha=8,
                     dropout=0.0), "cuda", dtype, progress=False)
    nonzero_lora_b(m)
    assert use_fused_kernels(m)["swiglu_mlp"] == 2
    off = enable_checkpointing(m, offload=True)
    batch = {k: v.cuda() for k, v in _batch().items()}

    def run():
        m.zero_grad(set_to_none=True)
        with off.hooks(), lora_cast(m):
            loss = loss_sum(m, batch, "cuda")
            loss.backward()
        return loss.detach().float(), {n: p.grad.float() for n, p in m.named_parameters() if p.requires_grad}
    ref = run()
    _force(m)
    got = run()
    assert tiled_calls(m) > 0
    tol = 1e-4 if dtype == "fp32" else 2e-2
    torch.testing.assert_close(got[0], ref[0], rtol=tol, atol=0)
    for n, g in ref[1].items():
        assert ((got[1][n] - g).norm() / g.norm()) < tol * 5, n
