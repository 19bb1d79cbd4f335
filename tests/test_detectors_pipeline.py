"""AGIPD, LPD and ePix100 end to end: simulated stream in, EXtra-data's components read back
the corrected values bit for bit, every file passes extra-data-validate, events name them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calstream.config import load_config
from calstream.errors import ConfigError, DataError
from calstream.events import Outbox
from calstream.ingest import Receiver, make_simulation
from calstream.pipeline import Pipeline
from tests.test_pipeline import BIN, stored_files, validate

FIRST_TRAIN = 10000

CASES = {
    # detector: (cells, modules, extra --set overrides)
    "agipd": (4, [3], {"calibration.common_mode": True}),
    "lpd": (4, [0], {"calibration.photon_energy": 50.0}),
    "epix100": (1, [1], {"calibration.common_mode": True}),
    "jungfrau": (1, [2], {"calibration.photon_energy": 9.0}),
}


def _config(make_config, tmp_path: Path, detector: str, trains: int = 3, **more: object):
    cells, modules, extra = CASES[detector]
    overrides = {
        "source__detector": detector,
        "source__modules": modules,
        "calibration__synthesize_missing": True,
        "simulate__enabled": True,
        "simulate__trains": trains,
        "simulate__first_train_id": FIRST_TRAIN,
        "output__trains_per_file": 2,
        "metrics__status": "off",
        **{k.replace(".", "__"): v for k, v in extra.items()},
        **more,
    }
    return make_config(tmp_path / "constants" / f"{detector}-{{module:02d}}.h5", cells=cells,
                       **overrides)


def _expected(pipe: Pipeline, module: int, train_ids: list[int]) -> dict[str, np.ndarray]:
    """What the pipeline's own corrector gives for the trains the simulation sent."""
    cfg = pipe.config
    source = cfg.source.source_name(module)
    sim = make_simulation(
        cfg.source.detector, modules=[module], cells=cfg.calibration.cells,
        constants={module: pipe.constants[module]}, sources={module: source},
        seed=cfg.simulate.seed,
    )
    corrector = pipe.correctors[module]
    parts: dict[str, list[np.ndarray]] = {"data": [], "gain": [], "mask": []}
    for tid in train_ids:
        values = dict(sim.train(tid)[0][source])
        item = pipe._module_input(source, tid, values)
        out = corrector.empty_outputs(item.frames)
        corrector.correct_module(item.data, *out, source=source, train_id=tid)
        for role, arr in zip(("data", "gain", "mask"), out, strict=True):
            parts[role].append(arr)
    return {role: np.concatenate(arrs) for role, arrs in parts.items()}


