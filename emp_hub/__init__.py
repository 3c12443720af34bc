"""emp hub: the broker on Redis and the HTTP/WebSocket API over it."""

__version__ = "0.1.0"
