"""End to end in a real headless browser: Debian's Chromium driven by Playwright, against ``python app.py
--preset tiny`` (the ``app_server`` fixture in conftest.py).

Needs ``/usr/bin/chromium`` (apt package ``chromium``) and ``pip install playwright`` (no ``playwright install``:
the system browser is used). Without them the test is skipped locally and fails in CI (``CI=true``).
Screenshots of each stage go to ``test-artifacts/browser/``.
"""
import os
import re
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "test-artifacts", "browser")
CHROMIUM = os.environ.get("SEEDSTORY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 60_000  # any one step on the tiny preset takes a second or two; generous for a loaded CI machine
OPENING = "A little fox with a red headband sat in the meadow."
BRANCH = "Meanwhile, a fox cub followed the river."


def _missing() -> str:
    reasons = []
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        reasons.append(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reasons.append("the playwright package is not installed (pip install playwright)")
    return "; ".join(reasons)


@pytest.fixture(scope="module")
def browser():
    missing = _missing()
    if missing:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"the browser test cannot run in CI: {missing}")
        pytest.skip(f"browser test skipped: {missing}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=WAIT_MS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    os.makedirs(ARTIFACTS)
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(WAIT_MS)
    pg.set_default_navigation_timeout(WAIT_MS)
    pg.page_errors = []
    pg.on("pageerror", lambda e: pg.page_errors.append(str(e)))
    try:
        yield pg
    finally:
        context.close()


def test_story_in_the_browser(app_server, page):
    from playwright.sync_api import expect

    stage = iter(range(100))

    def shot(name):
        page.screenshot(path=os.path.join(ARTIFACTS, f"{next(stage):02d}-{name}.png"), full_page=True)

    thumbs = page.locator("#storyboard .thumbnail-item")
    captions = page.locator("#storyboard .thumbnail-item .caption-label")
    info = page.locator("p", has_text=re.compile(r"^Frame #\d+ · step"))  # the selected frame's details
    toasts = page.get_by_test_id("toast-body")
    selector = page.get_by_role("combobox", name="Frame")

    def click(name):
        page.get_by_role("button", name=name, exact=True).click()

    def status(pattern):
        """Wait for the status line to match; returns its text."""
        line = page.get_by_text(re.compile(pattern))
        expect(line).to_be_visible()
        return line.inner_text()

    def pictures_loaded():
        """Every storyboard picture has arrived whole (decoded, non-empty)."""
        page.wait_for_function("""() => {
            const imgs = Array.from(document.querySelectorAll('.thumbnail-item img'));
            return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
        }""", timeout=WAIT_MS)

    try:
        page.goto(app_server, wait_until="load")
        expect(page.get_by_role("button", name="Start story")).to_be_visible()
        expect(page.get_by_role("heading", name="SEED-Story")).to_be_visible()
        shot("opened")

        # A mistake first: Next frame without a story is a message, not a crash.
        click("Next frame")
        expect(toasts.filter(has_text="start a story first")).to_be_visible()
        shot("error-message")
        page.get_by_test_id("toast-close").first.click()
        expect(toasts).to_have_count(0)

        # Upload a picture, write the opening, start.
        page.get_by_test_id("file-upload").first.set_input_files(os.path.join(ROOT, "assets", "examples",
                                                                              "fox_meadow.png"))
        expect(page.get_by_test_id("image").first.locator("img")).to_be_visible()
        page.get_by_label("Opening text").fill(OPENING)
        click("Start story")
        expect(thumbs).to_have_count(1)
        expect(captions.first).to_have_text(f"▶ 0. {OPENING}")  # the selected frame is marked
        expect(info).to_contain_text("Frame #0")
        expect(selector).to_have_value(re.compile(r"^#0 · A little fox"))
        status("Story started")
        shot("started")

        # Two more frames. A frame's text shows while its picture is painted: wait for the picture.
        painting = page.locator("#storyboard .caption-label", has_text="(painting…)")
        click("Next frame")
        expect(thumbs).to_have_count(2)
        expect(painting).to_have_count(0)
        click("Next frame")
        expect(thumbs).to_have_count(3)
        expect(painting).to_have_count(0)
        expect(info).to_contain_text("Frame #2")
        expect(captions).to_have_text([re.compile(r"^0\. "), re.compile(r"^1\. "), re.compile(r"^▶ 2\. ")])
        pictures_loaded()
        shot("three-frames")

        # A mistake mid-story is a message on the status line; the storyboard and the frame stay as they were.
        click("Undo delete")
        expect(toasts.filter(has_text="no delete to undo")).to_be_visible()
        expect(thumbs).to_have_count(3)
        expect(page.locator("#storyboard .thumbnail-item img")).to_have_count(3)
        count_badges = """() => Array.from(document.querySelectorAll('[data-testid=status-tracker]'))
            .filter(t => /\\bError\\b/.test(t.innerText)).length"""
        page.wait_for_function(f"({count_badges})() >= 1", timeout=WAIT_MS)  # the badges follow the toast
        page.wait_for_timeout(500)
        badges = page.evaluate(count_badges)
        assert badges == 1, f"{badges} components show an error badge; only the status line should"
        page.get_by_test_id("toast-close").first.click()
        expect(toasts).to_have_count(0)

        # Regenerate the last frame twice with the seed box left as it is: each time a new seed, a new version.
        click("Regenerate this frame")
        first = status(r"Regenerated as frame #3: new text and picture \(seed \d+\)")
        expect(info).to_contain_text("version 2 of 2")
        click("Regenerate this frame")
        second = status(r"Regenerated as frame #4: new text and picture \(seed \d+\)")
        expect(info).to_contain_text("version 3 of 3")
        seeds = [int(re.search(r"seed (\d+)", s).group(1)) for s in (first, second)]
        assert seeds[0] != seeds[1], f"'Regenerate' reused seed {seeds[0]}: the new version is the same frame"
        expect(thumbs).to_have_count(3)
        pictures_loaded()
        shot("regenerated")

        # Pick frame #1 in the frame selector, then branch there with our own text.
        selector.click()
        page.get_by_role("option", name=re.compile(r"^#1 · ")).click()
        expect(info).to_contain_text("Frame #1")
        expect(info).to_contain_text("3 continuation(s)")
        page.get_by_label("Branch here with this text (empty: let the model write)").fill(BRANCH)
        click("Branch here")
        status(r"New branch at frame #5")
        expect(info).to_contain_text("Frame #5")
        expect(info).to_contain_text("version 4 of 4")
        expect(captions).to_have_count(3)
        expect(captions.last).to_have_text(f"▶ 2. {BRANCH}")
        expect(page.get_by_label("Frame text (edit, then apply)")).to_have_value(BRANCH)
        pictures_loaded()
        shot("branched")

        # Switch between the versions of frame 2 with the ◀ / ▶ buttons (wrapping around).
        click("◀ other version")
        expect(info).to_contain_text("Frame #4")
        expect(info).to_contain_text("version 3 of 4")
        expect(captions.last).not_to_have_text(f"▶ 2. {BRANCH}")
        click("other version ▶")
        expect(info).to_contain_text("version 4 of 4")
        click("other version ▶")
        expect(info).to_contain_text("Frame #2")
        expect(info).to_contain_text("version 1 of 4")
        expect(selector).to_have_value(re.compile(r"^#2 · "))
        tree = page.locator(".story-outline")
        expect(tree.locator("button.node")).to_have_count(6)
        expect(tree.locator("button.node.current[data-frame='2']")).to_have_count(1)
        expect(tree.locator("button.node[data-frame='1']")).to_have_attribute("data-branches", "4")
        shot("switched-version")
        # Back to the branch we wrote, which the export below covers: a click on its node in the story tree.
        tree.locator("button.node[data-frame='5']").click()
        expect(info).to_contain_text("Frame #5")
        expect(tree.locator("button.node.current[data-frame='5']")).to_have_count(1)
        expect(selector).to_have_value(re.compile(r"^#5 · "))
        sizes = tree.locator("button.node").evaluate_all("els => els.map(e => getComputedStyle(e).fontSize)")
        assert len(set(sizes)) == 1, sizes  # the deepest node is as readable as the opening
        tree.screenshot(path=os.path.join(ARTIFACTS, "story-tree.png"))
        shown = page.locator("#selected-frame img").evaluate("e => [e.clientWidth, e.naturalWidth]")
        assert shown[0] >= 4 * shown[1], shown  # the small picture fills its box
        # The versions of frame 2 side by side: a click on one shows it.
        versions = page.locator("#versions .thumbnail-item")
        expect(versions).to_have_count(4)
        expect(page.locator("#versions .caption-label").last).to_contain_text("version 4 of 4 (shown)")
        versions.nth(1).click()
        expect(info).to_contain_text("version 2 of 4")
        tree.locator("button.node[data-frame='5']").click()
        expect(info).to_contain_text("Frame #5")
        # The reading view: the whole branch, each picture whole and scaled up, with its full text.
        page.get_by_text("Reading view: the current branch").click()
        page.get_by_role("button", name="Show the current branch").click()
        figures = page.locator(".reading figure")
        expect(figures).to_have_count(3)
        expect(figures.last).to_contain_text(BRANCH)
        widths = figures.locator("img").evaluate_all("els => els.map(e => [e.clientWidth, e.naturalWidth])")
        assert all(shown == 384 for shown, _ in widths), widths  # one useful size: the model paints small
        assert all(shown >= 4 * natural for shown, natural in widths[1:]), widths
        page.locator(".reading").screenshot(path=os.path.join(ARTIFACTS, "reading-view.png"))

        # Export the current branch as PDF and download it.
        page.get_by_role("button", name="Save, load, export").click()
        page.get_by_label("pdf", exact=True).check()
        click("Export the current branch")
        link = page.locator('a[download="story.pdf"]')
        expect(link).to_be_visible()
        with page.expect_download(timeout=WAIT_MS) as download:
            link.click()
        pdf_path = os.path.join(ARTIFACTS, "story.pdf")
        download.value.save_as(pdf_path)
        with open(pdf_path, "rb") as f:
            data = f.read()
        assert data.startswith(b"%PDF"), data[:16]
        assert len(re.findall(rb"/Type\s*/Page\b(?!s)", data)) == 3  # 0 -> 1 -> 5
        page.get_by_role("heading", name="SEED-Story").scroll_into_view_if_needed()
        shot("exported")

        expect(toasts).to_have_count(0)
        assert page.page_errors == [], page.page_errors

        # A reload does not lose the story: it comes back where it was.
        page.reload(wait_until="load")
        status("Your story is back where you left it")
        expect(thumbs).to_have_count(3)
        expect(captions.last).to_have_text(f"▶ 2. {BRANCH}")
        expect(info).to_contain_text("Frame #5")
        shot("reloaded")
    except BaseException:
        try:
            page.screenshot(path=os.path.join(ARTIFACTS, "failure.png"), full_page=True)
            with open(os.path.join(ARTIFACTS, "failure.html"), "w", encoding="utf-8") as f:
                f.write(page.content())
        except Exception:  # noqa: BLE001 - keep the original error
            pass
        raise


def test_a_long_branching_story_in_the_browser(app_server, page):
    """25 frames with three branches: the tree stays readable (one font size at every depth), its nodes move
    between branches, the storyboard shows every picture whole; screenshots of the tree and the storyboard."""
    from playwright.sync_api import expect

    info = page.locator("p", has_text=re.compile(r"^Frame #\d+ · step"))
    thumbs = page.locator("#storyboard .thumbnail-item")
    tree = page.locator(".story-outline")

    def click(name):
        page.get_by_role("button", name=name, exact=True).click()

    def next_n(n):
        box = page.get_by_label("number input for N")
        box.fill(str(n))
        box.press("Enter")
        click("Next N frames")
        expect(page.get_by_text(re.compile(rf"^Added {n} frame\(s\)"))).to_be_visible(timeout=WAIT_MS)

    def node(frame_id):
        return tree.locator(f"button.node[data-frame='{frame_id}']")

    try:
        page.goto(app_server, wait_until="load")
        page.get_by_test_id("file-upload").first.set_input_files(os.path.join(ROOT, "assets", "examples",
                                                                              "fox_meadow.png"))
        page.get_by_label("Opening text").fill(OPENING)
        click("Start story")
        expect(thumbs).to_have_count(1)
        next_n(24)
        expect(thumbs).to_have_count(25)
        expect(tree.locator(".run")).to_have_count(1)  # a straight story is one row
        # Three branches: two at step 10, one at step 20 of the first, each written on by the model.
        for at in (10, 10, 20):
            node(at).click()
            expect(info).to_contain_text(f"Frame #{at} ")
            click("Branch here")
            expect(page.get_by_text(re.compile(r"^New branch at frame #\d+"))).to_be_visible(timeout=WAIT_MS)
            next_n(2)
        expect(tree.locator(".run")).to_have_count(1 + 3 + 2)  # steps 0-10, three branches, the rest of each fork
        expect(node(10)).to_have_attribute("data-branches", "3")
        # Move between branches by clicking the tree: the storyboard follows the branch clicked.
        node(24).click()  # the first story's last frame
        expect(info).to_contain_text("Frame #24 ")
        expect(thumbs).to_have_count(25)
        node(27).click()  # the end of the first branch at step 10 (#25-#27)
        expect(info).to_contain_text("Frame #27 ")
        expect(thumbs).to_have_count(14)  # steps 0-10, the branch's first frame and two more
        sizes = tree.locator("button.node").evaluate_all("els => els.map(e => parseFloat(getComputedStyle(e).fontSize))")
        assert len(sizes) == 25 + 3 * 3 and min(sizes) == sizes[0], sizes  # the deepest is as large as the root
        # Every storyboard picture whole: the drawn box has the picture's own shape (no crop).
        shapes = page.locator("#storyboard .thumbnail-item img").evaluate_all(
            "els => els.map(e => [e.naturalWidth / e.naturalHeight, getComputedStyle(e).objectFit])")
        assert all(fit == "contain" for _, fit in shapes), shapes
        cut = page.locator("#storyboard .caption-label").evaluate_all(
            "els => els.filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.innerText)")
        assert cut == [], cut  # full captions, wrapped
        tree.screenshot(path=os.path.join(ARTIFACTS, "story-tree-25-frames.png"))
        page.locator("#storyboard").screenshot(path=os.path.join(ARTIFACTS, "storyboard.png"))
        assert page.page_errors == [], page.page_errors
    except BaseException:
        try:
            page.screenshot(path=os.path.join(ARTIFACTS, "failure-long.png"), full_page=True)
        except Exception:  # noqa: BLE001 - keep the original error
            pass
        raise
