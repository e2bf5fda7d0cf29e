"""Weight streaming (qlora.stream, --offload-weights): losses and LoRA gradients bit for bit those of the model whose
weights stay put (fp32/bf16, checkpointing, activation offload, GEMM-keeping blocks, two optimizer steps, DPO with
its reference pass, MoE, DoRA); which blocks are copied when; a block no slot holds has no weights to read; the
refusals; the plan's slots and host bytes against a built model's buffers; the budget's choice; the build moving
each block out as it completes; `qlora train` / `qlora plan`. CPU tests use the streamer's CPU mode (CPU slots,
plain copies); the GPU tests at the end check the CUDA path (pinned memory, side stream, events) and its memory."""
import json

import pytest
import torch
import transformers

from qlora.budget import choose, for_train
from qlora.cli import main
from qlora.errors import QLoraError
from qlora.linear import QLoRALinear
from qlora.loss import loss_sum
from qlora.model import LoraSettings, QuantSettings, build_random
from qlora.offload import ActivationOffloader, enable_checkpointing
from qlora.optim import make_optimizer
from qlora.plan import GiB, counts_for, estimate, fits, shape_config
from qlora.stream import ALIGN, NotResident, WeightStreamer, aligned
from qlora.train import TrainConfig, _check_fsdp, train

from helpers import cfg, losses, nonzero_lora_b

LAYERS = 4


def _config(layers=LAYERS, hidden=64, arch="llama"):
    kw = dict(hidden_size=hidden, intermediate_size=2 * hidden + 32, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=96, max_position_embeddings=512, tie_word_embeddings=False)
    if arch == "qwen2":  # q/k/v with biases
        return transformers.Qwen2Config(**kw)
    if arch == "qwen3_moe":
        kw.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=16)
        return transformers.Qwen3MoeConfig(**kw)
    return transformers.LlamaConfig(**kw)


def _model(dtype="fp32", stream=None, config=None, quant=None, **lora):
    quant = quant or QuantSettings(compute_dtype=dtype)
    m = build_random(config or _config(), quant, LoraSettings(**dict(dict(r=4, alpha=8, dropout=0.0), **lora)),
                     device="cpu", dtype=dtype, progress=False, stream=stream)
    return nonzero_lora_b(m)


def _pair(dtype="fp32", **kw):
    """The same model twice: weights in place, and streamed (CPU mode)."""
    return _model(dtype, **kw), _model(dtype, stream=WeightStreamer(include_cpu=True), **kw)


def _batch(b=2, t=16, seed=0):
    ids = torch.randint(0, 96, (b, t), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "labels": labels}


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _step(model, opt, loss_fn):
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    grads = _grads(model)
    opt.step()
    return loss.detach(), grads


def _assert_same_steps(plain, streamed, loss_fn, steps=2):
    """``steps`` optimizer steps (AdamW) of both models: the same loss and every LoRA gradient, bit for bit."""
    opts = [make_optimizer([p for p in m.parameters() if p.requires_grad], "adamw", 1e-2) for m in (plain, streamed)]
    for k in range(steps):
        (la, ga), (lb, gb) = (_step(m, o, loss_fn) for m, o in zip((plain, streamed), opts))
        assert torch.equal(la, lb), (k, la, lb)
        assert ga.keys() == gb.keys() and ga
        for n in ga:
            assert torch.equal(ga[n], gb[n]), (k, n)


def _fetches(streamer) -> list[int]:
    """Spy: the indices of the blocks copied into a slot, in order."""
    seen, real = [], streamer._fetch

    def fetch(blk, slot):
        seen.append(blk.index)
        real(blk, slot)
    streamer._fetch = fetch
    return seen


# ------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("gemms", [(), (1, 2)])
def test_streamed_steps_equal_unstreamed_bit_for_bit(dtype, offload, gemms):
    """Checkpointing (every block), with or without activation offload (CPU copies) and with blocks keeping their
    MLP GEMMs: two AdamW steps give the same losses and gradients as the model whose weights never move."""
    plain, streamed = _pair(dtype)
    for m in (plain, streamed):
        off = ActivationOffloader(min_bytes=0, include_cpu=True) if offload else None
        got = enable_checkpointing(m, offload=offload, offloader=off, keep_gemms=gemms)
        if offload:
            m._off = got
    batch = _batch()

    def loss_fn(m):
        if not offload:
            return loss_sum(m, batch, "cpu")
        m._off.begin_step()
        with m._off.hooks():
            return loss_sum(m, batch, "cpu")
    _assert_same_steps(plain, streamed, loss_fn)
    st = streamed.qlora_streamer
    assert st.stats["fetched"] == LAYERS + 2 + 2 + 2 and st.stats["misses"] == 1  # (the order: next test)
    if offload:
        assert streamed._off.stats["packed"] == plain._off.stats["packed"] > 0


