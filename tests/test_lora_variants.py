"""LoftQ / PiSSA initialisation, DoRA and LoRA+ against peft's own implementations (CPU, fp32), trained end to
end, saved adapters loaded in peft with the same logits, and exact resume with --dora."""
import contextlib
import time
import types

import pytest
import torch
import torch.nn as nn

from qlora import nf4, variants
from qlora.adapters import load_adapter, merged_tensors, save_adapter
from qlora.cli import main
from qlora.errors import QLoraError
from qlora.linear import QLoRALinear
from qlora.model import LoraSettings, QuantSettings, load_model
from qlora.optim import lora_plus_groups, make_optimizer
from qlora.train import train

from helpers import cfg, losses

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.utils import loftq_utils  # noqa: E402

FP32 = QuantSettings(compute_dtype="fp32")


def peft_loftq_on_cpu():
    """peft's ``loftq_init`` with its one hard-coded device ("cuda") replaced by "cpu": the same code, run here."""
    fn = getattr(loftq_utils.loftq_init, "__wrapped__", loftq_utils.loftq_init)
    code = fn.__code__.replace(co_consts=tuple("cpu" if c == "cuda" else c for c in fn.__code__.co_consts))
    return types.FunctionType(code, loftq_utils.__dict__)


class One(nn.Module):
    def __init__(self, w, bias=None):
        super().__init__()
        self.proj = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        self.proj.weight.data.copy_(w)
        if bias is not None:
            self.proj.bias.data.copy_(bias)

    def forward(self, x):
        return self.proj(x)


def weight(out=128, inp=64, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("iters", [1, 2])
def test_loftq_init_equals_peft(iters):
    w = weight()
    deq, pa, pb = peft_loftq_on_cpu()(w, 4, 8, iters)  # nf4, block 64, no double quant (bitsandbytes)
    a, b, packed, state = variants.loftq(w, 8, iters, 64, "nf4", double_quant=False)
    assert torch.equal(a, pa) and torch.equal(b, pb)
    assert torch.equal(nf4.dequantize_4bit(packed, state, torch.float32), deq)
    # and the point of it: base + B A is closer to W than the 4-bit base alone
    p0, s0 = nf4.quantize_4bit(w, 64, "nf4", False)
    assert (deq + pb @ pa - w).norm() < 0.9 * (nf4.dequantize_4bit(p0, s0, torch.float32) - w).norm()


@pytest.mark.parametrize("alpha", [8, 16])
def test_pissa_init_equals_peft(alpha):
    w = weight()
    ref = get_peft_model(One(w), LoraConfig(r=8, lora_alpha=alpha, target_modules=["proj"],
                                            init_lora_weights="pissa"))
    lay = ref.base_model.model.proj
    a, b, res = variants.pissa(w, 8, alpha / 8)
    assert torch.equal(a, lay.lora_A["default"].weight) and torch.equal(b, lay.lora_B["default"].weight)
    assert torch.equal(res, lay.base_layer.weight)


def test_layer_init_quantizes_the_corrected_base():
    """A 4-bit layer initialised by PiSSA holds quant(W_res) as its base; by LoftQ, LoftQ's own Q."""
    w = weight()
    q = QuantSettings(compute_dtype="fp32")
    lay = QLoRALinear.from_weight(w, r=8, alpha=8, compute_dtype=torch.float32)
    variants.init_layer(lay, w, "pissa", 1, q)
    a, b, res = variants.pissa(w, 8, 1.0)
    p, s = nf4.quantize_4bit(res, 64, "nf4", True)
    assert torch.equal(lay.base_weight(torch.float32), nf4.dequantize_4bit(p, s, torch.float32))
    assert torch.equal(lay.lora_A.data, a)
    with pytest.raises(QLoraError, match="needs a 4-bit base"):
        variants.init_layer(lay, w, "loftq", 1, QuantSettings(quant_type=None))


def _dora_pair(quant_type, dropout, bias):
    """Our DoRA layer and peft's on the same (dequantized) weight, same A, B and a perturbed magnitude."""
    g = torch.Generator().manual_seed(3)
    w, bvec = weight(96, 64), (torch.randn(96, generator=g) if bias else None)
    ours = QLoRALinear.from_weight(w, bvec, quant_type=quant_type, r=4, alpha=8, dropout=dropout,
                                   compute_dtype=torch.float32)
    ref = get_peft_model(One(ours.base_weight(torch.float32), bvec),
                         LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["proj"], use_dora=True))
    lay = ref.base_model.model.proj
    lay.lora_B["default"].weight.data.normal_(0, 0.1, generator=g)
    ours.lora_A.data.copy_(lay.lora_A["default"].weight)
    ours.lora_B.data.copy_(lay.lora_B["default"].weight)
    ours.init_dora()
    mag = lay.lora_magnitude_vector["default"].weight
    mag.data.mul_(1 + 0.2 * torch.rand(mag.shape, generator=g))
    ours.lora_magnitude.data.copy_(mag)
    return ours, ref, lay


