"""A trial Tune ends leaves its workers' placement group behind (the Train controller that made it dies with
the trial's actor, and a group made by an actor lives until its job ends): the sweep frees exactly those.

Real Ray: actors that create real placement groups and are really killed; no part of Ray is replaced."""

from __future__ import annotations

import time

import pytest

from raytune_ft.sweep import tune as sweep_tune

pytestmark = pytest.mark.ray


def _maker(ray):
    @ray.remote(num_cpus=0)
    class Maker:  # stands in for a Train controller: an actor that makes its workers' placement group
        def make(self) -> str:
            from ray.util.placement_group import placement_group

            self.pg = placement_group([{"CPU": 1}])
            ray.get(self.pg.ready(), timeout=60)
            return self.pg.id.hex()

    return Maker


def _state(ray, pg_hex: str) -> str:
    from ray.util.placement_group import placement_group_table

    return placement_group_table().get(pg_hex, {}).get("state", "gone")


def _wait_state(ray, pg_hex: str, want: str, timeout: float = 20.0) -> str:
    deadline = time.time() + timeout
    state = _state(ray, pg_hex)
    while state != want and time.time() < deadline:
        time.sleep(0.2)
        state = _state(ray, pg_hex)
    return state


def test_groups_of_dead_actors_are_freed_and_live_ones_kept(ray_local):
    ray = ray_local
    from ray.util.placement_group import placement_group, remove_placement_group

    cpus = ray.cluster_resources()["CPU"]
    Maker = _maker(ray)
    dead, live = Maker.remote(), Maker.remote()
    dead_pg, live_pg = ray.get(dead.make.remote()), ray.get(live.make.remote())
    own = placement_group([{"CPU": 1}])  # the driver's own group: never touched
    ray.get(own.ready(), timeout=60)
    try:
        ray.kill(dead)
        # what Ray does on its own: the dead actor's group stays and holds its CPU (ray-project/ray#54305)
        time.sleep(2)
        assert _state(ray, dead_pg) == "CREATED"
        assert ray.available_resources().get("CPU", 0) == cpus - 3

        freed = sweep_tune.release_ended_trials(timeout_s=0)
        assert freed == 1
        assert _wait_state(ray, dead_pg, "REMOVED") == "REMOVED"
        assert _state(ray, live_pg) == "CREATED"
        assert _state(ray, own.id.hex()) == "CREATED"
        assert sweep_tune.free_orphaned_placement_groups() == 0  # nothing left to free
    finally:
        ray.kill(live)
        remove_placement_group(own)
    assert sweep_tune.release_ended_trials(timeout_s=20) == 1  # the live one's, once it died
    assert _wait_state(ray, live_pg, "REMOVED") == "REMOVED"
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) != cpus and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == cpus


def test_the_sweeps_end_waits_for_a_dying_trial(ray_local):
    """Ctrl-C: Tune ends the trial's actor as the sweep returns, and its controller dies a moment later. The
    sweep's end waits for that death and frees the group, rather than missing it by a moment."""
    ray = ray_local
    Maker = _maker(ray)
    dying = Maker.remote()
    pg = ray.get(dying.make.remote())
    ray.kill(dying)  # returns at once; the actor dies asynchronously
    assert sweep_tune.release_ended_trials(timeout_s=20) == 1
    assert _wait_state(ray, pg, "REMOVED") == "REMOVED"
