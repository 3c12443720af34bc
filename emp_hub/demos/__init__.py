"""The demos: `emp-demo` (system.py: a hub and three worker processes running a mix of jobs,
shown live) and `emp-broker-demo` (broker.py: the broker alone, in one process)."""
