"""Preference tuning (DPO, IPO, ORPO): parity with TRL's own trainers (loss and LoRA gradients, fp32 on the
CPU), the LoRA-off reference against transformers on the dequantized weights, precomputed reference
log-probs, and the data checks (every bad record named by file and line) and pair batches."""
import csv
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora.errors import QLoraError
from qlora.linear import QLoRALinear
from qlora.model import LoraSettings, QuantSettings, apply_qlora
from qlora import preference as P
from qlora.preference_data import PairBatches, load_pairs, pairs_digest, read_pairs, tokenize_pairs

from tiny import make_tiny_model, tiny_tokenizer

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

Q = "what is the capital of"
PAIRS = [  # the answers differ in length, so padding and per-row sums are exercised
    {"prompt": f"{Q} rome ?", "chosen": "the answer is rome .", "rejected": "paris"},
    {"prompt": f"{Q} paris ?", "chosen": "paris", "rejected": "the answer is berlin , which is red ."},
    {"prompt": "what color is the widget ?", "chosen": "blue .", "rejected": "it is green and red"},
    {"prompt": "how much is the gadget ?", "chosen": "ten dollars", "rejected": "seven dollars ."},
]
LORA = dict(r=4, alpha=8.0)


def conversational(p):
    user = [{"role": "user", "content": p["prompt"]}]
    return {"chosen": user + [{"role": "assistant", "content": p["chosen"]}],
            "rejected": user + [{"role": "assistant", "content": p["rejected"]}]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("pref") / "model")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def batch(tmp_path_factory, tok):
    f = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    f.write_text("".join(json.dumps(conversational(p)) + "\n" for p in PAIRS))
    pairs, _ = load_pairs(f, tok, max_length=64)
    return PairBatches(pairs, len(pairs), tok.pad_token_id, seed=0).epoch(0)[0]


def ours(path, quant_type=None, seed=0):
    """Our QLoRA model on the tiny model, with a random (nonzero) B so that policy and reference differ."""
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    apply_qlora(m, QuantSettings(quant_type=quant_type, compute_dtype="fp32"), LoraSettings(dropout=0.0, **LORA),
                seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for mod in m.modules():
        if isinstance(mod, QLoRALinear) and mod.r:
            mod.lora_B.data.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.3)
    return m


def copy_adapter(src, peft_model):
    """Our LoRA factors into peft's (same module names under base_model.model)."""
    inner = peft_model.base_model.model
    n = 0
    for name, mod in src.named_modules():
        if isinstance(mod, QLoRALinear) and mod.r:
            tgt = inner.get_submodule(name)
            tgt.lora_A["default"].weight.data.copy_(mod.lora_A.data)
            tgt.lora_B["default"].weight.data.copy_(mod.lora_B.data)
            n += 1
    assert n == 14  # 7 linears x 2 blocks: both sides train the same layers


def grads_match(src, peft_model, rtol=1e-5):
    inner = peft_model.base_model.model
    for name, mod in src.named_modules():
        if isinstance(mod, QLoRALinear) and mod.r:
            tgt = inner.get_submodule(name)
            for ours_g, theirs in ((mod.lora_A.grad, tgt.lora_A["default"].weight.grad),
                                   (mod.lora_B.grad, tgt.lora_B["default"].weight.grad)):
                assert theirs is not None and theirs.abs().max() > 0
                torch.testing.assert_close(ours_g, theirs, rtol=rtol, atol=rtol * theirs.abs().max().item())


def lora_config():
    return peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear", lora_dropout=0.0)


def rel_close(a, b, rtol=1e-5):
    a, b = float(torch.as_tensor(a).detach()), float(torch.as_tensor(b).detach())
    assert abs(a - b) <= rtol * max(abs(b), 1e-6), (a, b)


# ------------------------------------------------------------------------------ TRL parity
@pytest.mark.parametrize("loss_type,sft_weight,share", [("sigmoid", 0.0, False), ("ipo", 0.0, False),
                                                        ("sigmoid", 0.7, False), ("sigmoid", 0.0, True)])
