"""emp worker runtime and plugin SDK.

Plugin authors need `hookimpl` (to mark hook functions) and the classes of
`emp_worker.connector`; see docs/plugins.md.
"""

from emp_worker.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl", "hookspec"]
