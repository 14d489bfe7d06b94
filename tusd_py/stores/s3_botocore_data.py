"""What botocore keeps of its data files for the S3 store's client: S3's service model
for the calls ``AioS3Client`` makes, and the endpoint data of S3 alone.

For one S3 client botocore loads S3's whole service model (every operation and shape,
with their documentation) and the endpoint data of every AWS service, and keeps them
for the life of the process: about 10 MiB of Python objects (tracemalloc: 6.7 MiB for
``endpoints.json``, 3.2 MiB for S3's ``service-2``), an eighth of what a server with
16 uploads in flight may use (128 MiB). The store's session reads them through
``TrimmingFileLoader``, which keeps only ``OPERATIONS`` and the shapes they reach
(without documentation), and of the endpoint data only S3's. For those operations
botocore serialises, signs and resolves endpoints from exactly the data it would
otherwise use. The trimmed data is kept once per process (so every store and test in
it reads the two large files once).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import PurePath
from typing import Any

from botocore.loaders import JSONFileLoader, Loader

OPERATIONS = frozenset({
    "AbortMultipartUpload", "CompleteMultipartUpload", "CreateMultipartUpload", "DeleteObject", "DeleteObjects",
    "GetObject", "HeadBucket", "HeadObject", "ListMultipartUploads", "ListObjectsV2", "ListParts", "PutObject",
    "UploadPart", "UploadPartCopy",
})
"""The S3 operations ``AioS3Client`` calls; the client has no method for any other."""


def _undocumented(value: Any) -> Any:
    """A copy of a model's ``value`` without its ``documentation`` strings."""
    if isinstance(value, Mapping):
        return {key: _undocumented(item) for key, item in value.items() if key != "documentation"}
    if isinstance(value, list):
        return [_undocumented(item) for item in value]
    return value


def _referenced_shapes(shape: Mapping[str, Any]) -> Iterator[str]:
    """The shapes a shape is made of (structure members, list members, map keys and values)."""
    for member in shape.get("members", {}).values():
        yield member["shape"]
    for part in ("member", "key", "value"):
        if part in shape:
            yield shape[part]["shape"]


def trim_service_model(model: Mapping[str, Any]) -> dict[str, Any]:
    """S3's service model with only ``OPERATIONS`` and the shapes they reach (their
    input, output and errors, and what those are made of), without documentation."""
    operations = {name: operation for name, operation in model["operations"].items() if name in OPERATIONS}
    wanted: list[str] = []
    for operation in operations.values():
        wanted.extend(operation[part]["shape"] for part in ("input", "output") if part in operation)
        wanted.extend(error["shape"] for error in operation.get("errors", []))
    shapes = model["shapes"]
    reached: set[str] = set()
    while wanted:
        name = wanted.pop()
        if name not in reached:
            reached.add(name)
            wanted.extend(_referenced_shapes(shapes[name]))
    trimmed = {key: value for key, value in model.items() if key not in ("operations", "shapes", "documentation")}
    trimmed["operations"] = _undocumented(operations)
    # In the file's order: botocore serialises structure members in model order.
    trimmed["shapes"] = {name: _undocumented(shape) for name, shape in shapes.items() if name in reached}
    return trimmed


def trim_endpoints(data: Mapping[str, Any]) -> dict[str, Any]:
    """``endpoints.json`` with, in every partition, only the S3 service's entry (all
    the legacy endpoint resolver reads for an S3 client)."""
    partitions = [
        {key: value for key, value in partition.items() if key != "services"}
        | {"services": {name: entry for name, entry in partition["services"].items() if name == "s3"}}
        for partition in data["partitions"]
    ]
    return {key: value for key, value in data.items() if key != "partitions"} | {"partitions": partitions}


def _trimmer(file_path: str) -> Callable[[Mapping[str, Any]], dict[str, Any]] | None:
    """How to trim the data file at ``file_path`` (a data path without extension),
    if it is one of the two this module trims."""
    path = PurePath(file_path)
    if path.name == "service-2" and path.parent.parent.name == "s3":
        return trim_service_model
    if path.name == "endpoints":
        return trim_endpoints
    return None


_trimmed: dict[str, Any] = {}
_trimmed_lock = threading.Lock()  # loaders run on worker threads


class TrimmingFileLoader(JSONFileLoader):  # type: ignore[misc]  # botocore is untyped
    """botocore's JSON file loader, except that S3's service model and the endpoint
    data come back trimmed (and are read once per process)."""

    def load_file(self, file_path: str) -> Any:
        trim = _trimmer(file_path)
        if trim is None:
            return super().load_file(file_path)
        with _trimmed_lock:
            if file_path not in _trimmed:
                _trimmed[file_path] = self._load_trimmed(file_path, trim)
            return _trimmed[file_path]

    def _load_trimmed(self, file_path: str, trim: Callable[[Mapping[str, Any]], dict[str, Any]]) -> Any:
        data = super().load_file(file_path)
        if data is None:
            return None
        # Parsed anew from its own JSON once the whole file's objects are gone: kept
        # as the trimmed copy, its strings (shared with the whole file's parse) held
        # most of the memory that parse took (~8 MiB, tracemalloc: 2 MiB live).
        compact = json.dumps(trim(data))
        del data
        return json.loads(compact)


def trimming_loader(search_path_string: str | None) -> Loader:
    """A data loader as ``botocore.loaders.create_loader`` makes it (``AWS_DATA_PATH``
    and the session's ``data_path`` respected), reading through ``TrimmingFileLoader``."""
    paths = None
    if search_path_string:
        paths = [os.path.expanduser(os.path.expandvars(path)) for path in search_path_string.split(os.pathsep)]
    return Loader(extra_search_paths=paths, file_loader=TrimmingFileLoader())
