"""Delivery: the outbound SMTP client (pooled sessions bound to egress sources, opened with
aiosmtplib, transactions pipelined when offered),
and reply classification."""

from relay.delivery.deliverer import DATA_TIMEOUT, Deliverer
from relay.delivery.resolver import DnsResolver, Resolver

__all__ = ["DATA_TIMEOUT", "Deliverer", "DnsResolver", "Resolver"]
