"""What the faust detect app keeps in its tables, as plain code over a table's `data` and a changelog send.

- `StageTables`: per input partition, the DetectStage (engine state split by account, `detectors/snapshot.py`, plus
  the records held ahead of the windows and the watermark: table `engine`) and the window partials (table
  `partials`, one entry per partial, `p|workload|window_start|window_id`: each is written once, not the window's
  whole set again with each new partial, which with 4 telemetry partitions was 2.5x the bytes a restart replays).
  `stage(p)` restores a partition's stage (first use in a process), `before_window` fills the merger from the
  table, `save(p)` writes what the batch changed (only the accounts the engine marked, only entries whose bytes
  changed; tombstones for what is gone). An account's re-decide journal (DetectEngine.journal_to_dict) is kept in
  entries of its own so that a batch writes only what it changed: each step `p|s|<account>|<t>` (its windows as
  references to the `partials` table, merged again from there on demand: `window_source`), written when it gets
  inputs; the snapshot the journal rebuilds from, `p|j|<account>|<t>`, written when the journal drops its oldest
  steps (every JOURNAL_REBASE_STEPS windows). The account's entry lists the steps with a checksum of each. A save is
  copy-on-write, so that a kill -9 between any two of its changelog messages leaves a journal that restores: a step
  entry's key carries its checksum (`p|s|<account>|<t>|<crc>`: a step that gains inputs is a new entry, not the old
  one rewritten), the new entries go first, then the account's entry, and only then the tombstones of the entries
  it no longer lists (left over after a kill: tombstoned by the next save). Written in place, a kill between the
  step and the account entry dropped the journal at restore, and a correction then replaced figures only: a crossing
  computed without its late rows stood (quick chaos run h-61: acct-resold dated 124 s late). A restore whose entries
  do not match the account's entry still drops the journal (never replayed wrong). Any entry longer than
  `PIECE_BYTES` is written the same way: its pieces `p|c|<crc>|<i>|<key>` first, then the entry naming them, then
  the tombstones of the pieces it named before (a run's workloads never make a message the broker refuses).
  The partition's shared entry
  (`p|shared`: what waits to settle, how far the stage applied) goes after every account's: a kill in between leaves
  it older than the accounts, never newer (`_save_engine`; tests/test_journal_restore.py kills a save anywhere).
- `OwnersTables`: the owners agent's state (table `owners`): per owner its state and clock, per owners partition the
  source partitions' latest marks (key `*|k`).

No faust import: a table is anything with `.data` (a dict of bytes) and `.send_changelog(partition, key, value)`.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from typing import Any, Protocol

from detectors.classifier_base import WorkloadClassifier
from detectors.owner_aggregate import ALL_OWNERS, EventTimeOwners
from detectors.snapshot import from_split, split_dirty, split_shared
from detectors.windows import merge_partials
from pipeline.detect.stage import DetectStage
from pipeline.settings import Settings
from schemas.policy import Policy
from schemas.windows import WindowAggregate

#: INFO lines on the worker's start (pipeline/detect/startup.py sets its level): shown under the default WARNING
log = logging.getLogger("trainwatch.startup")


class Table(Protocol):
    data: Any

    def send_changelog(self, partition: int | None, key: Any, value: Any) -> Any: ...


class MemoryTable:
    """A `Table` in memory (tests, tools): its data, and the changelog messages sent, in order."""

    def __init__(self, data: dict[bytes, bytes] | None = None) -> None:
        self.data: dict[bytes, bytes] = dict(data or {})
        self.sent: list[tuple[int | None, bytes, bytes | None]] = []

    def send_changelog(self, partition: int | None, key: bytes, value: bytes | None) -> None:
        self.sent.append((partition, key, value))

    @staticmethod
    def after(data: dict[bytes, bytes], msgs: list[tuple[int | None, bytes, bytes | None]]) -> dict[bytes, bytes]:
        """What a table holds once these changelog messages (as `sent` records them) are applied to `data`: a restart
        from the messages that reached the broker before a kill."""
        data = dict(data)
        for _, k, v in msgs:
            if v is None:
                data.pop(k, None)
            else:
                data[k] = v
        return data


def dumps(d: Any) -> bytes:
    # stdlib json: the state holds ±inf (an unset watermark), which orjson would turn into null.
    return json.dumps(d, separators=(",", ":")).encode()


#: A table value longer than this is written zlib-compressed, marked by a leading `Z` (JSON never starts with one).
#: One changelog message must fit the producer's request size (faust's default 1,000,000 bytes, checked before
#: compression): a refused write stops the worker, and it would be refused again after every restart. A large run's
#: account entry grows with its workloads and the windows it remembers (`RunState.seen`, up to 8192): 256 workloads
#: with 60-character ids over 40 windows made a 966 KB entry; compressed, about 9x smaller (tests/test_table_values.py).
PACK_ABOVE = 16 * 1024
_PACKED = b"Z"
#: An engine entry longer than this, as packed, is written in pieces of this size (`p|c|<crc>|<i>|<entry key>`, crc
#: of the whole value), then the entry naming them: however many workloads a run or a partition has, no message
#: nears the topic's limit (8 MiB). An account entry grows ~280 bytes per workload compressed, a partition's shared
#: entry with its settling windows: one run near 20,000 workloads stopped the worker after every restart. Below
#: faust's default request size, so a worker left at the default takes them too.
PIECE_BYTES = 512 * 1024
_PIECES = "_pieces"  # the key of an entry that names its pieces ([crc, count]; no entry of the state has it)


def pack(d: Any) -> bytes:
    """A table value: JSON, compressed when long."""
    raw = dumps(d)
    return raw if len(raw) <= PACK_ABOVE else _PACKED + zlib.compress(raw, 1)


def unpack(v: bytes) -> Any:
    """A table value as `pack` wrote it (plain JSON too: entries written before values were compressed)."""
    return json.loads(zlib.decompress(v[1:]) if v[:1] == _PACKED else v)


class StageTables:
    def __init__(self, engine: Table, partials: Table, settings: Settings, policy: Policy,
                 classifier: WorkloadClassifier | None) -> None:
        self.engine, self.partials, self.settings = engine, partials, settings
        self.policy, self.classifier = policy, classifier
        self.stages: dict[int, DetectStage] = {}
        self.written: dict[bytes, bytes] = {}  # engine entries as last written: a batch writes only changes
        self.shared: dict[int, dict[str, Any]] = {}  # partition -> shared part as last split
        self.touched: dict[int, dict[bytes, WindowAggregate]] = {}  # partition -> partials new in this batch
        #: partition -> (workload, window start) -> partials keys in the table (built when the stage is restored)
        self.index: dict[int, dict[tuple[str, float], list[bytes]]] = {}
        self.bases: dict[bytes, Any] = {}  # journal base entries as last written (the engine's object: by identity)
        self.step_keys: dict[bytes, set[bytes]] = {}  # account entry key -> its journal's step entries written
        self.pieces: dict[bytes, set[bytes]] = {}  # entry key -> the pieces it was written in (PIECE_BYTES)
        self.orphans: dict[int, set[bytes]] = {}  # partition -> pieces no entry names (a kill), to tombstone

    def stage(self, p: int) -> tuple[DetectStage, bool]:
        """Partition p's stage, and whether it was built just now (its owner snapshot is then to be re-sent)."""
        st = self.stages.get(p)
        if st is not None:
            return st, False
        t0 = time.perf_counter()
        # Telemetry partitions are left out of settling when quiet on the wall clock (batch.QuietSources), not
        # when far behind in event time: a fast replay puts a restarting partition minutes behind (DetectStage).
        st = DetectStage(self.policy, self.classifier, self.settings.window_s,
                         self.settings.ingest.allowed_lateness_s, owners="external", partition_wait_s=float("inf"))
        prefix = f"{p}|".encode()
        mine = self._entries(prefix)
        shared = mine.pop(prefix + b"shared", None)
        if shared is not None:
            sh = unpack(shared)
            parts = {k[len(prefix) + 2:].decode(): unpack(v) for k, v in mine.items()
                     if k.startswith(prefix + b"a|")}
            # every journal entry of each account, listed or left over (one pass): the next save tombstones what
            # it no longer lists. Keys: p|s|<account>|<t>|<crc>, p|j|<account>|<t>
            entries: dict[str, set[bytes]] = {}
            for k in mine:
                kind = k[len(prefix):len(prefix) + 2]
                if kind in (b"s|", b"j|"):
                    aid = k[len(prefix) + 2:].rsplit(b"|", 2 if kind == b"s|" else 1)[0].decode()
                    entries.setdefault(aid, set()).add(k)
            for aid, part in parts.items():
                part["journal"] = self._journal_of(prefix, aid, part.get("journal"), mine)
                self.step_keys[prefix + b"a|" + aid.encode()] = entries.get(aid, set())
            st.engine = from_split(sh, parts, self.policy, self.classifier)
            st.watermark = sh["stage_watermark"]
            st.load_held(sh.get("held", []))  # CIP records / allocations ahead of the windows, offsets committed
            self.written.update(mine)
            self.written[prefix + b"shared"] = shared
        idx = self.index[p] = {}
        for k in self.partials.data:
            if k.startswith(prefix):
                _, wid, start, _ = k.decode().split("|", 3)
                idx.setdefault((wid, float(start)), []).append(k)
        for mkey in st.settling:  # windows waiting to settle are applied from their partials: load them now
            self._load_partials(p, st, mkey)
        st.engine.window_source = lambda ref: self._merged(p, st, ref)
        self.stages[p] = st
        # what a restart costs before the first batch can run (benchmarks/chaos.py, detect recovery)
        log.info("detect stage %d restored in %.2f s: %d accounts, %d engine entries, %d partials", p,
                 time.perf_counter() - t0, len(st.engine.accounts), len(mine), len(self.index[p]))
        return st, True

    def _entries(self, prefix: bytes) -> dict[bytes, bytes]:
        """The partition's entries as the stage wrote them (`_whole`). Pieces no entry names now (left by a kill
        between an entry and the tombstones after it) are tombstoned by the next save."""
        raw = {k: v for k, v in self.engine.data.items() if k.startswith(prefix)}
        pieces = {k for k in raw if k.startswith(prefix + b"c|")}
        out: dict[bytes, bytes] = {}
        for k, v in raw.items():
            if k not in pieces:
                out[k], keys = self._whole(k, v)
                if keys:
                    self.pieces[k] = set(keys)
        named = {x for keys in self.pieces.values() for x in keys}
        self.orphans.setdefault(int(prefix[:-1]), set()).update(pieces - named)
        return out

    def _whole(self, k: bytes, v: bytes) -> tuple[bytes, list[bytes]]:
        """Entry k as the stage wrote it, put together again when it names pieces, and the pieces' keys. A piece
        missing or not matching cannot follow from a kill (pieces go before the entry naming them, and are
        tombstoned only after it names others): the state is damaged, and restoring without the entry would lose
        what it holds (an account's runs, the windows waiting to settle), so the restore stops."""
        if v[:1] == _PACKED or not v.startswith(b'{"' + _PIECES.encode()):
            return v, []
        crc, n = unpack(v)[_PIECES]
        keys = [self._piece_key(k, crc, i) for i in range(n)]
        data = self.engine.data
        whole = b"".join(data.get(x, b"") for x in keys)
        if any(x not in data for x in keys) or zlib.crc32(whole) != crc:
            raise RuntimeError(f"engine table: entry {k!r} names {n} pieces (crc {crc}) that the table does not "
                               f"hold whole ({sum(x not in data for x in keys)} missing): it cannot be restored")
        return whole, keys

    @staticmethod
    def _piece_key(key: bytes, crc: int, i: int) -> bytes:
        p, rest = key.split(b"|", 1)
        return p + b"|c|" + str(crc).encode() + b"|" + str(i).encode() + b"|" + rest

    def _write(self, p: int, k: bytes, v: bytes) -> None:
        """One entry to the table and its changelog: in pieces when long (they go first; the pieces it named before
        are tombstoned after it names the new ones)."""
        old = self.pieces.pop(k, set())
        if len(v) > PIECE_BYTES:
            crc = zlib.crc32(v)
            keys = [self._piece_key(k, crc, n) for n in range((len(v) + PIECE_BYTES - 1) // PIECE_BYTES)]
            for n, x in enumerate(keys):  # new content (`written` skips the same): new keys, by its crc
                self.engine.data[x] = piece = v[n * PIECE_BYTES:(n + 1) * PIECE_BYTES]
                self.engine.send_changelog(p, x, piece)
            self.pieces[k] = set(keys)
            old -= set(keys)
            v = dumps({_PIECES: [crc, len(keys)]})
        self.engine.data[k] = v
        self.engine.send_changelog(p, k, v)
        for x in sorted(old):
            self.engine.data.pop(x, None)
            self.engine.send_changelog(p, x, None)

    @staticmethod
    def _step_key(prefix: bytes, aid: str, t: float, crc: int) -> bytes:
        return prefix + b"s|" + aid.encode() + b"|" + repr(float(t)).encode() + b"|" + str(crc).encode()

    @staticmethod
    def _base_key(prefix: bytes, aid: str, t: float) -> bytes:
        return prefix + b"j|" + aid.encode() + b"|" + repr(float(t)).encode()

    def _journal_of(self, prefix: bytes, aid: str, index: Any, mine: dict[bytes, bytes]) -> dict[str, Any] | None:
        """An account's journal from its entries, when they are those its account entry lists (else None)."""
        if not index:
            return None
        base = mine.get(self._base_key(prefix, aid, index[0][0]))
        b = unpack(base) if base is not None else None
        if b is None or b["t"] != index[0][0]:
            return None
        steps = []
        for t, crc in index:
            raw = mine.get(self._step_key(prefix, aid, t, crc))
            if raw is None or zlib.crc32(raw) != crc:
                return None
            steps.append(unpack(raw))
        return {"base": b["base"], "steps": steps}

    def before_window(self, p: int, st: DetectStage, w: WindowAggregate) -> None:
        """The merger keeps the partials of the windows it has met; the others come from the `partials` table."""
        mkey = (w.workload_id, w.window_start)
        self._load_partials(p, st, mkey)
        if w.window_id not in st.merger._parts.get(mkey, {}):
            self.touched.setdefault(p, {})[f"{p}|{w.workload_id}|{w.window_start!r}|{w.window_id}".encode()] = w

    def _load_partials(self, p: int, st: DetectStage, mkey: tuple[str, float]) -> None:
        idx = self.index.setdefault(p, {})
        if mkey not in st.merger._parts and idx.get(mkey):
            st.merger._parts[mkey] = {x.window_id: x for x in (WindowAggregate.model_validate(unpack(
                self.partials.data[k])) for k in idx[mkey] if k in self.partials.data)}

    def _merged(self, p: int, st: DetectStage, ref: Any) -> Any:
        """A journal's window reference merged again from its partials (None: one is gone from the table)."""
        key = (ref["workload_id"], float(ref["window_start"]))
        self._load_partials(p, st, key)
        parts = st.merger._parts.get(key, {})
        if not ref["window_ids"] or any(i not in parts for i in ref["window_ids"]):
            return None
        return merge_partials(parts[i] for i in ref["window_ids"])

    def save(self, p: int, st: DetectStage) -> None:
        self._save_partials(p, st)
        self._save_engine(p, st)

    def _save_partials(self, p: int, st: DetectStage) -> None:
        # Partials older than the allowed lateness can no longer change a window: dropped (tombstones), unless a
        # re-decide journal still holds their window (rebuilt from them after a restart: an account lagging the
        # partition's watermark keeps windows older than the lateness in its journal) or it still waits to settle.
        horizon = st.watermark - self.settings.ingest.allowed_lateness_s - self.settings.window_s
        horizon = min(horizon, st.engine.journal_oldest_window(), *(start for _, start in st.settling))
        idx = self.index.setdefault(p, {})
        for key, w in self.touched.pop(p, {}).items():
            if w.window_start >= horizon:
                val = pack(w.model_dump(mode="json"))
                self.partials.data[key] = val
                self.partials.send_changelog(p, key, val)
                idx.setdefault((w.workload_id, w.window_start), []).append(key)
        for mkey in [m for m in idx if m[1] < horizon]:
            for key in idx.pop(mkey):
                if self.partials.data.pop(key, None) is not None:
                    self.partials.send_changelog(p, key, None)

    def _save_engine(self, p: int, st: DetectStage) -> None:
        """Entries `p|a|<account>` and `p|shared`: only the accounts the engine marked since the last save are
        serialised (`split_dirty`); accounts gone from the state are tombstoned. Journal entries copy-on-write
        (module docstring): new entries, then the account's entry, then (after the shared entry) the tombstones of
        those it no longer lists."""
        prefix = f"{p}|".encode()
        shared, parts, deleted = split_dirty(st.engine)
        if shared is not None or p not in self.shared:
            self.shared[p] = shared if shared is not None else split_shared(st.engine)
        entries: dict[bytes, bytes] = {}
        gone = [prefix + b"a|" + aid.encode() for aid in deleted]
        gone += [k for aid in deleted for k in sorted(self.step_keys.pop(prefix + b"a|" + aid.encode(), set()))]
        later: list[bytes] = []  # tombstones that must follow the entries (copy-on-write)
        for aid, part in parts.items():
            akey = prefix + b"a|" + aid.encode()
            journal = part.get("journal")
            keep: dict[bytes, bytes] = {}
            if journal:
                base, t0 = journal["base"], journal["steps"][0]["t"]
                jkey = self._base_key(prefix, aid, t0)
                if self.bases.get(jkey) is not base:  # a new base (the engine's object changes with it)
                    keep[jkey] = pack({"t": t0, "base": base})
                    self.bases[jkey] = base
                else:
                    keep[jkey] = self.written.get(jkey) or pack({"t": t0, "base": base})
                raws = [pack(s) for s in journal["steps"]]
                part["journal"] = [[s["t"], zlib.crc32(v)] for s, v in zip(journal["steps"], raws, strict=True)]
                keep |= {self._step_key(prefix, aid, t, crc): v
                         for (t, crc), v in zip(part["journal"], raws, strict=True)}
            later += sorted(self.step_keys.pop(akey, set()) - set(keep))
            if keep:
                self.step_keys[akey] = set(keep)
            entries |= keep
            entries[akey] = pack(part)
        # The shared entry last: it holds what waits to settle and how far the stage has applied. Written before
        # the accounts, a kill between them restored a stage that had released windows its accounts never got: their
        # input, read in the batch before, is not read again (2 windows, settle_s, lost from a run's sum: a crossing
        # dated late, an owner's sum that never crossed). Written after, a kill leaves it older than the accounts,
        # and what it releases again is applied again, idempotently (a window as already counted changes nothing).
        entries[prefix + b"shared"] = pack({**self.shared[p], "stage_watermark": st.watermark,
                                           "held": st.held_to_list()})
        for k in gone:
            self._tombstone(p, k)
        for k, v in entries.items():
            if self.written.get(k) != v:
                self.written[k] = v
                self._write(p, k, v)
        for k in later:
            self._tombstone(p, k)
        for k in sorted(self.orphans.pop(p, set())):
            if self.engine.data.pop(k, None) is not None:
                self.engine.send_changelog(p, k, None)

    def _tombstone(self, p: int, k: bytes) -> None:
        self.bases.pop(k, None)
        if k in self.written or k in self.engine.data:
            self.written.pop(k, None)
            self.engine.data.pop(k, None)
            self.engine.send_changelog(p, k, None)
        for x in sorted(self.pieces.pop(k, set())):  # after the entry that named them
            self.engine.data.pop(x, None)
            self.engine.send_changelog(p, x, None)

    def has_state(self, p: int) -> bool:
        """Whether partition p has a stage: met in this process, or checkpointed in the table."""
        return p in self.stages or f"{p}|shared".encode() in self.engine.data

    def recovered_watermarks(self) -> dict[int, float]:
        """Partition -> event time its checkpoint had applied (DetectStage.applied_to, kept in its held list: it
        follows the slowest telemetry partition, not simply the watermark less settle_s), for partitions this
        process has not met yet."""
        out = {}
        for k, v in list(self.engine.data.items()):
            p, rest = k.split(b"|", 1)
            if rest == b"shared":  # not a piece of it (p|c|...)
                out[int(p)] = DetectStage.applied_in(unpack(self._whole(k, v)[0]).get("held", []))
        return out


class OwnersTables:
    def __init__(self, table: Table, owners: EventTimeOwners) -> None:
        self.table, self.owners = table, owners
        self.touched: dict[str, int] = {}
        self.marked: set[int] = set()
        self._held_cache: dict[bytes, tuple[bytes, int | None]] = {}

    def begin(self) -> None:
        """A batch: the owners it touches are loaded from the table (recovered from its changelog)."""
        self.owners.clear()
        self.touched, self.marked = {}, set()

    def load(self, oid: str, k: int) -> None:
        if oid not in self.touched:
            packed = self.table.data.get(oid.encode())
            if packed is not None:
                self.owners.load_owner(oid, unpack(packed))
        self.touched[oid] = k

    def receive(self, m: dict[str, Any], k: int) -> list[Any]:
        """One owner message from owners partition k. A partition mark reaches every owner of k with held messages,
        re-derived from the table (after a kill -9 that is all that releases them)."""
        if str(k) not in self.owners.parts and (pk := self.table.data.get(f"{ALL_OWNERS}|{k}".encode())):
            self.owners.load_parts(k, unpack(pk))
        if m["owner_id"] == ALL_OWNERS:
            for oid in self.held(k):
                self.load(oid, k)
            self.marked.add(k)
        else:
            self.load(m["owner_id"], k)
        return self.owners.receive(m, k)

    def held(self, k: int) -> list[str]:
        """Owners of owners partition k with pending messages in the table (values parsed once per change)."""
        seen: dict[bytes, tuple[bytes, int | None]] = {}
        for key, v in list(self.table.data.items()):
            if key.startswith(ALL_OWNERS.encode()):
                continue
            hit = self._held_cache.get(key)
            if hit is None or hit[0] is not v:
                clock = (unpack(v) or {}).get("clock") or {}
                hit = (v, clock.get("k") if clock.get("pending") else None)
            seen[key] = hit
        self._held_cache = seen
        return sorted(key.decode() for key, (_, kp) in seen.items() if kp == k)

    def save(self) -> None:
        for k in self.marked:
            key = f"{ALL_OWNERS}|{k}".encode()
            self.table.data[key] = pack(self.owners.parts_to_dict(k))
            self.table.send_changelog(k, key, self.table.data[key])
        for oid, k in self.touched.items():
            d = self.owners.owner_to_dict(oid)
            val = pack(d) if d is not None else None
            if val is None:
                self.table.data.pop(oid.encode(), None)
            else:
                self.table.data[oid.encode()] = val
            self.table.send_changelog(k, oid.encode(), val)
