"""Write docs/reference.md: every flag of the four stage scripts, read from their build_parser(), plus the
hand-written parts below (call scripts, the store, the files each stage writes).

  .venv/bin/python docs/make_reference.py          # rewrites docs/reference.md
  .venv/bin/python docs/make_reference.py --check  # exit status 1 if docs/reference.md is not up to date
(``python -m docs.make_reference`` from the repository root is the same: run as a file, it runs itself so, since
the stage scripts it reads import from the repository root.)

tests/test_docs.py fails when docs/reference.md differs from what this script writes: after changing a
flag, its help or a default, run it and commit the page.
"""
import argparse
import importlib
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "reference.md")

STAGES = [  # (script, what it is)
    ("get_importances_for_classes.py", "Stage 1: attributions and patch sums of every training image, into the store"),
    ("get_cosine_similarities.py", "Stage 2: candidate (channel, class 1, class 2) triples, or concepts without labels"),
    ("disentangle_channel.py", "Stage 3: split a channel's filter, choose rho, check exactness"),
    ("get_results.py", "Stage 4: density plots, quantitative ratios, top images, feature visualizations, SAE view"),
]

HEAD = """\
# Reference

Every flag of the four stage scripts, with its default and meaning, followed by the call scripts, the
store and the files each stage writes. The flag tables are generated from the scripts' parsers by
`docs/make_reference.py` (`.venv/bin/python docs/make_reference.py` rewrites this page; a test fails when
it is out of date), so they are what the scripts accept today. `python SCRIPT --help` prints the same.
A default of — means that the flag has no fixed value: the meaning column says what happens without it.

Contents: """

MODELS = """\
## Models, weights and layers

Every stage script takes the same model flags, so one set can be pasted into all four:

- `--model`: a torchvision classification model name (`resnet50`, `resnet18`, `vgg16`, `googlenet`,
  `convnext_tiny`, …) or `package.module:factory`, a function returning your `nn.Module` (the module is
  imported from the working directory or `PYTHONPATH`).
- `--weights`: a torchvision weights name (default `IMAGENET1K_V1` where torchvision has it, else
  `DEFAULT`), the path of a state-dict file (a torchvision architecture takes its number of classes from
  the file, so fine-tuned models load), or `none`.
- `--layer_of_interest`: `last_conv` (default: the model's default layer, the last `Conv2d` of a CNN) or a
  module path such as `layer3.5.conv2` or `features.28`: any `Conv2d` (any kernel size, stride, padding,
  dilation, with or without bias), a grouped `Conv2d` with several input channels per group, or a `Linear`
  on (N, C), (N, T, C) or (N, H, W, C); depthwise convs are refused ([models.md](models.md)).

The store's manifest records the weights' sha256, and every later stage refuses a store made with other
weights, another layer or other data.

With `--triples`, stages 3 and 4 run every triple of the file in one process: stage 3 sends all triples'
training images (each once) through one pass in batches of one class each, so an image is computed in
the same batch as in a run of its triple alone, and stage 4 makes one forward and head-only backward over
the union of the triples' val images (the gradient is each image's own label's, so it serves every
triple). The files are byte-identical to one run per triple in file order; every triple (and in stage 4
every checkpoint) is checked before any work.
"""

CALL_SCRIPTS = """\
## The call scripts

`disentanglement_calls.sh` (stage 3) and `quantitative_evaluation_calls.sh` (stage 4 with τ = 0.03) run
the triples of a file, by default the paper's 20 (`paper_triples.txt`):

```bash
bash disentanglement_calls.sh DATA STORE [extra flags]        # or DATA_DIR=... STORE_DIR=... bash ...
bash quantitative_evaluation_calls.sh DATA STORE [extra flags] # or DATA_DIR=... MODEL_DIR=... OUT_DIR=... bash ...
```

| variable | meaning |
| --- | --- |
| `DATA_DIR`, `STORE_DIR` (`MODEL_DIR`, `OUT_DIR` for stage 4) | the folders, instead of the two positional arguments |
| `TRIPLES` | the triples file (default `paper_triples.txt`) |
| `MODEL` | the model (default `resnet50`; `--model` among the extra flags does the same) |
| `PER_TRIPLE=1` | one process per triple (the published loop; stops at the first failure) instead of one `--triples` process |
| `PYTHON` | the interpreter to run |

Extra flags after the two folders go to every call. The scripts add the paper's
`--nr_channels_in_layer_of_interest 2048 --layer_of_interest layer4.2.conv3` only when the model is
`resnet50` and no `--layer_of_interest` is among the extra flags. A triples file has one
`channel classes1 classes2` per line, several classes of a concept as `61,62` (no spaces), `#` comments.
Every line is checked before any work. Your own model and triples:

```bash
TRIPLES=mine.txt bash disentanglement_calls.sh DATA STORE --model pkg.mod:factory --weights W
```
"""