@pytest.mark.parametrize("detector", sorted(CASES))
def test_detector_run_reads_back_bit_for_bit(detector, make_config, tmp_path):
    import hdf5plugin  # noqa: F401  (the filters EXtra-data needs to read the chunks)
    from extra_data import RunDirectory, components

    config = _config(make_config, tmp_path, detector)
    pipe = Pipeline(config)
    summary = pipe.run()
    assert summary.trains == 3 and summary.problems == {}
    (module,) = config.source.modules
    files = stored_files(tmp_path / "data")
    agg = {"agipd": "AGIPD", "lpd": "LPD", "epix100": "EPIX", "jungfrau": "JNGFR"}[detector]
    assert [f.name for f in files] == [f"CORR-R0001-{agg}{module:02d}-S{s:05d}.h5" for s in (0, 1)]
    run_dir = files[0].parent
    validate(run_dir)

    train_ids = [FIRST_TRAIN, FIRST_TRAIN + 1, FIRST_TRAIN + 2]
    want = _expected(pipe, module, train_ids)
    run = RunDirectory(run_dir)
    assert list(run.train_ids) == train_ids
    source = config.output_source(module)
    if detector in ("agipd", "lpd"):
        det = components.AGIPD1M(run) if detector == "agipd" else components.LPD1M(run)
        assert det.source_to_modno == {source: module}
        data = det.get_array("image.data")  # (module, train, pulse, ss, fs)
        cells = config.calibration.cells
        assert data.shape == (1, 3, cells, *pipe.spec.module_shape)
        got = {key: det[f"image.{key}"].ndarray()[0] for key in ("data", "gain", "mask")}
        np.testing.assert_array_equal(data.values[0].reshape(-1, *data.shape[3:]),
                                      want["data"])
        cell_ids = run[source, "image.cellId"].ndarray()
        np.testing.assert_array_equal(cell_ids, np.tile(np.arange(cells), 3))
    elif detector == "jungfrau":
        det = components.JUNGFRAU(run)
        got = {key: det[f"data.{name}"].ndarray()[0].reshape(-1, 512, 1024)
               for key, name in (("data", "adc"), ("gain", "gain"), ("mask", "mask"))}
    else:
        # EXtra-data 1.25 has no ePix100 component: read the facility's keys directly.
        epix = getattr(components, "Epix100", None)
        reader = epix(run) if epix is not None else None
        got = {
            key: (reader[f"data.image.{name}"].ndarray() if reader is not None
                  else run[source, f"data.image.{name}"].ndarray())
            for key, name in (("data", "pixels"), ("gain", "gain"), ("mask", "mask"))
        }
        assert got["data"].shape == (3, 704, 768)
    for key in ("data", "gain", "mask"):
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    if detector in ("lpd", "jungfrau"):
        assert got["data"].dtype == np.int16  # photon counts
    else:
        assert got["data"].dtype == np.float32
    assert np.count_nonzero(got["mask"]) < got["mask"].size // 20  # mostly good pixels

    # The storage events name the detector, module, source and each dataset's codec.
    with Outbox(tmp_path / "spool" / "outbox.sqlite3") as outbox:
        events = [json.loads(e.value)["calstream"] for e in outbox.entries()]
    assert len(events) == 2
    names = pipe.layout.image_names
    for event in events:
        assert event["detector"] == detector and event["module"] == module
        assert event["sources"] == [source]
        codecs = ["bitshuffle-lz4", "lz4", "lz4"]  # the defaults for data, gain, mask
        assert event["compression"] == dict(zip(names, codecs, strict=True))
    assert sum(e["frames"] for e in events) == 3 * config.calibration.cells


def test_module_data_is_checked_against_the_registry(make_config, tmp_path):
    """Wrong dtype, axis order, missing keys: one DataError naming source, train and key."""
    pipe = Pipeline(_config(make_config, tmp_path, "agipd"))
    source = pipe.config.source.source_name(3)
    assert source == "SPB_DET_AGIPD1M-1/DET/3CH0:xtdf"
    cells = np.arange(4, dtype=np.uint16)[:, None]
    good = np.zeros((4, 2, 512, 128), np.uint16)
    item = pipe._module_input(source, 7, {"image.data": good, "image.cellId": cells})
    assert item.frames == 4 and item.small["cellId"].tolist() == [0, 1, 2, 3]
    assert item.small["pulseId"].dtype == np.uint64

    def error(values: dict) -> DataError:
        with pytest.raises(DataError) as info:
            pipe._module_input(source, 7, values)
        exc = info.value
        assert exc.source == source and exc.train_id == 7
        assert source in str(exc) and "7" in str(exc)
        return exc

    exc = error({"image.cellId": cells})
    assert exc.key == "image.data" and "missing" in str(exc)
    exc = error({"image.data": good.astype(np.float32), "image.cellId": cells})
    assert exc.key == "image.data" and "uint16" in str(exc)
    exc = error({"image.data": np.zeros((4, 2, 128, 512), np.uint16), "image.cellId": cells})
    assert "(frames,2,512,128)" in str(exc)
    exc = error({"image.data": np.zeros((5, 2, 512, 128), np.uint16)})
    assert exc.key == "image.data" and "1 to 4" in str(exc)
    exc = error({"image.data": good})
    assert exc.key == "image.cellId"
    exc = error({"image.data": good, "image.cellId": np.arange(3)})
    assert exc.key == "image.cellId"
    # online style: analog and digital apart; the digital array must come with it
    analog = np.zeros((4, 512, 128), np.uint16)
    exc = error({"image.data": analog, "image.cellId": cells})
    assert exc.key == "image.gain"
    item = pipe._module_input(source, 7, {"image.data": analog, "image.gain": analog,
                                          "image.cellId": cells})
    assert set(item.data) == {"image.data", "image.gain", "image.cellId"}


