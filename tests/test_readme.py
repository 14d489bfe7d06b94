"""The README's operator guide stays complete: its key table names every config key
with the default the code has (config.toml is checked the same way in test_config.py)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from tusd_py.config import Config, all_keys, parse_size

README = Path(__file__).resolve().parent.parent / "README.md"
_ROW = re.compile(r"^\| `([a-z0-9_.]+)` \| `([^`]*)` \|", re.MULTILINE)


def test_key_table_lists_every_key_with_its_default() -> None:
    rows = dict(_ROW.findall(README.read_text()))
    assert set(rows) == set(all_keys()), "README's key table and config.py disagree on keys"
    defaults = Config()
    for key, literal in rows.items():
        section_path, name = key.rsplit(".", 1)
        section: object = defaults
        for part in section_path.split("."):
            section = getattr(section, part)
        value = tomllib.loads(f"value = {literal}")["value"]
        expected = getattr(section, name)
        if isinstance(value, str) and not isinstance(expected, str):
            value = parse_size(value, key)
        assert value == expected, f"README shows {key} = {literal}, the default is {expected!r}"


def test_quick_start_is_two_commands() -> None:
    text = README.read_text()
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", quick_start, re.DOTALL)
    assert blocks == ["pip install -c constraints.txt -e . && tusd-py\n", "bash .ci/run\n"]
