"""emp hub: the broker on Redis and the HTTP/WebSocket API over it."""

import importlib.metadata

#: The `emp` distribution's version: the root pyproject.toml's, the one version of the
#: hub, the worker and the plugins.
__version__ = importlib.metadata.version("emp")
