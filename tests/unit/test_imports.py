"""``sstuning_imports.fresh()``, what keeps a long-running minion on the
engines it last synced: two real modules of the engines' prefix written to a
directory on sys.path, imported inside ``fresh()``, one of them changed on
disk (as ``saltutil.sync_all`` would), imported again. sys.modules, sys.path
and the stamps on the real engines are put back afterwards."""

import importlib
import os
import sys

import pytest

import sstuning_imports as imports

A, B, C = "sstuning_zz_a", "sstuning_zz_b", "sstuning_zz_c"
_MISSING = object()


@pytest.fixture
def modules(tmp_path):
    saved_path = list(sys.path)
    saved = {name: module for name, module in sys.modules.items() if name.startswith(imports.PREFIX)}
    stamps = {name: module.__dict__.get(imports._STAMP, _MISSING) for name, module in saved.items()}
    (tmp_path / f"{A}.py").write_text("VALUE = 1\n")
    # b holds a's objects: it must be forgotten with a, or it would keep calling the old a.
    (tmp_path / f"{B}.py").write_text(f"import {A} as a\n\n\ndef value():\n    return a.VALUE\n")
    (tmp_path / f"{C}.py").write_text("VALUE = 1\n")
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        yield tmp_path
    finally:
        sys.path[:] = saved_path
        for name in [name for name in sys.modules if name.startswith(imports.PREFIX)]:
            del sys.modules[name]
        sys.modules.update(saved)
        for name, module in saved.items():
            if stamps[name] is _MISSING:
                module.__dict__.pop(imports._STAMP, None)
            else:
                setattr(module, imports._STAMP, stamps[name])
        importlib.invalidate_caches()


def load():
    with imports.fresh():
        return importlib.import_module(A), importlib.import_module(B)


def change(path, text):
    """New content and a later mtime, the way a sync replaces a file."""
    before = os.stat(path)
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))


def test_a_changed_engine_file_is_imported_again_with_the_engines_that_use_it(modules):
    a1, b1 = load()
    assert (a1.VALUE, b1.value()) == (1, 1)
    # Nothing changed: the same module objects, nothing imported again.
    a, b = load()
    assert a is a1 and b is b1
    change(modules / f"{A}.py", "VALUE = 2\n")  # the same size: only content and mtime tell
    a2, b2 = load()
    assert a2 is not a1 and b2 is not b1
    assert (a2.VALUE, b2.value()) == (2, 2)  # both run the new code
    a, b = load()
    assert a is a2 and b is b2


def test_a_vanished_engine_file_makes_every_engine_load_again(modules):
    a1, b1 = load()
    os.unlink(modules / f"{B}.py")
    importlib.invalidate_caches()
    with imports.fresh():
        assert B not in sys.modules and A not in sys.modules
        assert importlib.import_module(A) is not a1
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(B)


def test_an_engine_imported_outside_fresh_is_taken_as_it_is_then_stamped(modules):
    c1 = importlib.import_module(C)  # a test or a benchmark did this
    change(modules / f"{C}.py", "VALUE = 2\n")
    with imports.fresh():
        c = importlib.import_module(C)
    assert c is c1 and c.VALUE == 1  # no stamp yet: nothing to compare with
    assert getattr(c1, imports._STAMP) == imports._stamp(c1)
    change(modules / f"{C}.py", "VALUE = 3\n")
    with imports.fresh():
        c = importlib.import_module(C)
    assert c is not c1 and c.VALUE == 3
