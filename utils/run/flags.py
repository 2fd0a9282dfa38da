"""Every stage's own flags, in one place (the shared model, transform and runtime flags: ``cli.add_model_args``).

A flag's default is its settings field's (``utils.run.settings_of_flags`` turns the parsed flags into those
settings), so that a notebook that builds a Settings by keyword gets what the command line gets. Bad values of
the typed flags raise UserError (one line, exit status 2).
"""
from utils.concepts.by_classes import MORE_CONCEPTS
from utils.data.gpu_decode import DECODERS
from utils.featurevis.settings import DEFAULTS as FV_DEFAULTS, PRESETS, preset_flags
from utils.files import names
from utils.run.cli import at_least
from utils.stages import label_free as label_free_stage, sae_view as sae_view_stage, stage1 as stage1_stage
from utils.stages import stage2 as stage2_stage
from utils.stages import stage3 as stage3_stage, stage4 as stage4_stage


def stage1(p):
    """Stage 1's own flags."""
    p.add_argument("--chunk_size", type=int, default=stage1_stage.Settings.chunk_size,
                   help="rows per resumable chunk (default: an unfinished store's, else a multiple of --batch_size near 2048)")
    p.add_argument("--autocast_bf16", action="store_true",
                   help="run the model under bfloat16 autocast (faster on GPU; changes attributions slightly)")
    p.add_argument("--channels_last", action="store_true", help="channels_last memory format (GPU)")
    p.add_argument("--gpu_decode", action="store_true",
                   help="decode JPEGs on the GPU: nvImageCodec (its hardware decoder on A100/H100/H200) when the "
                        "optional package is installed (requirements-gpu.txt), else torchvision.io.decode_jpeg "
                        "(nvJPEG); falls back to CPU decoding without CUDA. The store records the decoder")
    p.add_argument("--gpu_decoder", choices=("auto",) + DECODERS, default=stage1_stage.Settings.gpu_decoder,
                   help="with --gpu_decode: which GPU JPEG decoder (default auto: nvimgcodec if installed, "
                        "else nvjpeg)")
    p.add_argument("--fast_resize", action="store_true",
                   help="CPU decoding: reduced-size JPEG decoding for images at least twice the resize "
                        "target, and a resize of the center crop's region only (faster; moves a few pixels "
                        "by a grey level or more, recorded in the store's numerics; see utils/data/cpu_decode.py)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (cuDNN deterministic, no benchmark mode): on one card a "
                        "resumed or torchrun store equals a single run byte for byte; slower. Recorded in "
                        "the store's numerics, so a resume needs it too")
    p.add_argument("--cpu_threads", type=int, default=stage1_stage.Settings.cpu_threads,
                   help="intra-op threads of each process when the model runs on the CPU (default: torch's "
                        "own count, 1 per process under torchrun; a resumed store keeps the count it "
                        "recorded). CPU convolutions round differently with 1 thread than with several: a "
                        "store is byte-identical across launchers and resumes only with the same count; "
                        "ignored on CUDA")
    p.add_argument("--tf32", action="store_true",
                   help="let CUDA run float32 convolutions and matrix products in TF32 (faster on GPUs "
                        "since Ampere; changes attributions slightly). Default: full float32")
    p.add_argument("--allow_mixed_numerics", action="store_true",
                   help="resume a store under other numerics than it was started with (device, GPU model, "
                        "CPU thread count, TF32); the change is recorded in the manifest")
    p.add_argument("--skip_unreadable", action="store_true",
                   help="record images whose files cannot be decoded as invalid rows (prediction -1, file "
                        "names in the manifest) instead of stopping; later stages leave them out")


