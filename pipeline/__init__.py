"""Stages, Kafka and ClickHouse adapters, the CLI, the simulator and the in-process runner."""
