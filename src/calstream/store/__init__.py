"""Store: compress chunks, write EuXFEL HDF5 files in a spool, move them to their destination.

Public names::

    get_codec, parse_codec, CODECS    chunk codecs in HDF5-filter byte formats
    ExdfFileWriter, SequenceWriter    corrected EuXFEL files (EXtra-data compatible)
    read_file_info                    FileInfo of a finished file (after a restart)
    check_source_name                 ConfigError unless a source name fits the files
    RUN_RANGE, PROPOSAL_RANGE, ...    valid numbers (inclusive); check_int checks one
    Spool                             building/ -> complete/ (-> failed/)
    open_destination, FileDestination where complete files go
    WebdavDestination, WebdavSettings a dCache WebDAV door (davs://, https://)
    FileInfo, StoredFile              records passed on to the events stage
    Adler32, adler32_file             dCache's checksum
"""

from calstream.store.checksum import Adler32, adler32_file
from calstream.store.codecs import CODECS, Codec, get_codec, parse_codec
from calstream.store.destinations import Destination, FileDestination, open_destination
from calstream.store.exdf import (
    PROPOSAL_RANGE,
    ExdfFileWriter,
    SequenceWriter,
    check_source_name,
    layout_for,
    read_file_info,
)
from calstream.store.records import FileInfo, StoredFile
from calstream.store.spool import MODULE_RANGE, RUN_RANGE, SEQUENCE_RANGE, Spool, check_int
from calstream.store.webdav import WebdavDestination, WebdavSettings

__all__ = [
    "CODECS",
    "MODULE_RANGE",
    "PROPOSAL_RANGE",
    "RUN_RANGE",
    "SEQUENCE_RANGE",
    "Adler32",
    "Codec",
    "Destination",
    "ExdfFileWriter",
    "FileDestination",
    "FileInfo",
    "SequenceWriter",
    "Spool",
    "StoredFile",
    "WebdavDestination",
    "WebdavSettings",
    "adler32_file",
    "check_int",
    "check_source_name",
    "get_codec",
    "layout_for",
    "open_destination",
    "parse_codec",
    "read_file_info",
]
