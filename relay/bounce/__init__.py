"""Bounces: RFC 3464 delivery status notifications for recipients that bounced or expired,
queued back through the spool like any other message."""
