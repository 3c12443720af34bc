"""emp worker runtime and plugin SDK.

Plugin authors need `hookimpl` (to mark hook functions) and the classes of
`emp_worker.connector`; see docs/plugins.md.
"""

from emp_worker.hookspecs import hookimpl, hookspec
from emp_worker.version import version

#: The `emp` distribution's version: the root pyproject.toml's (emp_worker/version.py).
__version__ = version()
#: The version of the plugin contract (the hooks, `emp_worker.connector`,
#: `emp_worker.testing`): the minor goes up when something is added, the major when
#: something is removed or changes meaning. See docs/plugins.md, "Versions".
PLUGIN_API = "1.2"
__all__ = ["PLUGIN_API", "__version__", "hookimpl", "hookspec"]
