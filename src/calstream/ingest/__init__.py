"""Ingest: Karabo Bridge protocol 2.2 over ZeroMQ in, and a fast JUNGFRAU simulation out.

- :func:`decode` / :func:`encode`: the wire format (zero-copy arrays, strict validation).
- :class:`Receiver`: PULL, SUB or REQ socket yielding decoded trains.
- :class:`TrainAssembler`: module data from several endpoints grouped into trains.
- :class:`JungfrauSimulation`, :class:`Sender`, :func:`run_sender`: pre-generated realistic
  trains sent at a target rate.
"""

from calstream.ingest.assembler import AssembledTrain, Rejection, TrainAssembler
from calstream.ingest.karabo_bridge import decode, encode, train_id_of
from calstream.ingest.receiver import Receiver
from calstream.ingest.simulate import JungfrauSimulation, Sender, SendStats, run_sender

__all__ = [
    "AssembledTrain",
    "JungfrauSimulation",
    "Receiver",
    "Rejection",
    "SendStats",
    "Sender",
    "TrainAssembler",
    "decode",
    "encode",
    "run_sender",
    "train_id_of",
]
