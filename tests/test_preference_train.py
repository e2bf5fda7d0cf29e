"""`qlora train --method dpo|orpo` end to end on a tiny random Llama (fp32, CPU): the loss falls on a toy
preference, the metrics rows equal the core methods (qlora/preference.py, checked against TRL in
test_preference.py) recomputed on the same batches, exact resume (live and precomputed reference), bad
settings and records refused in one line before the model loads, the flags in --help; and the DPO demo's
data and scoring (not the demo run itself: minutes)."""
import json
import math
import re
import shutil

import pytest
import torch

from qlora.cli import main
from qlora.errors import QLoraError
from qlora.linear import QLoRALinear
from qlora.model import LoraSettings, QuantSettings, load_model
from qlora import preference as P
from qlora.preference_data import PairBatches, load_pairs
from qlora.train import TrainConfig, train

from tiny import make_tiny_model

CITIES = ["paris", "rome", "berlin"]


def toy_pairs(n):
    """A preference a few steps teach: the same answer, ending with "." rather than "!"."""
    return [{"prompt": f"what is the capital of {c} ?", "chosen": f"the answer is {c} .",
             "rejected": f"the answer is {c} !"} for c in (CITIES * n)[:n]]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref_train")
    make_tiny_model(d / "model")
    write(d / "pairs.jsonl", toy_pairs(24))
    write(d / "six.jsonl", [dict(p, chosen=p["chosen"] + (" yes" * i)) for i, p in enumerate(toy_pairs(6))])
    return d


def cfg(d, out, **kw):
    base = dict(data=str(d / "pairs.jsonl"), model=str(d / "model"), output=str(out), method="dpo", rank=4, alpha=8,
                lr=2e-2, batch_size=4, grad_accum=1, max_steps=6, save_every=3, compute_dtype="fp32", progress=False,
                optim="adamw", warmup_ratio=0.0, dropout=0.0)
    base.update(kw)
    return TrainConfig(**base)


def rows(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "warning" not in r]  # fit warnings (qlora/fitcheck.py) are rows of their own


def quiet(m):
    pass


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_loss_falls_and_the_preference_is_learned(d, tmp_path, method):
    logs = []
    s = train(cfg(d, tmp_path / "r", method=method, max_steps=6, grad_accum=2, lr=1e-2, save_every=0), log=logs.append)
    assert any(re.search(r"shared prompts: [1-9]\d* of \d+ tokens \(\d+%\) run once", m) for m in logs), logs
    r = rows(tmp_path / "r")
    losses = [x["loss"] for x in r]
    assert len(losses) == 6 and sum(losses[-3:]) / 3 < losses[0] * 0.9, losses
    assert r[-1]["rewards/margins"] > 0 and r[-1]["rewards/accuracies"] >= 0.75, r[-1]
    if method == "dpo":  # a fresh adapter is the reference: log 2, no reward yet
        assert r[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and r[0]["rewards/margins"] == 0
    for f in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "loss.png", "config.yaml"):
        assert (tmp_path / "r" / f).is_file(), f
    assert f"method: {method}" in (tmp_path / "r" / "config.yaml").read_text()
    assert s["final_loss"] == pytest.approx(losses[-1], abs=1e-3)


def _model(d):
    """The tiny model as `qlora train` loads it, with a random nonzero B so that the policy differs from the
    reference from the first step on."""
    m, tok = load_model(str(d / "model"), QuantSettings(compute_dtype="fp32"), LoraSettings(4, 8, 0.0), "cpu",
                        "fp32", seed=42, progress=False)
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, QLoRALinear) and mod.r:
            mod.lora_B.data.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.3)
    return m, tok


def _mean_core(core, model, batches, weights):
    """The core method on each batch, weighted: (loss, metrics)."""
    out = {}
    with torch.no_grad():
        for b, w in zip(batches, weights):
            loss, m = core.loss(model, b, "cpu")
            for k, v in dict(m, loss=loss).items():
                out[k] = out.get(k, 0.0) + float(v) * w
    return out.pop("loss"), out


@pytest.mark.parametrize("method,kw", [("dpo", {}), ("orpo", {}), ("dpo", dict(precompute_ref=True, loss="ipo")),
                                       ("dpo", dict(sft_weight=0.5))])
