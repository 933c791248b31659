"""``hedwig-tasks dashboard`` in headless Chromium (Debian's, driven by Playwright): publish,
watch the depth chart move, open a dead letter, requeue it and see it handled, on the SQLite bus
and on SNS/SQS (moto); its guards (CSRF token, Origin, Host, the optional token, loopback by
default); an attacker's body shown as text; pages of 10,000 dead letters, 50 rows at a time
(bench/dashboard.py times them).

Each page's screenshot goes to ``$HEDWIG_ARTIFACTS/dashboard`` (default
``.ci/logs/artifacts/dashboard``); with ``HEDWIG_DOCS_IMAGES=1`` the SQLite flow also writes
them to ``docs/images/``, as the docs show them.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aws_server import ACCOUNT, REGION, aws_transport, moto_url, tag  # noqa: F401
from helpers import WorkerThread, wait_for

from hedwig_tasks import DeadLetter, Hedwig, Message, RetryPolicy
from hedwig_tasks.cli import build_parser
from hedwig_tasks.dashboard import Dashboard
from hedwig_tasks.worker import Worker, WorkerOptions

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = Path(__file__).with_name("schemas") / "schema.json"
CHROMIUM = os.environ.get("HEDWIG_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(os.environ.get("HEDWIG_ARTIFACTS") or ROOT / ".ci" / "logs" / "artifacts") / "dashboard"
DOCS_IMAGES = ROOT / "docs" / "images"
#: How long the pages of 10,000 dead letters may take, in seconds.
EVIL = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/servers/chromium.sh installs it")
        pytest.skip(f"no chromium at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.on("dialog", lambda dialog: dialog.accept())  # the confirmations
    yield page
    context.close()


class Mailer:
    """An app whose send_email handler dead-letters the addresses in ``poisoned``."""

    def __init__(self, transport: Any, folder: Path) -> None:
        self.handled: list[str] = []
        self.poisoned: set[str] = set()
        self.go_on = threading.Event()  #: what slow@example.com's handler waits for
        self.app = Hedwig(
            f"dash{tag()}",
            schema=SCHEMA,
            transport=transport,
            state=f"sqlite:///{folder / 'state.db'}",
            retry=RetryPolicy(max_retries=0, backoff_s=0.05, jitter=False),
        )

        @self.app.handler("send_email", "1.*")
        def send_email(message: Message) -> None:
            if message.data["to"] in self.poisoned:
                raise DeadLetter(f"bounced: <b>{message.data['to']}</b> mailbox full")
            if message.data["to"] == "slow@example.com":
                self.go_on.wait(30)
            self.handled.append(message.data["to"])

        self.app.provision()

    def publish(self, to: str, subject: str = "hello") -> None:
        self.app.publish("send_email", "1.0", {"to": to, "subject": subject}, headers={"request_id": f"r-{to}"})

    def dead_letter_now(self, count: int, subject: str = "hello", reason: str = "bounced") -> None:
        """Publish ``count`` messages and dead-letter them straight from a consumer (no worker)."""
        topic = self.app.subscribed_topics()[0]
        encoded = [
            self.app.encode(self.app.message("send_email", "1.0", {"to": f"n{i}@example.com", "subject": subject}))
            for i in range(count)
        ]
        for start in range(0, count, 500):
            self.app.transport.publish_many(topic, encoded[start : start + 500])
        consumer = self.app.transport.consumer(self.app.queue, [topic])
        done = 0
        while done < count:
            deliveries = consumer.receive(1000, 0.5)
            for delivery in deliveries:
                consumer.dead_letter(delivery, reason)
            done += len(deliveries)
        consumer.close()


@pytest.fixture
def sqlite_mailer(tmp_path: Path) -> Iterator[Mailer]:
    mailer = Mailer(f"sqlite:///{tmp_path / 'bus.db'}", tmp_path)
    yield mailer
    mailer.app.close()


@pytest.fixture(params=["sqlite", "sqs"])
def mailer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Mailer]:
    if request.param == "sqs":
        transport: Any = aws_transport(request.getfixturevalue("moto_url"))
    else:
        transport = f"sqlite:///{tmp_path / 'bus.db'}"
    mailer = Mailer(transport, tmp_path)
    yield mailer
    mailer.app.close()
    if request.param == "sqs":
        transport.close()


@pytest.fixture
def dashboard(mailer: Mailer) -> Iterator[Dashboard]:
    with serving(mailer.app) as served:
        yield served


@contextlib.contextmanager
def serving(app: Hedwig, **options: Any) -> Iterator[Dashboard]:
    """The app's dashboard on a free port, sampling four times a second."""
    options = {"port": 0, "sample_s": 0.25, "refresh_s": 0.25, **options}
    dashboard = Dashboard(app, **options)
    dashboard.start()
    try:
        yield dashboard
    finally:
        dashboard.close()