STORE = """\
## The store

`STORE/{model}_channel_importances/`, one row per training image in ImageFolder order (class index =
position of the folder name in sorted order), plain `.npy` files that open with
`numpy.load(path, mmap_mode='r')`:

| file | shape, dtype | content |
| --- | --- | --- |
| `attributions.npy` | N × C_out, float16 | A_n[c] = Σ_hw a·∂z_y/∂a (activation × gradient to the label's logit) |
| `targets.npy` | N, int64 | label |
| `predictions.npy` | N, int64 | argmax of the logits (−1 for an unreadable image) |
| `patch_sums.npy` | N × C_in × kh × kw, float32 | P_n: the layer input summed over the positions each filter tap sees |
| `manifest.json` | | what made the store (below) and whether it is `complete` |

The manifest records the model, the weights and the sha256 of their state dict, the layer path and its
geometry (shape, stride, padding, dilation), the class folders, images per class, the input transform,
library versions, the chunking, `numerics` (CPU and its thread count, or CUDA with the GPU model and the
float32 precision of convolutions and matrix products, bfloat16 or not), `numerics_history` (resumes
under other numerics with `--allow_mixed_numerics`), `unreadable` (file names of images recorded as
invalid rows with `--skip_unreadable`) and `digests` (each array's size and sha256, computed when the store
is finished; see [what is checked when files are read](#what-is-checked-when-files-are-read)). Stages 2 and 3 refuse a store that is incomplete or whose
manifest names another model, weights, layer or data set; stage 4 checks a checkpoint against the
layer's filter and against the `…_info.json` beside it.

While stage 1 runs, `progress/` holds one file per finished chunk of rows (`chunk_{i}.npz`, written by
the process that computed it under a temporary name and renamed); at the end the main process merges
them into the arrays (leaving an empty `chunk_{i}` per merged chunk, so that a crash during the merge
resumes too), sets `complete` and removes `progress/`. Rerunning the same command resumes; the arrays
equal those of an uninterrupted run. `progress/rows.json` holds, per chunk, the SHA-256 of its images' paths
and labels: when the data changed before the store was complete (a bad image removed or a file added after
a stop), the rerun keeps the finished chunks whose images are the same, recomputes the others and says so in
one line (or starts afresh when no finished chunk is left), and the store equals a fresh run's on the new
data; a complete store of other data is refused with one line saying what differs. `.lock` is the writer's lock: a second stage-1 run on the same store
stops at once with `error: another run (pid … on …, since …) is writing the store …`; the lock dies with
its process (also `kill -9`), and the next run takes it over.

**Temporary files.** Every stage writes a file under a temporary name beside it,
`.tmp_{name}.{pid}-{host}-{8 random characters}` (host: 8 hex digits of the host name's sha256), holds a
`flock` on it and renames it into place. A run killed mid-write leaves that file; the next run that writes
into the same folder removes it (stage 1 on its store when it takes the lock, stage 3 on
`models_disentangled/`, stage 4 on `plots/`, `results_disentanglement/`, `results_quantitative/` and its
caches, at their start; the atlas beside its folder), when the host in the name is this machine's, no
process of that pid is alive here and nobody holds its lock. A live writer's file, another machine's, and
any other name are left alone (`utils/files/leftovers.py`, `tests/test_leftovers.py`).

Size for ImageNet and ResNet-50 `layer4.2.conv3`: 1.28 M × (4096 + 2048 + 16) bytes ≈ 7.9 GB.

Why patch sums: the activation relevance vector of channel c for image n is linear in the layer's input,
r_n^c[k] = Σ_ij W[c,k,i,j] · P_n[k,i,j], so the ARV of every (channel, class) pair follows from the class
means of P without another pass over the images ([method](method.md#activation-relevance-vectors-and-patch-sums)).

**Unreadable images.** A truncated or non-image file stops every stage with one line naming it relative
to `--data_dir` (`error: cannot read image train/n01440764/x.JPEG (OSError: image file is truncated …):
replace or remove the file, or pass --skip_unreadable …`); stage 1 keeps every finished chunk, so a
rerun resumes. `get_importances_for_classes.py --skip_unreadable` records such images as invalid rows
(prediction −1, zeros elsewhere): stages 2 and 3 leave them out of every count (N_y, histograms, class
means, concept ARVs) and say how many. The valid rows equal those of a store made without the files (bit
for bit with `--batch_size 1`; otherwise to float rounding, as a CPU convolution may round an image
differently in another batch), whether the bad file was met before or after a resume.
`get_results.py --skip_unreadable` leaves unreadable val images out of its numbers and lists them in the
summary.
"""

