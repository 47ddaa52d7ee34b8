"""Data: image readers (PNG/JPEG/DICOM/NIfTI), position zones, QA templates, the PRS-Med layout, synthetic data
and a dataset checker. See docs/data.md."""

from prsmed.data.check import Issue, Report, check_dataset
from prsmed.data.layout import (
    MODALITIES,
    DatasetError,
    Record,
    RecordList,
    image_for_mask,
    load_records,
    manifest_sha256,
    write_manifest,
)
from prsmed.data.readers import WINDOW_PRESETS, ImageReadError, read_image, read_mask
from prsmed.data.synth import synthesize
from prsmed.data.zones import ZONES, ZoneInfo, zone_from_text, zone_of_mask, zones_from_text

__all__ = [
    "MODALITIES",
    "WINDOW_PRESETS",
    "ZONES",
    "DatasetError",
    "ImageReadError",
    "Issue",
    "Record",
    "RecordList",
    "Report",
    "ZoneInfo",
    "check_dataset",
    "image_for_mask",
    "load_records",
    "manifest_sha256",
    "read_image",
    "read_mask",
    "synthesize",
    "write_manifest",
    "zone_from_text",
    "zone_of_mask",
    "zones_from_text",
]