def test_blocks_are_copied_once_in_forward_and_once_for_the_recompute():
    """Two slots, 4 blocks: forward copies each block as the previous one runs (block 0 when asked for: a miss);
    backward recomputes 3, 2, 1, 0 and finds the last two still resident from forward, copying 1 and 0 ahead; the
    next step's forward finds 0 and 1 still there. So a step copies L-2 blocks in forward and L-2 in backward (the
    first step L in forward), and the compute stream waits for a copy only on the first step's block 0."""
    plain, streamed = _pair()
    for m in (plain, streamed):
        enable_checkpointing(m)
    st = streamed.qlora_streamer
    seen = _fetches(st)
    batch = _batch()
    loss_sum(streamed, batch, "cpu").backward()
    assert seen == [0, 1, 2, 3, 1, 0] and st.stats["misses"] == 1 and st.stats["prefetched"] == 5
    assert st.resident() == [0, 1]
    seen.clear()
    loss_sum(streamed, batch, "cpu").backward()
    assert seen == [2, 3, 1, 0] and st.stats["misses"] == 1
    assert st.stats["bytes"] == sum(st.blocks[i].nbytes for i in [0, 1, 2, 3, 1, 0, 2, 3, 1, 0])
    assert st.stats["fetched"] == 10


def test_two_forwards_before_one_backward_and_a_no_grad_pass_in_between():
    """A step with two forwards (a DPO step's policy passes, each checkpointed) and an evaluation-like no-grad
    pass between them: the same gradients; the second forward's blocks are recomputed first, then the first's."""
    plain, streamed = _pair()
    for m in (plain, streamed):
        enable_checkpointing(m)
    a, b = _batch(seed=0), _batch(seed=1)

    def loss_fn(m):
        first = loss_sum(m, a, "cpu")
        with torch.no_grad():
            loss_sum(m, b, "cpu")
        return first + 0.5 * loss_sum(m, b, "cpu")
    _assert_same_steps(plain, streamed, loss_fn)