def test_rejected_module_data_is_counted_and_the_rest_written(make_config, tmp_path, port):
    """A train whose module data has the wrong shape becomes a gap; the others are written."""
    from calstream.ingest import Sender

    config = _config(make_config, tmp_path, "lpd", simulate__enabled=False,
                     calibration__photon_energy=0.0)
    pipe = Pipeline(config)
    source = config.source.source_name(0)
    sim = make_simulation("lpd", modules=[0], cells=4, constants=pipe.constants,
                          sources={0: source})
    import threading

    def send() -> None:
        with Sender(config.source.endpoint, "push") as sender:
            for tid in (100, 101, 102):
                data, meta = sim.train(tid)
                if tid == 101:
                    data[source]["image.data"] = np.zeros((4, 256, 128), np.uint16)
                sender.send(data, meta, timeout=10)

    thread = threading.Thread(target=send)
    thread.start()
    summary = pipe.run(max_trains=3)
    thread.join()
    assert summary.trains == 3
    assert summary.problems == {"module_rejected": 1}
    files = stored_files(tmp_path / "data")
    validate(files[0].parent)
    import h5py

    with h5py.File(files[0]) as f:
        assert f[f"INDEX/{config.output_source(0)}/image/count"][:].tolist() == [4, 0]


def test_agipd_online_style_stream_gives_the_file_style_result(make_config, tmp_path):
    """image.data + image.gain (online) is corrected exactly like image.data (frames, 2, ...)."""
    import threading

    import hdf5plugin  # noqa: F401
    from extra_data import RunDirectory
    from extra_data.components import AGIPD1M

    from calstream.ingest import Sender

    config = _config(make_config, tmp_path, "agipd", simulate__enabled=False)
    pipe = Pipeline(config)
    source = config.source.source_name(3)
    online, filestyle = (
        make_simulation("agipd", modules=[3], cells=4, constants=pipe.constants,
                        sources={3: source}, style=style, seed=5)
        for style in ("online", "file")
    )
    assert online.train(1)[0][source]["image.data"].shape == (4, 512, 128)

    def send() -> None:
        with Sender(config.source.endpoint, "push") as sender:
            for tid in (200, 201):
                sender.send(*online.train(tid), timeout=10)

    thread = threading.Thread(target=send)
    thread.start()
    summary = pipe.run(max_trains=2)
    thread.join()
    assert summary.trains == 2 and summary.problems == {}
    got = AGIPD1M(RunDirectory(tmp_path / "data" / "r0001"))["image.data"].ndarray()[0]
    corrector = pipe.correctors[3]
    for i, tid in enumerate((200, 201)):
        out = corrector.empty_outputs(4)
        corrector.correct_module(filestyle.train(tid)[0][source], *out)
        np.testing.assert_array_equal(got[4 * i : 4 * i + 4], out[0])


