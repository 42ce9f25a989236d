"""qcompiler's NF4 (``quantize_nf4`` + ``pack_bnb4``, MatMulBnb4's layout) against bitsandbytes' NF4 on CPU.

Findings pinned here (summary in bench/RESULTS.md, section QLoRA):

- Same 16 codebook values (float32 bit for bit), same absmax per block, same block order: bnb quantizes a
  tensor flattened in memory order, and an ``nn.Linear`` weight ``[N, K]`` flattened *is* ``W^T`` flattened,
  MatMulBnb4's order. Same nibble order (first code of a pair in the high nibble), so the packed bytes agree.
- Codes differ only at values within rounding distance of a midpoint between two codebook values: bnb compares
  ``float32(x * float32(1 / absmax))`` (a true division in a partial last block) against the float32 midpoints,
  a tie going to the lower code; qcompiler compares ``x / absmax`` in float64 against the exact midpoints.
  6 of the 15 float32 midpoints lie above the exact ones, so a value sitting exactly on one of those gets the
  lower code in bnb and the upper code in qcompiler. On random weights, about one code in two million differs.
- All-zero blocks: same codes (7, the exact 0) and dequantized values, but absmax 1.0 here, 0.0 in bnb (1e-38
  in a partial last block). Odd ``N * K``: bnb pads the last nibble with code 7, qcompiler with 0.
- Block maxima below 1e-38 (subnormal float32): bnb divides by 1e-38 instead of the block maximum, so its codes
  shrink towards 0; qcompiler's do not.

``_bnb_cpu_nf4`` and ``_bnb_cpu_blockwise8`` are numpy re-implementations of bnb's CPU quantizers, checked here bit
for bit, so the rules above are stated as code.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnbf = pytest.importorskip("bitsandbytes.functional")

from qcompiler.formats.nf4 import quantize_nf4  # noqa: E402
from qcompiler.runtime import packing  # noqa: E402

F32 = np.float32
BOOK = packing.NF4_CODEBOOK
EXACT_MIDS = (BOOK[1:].astype(np.float64) + BOOK[:-1]) / 2
F32_MIDS = EXACT_MIDS.astype(F32)  # bnb's bounds: (code[i] + code[i+1]) / 2 computed in float32
ROUNDED_UP = [0, 1, 3, 4, 12, 14]  # midpoints whose float32 value lies above the exact midpoint


def _bnb(w_t: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """bnb's codes ``[N, K]``, float32 absmax and packed bytes for ``w_t`` = ``W^T`` (an nn.Linear weight)."""
    packed, state = bnbf.quantize_4bit(torch.from_numpy(np.ascontiguousarray(w_t)), blocksize=block,
                                       quant_type="nf4")
    flat = packed.numpy().reshape(-1)
    codes = np.stack([flat >> 4, flat & 0x0F], axis=1).reshape(-1)[:w_t.size].reshape(w_t.shape)
    return codes, state.absmax.numpy(), flat


def _bnb_cpu_nf4(flat: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes 0.50's CPU ``quantize_4bit(quant_type="nf4")`` (its default torch kernel) in numpy."""
    flat = np.asarray(flat, F32).reshape(-1)
    full = flat.size - flat.size % block
    blocks = flat[:full].reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1) if full else np.zeros(0, F32)
    recip = F32(1) / np.maximum(absmax, F32(1e-38))
    scaled = np.clip(blocks * recip[:, None], -1, 1).reshape(-1)
    if flat.size % block:  # a partial last block: a true division, and its stored absmax is clamped too
        tail = max(np.abs(flat[full:]).max(), F32(1e-38))
        scaled = np.concatenate([scaled, np.clip(flat[full:] / tail, -1, 1)])
        absmax = np.append(absmax, tail).astype(F32)
    return np.searchsorted(F32_MIDS, scaled, side="left").astype(np.uint8), absmax