@pytest.mark.parametrize("quant_type,dropout,bias", [("nf4", 0.0, False), (None, 0.0, True), ("nf4", 0.3, True)])
def test_dora_forward_and_gradients_equal_peft(quant_type, dropout, bias):
    ours, ref, lay = _dora_pair(quant_type, dropout, bias)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(4))
    outs = []
    for model, params in ((ours, [ours.lora_A, ours.lora_B, ours.lora_magnitude]),
                          (ref, [lay.lora_A["default"].weight, lay.lora_B["default"].weight,
                                 lay.lora_magnitude_vector["default"].weight])):
        model.train()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(7)  # the same dropout mask
        y = model(xi)
        y.pow(2).sum().backward()
        outs.append([y.detach(), xi.grad] + [p.grad for p in params])
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dora_initial_magnitude_equals_peft_and_keeps_the_output():
    w = weight(96, 64)
    ours = QLoRALinear.from_weight(w, r=4, alpha=8, compute_dtype=torch.float32)
    x = torch.randn(4, 64)
    before = ours(x)
    ours.init_dora()
    ref = get_peft_model(One(ours.base_weight(torch.float32)),
                         LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_dora=True))
    torch.testing.assert_close(ours.lora_magnitude.data,
                               ref.base_model.model.proj.lora_magnitude_vector["default"].weight.data)
    torch.testing.assert_close(ours(x), before, atol=1e-6, rtol=1e-6)


def test_dora_norm_by_row_blocks_equals_the_whole(monkeypatch):
    w, a, b = weight(300, 64), torch.randn(4, 64), torch.randn(300, 4)
    whole = torch.linalg.norm(w + 0.5 * b @ a, dim=1)
    monkeypatch.setattr(variants, "_NORM_ROWS", 64)
    torch.testing.assert_close(variants.dora_norm(w, a, b, 0.5), whole)


def test_dora_factored_norm_equals_the_direct_one():
    """The forward's norm (base row norms once, then rank-sized products) against ||W + s B A|| formed in full."""
    w, a, b = weight(300, 64), torch.randn(4, 64), 0.3 * torch.randn(300, 4)
    direct = torch.linalg.norm(w + 0.5 * b @ a, dim=1)
    got = variants.dora_norm_factored(w.pow(2).sum(1), w, a, b, 0.5)
    torch.testing.assert_close(got, direct, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quant_type", ["nf4", None])
def test_dora_eval_output_equals_peft(quant_type):
    """Without gradients (generate, eval) DoRA takes the unfused route: the same output as peft's."""
    ours, ref, _ = _dora_pair(quant_type, 0.0, quant_type is None)
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x), atol=1e-5, rtol=1e-5)


def test_lora_plus_groups_equal_peft(setup):
    from peft.optimizers import create_loraplus_optimizer
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(setup / "model"), dtype=torch.float32)
    ref = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
    ropt = create_loraplus_optimizer(ref, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    want = {}
    for g in ropt.param_groups:
        for p in g["params"]:
            want[id(p)] = g["lr"]
    name_lr = {}
    for n, p in ref.named_parameters():
        if p.requires_grad:
            key = n[len("base_model.model."):].replace(".default.weight", "").replace(".default", "")
            name_lr[key.replace("lora_magnitude_vector", "lora_magnitude")] = want[id(p)]
    model, _ = load_model(str(setup / "model"), FP32, LoraSettings(r=4, alpha=8, dora=True), dtype="fp32",
                          progress=False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = make_optimizer(lora_plus_groups([n for n, _ in named], [p for _, p in named], 1e-3, 16.0), "adamw", 1e-3)
    got = {}
    for g in opt.param_groups:
        for p in g["params"]:
            got[id(p)] = g["lr"]
    assert {n: got[id(p)] for n, p in named} == name_lr
    assert sorted(set(name_lr.values())) == [1e-3, 1.6e-2]


def _logits_ours(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _peft_logits(setup, model, adapter):
    """peft on transformers' Llama whose block linears carry our layers' (stored) base, loading our adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(setup / "model"), dtype=torch.float32).eval()
    for n, m in model.named_modules():
        if isinstance(m, QLoRALinear):
            hf.get_submodule(n).weight.data.copy_(m.base_weight(torch.float32))
    pm = PeftModel.from_pretrained(hf, str(adapter)).eval()
    with torch.no_grad():
        return pm(input_ids=IDS).logits


IDS = torch.tensor([[5, 9, 12, 7, 20, 31, 8]])


@pytest.mark.parametrize("init,dora", [("loftq", False), ("pissa", True), ("gaussian", True)])
def test_trained_adapter_loads_in_peft_and_ours_with_same_logits(setup, tmp_path, init, dora):
    out = tmp_path / "r"
    s = train(cfg(setup, out, init=init, dora=dora, max_steps=2, save_every=0, alpha=4, dropout=0.0),
              log=lambda m: None)
    model = s["model"].eval()
    ad = out / "adapter"
    assert (ad / variants.BASE_FILE).is_file() == (init != "gaussian")
    assert (out / variants.BASE_FILE).is_file() == (init != "gaussian")
    want = _logits_ours(model, IDS)
    torch.testing.assert_close(_peft_logits(setup, model, ad), want, atol=1e-4, rtol=1e-4)
    # a fresh load in qlora (base from the adapter folder), and merge, give the same logits
    fresh, _ = load_model(str(setup / "model"), FP32, lora=None, dtype="fp32", progress=False)
    load_adapter(fresh, ad)
    torch.testing.assert_close(_logits_ours(fresh.eval(), IDS), want, atol=1e-5, rtol=1e-5)
    _, _, tensors = merged_tensors(str(setup / "model"), ad, "fp32")
    merged = dict(tensors)
    for n, m in model.named_modules():
        if isinstance(m, QLoRALinear):
            torch.testing.assert_close(merged[n + ".weight"], m.merged_weight(torch.float32), atol=1e-5, rtol=1e-5)


def test_we_load_peft_dora_adapters(setup, tmp_path):
    """A DoRA adapter peft saved (its magnitudes trained away from the init) loads here with peft's logits."""
    from transformers import AutoModelForCausalLM
    ours, _ = load_model(str(setup / "model"), FP32, lora=None, dtype="fp32", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(setup / "model"), dtype=torch.float32).eval()
    for n, m in ours.named_modules():
        if isinstance(m, QLoRALinear):
            hf.get_submodule(n).weight.data.copy_(m.base_weight(torch.float32))
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True))
    g = torch.Generator().manual_seed(2)
    for n, p in pm.named_parameters():
        if "lora_B" in n or "magnitude" in n:
            p.data.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(tmp_path / "theirs")
    load_adapter(ours, tmp_path / "theirs")
    assert sum(m.lora_magnitude is not None for m in ours.modules() if isinstance(m, QLoRALinear)) == 4
    with torch.no_grad():
        want = pm.eval()(input_ids=IDS).logits
    torch.testing.assert_close(_logits_ours(ours.eval(), IDS), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(dora=True), dict(init="pissa", lora_plus_ratio=4.0)])
