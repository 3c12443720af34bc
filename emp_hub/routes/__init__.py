"""The hub's routes, each module an APIRouter that `emp_hub.app.create_app` includes:
`api` (the HTTP API, health, metrics), `outputs` (job outputs), `worker` (the worker
WebSocket), `legacy_client` and `legacy_monitor` (the emp-redis client and monitor
WebSockets, kept compatible), `docs_ui` (/docs and /redoc). They reach the replica's state
through `Hub` (emp_hub/hub.py)."""