def test_dpo_policy_and_reference_passes_equal_unstreamed(tmp_path):
    """DPO through qlora's preference method: the policy forward (checkpointed), the reference forward with the
    adapters off and no gradients, backward: the same loss and gradients; the reference pass copies every block
    once more (4 + 4 + 2 copies in the first step, 2 + 4 + 2 in the next)."""
    from qlora.methods import Preference
    from qlora.preference import DPO
    from qlora.preference_data import PairBatches, read_pairs, tokenize_pairs
    from tiny import tiny_tokenizer
    tok = tiny_tokenizer()
    rows = [{"prompt": "what is the capital of rome ?", "chosen": "the answer is rome .", "rejected": "paris"},
            {"prompt": "what color is the widget ?", "chosen": "blue .", "rejected": "it is green and red"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, _ = tokenize_pairs(read_pairs(tmp_path / "pairs.jsonl"), tok, max_length=64)
    batch = PairBatches(pairs, 2, tok.pad_token_id, seed=0).epoch(0)[0]
    config = _config()
    config.vocab_size = len(tok)
    plain, streamed = _pair(config=config)
    for m in (plain, streamed):
        enable_checkpointing(m)
    st = streamed.qlora_streamer
    seen = _fetches(st)
    dpo = Preference(DPO(beta=0.1))
    _assert_same_steps(plain, streamed, lambda m: dpo.loss(m, batch, "cpu")[0])
    assert seen == [0, 1, 2, 3] + [0, 1, 2, 3] + [1, 0] + [2, 3] + [0, 1, 2, 3] + [1, 0]


def test_moe_experts_and_dora_are_streamed_with_their_blocks():
    """Routed experts (one QLoRA linear per expert, in the block) move with their block; DoRA's magnitudes stay, and
    the base's row norms it keeps are computed while the block is resident: the same steps as without streaming."""
    batch = _batch()
    for kw in (dict(config=_config(arch="qwen3_moe")), dict(dora=True), dict(config=_config(arch="qwen2"))):
        plain, streamed = _pair(**kw)
        for m in (plain, streamed):
            enable_checkpointing(m)
        _assert_same_steps(plain, streamed, lambda m: loss_sum(m, batch, "cpu"))
        if kw.get("dora"):
            norms = [m._dora_wn2 for m in streamed.modules() if isinstance(m, QLoRALinear) and m.r]
            assert norms and all(n is not None and not isinstance(n[1], NotResident) for n in norms)


def test_sixteen_bit_base_is_streamed_too():
    plain, streamed = _pair(quant=QuantSettings(quant_type=None, compute_dtype="fp32"))
    for m in (plain, streamed):
        enable_checkpointing(m)
    batch = _batch()
    _assert_same_steps(plain, streamed, lambda m: loss_sum(m, batch, "cpu"), steps=1)
    layer = streamed.model.layers[3].mlp.up_proj
    assert layer.weight_packed is None and isinstance(layer.weight, NotResident)


# ------------------------------------------------------------------------------------- what is where


def test_built_model_holds_no_block_weights_and_each_block_left_as_it_was_complete(monkeypatch):
    """With a streamer, the build moves each block's base tensors to host memory as soon as the block is complete
    (when block k is taken, blocks 0..k-1 hold placeholders already and blocks k+1.. are not built yet), so the
    device holds the weights outside the blocks and about one block; afterwards no block is resident."""
    from qlora import model as qm
    st, made, states = WeightStreamer(include_cpu=True), [], []
    real_take, real_skeleton = st.take_block, qm.skeleton

    def skeleton(config, dtype=torch.bfloat16):  # the last skeleton made is the model being built
        made.append(real_skeleton(config, dtype))
        return made[-1]

    def take(block, index=None):
        layers = [m for m in made[-1].modules() if isinstance(m, QLoRALinear)]
        states.append((len(layers), sum(isinstance(m.weight_packed, NotResident) for m in layers)))
        real_take(block, index=index)
    monkeypatch.setattr(qm, "skeleton", skeleton)
    st.take_block = take
    model = _model(stream=st)
    assert states[:LAYERS] == [(7, 0), (14, 7), (21, 14), (28, 21)]  # 7 linears a block
    layers = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    assert len(layers) == 7 * LAYERS
    for m in layers:
        for name in m.BASE_TENSORS:
            t = getattr(m, name)
            assert t is None or isinstance(t, NotResident), name
    assert st.resident() == [] and st.stats["fetched"] == 0
    assert st.host_bytes == sum(b.host.numel() for b in st.blocks)
    assert len(st.slots) == 2 and all(s.data.numel() == st.slot_bytes for s in st.slots)
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):  # outside the blocks: real tensors
        if not isinstance(t, NotResident):
            assert not t.is_meta, n


def test_a_block_no_slot_holds_has_no_weights_to_read():
    model = _model(stream=WeightStreamer(include_cpu=True))
    enable_checkpointing(model)
    st = model.qlora_streamer
    loss_sum(model, _batch(), "cpu").backward()
    assert st.resident() == [0, 1]
    resident, gone = model.model.layers[0].mlp.down_proj, model.model.layers[3].mlp.down_proj
    slot = st.blocks[0].slot.data
    p = resident.weight_packed
    assert not isinstance(p, NotResident) and slot.data_ptr() <= p.data_ptr() < slot.data_ptr() + slot.numel()
    assert p.data_ptr() % ALIGN == 0
    assert isinstance(gone.weight_packed, NotResident) and gone.weight_packed.shape == p.shape
    for use in (lambda: gone.base_weight(), lambda: gone.weight_packed.device, lambda: gone.absmax + 1,
                lambda: gone.weight_packed.data_ptr(), lambda: gone.merged_weight()):
        with pytest.raises(QLoraError, match="block 3: its frozen weights are not on the device now") as e:
            use()
        assert "\n" not in str(e.value)
    with torch.no_grad():  # a forward asks for its block: it is copied in, and then the layer reads it
        model(input_ids=_batch()["input_ids"])
    assert 3 in st.resident()


def test_remove_gives_each_layer_its_own_tensors_back():
    plain, streamed = _pair()
    for m in (plain, streamed):
        enable_checkpointing(m)
    batch = _batch()
    loss_sum(streamed, batch, "cpu").backward()
    st = streamed.qlora_streamer
    st.remove()
    assert not hasattr(streamed, "qlora_streamer") and not st.slots
    assert not any(isinstance(b, NotResident) for b in streamed.buffers())
    mine = dict(streamed.named_buffers(remove_duplicate=False))
    for n, a in plain.named_buffers(remove_duplicate=False):  # (on the CPU the code tables are shared: not here)
        assert torch.equal(a, mine[n]), n
    streamed.eval()  # (no hooks left: an eval-mode forward with gradients is no longer refused)
    with torch.enable_grad():
        streamed(input_ids=batch["input_ids"])


def test_a_saved_slot_view_outliving_its_block_is_refused_by_autograd():
    """The safety net: a layer run with gradients outside a checkpoint (here directly) saves a view of its slot;
    once other blocks' copies have refilled that slot, backward refuses the stale tensor (the slot's version
    counter moved) instead of computing with other weights."""
    model = _model(stream=WeightStreamer(include_cpu=True))
    enable_checkpointing(model)
    layer = model.model.layers[0].self_attn.q_proj
    y = layer(torch.randn(2, 64))
    with torch.no_grad():
        model(input_ids=_batch()["input_ids"])  # blocks 0..3 in turn: block 0's slot now holds block 2
    assert 0 not in model.qlora_streamer.resident()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_generation_streams_the_blocks_without_caches_or_graphs():
    """Greedy decoding from a streamed model (transformers' generate: each step runs every block, copying it in)
    gives the plain model's tokens; no dequantized-weight cache (only resident blocks have weights) and no
    CUDA-graph decoding (the host picks the slots), each with its reason; nor a graphed training step."""
    from qlora.cuda_graphs import supported
    from qlora.decoding import unsupported
    from qlora.generate import inference_cache
    plain, streamed = _pair()
    ids = _batch(b=1, t=8)["input_ids"]
    out = []
    for m in (plain, streamed):
        m.eval()
        with torch.no_grad(), inference_cache(m):
            out.append(m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                  use_cache=True, pad_token_id=0, eos_token_id=1))
    assert torch.equal(out[0], out[1])
    assert streamed.qlora_streamer.stats["fetched"] > LAYERS * 6 // 2
    assert all(m._wcache is None for m in streamed.modules() if isinstance(m, QLoRALinear))
    assert "streamed from CPU memory" in unsupported(streamed, 64)
    from qlora.linear import dequant_cache
    with pytest.raises(QLoraError, match="no dequantized copy"):
        dequant_cache(streamed)
    dequant_cache(streamed, enabled=False)
    ok, why = supported(torch.device("cuda"), streamed_weights=True)
    assert not ok and "streamed from CPU memory" in why