def stage2(p):
    """Stage 2's own flags (the candidate list)."""
    p.add_argument("--proportion_attribution_required", type=float, default=stage2_stage.Settings.tau,
                   help="tau: channel c is important for an image if A[c] >= tau * sum of positive A (default 0.05)")
    p.add_argument("--p", type=float, default=stage2_stage.Settings.p,
                   help="channel c uses class y if it is important for at least p * N_y images of y (default 0.75)")
    p.add_argument("--cos_sim_low", type=float, default=stage2_stage.Settings.low,
                   help="lowest cosine kept (inclusive, default 0; -1 <= low < high)")
    p.add_argument("--cos_sim_high", type=float, default=stage2_stage.Settings.high, help="cosine upper bound (exclusive, default 1; at most 1)")
    p.add_argument("--top", type=at_least("--top", 1, int), default=stage2_stage.Settings.top,
                   help="list the N candidate pairs of lowest cosine, whatever --cos_sim_low/--cos_sim_high say "
                        "(default: every pair in the window); the files carry _topN in place of the window")
    p.add_argument("--out_dir", default=stage2_stage.Settings.out_dir,
                   help="folder for results_get_cosine_similarities/ (default: working directory, as published)")
    p.add_argument("--importance_sign", choices=tuple(names.SIGN_SUFFIX), default=stage2_stage.Settings.sign,
                   help="published (default): the rule above; positive_activation: an image counts for channel c "
                        "only where c's summed activation after the BatchNorm that follows the layer is positive "
                        "(the layer's own summed activation if no BatchNorm follows it; a note says so)")
    p.add_argument("--chunk_rows", type=int, default=stage2_stage.Settings.chunk_rows,
                   help="store rows read at a time (memory use)")


def label_free(p):
    """The flags of stage 2's label-free concepts (a group of its parser)."""
    g = p.add_argument_group("label-free concepts (instead of the candidate list)")
    g.add_argument("--label_free", action="store_true",
                   help="cluster each channel's top images by their per-image ARVs instead (no class labels used)")
    g.add_argument("--channels", nargs="+", default=None,
                   help="channels to study (space- or comma-separated; default: every channel of the layer)")
    g.add_argument("--top_n", type=int, default=label_free_stage.Settings.top_n, help="top training images per channel (default 100)")
    g.add_argument("--k", default="auto",
                   help="concepts per channel: a number >= 2, or auto (by the silhouette over 2..5; default)")


def stage3(p):
    """Stage 3's own flags (disentangle_channel.py)."""
    p.add_argument("--channel_disentangle", "--channel_of_interest", dest="channel_disentangle", type=int, default=None,
                   help="channel of the layer to split (required unless --triples; also --channel_of_interest)")
    concepts_by_classes(p, concept3=(": a split into k = 3 .. 6 concepts (give concepts 3, 4, ... in order, all "
                                     "disjoint); checkpoints are named ..._classes3[...]_f..."),
                        triples="split every triple in one process")
    p.add_argument("--concepts_file", default=None,
                   help="concepts found without labels (get_cosine_similarities.py --label_free writes "
                        "STORE/results_get_cosine_similarities/{model}_concepts_top{N}.json): split "
                        "--channel_disentangle into its clusters (concept j = cluster j's training rows); "
                        "checkpoints are named ..._top{N}_clusters0-1-2_f...")
    p.add_argument("--clusters", nargs="+", type=int, default=None,
                   help="with --concepts_file: the cluster indices to use as concepts, in this order "
                        "(default: all the channel's clusters; at least two)")
    candidates(p)  # --candidates FILE [--top N] [--all_classes]
    p.add_argument("--rho_score", choices=("published", "robust"), default=stage3_stage.Settings.rho_score,
                   help="which best-rho score picks the ..._f_best checkpoint: published (sum_j mean q_j, default) "
                        "or robust (bounded; never a rho where a concept's own map is dead on more than half of "
                        "its images, see docs/concepts.md). Both are always printed and recorded in ..._info.json")
    p.add_argument("--exactness_images", type=int, default=stage3_stage.Settings.exactness_images,
                   help="the first N training images, on which the full original and disentangled networks' "
                        "logits are compared (default 4); the split maps are compared with the layer's output on "
                        "every image scored")
    p.add_argument("--no_channels_last", action="store_true",
                   help="score in the default (contiguous) memory layout instead of channels-last: the scores' "
                        "last digits as before channels-last became the default (it is about 1.7x faster on CPU)")
    p.add_argument("--export_model", action="store_true",
                   help="also write the whole disentangled network's state dict (…_f_best_model.pth) and how to "
                        "rebuild it (…_f_best_model.json); utils.disentangle.load_disentangled_model builds it. "
                        "With --candidates: one network with every channel of the selection split "
                        "(models_disentangled/{model}_top{N}[_all_classes]_whole_layer_model.pth and .json)")