def test_dpo_loss_and_lora_grads_equal_trl(tiny, tok, batch, tmp_path, loss_type, sft_weight, share):
    """sft_weight: TRL's loss_type [sigmoid, sft] with loss_weights [1, w] (the chosen answers' NLL added);
    share: each pair's prompt run once (qlora.shared_prefix), TRL running both sequences whole."""
    from trl import DPOConfig, DPOTrainer
    ds = datasets.Dataset.from_list([conversational(p) for p in PAIRS])
    types = dict(loss_type=[loss_type, "sft"], loss_weights=[1.0, sft_weight]) if sft_weight else dict(loss_type=[loss_type])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.2, report_to=[], use_cpu=True,
                     max_length=64, bf16=False, fp16=False, **types)
    ref = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), args=args,
                     train_dataset=ds, processing_class=tok, peft_config=lora_config())
    # our tokenization is TRL's on this data: same prompt and answer tokens
    got = [tuple(ref.train_dataset[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")) for i in range(len(PAIRS))]
    m = ours(tiny)
    copy_adapter(m, ref.model)
    t_loss = ref.compute_loss(ref.model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                          "completion_mask": (batch["labels"] != -100).long()})
    t_loss.backward()
    method = P.DPO(beta=0.2, loss_type=loss_type, sft_weight=sft_weight, share_prompt=share)
    if share:  # the packed path is the one taken
        from qlora import shared_prefix
        assert shared_prefix.pack(batch, torch.bool) is not None
    loss, metrics = method.loss(m, batch, "cpu")
    if sft_weight:  # the NLL term moved the loss: not the plain DPO value
        assert abs(float(loss) - float(P.DPO(beta=0.2).loss(m, batch, "cpu")[0])) > 0.1
    loss.backward()
    rel_close(loss, t_loss)
    assert float(loss) > 0.05  # a real preference signal, not log 2 from identical policy and reference
    grads_match(m, ref.model)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        rel_close(metrics[k], ref._metrics["train"][k][-1], 1e-4)
    B = len(PAIRS)
    for i, k in enumerate(batch["index"].tolist()):
        p, c, r = got[k]
        assert batch["input_ids"][i][batch["attention_mask"][i] == 1].tolist() == p + c
        assert batch["input_ids"][B + i][batch["attention_mask"][B + i] == 1].tolist() == p + r
        assert batch["labels"][i][len(p):len(p) + len(c)].tolist() == c


def test_orpo_loss_and_lora_grads_equal_trl(tiny, tok, batch, tmp_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    args = ORPOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, report_to=[], use_cpu=True, max_length=64,
                      bf16=False, fp16=False)
    ref = ORPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), args=args,
                      train_dataset=datasets.Dataset.from_list(PAIRS), processing_class=tok, peft_config=lora_config())
    m = ours(tiny)
    copy_adapter(m, ref.model)
    B = len(PAIRS)
    trl_batch = {f"{side}_{k}": batch[key][rows] for side, rows in (("chosen", slice(0, B)), ("rejected", slice(B, None)))
                 for k, key in (("input_ids", "input_ids"), ("attention_mask", "attention_mask"), ("labels", "labels"))}
    t_loss, t_metrics = ref.get_batch_loss_metrics(ref.model, trl_batch)
    t_loss.backward()
    loss, metrics = P.ORPO(beta=0.3, nll_on_prompt=True).loss(m, batch, "cpu")
    loss.backward()
    rel_close(loss, t_loss)
    grads_match(m, ref.model)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "nll_loss", "log_odds_ratio", "log_odds_chosen"):
        rel_close(metrics[k], t_metrics[k], 1e-4)
    # the default NLL (answer tokens only) is the mean cross-entropy of the chosen answers, as transformers scores it;
    # with each pair's prompt run once, the same
    loss2, metrics2 = P.ORPO(beta=0.3).loss(m, batch, "cpu")
    rel_close(P.ORPO(beta=0.3, share_prompt=True).loss(m, batch, "cpu")[0], loss2)
    with torch.no_grad():
        hf_nll = m(input_ids=batch["input_ids"][:B], attention_mask=batch["attention_mask"][:B],
                   labels=batch["labels"][:B]).loss
    rel_close(metrics2["nll_loss"], hf_nll)
    rel_close(loss2 - metrics2["nll_loss"], t_loss - t_metrics["nll_loss"])