FILES = """\
## What each stage writes

### Stage 2

`OUT/results_get_cosine_similarities/{model}_required{τ}_p{p}_cossim{low}to{high}.txt` (the published
name and format: header `Channel,Class1,Class2,CosineSimilarity`, highest cosine first), and in
`STORE/results_get_cosine_similarities/` the full candidate list (`…_candidates.json`) and the
class × channel histograms (`…_histograms.json` and `.npy`). With `--importance_sign positive_activation`
the three names end in `_positive_activation` and the JSON files also hold its report (`sign_report`);
`--importance_sign published` writes the same bytes as no flag.

With `--label_free`: `STORE/results_get_cosine_similarities/{model}_concepts_top{N}.json` with the store's
fingerprint and, per channel, `k`, `silhouette`, `silhouette_by_k`, `sign`, `top_rows` (strongest
first), `summed_activations`, `purity`, and per cluster `rows`, `size`, `centroid` (mean L1-normalised
ARV), `mean_arv`, `classes` (name → count), `class_counts`, `purity` (schema: `utils/stages/label_free.py`). A later
run with the same store, N and `--k` keeps the file's other channels, so channels can be added one at a
time.

### Stage 3

In `STORE/models_disentangled/`, per ρ of the 20 (0.05, 0.1, …, 1.0):
`{model}_channel{c}_classes1{S1}_classes2{S2}_f{ρ}_unnormalized.pth` (`{S1}`: Python's `str()` of the
class list, e.g. `[530]`), and the chosen one again as `…_f_best_unnormalized.pth`. These are the
published names and keys: `disentangled.weight` (3, C_in, kh, kw) = [D1, D2, R], `disentangled.bias` if the
layer has one, `merged.weight` (1, 3, 1, 1) = [1, 1, −1]. For k > 2 concepts the name appends
`_classes3{S3}` …, the weight is (k+1, C_in, kh, kw) = [D_1, …, D_k, R] and the merge [1, …, 1, −(k−1)]; a
split by label-free clusters is `{model}_channel{c}_top{N}_clusters0-1-2_f{ρ}_unnormalized.pth`.

Beside them: `…_info.json` (the scores of every ρ under both best-ρ scores, both choices, the dead shares,
both exactness checks `max_map_diff`/`max_abs_map` and `max_logit_diff`/`max_abs_logit`, what made it; for
a clusters split the concepts file's path and sha256; `checkpoint_sha256`: the sha256 of each of the 21
checkpoints) and `…_scores.png` (score against ρ). If either
exactness check exceeds 1e-4 relative (of max(1, largest value)) the stage stops in one line and writes
nothing (with `--candidates`: nothing of the failing chunk of 8 jobs; the chunks before it stay written;
[method](method.md#splitting-a-channel)).

`--export_model` also writes the whole disentangled network's state dict (`…_f_best_model.pth`, plain
tensors) and `…_f_best_model.json` (how to rebuild it without this code, `rows_of_first_conv`). From
Python:

```python
from utils.disentangle import load_disentangled_model
net = load_disentangled_model("resnet50", "IMAGENET1K_V1", "layer4.2.conv3", 1660,
                              "STORE/models_disentangled/resnet50_channel1660_classes1[530]_classes2[938]_f_best_unnormalized.pth")
# net.get_submodule("layer4.2.conv3")[0] outputs 2050 maps: row 1660 = D1, row 2048 = D2, row 2049 = R; same logits
```

k is read from the checkpoint: a k-way checkpoint's layer outputs C_out + k maps (row c = D1, rows
C_out … C_out+k−2 = D2 … Dk, row C_out+k−1 = R).

### Stage 4

Under `--out_dir`:

| file | with | content |
| --- | --- | --- |
| `plots/density_concept{1,2}.png`, `results_disentanglement/density_concept{1,2}.txt` | `--get_qualitative` | density plots (published names; also a copy under the run's name) and their curve points as LaTeX `filecontents*` blocks |
| `results_quantitative/quantitative_concept{1,2}_required{τ}.txt` | `--get_quantitative` | one `D1/orig,D2/orig,R/orig` line per val image with relative attribution ≥ τ, all runs; a rerun replaces its own rows |
| `results_quantitative/means_required{τ}.txt` | `--get_quantitative` | column means and image counts per run and over all runs |
| `results_quantitative/quantitative_k{k}_concept{j}_required{τ}.txt`, `means_k{k}_required{τ}.txt` | `--get_quantitative`, k > 2 | the same with columns `D1/orig … Dk/orig, R/orig` |
| `plots/top_images.png` | `--get_top_images` | the val images activating the original channel and each D_j most (by pos(X) = Σ max(X, 0)), one row per map |
| `results_disentanglement/{run}_summary.json` | always | `sep_concept{j}` = mean pos(D_j) / max_{l≠j} mean pos(D_l) on concept j's images (`null` with `sep_concept{j}_reason` where the denominator is 0: unbounded), `mean_pos_concept{j}` for every map, image counts, unreadable images; with `--get_quantitative`, `quantitative_concept{j}` (column means, `null` with `quantitative_concept{j}_reason` when no image passes τ) |
| `plots/feature_vis_{run}.png`, `plots/feature_vis.png`, `plots/feature_vis_{run}_raw.png`, `results_disentanglement/{run}_feature_vis.json`, `{run}_feature_vis_images.npy`, `{run}_feature_vis_transparency.npy` | `--get_feature_vis` | see [feature visualizations](feature_visualization.md) |
| `plots/sae_view_{run}.png`, `results_disentanglement/{run}_sae_view.json`, `MODEL_DIR/sae/sae_{key}.pt` | `--get_sae_view` | see [the SAE view](sae.md) |

Every JSON file the stages write is strict JSON (no `NaN` or `Infinity`): a number that is not defined is
`null`, with a `…_reason` key beside it saying why.
"""