# ------------------------------------------------------------------------------------------ refusals


def test_refusals_are_one_line():
    model = _model(stream=WeightStreamer(include_cpu=True))
    errors = []
    with pytest.raises(QLoraError, match="block 3 keeps its activations") as e:
        enable_checkpointing(model, keep=[3])
    errors.append(e)
    model.eval()  # a forward with gradients that no checkpoint will recompute
    with pytest.raises(QLoraError, match="block 0 runs with gradients but is not checkpointed") as e:
        model(input_ids=_batch()["input_ids"])
    errors.append(e)
    plain = _model()
    enable_checkpointing(plain, keep=[2])
    with pytest.raises(QLoraError, match="block 2 keeps its activations") as e:
        WeightStreamer(include_cpu=True).install(plain)
    errors.append(e)
    with pytest.raises(QLoraError, match="on the CPU, where it saves nothing") as e:
        WeightStreamer().install(_model())
    errors.append(e)
    sharded = _model()
    for m in sharded.modules():
        if isinstance(m, QLoRALinear):
            m.to_carriers()  # (what --parallel fsdp does to each layer before sharding it)
    with pytest.raises(QLoraError, match="FSDP2") as e:
        WeightStreamer(include_cpu=True).install(sharded)
    errors.append(e)
    with pytest.raises(QLoraError, match="FSDP2") as e:
        build_random(_config(), QuantSettings(compute_dtype="fp32"), None, device="cpu", dtype="fp32",
                     progress=False, on_block=lambda b: None, stream=WeightStreamer(include_cpu=True))
    errors.append(e)
    with pytest.raises(QLoraError, match="--parallel fsdp does not support --offload-weights true") as e:
        _check_fsdp(TrainConfig(data="x", parallel="fsdp", offload_weights="true"))
    errors.append(e)
    with pytest.raises(QLoraError, match="at least 2 slots") as e:
        WeightStreamer(slots=1)
    errors.append(e)
    assert all("\n" not in str(e.value) for e in errors)


# ------------------------------------------------------------------------------------------ plan, budget


def _block_bytes_of(model) -> list[int]:
    """Each decoder block's base tensors, counted from the built model's own buffers: every tensor's bytes rounded
    up to the streamer's alignment (its place in a block buffer)."""
    out = []
    for block in model.model.layers:
        n = 0
        for m in block.modules():
            if isinstance(m, QLoRALinear):
                n += sum(aligned(t.numel() * t.element_size()) for t in (getattr(m, k) for k in m.BASE_TENSORS)
                         if t is not None)
        out.append(n)
    return out


@pytest.mark.parametrize("arch,quant", [("llama", QuantSettings(compute_dtype="bf16")),
                                        ("qwen2", QuantSettings(compute_dtype="bf16")),
                                        ("llama", QuantSettings(double_quant=False, compute_dtype="bf16")),
                                        ("llama", QuantSettings(blocksize=128, compute_dtype="bf16")),
                                        ("llama", QuantSettings(quant_type=None, compute_dtype="bf16"))])
def test_plan_slots_are_two_of_the_largest_block_of_the_built_model(arch, quant):
    """estimate(offload_weights=True): the weights on the device are 2 x the largest block's bytes and the host
    holds all blocks, both equal to the bytes of the built model's buffers (counted in the test) and to what the
    streamer allocates; the 4-bit weights, DQ constants and the blocks' 16-bit tensors leave the device."""
    config = _config(arch=arch, hidden=128)
    kw = dict(rank=4, quant_type=quant.quant_type, blocksize=quant.blocksize, double_quant=quant.double_quant,
              dropout=0.0)
    plain = _model("bf16", config=config, quant=quant)
    blocks = _block_bytes_of(plain)
    on = estimate(config, 64, 2, offload_weights=True, **kw)
    off = estimate(config, 64, 2, **kw)
    assert on["components"]["weight_slots"] == 2 * max(blocks)
    assert on["host"]["weights"] == sum(blocks) and off["host"]["weights"] == 0
    assert on["components"]["weights_4bit"] == on["components"]["dq_constants"] == 0
    block_16 = sum(t.numel() * t.element_size() for m in plain.modules() if isinstance(m, QLoRALinear)
                   for t in (m.weight, m.bias) if t is not None)
    assert off["components"]["frozen_16bit"] - on["components"]["frozen_16bit"] == block_16
    assert off["components"]["weight_slots"] == 0 and sum(on["components"].values()) == on["peak"]
    st = WeightStreamer(include_cpu=True).install(plain)
    assert st.slot_bytes == max(blocks) and st.host_bytes == sum(blocks)
    with pytest.raises(QLoraError, match="need their blocks recomputed"):
        estimate(config, 64, 2, offload_weights=True, keep_blocks=1, **kw)


