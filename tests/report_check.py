"""Checks a Loupe report the way a manager will meet it: in a real browser.

    python3 tests/report_check.py REPORT.html OUT_DIR [--max-bytes N]

1. The HTML parses without a single error in html5lib's strict mode (the WHATWG parsing algorithm).
2. No broken or outside references: every image is a data: URI, every in-page link names an element that
   exists, nothing is fetched from a network or the disk (the file must open offline, alone).
3. Headless Chromium renders it to OUT_DIR/report.png; the screenshot must show the embedded pictures (heatmap
   colours, warm and cool), the plots (the histograms' bars) and text, not a blank page.
4. Chromium prints it to OUT_DIR/report.pdf (what "Print > Save as PDF" gives a reader): several pages.
Prints one JSON line with what it measured; exits non-zero with the reason on the first failed check.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import html5lib
from PIL import Image

GOOD_BAR = (161, 196, 163)
DEFECT_BAR = (229, 158, 158)


def fail(message):
    print(f"report check failed: {message}", file=sys.stderr)
    sys.exit(1)


def check_markup(text):
    parser = html5lib.HTMLParser(strict=True, namespaceHTMLElements=False)
    try:
        document = parser.parse(text)
    except html5lib.html5parser.ParseError as error:
        fail(f"the HTML does not parse cleanly: {error}")
    ids = {element.get("id") for element in document.iter() if element.get("id")}
    images = [element for element in document.iter() if element.tag == "img"]
    for image in images:
        source = image.get("src", "")
        if not source.startswith("data:image/"):
            fail(f"an image is not embedded: src={source[:80]!r}")
        if not image.get("alt"):
            fail("an image has no alt text")
    for element in document.iter():
        href = element.get("href")
        if href is None:
            continue
        if not href.startswith("#") or href[1:] not in ids:
            fail(f"a link points outside the file or to nothing: href={href!r}")
    for attribute in ("src", "href"):
        for match in re.finditer(rf'{attribute}="(https?:|file:|//)', text):
            fail(f"an outside reference: {text[match.start():match.start() + 80]!r}")
    svgs = [element for element in document.iter() if element.tag.endswith("svg")]
    return len(images), len(svgs)


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    fail("no Chromium found: install Debian's `chromium` package (.ci/run does)")


def run_browser(browser, arguments):
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *arguments]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        fail(f"{' '.join(command)} exited {done.returncode}: {done.stderr[-2000:]}")


def check_screenshot(path):
    image = Image.open(path).convert("RGB")
    small = image.resize((image.width // 2, image.height // 2))
    pixels = list(small.get_flattened_data() if hasattr(small, "get_flattened_data") else small.getdata())
    count = len(pixels)
    near = lambda colour: sum(1 for p in pixels if all(abs(a - b) < 14 for a, b in zip(p, colour)))
    measured = {
        "non_white": round(sum(1 for p in pixels if min(p) < 235) / count, 4),
        "colours": len(set(pixels)),
        # Heatmaps (jet over the part): warm pixels where the model sees a defect, cool ones elsewhere.
        "warm": round(sum(1 for r, g, b in pixels if r - b > 60 and r > 120) / count, 4),
        "cool": round(sum(1 for r, g, b in pixels if b - r > 60) / count, 4),
        # The histograms' bars: good (green) and defective (red) at 45 % over white, as the SVG draws them.
        "good_bars": near(GOOD_BAR),
        "defect_bars": near(DEFECT_BAR),
    }
    if measured["non_white"] < 0.05 or measured["colours"] < 500:
        fail(f"the page looks blank: {measured}")
    if measured["warm"] < 0.002 or measured["cool"] < 0.002:
        fail(f"no heatmaps on the page: {measured}")
    if measured["good_bars"] < 100 or measured["defect_bars"] < 100:
        fail(f"no score histogram on the page: {measured}")
    return measured


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("report", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-bytes", type=int, default=1_000_000)
    args = parser.parse_args()
    text = args.report.read_text(encoding="utf-8")
    size = args.report.stat().st_size
    if size > args.max_bytes:
        fail(f"{size} bytes: more than the {args.max_bytes} a report of this project may take")
    images, svgs = check_markup(text)
    if images < 2 or svgs < 3:
        fail(f"expected image + heatmap pairs and three plots per test set, found {images} images, {svgs} plots")
    args.out.mkdir(parents=True, exist_ok=True)
    browser = chromium()
    url = args.report.resolve().as_uri()
    screenshot = args.out / "report.png"
    run_browser(browser, ["--window-size=1280,5200", f"--screenshot={screenshot}", url])
    measured = check_screenshot(screenshot)
    pdf = args.out / "report.pdf"
    run_browser(browser, ["--no-pdf-header-footer", f"--print-to-pdf={pdf}", url])
    data = pdf.read_bytes()
    pages = len(re.findall(rb"/Type\s*/Page[^s]", data))
    if not data.startswith(b"%PDF") or pages < 3:
        fail(f"the printed PDF has {pages} pages")
    print(json.dumps({"bytes": size, "images": images, "plots": svgs, "pdf_pages": pages, **measured}))


if __name__ == "__main__":
    main()
