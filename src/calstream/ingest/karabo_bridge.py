"""The Karabo Bridge wire format, protocol 2.2: encode and decode one train.

A train is one ZeroMQ multipart message. For each source, in sorted order::

    header   msgpack {'source': str, 'content': 'msgpack', 'metadata': {...}}
    payload  msgpack dict of the source's non-array values
    then for each array:
    header   msgpack {'source', 'content': 'array', 'path': key, 'dtype': str, 'shape': list}
    payload  the raw C-contiguous buffer

:func:`encode` writes the same frames as ``karabo_bridge.serializer.serialize`` (without dummy
timestamps) and hands arrays over as memoryviews, so ``send_multipart(frames, copy=False)`` sends
them without a copy. :func:`decode` is strict: every malformed message raises
:class:`~calstream.errors.ProtocolError` naming the source, train and key it could identify, and
arrays are ``np.frombuffer`` views on the received frames (no copy).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np
import zmq

from calstream.errors import ProtocolError, UnsupportedProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "Data",
    "Metadata",
    "decode",
    "encode",
    "train_id_of",
]

PROTOCOL_VERSION = "2.2"
"""The Karabo Bridge protocol version :func:`encode` and :func:`decode` speak."""

Data = dict[str, dict[str, Any]]
Metadata = dict[str, dict[str, Any]]

_MAX_NDIM = 32
_MAX_DIM = 2**48
_TRAIN_ID_KEY = "timestamp.tid"


def _numeric_dtypes() -> dict[str, np.dtype]:
    """Every spelling of a plain numeric dtype we accept, mapped to its dtype."""
    table: dict[str, np.dtype] = {}
    codes = ["b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"]
    for code in codes:
        native = np.dtype(code)
        table[code] = native
        table[str(native)] = native
        table[native.name] = native
        table[native.str] = native
        table[native.char] = native
        for order in "<>=|":
            dt = np.dtype(order + code)
            table[order + code] = dt
            table[dt.str] = dt
            table[str(dt)] = dt
    return table


_DTYPES = _numeric_dtypes()


def encode(data: Mapping[str, Mapping[str, Any]], metadata: Mapping[str, Any] | None = None,
           ) -> list[bytes | memoryview]:
    """Encode one train as Karabo Bridge protocol 2.2 frames.

    Parameters
    ----------
    data
        ``{source: {key: value}}``; NumPy arrays become array frames, everything else goes into
        the source's msgpack payload (NumPy scalars as Python numbers).
    metadata
        ``{source: {...}}`` with at least ``'timestamp.tid'``; when None it is taken from
        ``data[source]['metadata']`` as ``karabo_bridge.serializer.serialize`` does.

    Returns
    -------
    list of bytes and memoryviews
        Send with ``socket.send_multipart(frames, copy=False)``; array frames are memoryviews on
        the arrays (a C-contiguous copy only for non-contiguous arrays).

    Raises
    ------
    ProtocolError
        An array whose dtype the protocol cannot describe (not plain numeric), or a value
        msgpack cannot pack.
    """
    if metadata is None:
        metadata = {src: props.get("metadata", {}) for src, props in data.items()}
    pack = msgpack.Packer(use_bin_type=True).pack
    frames: list[bytes | memoryview] = []
    for src, props in sorted(data.items()):
        main_data: dict[str, Any] = {}
        arrays: list[tuple[str, np.ndarray]] = []
        for key, value in props.items():
            if isinstance(value, np.ndarray):
                arrays.append((key, value))
            elif isinstance(value, np.generic):
                main_data[key] = value.item()
            else:
                main_data[key] = value
        try:
            frames.append(pack({"source": src, "content": "msgpack",
                                "metadata": dict(metadata.get(src, {}))}))
            frames.append(pack(main_data))
        except (TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"cannot pack the source's values: {exc}", source=src) from exc
        for key, array in arrays:
            if array.dtype.str[1:] not in _DTYPES:
                raise ProtocolError(
                    f"cannot send an array of dtype {array.dtype}: only plain numeric dtypes",
                    source=src, key=key)
            if not array.flags.c_contiguous:
                array = np.ascontiguousarray(array)
            frames.append(pack({"source": src, "content": "array", "path": key,
                                "dtype": str(array.dtype), "shape": array.shape}))
            # a flat byte view: the same bytes as array.data, but castable and sized in bytes
            frames.append(memoryview(array.reshape(-1).view(np.uint8)))
    return frames


def _buffer(frame: Any, index: int) -> memoryview:
    """A flat byte memoryview on one received frame, without copying."""
    if isinstance(frame, zmq.Frame):
        return frame.buffer
    try:
        view = memoryview(frame)
    except TypeError:
        raise ProtocolError(
            f"frame {index} is a {type(frame).__name__}, not a buffer") from None
    if view.format != "B" or view.ndim != 1:
        if view.nbytes == 0:
            return memoryview(b"")
        try:
            view = view.cast("B")
        except TypeError:
            raise ProtocolError(f"frame {index} is not a contiguous buffer") from None
    return view


def _unpack(buf: memoryview, what: str, *, source: str | None = None,
            train_id: int | None = None, key: str | None = None) -> Any:
    try:
        return msgpack.unpackb(buf, raw=False, max_bin_len=len(buf))
    except Exception as exc:  # msgpack raises a zoo: ExtraData, FormatError, ValueError, ...
        raise ProtocolError(f"{what} is not valid msgpack ({type(exc).__name__}: {exc})",
                            source=source, train_id=train_id, key=key) from None


def _train_id(meta: Any, source: str) -> int:
    if not isinstance(meta, Mapping):
        raise ProtocolError(f"metadata is a {type(meta).__name__}, not a map", source=source)
    if _TRAIN_ID_KEY not in meta:
        raise ProtocolError("metadata has no train id", source=source, key=_TRAIN_ID_KEY)
    tid = meta[_TRAIN_ID_KEY]
    if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < 2**64:
        raise ProtocolError(f"train id must be an unsigned 64-bit integer, got {tid!r}",
                            source=source, key=_TRAIN_ID_KEY)
    return tid


def _array_shape(shape: Any, *, source: str, train_id: int, key: str) -> tuple[int, ...]:
    if not isinstance(shape, list | tuple) or len(shape) > _MAX_NDIM:
        raise ProtocolError(f"shape must be a list of at most {_MAX_NDIM} integers, "
                            f"got {shape!r:.80}", source=source, train_id=train_id, key=key)
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim <= _MAX_DIM:
            raise ProtocolError(f"shape must hold integers from 0 to 2**48, got {shape!r:.80}",
                                source=source, train_id=train_id, key=key)
    return tuple(shape)


def decode(frames: Sequence[Any], *, max_array_bytes: int = 2**31) -> tuple[Data, Metadata]:
    """Decode one protocol 2.2 message into ``(data, metadata)``, like ``Client.next()``.

    Parameters
    ----------
    frames
        The message parts: ``zmq.Frame`` (from ``recv_multipart(copy=False)``), bytes or
        memoryviews.
    max_array_bytes
        Largest array accepted, in bytes.

    Returns
    -------
    data, metadata
        ``data[source][key]``; arrays are read-only or writable ``np.frombuffer`` views on the
        frame buffers (zero copy), so they live as long as the arrays do.
        ``metadata[source]['timestamp.tid']`` is the train id, the same for every source.

    Raises
    ------
    UnsupportedProtocolError
        A single-frame (protocol 1.0) message or an unknown ``content`` type.
    ProtocolError
        Any other malformed message, naming the source, train and key where known.
    """
    if isinstance(frames, str | bytes | bytearray | memoryview) or not isinstance(
            frames, Sequence):
        raise ProtocolError(f"a message is a sequence of frames, got {type(frames).__name__}")
    n = len(frames)
    if n == 0:
        raise ProtocolError("empty message")
    if n == 1:
        raise UnsupportedProtocolError(
            "single-frame message: this is Karabo Bridge protocol 1.0 (msgpack_numpy), which "
            f"calstream does not speak; configure the sender for protocol {PROTOCOL_VERSION}")
    if n % 2:
        raise ProtocolError(f"odd number of frames ({n}): protocol {PROTOCOL_VERSION} sends "
                            "header/payload pairs")

    data: Data = {}
    metadata: Metadata = {}
    train_ids: dict[str, int] = {}
    for i in range(0, n, 2):
        hbuf = _buffer(frames[i], i)
        pbuf = _buffer(frames[i + 1], i + 1)
        header = _unpack(hbuf, f"header frame {i}")
        if not isinstance(header, dict):
            raise ProtocolError(f"header frame {i} is a {type(header).__name__}, not a map")
        source = header.get("source")
        if not isinstance(source, str) or not source:
            raise ProtocolError(f"header frame {i} has no source name (got {source!r:.80})")
        content = header.get("content")
        if content == "msgpack":
            if source in data:
                raise ProtocolError("source appears twice in the message", source=source,
                                    train_id=train_ids.get(source))
            meta = header.get("metadata", {})
            tid = _train_id(meta, source)
            if train_ids and tid != (first := next(iter(train_ids.values()))):
                raise ProtocolError(
                    f"train id differs from the message's first source ({first})",
                    source=source, train_id=tid, key=_TRAIN_ID_KEY)
            payload = _unpack(pbuf, f"payload frame {i + 1}", source=source, train_id=tid)
            if not isinstance(payload, dict):
                raise ProtocolError(f"payload is a {type(payload).__name__}, not a map",
                                    source=source, train_id=tid)
            for key in payload:
                if not isinstance(key, str):
                    raise ProtocolError(f"key {key!r:.80} is not a string", source=source,
                                        train_id=tid)
            data[source] = payload
            metadata[source] = meta
            train_ids[source] = tid
        elif content == "array":
            if source not in data:
                raise ProtocolError("array header before the source's msgpack header",
                                    source=source, key=_safe_key(header.get("path")))
            tid = train_ids[source]
            key = _checked_key(header, data[source], source, tid)
            data[source][key] = _array(header, key, pbuf, source=source, train_id=tid,
                                       max_array_bytes=max_array_bytes)
        else:
            raise UnsupportedProtocolError(
                f"unknown content type {content!r:.80} in header frame {i} (expected "
                "'msgpack' or 'array')", source=source)
    return data, metadata


def _safe_key(path: Any) -> str | None:
    return path if isinstance(path, str) else None


def _checked_key(header: dict, props: dict, source: str, train_id: int) -> str:
    key = header.get("path")
    if not isinstance(key, str) or not key:
        raise ProtocolError(f"array header has no path (got {key!r:.80})", source=source,
                            train_id=train_id)
    if key in props:
        raise ProtocolError("key appears twice", source=source, train_id=train_id, key=key)
    return key


def _array(header: dict, key: str, buf: memoryview, *, source: str, train_id: int,
           max_array_bytes: int) -> np.ndarray:
    spelled = header.get("dtype")
    dtype = _DTYPES.get(spelled) if isinstance(spelled, str) else None
    if dtype is None:
        raise ProtocolError(f"dtype {spelled!r:.80} is not a plain numeric NumPy dtype",
                            source=source, train_id=train_id, key=key)
    shape = _array_shape(header.get("shape"), source=source, train_id=train_id, key=key)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_array_bytes:
        raise ProtocolError(f"array of {nbytes} bytes exceeds the limit of {max_array_bytes}",
                            source=source, train_id=train_id, key=key)
    if buf.nbytes != nbytes:
        raise ProtocolError(
            f"buffer holds {buf.nbytes} bytes but shape {list(shape)} of {dtype} needs "
            f"{nbytes}", source=source, train_id=train_id, key=key)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def train_id_of(metadata: Mapping[str, Mapping[str, Any]]) -> int:
    """The train id of a decoded train: ``metadata[source]['timestamp.tid']``, shared by all.

    Raises
    ------
    ProtocolError
        No sources, a source without a train id, or sources that disagree.
    """
    tids = {src: _train_id(meta, src) for src, meta in metadata.items()}
    if not tids:
        raise ProtocolError("train has no sources, hence no train id", key=_TRAIN_ID_KEY)
    if len(set(tids.values())) > 1:
        listing = ", ".join(f"{s}: {t}" for s, t in tids.items())
        raise ProtocolError(f"sources disagree on the train id ({listing})", key=_TRAIN_ID_KEY)
    return next(iter(tids.values()))
