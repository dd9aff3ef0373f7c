"""Operator tools inside the relay: the admin HTTP API, queue operations, test connection
(`test-upstream`), domain check and route explanation."""
