"""Delivery: the outbound SMTP client (pooled sessions bound to egress sources, opened with
aiosmtplib, transactions pipelined when offered),
reply classification, and RFC 3464 delivery status notifications."""

from relay.delivery.deliverer import DATA_TIMEOUT, Deliverer
from relay.delivery.dsn import build_dsn, should_send_dsn
from relay.delivery.resolver import DnsResolver, Resolver

__all__ = ["DATA_TIMEOUT", "Deliverer", "DnsResolver", "Resolver", "build_dsn", "should_send_dsn"]
