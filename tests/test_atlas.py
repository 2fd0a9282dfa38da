"""The atlas on real stage outputs (the demo's three strongest channels, split and evaluated), opened in
a real browser (headless Chromium through selenium): no console error, every image loaded, sorting by a
column reorders the rows as the numbers in the summaries say, every link resolves; bad atlas folders are
refused in one line with nothing touched."""
import json
import os
import shutil
import subprocess
import sys
from urllib.parse import unquote, urlparse

import pytest

from tests.conftest import ROOT, tree_bytes
from utils.atlas import collect, write
from utils.files import names
from utils.errors import UserError



def _run(args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def stages(demo_runs):
    """The demo's atlas step (the session's seed-0 demo, tests/conftest.py): stages 3 and 4 with --candidates on
    its three strongest channels, with feature visualizations and label-free clusters, in OUT/candidates."""
    out, report, _ = demo_runs(0)
    results = os.path.join(out, "candidates")
    return {"out": results, "store": os.path.join(out, "store"), "candidates": report["candidates_json"],
            "runs": len(collect.runs_found(results))}


@pytest.fixture(scope="module")
def atlas(stages, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("site") / "atlas")
    proc = _ok(_run(["-m", "utils.atlas", "--results", stages["out"], "--store", stages["store"], "--atlas", folder,
                     "--candidates", stages["candidates"]]))
    return folder, proc.stdout


def _driver():
    from demo.atlas_pictures import browser
    try:
        return browser(window=(1400, 900), log=True)
    except SystemExit as e:  # selenium, chromium or chromedriver missing (.ci/run installs them with apt-get)
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def browser():
    d = _driver()
    yield d
    d.quit()


def _url(path):
    return "file://" + os.path.abspath(path)


def _images_loaded(browser):
    """(number of <img>, those with naturalWidth 0)."""
    sizes = browser.execute_script("return Array.from(document.images).map(i => [i.src, i.complete, i.naturalWidth]);")
    return len(sizes), [s for s, complete, w in sizes if not (complete and w > 0)]


def _links(browser):
    return browser.execute_script("return Array.from(document.querySelectorAll('a[href]')).map(a => a.href);")


def _check_page(browser, path):
    browser.get(_url(path))
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors
    n, broken = _images_loaded(browser)
    assert n > 0 and broken == []
    links = _links(browser)
    assert links and all(urlparse(h).scheme == "file" and os.path.isfile(unquote(urlparse(h).path)) for h in links), links
    return n


def _sources(folder):
    """{path in the atlas: the results' or store's file it shows} of every placed file (from atlas.json)."""
    record = json.load(open(names.atlas_record(folder)))
    out = {}
    for row in record["rows"]:
        for key, link in row["href"].items():
            source = row["files"].get(key)
            if source and key != "thumb":
                out[os.path.join(folder, link)] = source
    return out


def _files(*folders):
    return [os.path.join(d, f) for folder in folders for d, _, fs in os.walk(folder) for f in fs]


@pytest.mark.slow
def test_cli_says_the_total_size_and_what_is_its_own(stages, atlas):
    folder, stdout = atlas
    sources = _sources(folder)
    assert sources and all(os.path.samefile(a, b) for a, b in sources.items())  # hard links, same file system
    inputs = {(st.st_dev, st.st_ino) for st in map(os.stat, _files(stages["out"], stages["store"]))}
    total = sum(os.path.getsize(f) for f in _files(folder))
    own = sum(st.st_size for st in map(os.stat, _files(folder)) if (st.st_dev, st.st_ino) not in inputs)
    assert f"({total / 1e6:.2f} MB, {own / 1e6:.2f} MB of its own: the rest are hard links" in stdout
    assert 0 < own < total / 2


@pytest.mark.slow
def test_placed_files_keep_what_they_showed(stages, tmp_path, monkeypatch):
    """A results file replaced later (the stages rename a new file over it) leaves the atlas's file as it was;
    where the file system refuses hard links, the files are copies, byte for byte."""
    out, store = str(tmp_path / "out"), str(tmp_path / "store")
    shutil.copytree(stages["out"], out)
    shutil.copytree(stages["store"], store)
    linked = write.write_atlas(out, store, None, str(tmp_path / "linked"))
    sources = _sources(linked["folder"])
    source, placed = sorted((b, a) for a, b in sources.items() if b.endswith(".png"))[0]
    before = open(placed, "rb").read()
    from utils.files import atomic
    with atomic.atomic_path(source) as tmp:
        open(tmp, "wb").write(b"a newer picture")
    assert open(placed, "rb").read() == before and not os.path.samefile(source, placed)

    def no_links(a, b):
        raise OSError(18, "Invalid cross-device link")
    monkeypatch.setattr(os, "link", no_links)
    copied = write.write_atlas(out, store, None, str(tmp_path / "copied"))
    assert copied["own_bytes"] == copied["bytes"] and write.size_text(copied) == f"{copied['bytes'] / 1e6:.2f} MB"
    for a, b in _sources(copied["folder"]).items():
        assert open(a, "rb").read() == open(b, "rb").read() and not os.path.samefile(a, b)


@pytest.mark.slow
def test_index_in_a_browser(stages, atlas, browser, tmp_path_factory):
    folder, _ = atlas
    n = _check_page(browser, names.atlas_index(folder))
    rows = browser.find_elements("css selector", "tbody tr")
    assert len(rows) == stages["runs"]
    assert n == sum(1 for r in json.load(open(names.atlas_record(folder)))["rows"] if r["href"].get("thumb"))
    shot = str(tmp_path_factory.mktemp("screenshots") / "atlas_index.png")
    browser.save_screenshot(shot)
    assert os.path.getsize(shot) > 0


@pytest.mark.slow
def test_sorting_by_separation_follows_the_summaries(stages, atlas, browser):
    folder, _ = atlas
    browser.get(_url(names.atlas_index(folder)))
    record = json.load(open(names.atlas_record(folder)))
    sep = {r["slug"]: json.load(open(names.summary(stages["out"], r["run"])))["sep_concept1"] for r in record["rows"]}
    assert len(set(sep.values())) == len(sep) == stages["runs"]  # distinct values: the order is defined
    header = [h for h in browser.find_elements("css selector", "th") if h.text.strip() == "sep concept 1"][0]
    header.click()
    order = [r.get_attribute("id") for r in browser.find_elements("css selector", "tbody tr")]
    assert order == sorted(sep, key=sep.get)
    header.click()
    order = [r.get_attribute("id") for r in browser.find_elements("css selector", "tbody tr")]
    assert order == sorted(sep, key=sep.get, reverse=True)


@pytest.mark.slow
def test_two_channel_pages_in_a_browser(atlas, browser, tmp_path_factory):
    folder, _ = atlas
    record = json.load(open(names.atlas_record(folder)))
    with_fv = [r for r in record["rows"] if r["files"]["feature_vis"] and r["label_free"]]  # the demo's channel
    assert with_fv, "no run with feature visualizations and label-free clusters"
    pages = [with_fv[0]] + [r for r in record["rows"] if r is not with_fv[0]][:1]
    for r in pages:
        n = _check_page(browser, names.atlas_run(folder, r["slug"]))
        expected = r["k"] + sum(1 for key in ("top_images", "feature_vis", "scores", "sae_view") if r["files"][key])
        assert n == expected
    browser.save_screenshot(str(tmp_path_factory.mktemp("screenshots") / "atlas_channel.png"))
    assert "Label-free clusters" in open(names.atlas_run(folder, pages[0]["slug"])).read()


@pytest.mark.slow
def test_folder_with_other_files_is_refused_untouched(stages, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    (folder / "index.html").write_text("my page")
    before = tree_bytes(str(folder))
    proc = _run(["-m", "utils.atlas", "--results", stages["out"], "--store", stages["store"], "--atlas", str(folder)])
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "notes.txt" in proc.stderr
    assert tree_bytes(str(folder)) == before
    assert sorted(os.listdir(tmp_path)) == ["mine"]  # no temporary folder left beside it


@pytest.mark.slow
def test_rewrite_over_a_previous_atlas(stages, atlas, tmp_path):
    """A previous atlas is replaced; a second atlas of one run holds that run only."""
    folder = str(tmp_path / "atlas")
    shutil.copytree(atlas[0], folder)
    run = collect.runs_found(stages["out"])[0]
    res = write.write_atlas(stages["out"], stages["store"], [run], folder)
    assert [r["run"] for r in json.load(open(names.atlas_record(folder)))["rows"]] == [run]
    assert sorted(os.listdir(tmp_path)) == ["atlas"] and res["runs"] == 1
    assert res["bytes"] == sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


@pytest.mark.slow
def test_unknown_run_is_one_line(stages, tmp_path):
    with pytest.raises(UserError) as e:
        write.write_atlas(stages["out"], stages["store"], ["nope"], str(tmp_path / "a"))
    assert "nope" in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "a")


def test_rows_of_hand_built_summaries():
    """Purity, labels, k and cosine from summaries written by hand (no stage run)."""
    paths = [f"/v/{c}/{i}.png" for c, i in (("a", 0), ("b", 1), ("a", 2), ("a", 3))]
    assert collect.top_purity(paths) == 0.75 and collect.top_purity([]) is None
    s = {"channel": 5, "classes1": [2], "classes2": [1], "class_names1": ["cat"], "class_names2": ["car"],
         "sep_concept1": 3.0, "sep_concept2": 0.5, "top_images": {"Original": paths, "Disentangled 1": paths[:2],
                                                                  "Disentangled 2": paths[2:]}}
    assert collect.concept_count(s) == 2 and collect.concept_labels(s, 2) == ["cat", "car"]
    assert collect.purities(s, 2) == (0.75, [0.5, 1.0])
    assert collect.cosine_of(s, {(5, 1, 2): 0.25}) == 0.25  # the pair in either order
    three = dict(s, classes3=[4], sep_concept3=1.0)
    assert collect.concept_count(three) == 3 and collect.cosine_of(three, {(5, 1, 2): 0.25}) is None
    clusters = {"channel": 5, "clusters": [0, 2], "sep_concept1": 1.0, "sep_concept2": 2.0}
    assert collect.concept_labels(clusters, 2) == ["cluster 0", "cluster 2"]


def test_pages_escape_names():
    from utils.atlas import html
    row = {"run": "r", "slug": "channel1", "channel": 1, "k": 2, "concepts": ["<b>x</b>", "a&b"], "cosine": None,
           "rho": 0.5, "sep": [1.0, 2.0], "quantitative": [None, None], "purity_original": None,
           "purity_parts": [None, None], "max_logit_diff": 0.0, "val_images": [1, 1], "layer": "l",
           "label_free": None, "href": {"page": "channels/channel1/index.html"}}
    for text in (html.index_page([row], "t", ""), html.channel_page(row, "../../index.html")):
        assert "<b>x</b>" not in text and "&lt;b&gt;x&lt;/b&gt;" in text and "a&amp;b" in text


@pytest.mark.parametrize("summary,candidates,says", [("{}", None, "not a stage-4 summary"),
                                                     ("[1", None, "cannot read a stage-4 summary"),
                                                     (None, '{"x": 1}', "not a candidates file")])
def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, summary, candidates, says):
    out = tmp_path / "out"
    (out / names.RESULTS_DIR).mkdir(parents=True)
    good = {"channel": 1, "classes1": [0], "classes2": [1], "sep_concept1": 1.0, "sep_concept2": 2.0}
    with open(names.summary(str(out), "r_channel1_x"), "w") as f:
        f.write(summary if summary is not None else json.dumps(good))
    cand = None
    if candidates:
        cand = str(tmp_path / "c.json")
        open(cand, "w").write(candidates)
    with pytest.raises(UserError) as e:
        write.write_atlas(str(out), str(tmp_path / "store"), None, str(tmp_path / "atlas"), cand)
    assert says in str(e.value) and "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == sorted(["out"] + (["c.json"] if cand else []))
