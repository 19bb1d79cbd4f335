"""Chunk codecs: byte-identical to what the HDF5 filter writes, readable through h5py."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calstream.errors import ConfigError
from calstream.store import CODECS, get_codec
from calstream.store.codecs import BitshuffleLZ4, Codec, NoCompression, _openmp_max_threads


def _sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Data that looks like detector output: mostly small values, some large ones."""
    rng = np.random.default_rng(seed)
    values = rng.normal(0, 3, shape)
    values[rng.random(shape) < 0.01] += 900
    if np.dtype(dtype).kind in "ui":
        values = np.abs(values)
    return values.astype(dtype)


def _filter_chunk(path: Path, data: np.ndarray, **kwargs: object) -> bytes:
    """The chunk HDF5 writes for ``data`` (one chunk) through the filter in ``kwargs``."""
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("x", data=data, chunks=data.shape, **kwargs)
        mask, raw = ds.id.read_direct_chunk((0,) * data.ndim)
    assert mask == 0
    return raw


def test_registry_has_the_codecs() -> None:
    assert CODECS["bitshuffle-lz4"] is BitshuffleLZ4
    assert CODECS["none"] is NoCompression


def test_unknown_codec_lists_known_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown codec 'zip'.*'bitshuffle-lz4'.*'none'"):
        get_codec("zip")


def test_invalid_options() -> None:
    with pytest.raises(ConfigError, match=r"multiple of 8\. Got 30 instead"):
        get_codec("bitshuffle-lz4", nelems=30)
    with pytest.raises(ConfigError, match="invalid options for codec 'bitshuffle-lz4'"):
        get_codec("bitshuffle-lz4", level=3)


def test_to_dict_round_trips() -> None:
    codec = get_codec("bitshuffle-lz4", nelems=512)
    assert codec.to_dict() == {"name": "bitshuffle-lz4", "nelems": 512}
    assert get_codec(**codec.to_dict()) == codec
    assert get_codec("none").to_dict() == {"name": "none"}


def test_dataset_kwargs_match_hdf5plugin() -> None:
    assert get_codec("bitshuffle-lz4").dataset_kwargs() == dict(hdf5plugin.Bitshuffle(cname="lz4"))
    assert get_codec("none").dataset_kwargs() == {}


@pytest.mark.parametrize("nelems", [0, 256])
@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        ("float32", (1, 1, 512, 1024)),  # a full JUNGFRAU frame: corrected data
        ("uint8", (1, 1, 512, 1024)),  # gain
        ("uint32", (1, 1, 512, 1024)),  # mask
        ("uint16", (3, 37)),  # not a whole number of blocks, nor of 8 elements
        ("float64", (5,)),
        ("int16", (1, 7)),  # fewer elements than one bitshuffle group
    ],
)
def test_bitshuffle_bytes_identical_to_filter(
    tmp_path: Path, dtype: str, shape: tuple[int, ...], nelems: int
) -> None:
    data = _sample(dtype, shape)
    codec = get_codec("bitshuffle-lz4", nelems=nelems)
    expected = _filter_chunk(tmp_path / "f.h5", data, **codec.dataset_kwargs())
    assert codec.encode(data) == expected
    out = np.empty(codec.max_encoded_size(data.nbytes, data.itemsize), np.uint8)
    used = codec.encode_into(data, out)
    assert used.base is out or used is out
    assert used.tobytes() == expected
    # the portable fallback (bitshuffle without exported C functions) gives the same bytes
    assert Codec.encode_into(codec, data, out).tobytes() == expected


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    dtype=st.sampled_from(["uint8", "uint16", "float32", "uint32", "float64"]),
    shape=st.tuples(st.integers(1, 9), st.integers(1, 700)),
    seed=st.integers(0, 2**16),
)
def test_bitshuffle_bytes_identical_any_shape(
    tmp_path: Path, dtype: str, shape: tuple[int, int], seed: int
) -> None:
    data = _sample(dtype, shape, seed)
    codec = get_codec("bitshuffle-lz4")
    assert codec.encode(data) == _filter_chunk(tmp_path / "h.h5", data, **codec.dataset_kwargs())


@pytest.mark.parametrize("name", ["bitshuffle-lz4", "none"])
def test_direct_chunks_read_back_through_h5py(tmp_path: Path, name: str) -> None:
    codec = get_codec(name)
    data = _sample("float32", (4, 64, 128))
    with h5py.File(tmp_path / "d.h5", "w") as f:
        ds = f.create_dataset(
            "x", shape=data.shape, dtype=data.dtype, chunks=(1, 64, 128), **codec.dataset_kwargs()
        )
        for i, chunk in enumerate(codec.encode_frames(data[:2])):
            ds.id.write_direct_chunk((i, 0, 0), chunk)
        for i in (2, 3):
            out = np.empty(codec.max_encoded_size(data[i].nbytes, 4), np.uint8)
            ds.id.write_direct_chunk((i, 0, 0), codec.encode_into(data[i], out))
    with h5py.File(tmp_path / "d.h5", "r") as f:
        np.testing.assert_array_equal(f["x"][:], data)


def test_encode_into_checks_the_buffer() -> None:
    codec = get_codec("bitshuffle-lz4")
    data = _sample("float32", (64, 64))
    with pytest.raises(ValueError, match="at least"):
        codec.encode_into(data, np.empty(100, np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        codec.encode_into(data, np.empty(codec.max_encoded_size(data.nbytes, 4), np.int8))


def test_encode_is_thread_safe_and_single_threaded_per_call() -> None:
    codec = get_codec("bitshuffle-lz4")
    frames = [_sample("float32", (128, 1024), seed) for seed in range(16)]
    serial = [codec.encode(f) for f in frames]
    seen: dict[int, int | None] = {}

    def encode(frame: np.ndarray) -> bytes:
        data = codec.encode(frame)
        seen[threading.get_ident()] = _openmp_max_threads()
        return data

    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(encode, frames))
    assert parallel == serial
    if _openmp_max_threads() is None:
        pytest.skip("bitshuffle's OpenMP runtime not found")
    assert set(seen.values()) == {1}