def stage4(p):
    """Stage 4's own flags (get_results.py), with its --get_feature_vis and --get_sae_view groups."""
    p.add_argument("--model_dir", "--store_dir", dest="model_dir", default=None,
                   help="the --store_dir of stages 1-3 (holding models_disentangled/; STORE/models_disentangled "
                        "finds the store in STORE; required; also --store_dir)")
    p.add_argument("--channel_of_interest", "--channel_disentangle", dest="channel_of_interest", type=int,
                   default=None, help="the disentangled channel (required unless --triples; also --channel_disentangle)")
    concepts_by_classes(p, concept3=" of a k-way checkpoint (k = 3 .. 6, as given to stage 3)",
                        triples="evaluate every triple in one process, writing what one run per triple in file "
                                "order writes")
    p.add_argument("--concepts_file", default=None,
                   help="the concepts file stage 3 split --channel_of_interest by: the val images of concept j are "
                        "those of the channel's top --val_top_n val images (by summed activation) whose ARV is "
                        "nearest to cluster j's centroid")
    p.add_argument("--clusters", nargs="+", type=int, default=None,
                   help="with --concepts_file: the clusters given to stage 3 (default: all the channel's clusters)")
    p.add_argument("--val_top_n", type=int, default=None,
                   help="with --concepts_file: how many top val images to assign to clusters (default: the file's "
                        "top_n, at most the number of val images)")
    candidates(p)  # --candidates FILE [--top N] [--all_classes]
    p.add_argument("--atlas", default=None,
                   help="after the runs, write a static site of them into this folder (index.html, one page per "
                        "channel; opens from file://; a new folder, or one an atlas wrote; see docs/atlas.md)")
    p.add_argument("--f", type=float, default=None, help="rho of the checkpoint to evaluate (default: best)")
    p.add_argument("--get_qualitative", action="store_true", help="density plots and their data files")
    p.add_argument("--get_quantitative", action="store_true",
                   help="D1/orig, D2/orig, R/orig per image (D1/orig .. Dk/orig, R/orig for k concepts)")
    p.add_argument("--proportion_attribution_required", type=float, default=None,
                   help="tau: images whose relative attribution to the channel is >= tau count (default: stage 2's "
                        "tau, from the --candidates file or the store's stage-2 records of the layer where they "
                        "agree, else 0.03, the paper's quantitative tau; the line printed says which)")
    p.add_argument("--get_top_images", action="store_true",
                   help="contact sheet of the val images activating the original channel and each D_j the most")
    p.add_argument("--top_k", type=int, default=stage4_stage.Settings.top_k, help="images per row of the contact sheet (default 8)")
    p.add_argument("--top_images_all_val", action="store_true",
                   help="scan the whole val split for the top images (default: the concepts' val images)")
    p.add_argument("--skip_unreadable", action="store_true",
                   help="leave val images whose files cannot be decoded out of every number (default: stop "
                        "with a message naming the file)")
    p.add_argument("--out_dir", default=stage4_stage.Settings.out_dir,
                   help="folder for plots/, results_disentanglement/, results_quantitative/ (default: working directory)")
    feature_vis(p)  # --get_feature_vis and its --fv_* flags
    sae_view(p)  # --get_sae_view and its --sae_* flags


def concepts_by_classes(p, concept3, triples):
    """--classes_for_concept1 .. 6 and --triples (stages 3 and 4); ``concept3`` ends concept 3's help, ``triples``
    says what the stage does with a triples file."""
    for j in (1, 2):
        p.add_argument(f"--classes_for_concept{j}", nargs="+", default=None,
                       help=f"class indices of concept {j} (required unless --triples or --concepts_file)")
    for j in MORE_CONCEPTS:
        p.add_argument(f"--classes_for_concept{j}", nargs="+", default=None,
                       help=(f"class indices of concept {j}{concept3}" if j == 3
                             else f"class indices of concept {j} (see --classes_for_concept3)"))
    p.add_argument("--triples", default=None,
                   help=f"file of 'channel classes1 classes2' lines (as paper_triples.txt; several classes as "
                        f"1,2): {triples}, instead of the three flags above")


