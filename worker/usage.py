"""Per-owner usage: stored bytes and active jobs, and the quota check at submission.

Keys (``p`` is the store's prefix)::

    p usage:<owner>      hash: ``bytes`` = upload and artifact bytes the owner has stored
    p jobbytes:<id>      hash: ``uploads`` / ``artifacts`` = bytes a job added (each at most once)
    p owners             set: every owner that ever submitted a job (the operator's view)

Active jobs are not counted separately: they are the sizes of the job store's own
``jobs:<owner>:queued`` and ``jobs:<owner>:running`` indexes, so they cannot drift from the jobs.

Atomicity: ``create_job`` is one Lua script that checks both limits and inserts the job (hash,
indexes, byte counter), so concurrent submissions cannot together pass a limit; ``add`` and
``release`` record a job's bytes once and give them back once, however often a cleanup path
runs (a worker's end of job, the API's cancel and the retention cleaner may all remove the same
uploads). Files stored before this accounting existed are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from worker.events import MAX_EVENTS
from worker.jobs import JobRecord, JobState
from worker.store import JobStore

# KEYS: job, owner index, queued index, running index, usage, jobbytes, owners, idempotency,
#       every owner's queued index (the metrics' jobs-in:queued), the job's event stream
# ARGV: job id, created_at, max jobs, max bytes, upload bytes, owner,
#       binding ("<job id> <request fingerprint>", or "" without an Idempotency-Key), its ttl,
#       event field, event JSON, stream length cap, stream ttl, field1, value1, ...
# The job's first event ("queued") is written with it, as JobStore.create does.
# An Idempotency-Key bound to a job that still exists answers {-4, binding}; the binding and
# the job are written together, so a concurrent request never sees one without the other.
_CREATE = """
if ARGV[7] ~= '' then
  local bound = redis.call('GET', KEYS[8])
  if bound then
    local earlier = string.match(bound, '^(%S+)')
    local job_prefix = string.sub(KEYS[1], 1, #KEYS[1] - #ARGV[1])
    if redis.call('EXISTS', job_prefix .. earlier) == 1 then return {-4, bound} end
  end
end
local active = redis.call('ZCARD', KEYS[3]) + redis.call('ZCARD', KEYS[4])
local max_jobs = tonumber(ARGV[3])
if max_jobs > 0 and active >= max_jobs then return {-1, active} end
local used = tonumber(redis.call('HGET', KEYS[5], 'bytes') or '0')
local max_bytes = tonumber(ARGV[4])
local add = tonumber(ARGV[5])
if max_bytes > 0 and used + add > max_bytes then return {-2, used} end
if redis.call('EXISTS', KEYS[1]) == 1 then return {-3, 0} end
redis.call('HSET', KEYS[1], unpack(ARGV, 13))
redis.call('XADD', KEYS[10], 'MAXLEN', '~', ARGV[11], '*', ARGV[9], ARGV[10])
redis.call('EXPIRE', KEYS[10], ARGV[12])
if ARGV[7] ~= '' then redis.call('SET', KEYS[8], ARGV[7], 'EX', ARGV[8]) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[9], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[7], ARGV[6])
if add > 0 then
  redis.call('HSET', KEYS[6], 'uploads', add)
  redis.call('HINCRBY', KEYS[5], 'bytes', add)
end
return {1, 0}
"""

# KEYS: job, jobbytes ; ARGV: kind, bytes, prefix
_ADD = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return 0 end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HINCRBY', ARGV[3] .. 'usage:' .. owner, 'bytes', ARGV[2])
return 1
"""

# KEYS: job, jobbytes ; ARGV: kind, prefix. The key stays (set to 0) so a later add of the
# same kind is refused: removed files do not come back.
_RELEASE = """
local n = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local owner = redis.call('HGET', KEYS[1], 'owner')
redis.call('HSET', KEYS[2], ARGV[1], 0)
if n > 0 and owner then
  redis.call('HINCRBY', ARGV[2] .. 'usage:' .. owner, 'bytes', -n)
end
return n
"""


class ByteKind(str, Enum):
    uploads = "uploads"
    artifacts = "artifacts"


class QuotaRefusal(str, Enum):
    jobs = "jobs"
    bytes = "bytes"


@dataclass(frozen=True)
class Replayed:
    """The Idempotency-Key is bound to an earlier job: its id and request fingerprint."""

    job_id: str
    fingerprint: str | None


@dataclass(frozen=True)
class Idempotency:
    """An Idempotency-Key to bind to the new job, with the fingerprint of its request."""

    key: str
    fingerprint: str
    ttl_s: int


@dataclass(frozen=True)
class Refused:
    """Why a submission was refused: which limit, and the usage it met."""

    limit: QuotaRefusal
    used: int


