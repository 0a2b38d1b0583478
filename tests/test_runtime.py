"""seqrl.runtime.tune_malloc: a 48 MiB block (above glibc's largest dynamic mmap threshold, 32 MiB) comes from the
heap and stays there after free, read from glibc's own counters (mallinfo2) in a fresh process; nothing changes
off glibc or when the environment already decides."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from seqrl import runtime

HEAP = """
import ctypes, json, sys, torch
from seqrl.runtime import tune_malloc
class Info(ctypes.Structure):
    _fields_ = [(k, ctypes.c_size_t) for k in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
tuned = tune_malloc() if sys.argv[1] == "tuned" else False
before = libc.mallinfo2()
block = torch.ones(12 << 20)  # 48 MiB
held = libc.mallinfo2()
del block
after = libc.mallinfo2()
print(json.dumps({"tuned": tuned, "mapped": held.hblks - before.hblks, "heap_after_free": after.arena}))
"""


def heap_counters(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in runtime.USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", HEAP, mode], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only (this CI machine is glibc)")
def test_large_blocks_come_from_the_heap_and_stay_for_reuse():
    default, tuned = heap_counters("default"), heap_counters("tuned")
    assert default == {**default, "tuned": False, "mapped": 1}  # glibc's default: a fresh mapping
    assert tuned["tuned"] is True and tuned["mapped"] == 0, tuned  # from the heap
    assert tuned["heap_after_free"] >= 48 << 20, tuned  # kept (trim threshold 1 GiB) for the next step


def test_no_change_when_the_environment_decides_or_off_glibc(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda *a: calls.append(a))
    for name in runtime.USER_SETTINGS:
        with monkeypatch.context() as m:
            m.setenv(name, "1")
            assert runtime.tune_malloc() is False
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert runtime.tune_malloc() is False
    monkeypatch.setattr(runtime.platform, "system", lambda: "Darwin")
    assert runtime.tune_malloc() is False
    assert calls == []  # libc never loaded
