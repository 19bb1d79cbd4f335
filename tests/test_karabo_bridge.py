"""Karabo Bridge protocol 2.2 codec: compatibility with karabo_bridge, zero copy, strictness."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from karabo_bridge.serializer import deserialize, serialize

from calstream.errors import ProtocolError, UnsupportedProtocolError
from calstream.ingest import decode, encode, train_id_of
from calstream.ingest.karabo_bridge import PROTOCOL_VERSION

SRC = "SPB_IRDA_JF4M/DET/JNGFR01:daqOutput"
SRC2 = "SPB_IRDA_JF4M/DET/JNGFR02:daqOutput"
TID = 10042

pack = msgpack.Packer(use_bin_type=True).pack


def _meta(src: str, tid: int = TID) -> dict:
    return {"source": src, "timestamp": 1700000000.25, "timestamp.sec": "1700000000",
            "timestamp.frac": "250000000000000000", "timestamp.tid": tid}


def sample_train() -> tuple[dict, dict]:
    rng = np.random.default_rng(1)
    data = {
        SRC: {
            "data.adc": rng.integers(0, 2**16, (2, 8, 16), dtype=np.uint16),
            "data.memoryCell": np.array([15, 0], np.uint8),
            "data.frameNumber": np.array([7, 8], np.uint64),
            "data.timestamp": np.array([1.5, 1.6]),
            "scalar.int": 42,
            "scalar.float": 2.5,
            "scalar.str": "JNGFR",
            "scalar.list": [1, 2, 3],
            "scalar.np": np.float32(0.5),
        },
        SRC2: {
            "zero_d": np.array(3.25),
            "empty": np.zeros((0, 4), np.int32),
            "big_endian": np.arange(6, dtype=">u2").reshape(2, 3),
            "transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,
            "complex": np.array([1 + 2j], np.complex64),
            "flag": np.array([True, False]),
        },
    }
    return data, {SRC: _meta(SRC), SRC2: _meta(SRC2)}


def assert_trains_equal(got: tuple[dict, dict], want: tuple[dict, dict]) -> None:
    gdata, gmeta = got
    wdata, wmeta = want
    assert gmeta == wmeta
    assert gdata.keys() == wdata.keys()
    for src in wdata:
        assert gdata[src].keys() == wdata[src].keys(), src
        for key, value in wdata[src].items():
            if isinstance(value, np.ndarray):
                assert gdata[src][key].dtype == value.dtype, key
                np.testing.assert_array_equal(gdata[src][key], value, err_msg=key)
            else:
                assert gdata[src][key] == value, key


def _bytes(frames: list) -> list[bytes]:
    return [memoryview(f).tobytes() for f in frames]


# -- compatibility with the karabo_bridge library ------------------------------------------------

def test_encode_writes_the_same_frames_as_karabo_bridge_serialize():
    data, meta = sample_train()
    assert _bytes(encode(data, meta)) == _bytes(serialize(data, meta))


def test_encode_then_karabo_bridge_deserialize():
    data, meta = sample_train()
    assert_trains_equal(deserialize(_bytes(encode(data, meta))), (data, meta))


def test_karabo_bridge_serialize_then_decode():
    data, meta = sample_train()
    assert_trains_equal(decode(serialize(data, meta)), (data, meta))
    assert_trains_equal(decode(_bytes(serialize(data, meta))), (data, meta))


def test_metadata_taken_from_data_when_not_given():
    data, meta = sample_train()
    data[SRC]["metadata"] = meta[SRC]
    data[SRC2]["metadata"] = meta[SRC2]
    assert _bytes(encode(data)) == _bytes(serialize(data))
    assert train_id_of(decode(encode(data))[1]) == TID


def test_encode_sends_arrays_as_memoryviews_without_copy():
    data, meta = sample_train()
    frames = encode(data, meta)
    adc = data[SRC]["data.adc"]
    views = [f for f in frames if isinstance(f, memoryview)]
    assert any(np.shares_memory(np.asarray(v), adc) for v in views)
    assert all(v.format == "B" and v.ndim == 1 for v in views)


def test_encode_rejects_object_arrays():
    with pytest.raises(ProtocolError) as info:
        encode({SRC: {"bad": np.array(["a", None], dtype=object)}}, {SRC: _meta(SRC)})
    assert info.value.source == SRC
    assert info.value.key == "bad"


# -- zero copy over a real socket ----------------------------------------------------------------

def test_decode_is_zero_copy_on_received_frames():
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    pull = ctx.socket(zmq.PULL)
    try:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        data = {SRC: {"data.adc": np.arange(16 * 512 * 64, dtype=np.uint16).reshape(16, 512, 64)}}
        push.send_multipart(encode(data, {SRC: _meta(SRC)}), copy=False)
        assert pull.poll(5000)
        frames = pull.recv_multipart(copy=False)
        got, meta = decode(frames)
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()
    adc = got[SRC]["data.adc"]
    base = adc
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, memoryview) and base.obj is frames[-1]  # a view on the zmq.Frame
    assert adc.ctypes.data == np.frombuffer(frames[-1].buffer, np.uint8).ctypes.data
    np.testing.assert_array_equal(adc, data[SRC]["data.adc"])
    assert meta[SRC]["timestamp.tid"] == TID


def test_decode_accepts_bytes_and_memoryviews_without_copy():
    payload = np.arange(12, dtype=np.float32)
    buf = bytearray(payload.tobytes())
    frames = [pack({"source": SRC, "content": "msgpack", "metadata": _meta(SRC)}), pack({}),
              pack({"source": SRC, "content": "array", "path": "a", "dtype": "float32",
                    "shape": [3, 4]}), memoryview(buf)]
    data, _ = decode(frames)
    assert data[SRC]["a"].shape == (3, 4)
    assert data[SRC]["a"].ctypes.data == np.frombuffer(buf, np.uint8).ctypes.data


# -- malformed messages --------------------------------------------------------------------------

def _good_frames(**array_header) -> list:
    header = {"source": SRC, "content": "array", "path": "data.adc", "dtype": "uint16",
              "shape": [2, 3]}
    header.update(array_header)
    return [pack({"source": SRC, "content": "msgpack", "metadata": _meta(SRC)}), pack({}),
            pack(header), np.zeros(6, np.uint16).tobytes()]


def test_good_frames_decode():
    data, meta = decode(_good_frames())
    assert data[SRC]["data.adc"].shape == (2, 3)
    assert train_id_of(meta) == TID


def test_protocol_1_is_refused_clearly():
    data, meta = sample_train()
    frames = serialize(data, meta, protocol_version="1.0")
    assert len(frames) == 1
    with pytest.raises(UnsupportedProtocolError, match=r"protocol 1\.0.*2\.2"):
        decode(frames)
    assert PROTOCOL_VERSION == "2.2"


ARRAY_CASES = {
    "dtype object": ({"dtype": "object"}, "dtype"),
    "dtype string": ({"dtype": "<U4"}, "dtype"),
    "dtype structured": ({"dtype": "i4,i4"}, "dtype"),
    "dtype datetime": ({"dtype": "<M8[ns]"}, "dtype"),
    "dtype not a str": ({"dtype": 12}, "dtype"),
    "dtype missing": ({"dtype": None}, "dtype"),
    "shape negative": ({"shape": [-2, -3]}, "shape"),
    "shape not a list": ({"shape": "2x3"}, "shape"),
    "shape floats": ({"shape": [2.0, 3.0]}, "shape"),
    "shape bools": ({"shape": [True, 6]}, "shape"),
    "shape too many dims": ({"shape": [1] * 40}, "shape"),
    "shape huge": ({"shape": [2**40, 2**40]}, "exceeds"),
    "shape absurd dim": ({"shape": [2**62, 0]}, "from 0 to"),
    "size mismatch": ({"shape": [2, 4]}, "needs"),
    "size mismatch dtype": ({"dtype": "uint32"}, "needs"),
}


@pytest.mark.parametrize("change,match", ARRAY_CASES.values(), ids=ARRAY_CASES.keys())
def test_bad_array_header_names_source_train_and_key(change, match):
    with pytest.raises(ProtocolError, match=match) as info:
        decode(_good_frames(**change))
    assert info.value.source == SRC
    assert info.value.train_id == TID
    assert info.value.key == "data.adc"
    assert SRC in str(info.value)


def test_array_above_the_size_limit():
    with pytest.raises(ProtocolError, match="exceeds the limit of 8") as info:
        decode(_good_frames(), max_array_bytes=8)
    assert info.value.key == "data.adc"


def _with(frames: list, index: int, frame) -> list:
    frames = list(frames)
    frames[index] = frame
    return frames


HEADER = pack({"source": SRC, "content": "msgpack", "metadata": _meta(SRC)})
MESSAGE_CASES = {
    "empty": ([], None, "empty"),
    "odd frame count": (_good_frames()[:3], None, "odd number"),
    "bad msgpack header": (_with(_good_frames(), 0, b"\xc1\xc1"), None, "not valid msgpack"),
    "truncated header": (_with(_good_frames(), 0, HEADER[:-3]), None, "not valid msgpack"),
    "header not a map": (_with(_good_frames(), 0, pack([1, 2])), None, "not a map"),
    "no source": (_with(_good_frames(), 0, pack({"content": "msgpack"})), None, "no source"),
    "unknown content": (_with(_good_frames(), 2, pack({"source": SRC, "content": "pickle"})),
                        SRC, "unknown content"),
    "bad msgpack payload": (_with(_good_frames(), 1, b"\x92\x01"), SRC, "not valid msgpack"),
    "payload not a map": (_with(_good_frames(), 1, pack(3)), SRC, "not a map"),
    "payload int keys": (_with(_good_frames(), 1, b"\x81\x01\x02"), SRC, "msgpack"),
    "array before source": (_good_frames()[2:] + _good_frames(), SRC, "before"),
    "array without path": (_with(_good_frames(), 2, pack({"source": SRC, "content": "array"})),
                           SRC, "no path"),
    "no metadata": (_with(_good_frames(), 0, pack({"source": SRC, "content": "msgpack"})), SRC,
                    "no train id"),
    "metadata not a map": (_with(_good_frames(), 0, pack(
        {"source": SRC, "content": "msgpack", "metadata": [1]})), SRC, "not a map"),
    "train id a string": (_with(_good_frames(), 0, pack(
        {"source": SRC, "content": "msgpack", "metadata": {"timestamp.tid": "12"}})), SRC,
        "unsigned 64-bit"),
    "train id negative": (_with(_good_frames(), 0, pack(
        {"source": SRC, "content": "msgpack", "metadata": {"timestamp.tid": -1}})), SRC,
        "unsigned 64-bit"),
    "duplicate source": (_good_frames() + _good_frames()[:2], SRC, "twice"),
    "duplicate key": (_good_frames() + _good_frames()[2:], SRC, "twice"),
    "frame not a buffer": (_with(_good_frames(), 1, 12345), None, "not a buffer"),
    "frames not a list": (b"\x00\x01", None, "sequence of frames"),
}


@pytest.mark.parametrize("frames,source,match", MESSAGE_CASES.values(),
                         ids=MESSAGE_CASES.keys())
def test_malformed_message_raises_protocol_error(frames, source, match):
    with pytest.raises(ProtocolError, match=match) as info:
        decode(frames)
    assert info.value.source == source


def test_unknown_content_is_unsupported():
    with pytest.raises(UnsupportedProtocolError):
        decode(MESSAGE_CASES["unknown content"][0])


def test_sources_with_different_train_ids():
    frames = [*_good_frames(), pack({"source": SRC2, "content": "msgpack",
                                     "metadata": _meta(SRC2, TID + 1)}), pack({})]
    with pytest.raises(ProtocolError, match="differs") as info:
        decode(frames)
    assert info.value.source == SRC2
    assert info.value.train_id == TID + 1
    assert info.value.key == "timestamp.tid"


def test_train_id_of():
    assert train_id_of({SRC: _meta(SRC), SRC2: _meta(SRC2)}) == TID
    with pytest.raises(ProtocolError, match="no sources"):
        train_id_of({})
    with pytest.raises(ProtocolError, match="disagree"):
        train_id_of({SRC: _meta(SRC), SRC2: _meta(SRC2, 1)})
    with pytest.raises(ProtocolError) as info:
        train_id_of({SRC: {"timestamp": 1.0}})
    assert info.value.source == SRC and info.value.key == "timestamp.tid"


# -- garbage in, only ProtocolError out ----------------------------------------------------------

def _decodes_or_protocol_error(frames) -> None:
    try:
        data, meta = decode(frames)
    except ProtocolError as exc:
        event(f"{type(exc).__name__}: {exc.message.split(' ')[0:3]}")
        return
    event("decoded")
    # What does decode must be a well-formed train.
    assert isinstance(data, dict) and data.keys() == meta.keys()
    train_id_of(meta)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                     st.floats(allow_nan=True), st.text(max_size=8), st.binary(max_size=8))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=10)
_headers = st.fixed_dictionaries(
    {},
    optional={
        "source": st.one_of(st.sampled_from([SRC, SRC2, ""]), _scalars),
        "content": st.one_of(st.sampled_from(["msgpack", "array", "other"]), _scalars),
        "metadata": st.one_of(
            st.fixed_dictionaries({"timestamp.tid": st.one_of(
                st.sampled_from([TID, TID + 1]), _scalars)}), _values),
        "path": st.one_of(st.sampled_from(["a", "data.adc"]), _scalars),
        "dtype": st.one_of(st.sampled_from(["uint16", "<f4", "|u1", "object", "S3", "V2",
                                            "i4,i4", "(2,)i4", "<M8[s]", "O", "c16", "f16"]),
                           _scalars),
        "shape": st.one_of(st.lists(st.integers(-3, 6), max_size=4),
                           st.lists(st.integers(-(2**63), 2**64 - 1), max_size=3), _values),
    })
_frame = st.one_of(st.binary(max_size=64), _headers.map(pack), _values.map(pack))
_frame_kinds = st.one_of(_frame, _frame.map(bytearray), _frame.map(memoryview))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_frame_kinds, max_size=8))
def test_random_frames_raise_only_protocol_error(frames):
    _decodes_or_protocol_error(frames)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_garbled_valid_message_raises_only_protocol_error(draw):
    data, meta = sample_train()
    frames = [bytearray(f) for f in _bytes(encode(data, meta))]
    for _ in range(draw.draw(st.integers(1, 4))):
        action = draw.draw(st.sampled_from(["flip", "truncate", "drop", "duplicate", "swap",
                                            "append"]))
        i = draw.draw(st.integers(0, len(frames) - 1))
        if action == "flip" and frames[i]:
            j = draw.draw(st.integers(0, len(frames[i]) - 1))
            frames[i][j] ^= draw.draw(st.integers(1, 255))
        elif action == "truncate":
            frames[i] = frames[i][: draw.draw(st.integers(0, len(frames[i])))]
        elif action == "drop" and len(frames) > 1:
            del frames[i]
        elif action == "duplicate":
            frames.insert(i, bytearray(frames[i]))
        elif action == "swap":
            j = draw.draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
        elif action == "append":
            frames.append(bytearray(draw.draw(_frame)))
    _decodes_or_protocol_error(frames)


_array_headers = st.fixed_dictionaries({
    "source": st.sampled_from([SRC, SRC, SRC2]),
    "content": st.sampled_from(["array", "array", "array", "msgpack", "pickle"]),
    "path": st.one_of(st.sampled_from(["a", "b", "data.adc"]), _scalars),
    "dtype": st.sampled_from(["uint8", "u1", "<u2", ">i2", "bool", "float16", "object",
                              "|S2", "V2", "i4,i4", "(2,)u1", "<M8[s]", "c8", "f16"]),
    "shape": st.one_of(st.lists(st.integers(-1, 4), max_size=3), _values),
    "metadata": st.fixed_dictionaries({"timestamp.tid": st.sampled_from([TID, TID, TID + 1,
                                                                         -5, "x"])}),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_array_headers.map(pack), st.one_of(st.binary(max_size=24),
                                                             _values.map(pack))), max_size=5))
def test_structured_garbage_raises_only_protocol_error(pairs):
    frames = [HEADER, pack({"x": 1})]
    for header, payload in pairs:
        frames += [header, payload]
    _decodes_or_protocol_error(frames)


# msgpack headers that announce absurd lengths (array32, map32, bin32, str32, ext32) and deep
# nesting: a decoder that trusted them would allocate gigabytes or recurse without end.
_ABSURD = [b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
           b"\xdb\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x01", b"\x91" * 100_000,
           b"\x81\xa1a" * 50_000]
_absurd_frame = st.builds(lambda head, tail: head + tail, st.sampled_from(_ABSURD),
                          st.binary(max_size=32))
_absurd_shape = st.lists(st.integers(2**20, 2**48), min_size=1, max_size=6).map(
    lambda shape: pack({"source": SRC, "content": "array", "path": "a", "dtype": "<u2",
                        "shape": shape}))


@pytest.mark.timeout(120)  # a hang fails the test instead of stalling the suite
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_absurd_frame, _absurd_shape, _frame), min_size=1, max_size=6),
       st.booleans())
def test_absurd_sizes_allocate_nothing_big(frames, good_start):
    import tracemalloc

    if good_start:
        frames = [HEADER, pack({"x": 1}), *frames]
    tracemalloc.start()
    try:
        _decodes_or_protocol_error(frames)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Views on the frames, small dicts, error messages: never anything like the sizes claimed.
    assert peak < 4 * sum(len(f) for f in frames) + (1 << 20)


def test_public_names():
    import calstream.ingest as ingest

    assert set(ingest.__all__) >= {"decode", "encode", "Receiver", "JungfrauSimulation",
                                   "Sender", "run_sender"}
    assert all(hasattr(ingest, name) for name in ingest.__all__)