class OwnerUsage(BaseModel):
    """One owner's usage (an owner id, never a key)."""

    model_config = ConfigDict(extra="forbid")

    owner: str
    jobs: dict[JobState, int] = Field(..., description="Jobs by state.")
    active_jobs: int = Field(..., description="Queued plus running: what the job quota counts.")
    stored_bytes: int = Field(..., description="Upload and artifact bytes now stored.")


class Ledger:
    """Usage accounting and quota checks over the job store's Redis."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.r = store.r
        self.prefix = store.prefix
        self._create = self.r.register_script(_CREATE)
        self._add = self.r.register_script(_ADD)
        self._release = self.r.register_script(_RELEASE)

    def _usage_key(self, owner: str) -> str:
        return f"{self.prefix}usage:{owner}"

    def _bytes_key(self, job_id: str) -> str:
        return f"{self.prefix}jobbytes:{job_id}"

    def create_job(
        self,
        record: JobRecord,
        *,
        max_jobs: int,
        max_bytes: int,
        upload_bytes: int,
        idempotency: Idempotency | None = None,
    ) -> Refused | Replayed | None:
        """Insert a new queued job, count its uploads and bind ``idempotency``'s key to it,
        all in one step, unless the key already names an existing job (``Replayed``) or a
        limit (0 = unlimited) would be passed (``Refused``); None when the job was created."""
        if record.state is not JobState.queued:
            raise ValueError("a new job starts queued")
        s = self.store
        fields = [item for pair in s._encode(record).items() for item in pair]
        binding, ttl = "", 0
        if idempotency is not None:
            binding = f"{record.id} {idempotency.fingerprint}"
            ttl = idempotency.ttl_s
        idem_key = s._idem_key(record.owner, idempotency.key if idempotency else "")
        events_key, event_field, event = s.streams.event_entry(record)
        status, used = self._create(
            keys=[
                s._job_key(record.id),
                s._owner_key(record.owner),
                s._state_key(record.owner, JobState.queued),
                s._state_key(record.owner, JobState.running),
                self._usage_key(record.owner),
                self._bytes_key(record.id),
                f"{self.prefix}owners",
                idem_key,
                s._all_in_state_key(JobState.queued),
                events_key,
            ],
            args=[
                record.id,
                record.created_at,
                max_jobs,
                max_bytes,
                upload_bytes,
                record.owner,
                binding,
                ttl,
                event_field,
                event,
                MAX_EVENTS,
                s.streams.ttl_s,
                *fields,
            ],
        )
        if status == -4:
            earlier_id, _, fingerprint = str(used).partition(" ")
            return Replayed(earlier_id, fingerprint or None)
        if status == -1:
            return Refused(QuotaRefusal.jobs, int(used))
        if status == -2:
            return Refused(QuotaRefusal.bytes, int(used))
        if status == -3:
            raise ValueError(f"job {record.id} already exists")
        return None

    def add(self, job_id: str, kind: ByteKind, nbytes: int) -> bool:
        """Count ``nbytes`` of ``kind`` for the job's owner, once per job and kind."""
        keys = [self.store._job_key(job_id), self._bytes_key(job_id)]
        return bool(self._add(keys=keys, args=[kind.value, int(nbytes), self.prefix]))

    def release(self, job_id: str, kind: ByteKind) -> int:
        """Give back what ``add`` counted for this job and kind (idempotent); returns it."""
        keys = [self.store._job_key(job_id), self._bytes_key(job_id)]
        return int(self._release(keys=keys, args=[kind.value, self.prefix]))

    def stored_bytes(self, owner: str) -> int:
        return int(self.r.hget(self._usage_key(owner), "bytes") or 0)  # type: ignore[arg-type]

    def active_jobs(self, owner: str) -> int:
        return self.counts(owner)[0]

    def counts(self, owner: str) -> tuple[int, int]:
        """Active (queued + running) jobs and stored bytes, in one round trip."""
        s = self.store
        with self.r.pipeline(transaction=False) as pipe:
            pipe.zcard(s._state_key(owner, JobState.queued))
            pipe.zcard(s._state_key(owner, JobState.running))
            pipe.hget(self._usage_key(owner), "bytes")
            queued, running, stored = pipe.execute()
        return int(queued) + int(running), int(stored or 0)

    def usage(self, owner: str) -> OwnerUsage:
        s = self.store
        with self.r.pipeline(transaction=False) as pipe:
            for state in JobState:
                pipe.zcard(s._state_key(owner, state))
            pipe.hget(self._usage_key(owner), "bytes")
            *counts, stored = pipe.execute()
        jobs = {state: int(n) for state, n in zip(JobState, counts, strict=True)}
        return OwnerUsage(
            owner=owner,
            jobs=jobs,
            active_jobs=jobs[JobState.queued] + jobs[JobState.running],
            stored_bytes=int(stored or 0),
        )

    def owners(self) -> list[str]:
        return sorted(self.r.smembers(f"{self.prefix}owners"))  # type: ignore[arg-type]


__all__ = ["ByteKind", "Ledger", "OwnerUsage", "QuotaRefusal", "Refused"]
