"""Ingest: Karabo Bridge protocol 2.2 over ZeroMQ in, and fast detector simulations out.

- :func:`decode` / :func:`encode`: the wire format (zero-copy arrays, strict validation).
- :class:`Receiver`: PULL, SUB or REQ socket yielding decoded trains.
- :class:`TrainAssembler`: module data from several endpoints grouped into trains.
- :func:`make_simulation` (:class:`JungfrauSimulation`, :class:`DetectorSimulation` for
  AGIPD, LPD, ePix100), :class:`Sender`, :func:`run_sender`: pre-generated realistic trains
  sent at a target rate.
"""

from calstream.ingest.assembler import AssembledTrain, Rejection, TrainAssembler
from calstream.ingest.detector_sim import DetectorSimulation
from calstream.ingest.karabo_bridge import decode, encode, train_id_of
from calstream.ingest.receiver import Receiver
from calstream.ingest.simulate import (
    JungfrauSimulation,
    Sender,
    SendStats,
    Simulation,
    make_simulation,
    run_sender,
)

__all__ = [
    "AssembledTrain",
    "DetectorSimulation",
    "JungfrauSimulation",
    "Receiver",
    "Rejection",
    "SendStats",
    "Sender",
    "Simulation",
    "TrainAssembler",
    "decode",
    "encode",
    "make_simulation",
    "run_sender",
    "train_id_of",
]
