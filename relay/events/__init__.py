"""Events: the mail log (one JSON line per disposition) and the Prometheus metrics."""

from relay.events.maillog import MailLog
from relay.events.metrics import Metrics

__all__ = ["MailLog", "Metrics"]
