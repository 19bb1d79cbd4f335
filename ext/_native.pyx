# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Cython twins of calstream's Numba kernels (built into ``calstream._native``).

``correct_jungfrau`` mirrors :mod:`calstream.calibrate.kernels` line for line: per frame, blocks
of ``BLOCK`` pixels; a block whose pixels are all in G0 reads only the G0 tables, other blocks
load all three stages' tables and pick with selects; one output per loop so the compiler
vectorises without a pile of alias checks; the bad-pixel decision is already folded into
``inv_gain``. Inputs are ``const`` memoryviews (arrays decoded from ZeroMQ frames are
read-only); the loops run without the GIL.

Like the Numba version, the G0 fast path writes its three outputs with non-temporal stores
when they are 64-byte aligned (here with AVX2 or AVX-512 intrinsics, so only when built with
``-march=native`` or similar; plain stores otherwise). The outputs (9 bytes per pixel) then
bypass the cache instead of being read in first, which saves about a third of the memory
traffic of a 16-cell train.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t

cdef enum:
    BLOCK = 512
    GAIN_SHIFT = 14
    ADC_MASK = 0x3FFF
    WRONG_GAIN_VALUE = 1 << 21
    INVALID_GAIN = 3

cdef extern from *:
    """
    /* G0 block with non-temporal stores: the outputs bypass the cache, which saves the
       read-for-ownership of every output line (about a third of the kernel's memory traffic
       with 16-cell constants). Only used when all three outputs are 64-byte aligned and the
       block is a multiple of 64 pixels; returns 0 (did nothing) otherwise. */
    #include <stdint.h>
    #if defined(__AVX512F__) && defined(__AVX512BW__)
    #include <immintrin.h>
    #define CALSTREAM_STREAM_STORES 1
    static inline int calstream_g0_stream(const uint16_t* a, const float* o, const float* ig,
                                          const uint32_t* b, float* d, uint8_t* g, uint32_t* m,
                                          Py_ssize_t n, int adc_bits) {
        if ((((uintptr_t)d | (uintptr_t)g | (uintptr_t)m) & 63) || (n & 63)) return 0;
        const __m512i adc_mask = _mm512_set1_epi32(adc_bits);
        const __m512 zero = _mm512_setzero_ps();
        for (Py_ssize_t k = 0; k < n; k += 64) {
            for (Py_ssize_t j = k; j < k + 64; j += 16) {
                __m512i raw = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(a + j)));
                __m512 v = _mm512_cvtepi32_ps(_mm512_and_si512(raw, adc_mask));
                __m512 r = _mm512_sub_ps(v, _mm512_loadu_ps(o + j));
                r = _mm512_add_ps(_mm512_mul_ps(r, _mm512_loadu_ps(ig + j)), zero);
                _mm512_stream_ps(d + j, r);
                _mm512_stream_si512((__m512i*)(m + j), _mm512_loadu_si512(b + j));
            }
            _mm512_stream_si512((__m512i*)(g + k), _mm512_setzero_si512());
        }
        return 1;
    }
    static inline void calstream_store_fence(void) { _mm_sfence(); }
    #elif defined(__AVX2__)
    #include <immintrin.h>
    #define CALSTREAM_STREAM_STORES 1
    static inline int calstream_g0_stream(const uint16_t* a, const float* o, const float* ig,
                                          const uint32_t* b, float* d, uint8_t* g, uint32_t* m,
                                          Py_ssize_t n, int adc_bits) {
        if ((((uintptr_t)d | (uintptr_t)g | (uintptr_t)m) & 31) || (n & 31)) return 0;
        const __m256i adc_mask = _mm256_set1_epi32(adc_bits);
        const __m256 zero = _mm256_setzero_ps();
        for (Py_ssize_t k = 0; k < n; k += 32) {
            for (Py_ssize_t j = k; j < k + 32; j += 8) {
                __m256i raw = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(a + j)));
                __m256 v = _mm256_cvtepi32_ps(_mm256_and_si256(raw, adc_mask));
                __m256 r = _mm256_sub_ps(v, _mm256_loadu_ps(o + j));
                r = _mm256_add_ps(_mm256_mul_ps(r, _mm256_loadu_ps(ig + j)), zero);
                _mm256_stream_ps(d + j, r);
                _mm256_stream_si256((__m256i*)(m + j), _mm256_loadu_si256((const __m256i*)(b + j)));
            }
            _mm256_stream_si256((__m256i*)(g + k), _mm256_setzero_si256());
        }
        return 1;
    }
    static inline void calstream_store_fence(void) { _mm_sfence(); }
    #else
    #define CALSTREAM_STREAM_STORES 0
    static inline int calstream_g0_stream(const uint16_t* a, const float* o, const float* ig,
                                          const uint32_t* b, float* d, uint8_t* g, uint32_t* m,
                                          Py_ssize_t n, int adc_bits) { return 0; }
    static inline void calstream_store_fence(void) {}
    #endif
    """
    bint CALSTREAM_STREAM_STORES
    bint calstream_g0_stream(const uint16_t* a, const float* o, const float* ig,
                             const uint32_t* b, float* d, uint8_t* g, uint32_t* m,
                             Py_ssize_t n, int adc_bits) noexcept nogil
    void calstream_store_fence() noexcept nogil


