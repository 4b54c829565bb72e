"""Test-only helpers: broker processes, an independent raw MQTT client, paho wrappers."""
