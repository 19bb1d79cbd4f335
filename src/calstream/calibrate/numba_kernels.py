"""AGIPD, LPD and ePix100 kernels, common mode and photon conversion in Numba.

(JUNGFRAU's tuned kernel is in :mod:`calstream.calibrate.kernels`.) Same results as
:mod:`calstream.calibrate.reference`: data to float32 rounding, gain and mask exactly.

All kernels take caller-owned outputs, allocate nothing, release the GIL and do no bounds
checks: the wrappers check shapes and cell indices first (:func:`check_tables`). Frames are
flat pixel rows (n, npix); raw input is (n, planes, npix) with a plane index, so AGIPD's
file layout (frames, 2, ss, fs) and its online layout (separate analog and gain arrays) both
reach the loops as contiguous rows without a copy. The gain stage is picked with selects over
all three stages' tables, and the bad-pixel decision is already folded into ``factor``
(0 for a bad entry), so the loops have no data-dependent branches.

Common mode (:func:`common_mode_asics_numba`, :func:`common_mode_lines_numba`) works in place
on corrected data: per block, the median of the pixels that are good (mask 0), in the chosen
gain stage and below a threshold (photon hits excluded) is subtracted from the good pixels of
that stage; a block with no such pixel is left alone. The median comes from a quickselect in a
caller-owned scratch buffer.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from calstream.calibrate.kernels import make_g0_stream64, store_fence

__all__ = [
    "check_blocks",
    "check_common_mode",
    "check_tables",
    "common_mode_asics_numba",
    "common_mode_lines_numba",
    "correct_agipd_numba",
    "correct_epix100_numba",
    "correct_lpd_numba",
    "photons_numba",
    "prepare_agipd",
    "prepare_epix100",
    "prepare_lpd",
    "prepare_photons",
    "scratch_size",
    "warmup_numba_more",
]

_jit = njit(nogil=True, cache=True, fastmath=False, error_model="numpy")
_inline = njit(nogil=True, cache=True, fastmath=False, error_model="numpy", inline="always")

_WRONG_GAIN = np.uint32(1 << 21)
_COLS = 16  # columns per step of the column common mode: one cache line of float32
_ZERO = np.float32(0.0)
_HALF = np.float32(0.5)


#: Pixels per block: a block whose pixels are all in G0 (most of them, in most frames) reads
#: only the G0 tables, a third of the constants' memory traffic, which bounds these kernels
#: when the per-cell tables do not fit in cache (as in JUNGFRAU's kernel).
BLOCK = 512
_STREAM = 64  # pixels per non-temporal step

# G0 blocks with non-temporal stores when the outputs are 64-byte aligned: the 9 output bytes
# per pixel then bypass the cache instead of being read in first.
_g0_stream_agipd = make_g0_stream64(0xFFFF)
_g0_stream_lpd = make_g0_stream64(0x0FFF)
_g0_stream_frames = make_g0_stream64(0xFFFF, table_index=True)  # ePix100: frames x one table

# Loops take whole rows plus unsigned (start, n): slices would be reference-counted per block,
# and signed indices make Numba emit wraparound checks that stop LLVM from vectorising.


@_inline
def _fill_u8(out, start, n):
    for j in range(n):
        out[start + j] = np.uint8(0)


@_inline
def _copy_u32(src, out, start, n):
    for j in range(n):
        out[start + j] = src[start + j]


@_inline
def _any_above(d, t0, start, n):
    acc = False
    for j in range(n):
        acc |= np.float32(d[start + j]) > t0[start + j]
    return acc


@_inline
def _agipd_g0(a, o0, f0, out_d, start, n):
    for j in range(n):
        k = start + j
        out_d[k] = (np.float32(a[k]) - o0[k]) * f0[k] + _ZERO


@_inline
def _agipd_data(a, d, t0, t1, o0, o1, o2, f0, f1, f2, out_d, start, n):
    for j in range(n):
        k = start + j
        dv = np.float32(d[k])
        hi1 = dv > t0[k]
        is2 = dv > t1[k]
        x0 = o0[k]
        x1 = o1[k]
        x2 = o2[k]
        y0 = f0[k]
        y1 = f1[k]
        y2 = f2[k]
        off = x1 if hi1 else x0
        off = x2 if is2 else off
        fac = y1 if hi1 else y0
        fac = y2 if is2 else fac
        out_d[k] = (np.float32(a[k]) - off) * fac + _ZERO


@_inline
def _agipd_gain(d, t0, t1, out_g, start, n):
    for j in range(n):
        k = start + j
        dv = np.float32(d[k])
        out_g[k] = np.uint8(dv > t0[k]) + np.uint8(dv > t1[k]) * np.uint8(2) - np.uint8(
            (dv > t0[k]) & (dv > t1[k])
        )


@_inline
def _agipd_mask(d, t0, t1, b0, b1, b2, out_m, start, n):
    for j in range(n):
        k = start + j
        dv = np.float32(d[k])
        hi1 = dv > t0[k]
        is2 = dv > t1[k]
        x0 = b0[k]
        x1 = b1[k]
        x2 = b2[k]
        bad = x1 if hi1 else x0
        out_m[k] = x2 if is2 else bad


@_inline
def _agipd_frame(a, d, t0, t1, o0, o1, o2, f0, f1, f2, b0, b1, b2, out_d, out_g, out_m):
    npix = a.shape[0]
    stream = (out_d.ctypes.data | out_g.ctypes.data | out_m.ctypes.data) % 64 == 0
    for block_start in range(0, npix, BLOCK):
        block_n = min(BLOCK, npix - block_start)
        start = np.uint64(block_start)
        n = np.uint64(block_n)
        if not _any_above(d, t0, start, n):
            if stream and block_n % _STREAM == 0:
                for k in range(block_start, block_start + block_n, _STREAM):
                    _g0_stream_agipd(a, o0, f0, b0, out_d, out_g, out_m, k)
                continue
            _agipd_g0(a, o0, f0, out_d, start, n)
            _fill_u8(out_g, start, n)
            _copy_u32(b0, out_m, start, n)
        else:
            _agipd_data(a, d, t0, t1, o0, o1, o2, f0, f1, f2, out_d, start, n)
            _agipd_gain(d, t0, t1, out_g, start, n)
            _agipd_mask(d, t0, t1, b0, b1, b2, out_m, start, n)


@_jit
def _agipd(analog, ai, digital, di, cell, thr, off, fac, bad, out_d, out_g, out_m):
    for f in range(analog.shape[0]):
        c = cell[f]
        _agipd_frame(
            analog[f, ai], digital[f, di], thr[c, 0], thr[c, 1],
            off[c, 0], off[c, 1], off[c, 2], fac[c, 0], fac[c, 1], fac[c, 2],
            bad[c, 0], bad[c, 1], bad[c, 2], out_d[f], out_g[f], out_m[f],
        )  # fmt: skip
    store_fence()


_LPD_ADC = np.uint16(0xFFF)
_LPD_CODES = np.uint16(0x3000)


@_inline
def _or_codes(raw, start, n):
    acc = raw[start] & np.uint16(0)
    for j in range(n):
        acc |= raw[start + j]
    return acc & _LPD_CODES


@_inline
def _lpd_g0(raw, o0, f0, out_d, start, n):
    for j in range(n):
        k = start + j
        out_d[k] = (np.float32(raw[k] & _LPD_ADC) - o0[k]) * f0[k] + _ZERO


@_inline
def _lpd_data(raw, o0, o1, o2, f0, f1, f2, out_d, start, n):
    for j in range(n):
        k = start + j
        r = raw[k]
        code = (r >> np.uint16(12)) & np.uint16(3)
        is1 = code == 1
        is2 = code == 2
        x0 = o0[k]
        x1 = o1[k]
        x2 = o2[k]
        y0 = f0[k]
        y1 = f1[k]
        y2 = f2[k]
        off = x1 if is1 else x0
        off = x2 if is2 else off
        fac = y1 if is1 else y0
        fac = y2 if is2 else fac
        fac = _ZERO if code == 3 else fac
        out_d[k] = (np.float32(r & _LPD_ADC) - off) * fac + _ZERO


@_inline
def _lpd_gain(raw, out_g, start, n):
    for j in range(n):
        k = start + j
        out_g[k] = np.uint8((raw[k] >> np.uint16(12)) & np.uint16(3))


@_inline
def _lpd_mask(raw, b0, b1, b2, out_m, start, n):
    for j in range(n):
        k = start + j
        code = (raw[k] >> np.uint16(12)) & np.uint16(3)
        x0 = b0[k]
        x1 = b1[k]
        x2 = b2[k]
        bad = x1 if code == 1 else x0
        bad = x2 if code == 2 else bad
        out_m[k] = _WRONG_GAIN if code == 3 else bad


@_inline
def _lpd_frame(raw, o0, o1, o2, f0, f1, f2, b0, b1, b2, out_d, out_g, out_m):
    npix = raw.shape[0]
    stream = (out_d.ctypes.data | out_g.ctypes.data | out_m.ctypes.data) % 64 == 0
    for block_start in range(0, npix, BLOCK):
        block_n = min(BLOCK, npix - block_start)
        start = np.uint64(block_start)
        n = np.uint64(block_n)
        if _or_codes(raw, start, n) == 0:
            if stream and block_n % _STREAM == 0:
                for k in range(block_start, block_start + block_n, _STREAM):
                    _g0_stream_lpd(raw, o0, f0, b0, out_d, out_g, out_m, k)
                continue
            _lpd_g0(raw, o0, f0, out_d, start, n)
            _fill_u8(out_g, start, n)
            _copy_u32(b0, out_m, start, n)
        else:
            _lpd_data(raw, o0, o1, o2, f0, f1, f2, out_d, start, n)
            _lpd_gain(raw, out_g, start, n)
            _lpd_mask(raw, b0, b1, b2, out_m, start, n)


@_jit
def _lpd(raw, ri, cell, off, fac, bad, out_d, out_g, out_m):
    for f in range(raw.shape[0]):
        c = cell[f]
        _lpd_frame(
            raw[f, ri], off[c, 0], off[c, 1], off[c, 2], fac[c, 0], fac[c, 1], fac[c, 2],
            bad[c, 0], bad[c, 1], bad[c, 2], out_d[f], out_g[f], out_m[f],
        )  # fmt: skip
    store_fence()


# -- median and common mode ------------------------------------------------------------------


@_inline
def _select(buf, n, k):
    """Partially sort ``buf[:n]`` so that ``buf[k]`` is its k-th smallest; returns it."""
    lo = 0
    hi = n - 1
    while hi > lo:
        mid = (lo + hi) >> 1
        # median of three as pivot, moved to buf[hi]
        if buf[mid] < buf[lo]:
            buf[mid], buf[lo] = buf[lo], buf[mid]
        if buf[hi] < buf[lo]:
            buf[hi], buf[lo] = buf[lo], buf[hi]
        if buf[mid] < buf[hi]:
            buf[mid], buf[hi] = buf[hi], buf[mid]
        pivot = buf[hi]
        store = lo
        for i in range(lo, hi):  # branch-free Lomuto: always swap, advance if smaller
            x = buf[i]
            buf[i] = buf[store]
            buf[store] = x
            store += x < pivot
        buf[store], buf[hi] = buf[hi], buf[store]
        if store == k:
            return buf[k]
        if store < k:
            lo = store + 1
        else:
            hi = store - 1
    return buf[k]


@_inline
def _median(buf, n):
    """Median of ``buf[:n]`` (n > 0), as NumPy: the mean of the two middle values for even n."""
    k = n >> 1
    upper = _select(buf, n, k)
    if n & 1:
        return upper
    lower = buf[0]
    for i in range(1, k):  # after the selection, buf[:k] holds the k smallest
        if buf[i] > lower:
            lower = buf[i]
    return (lower + upper) * _HALF


@_jit
def _cm_asics(data, gain, mask, fs, bss, bfs, stage, threshold, scratch):
    n = data.shape[0]
    npix = data.shape[1]
    ss = npix // fs
    for f in range(n):
        d = data[f]
        g = gain[f]
        m = mask[f]
        for r0 in range(0, ss, bss):
            for c0 in range(0, fs, bfs):
                count = 0
                for r in range(r0, r0 + bss):
                    row = r * fs
                    for c in range(c0, c0 + bfs):
                        k = row + c
                        v = d[k]
                        scratch[count] = v  # branch-free gather: keep it by counting it
                        count += (m[k] == 0) & (g[k] == stage) & (v < threshold)
                if count == 0:
                    continue
                med = _median(scratch, count)
                for r in range(r0, r0 + bss):
                    row = r * fs
                    for c in range(c0, c0 + bfs):
                        k = row + c
                        if m[k] == 0 and g[k] == stage:
                            d[k] = d[k] - med


@_jit
def _cm_lines(data, mask, fs, bss, bfs, threshold, scratch):
    n = data.shape[0]
    npix = data.shape[1]
    ss = npix // fs
    for f in range(n):
        d = data[f]
        m = mask[f]
        for r0 in range(0, ss, bss):
            for c0 in range(0, fs, bfs):
                for r in range(r0, r0 + bss):  # rows of this ASIC
                    row = r * fs
                    count = 0
                    for c in range(c0, c0 + bfs):
                        v = d[row + c]
                        scratch[count] = v
                        count += (m[row + c] == 0) & (v < threshold)
                    if count:
                        med = _median(scratch, count)
                        for c in range(c0, c0 + bfs):
                            if m[row + c] == 0:
                                d[row + c] = d[row + c] - med
                # then its columns, _COLS at a time, so the strided walk down a column reads
                # whole cache lines: column j's values go to scratch[j * bss:], its count and
                # median to scratch[cols + j] and scratch[cols + _COLS + j]
                cols = _COLS * bss
                for cb in range(c0, c0 + bfs, _COLS):
                    w = min(_COLS, c0 + bfs - cb)
                    for j in range(w):
                        scratch[cols + j] = _ZERO
                    for r in range(r0, r0 + bss):
                        row = r * fs + cb
                        for j in range(w):
                            v = d[row + j]
                            count = np.int64(scratch[cols + j])
                            scratch[j * bss + count] = v
                            keep = (m[row + j] == 0) & (v < threshold)
                            scratch[cols + j] = np.float32(count + keep)
                    for j in range(w):
                        count = np.int64(scratch[cols + j])
                        med = _median(scratch[j * bss :], count) if count else _ZERO
                        scratch[cols + _COLS + j] = med
                    for r in range(r0, r0 + bss):
                        row = r * fs + cb
                        for j in range(w):
                            if m[row + j] == 0:
                                d[row + j] = d[row + j] - scratch[cols + _COLS + j]


@_jit
def _epix_offset(raw, off, bad, out_d, out_g, out_m):
    for f in range(raw.shape[0]):
        r = raw[f]
        d = out_d[f]
        g = out_g[f]
        m = out_m[f]
        for k in range(r.shape[0]):
            b = bad[k]
            v = np.float32(r[k]) - off[k]
            d[k] = v if b == 0 else _ZERO
            g[k] = np.uint8(0)
            m[k] = b


@_jit
def _epix_fused(raw, off, fac, bad, out_d, out_g, out_m):
    """No common mode: one pass, frames interleaved per block of pixels so that each block of
    the one-cell tables is read from memory once per train rather than once per frame (12
    bytes of constants per 2-byte pixel would otherwise bound the kernel). The folded factor
    already zeroes bad pixels; aligned outputs take the streaming-store path."""
    n = raw.shape[0]
    npix = raw.shape[1]
    r1 = raw.reshape(n * npix)
    d1 = out_d.reshape(n * npix)
    g1 = out_g.reshape(n * npix)
    m1 = out_m.reshape(n * npix)
    stream = (d1.ctypes.data | g1.ctypes.data | m1.ctypes.data) % 64 == 0 and npix % 64 == 0
    for block_start in range(0, npix, BLOCK):
        block_n = min(BLOCK, npix - block_start)
        for f in range(n):
            base = f * npix
            if stream and block_n % _STREAM == 0:
                for k in range(block_start, block_start + block_n, _STREAM):
                    _g0_stream_frames(r1, off, fac, bad, d1, g1, m1, base + k, k)
                continue
            for k in range(block_start, block_start + block_n):
                d1[base + k] = (np.float32(r1[base + k]) - off[k]) * fac[k] + _ZERO
                g1[base + k] = np.uint8(0)
                m1[base + k] = bad[k]
    store_fence()


@_jit
def _scale(data, factor):
    for f in range(data.shape[0]):
        d = data[f]
        for k in range(d.shape[0]):
            d[k] = d[k] * factor[k] + _ZERO


@_jit
def _photons(data, mask, inv_energy, out):
    for f in range(data.shape[0]):
        d = data[f]
        m = mask[f]
        o = out[f]
        for k in range(d.shape[0]):
            x = np.rint(d[k] * inv_energy)
            x = min(max(x, np.float32(-32768.0)), np.float32(32767.0))
            x = x if x == x else _ZERO  # NaN -> 0
            o[k] = np.int16(x) if m[k] == 0 else np.int16(0)


# -- wrappers --------------------------------------------------------------------------------


def _rows(arr: np.ndarray, n: int) -> np.ndarray:
    """(n, ...) C-contiguous -> (n, npix) view (also for n = 0); read-only input stays a view."""
    return arr.reshape(n, int(np.prod(arr.shape[1:], dtype=np.int64)))


def _planes(arr: np.ndarray, n: int, npix: int) -> np.ndarray:
    """Raw (n, ss, fs) or (n, planes, ss, fs) -> (n, planes, npix) view."""
    return arr.reshape(n, 1 if arr.ndim == 3 else arr.shape[1], npix)


def _readonly(arr: np.ndarray) -> np.ndarray:
    if arr.flags.writeable:
        arr = arr.view()
        arr.flags.writeable = False
    return arr


def check_tables(
    frames: int,
    frame_shape: tuple[int, int],
    cell: np.ndarray,
    tables: dict[str, np.ndarray],
    outputs: dict[str, np.ndarray],
    gains: int,
) -> None:
    """Cheap checks that keep the unchecked loops inside their arrays (``ValueError``)."""
    shape = (frames, *frame_shape)
    for name, arr in outputs.items():
        if arr.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, found {arr.shape}")
        if not arr.flags.c_contiguous or not arr.flags.writeable:
            raise ValueError(f"{name}: must be C-contiguous and writable")
    ncells = None
    for name, arr in tables.items():
        want_g = 2 if name == "thresholds" else gains
        ncells = arr.shape[0] if ncells is None else ncells
        want = (ncells, want_g, *frame_shape)
        if arr.shape != want or not arr.flags.c_contiguous:
            raise ValueError(f"{name}: expected C-contiguous shape {want}, found {arr.shape}")
    if cell.shape != (frames,):
        raise ValueError(f"cell: expected shape ({frames},), found {cell.shape}")
    if frames and ncells is not None and (cell.min() < 0 or cell.max() >= ncells):
        raise ValueError(
            f"cell: values must lie in [0, {ncells}), found {cell.min()}..{cell.max()}"
        )


def _raw_check(raw: np.ndarray, plane: int, frame_shape: tuple[int, int], name: str) -> None:
    if raw.dtype != np.uint16 or not raw.flags.c_contiguous:
        raise ValueError(f"{name}: expected C-contiguous uint16, found {raw.dtype}")
    if raw.ndim == 3:
        ok = raw.shape[1:] == frame_shape and plane == 0
    else:
        ok = raw.ndim == 4 and raw.shape[2:] == frame_shape and 0 <= plane < raw.shape[1]
    if not ok:
        raise ValueError(
            f"{name}: shape {raw.shape} (plane {plane}) does not fit frames of {frame_shape}"
        )


def prepare_agipd(
    analog: np.ndarray,
    analog_plane: int,
    digital: np.ndarray,
    digital_plane: int,
    cell: np.ndarray,
    thresholds: np.ndarray,
    offset: np.ndarray,
    factor: np.ndarray,
    badpix: np.ndarray,
    out_data: np.ndarray,
    out_gain: np.ndarray,
    out_mask: np.ndarray,
) -> tuple:
    """Check AGIPD kernel arguments; return them as flat-pixel views for the loops."""
    n = analog.shape[0]
    fshape = out_data.shape[1:]
    _raw_check(analog, analog_plane, fshape, "analog")
    _raw_check(digital, digital_plane, fshape, "digital")
    if digital.shape[0] != n:
        raise ValueError(f"digital: expected {n} frames, found {digital.shape[0]}")
    cell = np.ascontiguousarray(cell, dtype=np.intp)
    tables = {"thresholds": thresholds, "offset": offset, "factor": factor, "badpix": badpix}
    outs = {"out_data": out_data, "out_gain": out_gain, "out_mask": out_mask}
    check_tables(n, fshape, cell, tables, outs, 3)
    npix = fshape[0] * fshape[1]
    c = thresholds.shape[0]
    return (
        _readonly(_planes(analog, n, npix)), analog_plane,
        _readonly(_planes(digital, n, npix)), digital_plane, _readonly(cell),
        *(_readonly(t.reshape(c, t.shape[1], npix)) for t in (thresholds, offset, factor, badpix)),
        _rows(out_data, n), _rows(out_gain, n), _rows(out_mask, n),
    )  # fmt: skip


def correct_agipd_numba(*args: np.ndarray | int) -> None:
    """Correct AGIPD frames into caller-owned outputs (Numba, releases the GIL).

    Arguments: ``analog, analog_plane, digital, digital_plane, cell, thresholds, offset,
    factor, badpix, out_data, out_gain, out_mask``. ``analog``/``digital``: uint16
    (n, ss, fs) with plane 0, or (n, planes, ss, fs) with a plane index (file layout: the same
    (n, 2, ss, fs) array with planes 0 and 1). Tables in kernel layout: thresholds
    (cells, 2, ss, fs), the others (cells, 3, ss, fs). Outputs (n, ss, fs).
    """
    _agipd(*prepare_agipd(*args))


def prepare_lpd(
    raw: np.ndarray,
    plane: int,
    cell: np.ndarray,
    offset: np.ndarray,
    factor: np.ndarray,
    badpix: np.ndarray,
    out_data: np.ndarray,
    out_gain: np.ndarray,
    out_mask: np.ndarray,
) -> tuple:
    """Check LPD kernel arguments; return them as flat-pixel views for the loops."""
    n = raw.shape[0]
    fshape = out_data.shape[1:]
    _raw_check(raw, plane, fshape, "raw")
    cell = np.ascontiguousarray(cell, dtype=np.intp)
    outs = {"out_data": out_data, "out_gain": out_gain, "out_mask": out_mask}
    check_tables(n, fshape, cell, {"offset": offset, "factor": factor, "badpix": badpix}, outs, 3)
    npix = fshape[0] * fshape[1]
    c = offset.shape[0]
    return (
        _readonly(_planes(raw, n, npix)), plane, _readonly(cell),
        *(_readonly(t.reshape(c, 3, npix)) for t in (offset, factor, badpix)),
        _rows(out_data, n), _rows(out_gain, n), _rows(out_mask, n),
    )  # fmt: skip


def correct_lpd_numba(*args: np.ndarray | int) -> None:
    """Correct LPD frames (gain in bits 12-13, 12-bit ADC) into caller-owned outputs.

    Arguments: ``raw, plane, cell, offset, factor, badpix, out_data, out_gain, out_mask``;
    ``raw`` uint16 (n, ss, fs) or (n, 1, ss, fs).
    """
    _lpd(*prepare_lpd(*args))


def prepare_epix100(
    raw: np.ndarray,
    offset: np.ndarray,
    factor: np.ndarray,
    badpix: np.ndarray,
    out_data: np.ndarray,
    out_gain: np.ndarray,
    out_mask: np.ndarray,
    common_mode: tuple[int, int] | None,
    scratch: np.ndarray,
) -> tuple:
    """Check ePix100 kernel arguments; return (raw, offset, factor, badpix) as flat views."""
    n = raw.shape[0]
    fshape = out_data.shape[1:]
    _raw_check(raw, 0, fshape, "raw")
    outs = {"out_data": out_data, "out_gain": out_gain, "out_mask": out_mask}
    zero = np.zeros(n, np.intp)
    check_tables(n, fshape, zero, {"offset": offset, "factor": factor, "badpix": badpix}, outs, 1)
    if common_mode is not None:
        check_blocks(fshape, common_mode, scratch)
    npix = fshape[0] * fshape[1]
    return (
        _readonly(_rows(raw, n)), _readonly(offset.reshape(npix)),
        _readonly(factor.reshape(npix)), _readonly(badpix.reshape(npix)),
    )  # fmt: skip


def correct_epix100_numba(
    raw: np.ndarray,
    offset: np.ndarray,
    factor: np.ndarray,
    badpix: np.ndarray,
    out_data: np.ndarray,
    out_gain: np.ndarray,
    out_mask: np.ndarray,
    common_mode: tuple[int, int] | None,
    threshold: float,
    scratch: np.ndarray,
) -> None:
    """Correct ePix100 frames: offset, common mode per ASIC row then column (when
    ``common_mode`` is the ASIC shape), relative gain, bad pixels. ``scratch``: float32 of at
    least one ASIC's pixels."""
    raw2, off, fac, bad = prepare_epix100(
        raw, offset, factor, badpix, out_data, out_gain, out_mask, common_mode, scratch
    )
    n = raw.shape[0]
    d, g, m = _rows(out_data, n), _rows(out_gain, n), _rows(out_mask, n)
    if common_mode is None:
        _epix_fused(raw2, off, fac, bad, d, g, m)
        return
    _epix_offset(raw2, off, bad, d, g, m)
    _cm_lines(d, m, out_data.shape[2], *common_mode, np.float32(threshold), scratch)
    _scale(d, fac)


