"""KafkaSettings' security fields -> faust broker credentials -> the aiokafka client arguments (no broker needed)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from pipeline.detect.faust_app import make_app
from pipeline.detect.security import faust_credentials
from pipeline.settings import KafkaSettings, Settings
from schemas.errors import TrainwatchError


def _pem(tmp: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate and its key (stands in for a CA and for a client certificate)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    crt, key = tmp / f"{name}.crt", tmp / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True, timeout=60)
    return crt, key


def _auth(k: KafkaSettings) -> dict:
    return credentials_to_aiokafka_auth(faust_credentials(k))


def test_plaintext_is_unchanged() -> None:
    assert faust_credentials(KafkaSettings()) is None
    assert _auth(KafkaSettings(security_protocol="plaintext")) == {"security_protocol": "PLAINTEXT"}


def test_sasl_plaintext_scram() -> None:
    k = KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512", sasl_username="svc",
                      sasl_password="s3cret")
    assert _auth(k) == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
                        "sasl_plain_username": "svc", "sasl_plain_password": "s3cret", "ssl_context": None}
    assert "s3cret" not in repr(faust_credentials(k))


def test_sasl_ssl_trusts_the_configured_ca(tmp_path: Path) -> None:
    ca, _ = _pem(tmp_path, "test-ca")
    auth = _auth(KafkaSettings(security_protocol="SASL_SSL", sasl_username="u", sasl_password="p",
                               ssl_ca_location=str(ca)))
    assert auth["security_protocol"] == "SASL_SSL" and auth["sasl_mechanism"] == "PLAIN"  # librdkafka's default
    ctx = auth["ssl_context"]
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert [dict(x[0] for x in c["subject"]) for c in ctx.get_ca_certs()] == [{"commonName": "test-ca"}]


def test_ssl_client_certificate_and_librdkafka_switches(tmp_path: Path) -> None:
    ca, _ = _pem(tmp_path, "test-ca")
    crt, key = _pem(tmp_path, "client")
    k = KafkaSettings(security_protocol="SSL", ssl_ca_location=str(ca), ssl_certificate_location=str(crt),
                      ssl_key_location=str(key), extra={"ssl.endpoint.identification.algorithm": "none"})
    auth = _auth(k)
    assert auth["security_protocol"] == "SSL"
    assert auth["ssl_context"].verify_mode == ssl.CERT_REQUIRED and not auth["ssl_context"].check_hostname
    # The client certificate is really loaded: a key that does not belong to it is refused.
    _, other_key = _pem(tmp_path, "other")
    with pytest.raises(ssl.SSLError):
        faust_credentials(k.model_copy(update={"ssl_key_location": str(other_key)}))
    off = _auth(KafkaSettings(security_protocol="SSL", ssl_ca_location=str(ca),
                              extra={"enable.ssl.certificate.verification": "false"}))
    assert off["ssl_context"].verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize("kw", [
    {"security_protocol": "SASL_PLAINTEXT", "sasl_username": "u"},  # no password
    {"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER", "sasl_username": "u", "sasl_password": "p"},
    {"security_protocol": "TLS"},
])
def test_incomplete_or_unsupported_settings_fail_early(kw: dict) -> None:
    with pytest.raises(TrainwatchError):
        faust_credentials(KafkaSettings(**kw))


def test_the_app_carries_the_credentials() -> None:
    k = KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u",
                      sasl_password="p")
    app, _ = make_app(Settings(kafka=k, model_path="rule"), app_id="sec-test")
    assert credentials_to_aiokafka_auth(app.conf.broker_credentials)["sasl_plain_username"] == "u"
    app_plain, _ = make_app(Settings(model_path="rule"), app_id="sec-test-plain")
    assert app_plain.conf.broker_credentials is None
