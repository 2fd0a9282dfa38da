"""``python -m utils.atlas --results OUT --store STORE --atlas DIR``: the atlas of stage 4's runs under OUT."""
from tqdm import tqdm

from utils.run import cli


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--results", required=True, help="stage 4's --out_dir (results_disentanglement/, plots/)")
    p.add_argument("--store", required=True, help="the store folder (stage 3's models_disentangled/, stage 2's "
                                                  "concepts files)")
    p.add_argument("--atlas", required=True, help="folder to write the site into (new, empty, or a previous atlas)")
    p.add_argument("--runs", nargs="+", default=None,
                   help="run names (a summary's name without _summary.json; default: every run found)")
    p.add_argument("--candidates", default=None,
                   help="stage 2's …_candidates.json, for the cosine column (default: the column is blank)")
    return p


def main(args):
    """Write the atlas of the parsed flags ``args`` (``build_parser``'s)."""
    return write(**vars(args))


def write(results, store, atlas, runs=None, candidates=None):
    """The atlas of stage 4's runs under ``results`` (their names ``runs``, default all) into ``atlas``, with the
    store folder ``store`` and stage 2's ``candidates`` file for the cosine column (None: blank)."""
    from utils.atlas.write import size_text, write_atlas
    res = write_atlas(results, store, runs, atlas, candidates,
                      lambda names: tqdm(names, desc="atlas pages", unit="run"))
    print(f"wrote the atlas of {res['runs']} run(s) into {res['folder']} ({size_text(res)}); "
          f"open {res['folder']}/index.html in a browser")


if __name__ == "__main__":
    cli.run(lambda: main(build_parser().parse_args()))
