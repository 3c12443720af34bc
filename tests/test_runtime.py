"""What start-up built, out of the garbage collector's reach (emp_protocol/runtime.py):
once per process, in the hub and in the worker."""

from __future__ import annotations

import gc

from emp_connector_simulation import SimulationConnector, SimulationSettings

from emp_hub.settings import HubSettings
from emp_hub.testing import running_hub, running_worker
from emp_protocol.runtime import freeze_startup_objects


def test_start_up_is_frozen_once_a_process() -> None:
    gc.unfreeze()
    assert freeze_startup_objects() is True
    frozen = gc.get_freeze_count()
    assert frozen > 1000  # the modules imported, their classes and functions
    later = [object() for _ in range(100)]
    assert freeze_startup_objects() is False  # done: what is made later is collected as ever
    assert gc.get_freeze_count() == frozen and gc.is_tracked(later)


async def test_a_hub_freezes_its_start_up_and_so_does_a_worker(hub_settings: HubSettings) -> None:
    gc.unfreeze()
    async with running_hub(hub_settings) as url:
        assert gc.get_freeze_count() > 0  # its lifespan did, once started
        gc.unfreeze()
        connector = SimulationConnector(SimulationSettings(duration=0, steps=1))
        async with running_worker(url, [connector]):
            assert gc.get_freeze_count() > 0  # once its connectors started
