"""Run the real hub app under uvicorn on a free port, inside the test's event loop (the
helper plugin authors use too: emp_worker.testing)."""

from emp_worker.testing import running_hub

__all__ = ["running_hub"]
