"""Write the atlas: ``index.html``, one page per run in ``channels/{slug}/`` with its pictures and files beside
it (hard links where the file system allows, else copies), shared files (stage 2's candidates, the label-free
concepts files) in ``files/``, and ``atlas.json`` (the rows and where they were read from).

The site is written into a new temporary folder beside ``atlas_dir`` and renamed into place at the end, so
a failed or interrupted run leaves the previous atlas (or nothing) as it was (the next run removes a killed
run's temporary folder: ``utils.files.leftovers``). A folder that is not empty and not a previous atlas is
refused before anything is written.

Own files only: ``.atlas_files.json`` lists every file the atlas wrote (relative paths). A rewrite over a
previous atlas replaces those files and keeps every other one, anywhere in the folder (a user's notes at the
top or in a channel's folder): before the new folder is renamed into place, each is hard-linked (else copied)
into it at the same path. One that the new atlas writes itself is refused, naming it, before anything
changes. For an atlas written before that list existed, its own files are those ``atlas.json`` names.
"""
import os
import shutil
import tempfile

from utils.atlas import collect, html
from utils.files import atomic, leftovers, names
from utils.errors import UserError

THUMB_HEIGHT = 48  # pixels of the index's feature-visualization thumbnails
COPIED = ("top_images", "feature_vis", "scores", "sae_view", "summary", "info", "feature_vis_json", "sae_view_json")


def check_atlas_dir(folder):
    """Refuse (UserError, one line) a path that is a file, or a folder that is not empty and not a previous
    atlas (one with ``atlas.json``; the files in it that the atlas did not write are kept by a rewrite)."""
    if not os.path.lexists(folder):
        return
    if not os.path.isdir(folder) or os.path.islink(folder):
        raise UserError(f"--atlas {folder}: exists and is not a folder; pass a new or empty folder")
    entries = sorted(os.listdir(folder))
    foreign = [e for e in entries if e not in names.ATLAS_ENTRIES]
    if entries and names.ATLAS_RECORD not in entries:
        what = foreign[0] if foreign else entries[0]
        raise UserError(f"--atlas {folder}: holds {what!r}, which no atlas wrote; pass a new or empty folder "
                        f"(an atlas is rewritten only over an atlas)")


def slugs(rows):
    """A folder name per row: ``channel{c}``, or ``channel{c}_{n}`` when a channel has several runs."""
    count = {}
    for r in rows:
        count[r["channel"]] = count.get(r["channel"], 0) + 1
    seen = {}
    out = []
    for r in rows:
        n = seen[r["channel"]] = seen.get(r["channel"], 0) + 1
        out.append(f"channel{r['channel']}" + ("" if count[r["channel"]] == 1 else f"_{n}"))
    return out


def copy_name(key, source):
    """The copy's file name beside the page: the key (less a ``_json`` suffix) and the source's extension."""
    return key.removesuffix("_json") + os.path.splitext(source)[1]


def thumbnail(source, target, height=THUMB_HEIGHT):
    """A PNG of ``source`` scaled to ``height`` pixels (never enlarged)."""
    from PIL import Image
    with Image.open(source) as im:
        im = im.convert("RGB")
        w = max(1, round(im.width * min(1.0, height / im.height)))
        im.resize((w, min(height, im.height)), Image.LANCZOS).save(target)


def place(source, target):
    """Put ``source`` at ``target``: a hard link where the file system allows one (no space taken; the stages
    replace their files by renaming, never rewrite one, so the atlas keeps what it showed), else a copy."""
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copyfile(source, target)


def copy_run_files(folder, slug, row):
    """Place the row's files beside its page (``place``); returns {key: file name} of what is there."""
    os.makedirs(names.atlas_run(folder, slug, ""), exist_ok=True)
    keys = [f"density{j}" for j in range(1, row["k"] + 1)] + list(COPIED)
    copies = {}
    for key in keys:
        src = row["files"].get(key)
        if src:
            copies[key] = copy_name(key, src)
            place(src, names.atlas_run(folder, slug, copies[key]))
    if row["files"].get("feature_vis_raw"):
        copies["thumb"] = "thumb.png"
        thumbnail(row["files"]["feature_vis_raw"], names.atlas_run(folder, slug, "thumb.png"))
    return copies


