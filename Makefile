# Targets README names. PYTHON can point at another interpreter (CI uses its own fresh venv).
PYTHON ?= .venv/bin/python
.DEFAULT_GOAL := help

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

venv: .venv/.installed  ## create .venv and install trainwatch with dev extras

.venv/.installed: pyproject.toml
	python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[dev]'
	touch $@

demo: venv  ## the main job on the embedded default (no Kafka server): simulate, detect, print cases
	.venv/bin/trainwatch demo

test:  ## run the test suite (starts the local Kafka broker if none is running)
	$(PYTHON) -m pytest

lint:  ## ruff
	$(PYTHON) -m ruff check .

kafka-start:  ## start the local Kafka broker
	bash deploy/local/kafka.sh start

kafka-stop:  ## stop the local Kafka broker (only if you started it)
	bash deploy/local/kafka.sh stop

kafka-cluster:  ## start a three-broker local Kafka cluster on 9092/9094/9096 (replication 3, min ISR 2)
	bash deploy/local/kafka.sh start --brokers 3

topics:  ## create the pipeline's topics from settings (partitions, replication, configs), then check them
	$(PYTHON) -m pipeline topics create

chaos:  ## kill -9 workers and a broker, stop the store: compare with a clean replay -> benchmarks/results/chaos.json
	$(PYTHON) -m benchmarks.chaos

chaos-quick:  ## the reduced chaos run (a few kills, one of each outage) -> benchmarks/results/chaos-quick.json
	$(PYTHON) -m benchmarks.chaos --quick

bench:  ## full benchmarks -> benchmarks/results/latest.json
	$(PYTHON) -m benchmarks.run

bench-quick:  ## benchmarks in under 3 minutes -> benchmarks/results/quick.json
	$(PYTHON) -m benchmarks.run --quick

fuzz:  ## 100k hostile messages through the ingest core (+10k through the broker) -> benchmarks/results/fuzz_ingest.json
	$(PYTHON) -m benchmarks.fuzz_ingest --kafka 10000

.PHONY: help venv demo test lint kafka-start kafka-stop kafka-cluster topics chaos chaos-quick bench bench-quick fuzz
