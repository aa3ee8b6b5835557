"""The dashboard in a real headless Chromium (Debian's package, driven by Playwright; no browser
downloads), served by uvicorn on a free loopback port: jobs by name and tag, filters, cancel and
retry buttons, live refresh, sign-in, and XSS attempts that must stay text."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

import backroom
from backroom.brokers.base import JobQuery
from backroom.envelope import Envelope, new_id
from tests.helpers import wait_until
from tests.web.conftest import SECRET, LiveServer, build_app

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
XSS_JOB = "<img src=x onerror=window.__xss_job=1>"
XSS_TAG = "<script>window.__xss_tag=1</script>"
XSS_PAYLOAD = "<img src=x onerror=window.__xss_payload=1><script>window.__xss_payload=2</script>"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found; apt-get install -y chromium")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def app(tmp_path: Path) -> Iterator[backroom.App]:
    application = build_app(f"sqlite:///{tmp_path / 'browser.db'}")
    yield application
    application.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    opened = context.new_page()
    opened.set_default_timeout(10_000)
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    # JS errors fail the test; failed requests do not (a 401 before signing in is expected, and
    # polling meets a closed port once the server stops)
    opened.on(
        "console",
        lambda m: (
            errors.append(m.text)
            if m.type == "error" and "Failed to load resource" not in m.text
            else None
        ),
    )
    yield opened
    context.close()
    assert errors == [], f"errors in the page: {errors}"


def artifact(tmp_path: Path, name: str) -> Path:
    """Where screenshots go: $BACKROOM_TEST_ARTIFACTS when set, else the test's tmp_path."""
    folder = Path(os.environ.get("BACKROOM_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def drain(app: backroom.App) -> None:
    """Run every queued job. In a thread of its own: Playwright's sync API keeps an event loop
    running in the test's thread, where the worker's asyncio.run may not start another."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            app.run_worker(burst=True)
        except BaseException as exc:  # handed to the test below
            failures.append(exc)

    thread = threading.Thread(target=run, name="worker")
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the burst worker did not finish within 60 s"
    if failures:
        raise failures[0]


def rows(page: Page) -> list[str]:
    return page.locator("#jobs-table tbody tr").all_inner_texts()


def state_of(app: backroom.App, job_id: str) -> str:
    record = app.broker.get(job_id)
    assert record is not None
    return str(record.state)


def test_the_dashboard_shows_every_job_by_name_and_tag(app: backroom.App, page: Page) -> None:
    for n in range(3):
        app.enqueue("process_logs", {"server": f"edge-{n}", "day": "2026-11-21"}, tags=["edge-7"])
    app.enqueue("send_email", {"to": "a@example.com"})
    app.enqueue("always_fails", {"message": "disk full"})
    drain(app)
    app.enqueue("process_logs", {"server": "edge-9", "day": "2026-11-21"})
    [lost] = app.broker.claim(["default"], worker_id="gone", lease_s=5, limit=1)
    app.broker.sweep_expired(now=lost.lease_until + 1)  # its worker vanished: queued again
    with LiveServer(app) as server:
        page.goto(server.url)
        overview = page.locator("#overview-table")
        for name in ("process_logs", "send_email", "always_fails", "upload", "send_invoices"):
            expect(overview).to_contain_text(name)
        headers = overview.locator("thead th").all_inner_texts()
        for name, recovered in (("process_logs", "1"), ("send_email", "0")):
            cells = overview.locator("tbody tr", has_text=name).locator("td")
            expect(cells.nth(headers.index("recovered"))).to_have_text(recovered)
        expect(page.locator("#tags-table")).to_contain_text("edge-7")
        expect(page.locator("#tags-table")).to_contain_text("email")
        expect(page.locator("#jobs-table tbody tr")).to_have_count(6)
        expect(page.locator("#jobs-table .tag", has_text="edge-7")).to_have_count(3)
        expect(page.locator("#failures-table")).to_contain_text("ValueError")
        expect(page.locator("#schedules-table")).to_contain_text("0 6 1 * *")
        expect(page.locator("#queues-table")).to_contain_text("mail")
        expect(page.locator("#chart-throughput svg rect.bar-ok")).not_to_have_count(0)
        assert page.url == server.url  # nothing but the page itself in the address bar


def test_the_tag_table_shows_the_jobs_running_now_and_their_p95_wait(
    app: backroom.App, page: Page
) -> None:
    app.enqueue("process_logs", {"server": "edge-1", "day": "2026-11-21"}, tags=["edge-7"])
    [claim] = app.broker.claim(["default"], "w1", lease_s=60, limit=1)  # running, never acked
    assert "edge-7" in claim.envelope.tags
    with LiveServer(app) as server:
        page.goto(server.url)
        row = page.locator("#tags-table tbody tr", has_text="edge-7")
        expect(row).to_have_count(1)
        headers = page.locator("#tags-table thead th").all_inner_texts()
        cells = row.locator("td")
        expect(cells.nth(headers.index("running"))).to_have_text("1")
        expect(cells.nth(headers.index("p95 wait"))).not_to_have_text("-")


def test_the_job_list_filters_by_state_job_and_tag_and_pages(app: backroom.App, page: Page) -> None:
    for n in range(30):
        app.enqueue(
            "process_logs",
            {"server": f"edge-{n}", "day": "2026-11-21"},
            tags=["edge-7" if n % 3 == 0 else "edge-8"],
        )
    app.enqueue("always_fails", {"message": "boom"})
    drain(app)
    app.enqueue("send_email", {"to": "a@example.com"})
    with LiveServer(app) as server:
        page.goto(server.url)
        expect(page.locator("#jobs-table tbody tr")).to_have_count(25)
        expect(page.locator("#page-label")).to_have_text("page 1")
        page.click("#page-older")
        expect(page.locator("#page-label")).to_have_text("page 2")
        expect(page.locator("#jobs-table tbody tr")).to_have_count(7)
        page.click("#page-newer")
        expect(page.locator("#jobs-table tbody tr")).to_have_count(25)

        page.select_option("#filter-state", "dead")
        expect(page.locator("#jobs-table tbody tr")).to_have_count(1)
        expect(page.locator("#jobs-table tbody")).to_contain_text("always_fails")
        expect(page.locator("#bulk-retry")).to_be_visible()

        page.click("#filter-clear")
        page.select_option("#filter-job", "send_email")
        expect(page.locator("#jobs-table tbody tr")).to_have_count(1)
        expect(page.locator("#jobs-table tbody")).to_contain_text("queued")

        page.click("#filter-clear")
        page.fill("#filter-tag", "edge-7")
        page.press("#filter-tag", "Enter")
        expect(page.locator("#jobs-table tbody tr")).to_have_count(10)
        assert all("edge-7" in text for text in rows(page))

        page.click("#filter-clear")
        page.locator("#jobs-table .tag", has_text="edge-8").first.click()  # a tag chip filters
        expect(page.locator("#filter-tag")).to_have_value("edge-8")
        expect(page.locator("#jobs-table tbody tr")).to_have_count(20)


def test_clicking_cancel_on_a_queued_job_cancels_it(app: backroom.App, page: Page) -> None:
    keep = app.enqueue("process_logs", {"server": "edge-1", "day": "2026-11-21"})
    victim = app.enqueue("send_email", {"to": "a@example.com"})
    with LiveServer(app) as server:
        page.goto(server.url)
        row = page.locator(f"#jobs-table tbody tr[data-id='{victim.id}']")
        expect(row).to_contain_text("queued")
        row.get_by_role("button", name="Cancel").click()
        wait_until(
            lambda: state_of(app, victim.id) == "cancelled",
            deadline_s=10,
            what="the job to be cancelled",
        )
        expect(row).to_contain_text("cancelled")
        expect(row.get_by_role("button", name="Retry")).to_be_visible()
    assert state_of(app, keep.id) == "queued"
    record = app.broker.get(victim.id)
    assert record is not None and record.reason == "cancelled by api"


def test_open_a_dead_job_press_retry_and_see_it_succeed(
    app: backroom.App, page: Page, tmp_path: Path
) -> None:
    app.config["storage_down"] = True
    handle = app.enqueue("upload", {"path": "/streams/42.mp4"})
    drain(app)
    assert handle.status() == "dead"
    with LiveServer(app) as server:
        page.goto(server.url)
        page.locator(f"#jobs-table tbody tr[data-id='{handle.id}'] button.link").click()
        detail = page.locator("#detail")
        expect(detail).to_be_visible()
        expect(detail.locator("#detail-fields")).to_contain_text("dead")
        expect(detail.locator("#detail-error")).to_have_text(
            "ConnectionError: storage node timed out"
        )
        expect(detail.locator("#detail-traceback")).to_contain_text("raise ConnectionError(")
        expect(detail.locator("#detail-payload")).to_contain_text("/streams/42.mp4")
        expect(page.locator("#detail-cancel")).to_be_disabled()
        app.config["storage_down"] = False
        page.click("#detail-retry")
        wait_until(lambda: handle.status() == "queued", deadline_s=10, what="the retry")
        drain(app)
        expect(detail.locator("#detail-fields")).to_contain_text("succeeded")
        expect(page.locator("#detail-result")).to_contain_text("uploaded /streams/42.mp4")
        expect(page.locator("#detail-retry")).to_be_disabled()
        shot = artifact(tmp_path, "dashboard-retry-succeeded.png")
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
    assert handle.result(timeout=1) == "uploaded /streams/42.mp4"


def test_running_jobs_show_elapsed_time_and_progress_and_the_page_refreshes_itself(
    app: backroom.App, page: Page
) -> None:
    handle = app.enqueue("process_logs", {"server": "edge-1", "day": "2026-11-21"})
    with LiveServer(app) as server:
        page.goto(server.url)
        expect(page.locator("#running-table")).to_contain_text("Nothing is running")
        page.evaluate("window.__same_page = true")
        [claim] = app.broker.claim(["default"], worker_id="w-7", lease_s=60, limit=1)
        app.broker.progress(claim, 0.4, "parsing lines")
        running = page.locator("#running-table tbody tr")
        expect(running).to_contain_text("parsing lines")  # arrives by polling
        expect(running).to_contain_text("w-7")
        assert running.locator("progress").get_attribute("value") is not None
        first = running.locator("td.num").inner_text()
        page.wait_for_function(
            "first => document.querySelector('#running-table td.num').textContent !== first",
            arg=first,
        )
        newcomer = app.enqueue("send_email", {"to": "late@example.com"})
        expect(page.locator(f"#jobs-table tbody tr[data-id='{newcomer.id}']")).to_be_visible()
        assert page.evaluate("window.__same_page") is True  # no full reload happened
    assert handle.status() == "running"


def test_xss_in_a_job_name_tag_and_payload_shows_as_text_and_never_runs(
    app: backroom.App, page: Page
) -> None:
    smuggled = Envelope(
        id=new_id(),
        job=XSS_JOB,
        source="api",
        tags=(XSS_TAG,),
        payload={"note": XSS_PAYLOAD, XSS_TAG: XSS_JOB},
        created_at=time.time(),
    )
    app.broker.enqueue([smuggled])  # another program wrote it straight into the broker
    app.enqueue("process_logs", {"server": XSS_PAYLOAD, "day": "2026-11-21"}, tags=[XSS_TAG])
    drain(app)  # the smuggled job is rejected, the other succeeds: their tag has numbers
    with LiveServer(app) as server:
        page.goto(server.url)
        expect(page.locator("#overview-table")).to_contain_text(XSS_JOB)
        expect(page.locator("#tags-table")).to_contain_text(XSS_TAG)
        row = page.locator(f"#jobs-table tbody tr[data-id='{smuggled.id}']")
        expect(row).to_contain_text(XSS_JOB)
        expect(row.locator(".tag")).to_have_text(XSS_TAG)
        row.locator("button.link").click()
        expect(page.locator("#detail-title")).to_contain_text(XSS_JOB)
        expect(page.locator("#detail-payload")).to_contain_text(XSS_PAYLOAD)
        page.locator("#tags-table .tag", has_text=XSS_TAG).click()
        expect(page.locator("#filter-tag")).to_have_value(XSS_TAG)
        expect(page.locator("#jobs-table tbody tr")).to_have_count(2)
        page.select_option("#filter-job", XSS_JOB)
        expect(page.locator("#jobs-table tbody tr")).to_have_count(1)
        flags = page.evaluate(
            "[window.__xss_job, window.__xss_tag, window.__xss_payload]"
            ".map(v => v === undefined ? null : v)"
        )
        assert flags == [None, None, None]
        assert page.locator("img").count() == 0  # no element was parsed out of the data
        assert page.locator("body script").count() == 0


def test_a_secret_in_a_payload_never_reaches_the_page(app: backroom.App, page: Page) -> None:
    handle = app.enqueue("send_email", {"to": "a@example.com", "password": SECRET})
    with LiveServer(app) as server:
        page.goto(server.url)
        page.locator(f"#jobs-table tbody tr[data-id='{handle.id}'] button.link").click()
        expect(page.locator("#detail-payload")).to_contain_text('"password": "[redacted]"')
        assert SECRET not in page.content()


def test_with_a_token_the_page_asks_for_it_and_keeps_it_out_of_the_url(
    app: backroom.App, page: Page
) -> None:
    app.enqueue("send_email", {"to": "a@example.com"})
    with LiveServer(app, tokens={"web": "tok-web-123"}) as server:
        page.goto(server.url)
        expect(page.locator("#login")).to_be_visible()
        expect(page.locator("#dashboard")).to_be_hidden()
        page.fill("#token", "wrong-token")
        page.click("#login-form button[type=submit]")
        expect(page.locator("#login-error")).to_contain_text("not recognised")
        page.fill("#token", "tok-web-123")
        page.click("#login-form button[type=submit]")
        expect(page.locator("#dashboard")).to_be_visible()
        expect(page.locator("#whoami")).to_have_text("enqueues as web")
        expect(page.locator("#jobs-table tbody")).to_contain_text("send_email")
        assert "tok-web-123" not in page.url
        assert page.evaluate("sessionStorage.getItem('backroom.token')") == "tok-web-123"
        page.click("#logout")
        expect(page.locator("#login")).to_be_visible()
        assert page.evaluate("sessionStorage.getItem('backroom.token')") is None


def test_pausing_a_queue_from_the_page(app: backroom.App, page: Page) -> None:
    with LiveServer(app) as server:
        page.goto(server.url)
        mail = page.locator("#queues-table tbody tr", has_text="mail")
        mail.get_by_role("button", name="Pause").click()
        wait_until(lambda: app.broker.paused() == {"mail"}, deadline_s=10, what="the pause")
        expect(mail).to_contain_text("paused")
        mail.get_by_role("button", name="Resume").click()
        wait_until(lambda: app.broker.paused() == set(), deadline_s=10, what="the resume")


def test_bulk_retry_of_the_dead_jobs_matching_the_filter(app: backroom.App, page: Page) -> None:
    app.config["storage_down"] = True
    for n in range(3):
        app.enqueue("upload", {"path": f"/s/{n}"})
    drain(app)
    with LiveServer(app) as server:
        page.goto(server.url)
        page.select_option("#filter-state", "dead")
        expect(page.locator("#jobs-table tbody tr")).to_have_count(3)
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#bulk-retry")
        expect(page.locator("#jobs-message")).to_have_text("Retried 3 jobs.")
        expect(page.locator("#jobs-table tbody tr.empty")).to_have_count(1)
    assert len(app.broker.jobs(JobQuery(state=backroom.State.QUEUED))) == 3