CHECKED = """\
## What is checked when files are read

Every file a stage reads that an earlier stage wrote is checked before its numbers are used; anything
wrong is one line naming the file and what to do (exit status 2), never a traceback and never a number
that is silently wrong. One reading helper per format (`utils/files/reading.py`):

| file | checked | a damaged one |
| --- | --- | --- |
| store arrays (`*.npy`) | header (shape, dtype against the manifest; object arrays are never unpickled), length against the header, sha256 against the manifest's `digests` (rule below) | `…/targets.npy: cut short: 1040 bytes, its header ((136,) int64) needs 1216; the store is damaged: delete … and rerun get_importances_for_classes.py with the flags it was made with` |
| `manifest.json`, `…_info.json`, the quantitative registry `runs_*.json`, concepts and candidates files | complete JSON | `…: not complete JSON (Expecting ',' delimiter at line 1 column 20 of 20 bytes: cut short or garbled); …` |
| checkpoints (`…_unnormalized.pth`), `--weights` files | read with `weights_only=True`; a `.npy`, an `.npz`, an empty file or other objects are named as such; stage 4: the sha256 against the info file's `checkpoint_sha256` (an info file without it: the best checkpoint must hold the tensors of the checkpoint at the info file's `best_rho`) | `…_f_best_unnormalized.pth: is not the checkpoint stage 3 wrote with its info file (its sha256 differs …); rerun disentangle_channel.py …` |
| progress chunks of stage 1, the feature-visualization spectrum cache (`.npz`) | a complete archive | a chunk: one line; the cache: computed again (a line says so) |

**When the store's sha256 is verified.** Stage 1 records each array's size and sha256 when it finishes the
store (rows are merged out of order, so the file is hashed once, read back, rather than while it is
written). Opening a store always checks every array's header and length (about 2 ms). The sha256 is
verified on every open of a store whose arrays hold at most 256 MiB together (`FULL_CHECK` in
`utils/files/store.py`), and for a larger store only for an array modified after the manifest was written
(rewritten, replaced, or copied without keeping modification times: copy stores with `cp -p` or `rsync -a`).
A multi-GB store is thus not hashed on every run of stages 2–4; bytes changed in place with the time set
back are the case left to the header and length check. Measured with
`python -m benchmarks.store_check --gib 0.25` on a shared 2-core AMD EPYC machine under load: the full
check of 0.25 GiB 0.93 s, the header and length check 1.2 ms (`--gib 1.0`: 3.6 s and 2.1 ms; sha256 of data
in memory runs at 0.93 GB/s on one of its cores). A store written before `digests` existed is read with
the header and length check only.

**Reruns redo damaged work.** `disentangle_channel.py --candidates` skips a channel only when all its files
exist and are not empty, its info file is complete JSON of the same store and concepts, and each
checkpoint's sha256 is the one recorded there; a 0-byte or changed checkpoint makes the job run again.

**Finite or refused.** A model whose weights hold NaN or infinity is refused when it is loaded (every
stage, before any pass: which tensor, how many values). Stage 1 checks each batch's attributions and
patch sums (float16 attributions beyond 65504 are infinite) and stops without marking the store
complete; stage 2 refuses such rows of a store written before; stage 3 refuses NaN ρ scores (no best ρ
exists); stage 4 refuses maps and activations that are not finite. A separation whose denominator
max_{l≠j} mean pos(D_l) is 0 is unbounded: `null` in the summary with `sep_concept{j}_reason`, printed as
text, and shown blank in the atlas (also for a summary written before, whose 1e-12 floor gave about 1e13).

**Data folders.** Symbolic links under `--data_dir` are followed only within it (or within the split
folder, when `train/` itself is a link); a link that leaves it, or one to a folder above itself (a loop,
`train/<class>/loop -> .`), stops every stage with one line naming the link.

**A full disk** while any stage writes is one line, `error: no space left on device writing PATH; free
space and rerun: finished work is kept` (the file being written keeps its old content; temporary files are
removed).
"""