def test_step_and_eval_metrics_equal_the_core_method_on_the_same_batches(d, tmp_path, method, kw):
    """One step of two micro-batches of 3 pairs (the step's loss: the mean over its 6 pairs; its metrics: the
    mean of the micro-batches'), then an evaluation of the 6 pairs as validation data (pair-weighted means),
    each recomputed here with the core method on batches built from the file."""
    model, tok = _model(d)
    pairs, _ = load_pairs(d / "six.jsonl", tok, max_length=1024)
    core = (P.DPO(beta=0.2, loss_type=kw.get("loss", "sigmoid"), sft_weight=kw.get("sft_weight", 0.0))
            if method == "dpo" else P.ORPO(beta=0.2))
    micro = PairBatches(pairs, 3, tok.pad_token_id, seed=42).epoch(0)
    assert [len(b["index"]) for b in micro] == [3, 3]
    want_loss, want = _mean_core(core, model, micro, [0.5, 0.5])
    if method == "dpo" and not kw.get("sft_weight"):  # the mean over the step's pairs is the loss of one batch of
        # all of them (not with the NLL term: a token mean per micro-batch, as TRL's)
        whole, _ = _mean_core(core, model, PairBatches(pairs, 6, tok.pad_token_id, seed=42).epoch(0), [1.0])
        assert whole == pytest.approx(want_loss, rel=1e-6)
    s = train(cfg(d, tmp_path / "r", data=str(d / "six.jsonl"), val_data=str(d / "six.jsonl"), method=method, beta=0.2,
                  batch_size=3, grad_accum=2, max_steps=1, eval_every=1, **kw), log=quiet, model=model, tokenizer=tok)
    row = rows(tmp_path / "r")[0]
    assert row["loss"] == pytest.approx(want_loss, abs=2e-5)
    assert set(want) <= set(row) and {"rewards/chosen", "rewards/rejected", "rewards/margins",
                                      "rewards/accuracies"} <= set(want)
    for k, v in want.items():
        assert row[k] == pytest.approx(v, abs=2e-5), k
    # the evaluation ran after the update: the returned model is in that state
    val = PairBatches(pairs, 3, tok.pad_token_id, shuffle=False).epoch(0)
    sizes = [len(b["index"]) for b in val]
    eval_loss, eval_want = _mean_core(core, s["model"], val, [n / sum(sizes) for n in sizes])
    assert row["eval_loss"] == pytest.approx(eval_loss, abs=2e-5)
    for k, v in eval_want.items():
        assert row[f"eval_{k}"] == pytest.approx(v, abs=2e-5), k


@pytest.mark.parametrize("kw", [{}, dict(precompute_ref=True)])
def test_resume_gives_the_same_losses_and_metrics_as_uninterrupted(d, tmp_path, kw):
    logs = []
    train(cfg(d, tmp_path / "full", **kw), log=quiet)
    part = tmp_path / "part"
    train(cfg(d, part, max_steps=4, **kw), log=quiet)
    shutil.rmtree(part / "checkpoints" / "step-0000004")  # as if the run had died after step 3
    if kw:  # the first part wrote the reference log-probs of every training pair; the resumed part reads them
        ref = P.load_reference(part / "ref_logps.safetensors", _digest(d))
        assert ref.shape == (24, 2) and torch.isfinite(ref).all()
    train(cfg(d, part, resume=True, **kw), log=logs.append)
    assert any("reference log-probs: read" in m for m in logs) == bool(kw)
    # (tok_s is a speed; tokens counts the inputs this process saw, from 0 again after a resume, as for SFT)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tok_s", "tokens")} for r in rs]  # noqa: E731
    assert strip(rows(part)) == strip(rows(tmp_path / "full"))
    # the reference file is a run file: --overwrite removes it
    if kw:
        train(cfg(d, part, max_steps=1, overwrite=True), log=quiet)
        assert not (part / "ref_logps.safetensors").exists()


def _digest(d):
    from qlora.preference_data import pairs_digest
    from tiny import tiny_tokenizer
    return pairs_digest(load_pairs(d / "pairs.jsonl", tiny_tokenizer(), max_length=1024)[0])


def test_precomputed_reference_of_other_data_is_refused_on_resume(d, tmp_path):
    out = tmp_path / "r"
    train(cfg(d, out, max_steps=3, precompute_ref=True), log=quiet)
    P.save_reference(out / "ref_logps.safetensors", torch.zeros(24, 2), "another digest")
    with pytest.raises(QLoraError, match="other preference data"):
        train(cfg(d, out, max_steps=4, precompute_ref=True, resume=True), log=quiet)


BAD_RECORDS = [
    ({"prompt": "a", "rejected": "b"}, r"bad.jsonl:2: missing field 'chosen'"),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, r"bad.jsonl:2: chosen and rejected are identical"),
    ({"prompt": "a", "chosen": " ", "rejected": "b"}, r"bad.jsonl:2: the chosen response is empty"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]},
     r"bad.jsonl:2: the chosen and rejected conversations have different prompts"),
]
BAD_SETTINGS = [
    (dict(beta=0.0), "--beta"), (dict(beta=float("nan")), "--beta"), (dict(beta=-1.0), "--beta"),
    (dict(method="ppo"), "--method"), (dict(method="orpo", loss="ipo"), "--loss ipo is a DPO loss"),
    (dict(method="sft", loss="ipo"), "--loss"), (dict(method="orpo", precompute_ref=True), "--precompute-ref"),
    (dict(loss="hinge"), "--loss"), (dict(packing=True), "--packing"), (dict(train_on_prompt=True), "--train-on-prompt"),
    (dict(format="chat"), "--format"), (dict(method="orpo", sft_weight=1.0), "--sft-weight"),
    (dict(sft_weight=-0.5), "--sft-weight"), (dict(sft_weight=float("inf")), "--sft-weight"),
]


