"""EuXFEL corrected files: extra-data-validate passes and EXtra-data reads the values back."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import extra_data
import h5py
import numpy as np
import pytest
from extra_data.components import JUNGFRAU

from calstream.errors import ConfigError, DataError, StoreError
from calstream.store import (
    PROPOSAL_RANGE,
    RUN_RANGE,
    ExdfFileWriter,
    SequenceWriter,
    Spool,
    check_source_name,
    get_codec,
    read_file_info,
)

VALIDATE = str(Path(sys.executable).with_name("extra-data-validate"))
DETECTOR = "SPB_IRDA_JF4M"
BSHUF = get_codec("bitshuffle-lz4")
CODECS = {"adc": BSHUF, "gain": BSHUF, "mask": BSHUF}
PROVENANCE = {"constants": {"Offset10Hz": "jf-offsets.h5"}, "calstream": "test"}


def source(module: int) -> str:
    return f"{DETECTOR}/CORR/JNGFR{module:02d}:output"


@dataclass
class Train:
    adc: np.ndarray
    gain: np.ndarray
    mask: np.ndarray
    memory_cell: np.ndarray
    frame_number: np.ndarray

    @classmethod
    def random(cls, rng: np.random.Generator, cells: int, shape: tuple[int, int]) -> Train:
        adc = rng.normal(0, 0.3, (cells, *shape)).astype(np.float32)
        adc[rng.random(adc.shape) < 0.002] += 9.0
        gain = np.zeros((cells, *shape), np.uint8)
        gain[:, :8, :8] = rng.integers(0, 4, (cells, 8, 8))
        mask = np.where(rng.random((cells, *shape)) < 0.005, np.uint32(1 << 21), np.uint32(0))
        adc[mask != 0] = 0
        cells_idx = rng.permutation(16)[:cells].astype(np.uint8)
        return cls(adc, gain, mask, cells_idx, rng.integers(1, 2**40, cells, dtype=np.uint64))

    def chunks(self, codecs: dict = CODECS) -> dict[str, list[bytes]]:
        return {k: codecs[k].encode_frames(getattr(self, k)) for k in ("adc", "gain", "mask")}

    def small(self) -> dict[str, np.ndarray]:
        return {"memoryCell": self.memory_cell, "frameNumber": self.frame_number}


def check_valid(path: Path) -> None:
    result = subprocess.run([VALIDATE, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No problems found" in result.stdout


def writer(path: Path, module: int = 1, **kwargs: object) -> ExdfFileWriter:
    options: dict = dict(
        source=source(module),
        cells=2,
        codecs=CODECS,
        run=7,
        proposal=900123,
        sequence=0,
        provenance=PROVENANCE,
        max_trains=10,
        module=module,
    )
    options.update(kwargs)
    return ExdfFileWriter(path, **options)


TRAIN_IDS = (100001, 100002, 100003)
MISSING = (2, 100002)  # module 2 has no data for this train


@pytest.fixture(scope="module")
def jungfrau_run(tmp_path_factory: pytest.TempPathFactory):
    """Two full-size JUNGFRAU modules, 3 trains, 2 cells; module 2 misses the middle train."""
    run_dir = tmp_path_factory.mktemp("r0007")
    rng = np.random.default_rng(42)
    expected: dict[tuple[int, int], Train] = {}
    infos = {}
    for module in (1, 2):
        w = writer(run_dir / f"CORR-R0007-JNGFR{module:02d}-S00000.h5", module)
        for i, tid in enumerate(TRAIN_IDS):
            timestamp = 1_700_000_000_000_000_000 + i * 100_000_000
            if (module, tid) == MISSING:
                w.write_train(tid, timestamp, None)
                continue
            train = expected[module, tid] = Train.random(rng, 2, (512, 1024))
            w.write_train(tid, timestamp, train.chunks(), train.small())
        infos[module] = w.close()
    return run_dir, expected, infos


def test_files_and_run_pass_extra_data_validate(jungfrau_run) -> None:
    run_dir, _, infos = jungfrau_run
    for info in infos.values():
        check_valid(info.path)
    check_valid(run_dir)


def test_jungfrau_component_reads_values_back_bit_for_bit(jungfrau_run) -> None:
    run_dir, expected, _ = jungfrau_run
    run = extra_data.RunDirectory(str(run_dir))
    assert list(run.train_ids) == list(TRAIN_IDS)
    jf = JUNGFRAU(run)
    assert jf.detector_name == DETECTOR
    assert jf.source_to_modno == {source(1): 1, source(2): 2}
    assert list(jf.train_ids) == list(TRAIN_IDS)

    for key, attr in (("data.adc", "adc"), ("data.gain", "gain"), ("data.mask", "mask")):
        arr = jf.get_array(key)
        assert arr.dims == ("module", "train", "cell", "slow_scan", "fast_scan")
        assert arr.shape == (2, 3, 2, 512, 1024)
        for (module, tid), train in expected.items():
            np.testing.assert_array_equal(
                arr.sel(module=module, train=tid).values, getattr(train, attr)
            )
    adc = jf.get_array("data.adc")
    assert adc.dtype == np.float32
    assert np.isnan(adc.sel(module=MISSING[0], train=MISSING[1]).values).all()

    masked = jf.masked_data().ndarray()
    train = expected[1, TRAIN_IDS[0]]
    want = np.where(train.mask != 0, np.float32(np.nan), train.adc)
    np.testing.assert_array_equal(masked[0, 0], want)


def test_keydata_counts_index_and_small_values(jungfrau_run) -> None:
    run_dir, expected, _ = jungfrau_run
    run = extra_data.RunDirectory(str(run_dir))
    counts = run[source(2), "data.adc"].data_counts(labelled=False)
    assert list(counts) == [1, 0, 1]
    kd = run[source(2), "data.memoryCell"]
    assert list(kd.train_id_coordinates()) == [TRAIN_IDS[0], TRAIN_IDS[2]]
    np.testing.assert_array_equal(
        kd.ndarray(), np.stack([expected[2, t].memory_cell for t in TRAIN_IDS[::2]])
    )
    np.testing.assert_array_equal(
        run[source(1), "data.frameNumber"].ndarray(),
        np.stack([expected[1, t].frame_number for t in TRAIN_IDS]),
    )
    np.testing.assert_array_equal(run[source(1), "data.trainId"].ndarray(), TRAIN_IDS)
    stamps = run.train_timestamps()
    assert stamps[0] == np.datetime64(1_700_000_000_000_000_000, "ns")
    meta = run.select(source(1)).run_metadata()
    assert meta["dataFormatVersion"] == "1.0"
    assert (meta["proposalNumber"], meta["runNumber"], meta["sequenceNumber"]) == (900123, 7, 0)


def test_file_layout(jungfrau_run) -> None:
    _, _, infos = jungfrau_run
    with h5py.File(infos[2].path, "r") as f:
        assert list(f["METADATA/dataFormatVersion"][:]) == [b"1.0"]
        assert list(f["METADATA/dataSources/dataSourceId"][:]) == [
            f"INSTRUMENT/{source(2)}/data".encode()
        ]
        assert list(f["METADATA/dataSources/root"][:]) == [b"INSTRUMENT"]
        assert f["INDEX/trainId"].dtype == np.uint64
        assert f["INDEX/flag"].dtype == np.int32
        assert list(f["INDEX/flag"][:]) == [1, 1, 1]
        assert list(f[f"INDEX/{source(2)}/data/first"][:]) == [0, 1, 1]
        assert list(f[f"INDEX/{source(2)}/data/count"][:]) == [1, 0, 1]
        adc = f[f"INSTRUMENT/{source(2)}/data/adc"]
        assert adc.shape == (2, 2, 512, 1024)  # trimmed to the trains with data
        assert adc.chunks == (1, 1, 512, 1024)
        assert adc.id.get_create_plist().get_filter(0)[0] == 32008
        assert adc.id.get_num_chunks() == 4
        assert f[f"INSTRUMENT/{source(2)}/data/mask"].dtype == np.uint32
        assert f[f"INSTRUMENT/{source(2)}/data/gain"].dtype == np.uint8


def test_file_info(jungfrau_run) -> None:
    _, _, infos = jungfrau_run
    info = infos[2]
    assert info.relpath == "r0007/CORR-R0007-JNGFR02-S00000.h5"
    assert (info.run, info.proposal, info.sequence, info.module) == (7, 900123, 0, 2)
    assert info.detector == "jungfrau"
    assert info.sources == (source(2),)
    assert (info.first_train, info.last_train, info.trains, info.frames) == (100001, 100003, 3, 4)
    assert info.compression == {
        "adc": "bitshuffle-lz4",
        "gain": "bitshuffle-lz4",
        "mask": "bitshuffle-lz4",
    }
    assert info.constants == PROVENANCE
    assert info.size == info.path.stat().st_size
    assert info.raw_bytes == 4 * 512 * 1024 * (4 + 1 + 4)
    assert read_file_info(info.path) == info


def test_train_ids_must_increase_and_bad_trains_leave_the_file_valid(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    train = Train.random(rng, 2, (16, 32))
    w = writer(tmp_path / "CORR-R0007-JNGFR01-S00000.h5", frame_shape=(16, 32), max_trains=3)
    w.write_train(5, 0, train.chunks(), train.small())
    with pytest.raises(DataError, match="must increase"):
        w.write_train(5, 0, train.chunks(), train.small())
    with pytest.raises(DataError, match="2 chunks"):
        w.write_train(6, 0, {k: v[:1] for k, v in train.chunks().items()}, train.small())
    with pytest.raises(DataError, match="chunks for"):
        w.write_train(6, 0, {"adc": train.chunks()["adc"]}, train.small())
    with pytest.raises(DataError, match="memoryCell"):
        w.write_train(6, 0, train.chunks(), {"memoryCell": train.memory_cell})
    with pytest.raises(DataError, match=r"shape \(2,\)"):
        w.write_train(6, 0, train.chunks(), {**train.small(), "memoryCell": np.zeros(3)})
    w.write_train(6, 0, None)
    w.write_train(9, 0, train.chunks(), train.small())
    with pytest.raises(DataError, match="full"):
        w.write_train(10, 0, None)
    info = w.close()
    assert w.close() is info
    assert (info.trains, info.frames) == (3, 4)
    check_valid(info.path)
    run = extra_data.H5File(str(info.path))
    assert list(run.train_ids) == [5, 6, 9]
    np.testing.assert_array_equal(run[source(1), "data.adc"].ndarray(), [train.adc, train.adc])


def test_daq_output_channel_and_module_numbering(tmp_path: Path) -> None:
    """EXtra-data does not constrain the output channel; the facility's CORR names keep
    ``daqOutput``. Modules need not start at 1 (``first_modno``)."""
    src = "FXE_XAD_JF500K/CORR/JNGFR03:daqOutput"
    train = Train.random(np.random.default_rng(6), 2, (16, 32))
    w = writer(tmp_path / "CORR-R0007-JNGFR03-S00000.h5", source=src, frame_shape=(16, 32))
    w.write_train(1, 0, train.chunks(), train.small())
    w.close()
    jf = JUNGFRAU(extra_data.RunDirectory(str(tmp_path)), first_modno=3)
    assert jf.source_to_modno == {src: 1}
    np.testing.assert_array_equal(jf.get_array("data.adc").values[0, 0], train.adc)
    with pytest.raises(DataError, match="positive"):
        writer(tmp_path / "x.h5", frame_shape=(16, 32)).write_train(0, 0, None)


def test_file_without_any_data_is_valid(tmp_path: Path) -> None:
    w = writer(tmp_path / "CORR-R0007-JNGFR01-S00000.h5", frame_shape=(16, 32))
    for tid in (10, 11):
        w.write_train(tid, 0, None)
    info = w.close()
    assert (info.trains, info.frames, info.first_train, info.last_train) == (2, 0, 10, 11)
    check_valid(info.path)
    f = extra_data.H5File(str(info.path))
    assert f[source(1), "data.adc"].shape == (0, 2, 16, 32)


def test_uncompressed_file(tmp_path: Path) -> None:
    none = get_codec("none")
    codecs = {"adc": none, "gain": none, "mask": BSHUF}
    train = Train.random(np.random.default_rng(2), 3, (16, 32))
    w = writer(tmp_path / "f.h5", cells=3, frame_shape=(16, 32), codecs=codecs)
    with pytest.raises(DataError, match="unfiltered chunks must be 2048 bytes"):
        w.write_train(1, 0, {**train.chunks(codecs), "adc": [b"x"] * 3}, train.small())
    w.write_train(1, 0, train.chunks(codecs), train.small())
    info = w.close()
    assert info.compression == {"adc": "none", "gain": "none", "mask": "bitshuffle-lz4"}
    with h5py.File(info.path, "r") as f:
        np.testing.assert_array_equal(f[f"INSTRUMENT/{source(1)}/data/adc"][0], train.adc)
        np.testing.assert_array_equal(f[f"INSTRUMENT/{source(1)}/data/mask"][0], train.mask)


def test_abort_deletes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    with pytest.raises(RuntimeError), writer(path, frame_shape=(16, 32)) as w:
        w.write_train(1, 0, None)
        raise RuntimeError("boom")
    assert not path.exists()


def test_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="source"):
        writer(tmp_path / "a.h5", source="../../etc/passwd")
    with pytest.raises(ConfigError, match="no codec"):
        writer(tmp_path / "b.h5", codecs={"adc": BSHUF})
    (tmp_path / "c.h5").write_bytes(b"")
    with pytest.raises(StoreError, match=r"c\.h5"):
        writer(tmp_path / "c.h5")
    assert (tmp_path / "c.h5").read_bytes() == b""  # not ours: kept
    for key, value in [("proposal", 5_000_000_000), ("proposal", -1), ("run", 10000),
                       ("sequence", 100000), ("run", True), ("module", 100)]:  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            writer(tmp_path / "d.h5", **{key: value})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]


def test_number_ranges_fit_the_file(tmp_path: Path) -> None:
    assert RUN_RANGE == (0, 9999)
    assert PROPOSAL_RANGE == (0, 2**32 - 1)
    w = writer(tmp_path / "f.h5", run=RUN_RANGE[1], proposal=PROPOSAL_RANGE[1], sequence=99999)
    w.write_train(1, 0, None)
    with h5py.File(w.close().path, "r") as f:
        assert f["METADATA/proposalNumber"].dtype == np.uint32
        assert f["METADATA/proposalNumber"][0] == PROPOSAL_RANGE[1]
        assert f["METADATA/runNumber"][0] == RUN_RANGE[1]


def test_check_source_name() -> None:
    check_source_name("SPB_IRDA_JF4M/CORR/JNGFR01:output")
    check_source_name("FXE_XAD_JF500K/CORR/JNGFR03:daqOutput")
    for bad in ["", "SPB/CORR/JNGFR01", "/SPB/CORR/X:output", "SPB/../X:output",
                "SPB/CORR/X Y:output", "SPB//X:output", None]:  # fmt: skip
        with pytest.raises(ConfigError, match=r"output\.source"):
            check_source_name(bad, key="output.source")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (OverflowError("too big"), StoreError),
        (RuntimeError("HDF5 broke"), StoreError),
        (ConfigError("bad", key="x"), ConfigError),
        (DataError("bad"), DataError),
        (KeyboardInterrupt(), KeyboardInterrupt),
    ],
)
def test_failed_creation_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException, expected: type
) -> None:
    def fail(self: ExdfFileWriter, f: h5py.File) -> None:
        f.create_group("METADATA")
        raise exc

    monkeypatch.setattr(ExdfFileWriter, "_write_metadata", fail)
    path = tmp_path / "CORR-R0007-JNGFR01-S00000.h5"
    with pytest.raises(expected) as info:
        writer(path)
    if expected is StoreError:
        assert str(path) in str(info.value)
        assert info.value.__cause__ is exc
    assert list(tmp_path.iterdir()) == []


def test_failed_dataset_creation_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(type(BSHUF), "dataset_kwargs", lambda self: {"compression": 12345})
    with pytest.raises(StoreError, match="cannot create"):
        writer(tmp_path / "f.h5")
    assert list(tmp_path.iterdir()) == []


# --- SequenceWriter ---------------------------------------------------------------------


def sequence_writer(spool: Spool, **kwargs: object) -> SequenceWriter:
    options: dict = dict(
        run=7,
        proposal=900123,
        detector="jungfrau",
        module=3,
        aggregator="JNGFR",
        source=source(3),
        cells=2,
        codecs=CODECS,
        trains_per_file=2,
        provenance=PROVENANCE,
        frame_shape=(16, 32),
    )
    options.update(kwargs)
    return SequenceWriter(spool, **options)


def test_sequence_writer_rolls_over(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    sw = sequence_writer(spool)
    train = Train.random(np.random.default_rng(3), 2, (16, 32))
    closed = []
    for tid in range(1001, 1006):
        data = (None, None) if tid == 1004 else (train.chunks(), train.small())
        closed.append(sw.write_train(tid, tid * 10**8, *data))
        if tid == 1002:
            assert sw.current is None
    assert [len(c) for c in closed] == [0, 1, 0, 1, 0]
    last = sw.close()
    assert sw.close() is None
    infos = [closed[1][0], closed[3][0], last]
    assert [i.relpath for i in infos] == [f"r0007/CORR-R0007-JNGFR03-S{s:05d}.h5" for s in range(3)]
    assert [(i.first_train, i.last_train, i.frames) for i in infos] == [
        (1001, 1002, 4),
        (1003, 1004, 2),
        (1005, 1005, 2),
    ]
    assert all(i.path.parent == spool.complete for i in infos)
    assert list(spool.building.iterdir()) == []
    assert read_file_info(infos[1].path) == infos[1]
    check_valid(spool.complete)
    run = extra_data.RunDirectory(str(spool.complete))
    assert list(run.train_ids) == list(range(1001, 1006))
    assert list(run[source(3), "data.adc"].data_counts(labelled=False)) == [1, 1, 1, 0, 1]
    with pytest.raises(DataError, match="must increase"):
        sw.write_train(1005, 0, None)


def test_sequence_writer_checks_train_order_across_files(tmp_path: Path) -> None:
    sw = sequence_writer(Spool(tmp_path, fsync=False), trains_per_file=1)
    assert len(sw.write_train(10, 0, None)) == 1
    with pytest.raises(DataError, match="must increase"):
        sw.write_train(10, 0, None)


def test_sequence_writer_rolls_over_by_size_and_continues_numbering(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    (spool.failed / "CORR-R0007-JNGFR03-S00004.h5").write_bytes(b"")
    train = Train.random(np.random.default_rng(4), 2, (16, 32))
    sw = sequence_writer(spool, trains_per_file=100, max_file_bytes=1)
    infos = [sw.write_train(t, 0, train.chunks(), train.small())[0] for t in (1, 2)]
    assert [i.sequence for i in infos] == [5, 6]
    assert [i.trains for i in infos] == [1, 1]


def test_sequence_writer_moves_a_broken_file_to_failed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    train = Train.random(np.random.default_rng(5), 2, (16, 32))
    sw = sequence_writer(spool)
    sw.write_train(1, 0, train.chunks(), train.small())
    bad = {**train.chunks(), "gain": [object(), object()]}
    with pytest.raises(StoreError, match="writing to"):
        sw.write_train(2, 0, bad, train.small())
    assert [p.name for p in spool.failed.iterdir()] == ["CORR-R0007-JNGFR03-S00000.h5"]
    assert list(spool.building.iterdir()) == []
    assert sw.write_train(3, 0, train.chunks(), train.small()) == []
    info = sw.close()
    assert (info.sequence, info.first_train, info.trains) == (1, 3, 1)


def test_sequence_writer_never_completes_a_file_without_trains(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    train = Train.random(np.random.default_rng(7), 2, (16, 32))
    sw = sequence_writer(spool)
    assert sw.close() is None  # nothing opened
    with pytest.raises(DataError):  # opens S00000, but the train is refused
        sw.write_train(1, 0, {"adc": train.chunks()["adc"]}, train.small())
    assert sw.current is not None
    assert sw.close() is None
    assert sw.files_closed == 0
    for folder in (spool.building, spool.complete, spool.failed):
        assert list(folder.iterdir()) == []
    # the sequence number is used again; a file of count-0 trains is a real file
    assert sw.write_train(2, 0, None) == []
    info = sw.close()
    assert info is not None
    assert (info.sequence, info.trains, info.frames) == (0, 1, 0)
    check_valid(info.path)


def test_sequence_writer_abort_deletes_a_file_without_trains(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    train = Train.random(np.random.default_rng(8), 2, (16, 32))
    sw = sequence_writer(spool, trains_per_file=3)
    with pytest.raises(DataError):
        sw.write_train(1, 0, train.chunks(), {})
    sw.abort()
    # a file whose first write failed in HDF5 is deleted too
    bad = {**train.chunks(), "gain": [object(), object()]}
    with pytest.raises(StoreError, match="writing to"):
        sw.write_train(2, 0, bad, train.small())
    for folder in (spool.building, spool.complete, spool.failed):
        assert list(folder.iterdir()) == []
    assert sw.write_train(3, 0, train.chunks(), train.small()) == []
    sw.write_train(4, 0, None)
    sw.abort()
    assert [p.name for p in spool.failed.iterdir()] == ["CORR-R0007-JNGFR03-S00000.h5"]
