"""The provider's inventory: who owns a workload, device or node, for telemetry whose labels lack the account.

File format (JSON, IngestSettings.inventory_path):
`{"workloads": {workload_id: account_id}, "devices": {uuid: account_id}, "nodes": {hostname: account_id}}`.
Lookup order: workload, then device, then node (a node can be shared by tenants; a workload cannot).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from schemas.serde import loads


@dataclass(slots=True)
class Inventory:
    workloads: dict[str, str] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None) -> Inventory:
        if path is None:
            return cls()
        d = loads(Path(path).read_bytes())
        return cls(workloads=dict(d.get("workloads", {})), devices=dict(d.get("devices", {})),
                   nodes=dict(d.get("nodes", {})))

    def account(self, workload: str | None, device: str | None, node: str | None) -> str | None:
        return self.workloads.get(workload) or self.devices.get(device) or self.nodes.get(node)  # type: ignore[arg-type]

    def fill_accounts(self, workloads: list, devices: list, nodes: list, accounts: list) -> None:
        """Fill missing accounts in place."""
        if not (self.workloads or self.devices or self.nodes):
            return
        for i, a in enumerate(accounts):
            if a is None:
                accounts[i] = self.account(workloads[i], devices[i], nodes[i])
