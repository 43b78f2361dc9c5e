"""freeze_startup_objects: what a service holds once started is kept out of every later
collection, after the garbage of start-up has been collected."""

from __future__ import annotations

import gc
import weakref

from fairlane_server.core.runtime import freeze_startup_objects, space_full_collections


class _Node:
    me: _Node | None = None


def _tracked(obj: object) -> bool:
    """Whether a collection of any generation would walk `obj` (frozen ones are not)."""
    return any(o is obj for o in gc.get_objects())


def test_survivors_are_frozen_and_startup_garbage_is_collected() -> None:
    survivor = _Node()
    cycle = _Node()
    cycle.me = cycle
    garbage = weakref.ref(cycle)
    del cycle
    try:
        frozen = freeze_startup_objects()
        assert frozen == gc.get_freeze_count()
        assert frozen > 0
        assert garbage() is None, "cyclic garbage must be freed before freezing"
        assert not _tracked(survivor)
        later = _Node()
        assert _tracked(later)
    finally:
        gc.unfreeze()
    assert _tracked(survivor)


def test_full_collections_are_spaced_and_the_young_generations_kept() -> None:
    before = gc.get_threshold()
    try:
        space_full_collections(100)
        assert gc.get_threshold() == (before[0], before[1], 100)
    finally:
        gc.set_threshold(*before)
