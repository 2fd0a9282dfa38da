"""The atlas trusts nothing it reads, and keeps what is not its own.

Result files written by hand (no stage runs: a few seconds) hold markup in every field ``collect`` reads, in
the run names (summary file names), in a concepts file's and a candidates file's name; the pages hold none
of it as markup (parsed: the only script is the atlas's own, no event attribute, every link a relative path
inside the atlas) and, opened in headless Chromium, run none of it. A rewrite keeps the files a user put into
an atlas (at the top and inside a channel's folder), refuses one it would overwrite, and the list of its own
files is exactly what it wrote."""
import json
import os
import shutil
from html.parser import HTMLParser
from urllib.parse import unquote, urlparse

import pytest
from PIL import Image

from tests.conftest import tree_bytes
from utils.atlas import html, safe, write
from utils.files import names
from utils.errors import UserError

SCRIPT = "<script>window.pwned='script';document.title='pwned'</script>"
IMG = "\"><img src=x onerror=\"window.pwned='img'\">"
SVG = "<svg onload=\"window.pwned='svg'\"></svg>"
JS = "javascript:window.pwned='js'"
QUOTE = "' onmouseover='window.pwned=1"
PAYLOADS = (SCRIPT, IMG, SVG, JS, QUOTE)
NAME = "\"><img src=x onerror=window.pwned=1>"  # a file name may hold no "/"
RUNS = (f"{NAME}_channel3_a", f"{NAME}_channel3_b", "javascript:window.pwned=1_channel4_c")


def _png(path, size=(6, 4)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)


def _json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _summary(run, channel, **fields):
    checkpoint = f"{run}_f_best_unnormalized.pth"
    base = {"channel": channel, "layer": SCRIPT, "rho": IMG, "max_logit_diff": SVG, "checkpoint": checkpoint,
            "sep_concept1": SCRIPT, "sep_concept2": QUOTE, "val_images_concept1": IMG, "val_images_concept2": SCRIPT,
            "quantitative_concept1": {"images": SCRIPT, "D1/orig": IMG, SVG: JS},
            "quantitative_concept2": {"images": QUOTE, "D2/orig": SVG},
            "top_images": {"Original": [f"/v/{IMG}/0.png", f"/v/{SVG}/1.png"], "Disentangled 1": [f"/v/{JS}/2.png"],
                           "Disentangled 2": [f"/v/{QUOTE}/3.png"]}}
    return dict(base, **fields), checkpoint


def hostile_results(root):
    """(out, store, candidates) of three runs whose files hold markup wherever the atlas reads a value."""
    out, store = os.path.join(root, "out"), os.path.join(root, "store")
    summaries = [_summary(RUNS[0], 3, classes1=[SCRIPT], classes2=[IMG], class_names1=[SVG], class_names2=[JS]),
                 _summary(RUNS[1], 3, classes1=[1], classes2=[2], class_names1=[QUOTE, SCRIPT], class_names2=[IMG]),
                 _summary(RUNS[2], 4, clusters=[SCRIPT, IMG])]
    for run, (summary, checkpoint) in zip(RUNS, summaries):
        _json(names.summary(out, run), summary)
        for j in (1, 2):
            _png(names.density_plots(out, j, "", run)[1])
        fv = names.feature_vis_files(out, run, "")
        for path in (names.top_images_plots(out, "", run)[1], fv["figure"], fv["raw"],
                     names.sae_view_files(out, run)["figure"]):
            _png(path)
        _json(fv["record"], {"note": SCRIPT})
        _json(names.sae_view_files(out, run)["record"], {"note": IMG})
        ckpt = os.path.join(names.checkpoints_dir(store), checkpoint)
        _json(names.info_file(ckpt), {"exact": SCRIPT, "rho": IMG})
        _png(names.scores_plot(ckpt))
    clusters = {"k": SCRIPT, "silhouette": IMG, "purity": SVG,
                "clusters": [{"size": IMG, "purity": SCRIPT, "classes": {SCRIPT: 3, IMG: SVG, JS: 1}},
                             {"size": 4, "purity": 0.5, "classes": {QUOTE: 2}}]}
    _json(names.concepts_file(store, "javascript:window.pwned=1", f"5{NAME}"), {"channels": {"4": clusters}})
    _json(names.concepts_file(store, NAME, 7), {"channels": {"3": dict(clusters, k=QUOTE)}})
    candidates = os.path.join(names.stage2_dir(store), f"{NAME}_candidates.json")
    _json(candidates, {"candidates": [{"channel": 3, "class1": 2, "class2": 1, "cosine_similarity": SCRIPT}]})
    return out, store, candidates


