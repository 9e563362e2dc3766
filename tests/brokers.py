"""Pytest plugin that starts real brokers (Tansu for Kafka, Google's Pub/Sub emulator) on free ports.

Owned by the messaging work; see tests/messaging/.
"""