def test_dpo_loss_formulas_against_float_math():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5, generator=g, dtype=torch.float64) * 3 - 10 for _ in range(4))
    beta, ls = 0.3, 0.1
    z = beta * ((pc - rc) - (pr - rr))
    want = [-(1 - ls) * torch.log(torch.sigmoid(zi)) - ls * torch.log(torch.sigmoid(-zi)) for zi in z]
    torch.testing.assert_close(P.dpo_loss(pc, pr, rc, rr, beta, "sigmoid", ls), torch.stack(want))
    nc, nr = torch.tensor([3, 4, 5, 6, 7]), torch.tensor([2, 2, 9, 1, 4])
    ipo = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    torch.testing.assert_close(P.dpo_loss(pc, pr, rc, rr, beta, "ipo", lengths=(nc, nr)), ipo)
    with pytest.raises(QLoraError, match="unknown DPO loss"):
        P.DPO(loss_type="hinge")
    with pytest.raises(QLoraError, match="--beta"):
        P.ORPO(beta=0)


# ------------------------------------------------------------------------- the reference
def test_adapters_off_is_the_dequantized_base_and_reads_no_lora_factor(tiny, batch):
    m = ours(tiny, quant_type="nf4")
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, QLoRALinear):
                base.get_submodule(name).weight.copy_(mod.base_weight(torch.float32))
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        lp = torch.log_softmax(logits, -1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)
        want = (lp * P.answer_mask(batch)).sum(1)
        on = P.sequence_logps(m, batch)
        layers = [mod for mod in m.modules() if isinstance(mod, QLoRALinear) and mod.r]
        saved = [mod.lora_A.detach().clone() for mod in layers]
        for mod in layers:  # any LoRA product computed with these would turn the output into NaN
            mod.lora_A.fill_(float("nan"))
        with P.adapters_off(m):
            off = P.sequence_logps(m, batch)
        for mod, a in zip(layers, saved):
            mod.lora_A.copy_(a)
        again = P.sequence_logps(m, batch)
    torch.testing.assert_close(off, want, rtol=1e-5, atol=1e-5)
    assert (on - want).abs().max() > 1e-2  # the adapter does change the policy
    torch.testing.assert_close(again, on)  # and is back on after the context


def test_sequence_logps_without_the_chunked_head_is_the_same(tiny, batch, monkeypatch):
    m = ours(tiny)
    with torch.no_grad():
        chunked = P.sequence_logps(m, batch)
        monkeypatch.setattr(P, "_chunked_ok", lambda model: False)
        plain = P.sequence_logps(m, batch)
    torch.testing.assert_close(plain, chunked, rtol=1e-5, atol=1e-5)


def test_precomputed_reference_gives_the_same_loss_and_survives_a_file(tiny, tok, tmp_path):
    m = ours(tiny)
    pairs, _ = tokenize_pairs(read_pairs(_write(tmp_path / "p.jsonl", PAIRS)), tok, max_length=64)
    batches = PairBatches(pairs, 3, tok.pad_token_id, seed=5)  # shuffled, and a short last batch
    ref = P.precompute_reference(m, batches, "cpu")
    assert ref.shape == (4, 2) and torch.isfinite(ref).all()
    P.save_reference(tmp_path / "ref.safetensors", ref, pairs_digest(pairs))
    loaded = P.load_reference(tmp_path / "ref.safetensors", pairs_digest(pairs))
    for b in batches.epoch(1):
        live, _ = P.DPO().loss(m, b, "cpu")
        pre, _ = P.DPO(ref_logps=loaded).loss(m, b, "cpu")
        torch.testing.assert_close(pre, live, rtol=1e-6, atol=1e-6)
    with pytest.raises(QLoraError, match="other preference data"):
        P.load_reference(tmp_path / "ref.safetensors", pairs_digest(pairs[:3]))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


# ------------------------------------------------------------------------------------ data
def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items()})
    return path


