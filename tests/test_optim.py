"""AdamW 32/8-bit and paging against torch.optim.AdamW, bitsandbytes (CPU backend) and fp32 math."""
import copy
from collections import Counter

import pytest
import torch

from qlora import nf4, optim
from qlora.errors import QLoraError

safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402


@pytest.fixture(scope="module")
def bnb():
    """bitsandbytes, the reference (CPU backend); the GPU tests below do not need it."""
    return pytest.importorskip("bitsandbytes")

# (64, 80) and (48, 100) have >= 4096 elements (8-bit state, the last block of the second one is
# short: 4800 = 18 * 256 + 192); (33,) and (16, 8) keep 32-bit state under the 8-bit optimizers.
SHAPES = [(64, 80), (33,), (48, 100), (16, 8)]


def make_params(device="cpu", dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device, dtype)) for s in SHAPES]


def set_grads(params, step, skip=None):
    g = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g) * (0.1 + i)
        grad.view(-1)[:300] = 0  # a block of zero gradient (zero moments at first)
        p.grad = None if i == skip else grad.to(p.device, p.dtype)


def run(opt, params, steps, start=0):
    for t in range(start, start + steps):
        set_grads(params, t, skip=1 if t % 3 == 2 else None)  # a parameter without grad sometimes
        opt.step()


def same(a, b):
    return all(torch.equal(x.detach().cpu(), y.detach().cpu()) for x, y in zip(a, b))


def state_equal(s1, s2, groups=True):
    """Two optimizer state dicts hold the same values (wherever their tensors live)."""
    if (groups and s1["param_groups"] != s2["param_groups"]) or s1["state"].keys() != s2["state"].keys():
        return False
    for k, st in s1["state"].items():
        if st.keys() != s2["state"][k].keys():
            return False
        if not all(torch.equal(torch.as_tensor(v).cpu(), torch.as_tensor(s2["state"][k][n]).cpu()) for n, v in st.items()):
            return False
    return True


# --------------------------------------------------------------------------------------------- codes


def test_codes_match_bitsandbytes(bnb):
    bnbF = bnb.functional
    assert torch.equal(optim.state_code(True), bnbF.create_dynamic_map(signed=True))
    assert torch.equal(optim.state_code(False), bnbF.create_dynamic_map(signed=False))
    u = optim.state_code(False)
    assert u[0] == 0 and u[-1] == 1 and bool((u[1:] > u[:-1]).all())


def _moments(n, seed):
    """First and second moments as AdamW builds them (heavy-tailed), with an all-zero block."""
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(8, n, generator=g) * torch.exp(2 * torch.randn(n, generator=g))
    m = torch.zeros(n)
    v = torch.zeros(n)
    for gr in grads:
        m.mul_(0.9).add_(gr, alpha=0.1)
        v.mul_(0.999).addcmul_(gr, gr, value=0.001)
    if n > 600:
        m[256:512] = 0
        v[256:512] = 0
    return m, v


