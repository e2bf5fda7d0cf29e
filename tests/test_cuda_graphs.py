"""CUDA graphs of the training micro-step (qlora.cuda_graphs): replayed steps give the losses and
gradients of eager steps (GPU tests), and the CPU-side pieces -- padding of packed batches, the
static-shape loss, the mask-free causal attention, when graphs are refused -- against plain
references (run everywhere)."""
import contextlib
import json

import pytest
import torch
import transformers

from qlora.cuda_graphs import (GraphedMicroStep, bucket_count, bucket_length, causal_attention, graph_batch,
                               pad_packed, supported, to_packed_form)
from qlora.loss import loss_sum
from qlora.model import LoraSettings, QuantSettings, build_random
from qlora.train import TrainConfig, train
from helpers import losses
from tiny import make_tiny_model

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=500)


def _model(device, quant="nf4", attn="sdpa", dtype="bf16"):
    cfg = transformers.LlamaConfig(**TINY, max_position_embeddings=512)
    m = build_random(cfg, QuantSettings(quant_type=quant), LoraSettings(r=8, alpha=16, dropout=0.0), device, dtype,
                     progress=False)
    m.config._attn_implementation = attn
    for n, p in m.named_parameters():  # B = 0 at init: give the adapters a value so gradients reach A too
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(0, 0.02, generator=torch.Generator(p.device).manual_seed(len(n)))
    return m