@pytest.mark.parametrize("layout", ["strings", "conversations", "explicit_prompt"])
@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_every_layout_and_file_type_gives_the_same_pairs(tok, tmp_path, layout, suffix):
    rows = {"strings": PAIRS, "conversations": [conversational(p) for p in PAIRS],
            "explicit_prompt": [{"prompt": [{"role": "user", "content": p["prompt"]}],
                                 "chosen": [{"role": "assistant", "content": p["chosen"]}],
                                 "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in PAIRS]}[layout]
    path = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        _write(path, rows)
    elif suffix == "json":
        path.write_text(json.dumps(rows, indent=1))
    elif suffix == "csv":
        _csv(path, rows)
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    want, _ = tokenize_pairs(read_pairs(_write(tmp_path / "ref.jsonl", PAIRS)), tok, max_length=64)
    got, stats = load_pairs(path, tok, max_length=64)
    assert [(p.chosen, p.rejected) for p in got] == [(p.chosen, p.rejected) for p in want]
    assert stats["kept"] == 4 and stats["template"] == "chat"


GOOD = {"prompt": "q ?", "chosen": "yes", "rejected": "no"}
BAD = [
    ({"prompt": "q ?", "rejected": "no"}, "missing field 'chosen'"),
    ({"chosen": "yes", "rejected": "no"}, "missing field 'prompt'"),
    ({"prompt": "q ?", "chosen": 3, "rejected": "no"}, "field 'chosen' must be a string, got int"),
    ({"prompt": ["q"], "chosen": "yes", "rejected": "no"}, "field 'prompt' must be a string"),
    ({"prompt": "q ?", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
    ({"prompt": "q ?", "chosen": "  ", "rejected": "no"}, "the chosen response is empty"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
     "different prompts .*message 0"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
     "the rejected response is empty"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "identical"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}],
      "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     r"chosen\[1\].content must be a string"),
    ({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "a"}]},
     "must end with an assistant answer"),
    ({"chosen": [{"role": "assistant", "content": "b"}], "rejected": [{"role": "assistant", "content": "c"}]},
     "no prompt"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "rejected": "c"},
     "both be strings or both lists"),
]


@pytest.mark.parametrize("bad,msg", BAD)
def test_bad_record_names_file_and_line(tmp_path, bad, msg):
    f = _write(tmp_path / "d.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(QLoraError, match=f"^{f}:3: .*{msg}") as e:
        read_pairs(f)
    assert "\n" not in str(e.value)


def test_bad_record_line_in_json_csv_and_parquet(tmp_path):
    bad = {"prompt": "q ?", "chosen": "same", "rejected": "same"}
    j = tmp_path / "d.json"
    j.write_text(json.dumps([GOOD, bad], indent=1))
    with pytest.raises(QLoraError, match=f"^{j}:7: .*identical"):  # the second object starts on line 7
        read_pairs(j)
    with pytest.raises(QLoraError, match=f"^{_csv(tmp_path / 'd.csv', [GOOD, GOOD, bad])}:4: .*identical"):
        read_pairs(tmp_path / "d.csv")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([GOOD, bad]), tmp_path / "d.parquet")
    with pytest.raises(QLoraError, match=f"^{tmp_path / 'd.parquet'}:row 2: .*identical"):
        read_pairs(tmp_path / "d.parquet")


def test_truncation_keeps_the_prompt_and_cuts_the_answer_end(tok, tmp_path):
    long = " ".join(["red"] * 30)
    recs = read_pairs(_write(tmp_path / "d.jsonl", [{"prompt": "q ?", "chosen": long, "rejected": "blue"},
                                                    {"prompt": " ".join(["the"] * 40), "chosen": "a", "rejected": "b"}]))
    full, _ = tokenize_pairs(recs[:1], tok, max_length=64)
    pairs, stats = tokenize_pairs(recs, tok, max_length=20)
    assert stats["truncated"] == 2 and stats["dropped"] == 1 and stats["kept"] == 1  # the 2nd has no answer left
    c = pairs[0].chosen
    assert len(c) == 20 and c.input_ids == full[0].chosen.input_ids[:20] and c.labels[-1] != -100
    assert pairs[0].rejected == full[0].rejected
    with pytest.raises(QLoraError, match="longer than max_length=20"):
        tokenize_pairs(recs, tok, max_length=20, truncate=False)


def test_pair_batches_hold_both_answers_and_follow_the_seed(tok, tmp_path):
    rows = [{"prompt": f"{Q} {c} ?", "chosen": f"the answer is {c} .", "rejected": " ".join([c] * (i % 5 + 1))}
            for i, c in enumerate(["paris", "rome", "berlin"] * 4)]
    pairs, _ = tokenize_pairs(read_pairs(_write(tmp_path / "d.jsonl", rows)), tok, max_length=64)
    b = PairBatches(pairs, 5, tok.pad_token_id, seed=3)
    seen = []
    for batch in b.epoch(0):
        idx, B = batch["index"].tolist(), len(batch["index"])
        assert batch["input_ids"].shape[0] == 2 * B
        for j, i in enumerate(idx):
            for row, e in ((j, pairs[i].chosen), (B + j, pairs[i].rejected)):
                n = len(e)
                assert batch["input_ids"][row, :n].tolist() == e.input_ids
                assert batch["labels"][row, :n].tolist() == e.labels
                assert batch["attention_mask"][row].sum() == n and (batch["labels"][row, n:] == -100).all()
        seen += idx
    assert sorted(seen) == list(range(12))
    again = PairBatches(pairs, 5, tok.pad_token_id, seed=3)
    assert again.plan(0) == b.plan(0) and again.plan(1) == b.plan(1)
    assert PairBatches(pairs, 5, tok.pad_token_id, seed=4).plan(0) != b.plan(0)


def test_plain_template_trains_on_the_answer_only(tok, tmp_path):
    recs = read_pairs(_write(tmp_path / "d.jsonl", PAIRS[:1]))
    (pair,), stats = tokenize_pairs(recs, tok, max_length=64, template="plain")
    assert stats["template"] == "plain"
    for e, answer in ((pair.chosen, PAIRS[0]["chosen"]), (pair.rejected, PAIRS[0]["rejected"])):
        trained = [t for t in e.labels if t != -100]
        assert tok.decode(trained) == f"{answer} <|im_end|>"  # the answer and the EOS that ends it
        # "### Instruction:" is not in the tiny vocabulary (<unk>), the prompt is, before the answer
        assert tok.decode(e.input_ids).endswith(f"{PAIRS[0]['prompt']} <unk> <unk> {answer} <|im_end|>")


# ------------------------------------------------------------------- a pair's prompt run once
UNEVEN = [  # shared prefixes of many lengths: a long prompt whose answers share their first words (the prefix runs
    # into the answers and outruns the next pair's whole chosen sequence), a short prompt with a long chosen answer,
    # a rejected answer longer than its chosen one
    {"prompt": "what is the price of the blue widget and the red gadget in the city of rome , paris or berlin ?",
     "chosen": "the answer is ten dollars .", "rejected": "the answer is seven"},
    {"prompt": "who ?", "chosen": "the user of the red widget", "rejected": "no"},
    {"prompt": "what color is the gadget ?", "chosen": "red", "rejected": "it is green and blue , not red"},
]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory, tok):
    pairs, _ = tokenize_pairs(read_pairs(_write(tmp_path_factory.mktemp("uneven") / "p.jsonl", UNEVEN)), tok,
                              max_length=64)
    return PairBatches(pairs, len(pairs), tok.pad_token_id, seed=0).epoch(0)[0]