def shoot(page: Any, name: str, *, docs: bool = False) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    if docs and os.environ.get("HEDWIG_DOCS_IMAGES"):
        page.screenshot(path=str(DOCS_IMAGES / f"dashboard-{name.rpartition('-')[2]}.png"), full_page=True)


def chart(page: Any, name: str) -> str:
    return str(page.get_attribute(f"[data-subscription] [data-chart={name}]", "data-last"))


def wait_chart(page: Any, name: str, value: int) -> None:
    page.wait_for_selector(f'[data-subscription] [data-chart={name}][data-last="{value}"]')


# -- the flow, in a browser -------------------------------------------------------------------


def test_publish_watch_requeue_and_see_it_handled(
    page: Any, mailer: Mailer, dashboard: Dashboard, request: pytest.FixtureRequest
) -> None:
    transport = request.node.callspec.params["mailer"]
    docs = transport == "sqlite"
    page.goto(dashboard.url)
    wait_chart(page, "depth", 0)
    mailer.poisoned.add("poison@example.com")
    for to in ("a@example.com", "b@example.com", "poison@example.com"):
        mailer.publish(to, subject=f"hello {to}")
    wait_chart(page, "depth", 3)  # the depth chart moved, live, without a reload
    points_before = int(page.get_attribute("[data-subscription] [data-chart=depth]", "data-points") or 0)
    shoot(page, f"{transport}-subscriptions", docs=docs)

    worker = WorkerThread(Worker(mailer.app, WorkerOptions(wait_s=0.05, heartbeat_s=0.2, concurrency=2)))
    try:
        wait_chart(page, "depth", 0)
        wait_chart(page, "dead_letters", 1)
        assert int(page.get_attribute("[data-subscription] [data-chart=depth]", "data-points") or 0) > points_before
        assert sorted(mailer.handled) == ["a@example.com", "b@example.com"]

        mailer.publish("slow@example.com")
        page.click("nav a[data-view=workers]")
        row = f"tr[data-worker='{worker.worker.worker_id}']"
        page.wait_for_selector(f"{row} + tr.running:has-text('running send_email 1.0 id=')")
        assert page.inner_text(f"{row} td:nth-child(5)") == "1"  # running
        assert page.inner_text(f"{row} td:nth-child(6)") == "2"  # handled
        assert page.inner_text(f"{row} td:nth-child(7)") == "1"  # failed: the dead letter
        shoot(page, f"{transport}-workers", docs=docs)
        mailer.go_on.set()
        wait_for(lambda: "slow@example.com" in mailer.handled)

        page.click("nav a[data-view=dead-letters]")
        page.wait_for_selector("#dead-letters tbody tr[data-id]")
        assert "bounced: <b>poison@example.com</b>" in page.inner_text("#dead-letters tbody")
        shoot(page, f"{transport}-deadletters", docs=docs)
        page.click("#dead-letters tbody tr[data-id] a")
        page.wait_for_selector("#body")
        assert json.loads(page.inner_text("#body")) == {
            "to": "poison@example.com",
            "subject": "hello poison@example.com",
        }
        assert page.inner_text("[data-field=reason]") == "bounced: <b>poison@example.com</b> mailbox full"
        assert page.inner_text("[data-field=type]") == "send_email"
        assert "r-poison@example.com" in page.inner_text("body")  # its headers
        shoot(page, f"{transport}-deadletter", docs=docs)

        mailer.poisoned.clear()
        page.click("#requeue-one")  # confirmed by the page fixture's dialog handler
        page.wait_for_selector("#notice:has-text('requeued 1 dead letter(s)')")
        wait_for(lambda: "poison@example.com" in mailer.handled, timeout_s=30)
        page.click("nav a[data-view=subscriptions]")
        wait_chart(page, "dead_letters", 0)
        # the live workers' handled counts moved
        wait_for(lambda: any(_get(dashboard.url + "api/subscriptions")["throughput"]["per_s"]))

        page.click("nav a[data-view=schemas]")
        page.wait_for_selector("[data-schema='send_email 1']")
        schema = page.inner_text("[data-schema='send_email 1']")
        assert "send_email" in schema and "JSON Schema" in schema and '"subject"' in schema
        assert "send_email" in schema.split("handler")[1]  # which handler takes it
        shoot(page, f"{transport}-schemas", docs=docs)
    finally:
        mailer.go_on.set()
        worker.stop()


