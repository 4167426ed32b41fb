"""Each process reads only its own settings class (common/settings.py), made of groups; the reference in
docs/configuration.md lists every option once, with the processes that read it."""

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from common.settings import (
    PROCESSES,
    REFERENCE_GROUPS,
    DelivererSettings,
    GatewaySettings,
    InsecureSettings,
    OpsSettings,
    ProducerSettings,
    Settings,
    WorkerSettings,
    check_secrets,
    own_fields,
    readers,
)

DOC = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()


def test_every_option_belongs_to_exactly_one_group():
    listed = [name for group in REFERENCE_GROUPS.values() for name in own_fields(group)]
    assert sorted(listed) == sorted(Settings.model_fields)


def test_each_process_class_is_the_union_of_its_groups():
    for process, settings_class in PROCESSES.items():
        from_groups = {
            name
            for group in REFERENCE_GROUPS.values()
            if process in readers(group)
            for name in own_fields(group)
        }
        assert set(settings_class.model_fields) == from_groups, process


def test_the_reference_lists_each_variable_once():
    reference = DOC[DOC.index("<!-- settings:start") : DOC.index("<!-- settings:end -->")]
    rows = re.findall(r"^\| `(BIREFNET_[A-Z0-9_]+)` \|", reference, re.M)
    assert sorted(rows) == sorted(f"BIREFNET_{name.upper()}" for name in Settings.model_fields)
    assert "Read by: gateway, producer, deliverer, worker, ops." in DOC


def test_a_process_ignores_the_options_of_other_processes(monkeypatch):
    monkeypatch.setenv("BIREFNET_WORKER_CONCURRENCY", "not a number")  # a worker option, broken
    monkeypatch.setenv("BIREFNET_GATEWAY_PORT", "9999")
    assert GatewaySettings().gateway_port == 9999
    assert "worker_concurrency" not in GatewaySettings.model_fields
    with pytest.raises(ValidationError):
        WorkerSettings()
    with pytest.raises(ValidationError):
        Settings()


def test_processes_read_only_what_they_use():
    assert "gateway_port" not in WorkerSettings.model_fields
    assert "device" not in GatewaySettings.model_fields
    assert (
        "sqs_queue_url" not in GatewaySettings.model_fields
        and "sqs_queue_url" in ProducerSettings.model_fields
    )
    assert set(OpsSettings.model_fields) >= {"redis_url", "ops_window_seconds", "webhook_max_retries"}
    assert "s3_endpoint_url" not in DelivererSettings.model_fields


@pytest.mark.parametrize(
    "settings_class", [GatewaySettings, ProducerSettings, DelivererSettings, WorkerSettings]
)
def test_every_checking_process_refuses_the_same_secrets(settings_class):
    good = {
        "gateway_signing_secret": "s" * 32,
        "webhook_signing_keys": ("a" * 64,),
        "allow_dev_secrets": False,
    }
    check_secrets(settings_class(**good), environ={})
    for bad in (
        {"gateway_signing_secret": ""},
        {"webhook_signing_keys": ()},
        {"producer_http_token": "CHANGE-ME"},
        {"redis_password": "changeme"},
    ):
        with pytest.raises(InsecureSettings):
            check_secrets(settings_class(**{**good, **bad}), environ={})
    check_secrets(settings_class(allow_dev_secrets=True), environ={})
