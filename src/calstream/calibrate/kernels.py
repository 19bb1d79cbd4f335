"""JUNGFRAU correction kernels in Numba.

Same results as :mod:`calstream.calibrate.reference` (data to float32 rounding, gain and mask
exactly), shaped for speed:

- the gain code stays in the input's integer width (uint16 bits 14-15, or the uint8 gain
  array); the ADC value is the low 14 bits,
- the three gain stages' constants are all loaded, then picked with selects, so the inner loops
  have no branches and vectorise (AVX2/AVX-512 with ``-march=native``-like LLVM targets),
- the bad-pixel decision is folded into ``inv_gain`` (0 for a bad (cell, gain, pixel)), so the
  corrected value is ``(adc - offset) * inv_gain + 0.0`` with no test on the mask (``+ 0.0``
  turns the -0.0 of a bad pixel into +0.0),
- each frame is processed in blocks of ``BLOCK`` pixels, in three passes (data, gain, mask)
  that each write one output: with one output per loop LLVM needs few runtime alias checks and
  vectorises; the block stays in L1 between passes,
- a block whose pixels are all in G0 (the common case: most pixels see no or few photons)
  takes a short path that reads only the G0 tables. With 16 memory cells the constants
  (300 MB) do not fit in any cache and the kernel is bound by memory traffic, so skipping the
  unused G1/G2 tables matters more than anything else (about 2x on simulated trains); the
  per-block test is one OR-reduction over the block's codes. The loops themselves stay
  branch-free; only the choice of loop per block depends on the data,
- when the outputs are 64-byte aligned (:meth:`JungfrauCorrector.empty_outputs
  <calstream.calibrate.detectors.JungfrauCorrector.empty_outputs>`), the G0 path writes with
  non-temporal stores (a small LLVM intrinsic): the 9 output bytes per pixel then bypass the
  cache instead of being read in first, about a third of the traffic of a 16-cell train.

Arrays must be C-contiguous. The public wrapper checks shapes and cell indices (cheap), since
the compiled loops do no bounds checks. The kernels release the GIL, so two threads working
on separate frames run in parallel.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = [
    "BLOCK",
    "check_kernel_args",
    "correct_jungfrau_numba",
    "make_g0_stream64",
    "store_fence",
    "warmup_numba",
]

#: Pixels per block: small enough that the G0-only test succeeds often, large enough to
#: amortise the per-block work.
BLOCK = 512

_WRONG_GAIN = np.uint32(1 << 21)  # BADPIX.WRONG_GAIN_VALUE
_ZERO = np.float32(0.0)
_ADC_MASK = np.uint16(0x3FFF)

_jit = njit(nogil=True, cache=True, fastmath=False, error_model="numpy")
_jit_inline = njit(nogil=True, cache=True, fastmath=False, error_model="numpy", inline="always")


# The loop helpers take whole-frame arrays plus (start, n) rather than slices: a slice is a
# new array that Numba reference-counts (two atomic operations each), which per 512-pixel
# block cost as much as the arithmetic and made two threads contend for one cache line.


@_jit_inline
def _or_codes(codes, start, n):
    """OR of ``codes[start:start + n]``: its bits above the shift say whether any pixel is not
    in G0."""
    acc = codes[start] & 0
    for j in range(n):
        acc |= codes[start + j]
    return acc


@_jit_inline
def _data_g0(adc, offset, inv_gain, out, start, n):
    for j in range(n):
        k = start + j
        out[k] = (np.float32(adc[k] & _ADC_MASK) - offset[k]) * inv_gain[k] + _ZERO


@_jit_inline
def _fill(out, value, start, n):
    for j in range(n):
        out[start + j] = value


@_jit_inline
def _copy(src, out, start, n):
    for j in range(n):
        out[start + j] = src[start + j]


@_jit_inline
def _data_all(adc, codes, shift, o0, o1, o2, i0, i1, i2, out, start, n):
    for j in range(n):
        k = start + j
        code = codes[k] >> shift
        is1 = code == 1
        is3 = code == 3
        valid = (code == 0) | is1 | is3
        x0 = o0[k]
        x1 = o1[k]
        x2 = o2[k]
        y0 = i0[k]
        y1 = i1[k]
        y2 = i2[k]
        off = x1 if is1 else x0
        off = x2 if is3 else off
        inv = y1 if is1 else y0
        inv = y2 if is3 else inv
        inv = inv if valid else _ZERO
        out[k] = (np.float32(adc[k] & _ADC_MASK) - off) * inv + _ZERO


@_jit_inline
def _gain_all(codes, shift, out, start, n):
    for j in range(n):
        k = start + j
        code = codes[k] >> shift
        valid = (code == 0) | (code == 1) | (code == 3)
        stage = code ^ (code >> 1)  # 0 -> 0, 1 -> 1, 3 -> 2
        out[k] = np.uint8(stage if valid else 3)


@_jit_inline
def _mask_all(codes, shift, b0, b1, b2, out, start, n):
    for j in range(n):
        k = start + j
        code = codes[k] >> shift
        is1 = code == 1
        is3 = code == 3
        valid = (code == 0) | is1 | is3
        x0 = b0[k]
        x1 = b1[k]
        x2 = b2[k]
        bad = x1 if is1 else x0
        bad = x2 if is3 else bad
        out[k] = bad if valid else _WRONG_GAIN


_LANES = 16  # pixels per vector operation
_STREAM = 64  # pixels per streamed step: one 64-byte cache line of gain


def make_g0_stream64(adc_mask: int, table_index: bool = False):
    """An intrinsic ``(adc, offset, factor, badpix, out_data, out_gain, out_mask, k)`` doing
    the G0 correction ``((adc & adc_mask) - offset) * factor + 0.0`` of pixels ``k:k+64``
    with non-temporal stores (gain 0, mask = badpix); shared by the detectors' kernels.

    The outputs must be 64-byte aligned at ``k``. Written as 16-lane vectors, which LLVM maps
    onto what the CPU has (one AVX-512 or two AVX2 registers each). With ``table_index`` the
    intrinsic takes a ninth argument, the index into ``offset``, ``factor`` and ``badpix``
    (frames flattened into one row while the tables stay one frame long).
    """
    if table_index:

        @intrinsic
        def g0_stream64_2(typingctx, adc, offset, inv_gain, badpix, out_data, out_gain,
                          out_mask, k, kt):  # fmt: skip
            return _g0_stream64_typed(adc, offset, inv_gain, badpix, out_data, out_gain,
                                      out_mask, k, adc_mask, kt)  # fmt: skip

        return g0_stream64_2

    @intrinsic
    def g0_stream64(typingctx, adc, offset, inv_gain, badpix, out_data, out_gain, out_mask, k):
        return _g0_stream64_typed(adc, offset, inv_gain, badpix, out_data, out_gain, out_mask, k,
                                  adc_mask)  # fmt: skip

    return g0_stream64


def _g0_stream64_typed(adc, offset, inv_gain, badpix, out_data, out_gain, out_mask, k, adc_mask,
                       kt=None):  # fmt: skip
    """Signature and code generator of :func:`make_g0_stream64`'s intrinsic."""
    extra = () if kt is None else (kt,)
    sig = types.void(adc, offset, inv_gain, badpix, out_data, out_gain, out_mask, k, *extra)
    tables = (1, 2, 3)  # offset, factor, badpix: indexed by kt when given

    def codegen(context, builder, signature, args):
        i8, i16, i32, f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
        nontemporal = builder.module.add_metadata([i32(1)])
        data_ptrs = [
            context.make_array(signature.args[i])(context, builder, args[i]).data for i in range(7)
        ]

        def vector_ptr(i: int, elem: ir.Type, lanes: int, offset: int) -> ir.Value:
            base = args[8] if (extra and i in tables) else args[7]
            index = builder.add(base, ir.Constant(base.type, offset))
            ptr = builder.gep(data_ptrs[i], [index])
            return builder.bitcast(ptr, ir.PointerType(ir.VectorType(elem, lanes)))

        def splat(elem: ir.Type, value: float | int, lanes: int = _LANES) -> ir.Constant:
            return ir.Constant(ir.VectorType(elem, lanes), [value] * lanes)

        def stream(value: ir.Value, ptr: ir.Value) -> None:
            builder.store(value, ptr, align=64).set_metadata("nontemporal", nontemporal)

        for j in range(0, _STREAM, _LANES):
            raw = builder.load(vector_ptr(0, i16, _LANES, j), align=2)
            value = builder.uitofp(
                builder.and_(raw, splat(i16, adc_mask)), ir.VectorType(f32, _LANES)
            )
            value = builder.fsub(value, builder.load(vector_ptr(1, f32, _LANES, j), align=4))
            value = builder.fmul(value, builder.load(vector_ptr(2, f32, _LANES, j), align=4))
            stream(builder.fadd(value, splat(f32, 0.0)), vector_ptr(4, f32, _LANES, j))
            stream(
                builder.load(vector_ptr(3, i32, _LANES, j), align=4), vector_ptr(6, i32, _LANES, j)
            )
        stream(splat(i8, 0, _STREAM), vector_ptr(5, i8, _STREAM, 0))
        return context.get_dummy_value()

    return sig, codegen