def test_an_attackers_body_is_shown_as_text(page: Any, sqlite_mailer: Mailer) -> None:
    sqlite_mailer.dead_letter_now(1, subject=EVIL, reason=EVIL)
    with serving(sqlite_mailer.app) as dashboard:
        page.goto(dashboard.url + "#dead-letters")
        page.wait_for_selector("#dead-letters tbody tr[data-id]")
        assert EVIL in page.inner_text("#dead-letters tbody")  # the reason, as text
        page.click("#dead-letters tbody tr[data-id] a")
        page.wait_for_selector("#body")
        assert json.loads(page.inner_text("#body"))["subject"] == EVIL
        assert page.inner_text("[data-field=reason]") == EVIL
        assert page.evaluate("document.querySelectorAll('main script, main img').length") == 0
        assert page.evaluate("window.__pwned") is None


def test_filter_tick_and_purge_in_the_browser(page: Any, sqlite_mailer: Mailer) -> None:
    sqlite_mailer.dead_letter_now(3, reason="alpha: bounced")
    sqlite_mailer.dead_letter_now(2, reason="beta: refused")
    with serving(sqlite_mailer.app) as dashboard:
        page.goto(dashboard.url + "#dead-letters")
        page.wait_for_selector("#dl-summary:has-text('5 matching of 5')")
        page.fill("input[name=reason]", "ALPHA")
        page.select_option("select[name=type]", "send_email")
        page.click("form.filters button[type=submit]")
        page.wait_for_selector("#dl-summary:has-text('3 matching of 5')")
        assert page.locator("#dead-letters tbody tr").count() == 3
        page.locator("#dead-letters tbody tr input[type=checkbox]").first.check()
        page.click("text=Purge selected")  # confirmed by the page fixture's dialog handler
        page.wait_for_selector("#notice:has-text('purged 1 dead letter(s)')")
        page.wait_for_selector("#dl-summary:has-text('2 matching of 4')")
        page.click("text=Requeue all matching")
        page.wait_for_selector("#notice:has-text('requeued 2 dead letter(s)')")
        page.wait_for_selector("#dl-summary:has-text('0 matching of 2')")
        assert {r["reason"] for r in _get(dashboard.url + "api/dead-letters")["rows"]} == {"beta: refused"}


def test_ten_thousand_dead_letters_are_paged_never_all_rendered(page: Any, sqlite_mailer: Mailer) -> None:
    # how long a page takes is bench/dashboard.py's to measure, not a test's (the machine is shared)
    sqlite_mailer.dead_letter_now(10_000)
    with serving(sqlite_mailer.app) as dashboard:
        api = dashboard.url + "api/dead-letters"
        for query in ("", "?page=150", "?type=send_email&reason=bounced&page=199", "?older_than=1h"):
            dashboard.dead_letters.forget()  # each read from the bus, not the last one's
            found = _get(api + query)
            assert found["total"] == 10_000 and len(found["rows"]) == (0 if "older" in query else 50)
            assert found["matching"] == (0 if "older" in query else 10_000)
        page.goto(dashboard.url + "#dead-letters")
        page.wait_for_selector("#dl-page:has-text('page 1 of 200')")
        assert page.locator("#dead-letters tbody tr").count() == 50  # never all rendered
        for number in (2, 3):
            page.click("text=Next")
            page.wait_for_selector(f"#dl-page:has-text('page {number} of 200')")
        assert page.locator("#dead-letters tbody tr").count() == 50


# -- guards, over plain HTTP ------------------------------------------------------------------


def _get(url: str, headers: dict[str, str] | None = None) -> Any:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
        return json.load(response)


def _text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return str(response.read().decode())


def _post(dashboard: Dashboard, path: str, body: Any, **headers: str) -> tuple[int, Any]:
    request = urllib.request.Request(dashboard.url + path.lstrip("/"), data=json.dumps(body).encode(), method="POST")
    for name, value in {"Content-Type": "application/json", **headers}.items():
        request.add_header(name.replace("_", "-"), value)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        with exc:  # the error holds the response, and its socket, until closed
            return exc.code, json.load(exc)


def _ids(dashboard: Dashboard) -> list[str]:
    dashboard.dead_letters.forget()
    return [row["id"] for row in _get(dashboard.url + "api/dead-letters")["rows"]]