@pytest.mark.parametrize("n,chunk", [(1, None), (255, None), (256, None), (4800, None), (4800, 1024), (20001, None)])
def test_quantization_is_bitsandbytes_cpu_quantization(n, chunk, monkeypatch, bnb):
    """Exactness statement: for every finite fp32 input, ``quantize_8bit(x, signed)`` returns the
    same uint8 codes and fp32 absmax as ``bitsandbytes.functional.quantize_blockwise(x,
    code=create_dynamic_map(signed), blocksize=256)`` on the CPU -- including all-zero blocks and a
    short last block -- and dequantization is the same fp32 product. bitsandbytes' CPU kernel rounds
    through a 65536-slot table over [-1, 1], so both differ from the exact nearest code value
    exactly where the scaled value lies within 1/65535 of a midpoint between two code values; that
    is checked against a float nearest-value reference below. Non-finite inputs are out of scope."""
    bnbF = bnb.functional
    if chunk:  # quantize in several chunks
        monkeypatch.setattr(optim, "_CHUNK", chunk)
    m, v = _moments(n, seed=n)
    for x, signed in ((m, True), (v, False)):
        code = bnbF.create_dynamic_map(signed=signed)
        q, absmax = optim.quantize_8bit(x, signed)
        q_ref, st = bnbF.quantize_blockwise(x, code=code, blocksize=256)
        assert q.dtype == torch.uint8 and q.shape == x.shape
        assert torch.equal(q, q_ref) and torch.equal(absmax, st.absmax)
        deq = optim.dequantize_8bit(q, absmax, signed)
        assert torch.equal(deq, bnbF.dequantize_blockwise(q_ref, st))
        if signed:  # same as the DQ quantizer of nf4.py for the signed code
            q2, a2 = nf4.quantize_blockwise(x, 256)
            assert torch.equal(q, q2) and torch.equal(absmax, a2)
        # float reference: nearest code value to x / absmax, except next to a midpoint
        nb = absmax.numel()
        scale = torch.nn.functional.pad(x, (0, nb * 256 - n)).view(nb, 256)
        scaled = (scale / absmax.clamp(min=1e-30)[:, None]).reshape(-1)[:n].double()
        c = code.double()
        nearest = (scaled[:, None] - c[None, :]).abs().argmin(dim=1)
        mids = (c[:-1] + c[1:]) / 2
        near_mid = (scaled[:, None] - mids[None, :]).abs().min(dim=1).values <= 1.0 / 65535 + 1e-9
        zero_block = (absmax == 0).repeat_interleave(256)[:n]
        ok = (q.long() == nearest) | near_mid | zero_block
        assert bool(ok.all())


# --------------------------------------------------------------------------------------------- 32-bit


@pytest.mark.parametrize("name,budget", [("adamw", None), ("paged_adamw", 20000), ("paged_adamw", 0)])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw32_equals_torch_adamw(name, budget, wd):
    a, b = make_params(), make_params()
    ours = optim.make_optimizer(a, name, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd,
                                page_budget_bytes=budget)
    # on the CPU our 32-bit step is torch's fused kernel: the same as torch.optim.AdamW(fused=True)
    ref = torch.optim.AdamW(b, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd, fused=True)
    for t in range(12):
        for params in (a, b):
            set_grads(params, t, skip=1 if t % 3 == 2 else None)
        ours.step()
        ref.step()
        assert same(a, b), t
    assert state_equal(ours.state_dict(), ref.state_dict(), groups=False)  # torch's keys and values


def test_adamw32_bf16_params_update_in_fp32():
    """bf16 parameters: fp32 state, the fp32 AdamW step on the upcast parameter, cast back."""
    p = torch.nn.Parameter(torch.randn(40, 30).bfloat16())
    ours = optim.make_optimizer([p], "adamw", lr=1e-2, weight_decay=0.1)
    q = torch.nn.Parameter(p.detach().float())
    ref = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1, fused=True)
    for t in range(10):
        g = torch.randn(40, 30, generator=torch.Generator().manual_seed(t)).bfloat16()
        p.grad = g
        with torch.no_grad():
            q.copy_(p.float())
        q.grad = g.float()
        ours.step()
        ref.step()
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), q.detach().bfloat16())
    assert ours.state[p]["exp_avg"].dtype == torch.float32


# --------------------------------------------------------------------------------------------- 8-bit


@pytest.mark.parametrize("wd,dtype", [(0.0, torch.float32), (0.05, torch.float32), (0.05, torch.bfloat16)])
def test_adamw8bit_equals_bitsandbytes_on_cpu(wd, dtype, bnb):
    """Tensors of >= 4096 elements: parameters and the 8-bit states (codes and absmax) are
    bit-identical to bitsandbytes.optim.AdamW8bit (CPU backend) after every step, for fp32 and
    bf16 parameters. Smaller fp32 tensors keep 32-bit state, which follows torch.optim.AdamW."""
    a, b, c = make_params(dtype=dtype), make_params(dtype=dtype), make_params(dtype=dtype)
    ours = optim.make_optimizer(a, "adamw8bit", lr=5e-3, weight_decay=wd)
    ref = bnb.optim.AdamW8bit(b, lr=5e-3, weight_decay=wd, betas=(0.9, 0.999), eps=1e-8)
    ref32 = torch.optim.AdamW(c, lr=5e-3, weight_decay=wd)
    for t in range(15):
        for params in (a, b, c):
            set_grads(params, t)
        ours.step()
        ref.step()
        ref32.step()
        for i, (p, q, r) in enumerate(zip(a, b, c)):
            if p.numel() >= optim.MIN_8BIT_SIZE:
                assert torch.equal(p, q), (t, i)
                s, sr = ours.state[p], ref.state[q]
                assert torch.equal(s["exp_avg_q8"], sr["state1"].view(-1)) and torch.equal(s["exp_avg_absmax"], sr["absmax1"])
                assert torch.equal(s["exp_avg_sq_q8"], sr["state2"].view(-1)) and torch.equal(s["exp_avg_sq_absmax"], sr["absmax2"])
            else:
                assert "exp_avg" in ours.state[p]
                assert dtype != torch.float32 or torch.equal(p, r), (t, i)