_g0_stream64 = make_g0_stream64(0x3FFF)


@intrinsic
def _store_fence(typingctx):
    """A full memory fence: orders the non-temporal stores before anything after the call."""

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@_jit_inline
def _frame(adc, codes, shift, off, inv, bad, out_data, out_gain, out_mask):
    """Correct one frame (all arrays flattened to pixels; constants (3, npix))."""
    npix = adc.shape[0]
    # Blocks start at multiples of BLOCK pixels, so aligned frame outputs give aligned blocks.
    stream = (out_data.ctypes.data | out_gain.ctypes.data | out_mask.ctypes.data) % 64 == 0
    o0, o1, o2 = off[0], off[1], off[2]
    i0, i1, i2 = inv[0], inv[1], inv[2]
    b0, b1, b2 = bad[0], bad[1], bad[2]
    for block_start in range(0, npix, BLOCK):
        block_n = min(BLOCK, npix - block_start)
        # unsigned indices: Numba then skips the negative-index wraparound, which would
        # otherwise stop LLVM from vectorising the loops
        start = np.uint64(block_start)
        n = np.uint64(block_n)
        if _or_codes(codes, start, n) >> shift == 0:
            # Every pixel in G0: read only the G0 tables.
            if stream and block_n % _STREAM == 0:
                for k in range(block_start, block_start + block_n, _STREAM):
                    _g0_stream64(adc, o0, i0, b0, out_data, out_gain, out_mask, k)
            else:
                _data_g0(adc, o0, i0, out_data, start, n)
                _fill(out_gain, np.uint8(0), start, n)
                _copy(b0, out_mask, start, n)
        else:
            _data_all(adc, codes, shift, o0, o1, o2, i0, i1, i2, out_data, start, n)
            _gain_all(codes, shift, out_gain, start, n)
            _mask_all(codes, shift, b0, b1, b2, out_mask, start, n)