def test_resume_exact_with_variants(setup, tmp_path, kw):
    full = tmp_path / "full"
    train(cfg(setup, full, max_steps=4, save_every=2, **kw), log=lambda m: None)
    part = tmp_path / "part"
    train(cfg(setup, part, max_steps=2, save_every=2, **kw), log=lambda m: None)
    train(cfg(setup, part, max_steps=4, save_every=2, resume=True, **kw), log=lambda m: None)
    assert losses(part) == losses(full)


def test_lora_plus_trains_b_faster(setup, tmp_path):
    """With LoRA+, B's lr is R x A's at every step (the schedule multiplies both), read back from the optimizer."""
    from qlora.train import Run
    run = Run(cfg(setup, tmp_path / "r", lora_plus_ratio=8.0, warmup_ratio=0.5), log=lambda m: None)
    run.setup()
    with contextlib.ExitStack() as stack:
        run._enter(stack)
        run.t_loop = time.time()
        run.train_step()
    lrs = sorted(g["lr"] for g in run.optimizer.param_groups)
    assert lrs[1] == pytest.approx(8 * lrs[0]) and lrs[0] < 3e-3  # in warmup


@pytest.mark.parametrize("args,msg", [
    (["--init", "svd"], "invalid choice"),
    (["--loftq-iters", "0"], "--loftq-iters must be an integer >= 1"),
    (["--lora-plus-ratio", "-1"], "--lora-plus-ratio must be a number >= 0"),
    (["--init", "loftq", "--quant-type", "none"], "--init loftq corrects"),
])
def test_bad_values_one_line(setup, tmp_path, capsys, args, msg):
    argv = ["train", "--data", str(setup / "data.jsonl"), "--model", str(setup / "model"),
            "--output", str(tmp_path / "o"), "--compute-dtype", "fp32", *args]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusal of a choice
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and msg in err and "Traceback" not in err, err


def test_missing_base_file_is_one_clear_error(setup, tmp_path, capsys):
    out = tmp_path / "r"
    train(cfg(setup, out, init="pissa", max_steps=1, save_every=0), log=lambda m: None)
    (out / "adapter" / variants.BASE_FILE).unlink()
    model, _ = load_model(str(setup / "model"), FP32, lora=None, dtype="fp32", progress=False)
    with pytest.raises(QLoraError, match="qlora_base.safetensors is missing"):
        load_adapter(model, out / "adapter")
    code = main(["merge", "--model", str(setup / "model"), "--adapter", str(out / "adapter"),
                 "--output", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2 and "qlora_base.safetensors is missing" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_overwrite_removes_the_stored_base(setup, tmp_path):
    out = tmp_path / "r"
    train(cfg(setup, out, init="loftq", max_steps=1, save_every=0), log=lambda m: None)
    train(cfg(setup, out, max_steps=1, save_every=0, overwrite=True), log=lambda m: None)
    assert not (out / variants.BASE_FILE).exists()