def each_alone(m, batch, device="cpu") -> torch.Tensor:
    """Every sequence of ``batch`` run alone, unpadded (no mask at all): its answer log-probs [2B]."""
    want = []
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        one = {k: batch[k][row:row + 1, :n] for k in ("input_ids", "labels", "attention_mask")}
        want.append(P.row_logps(m, one, device, [P.answer_mask(one)])[0][0])
    return torch.stack(want)


def lora_grads(m) -> dict:
    out = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    assert len(out) == 28  # A and B of 14 linears
    return out


def assert_grads_close(got: dict, want: dict):
    assert got.keys() == want.keys()
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-5 * g.abs().max().item())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_pair_attention_gives_each_sequences_log_probs_and_lora_grads(tiny, uneven, checkpointing, monkeypatch):
    """sdpa: pair attention (no mask; every SDPA call causal) against each sequence run alone, log-probs and
    LoRA gradients, with grouped-query heads (the tiny model: 2 kv heads for 4 query heads) and padding. With
    non-reentrant gradient checkpointing backward recomputes each block, pair attention included."""
    from qlora import shared_prefix
    from qlora.offload import enable_checkpointing
    B = uneven["input_ids"].shape[0] // 2
    lens = uneven["attention_mask"].sum(1).tolist()
    ids, labels = uneven["input_ids"], uneven["labels"]
    prefixes = [shared_prefix.common_prefix(ids[b, :lens[b]].tolist(), ids[B + b, :lens[B + b]].tolist())
                for b in range(B)]
    assert max(prefixes) > min(lens[:B]) and len(set(prefixes)) == B and len(set(lens)) == 2 * B
    assert any(labels[b, p - 1] != -100 for b, p in enumerate(prefixes))  # a prefix running into the answers
    m = ours(tiny)
    assert shared_prefix.path(m) == "pairs" and m.config.num_key_value_heads < m.config.num_attention_heads
    if checkpointing:
        m.train()
        enable_checkpointing(m)
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    got = P.sequence_logps(m, uneven, share_prompt=True)
    forward = len(calls)
    got.sum().backward()
    monkeypatch.undo()
    layers = m.config.num_hidden_layers
    assert forward == 2 * layers and len(calls) == (4 if checkpointing else 2) * layers  # two sequences a layer
    assert set(calls) == {(True, True)}  # no mask, causal: the calls SDPA's flash kernel takes on CUDA
    grads = lora_grads(m)
    ref = ours(tiny)  # the same weights, no checkpointing, each sequence alone
    want = each_alone(ref, uneven)
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, lora_grads(ref))


