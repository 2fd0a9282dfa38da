"""Every path a stage writes or reads, in one place: the naming contract between the stages.

Stage 1 writes the store, ``{store_dir}/{tag}_channel_importances/``; stage 2 writes
``{store_dir}/results_get_cosine_similarities/`` (and its ``.txt`` table under ``--out_dir``); stage 3 writes
``{store_dir}/models_disentangled/``; stage 4 writes ``plots/``, ``results_disentanglement/`` and
``results_quantitative/`` under its ``--out_dir``, and caches feature-visualization spectra and SAEs in the
store folder. ``tag`` is the model's tag (``resnet50``); ``name`` is the tag, or ``{tag}_{layer}`` for a layer
other than the model's last conv (``models.file_tag``). The published names are those of the model's last conv.
No other module builds a file name.
"""
import glob
import os

# ---------------------------------------------------------------- stage 1: the store
STORE_SUFFIX = "_channel_importances"
MANIFEST = "manifest.json"
LOCK = ".lock"
PROGRESS = "progress"


def store_folder(store_dir, tag):
    """The store of ``tag``: ``{store_dir}/{tag}_channel_importances``."""
    return os.path.join(store_dir, f"{tag}{STORE_SUFFIX}")


def is_store_folder_name(name):
    """Whether a folder name is that of a store (``…_channel_importances``)."""
    return name.endswith(STORE_SUFFIX)


def manifest(folder):
    """The store's ``manifest.json``."""
    return os.path.join(folder, MANIFEST)


def store_array(folder, array):
    """The store's array ``{array}.npy`` (attributions, targets, predictions, patch_sums)."""
    return os.path.join(folder, array + ".npy")


def store_lock(folder):
    """The lock a running stage 1 holds in its store."""
    return os.path.join(folder, LOCK)


def progress_dir(folder):
    """Where stage 1 keeps the chunks of a run that has not finished."""
    return os.path.join(folder, PROGRESS)


def progress_chunk(folder, i, merged=False):
    """Chunk ``i`` of an unfinished stage 1 (``.npz``), or its marker once merged into the arrays."""
    return os.path.join(progress_dir(folder), f"chunk_{i:07d}" + ("" if merged else ".npz"))


def progress_rows(folder):
    """``progress/rows.json`` of an unfinished stage 1: the SHA-256 of each chunk's image names and labels, so
    that a rerun on changed data keeps the finished chunks whose images are the same."""
    return os.path.join(progress_dir(folder), "rows.json")


def progress_chunk_index(file):
    """The chunk index of a file name in ``progress/`` (``chunk_0000003`` or ``chunk_0000003.npz``), else None."""
    return int(file[6:13]) if file.startswith("chunk_") else None


# ---------------------------------------------------------------- stage 2: candidates, concepts
STAGE2_DIR = "results_get_cosine_similarities"
SIGN_SUFFIX = {"published": "", "positive_activation": "_positive_activation"}


def stage2_dir(root):
    """``{root}/results_get_cosine_similarities`` (root: the store folder, or ``--out_dir`` for the table)."""
    return os.path.join(root, STAGE2_DIR)


def candidates_base(name, tau, p, low, high, sign="published", top=None):
    """``{name}_required{tau}_p{p}_cossim{low}to{high}[_positive_activation]``: the stem of stage 2's files;
    with stage 2's ``--top N`` (the window not used): ``{name}_required{tau}_p{p}_top{N}[_positive_activation]``."""
    window = f"cossim{low}to{high}" if top is None else f"top{top}"
    return f"{name}_required{tau}_p{p}_{window}{SIGN_SUFFIX[sign]}"


def candidates_table(out_dir, base):
    """The published table ``Channel,Class1,Class2,CosineSimilarity`` under ``--out_dir``."""
    return os.path.join(stage2_dir(out_dir), base + ".txt")


def candidates_json(store_dir, base):
    """Every candidate with the settings and class names, in the store folder."""
    return os.path.join(stage2_dir(store_dir), base + "_candidates.json")


def histograms(store_dir, name, tau, sign="published", ext="json"):
    """The class-by-channel histogram H[y, c] (``.json`` with the settings, or ``.npy``)."""
    return os.path.join(stage2_dir(store_dir), f"{name}_required{tau}_histograms{SIGN_SUFFIX[sign]}.{ext}")


def concepts_file(store_dir, name, top_n):
    """The label-free concepts of ``--label_free``: ``{name}_concepts_top{N}.json``."""
    return os.path.join(stage2_dir(store_dir), f"{name}_concepts_top{top_n}.json")


# ---------------------------------------------------------------- stage 3: checkpoints
CHECKPOINTS_DIR = "models_disentangled"
CHECKPOINT_SUFFIX = "_unnormalized.pth"
BEST = "best"


