"""Run the real hub app under uvicorn on a free port, inside the test's event loop (the
helper plugin authors use too: emp_hub.testing)."""

from emp_hub.testing import running_hub

__all__ = ["running_hub"]
