from tests.worker.support import key_prefix, redis_url

__all__ = ["key_prefix", "redis_url"]
