"""The Triton weight-only matmul kernels against the numpy reference of ``qcompiler.runtime.packing``.

Needs torch, triton and a CUDA device; skipped otherwise (CI has none). With ``TRITON_INTERPRET=1`` the same tests
run on CPU tensors in Triton's interpreter (slow; the inline-PTX paths fall back to plain Triton there).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from qcompiler.runtime import packing  # noqa: E402
from qcompiler.runtime.cuda import kernels  # noqa: E402
from qcompiler.runtime.cuda.kernels import KernelConfig  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"


def _nbits_case(rng, *, bits, block, k, n, zp_kind, ternary=False):
    blocks = packing.block_count(k, block)
    if ternary:
        codes = rng.integers(1, 4, (n, k)).astype(np.uint8)
    else:
        codes = rng.integers(0, 1 << bits, (n, k)).astype(np.uint8)
    packed = packing.pack_codes(codes, bits, block)
    scales = (rng.random(n * blocks, dtype=np.float32) * 0.02 + 0.005).astype(np.float32)
    if zp_kind == "none":
        zp = None
    elif zp_kind == "uint8":
        zp = packing.pack_zero_points(rng.integers(0, 1 << bits, (n, blocks)).astype(np.uint8), bits)
    else:
        zp = (rng.random(n * blocks, dtype=np.float32) * ((1 << bits) - 1)).astype(np.float32)
    return packed, scales, zp


def _check(y, ref, dtype=torch.float16):
    assert y.dtype == dtype
    y = y.float().cpu().numpy().astype(np.float64)
    assert np.isfinite(y).all(), "an output was not written or is not finite"
    rms = np.sqrt(np.mean(ref ** 2))
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    worst = np.abs(y - ref).max() / rms
    assert rel < 4e-3 and worst < 3e-2, (rel, worst)


def _run_nbits(rng, *, bits, block, k, n, m, zp_kind, config=None, dtype=torch.float16, ternary=False):
    packed, scales, zp = _nbits_case(rng, bits=bits, block=block, k=k, n=n, zp_kind=zp_kind, ternary=ternary)
    weight = packing.dequantize(packed, scales, zp, k=k, bits=bits, block_size=block).astype(np.float64)
    a = rng.standard_normal((m, k)).astype(np.float32)
    ref = a.astype(np.float16).astype(np.float64) @ weight
    if dtype == torch.bfloat16:
        ref = torch.from_numpy(a).to(torch.bfloat16).double().numpy() @ weight
    a_t = torch.from_numpy(a).to(DEVICE, dtype)
    packed_t, scales_t, zp_t = kernels.to_device(packed, scales, zp, device=DEVICE)
    y = kernels.matmul_nbits(a_t, packed_t, scales_t, zp_t, k=k, n=n, bits=bits, block_size=block, config=config)
    assert y.shape == (m, n)
    _check(y, ref, dtype)


@pytest.mark.parametrize("m", [1, 3, 16, 128])
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("zp_kind", ["none", "uint8"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matmul_nbits_matches_the_numpy_reference(bits, zp_kind, block, m):
    rng = np.random.default_rng([bits, block, m, len(zp_kind)])
    k = 3 * block + 40  # the last block is padded
    _run_nbits(rng, bits=bits, block=block, k=k, n=200, m=m, zp_kind=zp_kind)


@pytest.mark.parametrize("m", [1, 3, 16, 128])
@pytest.mark.parametrize("block", [32, 128])
def test_matmul_nbits_float_zero_points(block, m):
    rng = np.random.default_rng([block, m, 7])
    _run_nbits(rng, bits=4, block=block, k=2 * block + 24, n=136, m=m, zp_kind="float")


@pytest.mark.parametrize("m", [1, 16])
def test_ternary_codes(m):
    rng = np.random.default_rng(m)
    _run_nbits(rng, bits=2, block=32, k=100, n=72, m=m, zp_kind="none", ternary=True)


@pytest.mark.parametrize("block", [16, 256])
def test_smallest_and_largest_blocks(block):
    rng = np.random.default_rng(block)
    for m in (1, 16):
        _run_nbits(rng, bits=4, block=block, k=block * 3 + 8, n=64, m=m, zp_kind="uint8")


_CONFIGS = [
    KernelConfig(block_n=16, block_k=256, split_k=1),
    KernelConfig(block_n=32, block_k=128, split_k=3),
    KernelConfig(block_n=64, block_k=32, split_k=1, block_m=16, use_asm=True, gemv=False),
    KernelConfig(block_n=64, block_k=32, split_k=3, block_m=16, use_asm=False, gemv=False),
    KernelConfig(block_n=64, block_k=64, split_k=2, block_m=16, scale_w=True, use_asm=True, gemv=False),
    KernelConfig(block_n=128, block_k=64, split_k=1, block_m=64, scale_w=True, use_asm=False, num_warps=8,
                 gemv=False),
    KernelConfig(block_n=64, block_k=32, split_k=4, block_m=32, use_asm=True, num_stages=4, gemv=False),
    KernelConfig(block_n=64, block_k=64, split_k=1, block_m=64, scale_w=True, use_asm=True, swap_ab=False,
                 gemv=False),
    KernelConfig(block_n=64, block_k=32, split_k=2, block_m=32, use_asm=False, swap_ab=False, gemv=False),
]


@pytest.mark.parametrize("config", _CONFIGS, ids=lambda c: f"n{c.block_n}k{c.block_k}s{c.split_k}m{c.block_m}"
                         f"{'w' if c.scale_w else ''}{'a' if c.use_asm else ''}{'' if c.swap_ab else 't'}")
@pytest.mark.parametrize("m", [1, 5, 40])
def test_launch_configurations(config, m):
    """Each kernel variant (split-K, per-code or per-row scaling, PTX or plain unpacking) computes the same."""
    rng = np.random.default_rng([m, config.block_n, config.split_k, config.block_m])
    _run_nbits(rng, bits=4, block=32, k=520, n=136, m=m, zp_kind="uint8", config=config)


def test_split_k_workspace_is_reset_between_calls():
    rng = np.random.default_rng(11)
    packed, scales, zp = _nbits_case(rng, bits=4, block=32, k=256, n=96, zp_kind="uint8")
    packed_t, scales_t, zp_t = kernels.to_device(packed, scales, zp, device=DEVICE)
    a = torch.from_numpy(rng.standard_normal((1, 256)).astype(np.float16)).to(DEVICE)
    cfg = KernelConfig(block_n=16, block_k=64, split_k=4)
    first = kernels.matmul_nbits(a, packed_t, scales_t, zp_t, k=256, n=96, bits=4, block_size=32, config=cfg)
    second = kernels.matmul_nbits(a, packed_t, scales_t, zp_t, k=256, n=96, bits=4, block_size=32, config=cfg)
    torch.testing.assert_close(first, second, rtol=0, atol=1e-3)
    ws, counters = kernels._WORKSPACE[(packed_t.device.type, packed_t.device.index)]
    assert not ws.any() and not counters.any()


def test_leading_dims_bfloat16_and_float32_inputs():
    rng = np.random.default_rng(5)
    k, n = 96, 48
    packed, scales, zp = _nbits_case(rng, bits=4, block=32, k=k, n=n, zp_kind="uint8")
    weight = packing.dequantize(packed, scales, zp, k=k, bits=4, block_size=32).astype(np.float64)
    packed_t, scales_t, zp_t = kernels.to_device(packed, scales, zp, device=DEVICE)
    a = rng.standard_normal((2, 3, k)).astype(np.float32)
    y = kernels.matmul_nbits(torch.from_numpy(a).to(DEVICE), packed_t, scales_t, zp_t, k=k, n=n, bits=4,
                             block_size=32)
    assert y.shape == (2, 3, n) and y.dtype == torch.float16
    _check(y.reshape(6, n), a.reshape(6, k).astype(np.float16).astype(np.float64) @ weight)
    for m in () if INTERPRET else (1, 6):  # the interpreter's bfloat16 dot is not trusted
        _run_nbits(rng, bits=4, block=32, k=k, n=n, m=m, zp_kind="uint8", dtype=torch.bfloat16)
    half_scales = scales_t.half()  # float16 scales (MatMulNBits' T1 may be float16)
    ref = a.reshape(6, k).astype(np.float16).astype(np.float64) @ packing.dequantize(
        packed, half_scales.float().cpu().numpy(), zp, k=k, bits=4, block_size=32).astype(np.float64)
    y = kernels.matmul_nbits(torch.from_numpy(a.reshape(6, k)).to(DEVICE, torch.float16), packed_t, half_scales,
                             zp_t, k=k, n=n, bits=4, block_size=32)
    _check(y, ref)


def _run_bnb4(rng, *, k, n, m, block, config=None):
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    packed = packing.pack_bnb4(codes)
    absmax = (rng.random(-(-(n * k) // block), dtype=np.float32) * 0.05 + 0.01).astype(np.float32)
    weight = packing.dequantize_bnb4(packed, absmax, k=k, n=n, block_size=block).astype(np.float64)
    a = rng.standard_normal((m, k)).astype(np.float16)
    packed_t, absmax_t = kernels.to_device(packed, absmax, device=DEVICE)
    y = kernels.matmul_bnb4(torch.from_numpy(a).to(DEVICE), packed_t, absmax_t, k=k, n=n, block_size=block,
                            config=config)
    _check(y, a.astype(np.float64) @ weight)


@pytest.mark.parametrize("m", [1, 3, 16, 128])
@pytest.mark.parametrize(("k", "n", "block"), [(256, 72, 64), (192, 40, 32), (100, 30, 64), (136, 9, 64)])
def test_matmul_bnb4_matches_the_numpy_reference(k, n, block, m):
    """NF4; the last two shapes (K % 8 != 0, blocks across rows) take the dequantize-then-matmul path."""
    _run_bnb4(np.random.default_rng([k, n, m]), k=k, n=n, m=m, block=block)


def test_matmul_bnb4_configurations():
    rng = np.random.default_rng(3)
    for m, cfg in [(1, KernelConfig(block_n=16, block_k=128, split_k=2)),
                   (1, KernelConfig(block_n=64, block_k=64, block_m=16, split_k=2, gemv=False)),
                   (20, KernelConfig(block_n=64, block_k=128, block_m=32, scale_w=True, split_k=2)),
                   (20, KernelConfig(block_n=64, block_k=32, block_m=16, split_k=3))]:
        _run_bnb4(rng, k=384, n=80, m=m, block=64, config=cfg)


@pytest.mark.parametrize("zp_kind", ["none", "uint8", "float"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_torch_dequantize_matches_numpy(bits, zp_kind):
    rng = np.random.default_rng([bits, len(zp_kind)])
    k, n, block = 150, 24, 32
    packed, scales, zp = _nbits_case(rng, bits=bits, block=block, k=k, n=n, zp_kind=zp_kind)
    expected = packing.dequantize(packed, scales, zp, k=k, bits=bits, block_size=block)
    got = kernels.dequantize_nbits(*kernels.to_device(packed, scales, zp, device=DEVICE), k=k, n=n, bits=bits,
                                   block_size=block)
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=1e-6, atol=1e-7)
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    bnb = packing.pack_bnb4(codes)
    absmax = rng.random(-(-(n * k) // 64), dtype=np.float32)
    got = kernels.dequantize_bnb4(*kernels.to_device(bnb, absmax, device=DEVICE), k=k, n=n, block_size=64)
    np.testing.assert_array_equal(got.cpu().numpy(), packing.dequantize_bnb4(bnb, absmax, k=k, n=n, block_size=64))


def test_bad_inputs_raise():
    rng = np.random.default_rng(0)
    packed, scales, zp = _nbits_case(rng, bits=4, block=32, k=64, n=8, zp_kind="uint8")
    packed_t, scales_t, zp_t = kernels.to_device(packed, scales, zp, device=DEVICE)
    a = torch.zeros((1, 64), dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="activations end"):
        kernels.matmul_nbits(a[:, :32], packed_t, scales_t, zp_t, k=64, n=8, bits=4, block_size=32)
    with pytest.raises(ValueError, match="packed has"):
        kernels.matmul_nbits(a, packed_t, scales_t, zp_t, k=64, n=16, bits=4, block_size=32)
    with pytest.raises(ValueError, match="scales"):
        kernels.matmul_nbits(a, packed_t, scales_t[:4], zp_t, k=64, n=8, bits=4, block_size=32)
    with pytest.raises(ValueError, match="zero points"):
        kernels.matmul_nbits(a, packed_t, scales_t, zp_t[:2], k=64, n=8, bits=4, block_size=32)
    with pytest.raises(ValueError, match="bits"):
        kernels.matmul_nbits(a, packed_t, scales_t, zp_t, k=64, n=8, bits=3, block_size=32)
    with pytest.raises(ValueError, match="power of two"):
        kernels.matmul_nbits(a, packed_t[:, :1], scales_t[:8], None, k=24, n=8, bits=4, block_size=24)


@pytest.mark.skipif(INTERPRET, reason="the CUDA C++ GEMV needs a GPU")
@pytest.mark.parametrize(("bits", "block", "zp_kind", "k", "n"), [
    (4, 32, "none", 4096, 1000), (4, 128, "uint8", 1536, 333), (4, 64, "uint8", 576, 1536),
    (8, 32, "none", 3072, 70), (8, 128, "uint8", 4096, 64), (8, 16, "none", 512, 96)])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_cuda_cpp_gemv_matches_the_numpy_reference(bits, block, zp_kind, k, n, dtype) -> None:
    from qcompiler.runtime.cuda import gemv_cuda

    if not gemv_cuda.available():
        pytest.skip("the CUDA C++ GEMV does not compile here (nvcc/ninja)")
    rng = np.random.default_rng(bits + block + k)
    packed, scales, zp = _nbits_case(rng, bits=bits, block=block, k=k, n=n, zp_kind=zp_kind)
    weight = packing.dequantize(packed, scales, zp, k=k, bits=bits, block_size=block).astype(np.float64)
    a = (rng.standard_normal((1, k)) * 2).astype(np.float32)
    want = a.astype(np.float16).astype(np.float64) @ weight
    tensors = kernels.to_device(packed, scales, zp, device=DEVICE)
    act = torch.from_numpy(a).to(DEVICE).to(getattr(torch, dtype))
    for rows, warps_k in [(2, 1), (4, 2), (8, 8), gemv_cuda.launch_shape(n, k, bits, 132)]:
        got = gemv_cuda.gemv(act, *tensors, k=k, n=n, bits=bits, block_size=block, rows=rows, warps_k=warps_k)
        assert got.dtype == act.dtype and got.shape == (1, n)
        err = np.linalg.norm(got.double().cpu().numpy() - want) / np.linalg.norm(want)
        assert err < 2e-3, (rows, warps_k, err)
    # and through matmul_nbits, which picks it for one float16 token (float32 ones go to the Triton GEMV below
    # 2^24 weights)
    rows, warps_k = gemv_cuda.launch_shape(n, k, bits, kernels._sm_count(torch.device(DEVICE)))
    via = kernels.matmul_nbits(act, *tensors, k=k, n=n, bits=bits, block_size=block)
    direct = gemv_cuda.gemv(act, *tensors, k=k, n=n, bits=bits, block_size=block, rows=rows, warps_k=warps_k)
    if dtype == "float16":
        torch.testing.assert_close(via, direct, rtol=0, atol=0)
    else:
        err = np.linalg.norm(via.double().cpu().numpy() - want) / np.linalg.norm(want)
        assert via.dtype == torch.float32 and err < 2e-3
