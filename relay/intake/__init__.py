"""Intake: from an SMTP transaction to a durable queued message (access checks, attribution,
intake limits, trusted headers, the spool put, the hand-over to the scheduler)."""

from relay.intake.intake import Intake

__all__ = ["Intake"]
