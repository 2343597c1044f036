"""The API reads its shared objects through the typed dependencies of ``api/deps.py`` only
(so ``app.dependency_overrides`` reaches every route): no other module of ``api/`` reads
``request.app`` or ``app.state`` (``api/app.py`` only builds them)."""

from __future__ import annotations

import re
from pathlib import Path

API = Path(__file__).resolve().parents[2] / "api"


def test_only_the_dependencies_read_the_app_state() -> None:
    pattern = re.compile(r"\b(request\.app|app\.state)\b")
    readers = sorted(
        str(path.relative_to(API))
        for path in API.rglob("*.py")
        if path.name not in ("deps.py", "app.py") and pattern.search(path.read_text())
    )
    assert readers == []
    # app.py only writes the state it builds.
    assert all(
        "=" in line for line in (API / "app.py").read_text().splitlines() if "app.state" in line
    )
