from continual_transformer.server.security import KeyRing, RateLimiter

ADMIN = "admin-key-0123456789abcdef"
READER = "reader-key-0123456789abcdef"


def test_keys_map_to_roles_and_ids_hide_the_key():
    ring = KeyRing(ADMIN, (READER,))
    admin, reader = ring.caller(ADMIN), ring.caller(READER)
    assert admin.role == "admin" and reader.role == "reader"
    assert admin.id != reader.id and ADMIN not in admin.id and READER not in reader.id
    assert ring.caller(READER) == reader  # stable id: one rate-limit bucket per key
    for wrong in ("", READER[:-1], READER + "x", READER.upper(), "\ud800"):
        assert ring.caller(wrong) is None
    assert KeyRing(None, ()).caller("") is None


def test_token_bucket_allows_bursts_then_the_rate():
    limiter = RateLimiter(per_minute=60, burst=3)  # one token per second
    assert [limiter.retry_after("a", now=100.0) for _ in range(3)] == [None] * 3
    assert limiter.retry_after("a", now=100.0) == 1
    assert limiter.retry_after("b", now=100.0) is None  # buckets are per caller
    assert limiter.retry_after("a", now=101.0) is None  # refilled one token
    assert limiter.retry_after("a", now=101.0) == 1
    assert limiter.retry_after("a", now=200.0) is None  # never more than the burst
    assert [limiter.retry_after("a", now=200.0) for _ in range(3)] == [None, None, 1]
    slow = RateLimiter(per_minute=6, burst=1)
    assert slow.retry_after("a", now=0.0) is None and slow.retry_after("a", now=0.0) == 10
    assert all(RateLimiter(0, 1).retry_after("a") is None for _ in range(1000))  # 0: no limit


def test_idle_callers_are_forgotten():
    limiter = RateLimiter(per_minute=60, burst=2)
    limiter.MAX_CALLERS = 10
    for i in range(11):
        limiter.retry_after(f"address:{i}", now=0.0)
    limiter.retry_after("late", now=10.0)  # everyone else has refilled by now
    assert set(limiter._buckets) == {"late"}