#: True when the G0 fast path writes with non-temporal stores (built for AVX2 or AVX-512).
STREAM_STORES = bool(CALSTREAM_STREAM_STORES)


ctypedef fused code_t:
    uint8_t
    uint16_t


cdef inline unsigned _or_codes(const code_t* codes, unsigned shift,
                               Py_ssize_t n) noexcept nogil:
    """Non-zero if any pixel's gain code (``codes[k] >> shift``) is not G0."""
    cdef unsigned acc = 0
    cdef Py_ssize_t k
    for k in range(n):
        acc |= <unsigned>codes[k] >> shift
    return acc


cdef inline void _data_g0(const uint16_t* adc, const float* offset, const float* inv_gain,
                          float* out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(n):
        out[k] = (<float>(adc[k] & ADC_MASK) - offset[k]) * inv_gain[k] + <float>0.0


cdef inline void _fill_u8(uint8_t* out, uint8_t value, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(n):
        out[k] = value


cdef inline void _copy_u32(const uint32_t* src, uint32_t* out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(n):
        out[k] = src[k]


cdef inline void _data_all(const uint16_t* adc, const code_t* codes, unsigned shift,
                           const float* o0, const float* o1, const float* o2,
                           const float* i0, const float* i1, const float* i2,
                           float* out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k
    cdef unsigned code
    cdef bint is1, is3, valid
    cdef float x0, x1, x2, y0, y1, y2, off, inv
    for k in range(n):
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
        inv = inv if valid else <float>0.0
        out[k] = (<float>(adc[k] & ADC_MASK) - off) * inv + <float>0.0


cdef inline void _gain_all(const code_t* codes, unsigned shift, uint8_t* out,
                           Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k
    cdef unsigned code
    cdef bint valid
    for k in range(n):
        code = codes[k] >> shift
        valid = (code == 0) | (code == 1) | (code == 3)
        out[k] = <uint8_t>((code ^ (code >> 1)) if valid else INVALID_GAIN)


cdef inline void _mask_all(const code_t* codes, unsigned shift,
                           const uint32_t* b0, const uint32_t* b1, const uint32_t* b2,
                           uint32_t* out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k
    cdef unsigned code
    cdef bint is1, is3, valid
    cdef uint32_t x0, x1, x2, bad
    for k in range(n):
        code = codes[k] >> shift
        is1 = code == 1
        is3 = code == 3
        valid = (code == 0) | is1 | is3
        x0 = b0[k]
        x1 = b1[k]
        x2 = b2[k]
        bad = x1 if is1 else x0
        bad = x2 if is3 else bad
        out[k] = bad if valid else <uint32_t>WRONG_GAIN_VALUE


cdef void _frame(const uint16_t* adc, const code_t* codes, unsigned shift,
                 const float* off, const float* inv, const uint32_t* bad,
                 float* out_data, uint8_t* out_gain, uint32_t* out_mask,
                 Py_ssize_t npix) noexcept nogil:
    """One frame; ``off``/``inv``/``bad`` point at this frame's cell: (3, npix) each."""
    cdef Py_ssize_t start = 0, n
    cdef Py_ssize_t g1 = npix, g2 = 2 * npix
    while start < npix:
        n = min(<Py_ssize_t>BLOCK, npix - start)
        if _or_codes(codes + start, shift, n) == 0:
            if calstream_g0_stream(adc + start, off + start, inv + start, bad + start,
                                   out_data + start, out_gain + start, out_mask + start, n,
                                   ADC_MASK):
                start += n
                continue
            _data_g0(adc + start, off + start, inv + start, out_data + start, n)
            _fill_u8(out_gain + start, 0, n)
            _copy_u32(bad + start, out_mask + start, n)
        else:
            _data_all(adc + start, codes + start, shift,
                      off + start, off + g1 + start, off + g2 + start,
                      inv + start, inv + g1 + start, inv + g2 + start,
                      out_data + start, n)
            _gain_all(codes + start, shift, out_gain + start, n)
            _mask_all(codes + start, shift, bad + start, bad + g1 + start, bad + g2 + start,
                      out_mask + start, n)
        start += n


def _check(tuple expected, tuple found, str name):
    if expected != found:
        raise ValueError(f"{name}: expected shape {expected}, found {found}")


def correct_jungfrau(
    const uint16_t[:, :, ::1] adc,
    object gain,
    const Py_ssize_t[::1] cell,
    const float[:, :, :, ::1] offset,
    const float[:, :, :, ::1] inv_gain,
    const uint32_t[:, :, :, ::1] badpix,
    float[:, :, ::1] out_data,
    uint8_t[:, :, ::1] out_gain,
    uint32_t[:, :, ::1] out_mask,
):
    """Correct JUNGFRAU frames into caller-owned outputs (releases the GIL).

    Same contract as :func:`calstream.calibrate.kernels.correct_jungfrau_numba`; ``gain`` is a
    uint8 (n, ss, fs) array or ``None`` (gain bits 14-15 of ``adc``). Shapes and cell indices
    are checked (``ValueError``) since the loops themselves do no bounds checks.
    """
    cdef Py_ssize_t n = adc.shape[0], ss = adc.shape[1], fs = adc.shape[2]
    cdef Py_ssize_t npix = ss * fs
    cdef Py_ssize_t ncells = offset.shape[0]
    cdef Py_ssize_t f, c
    cdef const uint8_t[:, :, ::1] gain_view
    frame = (n, ss, fs)
    table = (ncells, 3, ss, fs)
    _check(frame, tuple(out_data.shape[i] for i in range(3)), "out_data")
    _check(frame, tuple(out_gain.shape[i] for i in range(3)), "out_gain")
    _check(frame, tuple(out_mask.shape[i] for i in range(3)), "out_mask")
    _check(table, tuple(offset.shape[i] for i in range(4)), "offset")
    _check(table, tuple(inv_gain.shape[i] for i in range(4)), "inv_gain")
    _check(table, tuple(badpix.shape[i] for i in range(4)), "badpix")
    _check((n,), tuple(cell.shape[i] for i in range(1)), "cell")
    for f in range(n):
        if cell[f] < 0 or cell[f] >= ncells:
            raise ValueError(f"cell[{f}] = {cell[f]} is outside the constants' {ncells} cells")
    if n == 0 or npix == 0:
        return

    if gain is None:
        with nogil:
            for f in range(n):
                c = cell[f]
                _frame[uint16_t](
                    &adc[f, 0, 0], &adc[f, 0, 0], GAIN_SHIFT,
                    &offset[c, 0, 0, 0], &inv_gain[c, 0, 0, 0], &badpix[c, 0, 0, 0],
                    &out_data[f, 0, 0], &out_gain[f, 0, 0], &out_mask[f, 0, 0], npix,
                )
            calstream_store_fence()
    else:
        gain_view = gain
        _check(frame, tuple(gain_view.shape[i] for i in range(3)), "gain")
        with nogil:
            for f in range(n):
                c = cell[f]
                _frame[uint8_t](
                    &adc[f, 0, 0], &gain_view[f, 0, 0], 0,
                    &offset[c, 0, 0, 0], &inv_gain[c, 0, 0, 0], &badpix[c, 0, 0, 0],
                    &out_data[f, 0, 0], &out_gain[f, 0, 0], &out_mask[f, 0, 0], npix,
                )
            calstream_store_fence()


# -- AGIPD, LPD, ePix100, common mode, photon counts ----------------------------------------
# Twins of calstream.calibrate.numba_kernels; the Python wrappers there (and in
# calstream.calibrate.native) check shapes first, these loops do not.

from libc.math cimport rintf
from libc.stdint cimport int16_t

cdef inline void _agipd_all(const uint16_t* a, const uint16_t* d, const float* t0,
                            const float* t1, const float* off, const float* fac,
                            const uint32_t* bad, float* out_d, uint8_t* out_g,
                            uint32_t* out_m, Py_ssize_t n, Py_ssize_t stride) noexcept nogil:
    """A block with pixels beyond G0; tables for G1/G2 sit ``stride`` and ``2 * stride`` on."""
    cdef Py_ssize_t k
    cdef float dv, o, f
    cdef bint hi1, is2
    cdef uint32_t b
    for k in range(n):
        dv = <float>d[k]
        hi1 = dv > t0[k]
        is2 = dv > t1[k]
        o = off[stride + k] if hi1 else off[k]
        o = off[2 * stride + k] if is2 else o
        f = fac[stride + k] if hi1 else fac[k]
        f = fac[2 * stride + k] if is2 else f
        b = bad[stride + k] if hi1 else bad[k]
        b = bad[2 * stride + k] if is2 else b
        out_d[k] = (<float>a[k] - o) * f + <float>0.0
        out_g[k] = 2 if is2 else (1 if hi1 else 0)
        out_m[k] = b


cdef inline void _g0_block(const uint16_t* a, unsigned adc_mask, const float* off,
                           const float* fac, const uint32_t* bad, float* out_d,
                           uint8_t* out_g, uint32_t* out_m, Py_ssize_t n) noexcept nogil:
    """Every pixel in G0: only the G0 tables, streaming stores when aligned."""
    if calstream_g0_stream(a, off, fac, bad, out_d, out_g, out_m, n, adc_mask):
        return
    cdef Py_ssize_t k
    for k in range(n):
        out_d[k] = (<float>(a[k] & adc_mask) - off[k]) * fac[k] + <float>0.0
    _fill_u8(out_g, 0, n)
    _copy_u32(bad, out_m, n)


cdef void _agipd_frame(const uint16_t* a, const uint16_t* d, const float* t0,
                       const float* t1, const float* off, const float* fac,
                       const uint32_t* bad, float* out_d, uint8_t* out_g,
                       uint32_t* out_m, Py_ssize_t npix) noexcept nogil:
    cdef Py_ssize_t start = 0, n, k
    cdef bint above
    while start < npix:
        n = min(<Py_ssize_t>BLOCK, npix - start)
        above = False
        for k in range(start, start + n):
            above |= <float>d[k] > t0[k]
        if not above:
            _g0_block(a + start, 0xFFFF, off + start, fac + start, bad + start,
                      out_d + start, out_g + start, out_m + start, n)
        else:
            _agipd_all(a + start, d + start, t0 + start, t1 + start, off + start, fac + start,
                       bad + start, out_d + start, out_g + start, out_m + start, n, npix)
        start += n


def correct_agipd(
    const uint16_t[:, :, ::1] analog, Py_ssize_t ai,
    const uint16_t[:, :, ::1] digital, Py_ssize_t di,
    const Py_ssize_t[::1] cell,
    const float[:, :, ::1] thresholds,
    const float[:, :, ::1] offset,
    const float[:, :, ::1] factor,
    const uint32_t[:, :, ::1] badpix,
    float[:, ::1] out_data, uint8_t[:, ::1] out_gain, uint32_t[:, ::1] out_mask,
):
    """AGIPD; raw (n, planes, npix) with plane indices, tables (cells, gains, npix), outputs
    (n, npix). Shapes are checked by the caller."""
    cdef Py_ssize_t n = analog.shape[0], npix = analog.shape[2], f, c
    if n == 0 or npix == 0:
        return
    with nogil:
        for f in range(n):
            c = cell[f]
            _agipd_frame(&analog[f, ai, 0], &digital[f, di, 0], &thresholds[c, 0, 0],
                         &thresholds[c, 1, 0], &offset[c, 0, 0], &factor[c, 0, 0],
                         &badpix[c, 0, 0], &out_data[f, 0], &out_gain[f, 0], &out_mask[f, 0],
                         npix)
        calstream_store_fence()


cdef inline void _lpd_all(const uint16_t* raw, const float* off, const float* fac,
                          const uint32_t* bad, float* out_d, uint8_t* out_g,
                          uint32_t* out_m, Py_ssize_t n, Py_ssize_t stride) noexcept nogil:
    cdef Py_ssize_t k
    cdef unsigned code
    cdef bint is1, is2, valid
    cdef float o, f
    cdef uint32_t b
    for k in range(n):
        code = (raw[k] >> 12) & 3
        is1 = code == 1
        is2 = code == 2
        valid = code != 3
        o = off[stride + k] if is1 else off[k]
        o = off[2 * stride + k] if is2 else o
        f = fac[stride + k] if is1 else fac[k]
        f = fac[2 * stride + k] if is2 else f
        f = f if valid else <float>0.0
        b = bad[stride + k] if is1 else bad[k]
        b = bad[2 * stride + k] if is2 else b
        out_d[k] = (<float>(raw[k] & 0xFFF) - o) * f + <float>0.0
        out_g[k] = <uint8_t>code
        out_m[k] = b if valid else <uint32_t>WRONG_GAIN_VALUE


cdef void _lpd_frame(const uint16_t* raw, const float* off, const float* fac,
                     const uint32_t* bad, float* out_d, uint8_t* out_g,
                     uint32_t* out_m, Py_ssize_t npix) noexcept nogil:
    cdef Py_ssize_t start = 0, n, k
    cdef unsigned acc
    while start < npix:
        n = min(<Py_ssize_t>BLOCK, npix - start)
        acc = 0
        for k in range(start, start + n):
            acc |= raw[k]
        if (acc & 0x3000) == 0:
            _g0_block(raw + start, 0xFFF, off + start, fac + start, bad + start,
                      out_d + start, out_g + start, out_m + start, n)
        else:
            _lpd_all(raw + start, off + start, fac + start, bad + start, out_d + start,
                     out_g + start, out_m + start, n, npix)
        start += n


def correct_lpd(
    const uint16_t[:, :, ::1] raw, Py_ssize_t ri,
    const Py_ssize_t[::1] cell,
    const float[:, :, ::1] offset,
    const float[:, :, ::1] factor,
    const uint32_t[:, :, ::1] badpix,
    float[:, ::1] out_data, uint8_t[:, ::1] out_gain, uint32_t[:, ::1] out_mask,
):
    """LPD; layout as :func:`correct_agipd`."""
    cdef Py_ssize_t n = raw.shape[0], npix = raw.shape[2], f, c
    if n == 0 or npix == 0:
        return
    with nogil:
        for f in range(n):
            c = cell[f]
            _lpd_frame(&raw[f, ri, 0], &offset[c, 0, 0], &factor[c, 0, 0], &badpix[c, 0, 0],
                       &out_data[f, 0], &out_gain[f, 0], &out_mask[f, 0], npix)
        calstream_store_fence()


cdef inline float _select(float* buf, Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    cdef Py_ssize_t lo = 0, hi = n - 1, mid, i, store
    cdef float pivot, t
    while hi > lo:
        mid = (lo + hi) >> 1
        if buf[mid] < buf[lo]:
            t = buf[mid]; buf[mid] = buf[lo]; buf[lo] = t
        if buf[hi] < buf[lo]:
            t = buf[hi]; buf[hi] = buf[lo]; buf[lo] = t
        if buf[mid] < buf[hi]:
            t = buf[mid]; buf[mid] = buf[hi]; buf[hi] = t
        pivot = buf[hi]
        store = lo
        for i in range(lo, hi):  # branch-free Lomuto: always swap, advance if smaller
            t = buf[i]
            buf[i] = buf[store]
            buf[store] = t
            store += t < pivot
        t = buf[store]; buf[store] = buf[hi]; buf[hi] = t
        if store == k:
            return buf[k]
        if store < k:
            lo = store + 1
        else:
            hi = store - 1
    return buf[k]


cdef inline float _median(float* buf, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k = n >> 1, i
    cdef float upper = _select(buf, n, k), lower
    if n & 1:
        return upper
    lower = buf[0]
    for i in range(1, k):
        if buf[i] > lower:
            lower = buf[i]
    return (lower + upper) * <float>0.5


cdef void _cm_asics(float* d, const uint8_t* g, const uint32_t* m, Py_ssize_t ss,
                    Py_ssize_t fs, Py_ssize_t bss, Py_ssize_t bfs, uint8_t stage,
                    float threshold, float* scratch) noexcept nogil:
    cdef Py_ssize_t r0, c0, r, c, k, count
    cdef float v, med
    cdef Py_ssize_t nr = ss // bss, nc = fs // bfs, br, bc
    for br in range(nr):
        r0 = br * bss
        for bc in range(nc):
            c0 = bc * bfs
            count = 0
            for r in range(r0, r0 + bss):
                for c in range(c0, c0 + bfs):
                    k = r * fs + c
                    v = d[k]
                    scratch[count] = v  # branch-free gather: keep it by counting it
                    count += (m[k] == 0) & (g[k] == stage) & (v < threshold)
            if count == 0:
                continue
            med = _median(scratch, count)
            for r in range(r0, r0 + bss):
                for c in range(c0, c0 + bfs):
                    k = r * fs + c
                    if m[k] == 0 and g[k] == stage:
                        d[k] = d[k] - med


cdef void _cm_lines(float* d, const uint32_t* m, Py_ssize_t ss, Py_ssize_t fs,
                    Py_ssize_t bss, Py_ssize_t bfs, float threshold,
                    float* scratch) noexcept nogil:
    cdef Py_ssize_t r0, c0, r, c, k, count
    cdef float v, med
    cdef Py_ssize_t nr = ss // bss, nc = fs // bfs, br, bc
    for br in range(nr):
        r0 = br * bss
        for bc in range(nc):
            c0 = bc * bfs
            for r in range(r0, r0 + bss):
                count = 0
                for c in range(c0, c0 + bfs):
                    k = r * fs + c
                    v = d[k]
                    scratch[count] = v
                    count += (m[k] == 0) & (v < threshold)
                if count:
                    med = _median(scratch, count)
                    for c in range(c0, c0 + bfs):
                        k = r * fs + c
                        if m[k] == 0:
                            d[k] = d[k] - med
            for c in range(c0, c0 + bfs):
                count = 0
                for r in range(r0, r0 + bss):
                    k = r * fs + c
                    v = d[k]
                    scratch[count] = v
                    count += (m[k] == 0) & (v < threshold)
                if count:
                    med = _median(scratch, count)
                    for r in range(r0, r0 + bss):
                        k = r * fs + c
                        if m[k] == 0:
                            d[k] = d[k] - med


def common_mode_asics(float[:, :, ::1] data, const uint8_t[:, :, ::1] gain,
                      const uint32_t[:, :, ::1] mask, Py_ssize_t bss, Py_ssize_t bfs,
                      uint8_t stage, float threshold, float[::1] scratch):
    """Per block median of good pixels of ``stage`` below ``threshold``, subtracted in place."""
    cdef Py_ssize_t n = data.shape[0], ss = data.shape[1], fs = data.shape[2], f
    if n == 0 or ss == 0 or fs == 0:
        return
    with nogil:
        for f in range(n):
            _cm_asics(&data[f, 0, 0], &gain[f, 0, 0], &mask[f, 0, 0], ss, fs, bss, bfs, stage,
                      threshold, &scratch[0])


def common_mode_lines(float[:, :, ::1] data, const uint32_t[:, :, ::1] mask, Py_ssize_t bss,
                      Py_ssize_t bfs, float threshold, float[::1] scratch):
    """Row then column common mode within each block, in place."""
    cdef Py_ssize_t n = data.shape[0], ss = data.shape[1], fs = data.shape[2], f
    if n == 0 or ss == 0 or fs == 0:
        return
    with nogil:
        for f in range(n):
            _cm_lines(&data[f, 0, 0], &mask[f, 0, 0], ss, fs, bss, bfs, threshold,
                      &scratch[0])


def correct_epix100(
    const uint16_t[:, ::1] raw, const float[::1] offset, const float[::1] factor,
    const uint32_t[::1] badpix, float[:, :, ::1] out_data, uint8_t[:, ::1] out_gain,
    uint32_t[:, :, ::1] out_mask, Py_ssize_t bss, Py_ssize_t bfs, float threshold,
    float[::1] scratch,
):
    """ePix100: offset, common mode (rows then columns per block when ``bss > 0``), gain.
    ``raw`` and ``out_gain`` are (n, npix), ``out_data``/``out_mask`` (n, ss, fs)."""
    cdef Py_ssize_t n = raw.shape[0], npix = raw.shape[1], f, k, start, bn
    cdef Py_ssize_t ss = out_data.shape[1], fs = out_data.shape[2]
    cdef float* d
    cdef uint32_t* m
    cdef uint32_t b
    if n == 0 or npix == 0:
        return
    with nogil:
        if bss <= 0:
            # No common mode: one pass, frames interleaved per block of pixels, so each block
            # of the one-cell tables is read once per train, not once per frame.
            start = 0
            while start < npix:
                bn = min(<Py_ssize_t>BLOCK, npix - start)
                for f in range(n):
                    d = &out_data[f, 0, 0] + start
                    m = &out_mask[f, 0, 0] + start
                    _g0_block(&raw[f, start], 0xFFFF, &offset[start], &factor[start],
                              &badpix[start], d, &out_gain[f, start], m, bn)
                start += bn
        else:
            _epix_cm_frames(raw, offset, factor, badpix, out_data, out_gain, out_mask,
                            bss, bfs, threshold, &scratch[0])
        calstream_store_fence()


cdef void _epix_cm_frames(const uint16_t[:, ::1] raw, const float[::1] offset,
                          const float[::1] factor, const uint32_t[::1] badpix,
                          float[:, :, ::1] out_data, uint8_t[:, ::1] out_gain,
                          uint32_t[:, :, ::1] out_mask, Py_ssize_t bss, Py_ssize_t bfs,
                          float threshold, float* scratch) noexcept nogil:
    cdef Py_ssize_t n = raw.shape[0], npix = raw.shape[1], f, k
    cdef Py_ssize_t ss = out_data.shape[1], fs = out_data.shape[2]
    cdef float* d
    cdef uint32_t* m
    cdef uint32_t b
    for f in range(n):
        d = &out_data[f, 0, 0]
        m = &out_mask[f, 0, 0]
        for k in range(npix):
            b = badpix[k]
            d[k] = (<float>raw[f, k] - offset[k]) if b == 0 else <float>0.0
            out_gain[f, k] = 0
            m[k] = b
        _cm_lines(d, m, ss, fs, bss, bfs, threshold, scratch)
        for k in range(npix):
            d[k] = d[k] * factor[k] + <float>0.0


def photons(const float[:, ::1] data, const uint32_t[:, ::1] mask, float inv_energy,
            int16_t[:, ::1] out):
    """int16 photon counts ``rint(data * inv_energy)``, clipped, 0 where masked; (n, npix)."""
    cdef Py_ssize_t n = data.shape[0], npix = data.shape[1], f, k
    cdef float x
    with nogil:
        for f in range(n):
            for k in range(npix):
                x = rintf(data[f, k] * inv_energy)
                x = min(max(x, <float>-32768.0), <float>32767.0)
                x = x if x == x else <float>0.0
                out[f, k] = <int16_t>x if mask[f, k] == 0 else 0