def test_a_requeue_needs_the_csrf_token_and_this_origin(sqlite_mailer: Mailer) -> None:
    sqlite_mailer.dead_letter_now(2)
    with serving(sqlite_mailer.app) as dashboard:
        first, second = _ids(dashboard)
        origin = dashboard.url.rstrip("/")
        csrf = {"X_CSRF_Token": dashboard.csrf}
        wrong: list[dict[str, str]] = [
            {},
            {"X_CSRF_Token": "guess"},
            {**csrf, "Origin": "http://evil.example"},
            {**csrf, "Sec_Fetch_Site": "cross-site"},
            {**csrf, "Content_Type": "text/plain"},
        ]
        refused = [
            _post(dashboard, f"/api/dead-letters/{verb}", {"ids": [first]}, **headers)[0]
            for headers in wrong
            for verb in ("requeue", "purge")
        ]
        assert refused == [403] * 8 + [415] * 2
        assert _ids(dashboard) == [first, second]  # nothing changed
        status, done = _post(
            dashboard, "/api/dead-letters/purge", {"ids": [first]}, X_CSRF_Token=dashboard.csrf, Origin=origin
        )
        assert (status, done["done"]) == (200, 1)
        status, done = _post(
            dashboard, "/api/dead-letters/requeue", {"filter": {"type": "send_email"}}, X_CSRF_Token=dashboard.csrf
        )
        assert (status, done["done"]) == (200, 1)
        assert _ids(dashboard) == []
        assert f'content="{dashboard.csrf}"' in _text(dashboard.url)


def test_with_a_token_a_purge_needs_it(sqlite_mailer: Mailer) -> None:
    sqlite_mailer.dead_letter_now(2)
    with serving(sqlite_mailer.app, token="s3cret-token") as dashboard:
        first, second = _ids(dashboard)
        csrf = {"X_CSRF_Token": dashboard.csrf}
        assert _post(dashboard, "/api/dead-letters/purge", {"ids": [first]}, **csrf)[0] == 401
        assert (
            _post(dashboard, "/api/dead-letters/purge", {"ids": [first]}, Authorization="Bearer nope", **csrf)[0] == 401
        )
        assert _ids(dashboard) == [first, second]
        assert (
            _post(dashboard, "/api/dead-letters/purge", {"ids": [first]}, Authorization="Bearer s3cret-token", **csrf)[
                0
            ]
            == 200
        )
        basic = base64.b64encode(b"ops:s3cret-token").decode()
        assert (
            _post(dashboard, "/api/dead-letters/purge", {"ids": [second]}, Authorization=f"Basic {basic}", **csrf)[0]
            == 200
        )
        assert _ids(dashboard) == []
        assert _get(dashboard.url + "api/meta")["token_required"] is True
        assert "s3cret-token" not in _text(dashboard.url)


def test_it_listens_on_loopback_and_answers_loopback_names_only(sqlite_mailer: Mailer) -> None:
    assert build_parser().parse_args(["dashboard"]).host == "127.0.0.1"
    with serving(sqlite_mailer.app) as dashboard:
        assert dashboard.server.server_address[0] == "127.0.0.1"
        with pytest.raises(urllib.error.HTTPError) as refused:
            _get(dashboard.url + "api/meta", headers={"Host": "rebound.evil.example"})
        refused.value.close()  # it holds the response, and its socket
        assert refused.value.code == 421
        assert _get(dashboard.url + "api/meta", headers={"Host": "localhost"})["app"] == sqlite_mailer.app.name


def test_no_secret_on_any_page(tmp_path: Path, moto_url: str) -> None:
    url = (
        f"aws://?region={REGION}&account_id={ACCOUNT}&endpoint_url={moto_url}"
        "&access_key_id=testing&secret_access_key=hunter2-secret"
    )
    app = Hedwig(f"dash{tag()}", schema=SCHEMA, transport=url, state=f"sqlite:///{tmp_path / 's.db'}")

    @app.handler("send_email", "1.*")
    def send_email(message: Message) -> None: ...

    with serving(app) as dashboard:
        wait_for(lambda: dashboard.sampler.error or dashboard.sampler.latest)  # the counts were asked for
        answers = [_text(dashboard.url)]
        answers += [
            json.dumps(_get(dashboard.url + f"api/{path}")) for path in ("meta", "subscriptions", "workers", "schemas")
        ]
        assert "secret_access_key=**" in answers[1]  # the transport is shown, masked
        assert all("hunter2" not in answer for answer in answers)
    app.close()


def test_the_command_serves_the_page(tmp_path: Path) -> None:
    (tmp_path / "dashapp.py").write_text(
        "from hedwig_tasks import Hedwig\n"
        f"hedwig = Hedwig('dashcli', schema={str(SCHEMA)!r}, transport='sqlite:///{tmp_path / 'bus.db'}')\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "hedwig_tasks", "dashboard", "-A", "dashapp", "--port", "0"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr = process.stderr
    assert stderr is not None
    try:
        line = stderr.readline()
        assert "hedwig-tasks dashboard of dashcli on http://127.0.0.1:" in line, line
        url = line.split(" on ")[1].strip()
        assert _get(url + "api/meta")["app"] == "dashcli"
        assert "csrf-token" in _text(url)
    finally:
        process.terminate()
        code = process.wait(15)
        stderr.close()
    assert code == 0