def _batch(seed, B=2, T=64, packed=False, lens=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (B, T), generator=g)
    labels = ids.clone()
    labels[:, : T // 4] = -100  # a prompt
    b = {"input_ids": ids, "labels": labels}
    if packed:
        pos = torch.cat([torch.arange(n) for n in (lens or [T // 2, T - T // 2])]).expand(B, T).contiguous()
        b["position_ids"] = pos
    return b


# -- everywhere ----------------------------------------------------------------------------------


def test_supported_says_why_not():
    assert supported(torch.device("cpu"))[0] is False
    cuda = torch.device("cuda", 0)
    assert supported(cuda) == (True, "")
    for kw, word in ((dict(parallel=True), "processes"), (dict(host_embeddings=True), "embeddings"),
                     (dict(dropout=0.05), "dropout")):
        ok, why = supported(cuda, **kw)
        assert not ok and word in why
    assert supported(cuda, dropout=0.05, checkpointing=False)[0]
    assert supported(cuda, dropout=0.05, keyed_dropout=True)[0]  # keyed masks: the recompute repeats them


def test_static_shapes_loss_equals_masked_loss():
    m = _model("cpu", quant=None)
    b = _batch(0)
    ref = loss_sum(m, b, "cpu", grad_in_forward=False)
    got = loss_sum(m, b, "cpu", grad_in_forward=False, static_shapes=True)
    full = torch.nn.functional.cross_entropy(m(input_ids=b["input_ids"]).logits[:, :-1].float().reshape(-1, 500),
                                             b["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert got.item() == pytest.approx(full.item(), rel=2e-3)


def test_causal_attention_equals_sdpa_without_mask():
    m = _model("cpu", quant=None)
    b = _batch(1)
    ref = m(input_ids=b["input_ids"]).logits
    with causal_attention(m):
        assert m.config._attn_implementation != "sdpa"
        got = m(input_ids=b["input_ids"]).logits
    assert m.config._attn_implementation == "sdpa"
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    eager = _model("cpu", quant=None, attn="eager")
    with causal_attention(eager):  # only sdpa models are switched
        assert eager.config._attn_implementation == "eager"


def test_pad_packed_adds_nothing_to_loss_or_gradients():
    m = _model("cpu", quant=None, dtype="fp32")
    b = _batch(2, B=1, T=40, packed=True, lens=[25, 15])
    padded = pad_packed(b, {"input_ids": (2, 64)}, pad_id=0)
    assert padded["input_ids"].shape == (2, 64) and (padded["labels"][:, 40:] == -100).all()
    assert (padded["labels"][1] == -100).all() and padded["position_ids"][0, 40:].tolist() == list(range(24))

    def run(batch):
        for p in m.parameters():
            p.grad = None
        loss = loss_sum(m, batch, "cpu", grad_in_forward=False, static_shapes=True)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in m.parameters() if p.requires_grad]

    l0, g0 = run(b)
    l1, g1 = run(padded)
    assert l1 == pytest.approx(l0, rel=1e-5)
    for a, c in zip(g0, g1):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-7)
    assert pad_packed(b, {"input_ids": (1, 32)}, 0) is None  # does not fit
    assert pad_packed({k: v for k, v in b.items() if k != "position_ids"}, {"input_ids": (2, 64)}, 0) is None


def test_bucket_lengths():
    for full in (100, 1024, 2048, 3000):
        seen = set()
        for t in range(1, full + 1):
            b = bucket_length(t, full)
            assert t <= b <= full and (b == full or b % 64 == 0)
            assert b - t < max(64, 0.25 * t + 1), (t, b)  # a quarter more tokens at most (64 for short rows)
            seen.add(b)
        assert len(seen) == bucket_count(full)
    assert bucket_count(1024) == 12 and bucket_count(2048) == 16


def test_to_packed_form_keeps_loss_and_gradients():
    m = _model("cpu", quant=None, dtype="fp32")
    g = torch.Generator().manual_seed(5)
    lens = [37, 20, 9]
    ids = torch.zeros(3, 37, dtype=torch.long)
    mask = torch.zeros(3, 37, dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, :n] = torch.randint(1, TINY["vocab_size"], (n,), generator=g)
        mask[i, :n] = 1
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, :4] = -100
    b = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    packed = to_packed_form(b)
    assert "attention_mask" not in packed and packed["position_ids"][1].tolist() == list(range(20)) + list(range(17))
    padded = pad_packed(packed, {"input_ids": (4, bucket_length(37, 1024))}, pad_id=0)
    assert padded["input_ids"].shape == (4, 64)

    def run(batch, **kw):
        for p in m.parameters():
            p.grad = None
        loss = loss_sum(m, batch, "cpu", grad_in_forward=False, **kw)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in m.parameters() if p.requires_grad]

    l0, g0 = run(b)  # the attention mask, as eager training runs it
    l1, g1 = run(padded, static_shapes=True)  # what the graph runs
    assert l1 == pytest.approx(l0, rel=1e-5)
    for a, c in zip(g0, g1):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-6)
    left = dict(b, attention_mask=mask.flip(1))
    assert to_packed_form(left) is None  # left padding: left to eager steps
    assert to_packed_form({"input_ids": ids, "labels": labels}) is None


def test_graph_batch_shapes():
    ids = torch.arange(1, 2 * 128 + 1).view(2, 128)
    full = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    out = graph_batch(full, 2, 1024, pad_id=0, packing=False)  # full rows of a bucket length: causal, no mask
    assert set(out) == {"input_ids", "labels"} and out["input_ids"] is ids
    short = dict(full, attention_mask=torch.ones_like(ids).index_fill(1, torch.arange(100, 128), 0))
    out = graph_batch(short, 4, 1024, pad_id=0, packing=False)  # padding inside: packed form, 4 rows
    assert "attention_mask" not in out and out["input_ids"].shape == (4, 128)
    assert out["position_ids"][0].tolist() == list(range(100)) + list(range(28))
    odd = {k: v[:, :100] for k, v in full.items()}
    assert graph_batch(odd, 2, 1024, 0, False)["input_ids"].shape == (2, 128)  # 100 -> bucket 128
    packed = {"input_ids": ids[:, :100], "labels": ids[:, :100], "position_ids": torch.arange(100).expand(2, 100)}
    assert graph_batch(packed, 4, 1024, 0, True)["input_ids"].shape == (4, 1024)  # packed: --max-length rows
    left = dict(short, attention_mask=short["attention_mask"].flip(1))
    assert graph_batch(left, 4, 1024, 0, False) is left


def test_several_graphs_need_accumulation():
    with pytest.raises(ValueError, match="accumulate"):
        GraphedMicroStep(lambda b, s: None, [], torch.device("cpu"), accumulate=False, max_graphs=2)


def test_train_flag_in_help(capsys):
    from qlora.cli import main
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--cuda-graphs" in capsys.readouterr().out


# -- GPU -----------------------------------------------------------------------------------------


def _run_steps(model, batches, graphs, warmup=2, off=None, accumulate=True, max_graphs=1):
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def micro(b, scale):
        if off is not None:
            off.begin_step()
        with causal_attention(model, enabled="position_ids" not in b), off.hooks() if off else contextlib.nullcontext():
            loss = loss_sum(model, b, "cuda", static_shapes=True) * scale
            loss.backward()
        return loss.detach()

    step = GraphedMicroStep(micro, params, torch.device("cuda"), warmup=warmup, accumulate=accumulate,
                            pad=lambda b, shapes: pad_packed(b, shapes, pad_id=0), max_graphs=max_graphs) if graphs else None
    losses = []
    for b in batches:
        n = int((b["labels"][:, 1:] != -100).sum())
        dev = {k: v.cuda() for k, v in b.items()}
        losses.append((step(b, 1.0 / n) if graphs else micro(dev, 1.0 / n)).item())
        grads = [p.grad.clone() for p in params]
        opt.step()
        opt.zero_grad(set_to_none=not graphs)
    final = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    return losses, grads, final, step


@pytest.mark.gpu
@pytest.mark.parametrize("quant,offload,accumulate", [("nf4", False, True), (None, False, True), ("nf4", True, False)])
def test_graphed_steps_equal_eager_steps(quant, offload, accumulate):
    from qlora.offload import enable_checkpointing
    m = _model("cuda", quant=quant)
    m.train()
    enable_checkpointing(m)
    batches = [_batch(i) for i in range(6)]
    l_e, g_e, p_e, _ = _run_steps(m, batches, graphs=False)  # reference: no offload, eager
    off = enable_checkpointing(m, offload=True, min_bytes=0) if offload else None
    l_g, g_g, p_g, step = _run_steps(m, batches, graphs=True, off=off, accumulate=accumulate)
    assert step.failed is None and step.stats == {"eager": 2, "replays": 4, "captures": 1}
    if offload:  # Python packed in the 2 eager steps and the capture (replays run no Python), reusing the buffers
        assert off.stats["packed"] > 0 and off.stats["packed"] == 3 * len(off._slots), off.stats
    assert l_g == pytest.approx(l_e, rel=1e-4)
    for a, b in zip(g_e + p_e, g_g + p_g):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)


@pytest.mark.gpu
def test_graphed_steps_with_blocks_keeping_their_mlp_gemms_equal_recomputing_ones():
    """Selective recompute (enable_checkpointing's keep_gemms) inside a CUDA graph: the gate/up outputs kept by
    the captured forward are the ones the captured recompute copies on every replay; eager and graphed steps
    equal those of plain checkpointing, bit for bit (eager) and to rounding (graphed)."""
    from qlora.offload import enable_checkpointing
    m = _model("cuda")
    m.train()
    enable_checkpointing(m)
    batches = [_batch(i) for i in range(6)]
    l_ref, g_ref, p_ref, _ = _run_steps(m, batches, graphs=False)
    layers = len(m.model.layers)
    enable_checkpointing(m, keep_gemms=range(layers))
    l_e, g_e, p_e, _ = _run_steps(m, batches, graphs=False)
    assert l_e == l_ref
    for a, b in zip(g_ref + p_ref, g_e + p_e):
        assert torch.equal(a, b)
    l_g, g_g, p_g, step = _run_steps(m, batches, graphs=True)
    assert step.failed is None and step.stats == {"eager": 2, "replays": 4, "captures": 1}
    assert l_g == pytest.approx(l_ref, rel=1e-4)
    for a, b in zip(g_ref + p_ref, g_g + p_g):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)