@_jit
def _correct_bits(adc, cell, offset, inv_gain, badpix, out_data, out_gain, out_mask):
    n = adc.shape[0]
    npix = adc.shape[1] * adc.shape[2]
    ncells = offset.shape[0]
    adc2 = adc.reshape(n, npix)
    off = offset.reshape(ncells, 3, npix)
    inv = inv_gain.reshape(ncells, 3, npix)
    bad = badpix.reshape(ncells, 3, npix)
    d2 = out_data.reshape(n, npix)
    g2 = out_gain.reshape(n, npix)
    m2 = out_mask.reshape(n, npix)
    shift = np.uint16(14)
    for f in range(n):
        c = cell[f]
        _frame(adc2[f], adc2[f], shift, off[c], inv[c], bad[c], d2[f], g2[f], m2[f])
    _store_fence()


@_jit
def _correct_array(adc, gain, cell, offset, inv_gain, badpix, out_data, out_gain, out_mask):
    n = adc.shape[0]
    npix = adc.shape[1] * adc.shape[2]
    ncells = offset.shape[0]
    adc2 = adc.reshape(n, npix)
    gain2 = gain.reshape(n, npix)
    off = offset.reshape(ncells, 3, npix)
    inv = inv_gain.reshape(ncells, 3, npix)
    bad = badpix.reshape(ncells, 3, npix)
    d2 = out_data.reshape(n, npix)
    g2 = out_gain.reshape(n, npix)
    m2 = out_mask.reshape(n, npix)
    shift = np.uint8(0)
    for f in range(n):
        c = cell[f]
        _frame(adc2[f], gain2[f], shift, off[c], inv[c], bad[c], d2[f], g2[f], m2[f])
    _store_fence()