def scratch_size(block: tuple[int, int], lines: bool = True) -> int:
    """float32 elements of scratch the common-mode kernels need for ``block``."""
    bss, bfs = block
    return max(bfs, _COLS * bss + 2 * _COLS) if lines else bss * bfs


def check_blocks(
    fshape: tuple[int, int], block: tuple[int, int], scratch: np.ndarray, lines: bool = True
) -> None:
    """Blocks must tile the frame; ``scratch`` must hold :func:`scratch_size` elements."""
    bss, bfs = block
    if bss <= 0 or bfs <= 0 or fshape[0] % bss or fshape[1] % bfs:
        raise ValueError(f"common-mode blocks {block} do not tile frames of {fshape}")
    need = scratch_size(block, lines)
    if scratch.dtype != np.float32 or scratch.shape[0] < need or not scratch.flags.writeable:
        raise ValueError(f"scratch: need a writable float32 buffer of at least {need}")
    if not scratch.flags.c_contiguous:
        raise ValueError("scratch: must be C-contiguous")


def check_common_mode(
    data: np.ndarray, gain: np.ndarray | None, mask: np.ndarray, block: tuple[int, int],
    scratch: np.ndarray,
) -> None:  # fmt: skip
    """Common-mode arguments: float32 data, uint8 gain, uint32 mask (n, ss, fs), C-contiguous."""
    if data.ndim != 3 or data.dtype != np.float32 or not data.flags.c_contiguous:
        raise ValueError(f"data: expected C-contiguous float32 (n, ss, fs), found {data.dtype}")
    if not data.flags.writeable:
        raise ValueError("data: must be writable (common mode works in place)")
    for name, arr, dtype in (("gain", gain, np.uint8), ("mask", mask, np.uint32)):
        if arr is None:
            continue
        if arr.shape != data.shape or arr.dtype != dtype or not arr.flags.c_contiguous:
            raise ValueError(f"{name}: expected C-contiguous {np.dtype(dtype)} {data.shape}")
    check_blocks(data.shape[1:], block, scratch, lines=gain is None)


