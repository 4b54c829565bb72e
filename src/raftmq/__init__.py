"""raftmq: an MQTT 5.0 / 3.1.1 / 3.1 broker cluster on Raft."""

__version__ = "0.1.0"