def candidates(p):
    """--candidates, --top, --all_classes (stages 3 and 4)."""
    p.add_argument("--candidates", default=None,
                   help="stage 2's …_candidates.json (or a concepts file of --label_free): split (stage 3) or "
                        "evaluate (stage 4) its --top strongest channels in one process, as --triples "
                        "(see docs/atlas.md)")
    p.add_argument("--top", type=int, default=None,
                   help="with --candidates: how many channels (default: every channel of the file); candidates: "
                        "lowest cosine first, a channel once; concepts file: highest silhouette first")
    p.add_argument("--all_classes", action="store_true",
                   help="with a candidates file: split each channel into every class stage 2 lists for it "
                        "(k-way, at most 6; one class per concept) instead of its lowest-cosine pair")


def feature_vis(parser):
    """Stage 4's feature-visualization flags (bad values raise UserError: one line, exit status 2)."""
    g = parser.add_argument_group("feature visualization (--get_feature_vis)")
    g.add_argument("--get_feature_vis", action="store_true",
                   help="MACO feature visualizations of the original channel and of each disentangled map, "
                        "with their top val images: plots/feature_vis_{run}.png and results_disentanglement/"
                        "{run}_feature_vis.json")
    g.add_argument("--fv_preset", choices=tuple(PRESETS), default=None,
                   help="paper: the defaults below (the paper's size, meant for a GPU); quick: "
                        f"{preset_flags('quick')} (a look in minutes on a CPU); an --fv_* flag given beside it "
                        "wins; the preset is recorded in the feature-vis record (default: paper, not recorded)")
    g.add_argument("--fv_size", type=at_least("--fv_size", 1, int), default=None,
                   help="side S of the optimized image in pixels (default 512)")
    g.add_argument("--fv_steps", type=at_least("--fv_steps", 1, int), default=None,
                   help="optimization steps (default 256)")
    g.add_argument("--fv_crops", type=at_least("--fv_crops", 1, int), default=None,
                   help="random crops of each image per step (default 32)")
    g.add_argument("--fv_seed", type=at_least("--fv_seed", 0, int), default=FV_DEFAULTS["fv_seed"],
                   help="seed of the phases, crops and noise (default 0): same seed, same images")
    g.add_argument("--fv_lr", type=at_least("--fv_lr", 1e-12, float, "positive"), default=FV_DEFAULTS["fv_lr"],
                   help="NAdam learning rate on the phase (default 1.0)")
    g.add_argument("--fv_spectrum_images", type=at_least("--fv_spectrum_images", 1, int),
                   default=None,
                   help="training images that estimate the magnitude spectrum and colour matrix (default 256; "
                        "computed once per data set and size, kept in MODEL_DIR/feature_vis_spectra/)")
    g.add_argument("--fv_batch_targets", type=at_least("--fv_batch_targets", 0, int),
                   default=FV_DEFAULTS["fv_batch_targets"],
                   help="with several jobs (--triples, --candidates): optimize the feature visualizations of "
                        "consecutive jobs together, up to this many targets (images) in one optimization; each "
                        "job's images equal those of its own run up to float rounding (default 0: each job "
                        "alone)")
    return parser


def sae_view(parser):
    """The --get_sae_view flags (a bad value: UserError, one line, exit status 2)."""
    g = parser.add_argument_group("sparse-autoencoder view (--get_sae_view)")
    g.add_argument("--get_sae_view", action="store_true",
                   help="train (or reuse) a TopK SAE on the layer's input and list the features that drive the "
                        "channel: plots/sae_view_{run}.png and results_disentanglement/{run}_sae_view.json")
    for name, kind, low, text in (
            ("sae_expansion", int, 1, "dictionary size m = this times C_in"),
            ("sae_k", int, 1, "features active per position (at most m)"),
            ("sae_steps", int, 1, "Adam steps"),
            ("sae_positions_per_image", int, 1, "input positions sampled per training image, where ||x|| is large"),
            ("sae_seed", int, 0, "seed of the sampling, initialisation and batches"),
            ("sae_lr", float, 1e-12, "Adam learning rate"),
            ("sae_batch_size", int, 1, "vectors per step"),
            ("sae_train_images", int, 0, "training images to sample from, spread over the classes (0: all)")):
        say = "positive" if low == 1e-12 else None
        g.add_argument("--" + name, type=at_least("--" + name, low, kind, say), default=sae_view_stage.DEFAULTS[name],
                       help=f"{text} (default {sae_view_stage.DEFAULTS[name]})")
    return parser
