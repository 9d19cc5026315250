"""Device ids are checked whole: a trailing newline or a '/' never makes an id (ACL safety)."""

from __future__ import annotations

import pytest
from cryptography import x509

from fleet.pki import DeviceCA
from shared.errors import UsageError
from shared.protocol import ProtocolError, device_topic, parse_device_topic


@pytest.mark.parametrize("bad", ["dev-001\n", "dev-002/up/x", "+", "#", "", "-dev", "a" * 65])
def test_bad_device_ids_get_no_topic_and_no_certificate(tmp_path, bad):
    with pytest.raises(ProtocolError):
        device_topic(bad, "up/state")
    with pytest.raises(UsageError, match="must match"):
        DeviceCA(tmp_path / "pki").issue(bad)


def test_a_valid_id_gets_a_client_certificate_with_that_cn(tmp_path):
    credentials = DeviceCA(tmp_path / "pki").issue("dev-001")
    cert = x509.load_pem_x509_certificate(credentials.cert_pem)
    assert cert.subject.rfc4514_string() == "CN=dev-001"
    assert oct((tmp_path / "pki" / "ca-key.pem").stat().st_mode & 0o777) == "0o600"
    assert parse_device_topic(device_topic("dev-001", "up/state")) == ("dev-001", "up/state")
