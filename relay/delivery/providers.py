"""What a reply from a known provider means, and what a person should do about it (pure).

`classify(upstream, reply)` returns a `Verdict`: a class from the vocabulary shared with the
event classes (relay/delivery/replyclass.py, issue 13): hard, soft, auth, policy, spam,
quota, rate, dns, network, tls, expired; whether the whole upstream must pause (a
credential, configuration or daily-sending-limit problem: every message would fail the same way,
so none is tried, none is bounced, and no retry is burned until it is fixed); and a plain
next step. Rules per provider profile (microsoft365, google-workspace, gmail,
google-smtp-relay) and for the SendGrid and Mailjet presets, then generic rules. Token
errors arrive as our own `454 4.7.0 token request to … failed: AADSTS…` replies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.core.model import Reply, Upstream, UpstreamPause
from relay.delivery.replyclass import CLASSES, reply_class

KINDS = CLASSES  # relay/delivery/replyclass.py: one vocabulary for events and pauses
MICROSOFT = ("microsoft365",)
GOOGLE = ("google-workspace", "gmail", "google-smtp-relay")
LIMIT_PAUSE = 3600.0  # a daily sending limit: look again in an hour


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: str
    pause: bool = False
    next_step: str = ""
    seconds: float | None = None  # for a pause: None = until fixed (test, delivery, reload)

    def as_pause(self, reply: Reply) -> UpstreamPause | None:
        if not self.pause:
            return None
        return UpstreamPause(self.kind, str(reply), self.next_step, self.seconds)


def _secret_ref(u: Upstream) -> str:
    if u.oauth is not None:
        refs = [s.source for s in u.oauth.secrets()]
        return " / ".join(refs) or "(no secret)"
    return u.password.source if u.password else "(no password configured)"


_AADSTS: dict[str, str] = {
    "AADSTS7000215": "the client secret is wrong: in Entra (App registrations → Certificates &"
    " secrets) create a new secret, put its Value (not its ID) in {ref}, then `relay reload`",
    "AADSTS7000222": "the client secret has expired: create a new one in Entra, put its Value"
    " in {ref}, then `relay reload`",
    "AADSTS65001": "no consent: a Microsoft 365 administrator must grant admin consent to the"
    " app's SMTP.SendAsApp permission (Entra → App registrations → API permissions)",
    "AADSTS700016": "client_id {client} is not an application in tenant {tenant}: check"
    " client_id and tenant in the policy file",
    "AADSTS90002": "tenant {tenant} does not exist: check tenant (its id or domain)",
    "AADSTS700027": "the certificate is not the one registered for the app: check"
    " certificate_key and certificate_thumbprint",
    "AADSTS70000": "the refresh token is no longer valid: the mailbox owner must consent"
    " again; put the new refresh token in {ref}, then `relay reload`",
    "AADSTS50173": "the refresh token was revoked (password changed?): the mailbox owner"
    " must consent again; put the new refresh token in {ref}, then `relay reload`",
}
_AADSTS_CODE = re.compile(r"\bAADSTS\d+\b")


def _token_verdict(u: Upstream, text: str) -> Verdict:
    o = u.oauth
    fill = {"ref": _secret_ref(u), "client": (o.client_id if o else None) or "?",
            "tenant": (o.tenant if o else None) or "?"}
    code = _AADSTS_CODE.search(text)
    if code and code.group(0) in _AADSTS:
        return Verdict("auth", True, _AADSTS[code.group(0)].format(**fill))
    if "unauthorized_client" in text and u.provider in GOOGLE:
        return Verdict("auth", True, "domain-wide delegation is not set up for this service"
                       " account: in the Google Admin console (Security → API controls →"
                       " Domain-wide delegation) add its client id with the scope"
                       f" https://mail.google.com/, and check username {u.username}")
    if "invalid_grant" in text:
        return Verdict("auth", True, "the identity provider refused the grant (a revoked or"
                       f" expired refresh token, or a bad service account key): renew {fill['ref']},"
                       " then `relay reload`")
    return Verdict("auth", True, "the identity provider refused the token request; its own"
                   f" words are above: check the oauth settings and {fill['ref']}")


def classify(u: Upstream, reply: Reply) -> Verdict:
    text = reply.text
    low = text.lower()
    enh = reply.enhanced or ""
    provider = u.provider or ""
    oauth = u.auth == "xoauth2"
    if 200 <= reply.code < 300:
        return Verdict("delivered")
    if "token request to " in low:
        if enh == "4.4.1":
            return Verdict("network", False, "the token endpoint did not answer; retried")
        return _token_verdict(u, text)

    # -- Microsoft 365 / Exchange Online ------------------------------------------------
    if provider in MICROSOFT or "outlook" in u.host or "office365" in u.host:
        if "5.7.30" in text:
            return Verdict("auth", True, "the tenant turned Basic auth off: switch this upstream"
                           " to `auth: xoauth2` (Microsoft Entra app-only, see README)")
        if "5.7.139" in text:
            if "smtpclientauthentication is disabled" in low:
                return Verdict("auth", True, f"SMTP AUTH is disabled for {u.username} or the"
                               " tenant: enable Authenticated SMTP for the mailbox (Set-CASMailbox"
                               " -SmtpClientAuthenticationDisabled $false), or switch to"
                               " `auth: xoauth2`")
            return Verdict("auth", True, "Microsoft 365 refused the login (Basic auth disabled,"
                           " Security Defaults, or wrong credentials): switch this upstream to"
                           " `auth: xoauth2`")
        if "5.7.3" in text and reply.code == 535:
            if oauth:
                return Verdict("auth", True, "Exchange refused the token: the app needs the"
                               " SMTP.SendAsApp permission with admin consent, a service principal"
                               " in Exchange (New-ServicePrincipal) and FullAccess or SendAs on"
                               f" {u.username} (Add-MailboxPermission)")
            return Verdict("auth", True, f"the username {u.username} or the secret"
                           f" {_secret_ref(u)} was refused")
        if "5.7.57" in text:
            return Verdict("auth", True, "Exchange wants an authenticated client: give this"
                           " upstream a username and credentials (auth: xoauth2)")
        if "5.7.60" in text or "sendasdenied" in low:
            return Verdict("policy", True, f"{u.username} may not send as this sender: set"
                           " from_address to the mailbox, or grant it Send As")
        # (not 5.2.2: that is one recipient's full mailbox, not our sending limit)
        if "submissionquotaexceeded" in low or "5.1.90" in text:
            return Verdict("rate", True, "the mailbox reached its sending limit"
                           " (10,000 recipients a day); mail waits", LIMIT_PAUSE)
        if "5.7.708" in text or "5.7.750" in text:
            return Verdict("policy", True, "Microsoft is blocking this tenant's outbound mail"
                           " (high-risk or unregistered domains): the tenant admin must resolve"
                           " it in the Microsoft 365 Defender portal")

    # -- Google ----------------------------------------------------------------------------
    if provider in GOOGLE or u.host.endswith("gmail.com"):
        if "5.4.5" in text or "daily user sending limit" in low or "daily sending quota" in low:
            return Verdict("rate", True, "Google's daily sending limit for this user is"
                           " reached; mail waits (the limit resets within 24 hours)", LIMIT_PAUSE)
        if "5.7.9" in text or "application-specific password" in low:
            return Verdict("auth", True, "Google wants an app password for this account, or"
                           " switch to `auth: xoauth2`")
        if "5.7.8" in text or "badcredentials" in low or reply.code == 535:
            if oauth:
                return Verdict("auth", True, "Google refused the token: check domain-wide"
                               " delegation (client id and scope https://mail.google.com/) and"
                               f" that {u.username} exists")
            return Verdict("auth", True, "Google refused the password (less-secure sign-in"
                           f" ended in 2024): use an app password in {_secret_ref(u)}, or switch"
                           " to `auth: xoauth2`")
        if provider == "google-smtp-relay" and "invalid credentials for relay" in low:
            return Verdict("policy", True, "Google's SMTP relay service does not know this"
                           " egress IP: add `relay egress-ips` to Admin console → Apps → Gmail →"
                           " Routing → SMTP relay service (or require SMTP authentication)")

    # -- the presets -----------------------------------------------------------------------
    if provider == "sendgrid":
        if "maximum credits exceeded" in low:
            return Verdict("rate", True, "the SendGrid account has no credits left this period;"
                           " mail waits", LIMIT_PAUSE)
        if reply.code == 535 or "authentication failed" in low:
            return Verdict("auth", True, "SendGrid refused the API key: the username must be"
                           f" apikey and {_secret_ref(u)} a valid key with Mail Send permission")
        if "verified sender identity" in low:
            return Verdict("policy", True, "the sender is not a verified Sender Identity in"
                           " SendGrid: verify the sender or authenticate the domain")
    if provider == "mailjet":
        if reply.code == 535:
            return Verdict("auth", True, f"Mailjet refused the API key pair ({_secret_ref(u)})")
        if "sender" in low and ("not validated" in low or "not authorized" in low
                                or "not allowed" in low):
            return Verdict("policy", True, "the sender address is not validated in Mailjet:"
                           " validate it (Account → Sender addresses & domains)")

    # -- generic ---------------------------------------------------------------------------
    if enh == "4.7.0" and reply.code == 454 and "does not offer auth" in low:
        return Verdict("auth", True, "the server offers no AUTH mechanism the relay can use"
                       " with this upstream's auth setting: check the port and TLS mode")
    kind = reply_class(reply)  # the generic rules, shared with the event classes
    if kind == "auth" or reply.code in (530, 534, 535, 538):
        return Verdict("auth", True, f"the server refused the login as {u.username}: check"
                       f" the username and {_secret_ref(u)}, then `relay reload`")
    return Verdict(kind)
