"""Store: compress chunks, write EuXFEL HDF5 files in a spool, move them to their destination.

Public names::

    get_codec, CODECS                 chunk codecs in HDF5-filter byte formats
    ExdfFileWriter, SequenceWriter    corrected EuXFEL files (EXtra-data compatible)
    read_file_info                    FileInfo of a finished file (after a restart)
    Spool                             building/ -> complete/ (-> failed/)
    open_destination, FileDestination where complete files go
    FileInfo, StoredFile              records passed on to the events stage
    Adler32, adler32_file             dCache's checksum
"""

from calstream.store.checksum import Adler32, adler32_file
from calstream.store.codecs import CODECS, Codec, get_codec
from calstream.store.destinations import Destination, FileDestination, open_destination
from calstream.store.exdf import ExdfFileWriter, SequenceWriter, read_file_info
from calstream.store.records import FileInfo, StoredFile
from calstream.store.spool import Spool

__all__ = [
    "CODECS",
    "Adler32",
    "Codec",
    "Destination",
    "ExdfFileWriter",
    "FileDestination",
    "FileInfo",
    "SequenceWriter",
    "Spool",
    "StoredFile",
    "adler32_file",
    "get_codec",
    "open_destination",
    "read_file_info",
]
