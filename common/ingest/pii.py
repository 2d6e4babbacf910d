"""PII scrubbing to typed placeholders, tuned for precision as much as recall.

Placeholders: ``<EMAIL>``, ``<PHONE>``, ``<IP_ADDRESS>``, ``<CREDIT_CARD>``, ``<SECRET>``.
Precision rules (each has a test):

* IPv4: four dotted octets 0-255, not part of a longer dotted/numbered run (``1.2.3.4.5`` and
  ``version 1.2.3.4`` are versions); only public (``is_global``) addresses are replaced, as
  datatrove's ``PIIFormatter`` does (``only_remove_public_ips``), so ``127.0.0.1`` and ``10.0.0.1``
  in code stay. IPv6 goes through ``ipaddress`` validation and needs at least one ``::`` or all eight
  groups, so ``12:30:45`` times are not addresses.
* phone: North-American and E.164 shapes with separators; a bare run of digits is not a phone, and
  dates (``2023-01-15``, ``15/01/2023``) never match because the grouping is 3-3-4 (or a ``+``
  country code). As in Dolma's tagger, a match next to ``isbn``/``doi`` is left alone.
* credit cards: 13-19 digits in 4-4-4-x groups (or contiguous with a payment word such as "card" in
  the 40 characters before), Luhn-valid, with a known issuer prefix.
* secrets: PEM private-key blocks, AWS access key ids, GitHub/GitLab/Slack/Stripe/OpenAI-style and
  Google API keys, and JWTs: fixed, high-entropy formats with no plausible innocent use.
* e-mail: the RFC 5322 "dot-atom" subset with a dotted domain whose TLD is alphabetic.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass

EMAIL = "<EMAIL>"
PHONE = "<PHONE>"
IP = "<IP_ADDRESS>"
CARD = "<CREDIT_CARD>"
SECRET = "<SECRET>"

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
_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
_IPV4 = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w]|\.\d)"
)
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_VERSION_CONTEXT = re.compile(
    r"(?:version|ver\.?|release|python|build)\w*\s*[=:]?\s*['\"(]?\s*$", re.IGNORECASE
)
_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}"  # +44 20 7946 0958, +1-202-555-0143
    r"|\(\d{3}\)\s?\d{3}[ .-]\d{4}"  # (202) 555-0143
    r"|\d{3}[.-]\d{3}[.-]\d{4}"  # 202-555-0143
    r")(?![\w-]|\.\d)"
)
_PHONE_CONTEXT = re.compile(r"isbn|doi|issn", re.IGNORECASE)
_CARD = re.compile(r"(?<![\w-])(?:\d{4}[ -]){3}\d{1,7}(?![\w-])|(?<![\w.-])\d{13,19}(?![\w-]|\.\d)")
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


@dataclass
class PiiScrubber:
    emails: bool = True
    phones: bool = True
    ips: bool = True
    credit_cards: bool = True
    secrets: bool = True
    only_public_ips: bool = True
    name: str = "pii"

    def scrub(self, text: str) -> tuple[str, Counter]:
        """Return the scrubbed text and counts per placeholder type."""
        counts: Counter = Counter()
        if self.secrets and ("-----BEGIN" in text or _maybe_secret(text)):
            text = self._sub(_SECRET, text, lambda m: SECRET, counts, "secret")
        if self.emails and "@" in text:
            text = self._sub(_EMAIL, text, lambda m: EMAIL, counts, "email")
        if self.credit_cards:
            text = self._sub(_CARD, text, self._card, counts, "credit_card")
        if self.ips:
            text = self._sub(_IPV4, text, self._ipv4, counts, "ip_address")
            if "::" in text or text.count(":") >= 7:
                text = self._sub(_IPV6, text, self._ipv6, counts, "ip_address")
        if self.phones:
            text = self._sub(_PHONE, text, self._phone, counts, "phone")
        return text, counts

    @staticmethod
    def _sub(pattern: re.Pattern, text: str, repl, counts: Counter, kind: str) -> str:
        def wrapped(m: re.Match) -> str:
            out = repl(m)
            if out != m.group(0):
                counts[kind] += 1
            return out

        return pattern.sub(wrapped, text)

    @staticmethod
    def _card(m: re.Match) -> str:
        digits = re.sub(r"[ -]", "", m.group(0))
        if digits == m.group(0) and not _CARD_CONTEXT.search(m.string[max(0, m.start() - 40) : m.start()]):
            return m.group(0)
        if (
            13 <= len(digits) <= 19
            and _CARD_PREFIX.match(digits)
            and luhn_ok(digits)
            and len(set(digits)) > 1
        ):
            return CARD
        return m.group(0)

    def _ipv4(self, m: re.Match) -> str:
        before = m.string[max(0, m.start() - 24) : m.start()]
        if _VERSION_CONTEXT.search(before):
            return m.group(0)
        addr = ipaddress.IPv4Address(m.group(0))
        if self.only_public_ips and not addr.is_global:
            return m.group(0)
        return IP

    def _ipv6(self, m: re.Match) -> str:
        s = m.group(0)
        if "::" not in s and s.count(":") != 7:
            return s
        if sum(1 for g in s.split(":") if g) < 3:  # "a::b", "std::vector": too short to be an address
            return s
        try:
            addr = ipaddress.IPv6Address(s)
        except ValueError:
            return s
        if self.only_public_ips and not addr.is_global:
            return s
        return IP

    @staticmethod
    def _phone(m: re.Match) -> str:
        window = m.string[max(0, m.start() - 20) : m.start()]
        if _PHONE_CONTEXT.search(window):
            return m.group(0)
        digits = sum(c.isdigit() for c in m.group(0))
        if not 7 <= digits <= 15:
            return m.group(0)
        return PHONE


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
