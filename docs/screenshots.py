"""The README's screenshots of the real demo: serve a demo folder, open its pages in headless
Chromium (Debian's chromium and chromium-driver, as the browser tests use) and save them.

    python docs/screenshots.py checkpoints/demo [--out docs/img]
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pages(demo: Path) -> dict[str, tuple[str, int]]:
    """Image name -> (the URL path of the page it shows, the window's height)."""
    summary = json.loads((demo / "demo.json").read_text())["summary"]
    feature = summary["showcase"]["feature"]
    return {
        "demo-map": ("/map?run=run", 900),
        "demo-feature": (f"/feature/{feature}?run=run", 900),
        "demo-geometry": ("/geometry?run=run", 1400),
        "demo-steer": ("/steer?run=run", 2400),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path, help="a folder `saewb demo` wrote")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "img")
    parser.add_argument("--wait", type=float, default=8.0, help="seconds for a page to draw")
    args = parser.parse_args()

    from selenium import webdriver
    from waitress import serve

    from dashboard.app import create_app

    port = free_port()
    app = create_app(args.demo)
    threading.Thread(
        target=serve, args=(app.server,), kwargs=dict(host="127.0.0.1", port=port), daemon=True
    ).start()
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, (path, height) in pages(args.demo).items():
            driver.set_window_size(1280, height)
            driver.get(f"http://127.0.0.1:{port}{path}")
            time.sleep(args.wait)  # plotly draws after the callbacks answer
            driver.save_screenshot(str(args.out / f"{name}.png"))
            print(f"{args.out / name}.png  {path}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