@pytest.fixture(scope="module")
def hostile_atlas(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hostile"))
    out, store, candidates = hostile_results(root)
    folder = os.path.join(root, "atlas")
    write.write_atlas(out, store, None, folder, candidates)
    return folder


def _pages(folder):
    return [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".html")]


class Tags(HTMLParser):
    """Every start tag with its attributes, and the text inside each <script>."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.scripts, self._in_script = [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


ALLOWED = {"html", "head", "meta", "title", "link", "style", "body", "h1", "h2", "p", "table", "thead", "tbody",
           "tr", "th", "td", "a", "img", "br", "span", "section", "div", "figure", "dl", "dt", "dd", "sub", "code",
           "script"}


def test_no_markup_from_the_files_reaches_the_pages(hostile_atlas):
    pages = _pages(hostile_atlas)
    assert len(pages) == 1 + len(RUNS)
    for page in pages:
        text = open(page, encoding="utf-8").read()
        for p in PAYLOADS + (NAME,):
            assert p not in text, (page, p)
        parsed = Tags()
        parsed.feed(text)
        assert {t for t, _ in parsed.tags} <= ALLOWED
        assert parsed.scripts == [html.SORT_JS]  # the atlas's own sorting script, nothing else
        for tag, attrs in parsed.tags:
            assert not [a for a, _ in attrs if a.startswith("on")], (tag, attrs)
            for a, v in attrs:
                if a in ("href", "src") and v != "data:,":
                    assert urlparse(v).scheme == "" and not v.startswith("/"), v
                    target = os.path.normpath(os.path.join(os.path.dirname(page), unquote(v)))
                    assert target.startswith(hostile_atlas + os.sep) and os.path.exists(target), v
    # the values are there, as text: the markup of a summary and of the concepts file, escaped
    channel_page = open(names.atlas_run(hostile_atlas, "channel4"), encoding="utf-8").read()
    assert channel_page.count(safe.shown(SCRIPT)) >= 3 and safe.shown(IMG) in channel_page
    index = open(names.atlas_index(hostile_atlas), encoding="utf-8").read()
    assert safe.shown(SCRIPT) in index  # the cosine of the candidates file, the separations


def _pwned(browser):
    return browser.execute_script("return [window.pwned === undefined ? null : window.pwned, document.title];")


def test_no_script_runs_in_a_browser(hostile_atlas, tmp_path):
    from tests.test_atlas import _driver
    browser = _driver()
    try:
        control = tmp_path / "control.html"  # the payloads do run where markup is not escaped
        control.write_text(f"<!DOCTYPE html><html><head><title>t</title></head><body>{IMG}{SCRIPT}</body></html>")
        browser.get("file://" + str(control))
        pwned, title = _pwned(browser)
        assert pwned in ("img", "script") and title == "pwned", (pwned, title)
        for page in _pages(hostile_atlas):
            browser.get("file://" + page)
            if page == names.atlas_index(hostile_atlas):
                for th in browser.find_elements("css selector", "th"):  # sorting by each column shows each cell
                    th.click()
            pwned, title = _pwned(browser)
            assert pwned is None and "pwned" != title, (page, pwned, title)
            for a in browser.find_elements("css selector", "a[href]"):
                assert urlparse(a.get_attribute("href")).scheme == "file"
    finally:
        browser.quit()


@pytest.mark.parametrize("value,digits,html_text", [
    (0.123456, 3, "0.123"), (12, None, "12"), (12345, 3, "1.23e+04"), (float("nan"), 3, "—"),
    (float("inf"), 3, "—"), (10 ** 400, 3, "—"), (None, 3, ""), (True, 3, "True"), ("a<b", 3, "a&lt;b"),
    (["<i>"], 3, "[&#x27;&lt;i&gt;&#x27;]"), ({"k": '"'}, None, "{&#x27;k&#x27;: &#x27;&quot;&#x27;}")])
def test_shown(value, digits, html_text):
    assert safe.shown(value, digits) == html_text


@pytest.mark.parametrize("href,depth,ok", [
    ("channels/channel1/index.html", 0, True), ("../../index.html", 2, True), ("../../files/a b.json", 2, True),
    ("../../../x", 2, False), ("../x", 0, False), ("/etc/passwd", 0, False), ("javascript:alert(1)", 0, False),
    ("JavaScript:x", 2, False), ("data:text/html,x", 0, False), ("a\\..\\..\\x", 0, False), ("", 0, False)])
def test_links_stay_inside_the_atlas(href, depth, ok):
    assert (safe.url(href, depth) is not None) == ok
    if ok:
        assert safe.url(href, depth) == safe.shown(__import__("urllib.parse").parse.quote(href))


@pytest.mark.parametrize("field,value,says", [("classes1", "<b>", "classes1 is str"),
                                              ("quantitative_concept1", [1], "quantitative_concept1 is list"),
                                              ("top_images", {"Original": [1]}, "a list of paths"),
                                              ("checkpoint", 5, "checkpoint is int")])
def test_a_field_of_another_type_is_one_line(tmp_path, field, value, says):
    out, store, _ = hostile_results(str(tmp_path))
    path = names.summary(out, RUNS[0])
    summary = json.load(open(path))
    summary[field] = value
    _json(path, summary)
    with pytest.raises(UserError) as e:
        write.write_atlas(out, store, None, str(tmp_path / "atlas"))
    assert says in str(e.value) and path in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "atlas")


# ---------------------------------------------------------------- own files only
def _user_files(folder):
    mine = {"my_top.txt": b"top notes", "channels/channel3_1/my_notes.txt": b"notes on channel 3",
            "mine/sub/x.txt": b"a folder of my own"}
    for rel, data in mine.items():
        os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
        with open(os.path.join(folder, rel), "wb") as f:
            f.write(data)
    return mine


@pytest.mark.parametrize("legacy", [False, True])
def test_rewrite_keeps_the_users_files(tmp_path, legacy):
    """A user's files at the top, in a channel's folder and in a folder of their own survive a rewrite (also
    of an atlas written before it listed its own files: then ``atlas.json`` says which are its own); the
    atlas's own files are those of the new atlas only."""
    out, store, candidates = hostile_results(str(tmp_path))
    folder = str(tmp_path / "atlas")
    write.write_atlas(out, store, None, folder, candidates)
    first_own = set(json.load(open(names.atlas_own_files(folder)))["files"])
    assert first_own == set(write.files_under(folder)) - {names.ATLAS_OWN_FILES}
    if legacy:
        os.remove(names.atlas_own_files(folder))
    mine = _user_files(folder)
    write.write_atlas(out, store, [RUNS[2]], folder)  # one run: channel3_1's page goes, the user's note stays
    for rel, data in mine.items():
        assert open(os.path.join(folder, rel), "rb").read() == data
    own = set(json.load(open(names.atlas_own_files(folder)))["files"])
    assert set(write.files_under(folder)) == own | set(mine) | {names.ATLAS_OWN_FILES}
    assert not any(f.startswith("channels/channel3_1/") for f in own) and "channels/channel4/index.html" in own
    assert sorted(os.listdir(tmp_path)) == ["atlas", "out", "store"]  # no temporary folder left


