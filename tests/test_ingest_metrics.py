"""The ingest stage's Prometheus endpoint and `ingest status` on the real broker: they report what the stage did."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
import urllib.request

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.ingest import synth
from pipeline.ingest.aggregate import WindowConfig
from pipeline.ingest.kafka_stage import KafkaIngestStage
from pipeline.ingest.status import group_status
from pipeline.settings import IngestSettings, KafkaSettings, Settings, TopicSettings
from tests.test_ingest_kafka import close_windows, produce

pytestmark = pytest.mark.kafka

T0 = math.floor(time.time() / 60) * 60 - 3600.0


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_report_samples_dead_letters_windows_event_time_and_lag(kafka_bootstrap: str, unique_topic) -> None:
    tel, out, dlq = unique_topic("met-tel"), unique_topic("met-win"), unique_topic("met-dlq")
    rows = synth.samples([synth.WorkloadSpec("wl-a", nodes=2, gpus_per_node=2)], T0, 300, 10.0)
    bad = [(b"n", b"{not json"), (b"n", orjson.dumps(dict(rows[0], tensor_active=7.0, ts=T0 + 1)))]
    produce(kafka_bootstrap, tel, synth.native(rows) + bad + synth.native(rows[:5]))  # the last 5: repeats
    ticks = close_windows(kafka_bootstrap, tel, 1, T0 + 300)  # two samples: two nodes confirm the time
    n_messages = len(rows) + len(bad) + 5 + ticks
    settings = Settings(kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap),
                        topics=TopicSettings(telemetry=tel, windows=out, dlq=dlq),
                        ingest=IngestSettings(metrics_port=0, batch_size=50))
    stage = KafkaIngestStage(settings, group_id=f"met-{tel}")
    stop = threading.Event()
    worker = threading.Thread(target=stage.run, kwargs={"stop": stop.is_set}, daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while stage.metrics_port is None:
            assert time.monotonic() < deadline, "metrics endpoint did not start"
            time.sleep(0.1)
        port = stage.metrics_port
        m: dict = {}
        while True:  # until everything is consumed and the lag reading has caught up with it
            m = scrape(port)
            lag = m.get(("trainwatch_ingest_consumer_lag_messages", (("partition", "0"), ("topic", tel))))
            if m[("trainwatch_ingest_messages_total", ())] == n_messages and lag == 0:
                break
            assert time.monotonic() < deadline, f"stage did not finish: {m}"
            time.sleep(0.3)
    finally:
        stop.set()
        worker.join(30)

    assert m[("trainwatch_ingest_samples_total", (("outcome", "decoded"),))] == len(rows) + 1 + 5 + ticks
    assert m[("trainwatch_ingest_samples_total", (("outcome", "duplicate"),))] == 5
    assert m[("trainwatch_ingest_samples_total", (("outcome", "kept"),))] == len(rows) + ticks  # + the ticks
    assert m[("trainwatch_ingest_dead_letters_total", (("reason", "malformed_json"),))] == 1
    assert m[("trainwatch_ingest_dead_letters_total", (("reason", "out_of_range"),))] == 1
    assert m[("trainwatch_ingest_windows_total", ())] == stage.stats.windows > 0
    assert m[("trainwatch_ingest_outputs_held", ())] == 0  # every output written (tests/test_ingest_kafka.py: held)
    assert m[("trainwatch_ingest_event_time_seconds", (("partition", "0"), ("topic", tel)))] == T0 + 420
    assert m[("trainwatch_ingest_committed_offset", (("partition", "0"), ("topic", tel)))] > 0
    assert m[("process_resident_memory_bytes", ())] > 0
    with pytest.raises(OSError):  # closed with the stage
        scrape(port)


def test_status_reads_the_groups_commits_lag_and_event_time(kafka_bootstrap: str, unique_topic) -> None:
    tel, out, dlq = unique_topic("st-tel", partitions=2), unique_topic("st-win"), unique_topic("st-dlq")
    rows = synth.samples([synth.WorkloadSpec("wl-a", nodes=1, gpus_per_node=2)], T0, 300, 10.0)
    produce(kafka_bootstrap, tel, synth.native(rows), partition=0)
    # Partition 0 only (1 stays empty); the ticks lie past the commit point's hold for re-deliveries
    # (WindowConfig.dedup_replay_s after a window closed), so the data windows no longer hold it.
    ticks = close_windows(kafka_bootstrap, tel, 1, T0 + 300 + WindowConfig().dedup_replay_s)
    settings = Settings(kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap),
                        topics=TopicSettings(telemetry=tel, windows=out, dlq=dlq), ingest=IngestSettings(batch_size=7))
    group = f"st-{tel}"
    before = group_status(settings, group)
    assert [(r.partition, r.committed, r.lag) for r in before] == [(0, None, len(rows) + ticks), (1, None, 0)]
    KafkaIngestStage(settings, group_id=group).run(idle_exit_s=3.0, max_seconds=60)
    p0, p1 = group_status(settings, group)
    assert p0.end == len(rows) + ticks and p0.committed is not None and p0.lag == p0.end - p0.committed
    # The commit sits at the first row of the one window still open (the tick's) and records the event time
    # reached before it (the last data row's): where a restart resumes.
    assert (p0.committed, p0.event_time) == (len(rows), T0 + 290)
    assert (p1.committed, p1.lag, p1.event_time) == (None, 0, None)
    out_cli = subprocess.run([sys.executable, "-m", "pipeline", "ingest", "status", "--group", group, "--json"],
                             capture_output=True, text=True, timeout=60, check=True,
                             env={**os.environ, "TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
                                  "TRAINWATCH_TOPICS__TELEMETRY": tel})
    assert [orjson.loads(line) for line in out_cli.stdout.splitlines()] == [p0.to_dict(), p1.to_dict()]