def _readonly(arr: np.ndarray) -> np.ndarray:
    """A read-only view, so one compiled specialisation serves writable and read-only input."""
    if arr.flags.writeable:
        arr = arr.view()
        arr.flags.writeable = False
    return arr


def check_kernel_args(
    adc: np.ndarray,
    gain: np.ndarray | None,
    cell: np.ndarray,
    offset: np.ndarray,
    inv_gain: np.ndarray,
    badpix: np.ndarray,
    out_data: np.ndarray,
    out_gain: np.ndarray,
    out_mask: np.ndarray,
) -> None:
    """Cheap checks that keep the unchecked loops inside their arrays (``ValueError``)."""
    frame = adc.shape
    if adc.ndim != 3:
        raise ValueError(f"adc: expected 3 dimensions (frames, ss, fs), found shape {frame}")
    table = (offset.shape[0], 3, *frame[1:])
    arrays = {"out_data": out_data, "out_gain": out_gain, "out_mask": out_mask}
    if gain is not None:
        arrays["gain"] = gain
    for name, arr in arrays.items():
        if arr.shape != frame:
            raise ValueError(f"{name}: expected shape {frame}, found {arr.shape}")
    for name, arr in (("offset", offset), ("inv_gain", inv_gain), ("badpix", badpix)):
        if arr.shape != table:
            raise ValueError(f"{name}: expected shape {table}, found {arr.shape}")
    if cell.shape != frame[:1]:
        raise ValueError(f"cell: expected shape {frame[:1]}, found {cell.shape}")
    if cell.size and (cell.min() < 0 or cell.max() >= table[0]):
        raise ValueError(
            f"cell: values must lie in [0, {table[0]}), found {cell.min()}..{cell.max()}"
        )


def correct_jungfrau_numba(
    adc: np.ndarray,
    gain: np.ndarray | None,
    cell: np.ndarray,
    offset: np.ndarray,
    inv_gain: np.ndarray,
    badpix: np.ndarray,
    out_data: np.ndarray,
    out_gain: np.ndarray,
    out_mask: np.ndarray,
) -> None:
    """Correct JUNGFRAU frames into caller-owned outputs (Numba, releases the GIL).

    Parameters
    ----------
    adc
        uint16 (n, ss, fs), C-contiguous.
    gain
        uint8 (n, ss, fs) gain codes, or ``None`` when the codes are bits 14-15 of ``adc``.
    cell
        (n,) integer: constants cell of each frame, each in ``range(offset.shape[0])``.
    offset, inv_gain, badpix
        Kernel-layout tables (cells, 3, ss, fs): float32, float32, uint32, C-contiguous.
    out_data, out_gain, out_mask
        float32 / uint8 / uint32 (n, ss, fs), C-contiguous, overwritten.

    Raises
    ------
    ValueError
        Shapes that do not fit together or a cell index out of range.
    """
    cell = np.asarray(cell, dtype=np.intp)
    check_kernel_args(adc, gain, cell, offset, inv_gain, badpix, out_data, out_gain, out_mask)
    tables = (_readonly(offset), _readonly(inv_gain), _readonly(badpix))
    outs = (out_data, out_gain, out_mask)
    if gain is None:
        _correct_bits(_readonly(adc), _readonly(cell), *tables, *outs)
    else:
        _correct_array(_readonly(adc), _readonly(gain), _readonly(cell), *tables, *outs)


def warmup_numba() -> None:
    """Compile (or load from Numba's cache) both gain modes before the first train."""
    shape = (1, 2, 8)
    adc = np.zeros(shape, np.uint16)
    gain = np.zeros(shape, np.uint8)
    cell = np.zeros(1, np.intp)
    offset = np.zeros((1, 3, 2, 8), np.float32)
    inv = np.ones((1, 3, 2, 8), np.float32)
    badpix = np.zeros((1, 3, 2, 8), np.uint32)
    outs = (np.empty(shape, np.float32), np.empty(shape, np.uint8), np.empty(shape, np.uint32))
    correct_jungfrau_numba(adc, None, cell, offset, inv, badpix, *outs)
    correct_jungfrau_numba(adc, gain, cell, offset, inv, badpix, *outs)


store_fence = _store_fence
