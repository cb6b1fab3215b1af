"""cpu_backend/cachelock.py: processes that add different overloads of one function to Numba's cache at the same
time leave an index whose every entry names its own data. (Without the lock, Numba picks a data file's number from
the index it has read, with no lock, and such a run leaves entries that name another overload's data: seen with
the lock made a no-op.)"""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from tests.conftest import require

require("numba")

from numba.core.caching import IndexDataCacheFile  # noqa: E402

from lenet_gpu.backends.cpu_backend import cachelock  # noqa: E402

WORKERS, KEYS = 4, 40


def _writer(path: str, worker: int) -> None:
    assert cachelock.install()
    f = IndexDataCacheFile(path, "fn-1.py311", ("stamp", 1))
    for k in range(KEYS):
        key = (worker, k)
        f.save(key, key)  # the data is the key itself: a load must give back its own key


@pytest.mark.skipif(cachelock.fcntl is None, reason="no fcntl here: Numba's cache is left as it is")
def test_concurrent_saves_keep_every_entry_its_own_data(tmp_path):
    path = str(tmp_path / "cache")
    os.makedirs(path)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, w)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    f = IndexDataCacheFile(path, "fn-1.py311", ("stamp", 1))
    got = [(key, f.load(key)) for key in f._load_index()]
    assert got and all(key == data for key, data in got), [(k, d) for k, d in got if k != d][:5]
    assert len(got) == WORKERS * KEYS  # every save is in the index
