"""faust table store: the tables in a dict (as `memory://`) with a local RocksDB copy per partition, so a restarted
worker replays only the changelog's tail instead of the whole changelog (docs/faust.md, Recovery after a restart).

Why not faust's own `rocksdb://`: it picks a write's partition from the current event (`current_event()`), but the
detect app writes tables from batches that mix partitions and from timers (no event), naming the partition in
`send_changelog(partition, ...)` itself (pipeline/detect/tables.py); and it reads from RocksDB on every lookup,
where tables.py scans its tables each batch. Here reads stay in the dict and RocksDB is only the restart cache:
- a changelog message is written to the partition's DB once the broker acknowledged it, in one write batch with its
  offset (the persisted offset faust's recovery seeks to): the DB never holds what the changelog lacks, and a kill
  -9 (the DB's WAL survives a killed process; the OS drops its LOCK) leaves value and offset consistent. The acks
  of one produce response come as a burst of delivery callbacks in one turn of the event loop: they are collected
  and written as one batch per partition at the end of that turn (one RocksDB write per burst, not per message; a
  kill before it leaves the DB at the older offset, and recovery replays from there);
- recovery (faust replaying the changelog from the persisted offset) writes the same way;
- on assignment a partition's DB is loaded into the dict; on revocation its keys leave the dict and the DB closes.
- a DB not written for `STALE_AFTER_S` is dropped (a full replay instead): another worker may have had the partition
  meanwhile, and a compacted changelog keeps a tombstone only `delete.retention.ms` (pipeline/topics.py) after it
  was written, so a tail read from an older offset could miss a delete.

Tables must have bytes keys and values (the detect app's tables do). Selected by `store="trainwatch-local://"`
(pipeline/detect/config.py registers it).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from faust.stores import memory
from faust.types import TP, EventT

log = logging.getLogger("trainwatch.startup")  # shown at the CLI's default level, as the startup phases

OFFSET_KEY = b"__tw_offset__"
SYNCED_KEY = b"__tw_synced_at__"  # wall time of the DB's last write: staleness check at assignment
#: Half the changelogs' delete.retention.ms (5 min, pipeline/topics.py CHANGELOG_CONFIG): a tombstone written after the
#: DB's last write is still in the changelog when the DB is reopened within this time.
STALE_AFTER_S = 150.0
REFRESH_S = 10.0  # how often the open DBs' synced time is refreshed while this worker writes at all
OPEN_RETRIES = 30  # a DB still locked by a worker of this host that is shutting down: retry every 0.5 s


def _rocksdict() -> Any:
    import rocksdict  # the optional native module only where this store is used

    return rocksdict


class LocalStore(memory.Store):
    """In-memory table with a per-partition RocksDB restart cache (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dbs: dict[int, Any] = {}
        self._offsets: dict[int, int] = {}
        self._refreshed = 0.0
        self.loaded: dict[int, int] = {}  # partition -> entries loaded from its DB at the last assignment
        self.dropped: list[int] = []  # partitions whose DB was dropped as stale (a full replay instead)
        #: acknowledged changelog messages not yet in their DB, per partition, in ack order: (key, value, offset)
        self._acked: dict[int, list[tuple[bytes, bytes | None, int]]] = {}
        self._flush_due = False
        self.writes = 0  # RocksDB write batches made, and acknowledged changelog messages written by them
        self.acked = 0
        table = self.table
        orig = table.send_changelog

        def send_changelog(partition: int | None, key: Any, value: Any, *a: Any, **kw: Any) -> Any:
            fut = orig(partition, key, value, *a, **kw)
            if partition is not None:  # the dict's write (tables.py) names no partition: this send does
                self._key_partition[key] = partition
            fut.add_done_callback(lambda f: self._sent(key, value, f))
            return fut

        table.send_changelog = send_changelog  # type: ignore[method-assign]

    # -- paths and DBs
    @property
    def _dir(self) -> Path:
        return Path(self.app.conf.tabledir)

    def _path(self, p: int) -> Path:
        return self._dir / f"{self.table.name}-{p}.rocks"

    def _db(self, p: int) -> Any:
        db = self._dbs.get(p)
        if db is None:
            db = self._dbs[p] = _rocksdict().Rdict(str(self._path(p)))
        return db

    def _write(self, p: int, items: Iterable[tuple[bytes, bytes | None]], offset: int) -> None:
        rd = _rocksdict()
        wb = rd.WriteBatch()
        for k, v in items:
            if v is None:
                wb.delete(k)
            else:
                wb.put(k, v)
        if offset > self._offsets.get(p, -1):
            self._offsets[p] = offset
            wb.put(OFFSET_KEY, offset)
        now = time.time()
        wb.put(SYNCED_KEY, now)
        self._db(p).write(wb)
        self.writes += 1
        if now - self._refreshed > REFRESH_S:  # an idle partition of a busy worker stays fresh too
            self._refreshed = now
            for q, db in list(self._dbs.items()):
                if q != p:
                    db[SYNCED_KEY] = now

    # -- faust's hooks
    def _sent(self, key: Any, value: Any, fut: Any) -> None:
        """A changelog message the broker acknowledged: into its partition's DB with its offset."""
        if fut.cancelled():  # the producer stopping (a stop): not in the changelog, never in the DB
            return
        if fut.exception() is not None:  # not in the changelog: never in the DB (changelog_writes.py stops the worker)
            return
        res = fut.result()
        self.acked += 1
        self._acked.setdefault(res.topic_partition.partition, []).append((key, value, res.offset))
        if self._flush_due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (called directly): written now
            self._flush_acked()
            return
        self._flush_due = True
        loop.call_soon(self._flush_acked)  # after the other callbacks of this burst, already queued

    def _flush_acked(self) -> None:
        """The acknowledged messages collected so far into their partitions' DBs, one write batch each."""
        self._flush_due = False
        acked, self._acked = self._acked, {}
        for p, items in acked.items():
            if p in self._dbs:  # a partition revoked meanwhile is not written
                self._write(p, [(k, v) for k, v, _ in items], max(o for _, _, o in items))

    def persisted_offset(self, tp: TP) -> int | None:
        return self._offsets.get(tp.partition)

    def set_persisted_offset(self, tp: TP, offset: int) -> None:
        """faust calls this when a send is acknowledged; the offset is written with the value in `_sent` instead (a
        kill between two separate writes could leave an offset ahead of its value)."""

    def apply_changelog_batch(self, batch: Iterable[EventT], to_key: Callable[[Any], Any],
                              to_value: Callable[[Any], Any]) -> None:
        events = list(batch)
        self._flush_acked()  # in the order acknowledged: what was sent before the recovery reads
        super().apply_changelog_batch(events, to_key, to_value)
        per: dict[int, list[tuple[bytes, bytes | None]]] = {}
        last: dict[int, int] = {}
        for ev in events:
            p = ev.message.partition
            k = to_key(ev.key)
            per.setdefault(p, []).append((k, None if ev.message.value is None else to_value(ev.value)))
            last[p] = max(last.get(p, -1), ev.message.offset)
        for p, items in per.items():
            self._write(p, items, last[p])

    async def on_rebalance(self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP],
                           generation_id: int = 0) -> None:
        mine = set(self.table.changelog_topic.topics)
        for tp in revoked:
            if tp.topic in mine:
                self._close(tp.partition)
        standbys = self.app.assignor.assigned_standbys()
        for tp in newly_assigned:
            if tp.topic in mine and tp not in standbys and tp.partition not in self._dbs:
                await self._open(tp.partition)

    async def _open(self, p: int) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        for i in range(OPEN_RETRIES):
            try:
                db = self._db(p)
                break
            except Exception as exc:  # rocksdict raises a plain Exception naming the LOCK
                if "lock" not in str(exc).lower() or i == OPEN_RETRIES - 1:
                    raise
                await self.sleep(0.5)
        synced = db.get(SYNCED_KEY)
        if synced is not None and time.time() - float(synced) > STALE_AFTER_S:
            self._close(p)
            shutil.rmtree(self._path(p), ignore_errors=True)
            self.dropped.append(p)
            db = self._db(p)
        n = 0
        for k, v in db.items():
            if k in (OFFSET_KEY, SYNCED_KEY):
                continue
            self.data[k] = v
            self._key_partition[k] = p
            n += 1
        off = db.get(OFFSET_KEY)
        if off is not None:
            self._offsets[p] = int(off)
        self.loaded[p] = n
        log.info("local store %s-%d: %d entries from %s, changelog replay from offset %s%s", self.table.name, p, n,
                 self._path(p), self._offsets.get(p), " (stale DB dropped)" if p in self.dropped else "")

    def _close(self, p: int) -> None:
        self._acked.pop(p, None)
        db = self._dbs.pop(p, None)
        self._offsets.pop(p, None)
        for k in [k for k, q in self._key_partition.items() if q == p]:
            self.data.pop(k, None)
            self._key_partition.pop(k, None)
        if db is not None:
            db.close()

    async def on_stop(self) -> None:
        self._flush_acked()
        log.info("local store %s: %d acknowledged changelog messages in %d RocksDB writes (recovery included)",
                 self.table.name, self.acked, self.writes)
        for p in list(self._dbs):
            db = self._dbs.pop(p)
            db.close()

    def reset_state(self) -> None:
        super().reset_state()
        for p in list(self._dbs):
            self._close(p)
        shutil.rmtree(self._dir, ignore_errors=True)
