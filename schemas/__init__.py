"""Message and record models of trainwatch, their JSON encoding and JSON Schema export. Imports nothing of ours."""

from schemas.allocation import AllocationEvent
from schemas.base import Message
from schemas.case import Case, CaseEvent
from schemas.cip import BeneficialOwner, CipRecord, IpAccess, Reseller
from schemas.detection import Detection
from schemas.errors import ArtifactError, InvalidMessage, PolicyError, TrainwatchError
from schemas.policy import Policy, load_policy, shipped_policies
from schemas.telemetry import TelemetryBatch, TelemetryColumns, TelemetrySample
from schemas.windows import WindowAggregate

#: Every message type, by the name its JSON Schema file gets.
MESSAGE_TYPES: dict[str, type[Message]] = {
    "telemetry_sample": TelemetrySample,
    "telemetry_batch": TelemetryBatch,
    "telemetry_columns": TelemetryColumns,
    "allocation_event": AllocationEvent,
    "cip_record": CipRecord,
    "window_aggregate": WindowAggregate,
    "detection": Detection,
    "case": Case,
    "case_event": CaseEvent,
}

__all__ = [
    "MESSAGE_TYPES",
    "AllocationEvent",
    "ArtifactError",
    "BeneficialOwner",
    "Case",
    "CaseEvent",
    "CipRecord",
    "Detection",
    "InvalidMessage",
    "IpAccess",
    "Message",
    "Policy",
    "PolicyError",
    "Reseller",
    "TelemetryBatch",
    "TelemetryColumns",
    "TelemetrySample",
    "TrainwatchError",
    "WindowAggregate",
    "load_policy",
    "shipped_policies",
]