def test_masked_path_gives_each_sequences_log_probs_and_lora_grads(tiny, batch):
    """eager: the 4D (additive) mask; the log-probs and LoRA gradients of each sequence run alone."""
    from qlora import shared_prefix
    from qlora.compat import set_attention_implementation
    m = ours(tiny)
    set_attention_implementation(m.config, "eager")
    assert shared_prefix.path(m) == "mask"
    packed = shared_prefix.pack(batch, torch.float32)
    B = len(PAIRS)
    assert packed["input_ids"].shape[0] == B and packed["saved_tokens"] > 0.25 * int(batch["attention_mask"].sum())
    mine = {k: v for k, v in batch.items() if not k.startswith("_packed")}  # (other tests cache their packing)
    got = P.sequence_logps(m, mine, share_prompt=True)
    assert "_packed_torch.float32" in mine and "_packed_pairs" not in mine
    got.sum().backward()
    grads = lora_grads(m)
    want = each_alone(m, batch)
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, lora_grads(m))


def known_pairs() -> dict:
    """Two pairs: chosen 1 2 3 / rejected 1 2 7 8 (prefix 2), chosen 4 5 6 7 8 / rejected 4 9 (prefix 1); every
    token but the first scored."""
    seqs = [[1, 2, 3], [4, 5, 6, 7, 8], [1, 2, 7, 8], [4, 9]]
    ids, labels = torch.zeros((4, 5), dtype=torch.long), torch.full((4, 5), -100)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        labels[r, 1:len(s)] = ids[r, 1:len(s)]
    return {"input_ids": ids, "labels": labels, "attention_mask": (labels != -100).long().index_fill_(1, torch.tensor([0]), 1)}


def test_pair_layout_of_a_known_batch():
    from qlora import shared_prefix
    packed = shared_prefix.pack(known_pairs(), None)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 7, 8, 0], [4, 5, 6, 7, 8, 9]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 2, 3, 4], [0, 1, 2, 3, 4, 1]]
    assert packed["attention_mask"].tolist() == [[1] * 6] * 2  # all ones: transformers builds no mask
    lay = packed["pair_layout"]
    assert lay.chosen_len == 5  # chosen: the rows' first 5 positions
    assert lay.rejected_index.tolist() == [[0, 1, 3, 4], [0, 5, 0, 0]]  # prefix, then the tail; 0 pads
    # chosen outputs at 0..4, rejected at 5..8: row 0's tail is rejected positions 2, 3; row 1's is position 1
    assert lay.out_index.tolist() == [[0, 1, 2, 7, 8, 0], [0, 1, 2, 3, 4, 6]]
    assert [s.tolist() for s in packed["src"]] == [[0, 1], [0, 1, 2, 3], [0, 1, 3], [0]]