def copy_shared(folder, path, done):
    """Place a file every page may link to into ``files/`` once (``place``); returns its file name there."""
    if path not in done:
        base = os.path.basename(path)
        done[path] = base if base not in done.values() else f"{len(done)}_{base}"
        os.makedirs(names.atlas_shared(folder, ""), exist_ok=True)
        place(path, names.atlas_shared(folder, done[path]))
    return done[path]


def hrefs(folder, slug, copies, shared, start):
    """{key: link relative to the folder ``start``} of a run's copies, its page and the shared files."""
    rel = {key: os.path.relpath(names.atlas_run(folder, slug, f), start) for key, f in copies.items()}
    rel["page"] = os.path.relpath(names.atlas_run(folder, slug), start)
    rel.update({key: os.path.relpath(names.atlas_shared(folder, f), start) for key, f in shared.items()})
    return rel


def write_pages(folder, rows, candidates_json, progress=None):
    """Copy every run's files and write its page, then the index; rows get ``slug`` and ``href`` (index-relative)."""
    done = {}
    pairs = list(zip(rows, slugs(rows)))
    for row, slug in (progress(pairs) if progress else pairs):
        row["slug"] = slug
        copies = copy_run_files(folder, slug, row)
        shared = {"candidates": copy_shared(folder, candidates_json, done)} if candidates_json else {}
        if row["label_free"]:
            shared["concepts"] = copy_shared(folder, row["label_free"]["file"], done)
        here = os.path.dirname(names.atlas_run(folder, slug))
        row["href"] = hrefs(folder, slug, copies, shared, here)
        back = os.path.relpath(names.atlas_index(folder), here)
        atomic.write_text(names.atlas_run(folder, slug), html.channel_page(row, back))
        row["href"] = hrefs(folder, slug, copies, shared, folder)


def files_under(folder):
    """The relative paths (``/``-separated) of every file and link under ``folder``, sorted."""
    out = []
    for d, dirs, files in os.walk(folder):
        rel = os.path.relpath(d, folder)
        out += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/")
                for f in files + [x for x in dirs if os.path.islink(os.path.join(d, x))]]
    return sorted(out)


def previous_own_files(folder):
    """The files a previous atlas in ``folder`` wrote: its ``.atlas_files.json``, or where it has none (written
    before the list existed) its index, its ``atlas.json`` and every page and file its rows link to."""
    own_list = names.atlas_own_files(folder)
    if os.path.isfile(own_list):
        record = collect.read_json(own_list, "the atlas's list of its own files")
        files = record.get("files") if isinstance(record, dict) else None
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise UserError(f"{own_list}: not a list of the atlas's files; move the files you keep out of "
                            f"{folder} and remove it")
        return set(files) | {names.ATLAS_OWN_FILES}
    record = collect.read_json(names.atlas_record(folder), "the previous atlas's record")
    own = {names.ATLAS_RECORD, names.ATLAS_INDEX}
    rows = record.get("rows") if isinstance(record, dict) else None
    for row in rows if isinstance(rows, list) else []:
        href = row.get("href") if isinstance(row, dict) else None
        own.update(h for h in (href.values() if isinstance(href, dict) else []) if isinstance(h, str))
    return {os.path.normpath(f).replace(os.sep, "/") for f in own}


def user_entries(folder, own):
    """What in ``folder`` the atlas did not write: files and links not in ``own``, and folders holding none of
    ``own`` (as one entry each); relative paths, sorted."""
    out = []
    for d, dirs, files in os.walk(folder):
        rel = "" if d == folder else os.path.relpath(d, folder).replace(os.sep, "/") + "/"
        out += [rel + f for f in files if rel + f not in own]
        for x in list(dirs):
            if os.path.islink(os.path.join(d, x)) or not any(f.startswith(rel + x + "/") for f in own):
                dirs.remove(x)
                if rel + x not in own:
                    out.append(rel + x)
    return sorted(out)


