"""KafkaSettings' security fields (librdkafka names) as faust broker credentials (aiokafka underneath).

The confluent-kafka clients read `KafkaSettings.client_config()`; faust cannot, so this maps the same settings:
SSL -> SSLCredentials, SASL_PLAINTEXT / SASL_SSL -> SASLCredentials (GSSAPICredentials for GSSAPI), with an
ssl.SSLContext built from the CA / certificate / key locations. PLAINTEXT -> None (faust's default). A few
librdkafka properties in `extra` that change TLS behaviour are honoured; the rest of `extra` is librdkafka-only.
Pure: nothing connects; the files named are read when the context is built.
"""

from __future__ import annotations

import ssl

import faust
from faust.types.auth import CredentialsT

from pipeline.settings import KafkaSettings
from schemas.errors import TrainwatchError

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI")


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext:
    """A client TLS context: the CA file (else the system's), an optional client certificate, and the
    librdkafka switches `enable.ssl.certificate.verification` / `ssl.endpoint.identification.algorithm`."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=kafka.ssl_ca_location)
    if kafka.ssl_certificate_location:
        ctx.load_cert_chain(kafka.ssl_certificate_location, kafka.ssl_key_location,
                            password=kafka.extra.get("ssl.key.password"))
    elif kafka.ssl_key_location:
        raise TrainwatchError("kafka.ssl_key_location is set without kafka.ssl_certificate_location")
    # librdkafka's default (since 1.9) checks the host name; "none" turns that off, as it does for librdkafka.
    if kafka.extra.get("ssl.endpoint.identification.algorithm", "https").lower() == "none":
        ctx.check_hostname = False
    if kafka.extra.get("enable.ssl.certificate.verification", "true").lower() in ("false", "0"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def faust_credentials(kafka: KafkaSettings) -> CredentialsT | None:
    """faust's `broker_credentials` for these settings; None for PLAINTEXT. Raises TrainwatchError when the
    settings are incomplete or name what aiokafka cannot do."""
    proto = kafka.security_protocol.upper()
    if proto not in PROTOCOLS:
        raise TrainwatchError(f"kafka.security_protocol {kafka.security_protocol!r}: expected one of {PROTOCOLS}")
    if proto == "PLAINTEXT":
        return None
    if proto == "SSL":
        return faust.SSLCredentials(ssl_context(kafka))
    mech = (kafka.sasl_mechanism or "PLAIN").upper()  # librdkafka's default mechanism is PLAIN too
    if mech not in SASL_MECHANISMS:
        raise TrainwatchError(f"kafka.sasl_mechanism {kafka.sasl_mechanism!r}: faust supports {SASL_MECHANISMS}")
    ctx = ssl_context(kafka) if proto == "SASL_SSL" else None
    if mech == "GSSAPI":
        return faust.GSSAPICredentials(
            kerberos_service_name=kafka.extra.get("sasl.kerberos.service.name", "kafka"), ssl_context=ctx,
            mechanism=mech)
    if not kafka.sasl_username or kafka.sasl_password is None:
        raise TrainwatchError(f"kafka.security_protocol {proto} with {mech} needs sasl_username and sasl_password")
    return faust.SASLCredentials(username=kafka.sasl_username, password=kafka.sasl_password.get_secret_value(),
                                 ssl_context=ctx, mechanism=mech)
