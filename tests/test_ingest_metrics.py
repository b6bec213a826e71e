"""The ingest stage's Prometheus endpoint on the real broker: what it reports matches what the stage did."""

from __future__ import annotations

import math
import threading
import time
import urllib.request

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.ingest import synth
from pipeline.ingest.kafka_stage import KafkaIngestStage
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
    close_windows(kafka_bootstrap, tel, 1, T0 + 300)
    n_messages = len(rows) + len(bad) + 5 + 1
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

    assert m[("trainwatch_ingest_samples_total", (("outcome", "decoded"),))] == len(rows) + 1 + 5 + 1
    assert m[("trainwatch_ingest_samples_total", (("outcome", "duplicate"),))] == 5
    assert m[("trainwatch_ingest_samples_total", (("outcome", "kept"),))] == len(rows) + 1  # + the tick
    assert m[("trainwatch_ingest_dead_letters_total", (("reason", "malformed_json"),))] == 1
    assert m[("trainwatch_ingest_dead_letters_total", (("reason", "out_of_range"),))] == 1
    assert m[("trainwatch_ingest_windows_total", ())] == stage.stats.windows > 0
    assert m[("trainwatch_ingest_event_time_seconds", (("partition", "0"), ("topic", tel)))] == T0 + 420
    assert m[("trainwatch_ingest_committed_offset", (("partition", "0"), ("topic", tel)))] > 0
    assert m[("process_resident_memory_bytes", ())] > 0
    with pytest.raises(OSError):  # closed with the stage
        scrape(port)
