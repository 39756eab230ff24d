"""State that the replicas of a gateway (and the workers of each) must agree on, kept in Redis
when `redis_url` is set: the lockout's failed logins (gateway.shared.lockout) and the token
revocations (gateway.shared.revocations), over one connection (gateway.shared.link). See
docs/replicas.md for what is shared, what stays per process, and what happens while Redis is
unreachable."""
