"""NF4/FP4 + Double Quantization against bitsandbytes (CPU backend) and a float reference."""
import json

import pytest
import torch

from qlora import nf4

bnbF = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(64, 64), (33, 17), (1, 1), (3,), (257, 129), (300, 4097), (2, 3, 40)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.02
    if w.numel() >= 128:
        w.view(-1)[:64] = 0  # an all-zero block
        w.view(-1)[100] = 0.5  # an outlier
    return w.to(dtype)


def _bnb_dequant(packed, st):
    """bitsandbytes' dequantize. Its AVX-512 CPU kernel indexes scales per row, which is wrong
    when the last dimension is not a multiple of the block size (found while writing these
    tests; its ARM path guards against it). There, compare with bitsandbytes' own pure-torch
    kernel, which its other CPU paths run."""
    shape = st.shape
    if shape[-1] % st.blocksize != 0:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        absmax = st.absmax
        if st.nested:
            absmax = bnbF.dequantize_blockwise(st.absmax, st.state2) + st.offset
        return _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), st.code, st.blocksize, shape, st.dtype)
    return bnbF.dequantize_4bit(packed, st)


def test_code_books_match_bitsandbytes():
    for qt in ("nf4", "fp4"):
        assert torch.equal(nf4.code_4bit(qt), bnbF.get_4bit_type(qt, device="cpu"))
    assert torch.equal(nf4.dynamic_code(), bnbF.create_dynamic_map())
    assert nf4.code_4bit("nf4")[7] == 0 and nf4.code_4bit("nf4")[0] == -1 and nf4.code_4bit("nf4")[15] == 1


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 1024, 4096])
def test_bit_exact_with_bitsandbytes(quant_type, double_quant, dtype, blocksize):
    for i, shape in enumerate(SHAPES):
        w = _weight(shape, dtype, seed=i)
        p_ref, s_ref = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
        p, s = nf4.quantize_4bit(w, blocksize, quant_type, double_quant)
        assert p.dtype == torch.uint8 and p.shape == p_ref.shape == ((w.numel() + 1) // 2, 1)
        assert torch.equal(p, p_ref), (shape, "packed bytes differ")
        assert s.absmax.dtype == s_ref.absmax.dtype and torch.equal(s.absmax, s_ref.absmax), shape
        if double_quant:
            assert s.offset == s_ref.offset.item()
            assert torch.equal(s.nested_absmax, s_ref.state2.absmax)
            assert torch.equal(s.nested_code, s_ref.state2.code)
            assert s.nested_blocksize == s_ref.state2.blocksize == 256
        # dequantize of the same state is identical, and each side can read the other's state
        d_ref = _bnb_dequant(p_ref, s_ref)
        d = nf4.dequantize_4bit(p, s)
        assert d.dtype == dtype and d.shape == w.shape
        assert torch.equal(d, d_ref), (shape, (d != d_ref).sum().item())


def test_dq_8bit_rounding_matches_bitsandbytes_on_many_values():
    g = torch.Generator().manual_seed(1)
    for scale in (1e-4, 0.01, 1.0, 300.0):
        x = torch.randn(1 << 16, generator=g) * scale
        q_ref, st = bnbF.quantize_blockwise(x, blocksize=256)
        q, absmax = nf4.quantize_blockwise(x, 256)
        assert torch.equal(absmax, st.absmax)
        assert torch.equal(q, q_ref)
        assert torch.equal(nf4.dequantize_blockwise(q, absmax, nf4.dynamic_code(), 256),
                           bnbF.dequantize_blockwise(q_ref, st).reshape(-1))


def test_packing_layout_first_element_high_nibble():
    code = nf4.code_4bit("nf4")
    w = torch.stack([code[3], code[12], code[15], code[0], code[7]])  # absmax 1 in one block
    p, s = nf4.quantize_4bit(w, 64, "nf4", double_quant=False)
    assert p.view(-1).tolist() == [0x3C, 0xF0, 0x77]  # odd length: pad nibble is the code of 0
    assert torch.equal(nf4.unpack_4bit(p, 5), torch.tensor([3, 12, 15, 0, 7], dtype=torch.uint8))


def test_dequant_is_codebook_times_blockwise_absmax_float_reference():
    w = _weight((7, 50), torch.float32, seed=3)  # 350 elements: blocks of 64, short last block
    p, s = nf4.quantize_4bit(w, 64, "nf4", double_quant=False)
    flat = w.reshape(-1)
    ref = torch.empty_like(flat)
    code = torch.tensor(nf4._NF4)
    for b in range(0, 350, 64):
        blk = flat[b:b + 64]
        am = blk.abs().max()
        nearest = (blk[:, None] / am - code[None, :]).abs().argmin(dim=1)
        ref[b:b + 64] = code[nearest] * am
    assert torch.allclose(nf4.dequantize_4bit(p, s).reshape(-1), ref, atol=1e-7)


def test_quant_state_roundtrips_bitsandbytes_state_dict_keys():
    w = _weight((96, 80), torch.bfloat16)
    for dq in (False, True):
        p, s = nf4.quantize_4bit(w, 64, "nf4", dq)
        sd = s.to_state_dict("layer.weight")
        p_ref, s_ref = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        ref = {f"layer.weight.{k}": v for k, v in s_ref.as_dict(packed=True).items()}
        assert set(sd) == set(ref)
        for k in sd:
            assert sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]), k
        # bitsandbytes reads ours, we read theirs
        s_back = nf4.QuantState.from_state_dict(ref, "layer.weight")
        assert torch.equal(nf4.dequantize_4bit(p, s_back), nf4.dequantize_4bit(p, s))
        theirs = bnbF.QuantState.from_dict({k.split("layer.weight.")[1]: v for k, v in sd.items()}, device="cpu")
        assert torch.equal(_bnb_dequant(p, theirs), nf4.dequantize_4bit(p, s))
        meta = json.loads(bytes(sd["layer.weight.quant_state.bitsandbytes__nf4"].tolist()))
        assert meta["shape"] == [96, 80] and meta["dtype"] == "bfloat16" and meta["blocksize"] == 64