def test_detector_config_errors(tmp_path):
    def error(*sets: str) -> ConfigError:
        with pytest.raises(ConfigError) as info:
            load_config(None, list(sets))
        return info.value

    exc = error("source.detector=pnccd")
    assert exc.key == "source.detector" and "agipd" in exc.message
    exc = error("source.detector=agipd", "calibration.cells=353")
    assert exc.key == "calibration.cells" and "1 to 352" in exc.message
    exc = error("source.detector=epix100", "calibration.cells=2")
    assert exc.key == "calibration.cells"
    exc = error("calibration.cells=8")
    assert exc.key == "calibration.cells" and "1 or 16" in exc.message
    exc = error("source.detector=lpd", "calibration.common_mode=true")
    assert exc.key == "calibration.common_mode" and "agipd" in exc.message
    exc = error("calibration.photon_energy=-1")
    assert exc.key == "calibration.photon_energy"
    exc = error("source.detector=epix100", "source.modules=[1, 2]")
    assert exc.key == "source.input_source"
    exc = error("source.detector=jungfrau", "source.modules=[0]")
    assert exc.key == "source.modules" and "from 1" in exc.message
    # the detector's defaults fill what was left empty
    cfg = load_config(None, ["source.detector=lpd", "source.modules=[0, 5]"])
    assert cfg.source.source_name(5) == "FXE_DET_LPD1M-1/DET/5CH0:xtdf"
    assert cfg.output_source(5) == "FXE_DET_LPD1M-1/CORR/5CH0:output"
    assert cfg.output.aggregator == "LPD" and cfg.calibration.cells == 64
    assert cfg.calibration.constants == "constants/lpd-LPD{module:02d}.h5"


@pytest.mark.parametrize("name", ["agipd", "lpd", "epix100"])
def test_detector_example_configs_check(name):
    repo = Path(__file__).resolve().parent.parent
    cfg = load_config(repo / "configs" / f"{name}.toml")
    assert cfg.source.detector == name
    assert cfg.simulate.enabled and cfg.calibration.synthesize_missing


