"""What ipyparallel users reach for (issue 16, items 5-9): against the session's real engines."""

from __future__ import annotations

import pytest

from ipy_multiengine import client
from ipy_multiengine.controller import Controller

pytestmark = pytest.mark.timeout(60)


def test_no_private_constructor_keywords_cross_modules(mec):
    """Cluster and attach build their clients with the public from_controller (issue 13)."""
    with pytest.raises(TypeError, match="_controller"):
        client.MultiEngineClient(_controller=mec.controller)
    with pytest.raises(TypeError, match="controller must be a Controller, not str"):
        client.MultiEngineClient.from_controller("nope")
    assert isinstance(mec.controller, Controller)


def test_engine_id_in_every_namespace_kept_across_reset_and_restart(mec):
    # the fixture ran %reset -f: the name came back after that cell
    assert mec.pull("engine_id") == [0, 1, 2, 3]
    assert mec.execute("%who")[0]["stdout"].strip() in ("", "Interactive namespace is empty.")
    mec.execute("del engine_id", targets=2)
    assert mec.pull("engine_id", targets=2) == [2]
    mec.restart(targets=3)
    assert mec.apply(lambda: engine_id, targets=3) == [3]  # noqa: F821 (an engine name)
    assert mec.pull("engine_id") == [0, 1, 2, 3]


def test_scatter_flatten_gives_one_item_parts_as_scalars(mec):
    mec.scatter("my_id", mec.get_ids(), flatten=True)
    assert mec.pull("my_id") == [0, 1, 2, 3]
    mec.scatter("part", list(range(6)), flatten=True)  # parts of two items stay lists
    assert mec.pull("part") == [[0, 1], [2, 3], 4, 5]
    mec.scatter("plain", [7, 8, 9, 10])
    assert mec.pull("plain") == [[7], [8], [9], [10]]
    with pytest.raises(TypeError, match="flatten must be True or False, not 'yes'"):
        mec.scatter("x", [1, 2, 3, 4], flatten="yes")
    assert mec.pull("my_id") == [0, 1, 2, 3]
