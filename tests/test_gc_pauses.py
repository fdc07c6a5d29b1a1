"""The start-up's imports without the garbage collector's pauses (gc_pauses.py)."""

import gc

from cryorefine.gc_pauses import imports_without_collections


def test_no_collection_inside_then_the_objects_frozen_and_the_collector_back():
    collections = []

    def seen(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    frozen_before = gc.get_freeze_count()
    gc.callbacks.append(seen)
    try:
        with imports_without_collections():
            assert not gc.isenabled()
            kept = [[i] for i in range(100_000)]  # as many new containers as an import makes: gen 0 overflows often
        assert not collections, collections
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen_before + len(kept)
        gc.collect()  # a full collection leaves the frozen objects alone
        assert gc.get_freeze_count() >= frozen_before + len(kept)
    finally:
        gc.callbacks.remove(seen)
        gc.unfreeze()


def test_a_disabled_collector_stays_disabled():
    gc.disable()
    try:
        with imports_without_collections():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()
