"""A real Apache Kafka broker for development, tests and the demo: see launcher.py."""

from localkafka.launcher import Broker, LauncherError, SaslPlainListener, TlsListener, fetch, running, start, stop

__all__ = ["Broker", "LauncherError", "SaslPlainListener", "TlsListener", "fetch", "running", "start", "stop"]