def _regression(name, seed, steps=50):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 128, generator=g)
    y = x @ (0.1 * torch.randn(64, 128, generator=g)).T + 0.01 * torch.randn(256, 64, generator=g)
    lin = torch.nn.Linear(128, 64)
    with torch.no_grad():
        lin.weight.copy_(0.05 * torch.randn(64, 128, generator=g))
        lin.bias.zero_()
    w0 = lin.weight.detach().clone()
    opt = optim.make_optimizer(lin.parameters(), name, lr=1e-2, weight_decay=0.01)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((lin(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return lin.weight.detach(), w0, losses, opt


def test_adamw8bit_tracks_fp32_adamw():
    """50 steps of least squares (weight 64x128 -> 8-bit state): the 8-bit run stays within 5% of
    the fp32 run's total parameter movement (measured: ~1.5%) and each step's loss within 10%
    (measured: <= 3.1%)."""
    w32, w0, l32, _ = _regression("adamw", 0)
    w8, _, l8, opt8 = _regression("adamw8bit", 0)
    assert "exp_avg_q8" in opt8.state[opt8.param_groups[0]["params"][0]]
    rel = ((w8 - w32).norm() / (w32 - w0).norm()).item()
    assert 0 < rel < 0.05
    assert max(abs(a - b) / a for a, b in zip(l32, l8)) < 0.10
    assert l8[-1] < 0.01 * l8[0]


def test_8bit_state_is_about_two_bytes_per_parameter():
    p = torch.nn.Parameter(torch.randn(256, 256))
    for name, per_param in (("adamw", 8.0), ("adamw8bit", 2 + 8 / 256)):
        opt = optim.make_optimizer([p], name)
        p.grad = torch.randn_like(p)
        opt.step()
        assert opt.state_bytes() == {"device": int(per_param * p.numel()), "host": 0}


# --------------------------------------------------------------------------------------------- paging


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("budget", [0, 10000])
@pytest.mark.parametrize("per_param", [False, True])
def test_paging_moves_pages_and_changes_nothing(bits, budget, per_param, monkeypatch):
    if per_param:  # page (and prefetch) one parameter at a time instead of a chunk of them
        monkeypatch.setattr(optim, "PAGED_CHUNK_BYTES", 0)
    name = "adamw8bit" if bits == 8 else "adamw"
    a, b = make_params(), make_params()
    paged = optim.make_optimizer(a, "paged_" + name, lr=1e-2, weight_decay=0.1, page_budget_bytes=budget)
    plain = optim.make_optimizer(b, name, lr=1e-2, weight_decay=0.1)
    total = 0
    for t in range(9):
        run(paged, a, 1, start=t)
        run(plain, b, 1, start=t)
        assert same(a, b), t
        sizes = paged.state_bytes()
        total = sizes["device"] + sizes["host"]
        assert sizes["device"] <= budget and sizes["host"] >= total - budget
        for p, page in paged.pager.pages.items():  # host pages are separate tensors, device ones live
            st = paged.state[p]
            assert page.resident == all(st[k] is not page.host.get(k) for k in page.keys)
    assert total > budget
    stats = paged.pager.stats
    assert stats["evictions"] > 0 and stats["fetches"] > 0 and stats["bytes_in"] > 0
    assert state_equal(paged.state_dict(), plain.state_dict())


@pytest.mark.parametrize("per_param", [False, True])
def test_pager_moves_only_the_excess_each_step(per_param, monkeypatch):
    """N equal pages, budget for K: after the first step at most N - K + 1 pages move in per step
    (one page is in flight while the previous one updates); cycling through all N would be LRU."""
    if per_param:
        monkeypatch.setattr(optim, "PAGED_CHUNK_BYTES", 0)
    n, k = 10, 4
    ps = [torch.nn.Parameter(torch.randn(100)) for _ in range(n)]
    opt = optim.make_optimizer(ps, "paged_adamw", page_budget_bytes=k * 800)
    for t in range(12):
        for p in ps:
            p.grad = torch.randn(100)
        before = opt.pager.stats["fetches"]
        opt.step()
        moved = opt.pager.stats["fetches"] - before
        assert (moved == 0) if t == 0 else (n - k <= moved <= n - k + 1)
        assert opt.state_bytes()["device"] <= k * 800



@pytest.mark.parametrize("bits", [32, 8])
def test_pages_evicted_together_move_as_one_copy_each_way(bits, tmp_path, monkeypatch):
    """Budget 0 (`--offload-optimizer`): after the first eviction each chunk's pages share one host block, so
    every later step moves each chunk in and out with one copy each way (not one per state tensor), with
    the same parameters and state as without paging; the state dict gives tensors of their own."""
    from safetensors.torch import load_file, save_file
    monkeypatch.setattr(optim, "PAGED_CHUNK_BYTES", 60000 if bits == 8 else 200000)  # several chunks, several tensors each
    name = "adamw8bit" if bits == 8 else "adamw"
    shapes = [(16, 300), (700, 16)] * 6  # LoRA-like pairs; 8-bit state above 4096 elements
    def params():
        g = torch.Generator().manual_seed(5)
        return [torch.nn.Parameter(torch.randn(sh, generator=g)) for sh in shapes]
    a, b = params(), params()
    paged = optim.make_optimizer(a, "paged_" + name, lr=1e-2, weight_decay=0.1, page_budget_bytes=0)
    plain = optim.make_optimizer(b, name, lr=1e-2, weight_decay=0.1)
    chunks = len(paged._chunks([(paged.param_groups[0], p) for p in a]))
    keys = 2 if bits == 32 else 4
    assert 1 < chunks < len(shapes)
    for t in range(5):
        before = Counter(paged.pager.stats)
        for opt, ps in ((paged, a), (plain, b)):
            g = torch.Generator().manual_seed(100 + t)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        moved = paged.pager.stats - before
        if t == 0:  # state created on the device, then out tensor by tensor into new blocks
            assert moved["copies_in"] == 0 and moved["copies_out"] == keys * len(shapes) and moved["blocks"] == chunks
        else:
            assert moved["copies_in"] == chunks and moved["copies_out"] == chunks and moved["blocks"] == 0
        assert moved["evictions"] == len(shapes)
        assert same(a, b), t
    sd = paged.state_dict()
    assert state_equal(sd, plain.state_dict())
    for st in sd["state"].values():  # no views into the pager's blocks
        assert all(t.untyped_storage().nbytes() == t.nbytes for t in st.values())
    tensors, meta = optim.state_dict_to_tensors(sd)
    save_file(tensors, str(tmp_path / "o.safetensors"), metadata=meta)
    torch.save(sd, tmp_path / "o.pt")
    back = optim.state_dict_from_tensors(load_file(str(tmp_path / "o.safetensors")), meta)
    assert state_equal(back, torch.load(tmp_path / "o.pt", weights_only=True), groups=False)  # JSON: lists
    assert state_equal(back, plain.state_dict(), groups=False)


def test_evict_all_then_continue():
    a, b = make_params(), make_params()
    paged = optim.make_optimizer(a, "paged_adamw8bit", lr=1e-2)
    plain = optim.make_optimizer(b, "adamw8bit", lr=1e-2)
    run(paged, a, 3)
    run(plain, b, 3)
    paged.evict_all()
    assert paged.state_bytes()["device"] == 0
    run(paged, a, 3, start=3)
    run(plain, b, 3, start=3)
    assert same(a, b)


# --------------------------------------------------------------------------------------------- state dict


def _save_load(sd, how, tmp_path):
    """Through a file: torch.save + torch.load(weights_only=True), or safetensors."""
    if how == "torch":
        torch.save(sd, tmp_path / "optim.pt")
        return torch.load(tmp_path / "optim.pt", weights_only=True)
    tensors, meta = optim.state_dict_to_tensors(sd)
    safetensors_torch.save_file(tensors, tmp_path / "optim.safetensors", metadata=meta)
    with safe_open(tmp_path / "optim.safetensors", "pt") as f:
        meta_back = f.metadata()
    return optim.state_dict_from_tensors(safetensors_torch.load_file(tmp_path / "optim.safetensors"), meta_back)


@pytest.mark.parametrize("how", ["torch", "safetensors"])
@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_state_dict_resume_is_exact(name, how, tmp_path):
    budget = 12000 if name.startswith("paged") else None
    kw = dict(lr=1e-2, betas=(0.85, 0.995), weight_decay=0.05, page_budget_bytes=budget)
    a = make_params()
    straight = optim.make_optimizer(a, name, **kw)
    run(straight, a, 10)

    b = make_params()
    first = optim.make_optimizer(b, name, **kw)
    run(first, b, 5)
    first.param_groups[0]["lr"] = 1e-2  # a scheduler may have touched it; must round-trip
    if budget is not None:
        assert first.state_bytes()["host"] > 0  # some pages are out when saving
    saved = _save_load(first.state_dict(), how, tmp_path)
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    del first, b
    resumed = optim.make_optimizer(c, name, **dict(kw, lr=0.5))  # hyperparameters come from the state
    resumed.load_state_dict(saved)
    run(resumed, c, 5, start=5)
    assert same(a, c)
    assert state_equal(straight.state_dict(), resumed.state_dict())


def test_loads_torch_adamw_state_and_continues_identically():
    a, b = make_params(), make_params()
    ref = torch.optim.AdamW(a, lr=1e-2, weight_decay=0.1, fused=True)  # the CPU kernel ours uses
    run(ref, a, 4)
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    ours = optim.make_optimizer(b, "adamw", lr=1e-2, weight_decay=0.1)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    run(ref, a, 4, start=4)
    run(ours, b, 4, start=4)
    assert same(a, b)


def test_load_rejects_mismatched_state():
    a = make_params()
    opt8 = optim.make_optimizer(a, "adamw8bit")
    run(opt8, a, 1)
    sd = opt8.state_dict()
    with pytest.raises(QLoraError, match="expects"):
        optim.make_optimizer(make_params(), "adamw").load_state_dict(sd)
    with pytest.raises(QLoraError, match="groups of sizes"):
        optim.make_optimizer(make_params()[:2], "adamw8bit").load_state_dict(sd)
    bad = copy.deepcopy(sd)
    bad["state"][0]["exp_avg_absmax"] = bad["state"][0]["exp_avg_absmax"][:-1]
    with pytest.raises(QLoraError, match="exp_avg_absmax"):
        optim.make_optimizer(make_params(), "adamw8bit").load_state_dict(bad)
    with pytest.raises(QLoraError):
        optim.make_optimizer(make_params(), "adamw8bit").load_state_dict({"nope": 1})
    # a refused state dict leaves a paged optimizer as it was
    c, d = make_params(), make_params()
    paged = optim.make_optimizer(c, "paged_adamw8bit", page_budget_bytes=5000)
    plain = optim.make_optimizer(d, "adamw8bit")
    run(paged, c, 2)
    run(plain, d, 2)
    with pytest.raises(QLoraError):
        paged.load_state_dict(bad)
    run(paged, c, 2, start=2)
    run(plain, d, 2, start=2)
    assert same(c, d)


def test_make_optimizer_checks_its_inputs():
    ps = make_params()
    assert isinstance(optim.make_optimizer(ps), optim.AdamW)
    assert isinstance(optim.make_optimizer(ps, "adamw8bit"), optim.AdamW8bit)
    for kwargs, msg in [(dict(name="sgd"), "unknown optimizer"),
                        (dict(name="adamw", page_budget_bytes=10), "paged optimizers only"),
                        (dict(lr=-1.0), "learning rate"),
                        (dict(lr=True), "learning rate"),  # a bool is an int to Python, not a rate
                        (dict(betas=(0.9, 1.0)), "betas"),
                        (dict(betas=(False, 0.9)), "betas"),
                        (dict(eps=float("nan")), "eps"),
                        (dict(weight_decay=-0.1), "weight decay"),
                        (dict(page_budget_bytes=-5), "page_budget_bytes"),
                        (dict(name="paged_adamw", page_budget_bytes=True), "page_budget_bytes")]:
        with pytest.raises(QLoraError, match=msg):
            optim.make_optimizer(ps, **kwargs)
    with pytest.raises(QLoraError, match="no trainable parameters"):
        optim.make_optimizer([])


# --------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [32, 8])
def test_cuda_paged_equals_unpaged(bits, tmp_path, monkeypatch):
    monkeypatch.setattr(optim, "PAGED_CHUNK_BYTES", 0)  # page, prefetch and update one tensor at a time
    name = "adamw8bit" if bits == 8 else "adamw"
    a, b = make_params("cuda"), make_params("cuda")
    paged = optim.make_optimizer(a, "paged_" + name, lr=1e-2, weight_decay=0.1, page_budget_bytes=20000)
    plain = optim.make_optimizer(b, name, lr=1e-2, weight_decay=0.1)
    run(paged, a, 12)
    run(plain, b, 12)
    torch.cuda.synchronize()
    assert paged.pager.stats["evictions"] > 0 and paged.pager.stats["fetches"] > 0
    assert same(a, b)
    assert any(t.device.type == "cpu" and t.is_pinned() for st in paged.state.values()
               for k, t in st.items() if k != "step")  # pages in pinned host memory
    sd = paged.state_dict()
    assert any(t.device.type == "cpu" for st in sd["state"].values() for k, t in st.items() if k != "step")
    assert state_equal(sd, plain.state_dict())
    # resume a paged CUDA run from its state dict
    c = [torch.nn.Parameter(p.detach().clone()) for p in a]
    resumed = optim.make_optimizer(c, "paged_" + name, lr=1e-2, weight_decay=0.1, page_budget_bytes=20000)
    resumed.load_state_dict(_save_load(sd, "torch", tmp_path))
    run(resumed, c, 4, start=12)
    run(plain, b, 4, start=12)
    assert same(b, c)


@pytest.mark.gpu
def test_cuda_adamw32_equals_torch_and_auto_budget_keeps_state_resident():
    a, b = make_params("cuda"), make_params("cuda")
    ours = optim.make_optimizer(a, "paged_adamw", lr=1e-2, weight_decay=0.1)  # budget from free memory
    ref = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1)  # CUDA default: the multi-tensor path
    run(ours, a, 8)
    run(ref, b, 8)
    assert same(a, b)
    assert ours.pager.stats["evictions"] == 0 and ours.state_bytes()["host"] == 0


@pytest.mark.gpu
def test_cuda_budget_zero_moves_all_state_every_step_and_changes_nothing():
    """``--offload-optimizer``'s pager (budget 0) at a LoRA-like size: every page goes out after its update and
    comes back next step, each chunk as one copy per direction on two copy streams, with no host
    synchronisation between steps (a fetch must wait for the eviction that wrote its host block). Same
    parameters and state as without paging."""
    shapes = [(16, 4096), (14336, 16)] * 24
    def params():
        g = torch.Generator(device="cuda").manual_seed(3)
        return [torch.nn.Parameter(torch.randn(sh, device="cuda", generator=g) * 0.01) for sh in shapes]
    a, b = params(), params()
    paged = optim.make_optimizer(a, "paged_adamw", lr=1e-2, weight_decay=0.1, page_budget_bytes=0)
    plain = optim.make_optimizer(b, "adamw", lr=1e-2, weight_decay=0.1)
    chunks = len(paged._chunks([(paged.param_groups[0], p) for p in a]))
    for opt, ps in ((paged, a), (plain, b)):
        g = torch.Generator(device="cuda").manual_seed(4)
        for _ in range(8):
            for p in ps:
                p.grad = torch.randn(p.shape, device="cuda", generator=g)
            opt.step()
    torch.cuda.synchronize()
    st = paged.pager.stats
    assert 1 < chunks < len(shapes) and st["evictions"] == len(shapes) * 8 and st["fetches"] == len(shapes) * 7
    assert st["copies_in"] == chunks * 7 and st["copies_out"] == 2 * len(shapes) + chunks * 7
    assert paged.state_bytes()["device"] == 0
    assert same(a, b)
    assert state_equal(paged.state_dict(), plain.state_dict())