def link_or_copy(source, target):
    """A hard link of ``source`` (a file or a symlink itself) at ``target``, else a copy."""
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def keep_user_entries(old, new, entries):
    """Put the user's ``entries`` of the previous atlas ``old`` at the same paths in ``new`` (hard links, else
    copies; the previous atlas keeps them until it is replaced). UserError naming one that ``new`` writes."""
    clash = [e for e in entries if os.path.lexists(os.path.join(new, e))]
    if clash:
        raise UserError(f"--atlas {old}: holds {clash[0]!r}, which the atlas did not write and would write now; "
                        f"move it out of the folder (nothing was changed)")
    for e in entries:
        source, target = os.path.join(old, e), os.path.join(new, e)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.isdir(source) and not os.path.islink(source):
            shutil.copytree(source, target, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(source, target)


def folder_bytes(folder, own=False):
    """Total size of the files under ``folder``; with ``own``, only of those that no other path shares (the
    space the folder takes beyond the files it links to)."""
    stats = [os.stat(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files]
    return sum(st.st_size for st in stats if not own or st.st_nlink == 1)


def intro(rows, out_dir, store_dir):
    layers = sorted({str(r["layer"]) for r in rows})
    return (f"<p>{len(rows)} split channel(s) of layer {html.shown(', '.join(layers))}, read from "
            f"<code>{html.shown(os.path.abspath(out_dir))}</code> and <code>{html.shown(os.path.abspath(store_dir))}"
            f"</code>. Each channel's page shows its plots and links to the files behind each number.</p>")


def write_into(folder, rows, out_dir, store_dir, candidates_json, progress=None):
    """The whole site into ``folder`` (a new, empty folder)."""
    write_pages(folder, rows, candidates_json, progress)
    atomic.write_text(names.atlas_index(folder), html.index_page(rows, "Atlas of split channels",
                                                                 intro(rows, out_dir, store_dir)))
    record = {"written_by": "utils.atlas", "results": os.path.abspath(out_dir), "store": os.path.abspath(store_dir),
              "candidates": candidates_json and os.path.abspath(candidates_json), "rows": rows}
    record["bytes_without_this_file"] = folder_bytes(folder)
    atomic.write_json(names.atlas_record(folder), record)
    atomic.write_json(names.atlas_own_files(folder), {"written_by": "utils.atlas", "files": files_under(folder)})


def replace_folder(new, target):
    """Rename the finished ``new`` folder to ``target``, moving a previous one aside first and removing it after."""
    old = None
    if os.path.lexists(target):
        old = tempfile.mkdtemp(prefix=".old_atlas_", dir=os.path.dirname(target))
        os.rmdir(old)
        os.rename(target, old)
    os.rename(new, target)
    if old:
        shutil.rmtree(old)


def write_atlas(out_dir, store_dir, runs=None, atlas_dir="atlas", candidates_json=None, progress=None):
    """The atlas of ``runs`` (None: every stage-4 summary under ``out_dir``) into ``atlas_dir``.

    ``out_dir``: stage 4's ``--out_dir``; ``store_dir``: the store folder (checkpoints, info, scores plot,
    concepts files); ``candidates_json``: stage 2's ``…_candidates.json`` for the cosine column (else blank).
    ``progress``: wraps the list of runs (``tqdm``). Returns {"folder", "runs", "bytes", "own_bytes"} (own: the
    files not shared with the results by a hard link)."""
    atlas_dir = os.path.abspath(atlas_dir)
    check_atlas_dir(atlas_dir)
    rows = collect.collect(out_dir, store_dir, runs, candidates_json)
    parent = os.path.dirname(atlas_dir)
    os.makedirs(parent, exist_ok=True)
    leftovers.remove_stale(parent)  # the temporary folder of a killed atlas run
    tmp = tempfile.mkdtemp(prefix=leftovers.temp_prefix(os.path.basename(atlas_dir)), dir=parent)
    held = leftovers.hold(tmp)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        write_into(tmp, rows, out_dir, store_dir, candidates_json, progress)
        if os.path.isdir(atlas_dir) and os.listdir(atlas_dir):
            keep_user_entries(atlas_dir, tmp, user_entries(atlas_dir, previous_own_files(atlas_dir)))
        replace_folder(tmp, atlas_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        os.close(held)
    return {"folder": atlas_dir, "runs": len(rows), "bytes": folder_bytes(atlas_dir),
            "own_bytes": folder_bytes(atlas_dir, own=True)}


def size_text(done):
    """'3.31 MB' of an atlas, with the space it takes of its own where hard links share the rest."""
    total, own = done["bytes"] / 1e6, done["own_bytes"] / 1e6
    return f"{total:.2f} MB" + ("" if done["own_bytes"] == done["bytes"] else
                                f", {own:.2f} MB of its own: the rest are hard links to the results' files")