def common_mode_asics_numba(
    data: np.ndarray,
    gain: np.ndarray,
    mask: np.ndarray,
    block: tuple[int, int],
    stage: int,
    threshold: float,
    scratch: np.ndarray,
) -> None:
    """Subtract per block (ASIC) the median of good pixels of gain ``stage`` below
    ``threshold`` from the good pixels of that stage, in place on (n, ss, fs) data."""
    check_common_mode(data, gain, mask, block, scratch)
    n, _ss, fs = data.shape
    _cm_asics(
        _rows(data, n), _readonly(_rows(gain, n)), _readonly(_rows(mask, n)), fs, *block,
        np.uint8(stage), np.float32(threshold), scratch,
    )  # fmt: skip


def common_mode_lines_numba(
    data: np.ndarray, mask: np.ndarray, block: tuple[int, int], threshold: float,
    scratch: np.ndarray,
) -> None:  # fmt: skip
    """Row then column common mode within each block, in place (see the module docstring)."""
    check_common_mode(data, None, mask, block, scratch)
    n, _ss, fs = data.shape
    _cm_lines(_rows(data, n), _readonly(_rows(mask, n)), fs, *block, np.float32(threshold),
              scratch)  # fmt: skip


def prepare_photons(
    data: np.ndarray, mask: np.ndarray, photon_energy: float, out: np.ndarray
) -> tuple:
    """Check photon-conversion arguments; return (data, mask, 1/E_photon, out) as rows."""
    if data.shape != mask.shape or data.shape != out.shape:
        raise ValueError(f"mask and out must have the data's shape {data.shape}")
    if out.dtype != np.int16 or data.dtype != np.float32 or mask.dtype != np.uint32:
        raise ValueError(
            f"expected float32 data, uint32 mask, int16 out; found {data.dtype}, {mask.dtype}, "
            f"{out.dtype}"
        )
    if not (photon_energy > 0 and np.isfinite(photon_energy)):
        raise ValueError(f"photon energy must be positive, got {photon_energy}")
    n = data.shape[0]
    inv = np.float32(1.0) / np.float32(photon_energy)
    return _readonly(_rows(data, n)), _readonly(_rows(mask, n)), inv, _rows(out, n)