def checkpoints_dir(store_dir):
    """``{store_dir}/models_disentangled``."""
    return os.path.join(store_dir, CHECKPOINTS_DIR)


def rho_text(rho):
    """How a checkpoint name writes rho: ``0.05``, or ``_best`` (so that the name reads ``_f_best_``)."""
    return f"_{BEST}" if rho == BEST else str(rho)


def class_checkpoint(name, channel, concepts, rho):
    """``{name}_channel{c}_classes1{S1}_classes2{S2}[_classes3{S3}...]_f{rho}_unnormalized.pth`` (published for
    two concepts); ``rho`` a float or ``"best"``."""
    parts = "".join(f"_classes{j}{s}" for j, s in enumerate(concepts, start=1))  # a list prints as [1, 2]
    return f"{name}_channel{channel}{parts}_f{rho_text(rho)}{CHECKPOINT_SUFFIX}"


def cluster_checkpoint(name, channel, top_n, clusters, rho):
    """A split by label-free concepts: ``{name}_channel{c}_top{N}_clusters0-1-2_f{rho}_unnormalized.pth``."""
    return (f"{name}_channel{channel}_top{top_n}_clusters{'-'.join(str(j) for j in clusters)}_f{rho_text(rho)}"
            f"{CHECKPOINT_SUFFIX}")


def run_name(checkpoint):
    """A checkpoint's name without ``.pth``: the stem of stage 4's per-run files."""
    base = os.path.basename(checkpoint)
    return base[:-len(".pth")] if base.endswith(".pth") else base


def job_stem(checkpoint):
    """A checkpoint path without ``_f{rho}_unnormalized.pth``: the stem of the job's info, plot and export files."""
    return checkpoint[:checkpoint.rfind("_f")]


def info_file(checkpoint):
    """``…_info.json`` beside a checkpoint of the job (any rho)."""
    return job_stem(checkpoint) + "_info.json"


def scores_plot(checkpoint):
    """``…_scores.png``: the best-rho curve of the job."""
    return job_stem(checkpoint) + "_scores.png"


def exported_model(checkpoint):
    """``(…_f_best_model.pth, …_f_best_model.json)``: the whole disentangled network and how to rebuild it."""
    stem = job_stem(checkpoint) + f"_f_{BEST}_model"
    return stem + ".pth", stem + ".json"


# ---------------------------------------------------------------- stage 4: plots, results, registry
PLOTS_DIR = "plots"
RESULTS_DIR = "results_disentanglement"
QUANTITATIVE_DIR = "results_quantitative"


def latest_suffix(name, tag):
    """Infix of the files without a run's name (overwritten by the latest run): '' for the model's last conv,
    ``_{name}`` for another layer."""
    return "" if name == tag else f"_{name}"


def plot(out_dir, file):
    return os.path.join(out_dir, PLOTS_DIR, file)


def result(out_dir, file):
    return os.path.join(out_dir, RESULTS_DIR, file)


def density_plots(out_dir, j, latest, run):
    """The density plot of concept j: the latest run's and the run's own."""
    return plot(out_dir, f"density_concept{j}{latest}.png"), plot(out_dir, f"{run}_density_concept{j}.png")


def density_data(out_dir, j, latest):
    """The LaTeX ``filecontents`` blocks of concept j's density curves."""
    return result(out_dir, f"density_concept{j}{latest}.txt")


def top_images_plots(out_dir, latest, run):
    """The contact sheet: the latest run's and the run's own."""
    return plot(out_dir, f"top_images{latest}.png"), plot(out_dir, f"{run}_top_images.png")


def summary(out_dir, run):
    """``results_disentanglement/{run}_summary.json``: every number of one stage-4 run."""
    return result(out_dir, f"{run}_summary.json")


def quantitative_dir(out_dir):
    return os.path.join(out_dir, QUANTITATIVE_DIR)


def registry_prefix(name, tag, k):
    """Infix of the quantitative files: the layer's name for another layer than the last conv, then ``k3_`` ...
    for k > 2 concepts ('' for the published files)."""
    return ("" if name == tag else f"{name}_") + ("" if k == 2 else f"k{k}_")


def registry(folder, prefix, tau):
    """``runs_{prefix}required{tau}.json``: every run's rows, from which the text files are written."""
    return os.path.join(folder, f"runs_{prefix}required{tau}.json")


def registry_lock(folder, prefix, tau):
    return os.path.join(folder, f".runs_{prefix}required{tau}.lock")


def quantitative_rows(folder, prefix, j, tau):
    """``quantitative_{prefix}concept{j}_required{tau}.txt``: concept j's rows of every run."""
    return os.path.join(folder, f"quantitative_{prefix}concept{j}_required{tau}.txt")