def test_budget_streams_exactly_when_recomputing_everything_does_not_fit():
    """For budgets around the edge: the policy streams exactly when the cheapest policy with the weights on the
    device (every block recomputed, inputs offloaded, optimizer state paged out as needed) does not fit; with
    streaming asked for it streams at any budget that fits; a budget streaming does not fit either is one line."""
    config = shape_config("70b")
    kw = dict(rank=16, dropout=0.0, embed_offload=True)
    kw["counts"] = counts_for(config, **kw)

    def cheapest_fits(budget):
        return fits(estimate(config, 2048, 1, offload=True, gpu_mem=budget, **kw), budget)
    seen = set()
    for gib in (12, 24, 36, 40, 44, 48):
        budget = gib * GiB
        p = choose(config, 2048, 1, budget, **kw)
        assert bool(p.stream) == (not cheapest_fits(budget)), gib
        assert p.keep == 0 or not p.stream
        seen.add(bool(p.stream))
        if p.stream:  # as few blocks as fit: one fewer does not, even with every input offloaded
            c = kw["counts"]
            assert p.weight_slots == 2 * c["largest_block"] and p.weight_host == int(c["blocks_bytes"] * p.stream / 80)
            assert not fits(estimate(config, 2048, 1, offload=True, offload_weights=p.stream - 1, gpu_mem=budget,
                                     **kw), budget), (gib, p.stream)
            assert f"the weights of {p.stream} of the 80 blocks streamed from CPU memory" in p.describe()
    assert seen == {True, False}
    assert choose(config, 2048, 1, 24 * GiB, **kw).stream < choose(config, 2048, 1, 12 * GiB, **kw).stream < 80
    forced = choose(config, 2048, 1, 80 * GiB, stream=True, **kw)
    assert forced.stream == 80 and forced.keep == 0 and "; block weights streamed" in forced.describe()
    assert not choose(config, 2048, 1, 80 * GiB, **kw).stream
    with pytest.raises(QLoraError, match="too small for this run: even with every block recomputed, block inputs in "
                                         "CPU memory, the block weights streamed") as e:
        choose(config, 2048, 1, 4 * GiB, **kw)
    assert "\n" not in str(e.value)
    with pytest.raises(QLoraError, match="too small"):
        choose(config, 2048, 1, 24 * GiB, stream=False, **kw)
    on_cpu = for_train(TrainConfig(data="x", model="shape:70b", max_length=2048, batch_size=1, rank=16, dropout=0.0,
                                   memory_budget="44GiB", offload_embeddings=True), torch.device("cpu"))
    assert not on_cpu.stream  # (nothing to stream on a CPU: the budget does not consider it there)
    given = for_train(TrainConfig(data="x", model="shape:70b", max_length=2048, batch_size=1, rank=16, dropout=0.0,
                                  memory_budget="40GiB", offload_embeddings=True), torch.device("cpu"), streamed=20)
    assert given.stream == 20 and given.keep == 0  # a model given to the run streams 20 blocks: the policy's count


