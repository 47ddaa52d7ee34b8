"""Data: image readers (PNG/JPEG/DICOM/NIfTI), position zones, QA templates, the PRS-Med layout, synthetic data
and a dataset checker. See docs/data.md. Names are imported on first use, so the CLI's command module stays light."""

from prsmed._lazy import lazy_exports

_WHERE = {
    "Issue": "check", "Report": "check", "check_dataset": "check",
    **{name: "layout" for name in ("MODALITIES", "DatasetError", "Record", "RecordList", "image_for_mask",
                                   "load_records", "manifest_sha256", "write_manifest")},
    **{name: "readers" for name in ("WINDOW_PRESETS", "ImageReadError", "read_image", "read_mask")},
    "synthesize": "synth",
    **{name: "zones" for name in ("ZONES", "ZoneInfo", "zone_from_text", "zone_of_mask", "zones_from_text")},
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
