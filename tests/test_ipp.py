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
