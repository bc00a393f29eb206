"""``camfunc report`` in a real headless Chromium (Debian's chromium and chromium-driver, via
Selenium): the page loads with no console errors, sorting and filtering change what is
shown, and the thumbnails render. Fails, never skips, when Chromium is missing."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import Select

import camfunc.runs
import camfunc.zoo
from camfunc.cli import main
from camfunc.cli._report import page


@pytest.fixture(scope="module")
def browser():
    assert shutil.which("chromium") and shutil.which("chromedriver"), (
        "the report tests need Chromium: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900",
                 "--allow-file-access-from-files"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def run_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    camfunc.runs.run("scenes:12", out, methods=["gradcam", "gradcampp"], metrics=True, progress=False)
    assert main(["report", str(out), "--quiet", "--page-size", "10"]) == 0
    return out / "report" / "index.html"


def _errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _names(driver) -> list[str]:
    return [c.get_attribute("data-name") for c in driver.find_elements("css selector", ".card")]


def test_run_report_loads_sorts_filters_and_renders(browser, run_report):
    browser.get(run_report.as_uri())
    assert _errors(browser) == []
    assert len(_names(browser)) == 10  # one page
    first = _names(browser)
    Select(browser.find_element("id", "sort")).select_by_visible_text("probability")
    by_probability = _names(browser)
    assert by_probability != first
    Select(browser.find_element("id", "method")).select_by_visible_text("gradcampp")
    shown = browser.find_elements("css selector", ".card div")
    assert shown and all(" gradcampp " in s.text for s in shown)
    Select(browser.find_element("id", "cls")).select_by_index(1)
    chosen = Select(browser.find_element("id", "cls")).first_selected_option.text
    assert all(f" {chosen} " in s.text for s in browser.find_elements("css selector", ".card div"))
    widths = browser.execute_script(
        "return [...document.images].map((i) => i.complete ? i.naturalWidth : -1)")
    assert widths and all(w > 0 for w in widths)
    from io import BytesIO

    from PIL import Image
    shot = np.asarray(Image.open(BytesIO(browser.get_screenshot_as_png())).convert("L"), float)
    assert shot.std() > 10  # not blank
    assert _errors(browser) == []


def test_evaluate_report_loads(browser, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--generated", "4", "--out", str(out)]) == 0
    assert main(["report", str(out), "--quiet"]) == 0
    browser.get((out / "report" / "index.html").as_uri())
    assert _errors(browser) == []
    assert len(_names(browser)) == 4
    assert "pointing" in browser.find_element("id", "classes").text


def test_evaluate_keeps_curves_the_report_plots_and_filters_by_value(browser, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--generated", "6", "--method", "gradcam", "--method", "layercam",
                 "--out", str(out)]) == 0
    data = json.loads((out / "metrics.json").read_text())
    for row in data["images"]:  # each AUC is the area under the curve kept beside it
        curve = next(c for c in data["curves"] if c["image"] == row["image"]
                     and c["method"] == row["method"] and c["metric"] == "deletion")
        assert np.trapezoid(curve["scores"], curve["fractions"]) == pytest.approx(row["deletion_auc"], abs=1e-5)
    assert main(["report", str(out), "--quiet"]) == 0
    text = (out / "report" / "index.html").read_text()
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
    browser.get((out / "report" / "index.html").as_uri())
    assert _errors(browser) == []
    plots = browser.find_elements("css selector", "svg.curve")
    assert sorted(p.get_attribute("data-metric") for p in plots) == ["deletion", "insertion"]
    for plot in plots:
        lines = plot.find_elements("css selector", "polyline")
        assert sorted(line.get_attribute("data-method") for line in lines) == ["gradcam", "layercam"]
        assert all(len(line.get_attribute("points").split()) == len(data["curves"][0]["scores"])
                   for line in lines)
        assert plot.size["width"] > 100 and plot.size["height"] > 100  # drawn, not collapsed
    assert len(_names(browser)) == 12
    Select(browser.find_element("id", "fmetric")).select_by_visible_text("insertion_auc")
    threshold = sorted(r["insertion_auc"] for r in data["images"])[6]
    browser.find_element("id", "fvalue").send_keys(f"{threshold:.6f}")
    above = sum(r["insertion_auc"] >= round(threshold, 6) for r in data["images"])
    assert len(_names(browser)) == above and 0 < above < 12
    Select(browser.find_element("id", "fop")).select_by_index(1)  # at most the value
    below = sum(r["insertion_auc"] <= round(threshold, 6) for r in data["images"])
    assert len(_names(browser)) == below
    assert _errors(browser) == []


def test_a_run_without_metrics_still_has_its_gallery(browser, tmp_path):
    out = tmp_path / "run"
    camfunc.runs.run("scenes:3", out, methods=["gradcam"], classes="top2", progress=False)
    # metrics.csv: a row per image and class, with scores but no metric columns
    lines = (out / "metrics.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 3 * 2 and "drop" not in lines[0] and "probability" in lines[0]
    assert main(["report", str(out), "--quiet"]) == 0
    browser.get((out / "report" / "index.html").as_uri())
    time.sleep(0.5)
    assert len(_names(browser)) == 6
    assert _errors(browser) == []


def test_a_folder_of_nothing_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_ten_thousand_rows_open_quickly(browser, tmp_path):
    rows = [{"name": f"img-{i}", "method": "gradcam", "class_name": f"c{i % 10}", "drop": (i * 7 % 100) / 100,
             "increase": i % 2, "thumb": "t.png"} for i in range(10_000)]
    from PIL import Image
    Image.new("RGB", (128, 128), (200, 40, 40)).save(tmp_path / "t.png")
    (tmp_path / "index.html").write_text(page(rows, {"kind": "run"}, 100))
    start = time.perf_counter()
    browser.get((tmp_path / "index.html").as_uri())  # returns after the load event
    seconds = time.perf_counter() - start
    assert _errors(browser) == []
    assert len(_names(browser)) == 100
    print(json.dumps({"open_10k_seconds": round(seconds, 3)}))
    assert seconds < 3


def test_explain_report_shows_its_overlays(browser, tmp_path):
    from PIL import Image

    scenes = camfunc.zoo.scenes(2, seed=3)
    for i, image in enumerate(scenes.images):
        pixels = (image.permute(1, 2, 0) * 255).round().byte().numpy()
        Image.fromarray(pixels).save(tmp_path / f"s{i}.png")
    out = tmp_path / "cams"
    assert main(["explain", str(tmp_path / "s0.png"), str(tmp_path / "s1.png"), "--out", str(out)]) == 0
    assert main(["report", str(out), "--quiet"]) == 0
    browser.get((out / "report" / "index.html").as_uri())
    assert _errors(browser) == []
    assert len(_names(browser)) == 2
    assert browser.execute_script("return [...document.images].every((i) => i.naturalWidth > 0)")
