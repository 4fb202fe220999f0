"""The version fence of fedlora's patches of Flower internals (src/fedlora/flower/patches.py): inside TESTED_FLWR
every patch applies; under any other Flower none does, and fedlora says so once per process."""

from __future__ import annotations

import logging
import os
import sys

import pytest
from packaging.specifiers import SpecifierSet

from fedlora.flower import patches


@pytest.fixture
def flower_internals(monkeypatch):
    """Flower's module attributes and keyword defaults the patches change, restored after the test; the warning
    not given yet in this process."""
    import flwr.supercore.superexec.run_superexec as superexec_loop
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.superexec.executor import subprocess_executor
    from flwr.supernode import start_client_internal

    for name in ("time", "subprocess", "_pull_and_store_message"):
        monkeypatch.setattr(start_client_internal, name, getattr(start_client_internal, name))
    monkeypatch.setattr(subprocess_executor, "subprocess", subprocess_executor.subprocess)
    monkeypatch.setattr(superexec_loop, "time", superexec_loop.time)
    waiting = [f for f in vars(inflatable_utils).values()
               if "initial_backoff" in (getattr(f, "__kwdefaults__", None) or {})]
    assert waiting
    for function in waiting:
        monkeypatch.setattr(function, "__kwdefaults__", dict(function.__kwdefaults__))
    monkeypatch.setattr(patches, "_warned", False)

    def state():
        return {"supernode": (start_client_internal.time, start_client_internal.subprocess,
                              start_client_internal._pull_and_store_message),
                "superexec": (subprocess_executor.subprocess, superexec_loop.time),
                "backoff": [dict(f.__kwdefaults__) for f in waiting]}

    return state


def _patch_everything(monkeypatch) -> list[int]:
    """Call every patch function; the file descriptors they and this call opened (to be closed)."""
    opened: list[int] = []
    pipe = os.pipe

    def recorded_pipe():
        ends = pipe()
        opened.extend(ends)
        return ends

    monkeypatch.setattr(os, "pipe", recorded_pipe)
    wake_read, wake_write = os.pipe()  # the SuperExec's end of its SuperNode's wake pipe
    patches.short_object_backoff()
    patches.patch_supernode([sys.executable, "-m", "fedlora.flower.superexec"])
    patches.patch_superexec(lambda: "forking subprocess", str(wake_read))
    monkeypatch.setattr(os, "pipe", pipe)
    return opened


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def test_the_fence_is_the_pyproject_pin_of_flower():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    pin = next(d for d in project["dependencies"] if d.startswith("flwr"))
    assert SpecifierSet(pin.split("]", 1)[1]) == SpecifierSet(patches.TESTED_FLWR)


@pytest.mark.parametrize("version", ["1.41.0", "1.42.0", "1.42.3"])
def test_inside_the_tested_versions_every_patch_applies(flower_internals, monkeypatch, caplog, version):
    monkeypatch.setattr(patches, "flower_version", lambda: version)
    before = flower_internals()
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        fds = _patch_everything(monkeypatch)
    try:
        after = flower_internals()
        time, subprocess, pull = after["supernode"]
        assert isinstance(time, patches.ShortSleeps) and subprocess.command[-1] == "fedlora.flower.superexec"
        assert pull is not before["supernode"][2]
        assert after["superexec"][0] == "forking subprocess"
        assert isinstance(after["superexec"][1], patches.WakeableSleeps)
        assert all(d["initial_backoff"] == patches.OBJECT_BACKOFF and d["backoff_cap"] == patches.OBJECT_BACKOFF_CAP
                   for d in after["backoff"])
        assert not [r for r in caplog.records if r.name == "fedlora"]
    finally:
        _close(fds)


@pytest.mark.parametrize("version", ["1.40.1", "1.43.0", "2.0.0", None, "not a version"])
def test_outside_the_tested_versions_flower_is_left_alone_with_one_warning(flower_internals, monkeypatch, caplog,
                                                                           version):
    monkeypatch.setattr(patches, "flower_version", lambda: version)
    before = flower_internals()
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        fds = _patch_everything(monkeypatch)
        fds += _patch_everything(monkeypatch)  # and again: still one warning in this process
    _close(fds)
    assert flower_internals() == before
    warnings = [r for r in caplog.records if r.name == "fedlora"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "unpatched" in warnings[0].getMessage() and patches.TESTED_FLWR in warnings[0].getMessage()


def test_the_installed_flower_is_a_tested_one():
    assert patches.flower_version() in SpecifierSet(patches.TESTED_FLWR)
