"""Property tests: hostile input never crashes the parsers, and what is accepted is what we think."""

from __future__ import annotations

import base64
import re
import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import policyfile
from gateway.authn import Credentials, Malformed, parse_basic_authorization
from gateway.routes import MAX_NAME_LENGTH, NAME_RE, Operation, RouteError, parse_request
from tests.conftest import Gateway

SEGMENTS = st.sampled_from(
    [
        "v2",
        "",
        ".",
        "..",
        "%2e",
        "%2E%2e",
        "%2F",
        "a",
        "b",
        "library",
        "Upper",
        "manifests",
        "blobs",
        "uploads",
        "tags",
        "list",
        "_catalog",
        "referrers",
        "latest",
        "sha256:" + "a" * 64,
        "x\\y",
        "-a",
        "a..b",
        "a__b",
        "a--b",
        "%00",
        "é",
        "a b",
        ";",
        "?",
        "#",
        "//",
    ]
)
TARGETS = st.lists(SEGMENTS, min_size=0, max_size=8).map(lambda parts: "/" + "/".join(parts)) | st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300
).map(lambda text: "/v2/" + text)
METHODS = st.sampled_from(["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "FOO"])


@given(METHODS, TARGETS)
@settings(max_examples=3000, deadline=None)
def test_route_parser_total_and_accepts_only_clean_paths(method: str, target: str) -> None:
    result = parse_request(method, target)
    assert isinstance(result, Operation | RouteError)
    if isinstance(result, Operation):
        path = target.partition("?")[0]
        assert "%" not in path and "\\" not in path and "//" not in path
        assert not any(segment in (".", "..") for segment in path.split("/"))
        if result.repository is not None:
            assert NAME_RE.match(result.repository) and len(result.repository) <= MAX_NAME_LENGTH
            # The repository is literally part of the path that will be forwarded.
            assert path.startswith(f"/v2/{result.repository}/")
    else:
        assert 400 <= result.status < 500


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
@settings(max_examples=2000, deadline=None)
def test_basic_auth_parser_total(raw: bytes) -> None:
    for header in (
        "Basic " + base64.b64encode(raw).decode(),
        raw.decode("latin-1"),
        "Basic " + raw.decode("latin-1"),
    ):
        result = parse_basic_authorization(header)
        assert result is None or isinstance(result, Credentials | Malformed)
        if isinstance(result, Credentials):
            assert result.username and ":" not in result.username


PATTERNS = st.text(alphabet="ab*?[]^\\/-${}:.", max_size=12) | st.sampled_from(
    ["/(/", "/a{2,}/", "${account}/*", "${labels:team}", "[", "[]", "\\"]
)


@given(
    st.lists(
        st.fixed_dictionaries(
            {"match": st.fixed_dictionaries({"name": PATTERNS}), "actions": st.just(["pull"])}
        ),
        max_size=5,
    )
)
@settings(max_examples=500, deadline=None)
def test_policy_parser_total(entries: list[dict[str, object]]) -> None:
    try:
        policy = policyfile.parse({"acl": entries})
    except policyfile.PolicyError as exc:
        assert all(re.match(r"^acl\[\d+\]\.match\.name: invalid (glob|regex)", p) for p in exc.problems)
    else:
        from gateway import acl

        request = acl.Request("alice", "repository", "a/b", frozenset({"pull"}), None)
        acl.evaluate(policy.rules, request)  # never raises on a validated policy


RAW_LINES = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=120)


def test_live_gateway_never_answers_500(gateway: Gateway) -> None:
    host, port = gateway.host.split(":")

    @given(METHODS, RAW_LINES, st.lists(RAW_LINES, max_size=4))
    @settings(max_examples=200, deadline=None)
    def one_request(method: str, target: str, extra: list[str]) -> None:
        headers = "".join(f"X-F{i}: {value}\r\n" for i, value in enumerate(extra))
        data = f"{method} /v2/{target} HTTP/1.1\r\nHost: h\r\n{headers}Connection: close\r\n\r\n".encode()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(data)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        status = int(answer.split(b" ", 2)[1])
        assert status < 500, answer[:300]
        assert b"Docker-Distribution-Api-Version: registry/2.0" in answer

    one_request()
    assert "Traceback" not in gateway.log.read_text()