def _bnb_cpu_blockwise8(values: np.ndarray, code: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes 0.50's CPU 8-bit ``quantize_blockwise`` (libbitsandbytes_cpu): not the nearest code, but a
    65536-bin lookup table over [-1, 1] built from the float32 midpoints."""
    code = code.astype(F32)
    mids = F32(0.5) * (code[:-1] + code[1:])
    grid = F32(-1) + (F32(2) * np.arange(65536, dtype=F32)) / F32(65535)
    lut = np.searchsorted(mids, grid, side="left").astype(np.uint8)
    values = np.asarray(values, F32).reshape(-1)
    out = np.zeros(values.size, np.uint8)
    absmax = np.zeros(-(-values.size // block), F32)
    for b in range(absmax.size):
        part = values[b * block:(b + 1) * block]
        absmax[b] = np.abs(part).max()
        if absmax[b] == 0:
            continue
        scaled = np.clip(part * (F32(1) / absmax[b]), -1, 1)
        index = ((scaled + F32(1)) * F32(0.5)).astype(np.float64) * 65535 + 0.5  # an FMA in the C++
        out[b * block:(b + 1) * block] = lut[index.astype(F32).astype(np.uint16)]
    return out, absmax


def _near_midpoint(w_t: np.ndarray, absmax: np.ndarray, block: int) -> np.ndarray:
    """Where ``w / absmax`` lies within 4 float32 ulps of a midpoint (where float32 and float64 may disagree)."""
    flat = w_t.reshape(-1).astype(np.float64)
    normed = flat / np.repeat(absmax.astype(np.float64), block)[:flat.size]
    gap = np.abs(normed[:, None] - EXACT_MIDS[None, :]).min(axis=1)
    return (gap <= 4 * 2.0 ** -24).reshape(w_t.shape)


def test_codebook_and_midpoints_are_bnbs() -> None:
    bnb_book = bnbf.get_4bit_type("nf4", device="cpu").numpy()
    assert np.array_equal(bnb_book.view(np.uint32), BOOK.view(np.uint32))
    assert np.flatnonzero(F32_MIDS.astype(np.float64) > EXACT_MIDS).tolist() == ROUNDED_UP


@pytest.mark.parametrize("shape", [(64, 32), (128, 256), (96, 40), (33, 7), (576, 192)])
@pytest.mark.parametrize("block", [32, 64, 128, 256, 1024])
def test_random_weights_match(shape: tuple[int, int], block: int) -> None:
    rng = np.random.default_rng(shape[0] * 10007 + shape[1] * 101 + block)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3)).astype(F32)  # W [K, N] as MatMulBnb4 sees it
    codes, absmax = quantize_nf4(w, block)
    b_codes, b_absmax, b_packed = _bnb(w.T, block)
    assert np.array_equal(absmax.view(np.uint32), b_absmax.view(np.uint32))
    differ = codes != b_codes
    assert not (differ & ~_near_midpoint(w.T, absmax, block)).any()
    assert np.abs(codes.astype(int) - b_codes)[differ].tolist() == [1] * int(differ.sum())
    bnb_layout = packing.pack_bnb4(b_codes)  # bnb's bytes are pack_bnb4 of its codes [N, K]
    if w.size % 2:  # except the pad nibble of an odd count: bnb writes code 7, pack_bnb4 0
        bnb_layout[-1] |= 7
    assert np.array_equal(bnb_layout, b_packed)


def test_random_weights_differ_about_once_in_two_million() -> None:
    rng = np.random.default_rng(0)
    differ = 0
    for _ in range(4):
        w = (rng.standard_normal((576, 576)) * 0.05).astype(F32)
        differ += int((quantize_nf4(w, 64)[0] != _bnb(w.T, 64)[0]).sum())
    assert differ <= 6  # 1327104 codes; seed 0 gives 0 or 1 here, 3 in 6.6M over 20 seeds


def test_values_on_the_midpoints() -> None:
    for scale in (1.0, 3.0, 0.0123):
        s = F32(scale)
        row = np.concatenate([[s], F32_MIDS * s, np.zeros(48, F32)]).astype(F32)
        codes = quantize_nf4(row[:, None], 64)[0][0, 1:16]
        b_codes = _bnb(row[None, :], 64)[0][0, 1:16]
        if scale == 1.0:  # x / absmax is exactly the float32 midpoint: a tie
            assert b_codes.tolist() == list(range(15))  # bnb: the lower code
            assert np.flatnonzero(codes != b_codes).tolist() == ROUNDED_UP  # qcompiler: the nearer one
        assert (np.abs(codes.astype(int) - b_codes) <= 1).all()  # elsewhere bnb's x * (1 / absmax) rounds either way
    nudged = np.concatenate([[F32(1)], np.nextafter(F32_MIDS, F32(2)), np.zeros(48, F32)]).astype(F32)
    assert np.array_equal(quantize_nf4(nudged[:, None], 64)[0][0], _bnb(nudged[None, :], 64)[0][0])


def test_zero_blocks_and_tiny_magnitudes() -> None:
    w_t = np.zeros((3, 64), F32)
    w_t[2, :6] = [0.5, -0.25, 0, 0, 0, 0]
    codes, absmax = quantize_nf4(w_t.T, 64)
    b_codes, b_absmax, _ = _bnb(w_t.reshape(1, -1)[:, :134], 64)  # 2 full zero blocks + a partial tail of 6
    assert np.array_equal(codes.reshape(-1)[:134], b_codes.reshape(-1))
    assert absmax[:2].tolist() == [1.0, 1.0] and b_absmax[:2].tolist() == [0.0, 0.0]
    tail_codes, tail_absmax = quantize_nf4(np.zeros((6, 1), F32), 64)
    assert tail_codes.tolist() == [[7] * 6] and tail_absmax.tolist() == [1.0]
    assert _bnb(np.zeros((1, 6), F32), 64)[1].tolist() == [F32(1e-38)]
    tiny = (np.random.default_rng(3).standard_normal((4, 64)) * 1e-39).astype(F32)  # subnormal block maxima
    codes, absmax = quantize_nf4(tiny.T, 64)
    b_codes, b_absmax, _ = _bnb(tiny, 64)
    assert np.array_equal(absmax, b_absmax) and (codes != b_codes).mean() > 0.5
    assert (np.abs(codes.astype(int) - 7) >= np.abs(b_codes.astype(int) - 7)).all()  # bnb's shrink to 0


def test_bf16_weights_and_dequantized_values() -> None:
    w16 = torch.randn(192, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)  # [N, K]
    q16, s16 = bnbf.quantize_4bit(w16, blocksize=64, quant_type="nf4")
    q32, s32 = bnbf.quantize_4bit(w16.float(), blocksize=64, quant_type="nf4")
    assert torch.equal(q16, q32) and torch.equal(s16.absmax, s32.absmax) and s16.absmax.dtype == torch.float32
    w = w16.float().numpy().T
    codes, absmax = quantize_nf4(w, 64)
    assert np.array_equal(packing.pack_bnb4(codes), q32.numpy().reshape(-1))
    # K % block == 0 here: bnb 0.50.2's AVX-512 CPU dequantize mis-indexes absmax when it is not (see the notes)
    deq = bnbf.dequantize_4bit(q32, s32).numpy()
    ours = packing.dequantize_bnb4(packing.pack_bnb4(codes), absmax, k=256, n=192, block_size=64)
    assert np.array_equal(deq.view(np.uint32), np.ascontiguousarray(ours.T).view(np.uint32))


def test_numpy_reference_is_bnb_bit_for_bit() -> None:
    rng = np.random.default_rng(5)
    for trial in range(40):
        block = [32, 64, 128, 256, 512, 1024, 2048, 4096][trial % 8]
        n = int(rng.integers(1, 5000))
        x = rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 6)
        if trial % 4 == 1:  # values on the float32 midpoints of a scaled block
            s = F32(rng.uniform(0.01, 100))
            x = F32_MIDS[rng.integers(0, 15, n)] * s
            x[::block] = s
        if trial % 4 == 2:
            x[rng.random(n) < 0.5] = 0
        x = x.astype(F32)
        codes, absmax = _bnb_cpu_nf4(x, block)
        b_codes, b_absmax, _ = _bnb(x[None, :], block)
        assert np.array_equal(codes, b_codes[0]) and np.array_equal(absmax.view(np.uint32), b_absmax.view(np.uint32))


def test_double_quantization_state() -> None:
    """bnb's ``compress_statistics=True``: absmax - mean(absmax), 8-bit dynamic codes in blocks of 256."""
    w = torch.randn(1024, 576, generator=torch.Generator().manual_seed(2)) * 0.05
    q, single = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    q2, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(q, q2)  # the 4-bit codes use the exact absmax either way
    assert state.nested and state.absmax.dtype == torch.uint8 and state.absmax.shape == single.absmax.shape
    assert state.offset.dtype == torch.float32 and state.offset.ndim == 0
    assert state.offset == single.absmax.mean()
    s2 = state.state2
    assert s2.blocksize == 256 and s2.absmax.dtype == torch.float32 and s2.absmax.numel() == 36
    dynamic = bnbf.create_dynamic_map().numpy()
    assert np.array_equal(s2.code.numpy(), dynamic) and dynamic.size == 256
    codes, absmax2 = _bnb_cpu_blockwise8((single.absmax - state.offset).numpy(), dynamic, 256)
    assert np.array_equal(codes, state.absmax.numpy()) and np.array_equal(absmax2, s2.absmax.numpy())
    # the absmax dequantize_4bit uses: code[q] * absmax2 in float32, then + offset in float32
    stored = dynamic[codes] * np.repeat(absmax2, 256)[:codes.size] + state.offset.numpy()
    expected = stored.astype(F32)[:, None] * BOOK[np.stack([q.numpy().reshape(-1) >> 4,
                                                            q.numpy().reshape(-1) & 15], 1).reshape(-1, 64)]
    deq = bnbf.dequantize_4bit(q2, state).numpy()
    assert np.array_equal(deq.reshape(-1).view(np.uint32), expected.astype(F32).reshape(-1).view(np.uint32))
    assert np.abs(stored / single.absmax.numpy() - 1).max() < 0.02  # what the second quantization costs
