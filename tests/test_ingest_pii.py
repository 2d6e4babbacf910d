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


CODE = PiiScrubber(code=True)


@pytest.mark.parametrize("scrubber", [S, CODE], ids=["prose", "code"])
@pytest.mark.parametrize(
    "text",
    [
        "`@app.route` registers a view",  # a decorator quoted in a docstring
        "@app.route('/x')\n@functools.wraps(f)\ndef g(): ...",
        "y = x@self.weight",  # matrix product with attribute access
        "att = q@k.transpose(0, 1)",
        "z = a@b.weights[0]",
        "s = cls@cls.basis",
        "url = f'https://{user}:{password}@{host}/db'",  # a template, not a credential
        "svn+http://blahblah@rev#egg=Foo",  # a URL at a revision
        "masked ****@example.com",
    ],
)
def test_code_is_left_alone(scrubber, text):
    assert scrubber.scrub(text) == (text, {})


@pytest.mark.parametrize(
    "text", ["w = x@np.linalg.inv", "r = w@x.T.conj", "p = a@model.weight", "q = h@head.proj"]
)
def test_code_mode_needs_a_delegated_tld(text):
    assert CODE.scrub(text)[0] == text
    assert S.scrub(text)[0] != text  # prose mode accepts any alphabetic TLD shape


@pytest.mark.parametrize(
    "text, expected",
    [
        ("http://user@example.com/x", "http://<CREDENTIALS>@example.com/x"),
        (
            "https://user:pass@host.example.com:8443/p?q=1",
            "https://<CREDENTIALS>@host.example.com:8443/p?q=1",
        ),
        ("postgres://app:Zx9!kq2@w@db:5432/app", "postgres://<CREDENTIALS>@db:5432/app"),
        ("redis://:s3cret@cache.example.com/0", "redis://<CREDENTIALS>@cache.example.com/0"),
        ("`bob@example.org`", "`<EMAIL>`"),
        ("EMAIL=bob@example.com", "EMAIL=<EMAIL>"),
        ("mailto:bob@example.com?cc=ann@example.com", "mailto:<EMAIL>?cc=<EMAIL>"),
        ("__email__ = 'ada.park@example.com'", "__email__ = '<EMAIL>'"),
        ("amex 3782 822463 10005", "amex <CREDIT_CARD>"),
    ],
)
def test_credentials_and_addresses_in_code(text, expected):
    assert CODE.scrub(text)[0] == expected
    assert S.scrub(text)[0] == expected


def test_credentials_are_counted_as_credentials():
    out, counts = CODE.scrub("proxy http://u:p@proxy.example.com:3128 and ops@example.com")
    assert counts == {"credential": 1, "email": 1}
    assert out == "proxy http://<CREDENTIALS>@proxy.example.com:3128 and <EMAIL>"


def test_find_reports_spans_of_the_original_text():
    text = "ip 8.8.8.8, mail a@b.example"
    found = S.find(text)
    assert [(text[f.start : f.end], f.kind) for f in found] == [
        ("8.8.8.8", "ip_address"),
        ("a@b.example", "email"),
    ]


@pytest.mark.parametrize(
    "text", ["see RFC 9110 section 8.4.1.3", "foo==1.0.0.0", "rfc7692#section-7.2.3.1", "1.2.3.4.nip.io"]
)
def test_more_numbers_that_are_not_addresses(text):
    assert CODE.scrub(text)[0] == text
