"""Replies the server sends from more than one place: RFC 5321 § 4.2 codes with RFC 3463
enhanced codes. Tests compare against these names."""

R_SHUTDOWN = "421 4.3.2 Service shutting down, closing connection"
R_TIMEOUT = "421 4.4.2 Timeout exceeded, closing connection"
R_TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
R_TOO_MANY_AUTH_FAILURES = "421 4.7.0 Too many authentication failures, closing connection"
R_TOO_MANY_UNKNOWN = "421 4.7.0 Too many unrecognized commands, closing connection"
R_NEED_HELO = "503 5.5.1 Error: send HELO/EHLO first"
R_LINE_TOO_LONG = "500 5.5.2 Line too long (RFC 5321 section 4.5.3.1.6)"
R_COMMAND_TOO_LONG = "500 5.5.2 Command line too long"
R_BAD_SYNTAX = "500 5.5.2 Error: bad syntax"
R_UNKNOWN_COMMAND = "500 5.5.1 Error: command not recognized"  # never echoed: it may hold a CR
R_NEED_STARTTLS = "530 5.7.0 Must issue a STARTTLS command first"
R_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
# 5.6.0 ("other media error", RFC 3463 § 3.7): a registered code for a content format we
# refuse; see the module docstring for why bare CR/LF is refused at all.
R_BARE_NEWLINE = "554 5.6.0 Bare CR or LF in message not accepted (RFC 5321 section 2.3.8)"
# A NUL is no text (RFC 5322 § 2.3 forbids it in a message); a lenient next hop may take it
# for the end of a line or of the data. Hardened Postfix: message_reject_characters = \0.
R_NUL = "554 5.6.0 NUL character in message not accepted"
# A client that pipelined text after a DATA we refused (RFC 2920 § 3.1: the text waits for
# the 354): it is not commands, so it is dropped and the session ends (Postfix
# smtpd_forbid_unauth_pipelining).
R_PIPELINED_AFTER_DATA = (
    "421 4.5.0 Input pipelined after a refused DATA discarded, closing connection"
)
