"""Triton's cache key made in a thread beside a GPU run's start-up (projection/triton_cache_key.py), against stand-in
Triton modules: the key function is called once, in another thread, and a missing Triton is nothing to do."""

import sys
import threading
import types

from cryorefine.projection import triton_cache_key


def _stand_in(monkeypatch, where: str) -> list[int]:
    calls: list[int] = []

    def triton_key():
        calls.append(threading.get_ident())
        return "key"

    names = ["triton", *(f"triton.{'.'.join(where.split('.')[: i + 1])}" for i in range(where.count(".") + 1))]
    modules = {name: types.ModuleType(name) for name in names}
    for parent, child in zip(names, names[1:]):
        setattr(modules[parent], child.rsplit(".", 1)[1], modules[child])
    modules[names[-1]].triton_key = triton_key
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_the_key_is_made_once_in_another_thread(monkeypatch):
    for where in ("runtime.cache", "compiler.compiler"):  # Triton 3.3+, earlier
        with monkeypatch.context() as m:
            for name in [n for n in sys.modules if n == "triton" or n.startswith("triton.")]:
                m.delitem(sys.modules, name)
            calls = _stand_in(m, where)
            thread = triton_cache_key.start()
            thread.join(10)
            assert thread.daemon and not thread.is_alive()
            assert len(calls) == 1 and calls[0] not in (threading.get_ident(), None), where


def test_without_triton_the_thread_ends(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    thread = triton_cache_key.start()
    thread.join(10)
    assert not thread.is_alive()