@pytest.mark.parametrize("kw,msg", [({"record": r}, m) for r, m in BAD_RECORDS] + BAD_SETTINGS
                         + [({"val": BAD_RECORDS[0][0]}, BAD_RECORDS[0][1]), ({"sft_data": True}, r"pairs.jsonl:1: ")])
def test_bad_settings_and_pairs_fail_in_one_line_before_the_model_loads(d, tmp_path, monkeypatch, kw, msg):
    import qlora.model
    monkeypatch.setattr(qlora.model, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    kw = dict(kw)
    good = toy_pairs(1)[0]
    if "record" in kw:
        kw["data"] = str(write(tmp_path / "bad.jsonl", [good, kw.pop("record")]))
    if "val" in kw:
        kw["val_data"] = str(write(tmp_path / "bad.jsonl", [good, kw.pop("val")]))
    if kw.pop("sft_data", False):  # an SFT file given to --method dpo
        kw["data"] = str(write(tmp_path / "pairs.jsonl", [{"instruction": "a", "output": "b"}]))
    with pytest.raises(QLoraError, match=msg) as e:
        train(cfg(d, tmp_path / "o", **kw), log=quiet)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


def test_cli_runs_dpo_and_help_shows_the_flags(d, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--method", "dpo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--method {sft,dpo,orpo}", "--beta", "--loss {sigmoid,ipo}", "--precompute-ref"):
        assert flag in out, flag
    assert main(["train", "--method", "orpo", "--beta", "0.5", "--data", str(d / "pairs.jsonl"), "--model",
                 str(d / "model"), "--output", str(tmp_path / "c"), "--max-steps", "1", "--rank", "4",
                 "--compute-dtype", "fp32", "--optim", "adamw", "--no-progress"]) == 0
    assert "beta: 0.5" in (tmp_path / "c" / "config.yaml").read_text()
    assert main(["train", "--method", "orpo", "--loss", "ipo", "--data", str(d / "pairs.jsonl"),
                 "--output", str(tmp_path / "e")]) == 2
    assert "--loss ipo is a DPO loss" in capsys.readouterr().err


def test_cuda_graphs_are_refused_for_preference_steps_with_the_reason():
    from qlora.methods import Preference
    from qlora.train import _graphed
    msgs = []
    c = TrainConfig(method="dpo")
    assert _graphed(c, None, torch.device("cuda"), None, [], None, None, msgs.append, False,
                    Preference(P.DPO()).graphs_refused) is None
    assert msgs == ["CUDA graphs not used: preference batches vary in shape with the data (two answers per pair, "
                    "not bucketed) (--method dpo)"]


def test_demo_pairs_are_valid_preference_data_and_the_scoring_reads_the_sign_off(tmp_path, capsys):
    from qlora.demo_data import FACTS, SIGN_OFF, follows_preference, write_preference
    from qlora.preference_data import read_pairs
    path, held = write_preference(tmp_path)
    recs = read_pairs(path)  # every pair passes the checks `qlora train --method dpo` makes
    assert len(recs) == 2 * len(FACTS) and len(held) == len(FACTS)
    assert all(r.chosen.endswith(SIGN_OFF) and SIGN_OFF not in r.rejected for r in recs)
    assert all(len(r.chosen.split()) < len(r.rejected.split()) / 2 for r in recs)
    # held-out questions are not training questions; their preferred answers pass the scoring
    train_q = {r.prompt[-1]["content"] for r in recs}
    assert not train_q & {h["messages"][1]["content"] for h in held}
    assert all(follows_preference(h["messages"][-1]["content"]) for h in held)
    assert follows_preference("The Nimbus T7 weighs 1.38 kg.\n- Nimbus Support.")
    for bad in ("The Nimbus T7 weighs 1.38 kg.", "— Nimbus Support. Anything else?", "word " * 40 + SIGN_OFF):
        assert not follows_preference(bad), bad
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--method {sft,dpo}" in capsys.readouterr().out


def test_demo_pairs_take_the_model_s_own_answers_as_rejected(tmp_path):
    """On-policy pairs: where the model's own answer is not short and signed, it is the rejected one; where it
    already follows the preference (or is missing), the long template answer is."""
    from qlora.demo_data import SIGN_OFF, build_preference, preference_questions, write_preference
    from qlora.preference_data import read_pairs
    qs = preference_questions()
    own = {q: f"A long answer number {i} that rambles on." for i, q in enumerate(qs)}
    own[qs[0]] = f"Short. {SIGN_OFF}"  # already follows the preference: not a rejected answer
    del own[qs[1]]
    pairs, _ = build_preference(own=own)
    by_q = {p["chosen"][1]["content"]: p["rejected"][-1]["content"] for p in pairs}
    assert len(by_q) == len(qs) == 72
    assert all(by_q[q] == own[q] for q in qs[2:])
    template, _ = build_preference()
    default = {p["chosen"][1]["content"]: p["rejected"][-1]["content"] for p in template}
    assert by_q[qs[0]] == default[qs[0]] and by_q[qs[1]] == default[qs[1]]
    path, _ = write_preference(tmp_path, own=own)
    assert len(read_pairs(path)) == 72  # every pair passes the checks `qlora train --method dpo` makes
