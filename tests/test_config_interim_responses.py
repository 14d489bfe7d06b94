"""``server.interim_responses``: its values, and what "auto" means."""

from __future__ import annotations

import pytest

from tusd_py.config import ConfigError, load_config


@pytest.mark.parametrize(
    ("behind_proxy", "value", "sends"),
    [("false", "auto", True), ("true", "auto", False), ("true", "always", True), ("false", "never", False)],
)
def test_interim_responses_resolve_against_behind_proxy(behind_proxy: str, value: str, sends: bool) -> None:
    environ = {"TUSD_PY_SERVER_BEHIND_PROXY": behind_proxy, "TUSD_PY_SERVER_INTERIM_RESPONSES": value}
    assert load_config(environ=environ).server.sends_interim_responses() is sends


def test_an_unknown_value_is_a_one_line_error() -> None:
    with pytest.raises(ConfigError) as error:
        load_config(environ={"TUSD_PY_SERVER_INTERIM_RESPONSES": "yes"})
    assert str(error.value) == 'server.interim_responses must be "auto", "always" or "never", got \'yes\''
