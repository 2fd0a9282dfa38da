"""Screenshots of the demo's atlas for README.md and docs/ (headless Chromium through selenium).

Usage: python -m demo.atlas_pictures [--atlas demo_out/atlas] [--docs docs] [--width 900]
Opens the atlas's index.html and its first channel page in Debian's ``chromium`` (with ``chromedriver``),
and writes, scaled to --width pixels wide and cut to a few screens:
  docs/atlas_index.png     the index (one row per split channel)
  docs/atlas_channel.png   the first channel's page
"""
import argparse
import io
import json
import os
import shutil

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW = (1400, 1000)  # the browser's window: wide enough for the index's columns


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", default="demo_out/atlas", help="the demo's atlas folder (default demo_out/atlas)")
    p.add_argument("--docs", default=os.path.join(ROOT, "docs"), help="where the pictures go (default docs/)")
    p.add_argument("--width", type=int, default=900, help="width of the pictures in pixels (default 900)")
    return p.parse_args(argv)


def browser(window=WINDOW, log=False):
    """Headless Chromium (Debian's chromium and chromedriver through selenium) with a ``window`` (width, height)
    and, with ``log``, the page's console kept for ``get_log("browser")``; SystemExit with the reason where
    selenium, chromium or chromedriver is missing. Used by the tests and benchmarks/atlas_scale.py too."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise SystemExit("selenium is not installed")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        raise SystemExit("Debian's chromium and chromium-driver are needed (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--window-size={window[0]},{window[1]}", "--hide-scrollbars"):
        opts.add_argument(a)
    opts.binary_location = chromium
    if log:
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


def screenshot(driver, page, width, height):
    """The page (a file path) as a PIL image: the browser window sized to the page (at most ``height`` CSS
    pixels tall), then scaled to ``width`` pixels wide."""
    driver.set_window_size(WINDOW[0], WINDOW[1])
    driver.get("file://" + os.path.abspath(page))
    full = driver.execute_script("return document.documentElement.scrollHeight;")
    driver.set_window_size(WINDOW[0], min(height, full) + 20)
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    return image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)


def save_small(image, path):
    """A PNG of few colours (the pages are mostly text and flat colour): a few tens of KB."""
    image.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


def main(argv=None):
    args = parse_args(argv)
    from utils.files import names
    with open(names.atlas_record(args.atlas)) as f:
        rows = json.load(f)["rows"]
    if not rows:
        raise SystemExit(f"{args.atlas}: the atlas has no channel")
    pages = sorted(d for d in os.listdir(os.path.join(args.atlas, names.ATLAS_RUNS)))
    driver = browser()
    try:
        out = [save_small(screenshot(driver, names.atlas_index(args.atlas), args.width, 700),
                          os.path.join(args.docs, "atlas_index.png")),
               save_small(screenshot(driver, names.atlas_run(args.atlas, pages[0]), args.width, 1100),
                          os.path.join(args.docs, "atlas_channel.png"))]
    finally:
        driver.quit()
    for path in out:
        print(f"wrote {path} ({os.path.getsize(path) // 1024} KB)")


if __name__ == "__main__":
    main()
