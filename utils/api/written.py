"""The files a call wrote: the folders a stage writes into (named by utils/files/names.py) listed before and
after the call; a file is written when it is new or another file (inode, modification time or size) than
before. Hidden names (locks, temporary files) are left out."""
import json
import os
from types import MappingProxyType

from utils.api.result import record_kind
from utils.files import names


def _subfolders(folder, keep):
    try:
        return [os.path.join(folder, e) for e in sorted(os.listdir(folder)) if keep(e)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def written_folders(stage, flags):
    """The folders a stage writes into, named by utils/files/names.py (listed anew before and after a call).
    flags: {flag: value} of the stage's parsed flags (``vars`` of the namespace)."""
    store_dir, out_dir = flags.get("store_dir"), flags.get("out_dir")
    if stage == "importances":
        return _subfolders(store_dir, names.is_store_folder_name) if store_dir else []
    if stage == "cosine_similarities":
        return [names.stage2_dir(store_dir), names.stage2_dir(out_dir)] if store_dir else []
    if stage == "disentangle":
        return [names.checkpoints_dir(store_dir)] if store_dir else []
    if stage == "atlas":
        return [flags["atlas"]]
    out = [os.path.dirname(names.plot(out_dir, "x")), os.path.dirname(names.result(out_dir, "x")),
           names.quantitative_dir(out_dir)]
    model_dir = flags.get("model_dir")
    if model_dir:  # the caches of the feature visualizations and the SAE view
        stores = [model_dir]
        if os.path.basename(os.path.normpath(model_dir)) == names.CHECKPOINTS_DIR:
            stores.append(os.path.dirname(os.path.normpath(model_dir)))
        for s in stores:
            out += [os.path.dirname(names.spectrum_cache(s, 0, "x")), os.path.dirname(names.sae_cache(s, "x"))]
    return out + ([flags["atlas"]] if flags.get("atlas") else [])


def snapshot(folders):
    """{absolute path: (inode, mtime_ns, size)} of every file below ``folders`` (hidden names left out)."""
    out = {}
    for top in folders:
        for d, dirs, files in os.walk(top):
            dirs[:] = [x for x in dirs if not x.startswith(".")]
            for f in files:
                if not f.startswith("."):
                    p = os.path.abspath(os.path.join(d, f))
                    try:
                        st = os.stat(p)
                    except FileNotFoundError:
                        continue
                    out[p] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def written(before, after):
    """Paths of ``after`` that are new or changed against ``before`` (``snapshot``'s), sorted."""
    return tuple(sorted(p for p, sig in after.items() if before.get(p) != sig))


def read_records(files):
    """{path: parsed JSON} of the records among ``files`` (``record_kind``), read-only."""
    out = {}
    for p in files:
        if record_kind(p) is not None:
            with open(p) as f:
                out[p] = json.load(f)
    return MappingProxyType(out)
