"""The decoupled artifact: bit-packed masks, the manifest, and reading it back (spec in FORMAT.md)."""

from mmer.checkpoint.decoupled import DecoupledCheckpoint, MaskFile, load_decoupled
from mmer.checkpoint.manifest import FORMAT_VERSION, Manifest, ModalityRecord, SlotRecord

__all__ = [
    "FORMAT_VERSION",
    "DecoupledCheckpoint",
    "Manifest",
    "MaskFile",
    "ModalityRecord",
    "SlotRecord",
    "load_decoupled",
]
