"""Every error code has one HTTP status, decided in ``api.errors``; none falls back to 500."""

from __future__ import annotations

import pytest

from api.errors import ApiError, status_for
from flow_compress.errors import ErrorCode, FlowCompressError


def test_every_library_and_job_code_has_a_status() -> None:
    for code in ErrorCode:
        assert 400 <= status_for(code) < 600, code
    assert status_for(ErrorCode.INVALID_CONFIG) == status_for("invalid_config") == 422
    assert ApiError.from_library(FlowCompressError("boom")).status == 500


def test_an_unknown_code_fails_where_it_is_raised() -> None:
    with pytest.raises(KeyError, match="no_such_code"):
        status_for("no_such_code")
    with pytest.raises(KeyError, match="no_such_code"):
        ApiError("no_such_code", "a typo must not become a silent 500")
