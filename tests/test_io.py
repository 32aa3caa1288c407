"""Read-only file mappings that hold no file descriptor (simfluence._io.map_readonly)."""
from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest

from simfluence._io import map_readonly

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")


def mappings_of(path: Path) -> int:
    with open("/proc/self/maps") as maps:
        return sum(line.rstrip().endswith(str(path)) for line in maps)


def test_a_mapping_holds_no_descriptor_is_read_only_and_lives_as_long_as_its_views(tmp_path):
    path = tmp_path / "values.bin"
    path.write_bytes(np.arange(12, dtype="<f4").tobytes() + b"trailing bytes past the prefix")
    fd = os.open(path, os.O_RDONLY)
    array = map_readonly(fd, np.dtype("<f4"), (3, 4))
    os.close(fd)
    np.testing.assert_array_equal(array, np.arange(12).reshape(3, 4))
    assert not array.flags.writeable
    with pytest.raises(ValueError):
        array.flags.writeable = True
    with pytest.raises(ValueError):
        array[0, 0] = 1.0
    view = array[1:]
    del array
    gc.collect()
    assert mappings_of(path) == 1 and view.sum() == sum(range(4, 12))  # the view keeps the mapping
    del view
    gc.collect()
    assert mappings_of(path) == 0