def _cell(text):
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _value(action):
    if action.nargs == 0:
        return ""
    if action.choices:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    name = action.metavar or action.dest.upper()
    if action.nargs in ("+", "*"):
        return f"{name} [{name} ...]"
    return name


def _default(action):
    if action.required:
        return "required"
    if action.nargs == 0:
        return "off" if action.default is False else ("on" if action.default is True else "")
    if action.default is None:
        return "—"
    if isinstance(action.default, (list, tuple)):
        return "`" + " ".join(str(v) for v in action.default) + "`"
    return f"`{action.default}`"


def _table(actions):
    rows = ["| flag | value | default | meaning |", "| --- | --- | --- | --- |"]
    for a in actions:
        if not a.option_strings or a.help == argparse.SUPPRESS or "-h" in a.option_strings:
            continue
        flags = ", ".join(f"`{o}`" for o in a.option_strings)
        value = _value(a)
        rows.append(f"| {flags} | {_cell(value) and '`' + _cell(value) + '`'} | {_default(a)} | {_cell(a.help or '')} |")
    return rows if len(rows) > 2 else []


def _anchor(script):
    return script.replace(".", "").lower()


def stage_section(script, what):
    module = importlib.import_module(script[:-3])
    parser = module.build_parser()
    out = [f"## {script}", "", what + ".", ""]
    doc = (parser.description or "").strip("\n")
    if doc:
        out += ["```text", doc, "```", ""]
    for group in parser._action_groups:  # argparse keeps the groups in the order they were made
        rows = _table(group._group_actions)
        if not rows:
            continue
        title = {"positional arguments": "positional", "options": "flags", "optional arguments": "flags"}.get(
            group.title, group.title)
        out += [f"**{title}**", ""] + rows + [""]
    return out


def render():
    """The page's text (a pure function of the scripts' parsers and the text above)."""
    contents = ", ".join(f"[{s}](#{_anchor(s)})" for s, _ in STAGES)
    contents += ", [models, weights and layers](#models-weights-and-layers), [the call scripts](#the-call-scripts), [the store](#the-store), " \
                "[what each stage writes](#what-each-stage-writes), [what is checked when files are read]" \
                "(#what-is-checked-when-files-are-read)."
    lines = [HEAD + contents, ""]
    for script, what in STAGES:
        lines += stage_section(script, what)
    text = "\n".join(lines).rstrip("\n") + "\n\n" + MODELS + "\n" + CALL_SCRIPTS + "\n" + STORE + "\n" + FILES + "\n" + CHECKED
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only compare; exit status 1 if the page is stale")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        with open(PAGE, encoding="utf-8") as f:
            same = f.read() == text
        print("docs/reference.md is up to date" if same else
              "docs/reference.md is stale: run .venv/bin/python docs/make_reference.py")
        return 0 if same else 1
    tmp = PAGE + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, PAGE)
    print(f"wrote {os.path.relpath(PAGE, ROOT)} ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    if not __package__:  # run as a file: again as the module docs.make_reference, from the repository root
        sys.exit(subprocess.call([sys.executable, "-m", "docs.make_reference", *sys.argv[1:]], cwd=ROOT))
    sys.exit(main())
