"""egress-relay: a self-hosted SMTP relay with policy routing, a durable spool and published egress IPs."""

__version__ = "0.1.0"
