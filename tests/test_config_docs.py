"""Every configuration key is documented in docs/operations.md (as `section.key` or
`section[].key` in the configuration reference)."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from pathlib import Path

from mailrelayd.config import Config, HostPort

DOC = Path(__file__).resolve().parents[1] / "docs" / "operations.md"


def _keys(cls: type, prefix: str = "") -> Iterator[str]:
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp = hints[f.name]
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(tp) and tp is not HostPort:
            yield from _keys(tp, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        elif item is not None and dataclasses.is_dataclass(item) and item is not HostPort:
            yield from _keys(item, f"{prefix}{f.name}[].")
        else:
            yield prefix + f.name


def test_every_config_key_is_documented() -> None:
    doc = DOC.read_text()
    keys = list(_keys(Config))
    assert {"delivery.ip_family", "shaping[].max_rate", "routes[].helo_name"} <= set(keys)
    missing = [k for k in keys if f"`{k}`" not in doc]
    assert missing == [], f"keys missing from {DOC.name}: {missing}"