@pytest.mark.gpu
def test_graphed_packed_batches_are_padded_and_replayed():
    m = _model("cuda")
    m.train()
    batches = [_batch(i, T=64, packed=True) for i in range(3)] + [_batch(9, B=1, T=48, packed=True, lens=[30, 18])]
    l_e, g_e, _, _ = _run_steps(m, batches, graphs=False)
    l_g, g_g, _, step = _run_steps(m, batches, graphs=True)
    assert step.failed is None and step.stats["replays"] == 2  # the capture's own replay and the padded batch
    assert l_g == pytest.approx(l_e, rel=1e-3)
    for a, b in zip(g_e, g_g):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=1e-5)


@pytest.mark.gpu
def test_several_graphs_in_one_pool_equal_eager_steps():
    m = _model("cuda")
    m.train()
    lengths = [64, 64, 64, 96, 96, 128, 128, 64, 96, 128, 96, 64]
    batches = [_batch(i, T=t, packed=True, lens=[t // 3, t - t // 3]) for i, t in enumerate(lengths)]
    l_e, g_e, p_e, _ = _run_steps(m, batches, graphs=False)
    l_g, g_g, p_g, step = _run_steps(m, batches, graphs=True, max_graphs=3)
    # shape 64: 2 warm-ups then a capture; 96 and 128: one warm-up each, then a capture; the rest replays
    assert step.failed is None and step.stats == {"eager": 4, "replays": 8, "captures": 3}, step.stats
    assert len(step.graphs) == 3
    assert l_g == pytest.approx(l_e, rel=1e-3)
    for a, b in zip(g_e + p_e, g_g + p_g):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=1e-5)


@pytest.mark.gpu
def test_graph_survives_grads_set_to_none():
    m = _model("cuda")
    params = [p for p in m.parameters() if p.requires_grad]

    def micro(b, scale):
        loss = loss_sum(m, b, "cuda", static_shapes=True) * scale
        loss.backward()
        return loss.detach()

    step = GraphedMicroStep(micro, params, torch.device("cuda"), warmup=1)
    b = _batch(0)
    for _ in range(2):
        step(b, 1.0)
        for p in params:
            p.grad = None  # what an optimizer's zero_grad() does by default
    step(b, 1.0)
    ref = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    eager = {k: v.cuda() for k, v in b.items()}
    micro(eager, torch.tensor(1.0, device="cuda"))
    for r, p in zip(ref, params):  # one micro-batch's gradient: not zero, not two accumulated (bf16 tolerance)
        torch.testing.assert_close(r, p.grad, rtol=5e-2, atol=1e-4)
        assert p.grad.abs().max() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dropout,packing", [(0.0, True), (0.05, True), (0.05, False)])
def test_train_with_cuda_graphs_matches_eager(tmp_path, dropout, packing):
    make_tiny_model(tmp_path / "model")
    # lengths from ~15 to ~110 tokens: unpacked batches fall in two bucket lengths (64, 128)
    rows = [{"instruction": f"what is the capital of {c} ?", "output": f"the answer is {c} ." + " yes" * (7 * i)}
            for i, c in enumerate(["paris", "rome", "berlin"] * 5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {}
    for graphs in (False, True):
        logs = []
        cfg = TrainConfig(data=str(tmp_path / "d.jsonl"), model=str(tmp_path / "model"), output=str(tmp_path / str(graphs)),
                          rank=4, alpha=8, lr=3e-3, batch_size=4, grad_accum=2, max_steps=6, dropout=dropout,
                          packing=packing, max_length=128, progress=False, optim="adamw", warmup_ratio=0.0,
                          device="cuda", cuda_graphs=graphs)
        train(cfg, log=logs.append)
        out[graphs] = losses(tmp_path / str(graphs))  # step rows (fit warnings are rows of their own)
        assert not any("CUDA graphs off" in m for m in logs), logs
        assert sum("CUDA graph captured" in m for m in logs) == (0 if not graphs else 1 if packing else 2), logs
    assert out[True] == pytest.approx(out[False], rel=1e-2)
