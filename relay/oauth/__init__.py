"""OAuth 2.0 access tokens for upstreams with `auth: xoauth2` (Microsoft 365, Google).

`flows.py` asks the identity provider (MSAL, google-auth), `broker.py` caches and refreshes
(one refresh at a time), `shared.py` shares tokens between the workers of a machine (files
under the spool) or between nodes (Redis).
"""

from relay.oauth.broker import Token, TokenBroker, login_key
from relay.oauth.flows import TokenError
from relay.oauth.shared import FileShare, RedisShare

__all__ = ["FileShare", "RedisShare", "Token", "TokenBroker", "TokenError", "login_key"]