def test_rewrite_refuses_to_overwrite_a_users_file(tmp_path):
    out, store, _ = hostile_results(str(tmp_path))
    folder = str(tmp_path / "atlas")
    write.write_atlas(out, store, [RUNS[2]], folder)
    os.remove(names.atlas_run(folder, "channel4", "thumb.png"))  # now the user's, as far as the atlas knows...
    own = json.load(open(names.atlas_own_files(folder)))
    own["files"].remove("channels/channel4/thumb.png")
    _json(names.atlas_own_files(folder), own)
    _png(names.atlas_run(folder, "channel4", "thumb.png"), (3, 3))  # ...then a picture of the user's own
    before = tree_bytes(folder)
    with pytest.raises(UserError) as e:
        write.write_atlas(out, store, [RUNS[2]], folder)
    assert "channels/channel4/thumb.png" in str(e.value) and "\n" not in str(e.value)
    assert tree_bytes(folder) == before and sorted(os.listdir(tmp_path)) == ["atlas", "out", "store"]


def test_folder_without_an_atlas_is_still_refused(tmp_path):
    folder = tmp_path / "mine"
    (folder / "channels").mkdir(parents=True)
    (folder / "channels" / "notes.txt").write_text("my notes")
    out, store, _ = hostile_results(str(tmp_path))
    with pytest.raises(UserError) as e:
        write.write_atlas(out, store, None, str(folder))
    assert "'channels'" in str(e.value)
    assert tree_bytes(str(folder)) == {"channels/notes.txt": b"my notes"}