def test_plan_cli_offload_weights(capsys):
    args = ["plan", "--shape", "70b", "--seq", "2048", "--batch", "1", "--rank", "16", "--dropout", "0",
            "--offload", "true", "--offload-embeddings", "true", "--gpu-mem", "24GiB"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "--offload-weights true" in out  # the advice names it
    assert main(args + ["--offload-weights", "true"]) == 0
    out = capsys.readouterr().out
    assert "streamed block slots" in out and "in pinned CPU memory" in out and "fits in 24.0 GiB" in out
    assert main(args + ["--offload-weights", "true", "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    c = counts_for(shape_config("70b"), rank=16)
    assert js["components"]["weight_slots"] == 2 * c["largest_block"] and js["host"]["weights"] == c["blocks_bytes"]
    assert js["settings"]["offload_weights"] is True and sum(js["components"].values()) == js["peak"]
    assert main(args[:-2] + ["--memory-budget", "24GiB", "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    n = js["policy"]["offload_weights"]  # the fewest blocks streamed that fit; the others' weights on the device
    assert 0 < n < 80 and js["settings"]["streamed_blocks"] == n
    assert js["components"]["weights_4bit"] == int(c["weights_4bit"] * (80 - n) / 80)


def test_some_blocks_streamed_equal_unstreamed_and_only_they_move():
    """WeightStreamer(only=...): the blocks named stream (placeholders while no slot holds them, copied in turn),
    the others keep their own device tensors and run as they are; two AdamW steps give the unstreamed model's
    losses and gradients bit for bit; a step copies only the streamed blocks; the blocks not streamed may keep
    their activations, a streamed one may not (one line)."""
    plain = _model()
    only = [0, 2, 3]
    part = _model(stream=WeightStreamer(include_cpu=True, only=only))
    st = part.qlora_streamer
    assert [b.index for b in st.blocks] == only
    layers = part.model.layers
    for i, block in enumerate(layers):
        placeholders = [isinstance(m.weight_packed, NotResident) for m in block.modules() if isinstance(m, QLoRALinear)]
        assert all(placeholders) if i in only else not any(placeholders), i
    for m in (plain, part):
        enable_checkpointing(m, keep=[1])  # block 1 keeps its weights on the device: it may be kept
    seen = _fetches(st)
    batch = _batch()
    _assert_same_steps(plain, part, lambda m: loss_sum(m, batch, "cpu"))
    assert set(seen) <= set(only) and 1 not in seen and seen
    assert st.stats["bytes"] == sum(st.blocks[only.index(i)].nbytes for i in seen)
    assert all(m.weight_packed.device.type == "cpu" and not isinstance(m.weight_packed, NotResident)
               for m in layers[1].modules() if isinstance(m, QLoRALinear))
    with pytest.raises(QLoraError, match="block 2 keeps its activations .* weights streamed") as e:
        enable_checkpointing(part, keep=[2, 3])
    assert "\n" not in str(e.value)


def test_streamed_blocks_are_spread_and_bad_sets_are_one_line():
    from qlora.plan import streamed_blocks
    assert streamed_blocks(32, 8) == [0, 4, 8, 12, 16, 20, 24, 28] and streamed_blocks(32, 32) == list(range(32))
    assert streamed_blocks(32, 0) == [] and streamed_blocks(32, 4, keep=16) == [0, 4, 8, 12]
    spread = streamed_blocks(80, 39)
    assert len(set(spread)) == 39 and max(spread) < 80 and max(b - a for a, b in zip(spread, spread[1:])) <= 3
    with pytest.raises(QLoraError, match="do not fit among 16"):
        streamed_blocks(32, 17, keep=16)
    for only in ([], [-1], ["a"]):
        with pytest.raises(QLoraError, match="blocks to stream must be block indices"):
            WeightStreamer(include_cpu=True, only=only)
    with pytest.raises(QLoraError, match=r"blocks to stream \[1, 9\]: the model has 4 decoder blocks"):
        _model(stream=WeightStreamer(include_cpu=True, only=[1, 9]))


def test_plan_counts_some_streamed_blocks():
    """K of L blocks streamed: their share of the 4-bit weights, DQ constants and block 16-bit tensors leaves the
    device for CPU memory (the blocks are alike), the two slots stay; 0 is no streaming, L (or True) all; the
    streamed blocks must be checkpointed."""
    config = shape_config("8b")
    kw = dict(rank=16, dropout=0.0, counts=counts_for(config, rank=16))
    c = kw["counts"]
    none, all_ = (estimate(config, 2048, 2, offload_weights=x, **kw) for x in (0, True))
    assert estimate(config, 2048, 2, offload_weights=32, **kw) == all_
    assert none["peak"] == estimate(config, 2048, 2, **kw)["peak"] and none["host"]["weights"] == 0
    for k in (1, 8, 31):
        e = estimate(config, 2048, 2, offload_weights=k, **kw)
        assert e["components"]["weights_4bit"] == int(c["weights_4bit"] * (32 - k) / 32)
        assert e["host"]["weights"] == int(c["blocks_bytes"] * k / 32)
        assert e["components"]["weight_slots"] == 2 * c["largest_block"] and e["settings"]["streamed_blocks"] == k
        assert e["peak"] > all_["peak"]
    peaks = [estimate(config, 2048, 2, offload_weights=k, **kw)["peak"] for k in range(1, 33)]
    assert all(a > b for a, b in zip(peaks, peaks[1:]))  # each block streamed frees its weights; the slots are fixed
    assert peaks[0] > none["peak"]  # one block streamed costs its two slots: streaming pays from the third block
    assert estimate(config, 2048, 2, offload_weights=8, keep_blocks=24, **kw)["settings"]["keep_blocks"] == 24
    with pytest.raises(QLoraError, match=r"no more blocks kept than are not streamed \(24\)"):
        estimate(config, 2048, 2, offload_weights=8, keep_blocks=25, **kw)


def test_train_streams_the_blocks_its_policy_names(setup, tmp_path, switch, monkeypatch):
    """A policy streaming 1 of the tiny model's 2 blocks (the budget's choice where the weights of all blocks need
    not leave): the run's streamer takes exactly qlora.plan.streamed_blocks(L, 1), the header says so, and the
    losses are those of the run whose weights stay put."""
    import dataclasses

    from qlora import budget
    from qlora.plan import streamed_blocks
    kw = dict(max_steps=2, save_every=0)
    train(cfg(setup, tmp_path / "plain", **kw), log=lambda m: None)
    switch("QLORA_STREAM_CPU", "1")
    real = budget.for_train

    def one_streamed(c, device, config=None, streamed=None, agree=None):
        return dataclasses.replace(real(c, device, config, streamed, agree), keep=0, gemms=0, stream=1)
    monkeypatch.setattr(budget, "for_train", one_streamed)
    lines = []
    s = train(cfg(setup, tmp_path / "part", memory_budget="100GiB", **kw), log=lines.append)
    st = s["model"].qlora_streamer
    layers = len(s["model"].model.layers)
    assert [b.index for b in st.blocks] == streamed_blocks(layers, 1) == [0] and layers == 2
    head = [m for m in lines if m.startswith("weights: streamed from CPU memory (the memory budget's policy)")]
    assert len(head) == 1 and "1 of the 2 blocks'" in head[0], lines
    assert losses(tmp_path / "part") == losses(tmp_path / "plain")


# ------------------------------------------------------------------------------------------ qlora train


def test_train_streams_with_the_same_losses_and_says_so(setup, tmp_path, switch):
    """`qlora train --offload-weights true` (on the CPU through QLORA_STREAM_CPU): the losses of the run whose
    weights stay put, the decision in the header, checkpointing forced on, the resolved value in config.yaml; DPO
    too. Without the switch a CPU run refuses true in one line and auto streams nothing."""
    kw = dict(max_steps=3, save_every=0, grad_checkpointing=False)
    train(cfg(setup, tmp_path / "plain", **kw), log=lambda m: None)
    switch("QLORA_STREAM_CPU", "1")
    lines = []
    s = train(cfg(setup, tmp_path / "stream", offload_weights="true", **kw), log=lines.append)
    assert losses(tmp_path / "stream") == losses(tmp_path / "plain")
    head = [m for m in lines if m.startswith("weights: streamed from CPU memory (--offload-weights true)")]
    assert len(head) == 1 and "recomputed in backward" in head[0]
    assert any("gradient checkpointing on" in m for m in lines)
    saved = (tmp_path / "stream" / "config.yaml").read_text()
    assert "offload_weights: 'true'" in saved and "grad_checkpointing: true" in saved
    st = s["model"].qlora_streamer
    assert st.stats["fetched"] > 0
    switch("QLORA_STREAM_CPU", None)
    with pytest.raises(QLoraError, match="--offload-weights true: the run is on cpu") as e:
        train(cfg(setup, tmp_path / "refused", offload_weights="true", **kw), log=lambda m: None)
    assert "\n" not in str(e.value)
    s = train(cfg(setup, tmp_path / "auto", **kw), log=lambda m: None)
    assert getattr(s["model"], "qlora_streamer", None) is None
    assert "offload_weights: 'false'" in (tmp_path / "auto" / "config.yaml").read_text()


def test_train_refuses_streaming_that_the_cpu_memory_cannot_hold(setup, tmp_path, switch, monkeypatch):
    """The streamed blocks are page-locked in CPU memory, one copy per process of the machine: more than is
    available is one line before the model loads, naming both sizes."""
    from qlora import budget
    from qlora.plan import counts_for, model_config
    switch("QLORA_STREAM_CPU", "1")
    blocks = counts_for(model_config(str(setup / "model")), rank=4)["blocks_bytes"]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(budget, "host_available", lambda: int(1.5 * blocks))
    with pytest.raises(QLoraError, match=r"the run needs .* GiB of CPU memory \(streamed block weights .* GiB, each "
                       r"of 2 processes\) but .* GiB is available") as e:
        train(cfg(setup, tmp_path / "a", offload_weights="true", max_steps=1), log=lambda m: None)
    assert "\n" not in str(e.value) and not (tmp_path / "a" / "adapter").exists()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    train(cfg(setup, tmp_path / "b", offload_weights="true", max_steps=1, save_every=0), log=lambda m: None)


def test_train_streams_a_model_the_plan_cannot_count(setup, tmp_path, switch, monkeypatch):
    """--offload-weights true on a model whose blocks the plan cannot count: every block streams, the header says
    so without sizes, and the losses are those of the run whose weights stay put."""
    from qlora import plan

    def unknown(*a, **k):
        raise QLoraError("unknown architecture")
    kw = dict(max_steps=2, save_every=0)
    train(cfg(setup, tmp_path / "plain", **kw), log=lambda m: None)
    switch("QLORA_STREAM_CPU", "1")
    monkeypatch.setattr(plan, "counts_for", unknown)
    lines = []
    s = train(cfg(setup, tmp_path / "stream", offload_weights="true", **kw), log=lines.append)
    head = [m for m in lines if m.startswith("weights: streamed from CPU memory")]
    assert len(head) == 1 and "2 blocks at a time on the device" in head[0], lines
    assert s["model"].qlora_streamer.only is None and len(s["model"].qlora_streamer.blocks) == 2
    assert losses(tmp_path / "stream") == losses(tmp_path / "plain")


@pytest.mark.parametrize("kw,why", [(dict(cache_dequant="on"), "--cache-dequant on keeps a 16-bit copy"),
                                    (dict(init="pissa"), "--init pissa keeps the corrected base")])
def test_train_refuses_true_beside_what_streaming_cannot_run_with(setup, tmp_path, switch, kw, why):
    """One line before the model loads; auto then streams nothing."""
    switch("QLORA_STREAM_CPU", "1")
    with pytest.raises(QLoraError, match=f"--offload-weights true: {why}") as e:
        train(cfg(setup, tmp_path / "a", offload_weights="true", max_steps=1, **kw), log=lambda m: None)
    assert "\n" not in str(e.value)


def test_train_dpo_streams_with_the_same_losses(tmp_path, switch):
    from tiny import make_tiny_model
    make_tiny_model(tmp_path / "model", layers=4)
    rows = [{"prompt": f"what is the capital of {c} ?", "chosen": f"the answer is {c} .", "rejected": "paris"}
            for c in ("rome", "berlin", "rome", "berlin")]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(data=str(tmp_path / "pairs.jsonl"), model=str(tmp_path / "model"), method="dpo", batch_size=2,
              grad_accum=1, max_steps=2, save_every=0, val_split="0")
    train(cfg(tmp_path, tmp_path / "plain", **kw), log=lambda m: None)
    switch("QLORA_STREAM_CPU", "1")
    s = train(cfg(tmp_path, tmp_path / "stream", offload_weights="true", **kw), log=lambda m: None)
    assert losses(tmp_path / "stream") == losses(tmp_path / "plain")
    assert s["model"].qlora_streamer.stats["fetched"] >= 3 * 4


# ------------------------------------------------------------------------------------------ GPU


def _cuda_model(stream=None, layers=4, hidden=256, inter=None):
    config = _config(layers=layers, hidden=hidden)
    config.intermediate_size = inter or 4 * hidden
    m = build_random(config, QuantSettings(compute_dtype="bf16"), LoraSettings(r=8, alpha=16, dropout=0.0),
                     device="cuda", dtype="bf16", progress=False, stream=stream)
    return nonzero_lora_b(m)


@pytest.mark.gpu
@pytest.mark.parametrize("offload", [False, True])
def test_cuda_streamed_steps_equal_unstreamed_bit_for_bit(offload):
    """bf16 on CUDA: pinned host buffers, the side stream and its events; with activation offload (its own side
    stream) too. Two AdamW steps: the same losses and gradients, bit for bit."""
    plain, streamed = _cuda_model(), _cuda_model(stream=WeightStreamer())
    st = streamed.qlora_streamer
    # (registered in place: the buffer is a page-aligned slice of its storage, whose start torch.is_pinned() checks)
    assert st.device.type == "cuda" and st.pinned == "registered"
    for m in (plain, streamed):
        m._off = enable_checkpointing(m, offload=offload, min_bytes=0)  # (the block inputs here are small)
    batch = {k: v.cuda() for k, v in _batch(b=2, t=128).items()}

    def loss_fn(m):
        if m._off is None:
            return loss_sum(m, batch, "cuda")
        m._off.begin_step()
        with m._off.hooks():
            return loss_sum(m, batch, "cuda")
    _assert_same_steps(plain, streamed, loss_fn)
    torch.cuda.synchronize()
    assert st.stats["misses"] == 1 and st.stats["fetched"] == 4 + 2 + 2 + 2
    if offload:
        assert streamed._off.stats["packed"] == plain._off.stats["packed"] > 0


@pytest.mark.gpu
def test_cuda_some_blocks_streamed_equal_unstreamed_bit_for_bit():
    """bf16 on CUDA, blocks 1 and 3 of 4 streamed (the others' weights on the device, block 2 kept without
    recompute): two AdamW steps, the same losses and gradients bit for bit; only the streamed blocks are copied."""
    plain, part = _cuda_model(), _cuda_model(stream=WeightStreamer(only=[1, 3]))
    st = part.qlora_streamer
    for m in (plain, part):
        enable_checkpointing(m, keep=[2])
    seen = _fetches(st)
    batch = {k: v.cuda() for k, v in _batch(b=2, t=128).items()}
    _assert_same_steps(plain, part, lambda m: loss_sum(m, batch, "cuda"))
    torch.cuda.synchronize()
    assert set(seen) == {1, 3}


@pytest.mark.gpu
def test_cuda_streaming_saves_about_the_block_weights():
    """The peak of a training step (and of the build) with streaming is below the unstreamed one by about the
    blocks' weights less the two slots."""
    import gc

    def measure(stream):
        gc.collect()  # (garbage of earlier tests or rows must not be freed inside the measured window)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        m = _cuda_model(stream=WeightStreamer() if stream else None, layers=8, hidden=1024)
        build_peak = torch.cuda.max_memory_allocated() - before
        enable_checkpointing(m)
        batch = {k: v.cuda() for k, v in _batch(b=1, t=64).items()}
        torch.cuda.reset_peak_memory_stats()
        loss_sum(m, batch, "cuda").backward()
        torch.cuda.synchronize()
        step_peak = torch.cuda.max_memory_allocated() - before
        st = getattr(m, "qlora_streamer", None)
        sizes = (st.host_bytes, st.slot_bytes) if st is not None else None
        del m
        return build_peak, step_peak, sizes
    build_plain, step_plain, _ = measure(False)
    build_stream, step_stream, (host, slot) = measure(True)
    saved = host - 2 * slot
    assert saved > 0.5 * host  # 8 blocks: the slots are a quarter of them
    assert 0.8 * saved <= step_plain - step_stream <= 1.2 * saved, (step_plain, step_stream, saved)
    assert build_stream < build_plain - 0.5 * saved, (build_plain, build_stream, saved)


def test_auto_streams_the_fewest_blocks_with_the_inputs_where_the_run_puts_them():
    """--offload-weights auto without a budget: nothing where the run fits with every block recomputed and the block
    inputs offloaded; else the fewest blocks with which it fits, counted with the block inputs where the run puts
    them (more blocks when they stay on the device), and one fewer does not fit."""
    from qlora.budget import stream_needed
    from qlora.plan import plan_kwargs, rows_per_micro_batch
    config = shape_config("70b")

    def run(offload, gpu):
        c = TrainConfig(data="x", model="shape:70b", max_length=2048, batch_size=1, rank=16, dropout=0.0,
                        offload_embeddings=True, offload_weights="auto", offload_activations=offload)
        n, _ = stream_needed(c, config, gpu)
        kw = dict(plan_kwargs(c), grad_checkpointing=True)
        for k, ok in ((n, True), (n - 1, False)):
            if 0 < k:
                e = estimate(config, 2048, rows_per_micro_batch(c), gpu_mem=gpu, **dict(kw, offload_weights=k))
                assert fits(e, gpu) == ok, (offload, k)
        return n
    assert run(True, 80 * GiB) == 0
    on_host, on_device = run(True, 24 * GiB), run(False, 24 * GiB)
    assert 0 < on_host < on_device < 80
