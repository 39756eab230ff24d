"""The web page (`ui: true`), in Debian's chromium driven by selenium (headless, no browser
download), against the real registry through the gateway: log in with the keyboard alone,
browse to a multi-platform image pushed with skopeo and see its platforms and layer sizes, copy
the pull command, see why a push is denied, see an image whose labels and annotations hold HTML
and script shown escaped with no script run, delete as an admin and find it gone from the
registry, log out; anonymous sees only what anonymous may pull; a form without its CSRF token,
or from another origin, is refused; `user passwd` ends a session; the lockout holds for the form.
Screenshots of each page are written under the test's temporary directory."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.sample_image import write_image, write_index
from tests.conftest import (
    USERS,
    Gateway,
    Registry,
    http_request,
    require,
    skopeo_copy,
    start_gateway,
    stop,
    users_with,
    wait_until,
    write_authfile,
)

POLICY = """\
users:
  "": {}
acl:
  - match: {account: "admin"}
    actions: ["*"]
  - match: {account: "alice", name: "shared/*"}
    actions: ["pull"]
    comment: "read-only for alice"
  - match: {account: "alice", name: "alice/*"}
    actions: ["pull", "push"]
  - match: {account: "", name: "public/*"}
    actions: ["pull"]
"""
EVIL = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
ADMIN = ("admin", USERS["admin"])


@dataclass
class Site:
    registry: Registry
    gateway: Gateway
    users: Path
    tmp: Path
    shots: Path

    def url(self, path: str = "/ui/") -> str:
        return f"http://{self.gateway.host}{path}"


@pytest.fixture
def site(tmp_path: Path, registry: Registry) -> Iterator[Site]:
    users = users_with(tmp_path / "htpasswd")
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    gateway = start_gateway(
        tmp_path,
        registry.url,
        users,
        "--policy",
        str(policy),
        env={
            "GATEWAY_UI": "true",
            "GATEWAY_LOCKOUT_ATTEMPTS": "3",
            "GATEWAY_AUDIT_LOG": str(tmp_path / "audit.log"),
        },
    )
    try:
        host = gateway.host
        auth = write_authfile(tmp_path / "auth.json", host, ADMIN)
        images = tmp_path / "images"
        write_index(images / "multi", "1", ["amd64", "arm64"])
        write_image(images / "evil", "1", layers=1, layer_bytes=1000, labels={"note": EVIL, EVIL: "key"},
                    annotations={"org.example.description": EVIL})  # fmt: skip
        write_image(images / "app", "1", layers=2, layer_bytes=3000)
        write_image(images / "hello", "1", layers=1, layer_bytes=500)
        for layout, repository, flags in (
            ("multi", "shared/multi", ("--all",)),
            ("evil", "shared/evil", ()),
            ("app", "alice/app", ()),
            ("hello", "public/hello", ()),
        ):
            pushed = skopeo_copy(f"oci:{images / layout}:1", f"docker://{host}/{repository}:1", auth,
                                 "--dest-tls-verify=false", *flags)  # fmt: skip
            assert pushed.returncode == 0, pushed.stderr
        shots = tmp_path / "screenshots"
        shots.mkdir()
        yield Site(registry, gateway, users, tmp_path, shots)
    finally:
        stop(gateway.process)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="gw-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = require("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1200,1000", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(require("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def shoot(browser: Any, site: Site, name: str) -> None:
    browser.save_screenshot(str(site.shots / f"{name}.png"))


def texts(browser: Any, selector: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [element.text for element in browser.find_elements(By.CSS_SELECTOR, selector)]


def unlabelled_controls(browser: Any) -> list[str]:
    """Every input, button, select and textarea has a label (a <label for>, aria-label, or a
    button's own text); hidden inputs are not controls."""
    found: list[str] = browser.execute_script(
        """
        return [...document.querySelectorAll('input, button, select, textarea')]
          .filter(el => el.type !== 'hidden')
          .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                        && !(el.tagName === 'BUTTON' && el.textContent.trim()))
          .map(el => el.outerHTML);
        """
    )
    return found


def log_in_with_the_keyboard(browser: Any, site: Site, user: str) -> None:
    from selenium.webdriver.common.keys import Keys

    browser.get(site.url("/ui/login"))
    # The user name field has the focus; Tab to the password, Enter submits.
    browser.switch_to.active_element.send_keys(user, Keys.TAB, USERS[user], Keys.ENTER)
    try:
        wait_until(lambda: texts(browser, "#user") == [user], 10)
    except AssertionError:
        raise AssertionError(f"not logged in: {browser.current_url}\n{browser.page_source[-2000:]}") from None


def test_browse_see_why_copy_escape_delete_and_log_out(browser: Any, site: Site) -> None:
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    # Anonymous sees what anonymous may pull, and nothing else.
    browser.get(site.url())
    assert texts(browser, "#repositories li") == ["public/hello"]
    assert "Anonymous" in browser.find_element(By.TAG_NAME, "header").text
    shoot(browser, site, "anonymous")
    assert unlabelled_controls(browser) == []

    browser.get(site.url("/ui/login"))
    shoot(browser, site, "login")
    assert unlabelled_controls(browser) == []
    log_in_with_the_keyboard(browser, site, "alice")
    assert texts(browser, "#repositories li") == ["alice/app", "shared/evil", "shared/multi"]
    shoot(browser, site, "repositories")

    # Why: alice may pull shared/multi and not push there, and the page names the rule.
    browser.find_element(By.LINK_TEXT, "shared/multi").click()
    permissions = texts(browser, "#permissions li")
    assert "pull: granted by acl[1] (read-only for alice)" in permissions
    assert "push: denied by acl[1] (read-only for alice)" in permissions
    shoot(browser, site, "repository")
    assert unlabelled_controls(browser) == []

    # The multi-platform image: its platforms, then one of them: layers, sizes, total.
    browser.find_element(By.CSS_SELECTOR, "#tags a").click()
    platforms = texts(browser, "#platforms td.platform")
    assert platforms == ["linux/amd64", "linux/arm64"]
    assert "application/vnd.oci.image.index.v1+json" in browser.find_element(By.ID, "media-type").text
    pull = browser.find_element(By.ID, "command-1")
    assert pull.get_attribute("value") == f"docker pull {site.gateway.host}/shared/multi:1"
    copy = browser.find_element(By.CSS_SELECTOR, "button.copy")
    copy.click()
    wait_until(lambda: copy.text == "Copied", 5)
    shoot(browser, site, "index")
    assert unlabelled_controls(browser) == []
    browser.find_element(By.CSS_SELECTOR, "#platforms a").click()
    sizes = texts(browser, "#layers td.layer-size")
    assert len(sizes) == 2 and all(re.fullmatch(r"[\d.]+ (B|KiB|MiB)", size) for size in sizes), sizes
    assert browser.find_element(By.ID, "total-size").text
    assert browser.find_element(By.ID, "created").text == "2026-01-02T03:04:05Z"
    shoot(browser, site, "image")

    # Labels and annotations holding HTML and script: shown as text, and nothing of it runs.
    browser.get(site.url("/ui/manifest?name=shared/evil&ref=1"))
    page_text = browser.find_element(By.TAG_NAME, "main").text
    assert page_text.count(EVIL) >= 3, page_text  # a label's value, a label's key, an annotation
    assert browser.execute_script("return window.__pwned === undefined")
    assert browser.find_elements(By.CSS_SELECTOR, "main script, main img") == []
    shoot(browser, site, "escaped")
    assert browser.find_elements(By.ID, "delete-link") == []  # alice may not delete

    browser.find_element(By.CSS_SELECTOR, "header button").click()  # log out
    wait_until(lambda: "Anonymous" in browser.find_element(By.TAG_NAME, "header").text, 10)
    assert texts(browser, "#repositories li") == ["public/hello"]

    # An admin deletes a tag's manifest, after a confirmation; the registry no longer has it.
    log_in_with_the_keyboard(browser, site, "admin")
    browser.get(site.url("/ui/manifest?name=alice/app&ref=1"))
    browser.find_element(By.ID, "delete-link").click()
    shoot(browser, site, "confirm-delete")
    assert unlabelled_controls(browser) == []
    browser.find_element(By.ID, "confirm-delete").click()
    wait_until(lambda: texts(browser, "h1") == ["Deleted"], 10)
    tags = site.registry.storage / "docker/registry/v2/repositories/alice/app/_manifests/tags/1"
    assert not tags.exists()
    status, _, body = http_request(
        urllib.parse.urlsplit(site.registry.url).netloc, "GET", "/v2/alice/app/manifests/1"
    )
    assert status == 404, body


def session_cookie(site: Site, user: str, password: str) -> str | None:
    host = site.gateway.host
    body = urllib.parse.urlencode({"username": user, "password": password}).encode()
    status, headers, _ = http_request(
        host, "POST", "/ui/login", body=body,
        headers={"Origin": f"http://{host}", "Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    found = re.search(r"rgw_session=([^;]+)", headers.get("Set-Cookie", ""))
    return found.group(1) if status == 303 and found else None


def page_user(site: Site, cookie: str) -> str:
    _, _, body = http_request(site.gateway.host, "GET", "/ui/", headers={"Cookie": f"rgw_session={cookie}"})
    found = re.search(rb'<strong id="user">([^<]*)</strong>', body)
    return found.group(1).decode() if found else ""


def test_forms_need_their_token_and_origin_and_sessions_end_with_the_password(site: Site) -> None:
    host = site.gateway.host
    cookie = session_cookie(site, "admin", USERS["admin"])
    assert cookie is not None and page_user(site, cookie) == "admin"
    _, headers, body = http_request(host, "GET", "/ui/", headers={"Cookie": f"rgw_session={cookie}"})
    assert "default-src 'none'" in headers["Content-Security-Policy"] and b"<script>" not in body.lower()
    form = {"name": "public/hello", "ref": "1", "digest": "sha256:" + "a" * 64}
    asked = {"Cookie": f"rgw_session={cookie}", "Content-Type": "application/x-www-form-urlencoded"}
    # No CSRF token: refused, nothing deleted.
    status, _, body = http_request(
        host,
        "POST",
        "/ui/delete",
        body=urllib.parse.urlencode(form).encode(),
        headers={**asked, "Origin": f"http://{host}"},
    )
    assert status == 403 and b"token is missing" in body
    # Another site's form: refused whatever it carries.
    _, _, page = http_request(host, "GET", "/ui/", headers={"Cookie": f"rgw_session={cookie}"})
    found = re.search(rb'name="csrf" value="([0-9a-f]+)"', page)
    assert found is not None
    status, _, _ = http_request(
        host, "POST", "/ui/delete",
        body=urllib.parse.urlencode({**form, "csrf": found.group(1).decode()}).encode(),
        headers={**asked, "Origin": "http://evil.example"},
    )  # fmt: skip
    assert status == 403
    assert (site.registry.storage / "docker/registry/v2/repositories/public/hello/_manifests/tags/1").exists()

    # A body no form of the page would send: refused before it is read.
    status, _, _ = http_request(
        host, "POST", "/ui/login", body=b"username=" + b"x" * 100_000,
        headers={"Origin": f"http://{host}", "Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert status == 413

    # Not UTF-8, or not urlencoded: a 400, never a 500.
    for body, kind in (
        (b"username=\xff\xfe", "application/x-www-form-urlencoded"),
        (b"--x\r\n", "multipart/form-data"),
    ):
        status, _, _ = http_request(
            host, "POST", "/ui/login", body=body, headers={"Origin": f"http://{host}", "Content-Type": kind}
        )
        assert status == 400
    # Robots log in with docker, never on the page.
    status, _, body = http_request(
        host, "POST", "/ui/login", body=b"username=robot%2Bci&password=rgw_whatever",
        headers={"Origin": f"http://{host}", "Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert status == 403 and b"Robots log in with docker" in body and b"Set-Cookie" not in body
    # The page's logins are in the audit log as the registry's are.
    records = [json.loads(line) for line in (site.tmp / "audit.log").read_text().splitlines()]
    assert any(
        r["operation"] == "ui login" and r["user"] == "admin" and r["decision"] == "allow" for r in records
    )

    # `user passwd` ends the session at its next request.
    subprocess.run(
        [sys.executable, "-m", "gateway", "user", "passwd", "admin", "--file", str(site.users),
         "--password-stdin", "--cost", "4"],
        input="a-new-password\n", text=True, check=True, capture_output=True,
    )  # fmt: skip
    wait_until(lambda: page_user(site, cookie) == "", 10)

    # The lockout holds for the form as for docker login (3 attempts here).
    for attempt in range(3):  # different wrong passwords: a repeated one is counted once (retries)
        assert session_cookie(site, "alice", f"wrong-{attempt}") is None
    body_text = urllib.parse.urlencode({"username": "alice", "password": USERS["alice"]}).encode()
    status, _, body = http_request(
        host, "POST", "/ui/login", body=body_text,
        headers={"Origin": f"http://{host}", "Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert status == 429 and b"Too many failed logins" in body