def test_simulate_command_streams_agipd(port, tmp_path):
    """`calstream simulate --detector agipd`: file-style trains a receiver decodes."""
    proc = subprocess.Popen(
        [str(BIN / "calstream"), "simulate", "--detector", "agipd", "--modules", "2",
         "--cells", "3", "--trains", "2", "--rate", "0",
         "--endpoint", f"tcp://127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    receiver = Receiver(f"tcp://127.0.0.1:{port}", "pull")
    try:
        trains = []
        for _ in range(2):
            message = receiver.receive(timeout=60)
            assert message is not None
            trains.append(message)
    finally:
        receiver.close()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    data, meta = trains[0]
    source = "SPB_DET_AGIPD1M-1/DET/2CH0:xtdf"
    assert list(data) == [source]
    image = data[source]["image.data"]
    assert image.dtype == np.uint16 and image.shape == (3, 2, 512, 128)
    assert data[source]["image.cellId"].ravel().tolist() == [0, 1, 2]
    assert meta[source]["timestamp.tid"] == 10000
    assert "sent 2 trains" in out


def test_simulated_trains_look_like_the_detector(tmp_path):
    """Dark noise around the offsets, sparse photons, some gain switching, for each family."""
    from calstream.calibrate import load_constants, make_corrector, synth_constants

    for detector, cells in (("agipd", 2), ("lpd", 2), ("epix100", 1)):
        path = synth_constants(detector, tmp_path / f"{detector}.h5", cells=cells, seed=2)
        consts = load_constants(detector, path, cells=cells)
        sim = make_simulation(detector, modules=[1], cells=cells, constants={1: consts})
        data, _ = sim.train(5)
        (values,) = data.values()
        raw = values[sim.spec.file_layout.keys["data"]]
        assert not raw.flags.writeable  # pre-generated, shared
        corrector = make_corrector(detector, consts, "numba")
        out = corrector.empty_outputs(cells)
        module_data = dict(values)
        if detector == "epix100":
            module_data["data.image.pixels"] = raw[None]
        corrector.correct_module(module_data, *out)
        energy, gain, mask = out
        good = energy[mask == 0]
        assert abs(float(np.median(good))) < 3  # dark frames around the offset
        assert 2 < float(np.percentile(good, 84) - np.median(good)) < 15  # noise
        assert np.count_nonzero(good > 30) > 100  # photons
        if detector != "epix100":
            assert 0 < np.count_nonzero(gain == 1) < gain.size // 100  # spots switch gain
        assert sim.train(5)[0].keys() == data.keys()


def test_xtdf_file_with_varying_frames_and_gaps(tmp_path):
    """XTDF trains of 4, 0 (gap) and 2 frames: the index, the per-frame values, AGIPD1M and
    read_file_info agree."""
    import hdf5plugin  # noqa: F401
    from extra_data import RunDirectory
    from extra_data.components import AGIPD1M

    from calstream.store import ExdfFileWriter, layout_for, parse_codec, read_file_info

    codec = parse_codec("bitshuffle-lz4")
    layout = layout_for("xtdf")
    source = "SPB_DET_AGIPD1M-1/CORR/7CH0:output"
    path = tmp_path / "r0005" / "CORR-R0005-AGIPD07-S00000.h5"
    path.parent.mkdir()
    rng = np.random.default_rng(1)
    frames = {501: 4, 502: 0, 503: 2}
    written = {}
    with ExdfFileWriter(path, source=source, cells=4, frame_shape=(512, 128),
                        codecs=dict.fromkeys(layout.image_names, codec), run=5, proposal=1,
                        sequence=0, provenance={}, max_trains=4, detector="agipd", module=7,
                        layout=layout) as writer:
        for tid, n in frames.items():
            if not n:
                writer.write_train(tid, 0, None)
                continue
            arrays = {"data": rng.normal(size=(n, 512, 128)).astype(np.float32),
                      "gain": rng.integers(0, 3, (n, 512, 128), dtype=np.uint8),
                      "mask": rng.integers(0, 2, (n, 512, 128), dtype=np.uint32)}
            written[tid] = arrays
            chunks = {k: [codec.encode(f) for f in v] for k, v in arrays.items()}
            small = {"cellId": np.arange(n, dtype=np.uint16) + 1,
                     "pulseId": np.arange(n, dtype=np.uint64) * 2}
            writer.write_train(tid, 0, chunks, small)
        with pytest.raises(DataError) as info:
            writer.write_train(504, 0, {k: [] for k in layout.image_names}, {})
        assert info.value.key == "data"
    validate(path.parent)
    info = read_file_info(path)
    assert info.frames == 6 and info.trains == 3 and info.detector == "agipd"
    run = RunDirectory(path.parent)
    assert run[source, "image.data"].data_counts().tolist() == [4, 0, 2]
    det = AGIPD1M(run)
    np.testing.assert_array_equal(
        det["image.data"].ndarray()[0],
        np.concatenate([written[501]["data"], written[503]["data"]]))
    np.testing.assert_array_equal(run[source, "image.trainId"].ndarray(),
                                  [501] * 4 + [503] * 2)
    np.testing.assert_array_equal(run[source, "image.cellId"].ndarray(), [1, 2, 3, 4, 1, 2])


def test_agipd_live_preview_has_the_file_keys(make_config, tmp_path):
    """The preview of an AGIPD run carries image.data/gain/mask/cellId as in the file."""
    import threading

    import hdf5plugin  # noqa: F401
    from extra_data import RunDirectory
    from karabo_bridge import Client

    from tests.ports import free_port

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = _config(make_config, tmp_path, "agipd", trains=12, simulate__rate=10.0,
                     preview__endpoint=endpoint, preview__pattern="rep", preview__every=1,
                     preview__max_rate=0.0)
    pipeline = Pipeline(config)
    thread = threading.Thread(target=pipeline.run, daemon=True)
    thread.start()
    client = Client(endpoint, sock="REQ", timeout=30)
    try:
        data, meta = client.next()
    finally:
        client._socket.close(linger=0)
        thread.join(timeout=120)
    source = config.output_source(3)
    tid = meta[source]["timestamp.tid"]
    image = data[source]["image.data"]
    assert image.dtype == np.float32 and image.shape == (4, 512, 128)
    assert data[source]["image.cellId"].tolist() == [0, 1, 2, 3]
    run = RunDirectory(tmp_path / "data" / "r0001")
    _, stored = run.train_from_id(tid)
    for key in ("image.data", "image.gain", "image.mask"):
        np.testing.assert_array_equal(stored[source][key], data[source][key], err_msg=key)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
