"""The S3 store's client keeps only the botocore data it needs (``s3_botocore_data``):
S3's operations it calls, with every shape they reach, and S3's endpoint data."""

from __future__ import annotations

import gc
import re
import tracemalloc
from pathlib import Path
from typing import Any

import botocore.loaders
import pytest
from botocore import xform_name
from botocore.model import ServiceModel, Shape

from tusd_py.stores import s3_botocore, s3_botocore_data
from tusd_py.stores.s3_botocore import AioS3Client
from tusd_py.stores.s3_botocore_data import OPERATIONS, trim_endpoints, trim_service_model

MiB = 1024 * 1024


def test_operations_name_every_call_the_client_makes() -> None:
    source = Path(s3_botocore.__file__).read_text()
    called = set(re.findall(r"self\._client\.([a-z0-9_]+)\(", source))
    assert called and called <= {xform_name(operation) for operation in OPERATIONS}


def _described(shape: Shape, seen: frozenset[str] = frozenset()) -> Any:
    """A shape as botocore serialises it: type, wire names and traits, members in
    order, recursively (without documentation)."""
    if shape.name in seen:
        return shape.name
    seen |= {shape.name}
    described: dict[str, Any] = {
        "type": shape.type_name, "traits": dict(shape.serialization), "metadata": shape.metadata,
    }
    if shape.type_name == "structure":
        described["members"] = [(name, _described(member, seen)) for name, member in shape.members.items()]
    elif shape.type_name == "list":
        described["member"] = _described(shape.member, seen)
    elif shape.type_name == "map":
        described["key"], described["value"] = _described(shape.key, seen), _described(shape.value, seen)
    return described


def test_trimmed_model_describes_each_operation_as_the_full_one() -> None:
    loader = botocore.loaders.Loader()
    full = loader.load_service_model("s3", "service-2")
    trimmed = trim_service_model(full)
    assert set(trimmed["operations"]) == OPERATIONS
    assert len(trimmed["shapes"]) < len(full["shapes"]) / 2
    assert "documentation" not in str(trimmed["operations"]) + str(trimmed["shapes"])
    full_model, trimmed_model = ServiceModel(full, "s3"), ServiceModel(trimmed, "s3")
    for name in OPERATIONS:
        mine, theirs = trimmed_model.operation_model(name), full_model.operation_model(name)
        assert mine.http == theirs.http and mine.http_checksum == theirs.http_checksum
        assert mine.static_context_parameters == theirs.static_context_parameters
        for part in ("input_shape", "output_shape"):
            if getattr(theirs, part) is None:
                assert getattr(mine, part) is None
            else:
                assert _described(getattr(mine, part)) == _described(getattr(theirs, part)), (name, part)
        assert [error.name for error in mine.error_shapes] == [error.name for error in theirs.error_shapes]


def test_trimmed_endpoints_keep_s3_in_every_partition() -> None:
    full = botocore.loaders.Loader().load_data("endpoints")
    trimmed = trim_endpoints(full)
    assert [p["partition"] for p in trimmed["partitions"]] == [p["partition"] for p in full["partitions"]]
    for mine, theirs in zip(trimmed["partitions"], full["partitions"], strict=True):
        assert mine["services"] == ({"s3": theirs["services"]["s3"]} if "s3" in theirs["services"] else {})
        mine.pop("services")
        assert mine == {key: value for key, value in theirs.items() if key != "services"}


async def test_the_store_client_holds_the_trimmed_data_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """What connect leaves in memory: ~12 MiB of Python objects with botocore's data
    read whole, under 4 MiB trimmed (and the big files' objects are freed)."""
    monkeypatch.setattr(s3_botocore_data, "_trimmed", {})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    gc.collect()
    tracemalloc.start()
    try:
        client = await AioS3Client.connect(endpoint_url="http://127.0.0.1:9", region="us-east-1")
        gc.collect()
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        service_model = client._client.meta.service_model
        assert set(service_model.operation_names) == OPERATIONS
        assert kept < 4 * MiB, f"{kept / MiB:.1f} MiB"
    finally:
        await client.close()
