"""PII scrubbing to typed placeholders, tuned for precision as much as recall.

Placeholders: ``<EMAIL>``, ``<PHONE>``, ``<IP_ADDRESS>``, ``<CREDIT_CARD>``, ``<SECRET>``,
``<CREDENTIALS>``. ``PiiScrubber.find`` reports spans of the original text (the evaluation set in
``tests/fixtures/pii_eval`` scores them); ``scrub`` replaces them. Precision rules (each has a test):

* IPv4: four dotted octets 0-255, not part of a longer dotted run (``1.2.3.4.5`` and
  ``version 1.2.3.4``, ``section 8.4.1.3``, ``==1.0.0.0`` are not addresses, ``1.2.3.4.nip.io`` is a host name); only public (``is_global``) addresses are replaced, as
  datatrove's ``PIIFormatter`` does (``only_remove_public_ips``), so ``127.0.0.1`` and ``10.0.0.1``
  in code stay. IPv6 goes through ``ipaddress`` validation and needs at least one ``::`` or all eight
  groups, so ``12:30:45`` times are not addresses.
* phone: North-American and E.164 shapes with separators; a bare run of digits is not a phone, and
  dates (``2023-01-15``, ``15/01/2023``) never match because the grouping is 3-3-4 (or a ``+``
  country code). As in Dolma's tagger, a match next to ``isbn``/``doi`` is left alone.
* credit cards: 13-19 digits in 4-4-4-x groups or Amex's 4-6-5 (or contiguous with a payment word such as "card" in
  the 40 characters before), Luhn-valid, with a known issuer prefix.
* secrets: PEM private-key blocks, AWS access key ids, GitHub/GitLab/Slack/Stripe/OpenAI-style and
  Google API keys, and JWTs: fixed, high-entropy formats with no plausible innocent use.
* e-mail: a local part of the characters real mailboxes use (letters, digits, ``._%+-``, at least
  one letter or digit; no backtick or ``/``, so a quoted ``@app.route`` is not an address), a dotted
  domain whose TLD is alphabetic in one case, neither a receiver (``x@self.weight``) nor
  called/indexed (``q@k.transpose(0, 1)``). In code mode the TLD must also be delegated:
  decorators, matrix products and attribute access stay code.
* credentials: the userinfo of ``scheme://user[:password]@host`` becomes ``<CREDENTIALS>`` and the
  rest of the URL stays; template placeholders (``{user}:{password}``, ``$USER``) are left alone.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tokenmill.common.ingest.tlds import TLDS

EMAIL = "<EMAIL>"
PHONE = "<PHONE>"
IP = "<IP_ADDRESS>"
CARD = "<CREDIT_CARD>"
SECRET = "<SECRET>"
CREDENTIALS = "<CREDENTIALS>"

_SECRET = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"
    r"|\bgh[pousr]_[A-Za-z0-9]{36,255}\b"
    r"|\bgithub_pat_[A-Za-z0-9_]{40,255}\b"
    r"|\bglpat-[A-Za-z0-9_-]{20}\b"
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}\b"
    r"|\b[sr]k_(?:live|test)_[A-Za-z0-9]{16,}\b"
    r"|\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{32,}\b"
    r"|\bAIza[0-9A-Za-z_-]{35}\b"
    r"|\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\b",
    re.DOTALL,
)
# Local part: dot-separated runs of the characters real mailboxes use (no backtick, ``/`` or quote),
# with at least one letter or digit, not continuing a URL's authority (``://user:pass@``, which is a
# credential, see below); the domain ends in an alphabetic TLD of one case (or an
# IDN ``xn--`` label) and is not followed by more name characters.
_EMAIL = re.compile(
    r"(?:(?<=mailto:)|(?<![\w.%+/:-]))(?=[\w.%+-]*[A-Za-z0-9])[A-Za-z0-9_%+-]+(?:\.[A-Za-z0-9_%+-]+)*"
    r"@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+)([a-z]{2,24}|[A-Z]{2,24}|xn--[a-z0-9-]{1,59})"
    r"(?![\w-]|\.[A-Za-z0-9])",
    re.ASCII,
)
# ``scheme://userinfo@host``: the userinfo (a user, or user:password) is a credential; group 2 is
# the span replaced, so the URL keeps its scheme and host. Greedy up to the authority's last ``@``;
# the host must be dotted, bracketed or carry a port (``svn+http://url@rev`` is a revision).
_URL_CREDENTIALS = re.compile(
    r"\b([A-Za-z][A-Za-z0-9+.-]{1,15}://)([^\s/?#\"'<>`\\]+)@(?=\[|[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+|[A-Za-z0-9-]+:\d)"
)
# Template placeholders (``{user}:{password}``, ``$USER``, ``%(user)s``) are code, not credentials.
_TEMPLATE = re.compile(r"[{}$<>]|%\(|%s")
_CODE_RECEIVERS = frozenset({"self", "cls", "this"})
_IPV4 = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\w|\.\w)"
)
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_VERSION_CONTEXT = re.compile(
    r"(?:(?:version|ver\.?|release|python|build|section|sec\.|§|chapter|step)\w*\s*[-=:]?|[=<>!~]=)"
    r"\s*['\"(]?\s*$",
    re.IGNORECASE,
)
_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}"  # +44 20 7946 0958, +1-202-555-0143
    r"|\(\d{3}\)\s?\d{3}[ .-]\d{4}"  # (202) 555-0143
    r"|\d{3}[.-]\d{3}[.-]\d{4}"  # 202-555-0143
    r")(?![\w-]|\.\d)"
)
_PHONE_CONTEXT = re.compile(r"isbn|doi|issn", re.IGNORECASE)
_CARD = re.compile(
    r"(?<![\w-])(?:(?:\d{4}[ -]){3}\d{1,7}|\d{4}([ -])\d{6}\1\d{5})(?![\w-])|(?<![\w.-])\d{13,19}(?![\w-]|\.\d)"
)
# A bare run of 13-19 digits is far more often a constant, id or timestamp than a card; it counts
# only with a payment word nearby. Grouped 4-4-4-x numbers count on their own.
_CARD_CONTEXT = re.compile(
    r"card|visa|master|amex|american express|discover|credit|debit|payment|\bcc\b|\bpan\b", re.I
)
_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2[2-7]|3[47]|6(?:011|5|4[4-9])|35|3(?:0[0-5]|[68]))")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


@dataclass(frozen=True)
class Finding:
    """One detected span of the original text and its type (a key of ``PLACEHOLDERS``)."""

    start: int
    end: int
    kind: str


PLACEHOLDERS = {
    "secret": SECRET,
    "credential": CREDENTIALS,
    "email": EMAIL,
    "credit_card": CARD,
    "ip_address": IP,
    "phone": PHONE,
}


@dataclass
class PiiScrubber:
    """An e-mail domain never starts with a receiver (``self.``, ``cls.``, ``this.``) nor is called
    or indexed, so ``x@self.weight`` and ``q@k.transpose(0, 1)`` stay code; ``code=True`` (the
    ``code`` preset) also requires a delegated TLD (``tlds.TLDS``), so ``a@b.weight`` does too."""

    emails: bool = True
    phones: bool = True
    ips: bool = True
    credit_cards: bool = True
    secrets: bool = True
    credentials: bool = True
    only_public_ips: bool = True
    code: bool = False
    name: str = "pii"

    def find(self, text: str) -> list[Finding]:
        """Non-overlapping findings in text order; earlier detectors (secrets first) win overlaps."""
        found: list[Finding] = []
        for kind, spans in self._detectors(text):
            for start, end in spans:
                if not any(start < f.end and f.start < end for f in found):
                    found.append(Finding(start, end, kind))
        return sorted(found, key=lambda f: f.start)

    def scrub(self, text: str) -> tuple[str, Counter]:
        """Return the scrubbed text and counts per placeholder type."""
        counts: Counter = Counter()
        parts: list[str] = []
        pos = 0
        for f in self.find(text):
            parts += [text[pos : f.start], PLACEHOLDERS[f.kind]]
            pos = f.end
            counts[f.kind] += 1
        if not counts:
            return text, counts
        parts.append(text[pos:])
        return "".join(parts), counts

    def _detectors(self, text: str) -> Iterator[tuple[str, Iterator[tuple[int, int]]]]:
        if self.secrets and ("-----BEGIN" in text or _maybe_secret(text)):
            yield "secret", _spans(_SECRET, text, lambda m: True)
        if self.credentials and "://" in text:
            yield "credential", _spans(_URL_CREDENTIALS, text, _credential, group=2)
        if self.emails and "@" in text:
            yield "email", _spans(_EMAIL, text, self._email)
        if self.credit_cards:
            yield "credit_card", _spans(_CARD, text, _card)
        if self.ips:
            yield "ip_address", _spans(_IPV4, text, self._ipv4)
            if "::" in text or text.count(":") >= 7:
                yield "ip_address", _spans(_IPV6, text, self._ipv6)
        if self.phones:
            yield "phone", _spans(_PHONE, text, _phone)

    def _email(self, m: re.Match) -> bool:
        domain, tld = m.group(1), m.group(2)
        if domain.split(".", 1)[0] in _CODE_RECEIVERS or m.string[m.end() : m.end() + 1] in ("(", "["):
            return False
        return not self.code or tld.lower() in TLDS

    def _ipv4(self, m: re.Match) -> bool:
        before = m.string[max(0, m.start() - 24) : m.start()]
        if _VERSION_CONTEXT.search(before):
            return False
        addr = ipaddress.IPv4Address(m.group(0))
        return addr.is_global or not self.only_public_ips

    def _ipv6(self, m: re.Match) -> bool:
        s = m.group(0)
        if "::" not in s and s.count(":") != 7:
            return False
        if sum(1 for g in s.split(":") if g) < 3:  # "a::b", "std::vector": too short to be an address
            return False
        try:
            addr = ipaddress.IPv6Address(s)
        except ValueError:
            return False
        return addr.is_global or not self.only_public_ips


def _spans(
    pattern: re.Pattern, text: str, accept: Callable[[re.Match], bool], group: int = 0
) -> Iterator[tuple[int, int]]:
    return (m.span(group) for m in pattern.finditer(text) if accept(m))


def _credential(m: re.Match) -> bool:
    return not _TEMPLATE.search(m.group(2))


def _card(m: re.Match) -> bool:
    digits = re.sub(r"[ -]", "", m.group(0))
    if digits == m.group(0) and not _CARD_CONTEXT.search(m.string[max(0, m.start() - 40) : m.start()]):
        return False
    return (
        13 <= len(digits) <= 19
        and bool(_CARD_PREFIX.match(digits))
        and luhn_ok(digits)
        and len(set(digits)) > 1
    )


def _phone(m: re.Match) -> bool:
    window = m.string[max(0, m.start() - 20) : m.start()]
    if _PHONE_CONTEXT.search(window):
        return False
    return 7 <= sum(c.isdigit() for c in m.group(0)) <= 15


_SECRET_HINTS = (
    "AKIA",
    "ASIA",
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "glpat-",
    "xox",
    "sk_",
    "rk_",
    "sk-",
    "AIza",
    "eyJ",
)


def _maybe_secret(text: str) -> bool:
    return any(h in text for h in _SECRET_HINTS)
