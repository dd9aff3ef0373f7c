"""Our SMTP server: listeners, the session state machine, address syntax, AUTH users and the
penalty box for password guessing. It hands typed envelopes to an `Intake` and never talks
to an upstream."""
