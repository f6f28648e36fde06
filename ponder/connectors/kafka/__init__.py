"""Kafka connectors (aiokafka): consumer-group source, decisions sink, changelog, admin."""

from ponder.connectors.kafka.admin import ensure_keyed_topics, ensure_topics, partition_count
from ponder.connectors.kafka.changelog import KafkaChangelog
from ponder.connectors.kafka.reader import read_to_end
from ponder.connectors.kafka.sink import KafkaSink
from ponder.connectors.kafka.source import KafkaSource

__all__ = ["KafkaSource", "KafkaSink", "KafkaChangelog", "ensure_keyed_topics", "ensure_topics", "partition_count", "read_to_end"]
