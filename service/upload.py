"""The ``image`` field of ``POST /v1/predict``, kept in memory.

BentoML hands a ``pathlib.Path`` parameter to the API as a temporary file it has written the upload to, which the
service then read back: a disk write and read on every prediction. BentoML treats any subclass of ``PurePath`` as
a file field of the multipart form (``_bentoml_sdk.io_models.is_file_type``) but converts only the ``pathlib``
classes themselves to temporary files, so a subclass with its own pydantic schema receives Starlette's
``UploadFile`` as parsed: in memory up to Starlette's spooling size (1 MiB), its bytes read once. BentoML's own
client (``test_bentoml_client``) and the OpenAPI document see a file field as before.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from pydantic_core import core_schema
from starlette.datastructures import UploadFile


class ImageUpload(PurePosixPath):
    """An uploaded file: ``name`` is the client's file name (never a path on this server), ``data`` its bytes."""

    data: bytes = b""

    @classmethod
    def __get_pydantic_core_schema__(cls, _source: Any, _handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(cls.from_form)

    @classmethod
    def __get_pydantic_json_schema__(cls, _schema: Any, handler: Any) -> dict:
        # What BentoML writes for its own file fields: its clients send a field typed "file" as a multipart file.
        return {"type": "file", "format": "binary"} if handler.mode == "validation" else \
            {"type": "string", "format": "binary"}

    @classmethod
    def from_form(cls, value: Any) -> "ImageUpload":
        if isinstance(value, cls):
            return value
        if isinstance(value, UploadFile):
            value.file.seek(0)
            name, data = value.filename or "upload", value.file.read()
        elif isinstance(value, (bytes, bytearray, memoryview)):
            name, data = "upload", bytes(value)
        else:
            raise ValueError(f"expected an uploaded file (a multipart file field), found {type(value).__name__}")
        upload = cls(PurePosixPath(name).name or "upload")  # a client's "../x" names no folder here
        upload.data = data
        return upload
