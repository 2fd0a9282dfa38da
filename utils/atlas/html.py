"""The atlas's pages as strings: pure string building from the rows of ``collect`` and relative links.

Every page is self-contained: inline CSS, a few lines of inline JavaScript (sorting the index by a clicked
column), images and files by relative links only, so that it opens from ``file://`` with no server and no
network. A row's ``href`` is {key: relative link or None} (the copies beside the page); a cell's
``data-sort`` holds the value the column sorts by (a number, text, or empty: sorted last).

Nothing read from a file reaches a page as markup: every value passes ``safe.shown`` (a finite number, or
escaped text) and every link ``safe.url`` (a relative path inside the atlas, quoted and escaped; see
``utils.atlas.safe``).
"""
from utils.atlas.safe import shown, sort_key, url

INDEX_DEPTH, PAGE_DEPTH = 0, 2  # folders below the atlas's top: index.html, channels/{slug}/index.html

CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222}
table{border-collapse:collapse;font-size:0.9em}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;vertical-align:middle}
td.text,th.text{text-align:left}
th{background:#eee;cursor:pointer;user-select:none;position:sticky;top:0}
th.asc::after{content:" \\25B2"} th.desc::after{content:" \\25BC"}
tr:nth-child(even) td{background:#fafafa}
img.thumb{height:48px;image-rendering:pixelated}
section{margin:1.2em 0} section img{max-width:100%;border:1px solid #ddd}
.row{display:flex;flex-wrap:wrap;gap:1em} .row figure{margin:0;max-width:48%} .row img{max-width:100%}
dt{font-weight:bold;margin-top:0.4em} dd{margin-left:1.5em}
.muted{color:#777}
"""

SORT_JS = """
function sortRows(th){
  var table=th.closest('table'), body=table.tBodies[0], i=th.cellIndex;
  var asc=!th.classList.contains('asc');
  table.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc');});
  th.classList.add(asc?'asc':'desc');
  var rows=Array.prototype.slice.call(body.rows);
  rows.sort(function(a,b){
    var x=a.cells[i].getAttribute('data-sort'), y=b.cells[i].getAttribute('data-sort');
    if(x===''||y===''){return (x==='')-(y==='');}
    var nx=Number(x), ny=Number(y), r=(isNaN(nx)||isNaN(ny))?x.localeCompare(y):nx-ny;
    return asc?r:-r;
  });
  rows.forEach(function(r){body.appendChild(r);});
}
document.querySelectorAll('th').forEach(function(th){th.addEventListener('click',function(){sortRows(th);});});
"""


def number(v, digits=3):
    """A number as the atlas writes it (``digits`` significant digits), '' for None (``safe.shown``)."""
    return shown(v, digits)


def urls(href, depth):
    """{key: attribute value} of a row's links for a page ``depth`` folders deep (``safe.url``; a link that
    would leave the atlas is dropped)."""
    return {key: u for key, u in ((key, url(h, depth)) for key, h in href.items() if h) if u}


def link(href, text):
    """``href``: an attribute value made by ``urls`` (or None: the text alone)."""
    return f'<a href="{href}">{shown(text)}</a>' if href else shown(text)


def image(href, alt, cls=None):
    return f'<img src="{href}" alt="{shown(alt)}"' + (f' class="{cls}"' if cls else "") + ">"


def cell(sort, body=None, text=False):
    """A table cell sorting by ``sort`` (a number, text, or None), showing ``body`` (HTML) or the number."""
    key = "" if sort is None else (sort_key(sort) if isinstance(sort, (int, float)) else sort)
    body = number(sort) if body is None else body
    return f'<td{" class=" + chr(34) + "text" + chr(34) if text else ""} data-sort="{shown(key)}">{body}</td>'


def page(title, body):
    """A whole HTML document with the atlas's CSS and sorting script inline."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{shown(title)}</title><link rel=\"icon\" href=\"data:,\"><style>{CSS}</style></head>\n"
            f"<body>\n{body}\n<script>{SORT_JS}</script>\n</body></html>\n")


def mean(values):
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def index_columns(kmax):
    """(header, text column?) of the index, for at most ``kmax`` concepts per run."""
    return ([("channel", False), ("concepts", True), ("k", False), ("cosine", False), ("rho", False)]
            + [(f"sep concept {j}", False) for j in range(1, kmax + 1)]
            + [(f"D{j}/orig on concept {j}", False) for j in range(1, kmax + 1)]
            + [("top purity original", False), ("top purity D (mean)", False), ("max logit diff", False),
               ("feature visualizations", True)])


def index_row(row, kmax):
    """One ``<tr>`` of the index."""
    href = urls(row["href"], INDEX_DEPTH)
    pad = [None] * (kmax - row["k"])
    cells = [cell(row["channel"], link(href.get("page"), str(row["channel"]))),
             cell(" | ".join(row["concepts"]), shown(" | ".join(row["concepts"])), text=True),
             cell(row["k"], str(row["k"])), cell(row["cosine"]), cell(row["rho"])]
    cells += [cell(v) for v in row["sep"] + pad] + [cell(v) for v in row["quantitative"] + pad]
    cells += [cell(row["purity_original"]), cell(mean(row["purity_parts"])), cell(row["max_logit_diff"])]
    thumb = image(href["thumb"], f"feature visualizations of channel {row['channel']}", "thumb") if href.get("thumb") \
        else '<span class="muted">none</span>'
    cells.append(cell(row["run"], thumb, text=True))
    return f'<tr id="{shown(row["slug"])}">' + "".join(cells) + "</tr>"


LEGEND = """<dl>
<dt>cosine</dt><dd>stage 2's cosine between the two classes' relevance vectors of the channel (lowest: most
polysemantic); blank without a candidates file, or for a split that is not one class against one class.</dd>
<dt>sep concept j</dt><dd>mean pos(D<sub>j</sub>) over concept j's val images, divided by the largest mean
pos(D<sub>l</sub>) of another concept on them (pos: the summed positive activation of a map).</dd>
<dt>D<sub>j</sub>/orig on concept j</dt><dd>stage 4's quantitative column mean on concept j's val images.</dd>
<dt>top purity</dt><dd>share of the contact sheet's top images of the original channel (or of each D<sub>j</sub>,
averaged) that belong to their most common class.</dd>
<dt>max logit diff</dt><dd>the largest difference between the original and the disentangled network's
logits found by stage 3's check.</dd>
<dt>feature visualizations</dt><dd>the original channel and its parts D<sub>1</sub> .. D<sub>k</sub>
(none where stage 4 did not compute them).</dd></dl>"""


def index_page(rows, title, intro):
    """``index.html``: one sortable row per run. ``intro``: HTML above the table."""
    kmax = max([r["k"] for r in rows] or [2])
    head = "".join(f'<th{" class=" + chr(34) + "text" + chr(34) if text else ""}>{shown(h)}</th>'
                   for h, text in index_columns(kmax))
    body = (f"<h1>{shown(title)}</h1>\n{intro}\n<p class=\"muted\">Click a column header to sort by it "
            f"(again: reverse); empty cells sort last.</p>\n<table><thead><tr>{head}</tr></thead><tbody>\n"
            + "\n".join(index_row(r, kmax) for r in rows) + "\n</tbody></table>\n" + LEGEND)
    return page(title, body)


def numbers_table(row, href):
    """The run's numbers, each with a link to the file it comes from (``href``: the page's ``urls``)."""
    lines = [("cosine (stage 2)", number(row["cosine"]), href.get("candidates"), "candidates"),
             ("best rho", number(row["rho"]), href.get("info"), "info.json"),
             ("max logit difference", number(row["max_logit_diff"]), href.get("info"), "info.json"),
             ("top purity of the original", number(row["purity_original"]), href.get("summary"), "summary.json")]
    for j, label in enumerate(row["concepts"], start=1):
        lines += [(f"concept {j} ({label}): val images", number(row["val_images"][j - 1], None), href.get("summary"),
                   "summary.json"),
                  (f"sep concept {j}", number(row["sep"][j - 1]), href.get("summary"), "summary.json"),
                  (f"D{j}/orig on concept {j} (mean)", number(row["quantitative"][j - 1]), href.get("summary"),
                   "summary.json"),
                  (f"top purity of D{j}", number(row["purity_parts"][j - 1]), href.get("summary"), "summary.json")]
        q = (row.get("quantitative_all") or [None] * row["k"])[j - 1]
        if q:
            lines.append((f"quantitative on concept {j} ({q.get('images')} images)",
                          ", ".join(f"{shown(key)} {number(v)}" for key, v in q.items() if key != "images"),
                          href.get("summary"), "summary.json"))
    body = "".join(f'<tr><td class="text">{shown(a)}</td><td>{b}</td><td class="text">{link(h, t) if h else ""}'
                   f"</td></tr>" for a, b, h, t in lines)
    return f'<table><thead><tr><th class="text">number</th><th>value</th><th class="text">from</th></tr></thead>' \
           f"<tbody>{body}</tbody></table>"


def figure(href, title, alt, extra=""):
    """A section with one picture, or nothing when there is none."""
    if not href:
        return ""
    return f"<section><h2>{shown(title)}</h2>{extra}{link(href, 'full size')}<br>{image(href, alt)}</section>"


def densities(row, href):
    """The density plots of every concept side by side, or nothing."""
    figs = [f"<figure>{link(href[f'density{j}'], f'concept {j}: {label}')}<br>"
            f"{image(href[f'density{j}'], f'density plot of concept {j}')}</figure>"
            for j, label in enumerate(row["concepts"], start=1) if href.get(f"density{j}")]
    return f"<section><h2>Density plots</h2><div class=\"row\">{''.join(figs)}</div></section>" if figs else ""


def clusters_section(row, href):
    """The label-free clusters of the channel (stage 2 --label_free), or nothing."""
    lf = row.get("label_free")
    if not lf:
        return ""
    trs = "".join(f"<tr><td>{i}</td><td>{number(cl['size'], None)}</td><td>{number(cl['purity'])}</td>"
                  f"<td class=\"text\">" + shown(", ".join(f"{name} x{n}" for name, n in cl["classes"])) + "</td></tr>"
                  for i, cl in enumerate(lf["clusters"]))
    return (f"<section><h2>Label-free clusters</h2><p>k = {number(lf['k'], None)}, silhouette "
            f"{number(lf['silhouette'])}, purity {number(lf['purity'])} ({link(href.get('concepts'), 'concepts file')})</p>"
            f'<table><thead><tr><th>cluster</th><th>size</th><th>purity</th><th class="text">largest classes</th>'
            f"</tr></thead><tbody>{trs}</tbody></table></section>")


def channel_page(row, back):
    """One run's page: numbers with their files, density plots, contact sheet, feature visualizations,
    best-rho curve, label-free clusters and SAE view where present. ``back``: link to the index."""
    href, c = urls(row["href"], PAGE_DEPTH), row["channel"]
    title = f"channel {c}: " + " | ".join(row["concepts"])
    files = ", ".join(link(href[k], row["href"][k].rsplit("/", 1)[-1])
                      for k in ("summary", "info", "feature_vis_json", "sae_view_json") if href.get(k))
    parts = [f"<p>{link(url(back, PAGE_DEPTH), 'all channels')}</p><h1>{shown(title)}</h1>",
             f"<p class=\"muted\">run {shown(row['run'])}; layer {shown(str(row['layer']))}; files: {files}</p>",
             numbers_table(row, href)]
    parts.append(densities(row, href))
    parts += [figure(href.get("top_images"), "Top images", "contact sheet"),
              figure(href.get("feature_vis"), "Feature visualizations", "feature visualizations"),
              figure(href.get("scores"), "Best-rho curve", "score of every rho"),
              clusters_section(row, href),
              figure(href.get("sae_view"), "SAE view", "sparse-autoencoder view")]
    return page(title, "\n".join(p for p in parts if p))
