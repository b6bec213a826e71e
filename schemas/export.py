"""JSON Schema export: one file per message type."""

from __future__ import annotations

from pathlib import Path

from schemas import MESSAGE_TYPES
from schemas.serde import dumps


def export_json_schemas(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in MESSAGE_TYPES.items():
        schema = model.model_json_schema()
        schema["$id"] = f"trainwatch/{name}/v{model.SCHEMA_VERSION}"
        path = out_dir / f"{name}.v{model.SCHEMA_VERSION}.schema.json"
        path.write_bytes(dumps(schema, sort_keys=True))
        written.append(path)
    return written