def test_pair_attention_is_each_sequences_causal_attention():
    """Random packed q/k/v (4 query heads, 2 kv heads) against softmax attention computed apart on each
    unpacked sequence: the outputs, finite padding, and the gradients of q/k/v."""
    from types import SimpleNamespace
    from qlora import shared_prefix
    packed = shared_prefix.pack(known_pairs(), None)
    lay, (B, S), H, Hkv, D = packed["pair_layout"], packed["input_ids"].shape, 4, 2, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, S, D, generator=g, dtype=torch.float64, requires_grad=True) for h in (H, Hkv, Hkv))
    out, _ = shared_prefix.pair_attention(SimpleNamespace(num_key_value_groups=H // Hkv), q, k, v, lay,
                                          scaling=D ** -0.5)
    assert out.shape == (B, S, H, D) and torch.isfinite(out).all()

    def attend(pos):  # causal softmax attention of one sequence, made of these row positions of row b
        qs, ks, vs = (x[b][:, pos] for x in (q, k, v))
        ks, vs = ks.repeat_interleave(H // Hkv, 0), vs.repeat_interleave(H // Hkv, 0)
        scores = (qs @ ks.transpose(1, 2)) * D ** -0.5
        scores = scores.masked_fill(torch.ones(len(pos), len(pos), dtype=torch.bool).triu(1), float("-inf"))
        return (scores.softmax(-1) @ vs).transpose(0, 1)  # [L, H, D]

    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got_loss, want_loss = 0, 0
    for b, (lc, lr, p) in enumerate(((3, 4, 2), (5, 2, 1))):
        n = lc + lr - p
        chosen, rejected = attend(list(range(lc))), attend(list(range(p)) + list(range(lc, n)))
        torch.testing.assert_close(out[b, :lc], chosen)
        torch.testing.assert_close(out[b, lc:n], rejected[p:])
        got_loss = got_loss + (out[b, :n] * w[b, :n]).sum()
        want_loss = want_loss + (chosen * w[b, :lc]).sum() + (rejected[p:] * w[b, lc:n]).sum()
    got = torch.autograd.grad(got_loss, (q, k, v))
    for a, e in zip(got, torch.autograd.grad(want_loss, (q, k, v))):
        torch.testing.assert_close(a, e)


def test_pair_attention_refuses_a_window_shorter_than_the_sequences():
    from types import SimpleNamespace
    from qlora import shared_prefix
    lay = shared_prefix.pack(known_pairs(), None)["pair_layout"]
    q = torch.zeros(2, 2, 6, 4)
    with pytest.raises(QLoraError, match="sliding window .*--share-prompt false"):
        shared_prefix.pair_attention(SimpleNamespace(), q, q, q, lay, sliding_window=3)
    shared_prefix.pair_attention(SimpleNamespace(), q, q, q, lay, sliding_window=5)  # covers every sequence


def test_pair_layout_that_never_reaches_the_attention_is_an_error(tiny, batch, monkeypatch):
    """A model whose attention drops the forward's extra keywords would attend over the whole packed row
    (every tail token seeing the chosen answer): refused, not silently wrong."""
    from qlora import shared_prefix
    from qlora.compat import sdpa_attention
    m = ours(tiny)
    shared_prefix.install()
    from transformers import AttentionInterface

    def drops(module, q, k, v, mask, pair_layout=None, **kw):
        return sdpa_attention()(module, q, k, v, mask, **kw)
    drops.qlora_pairs = True  # (so that install leaves it in place)
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", drops)
    with torch.no_grad(), pytest.raises(QLoraError, match="never received the pair layout.*--share-prompt false"):
        P.sequence_logps(m, batch, share_prompt=True)


def test_shared_prompt_layout_and_when_it_is_not_used(batch):
    """Positions restart at the shared prefix for the rejected tail; a tail token never sees the chosen answer;
    pairs sharing too little run unpacked."""
    from qlora import shared_prefix
    packed = shared_prefix.pack(batch, torch.bool)
    B = len(PAIRS)
    for b in range(B):
        lc, lr = (int(batch["attention_mask"][r].sum()) for r in (b, B + b))
        p = shared_prefix.common_prefix(batch["input_ids"][b, :lc].tolist(), batch["input_ids"][B + b, :lr].tolist())
        assert 0 < p < min(lc, lr)
        pos, mask = packed["position_ids"][b], packed["attention_mask"][b, 0]
        assert pos[:lc].tolist() == list(range(lc)) and pos[lc:lc + lr - p].tolist() == list(range(p, lr))
        assert packed["input_ids"][b, lc:lc + lr - p].tolist() == batch["input_ids"][B + b, p:lr].tolist()
        tail = slice(lc, lc + lr - p)
        assert not mask[tail, p:lc].any() and mask[tail, :p].all()  # prompt yes, chosen answer no
        k = lc + min(2, lr - p - 1)  # a tail query: causal within the tail
        assert mask[k, lc:k + 1].all() and not mask[k, k + 1:].any()
    unrelated = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}
    unrelated["input_ids"][B:, 1:] = (unrelated["input_ids"][B:, 1:] + 1) % 50  # second tokens on differ
    assert shared_prefix.pack(unrelated, torch.bool) is None


def cuda_model(tiny, dtype):
    m = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32 if dtype == "fp32" else torch.bfloat16)
    apply_qlora(m, QuantSettings(quant_type="nf4", compute_dtype=dtype), LoraSettings(dropout=0.0, **LORA), seed=0)
    m.to("cuda")
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, QLoRALinear) and mod.r:
                mod.lora_B.normal_(0, 0.3)
    return m


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_on_cuda_gives_each_sequences_log_probs(tiny, uneven, dtype, attention):
    """On a GPU, pair attention (sdpa) and the masked path (eager): the log-probs are still those of each
    sequence run alone (NF4 base; bf16 within its rounding)."""
    from qlora.compat import set_attention_implementation
    m = cuda_model(tiny, dtype)
    set_attention_implementation(m.config, attention)
    batch = {k: v for k, v in uneven.items() if not k.startswith("_packed")}  # (other tests cache their packing)
    with torch.no_grad():
        got = P.sequence_logps(m, batch, "cuda", share_prompt=True)
        want = each_alone(m, uneven, "cuda")
    assert f"_packed_{'pairs' if attention == 'sdpa' else 'torch.' + ('float32' if dtype == 'fp32' else 'bfloat16')}" in batch
    tol = 1e-4 if dtype == "fp32" else 3e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * 10)