def photons_numba(
    data: np.ndarray, mask: np.ndarray, photon_energy: float, out: np.ndarray
) -> None:
    """int16 photon counts ``rint(data / photon_energy)`` clipped to int16, 0 where masked."""
    _photons(*prepare_photons(data, mask, photon_energy, out))


def warmup_numba_more() -> None:
    """Compile (or load from the cache) every kernel in this module on tiny inputs."""
    shape = (1, 4, 4)
    t3 = np.zeros((1, 3, 4, 4), np.float32)
    t2 = np.zeros((1, 2, 4, 4), np.float32)
    b3 = np.zeros((1, 3, 4, 4), np.uint32)
    cell = np.zeros(1, np.intp)
    raw = np.zeros(shape, np.uint16)
    outs = (np.empty(shape, np.float32), np.empty(shape, np.uint8), np.empty(shape, np.uint32))
    scratch = np.empty(scratch_size((2, 2)), np.float32)
    correct_agipd_numba(raw, 0, raw, 0, cell, t2, t3, t3, b3, *outs)
    correct_agipd_numba(np.zeros((1, 2, 4, 4), np.uint16), 0, np.zeros((1, 2, 4, 4), np.uint16),
                        1, cell, t2, t3, t3, b3, *outs)  # fmt: skip
    correct_lpd_numba(raw, 0, cell, t3, t3, b3, *outs)
    correct_lpd_numba(raw.reshape(1, 1, 4, 4), 0, cell, t3, t3, b3, *outs)
    t1 = np.zeros((1, 1, 4, 4), np.float32)
    correct_epix100_numba(raw, t1, t1, np.zeros((1, 1, 4, 4), np.uint32), *outs, (2, 2), 10.0,
                          scratch)  # fmt: skip
    common_mode_asics_numba(outs[0], outs[1], outs[2], (2, 2), 0, 10.0, scratch)
    photons_numba(outs[0], outs[2], 1.0, np.empty(shape, np.int16))
