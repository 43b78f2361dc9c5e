"""FAIRLANE_BROKER_URL names one node or several."""

from __future__ import annotations

import pytest

from fairlane_server.core.amqp_connection import broker_nodes, node_name


def test_one_url_is_one_node() -> None:
    assert broker_nodes("amqp://guest:guest@127.0.0.1:5672/") == [
        "amqp://guest:guest@127.0.0.1:5672/"
    ]


def test_several_hosts_in_one_url_share_credentials_vhost_and_options() -> None:
    assert broker_nodes("amqp://u:p@h1:5681,h2:5682,h3/v1?heartbeat=5") == [
        "amqp://u:p@h1:5681/v1?heartbeat=5",
        "amqp://u:p@h2:5682/v1?heartbeat=5",
        "amqp://u:p@h3/v1?heartbeat=5",
    ]


def test_a_list_of_urls() -> None:
    assert broker_nodes(" amqp://a:b@h1:1/x , amqps://c:d@h2:2/y\namqp://h3:3/ ") == [
        "amqp://a:b@h1:1/x",
        "amqps://c:d@h2:2/y",
        "amqp://h3:3/",
    ]


@pytest.mark.parametrize(
    "setting",
    ["", "  ", "h1:5672", "amqp://u:secret@h1:5672/,h2:1/,amqp://h3/", "amqp://u:p@:5672/"],
)
def test_unreadable_settings_fail_clearly_without_the_password(setting: str) -> None:
    with pytest.raises(ValueError, match="broker URL") as info:
        broker_nodes(setting)
    assert "secret" not in str(info.value)


def test_bad_port_is_named() -> None:
    with pytest.raises(ValueError, match="bad port"):
        broker_nodes("amqp://u:p@h1:56x2/")


def test_node_name_never_shows_credentials() -> None:
    assert node_name("amqp://u:secret@h1:5681/v") == "h1:5681"
    assert node_name("amqps://h2/") == "h2:5671"
