"""What the platform is told: the event model, the webhook outboxes and sender, where DSNs
go, suppression lists and message traces (docs/architecture.md, issue 13)."""