def test_quant_error_nf4_beats_fp4_and_int4_on_gaussian():
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    e = {qt: nf4.quant_error(w, 64, qt) for qt in ("nf4", "fp4", "int4")}
    assert 0.085 < e["nf4"] < 0.095, e
    assert e["nf4"] < e["fp4"] and e["nf4"] < e["int4"], e


def test_int4_against_float_reference():
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(2))
    p, s = nf4.quantize_4bit(w, 64, "int4", double_quant=False)
    am = w.abs().amax(dim=1, keepdim=True)
    ref = torch.round(w / am * 7) / 7 * am  # uniform 15-level grid, absmax-scaled
    assert torch.allclose(nf4.dequantize_4bit(p, s), ref, atol=1e-6)


def test_bits_per_param():
    w = torch.randn(4096, 4096)
    _, s = nf4.quantize_4bit(w, 64, "nf4", True)
    assert abs(nf4.bits_per_param(s) - 4.127) < 0.01
    _, s = nf4.quantize_4bit(w, 64, "nf4", False)
    assert abs(nf4.bits_per_param(s) - 4.5) < 0.01


@pytest.mark.parametrize("bad", [0, 48, 100, 8192, -64])
def test_bad_blocksize_rejected(bad):
    with pytest.raises(ValueError, match="power of two"):
        nf4.quantize_4bit(torch.randn(128), bad)


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match="float"):
        nf4.quantize_4bit(torch.ones(64, dtype=torch.int32))
    with pytest.raises(ValueError, match="quant type"):
        nf4.quantize_4bit(torch.randn(64), 64, "nf3")


@pytest.mark.gpu
def test_cuda_matches_cpu():
    w = _weight((257, 300), torch.bfloat16)
    p, s = nf4.quantize_4bit(w, 64, "nf4", True)
    pc, sc = nf4.quantize_4bit(w.cuda(), 64, "nf4", True)
    assert torch.equal(pc.cpu(), p) and torch.equal(sc.absmax.cpu(), s.absmax)
    assert torch.equal(nf4.dequantize_4bit(pc, sc).cpu(), nf4.dequantize_4bit(p, s))
