"""The atlas at the size of a whole layer: one demo run copied to N channels, the atlas written, and (with
selenium and Debian's chromium) the index opened and sorted in headless Chromium.

The copies are the demo run's files under the names of channels 0 .. N-1 (the summary's channel and
separations changed so that the rows differ): what stages 3 and 4 would write for N splits, without
running them. Prints the seconds to write the atlas, its size, and the browser's seconds to load the index
and to sort it by a column.

  python -m demo.run_demo --out demo_out        (once: the run to copy)
  python -m benchmarks.atlas_scale [--demo demo_out] [--runs 500] [--work bench_out/atlas_scale]
"""
import argparse
import glob
import json
import os
import shutil
import time

from utils.atlas import collect
from utils.atlas.write import write_atlas
from utils.files import names


def copy_run(out, store, run, summary, new_out, new_store, channel):
    """The run's files in ``new_out``/``new_store`` under the name of ``channel``; returns the new run name."""
    c = summary["channel"]
    new_run = run.replace(f"_channel{c}_", f"_channel{channel}_", 1)
    s = dict(summary, channel=channel, checkpoint=summary["checkpoint"].replace(f"_channel{c}_", f"_channel{channel}_"))
    for key in [k for k in s if k.startswith("sep_concept")]:
        s[key] = summary[key] * (1 + channel / 7.0)
    os.makedirs(names.result(new_out, ""), exist_ok=True)
    with open(names.summary(new_out, new_run), "w") as f:
        json.dump(s, f)
    for old in glob.glob(glob.escape(names.plot(out, "")) + "*" + glob.escape(run) + "*"):
        target = names.plot(new_out, os.path.basename(old).replace(run, new_run))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(old, target)
    fv = names.feature_vis_files(out, run, "")["record"]
    if os.path.isfile(fv):
        shutil.copyfile(fv, names.feature_vis_files(new_out, new_run, "")["record"])
    ck = os.path.join(names.checkpoints_dir(store), os.path.basename(summary["checkpoint"]))
    new_ck = os.path.join(names.checkpoints_dir(new_store), os.path.basename(s["checkpoint"]))
    os.makedirs(os.path.dirname(new_ck), exist_ok=True)
    for src, dst in ((names.info_file(ck), names.info_file(new_ck)), (names.scores_plot(ck), names.scores_plot(new_ck))):
        if os.path.isfile(src):
            shutil.copyfile(src, dst)
    return new_run


def browser_seconds(index):
    """(seconds to load the index, seconds to sort it by 'sep concept 1') in headless Chromium, or None."""
    from demo.atlas_pictures import browser
    try:
        d = browser()
    except SystemExit:
        return None
    try:
        t = time.time()
        d.get("file://" + os.path.abspath(index))
        load = time.time() - t
        sort = d.execute_script("var h=Array.from(document.querySelectorAll('th')).find(x=>x.textContent=="
                                "'sep concept 1'); var t=performance.now(); h.click(); return (performance.now()-t)/1000;")
        return load, sort
    finally:
        d.quit()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="demo_out", help="a demo output folder (python -m demo.run_demo --out ...)")
    p.add_argument("--runs", type=int, default=500, help="channels to copy the run to (default 500)")
    p.add_argument("--work", default="bench_out/atlas_scale", help="folder for the copies and the atlas (replaced)")
    args = p.parse_args()
    out, store = args.demo, os.path.join(args.demo, "store")
    run = collect.runs_found(out)[0]
    summary = json.load(open(names.summary(out, run)))
    shutil.rmtree(args.work, ignore_errors=True)
    new_out, new_store = os.path.join(args.work, "out"), os.path.join(args.work, "store")
    for channel in range(args.runs):
        copy_run(out, store, run, summary, new_out, new_store, channel)
    t = time.time()
    res = write_atlas(new_out, new_store, None, os.path.join(args.work, "atlas"))
    seconds = time.time() - t
    print(f"atlas of {res['runs']} runs: {seconds:.1f} s, {res['bytes'] / 1e6:.1f} MB "
          f"({res['bytes'] / 1e3 / res['runs']:.0f} KB per run), {res['own_bytes'] / 1e6:.1f} MB of its own "
          f"(the rest hard links to the results' files)")
    b = browser_seconds(names.atlas_index(res["folder"]))
    if b:
        print(f"headless Chromium: index loaded in {b[0]:.2f} s, sorted by a column in {b[1]:.3f} s")


if __name__ == "__main__":
    main()
