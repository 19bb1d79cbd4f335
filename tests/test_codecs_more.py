"""zstd, lz4 and blosc chunks (filter byte formats) and float32 bit-rounding."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from calstream.errors import ConfigError
from calstream.store.bitround import bitround
from calstream.store.codecs import LZ4, Blosc, Zstd, parse_codec

from .test_codecs import _filter_chunk, _sample

SPECS = ["zstd", "zstd:3", "zstd:-5", "lz4", "lz4:4096", "blosc", "blosc:lz4:5:2",
         "blosc:zstd:3", "blosc:blosclz:9:0", "bitshuffle-lz4", "none"]


def test_parse_codec() -> None:
    assert parse_codec("zstd:3") == Zstd(level=3)
    assert parse_codec("zstd") == Zstd(level=1)
    assert parse_codec("blosc:zstd:5") == Blosc(cname="zstd", clevel=5)
    assert parse_codec("lz4") == LZ4()
    assert parse_codec("bitshuffle-lz4").name == "bitshuffle-lz4"
    with pytest.raises(ConfigError, match=r"zstd level must be from 1 to 22.*Got 30"):
        parse_codec("zstd:30")
    with pytest.raises(ConfigError, match=r"level must be an integer\. Got 'x'"):
        parse_codec("zstd:x")
    with pytest.raises(ConfigError, match="blosc compressor must be one of"):
        parse_codec("blosc:snappy")
    with pytest.raises(ConfigError, match="takes at most 0 option"):
        parse_codec("none:1")
    with pytest.raises(ConfigError, match=r"unknown codec 'gzip'.*'zstd'"):
        parse_codec("gzip:4")


@pytest.mark.parametrize("spec", SPECS)
def test_spec_round_trips(spec: str) -> None:
    codec = parse_codec(spec)
    assert parse_codec(codec.spec) == codec
    assert codec.spec == spec.removesuffix(":1")  # defaults are left out


def test_dataset_kwargs_match_hdf5plugin() -> None:
    assert parse_codec("zstd:3").dataset_kwargs() == dict(hdf5plugin.Zstd(clevel=3))
    assert parse_codec("lz4").dataset_kwargs() == dict(hdf5plugin.LZ4())
    assert parse_codec("blosc:zstd:4:2").dataset_kwargs() == dict(
        hdf5plugin.Blosc(cname="zstd", clevel=4, shuffle=2)
    )


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(
    ("dtype", "shape"),
    [("float32", (1, 512, 1024)), ("uint8", (1, 64, 1024)), ("uint32", (1, 64, 64)),
     ("int16", (1, 3, 37))],
)
def test_round_trip_through_h5py_and_hdf5plugin(tmp_path: Path, spec, dtype, shape) -> None:
    codec = parse_codec(spec)
    data = np.concatenate([_sample(dtype, shape, seed) for seed in range(3)])
    with h5py.File(tmp_path / "c.h5", "w") as f:
        ds = f.create_dataset("x", shape=data.shape, dtype=dtype, chunks=shape,
                              **codec.dataset_kwargs())
        for i, frame in enumerate(data[:2]):
            chunk = codec.encode(frame[None])
            assert len(chunk) <= codec.max_encoded_size(frame.nbytes, data.itemsize)
            ds.id.write_direct_chunk((i, 0, 0), chunk)
        out = np.empty(codec.max_encoded_size(data[2].nbytes, data.itemsize), np.uint8)
        ds.id.write_direct_chunk((2, 0, 0), codec.encode_into(data[2][None], out))
    with h5py.File(tmp_path / "c.h5", "r") as f:
        np.testing.assert_array_equal(f["x"][:], data)


@pytest.mark.parametrize("nbytes", [0, 1000, 4096])
def test_lz4_bytes_identical_to_filter(tmp_path: Path, nbytes: int) -> None:
    codec = LZ4(nbytes=nbytes)
    for data in (_sample("float32", (64, 100)), np.random.default_rng(1).random(3000)):
        # the second is incompressible: blocks are stored as they are, like the filter does
        assert codec.encode(data) == _filter_chunk(tmp_path / "l.h5", data,
                                                   **codec.dataset_kwargs())


def test_blosc_and_zstd_decode_with_their_own_libraries() -> None:
    import blosc
    import zstandard

    data = _sample("float32", (64, 256))
    assert blosc.decompress(parse_codec("blosc:zstd:5:2").encode(data)) == data.tobytes()
    frame = parse_codec("zstd:3").encode(data)
    assert zstandard.get_frame_parameters(frame).content_size == data.nbytes
    assert zstandard.ZstdDecompressor().decompress(frame) == data.tobytes()


@pytest.mark.parametrize("spec", ["zstd:3", "lz4", "blosc:lz4"])
def test_threads_give_the_same_bytes(spec: str) -> None:
    codec = parse_codec(spec)
    frames = [_sample("float32", (64, 1024), seed) for seed in range(12)]
    serial = [codec.encode(f) for f in frames]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(codec.encode, frames)) == serial


# --- bit-rounding ---------------------------------------------------------------------------


def bitround_reference(data: np.ndarray, keep: int) -> np.ndarray:
    """NumPy reference: round half to even on the bit pattern, NaN and inf untouched."""
    bits = data.view(np.uint32).astype(np.uint64)
    drop = 23 - keep
    if drop == 0:
        return data.copy()
    rounded = (bits + (1 << (drop - 1)) - 1 + ((bits >> drop) & 1)) & ~np.uint64((1 << drop) - 1)
    special = (bits & 0x7F800000) == 0x7F800000
    out = np.where(special, bits, rounded & 0xFFFFFFFF).astype(np.uint32)
    return out.view(np.float32)


@settings(max_examples=60, deadline=None)
@given(
    data=hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(width=32)),
    keep=st.integers(1, 23),
)
def test_bitround_matches_numpy(data: np.ndarray, keep: int) -> None:
    expected = bitround_reference(data, keep)
    got = bitround(data.copy(), keep)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_bitround_error_bound_and_edges() -> None:
    rng = np.random.default_rng(0)
    data = (rng.normal(0, 100, 10000)).astype(np.float32)
    for keep in (3, 7, 12):
        out = bitround(data.copy(), keep)
        finite = np.isfinite(out)
        rel = np.abs(out[finite] - data[finite]) / np.abs(data[finite])
        assert rel.max() <= 2.0 ** -(keep + 1)
        assert np.all(out.view(np.uint32) & ((1 << (23 - keep)) - 1) == 0)
    edges = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 1.0, 1.25, 1.75], np.float32)
    out = bitround(edges.copy(), 1)
    assert out[0] == 0 and np.signbit(out[1]) and np.isnan(out[2])
    assert out[3] == np.inf and out[4] == -np.inf and out[5] == 1.0
    assert out[6] == 1.0 and out[7] == 2.0  # ties go to the even mantissa
    np.testing.assert_array_equal(bitround(edges.copy(), 23).view(np.uint32),
                                  edges.view(np.uint32))


def test_bitround_makes_float32_compress_better() -> None:
    data = _sample("float32", (256, 1024))
    codec = parse_codec("zstd:3")
    assert len(codec.encode(bitround(data.copy(), 7))) < 0.7 * len(codec.encode(data))


def test_bitround_checks_its_arguments() -> None:
    with pytest.raises(ConfigError, match=r"from 1 to 23 mantissa bits\. Got 0"):
        bitround(np.zeros(4, np.float32), 0)
    with pytest.raises(ValueError, match="float32"):
        bitround(np.zeros(4, np.float64), 5)
