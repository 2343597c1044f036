"""/v1/usage: what a key has queued, running and stored, against its quotas.

An admin key (``FLOW_COMPRESS_ADMIN_KEYS``) also sees every owner's usage. Owners are the
ids the job store records (a digest of each key, see ``api.auth``), never the keys.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from api.auth import owner_for_key
from api.deps import OwnerDep, SettingsDep, StoreDep
from api.errors import documented
from api.schemas import QuotaLimits, UsageView
from worker.usage import Ledger

router = APIRouter(prefix="/v1/usage", tags=["usage"], responses=documented("unauthorized"))


@router.get("", response_model=UsageView, summary="Your usage and quotas (all keys' for an admin)")
async def get_usage(store: StoreDep, settings: SettingsDep, owner: OwnerDep) -> UsageView:
    ledger = Ledger(store)
    admins = {owner_for_key(k) for k in settings.admin_keys}

    def read() -> UsageView:
        return UsageView(
            usage=ledger.usage(owner),
            limits=QuotaLimits(
                max_active_jobs=settings.quota_jobs, max_stored_bytes=settings.quota_bytes
            ),
            owners=[ledger.usage(o) for o in ledger.owners()] if owner in admins else None,
        )

    return await run_in_threadpool(read)
