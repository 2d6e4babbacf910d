"""PII scrubbing: recall on real shapes, precision on look-alikes (versions, dates, private IPs)."""

from __future__ import annotations

import pytest

from tokenmill.common.ingest.pii import PiiScrubber, luhn_ok

S = PiiScrubber()


def scrub(text: str) -> str:
    return S.scrub(text)[0]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Contact: Barry Warsaw <barry@python.org>", "Contact: Barry Warsaw <<EMAIL>>"),
        ("mail first.last+tag@mail.example.co.uk now", "mail <EMAIL> now"),
        ("call (202) 555-0143 today", "call <PHONE> today"),
        ("call 202-555-0143.", "call <PHONE>."),
        ("intl +44 20 7946 0958 ok", "intl <PHONE> ok"),
        ("server at 8.8.8.8:53", "server at <IP_ADDRESS>:53"),
        ("v6 2001:4860:4860::8888 here", "v6 <IP_ADDRESS> here"),
        ("card 4111 1111 1111 1111 exp", "card <CREDIT_CARD> exp"),
        ("card 5500-0000-0000-0004", "card <CREDIT_CARD>"),
        ("Visa: 4012888888881881.", "Visa: <CREDIT_CARD>."),
        ("aws AKIAIOSFODNN7EXAMPLE key", "aws <SECRET> key"),
        ("token ghp_" + "a1B2" * 9 + " end", "token <SECRET> end"),
        ("k = 'sk_live_" + "Ab3" * 8 + "'", "k = '<SECRET>'"),
        (
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\nabc==\n-----END RSA PRIVATE KEY-----\ntail",
            "<SECRET>\ntail",
        ),
    ],
)
def test_recall(text, expected):
    assert scrub(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "__version__ = '1.2.3.4'",  # version strings are not IPs
        "requires version 10.0.0.1 or later",
        "Python 3.11.7 and 2.7.18.1.5",
        "bind to 127.0.0.1 and 192.168.1.10",  # private/loopback addresses are not personal data
        "released 2023-01-15, updated 15/01/2023 at 12:30:45",  # dates and times are not phones
        "ISBN 978-0-306-40615-7 and isbn 123-456-7890",  # ISBN context
        "x = 1234567890123",  # a long number that fails Luhn / issuer
        "ids 4111111111111112 (bad Luhn)",
        "MAGIC = 4111111111111111  # a Luhn-valid constant with no payment context",
        "timestamp 1700000000 and port 8080",
        "email-like @decorator and user@localhost",
        "ratio 1:2:3 and a::b in C++",
        "the key AKIAshort is too short",
        "see section 3.2.1 of RFC 2822",
    ],
)
def test_precision(text):
    assert scrub(text) == text


def test_counts_per_type():
    text = "a@b.example, c@d.example, 8.8.4.4, 202-555-0143, card 4111111111111111"
    out, counts = S.scrub(text)
    assert counts == {"email": 2, "ip_address": 1, "phone": 1, "credit_card": 1}
    assert out == "<EMAIL>, <EMAIL>, <IP_ADDRESS>, <PHONE>, card <CREDIT_CARD>"


def test_public_ip_option():
    assert PiiScrubber(only_public_ips=False).scrub("at 10.0.0.1")[0] == "at <IP_ADDRESS>"


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112")