@pytest.mark.gpu
def test_pair_attention_on_cuda_runs_sdpas_flash_kernel(tiny, uneven):
    """bf16, forward and backward with SDPA restricted to its flash kernel (which takes no mask: a masked call
    would find no kernel): pair attention runs, with the same log-probs as the sequences run alone."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    m = cuda_model(tiny, "bf16")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        got = P.sequence_logps(m, dict(uneven), "cuda", share_prompt=True)
        got.sum().backward()
    assert sum(p.grad is not None and p.grad.abs().max() > 0 for p in m.parameters()) == 28
    with torch.no_grad():
        want = each_alone(m, uneven, "cuda")
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=0.3)


def test_share_prompt_auto_packs_unless_cuda_would_take_the_mask(tiny):
    """--share-prompt auto: packs on the CPU, and on CUDA only where the model's attention is pair attention (sdpa);
    the masked path (eager) on CUDA ran slower than whole sequences (BENCHMARKS.md), so there it does not."""
    from qlora import shared_prefix
    from qlora.compat import set_attention_implementation
    m = ours(tiny)
    assert shared_prefix.path(m) == "pairs"
    assert shared_prefix.wanted("auto", "cpu", m) and shared_prefix.wanted("auto", "cuda", m)
    assert not shared_prefix.wanted("auto", "cuda")  # (no model: nothing says the mask is avoided)
    set_attention_implementation(m.config, "eager")
    assert shared_prefix.wanted("auto", "cpu", m) and not shared_prefix.wanted("auto", "cuda", m)
    assert shared_prefix.wanted("true", "cuda", m) and not shared_prefix.wanted(False, "cpu", m)
