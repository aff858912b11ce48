"""The Avro contracts (``schemas/avro/*.avsc``) and the pinned schema ids of the embedded registry."""

from pathlib import Path

__all__ = ["AVRO_DIR", "PINNED_IDS_FILE"]

AVRO_DIR = Path(__file__).parent / "avro"
PINNED_IDS_FILE = Path(__file__).parent / "registry.json"