def quantitative_means(folder, prefix, tau):
    """``means_{prefix}required{tau}.txt``: the column means per run and over all runs."""
    return os.path.join(folder, f"means_{prefix}required{tau}.txt")


# ---------------------------------------------------------------- stage 4: feature visualizations, SAE view
def spectrum_cache(store_dir, size, key):
    """The feature visualizations' image spectrum, cached in the store folder."""
    return os.path.join(store_dir, "feature_vis_spectra", f"spectrum_S{size}_{key}.npz")


def feature_vis_files(out_dir, run, latest):
    """The feature visualizations of one run: figure, raw row, latest figure, images, transparency, record."""
    return {"figure": plot(out_dir, f"feature_vis_{run}.png"),
            "raw": plot(out_dir, f"feature_vis_{run}_raw.png"),
            "latest": plot(out_dir, f"feature_vis{latest}.png"),
            "images": result(out_dir, f"{run}_feature_vis_images.npy"),
            "transparency": result(out_dir, f"{run}_feature_vis_transparency.npy"),
            "record": result(out_dir, f"{run}_feature_vis.json")}


def sae_cache(store_dir, key):
    """A trained SAE of the layer's input, cached in the store folder."""
    return os.path.join(store_dir, "sae", f"sae_{key}.pt")


def sae_view_files(out_dir, run):
    """The SAE view of one run: figure and record."""
    return {"figure": plot(out_dir, f"sae_view_{run}.png"), "record": result(out_dir, f"{run}_sae_view.json")}


# ---------------------------------------------------------------- whole layer
def whole_layer_model(store_dir, name, label=None):
    """``(…/models_disentangled/{name}[_{label}]_whole_layer_model.pth, ….json)``: the network with every split
    channel of the layer replaced at once, and how to rebuild it (``label`` tells two such networks apart)."""
    stem = os.path.join(checkpoints_dir(store_dir), name + ("" if label is None else f"_{label}") + "_whole_layer_model")
    return stem + ".pth", stem + ".json"


# ---------------------------------------------------------------- atlas
ATLAS_RECORD = "atlas.json"
ATLAS_INDEX = "index.html"
ATLAS_RUNS = "channels"
ATLAS_SHARED = "files"
ATLAS_OWN_FILES = ".atlas_files.json"  # the files the atlas wrote itself (a rewrite replaces those, keeps others)
ATLAS_ENTRIES = (ATLAS_RECORD, ATLAS_INDEX, ATLAS_RUNS, ATLAS_SHARED, ATLAS_OWN_FILES)  # what an atlas writes


def all_summaries(out_dir):
    """The glob pattern of every stage-4 run's summary under ``out_dir`` (the folder's own ``[`` taken literally)."""
    return summary(glob.escape(out_dir), "*")


def run_of_summary(path):
    """The run's name from its summary's path (``summary``'s inverse)."""
    return os.path.basename(path)[:-len("_summary.json")]


def all_concepts_files(store_dir, name):
    """The glob pattern of every label-free concepts file of ``name`` (any top N)."""
    return concepts_file(glob.escape(store_dir), glob.escape(name), "*")


def atlas_record(folder):
    """``{atlas}/atlas.json``: the rows the index shows, and what the atlas was written from."""
    return os.path.join(folder, ATLAS_RECORD)


def atlas_own_files(folder):
    """``{atlas}/.atlas_files.json``: every file the atlas wrote (paths relative to the folder)."""
    return os.path.join(folder, ATLAS_OWN_FILES)


def atlas_index(folder):
    return os.path.join(folder, ATLAS_INDEX)


def atlas_run(folder, slug, file=ATLAS_INDEX):
    """A file of one run's page folder: ``{atlas}/channels/{slug}/{file}`` (the page is ``index.html``)."""
    return os.path.join(folder, ATLAS_RUNS, slug, file)


def atlas_shared(folder, file):
    """A file every page may link to (the candidates, the concepts files): ``{atlas}/files/{file}``."""
    return os.path.join(folder, ATLAS_SHARED, file)


# ---------------------------------------------------------------- the demos: a trained net
def training_record(weights):
    """``{stem}_training.json`` beside a demo's trained weights ``{stem}.pth``: how it was trained, its accuracy."""
    return os.path.splitext(weights)[0] + "_training.json"
# ---------------------------------------------------------------- stage 4: where it finds a checkpoint
def checkpoint_places(model_dir, checkpoint):
    """Where stage 4 looks for a checkpoint file, in order: ``{model_dir}/models_disentangled``, then ``model_dir``."""
    return [os.path.join(folder, checkpoint) for folder in (checkpoints_dir(model_dir), model_dir)]
