r"""Stage 4's --get_sae_view: train (or reuse) a TopK SAE on the layer's input, then show which of its
features drive the channel of interest (utils/method/sae.py has the SAE and the decomposition).

1. One pass over the training images (all, or --sae_train_images spread evenly over the classes) up to
   the layer collects --sae_positions_per_image input vectors per image, drawn where ||x|| is large.
2. The SAE is trained on them and saved as MODEL_DIR/sae/sae_{key}.pt with what made it (model, weights'
   sha256, layer and geometry, the training split's classes, counts, file list and the bytes of a few of
   its images, every setting): a later run with the same record reuses it, any other record trains anew.
3. On the scope's val images (the concepts' classes, or all with --top_images_all_val): the channel's
   positive mass pos(a[c]), each feature's own activation sum_{h,w} f_j (its top images), the FVU of
   the reconstruction and the features that never fire. On the channel's TOP_OF_CHANNEL top images:
   contribution_j = conv(f_j, K_j) and its positive mass pos(contribution_j); the features with the
   largest mean pos(contribution_j) are listed with share_j = sum_n pos(contribution_j) / sum_n pos(a[c]).
"""
import hashlib
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from utils.data import folders
from utils.data import scan as image_scan
from utils.featurevis.spectrum import files_sha256, spectrum_images
from utils.files import atomic, cache, names
from utils.method import sae as S
from utils.errors import UserError
from utils.data.folders import default_workers
from utils.method.split import filter_maps, positive_mass
from utils.method.evaluation import top_k

DEFAULTS = {"sae_expansion": 8, "sae_k": 8, "sae_steps": 2000, "sae_positions_per_image": 4, "sae_seed": 0,
            "sae_lr": 1e-3, "sae_batch_size": 1024, "sae_train_images": 0}
TOP_OF_CHANNEL = 32     # the channel's top val images on which contributions are averaged
LISTED = 8              # features listed in the view
CONTENT_IMAGES = 64     # training images whose bytes enter the SAE's record
VERSION = 1


@dataclass(frozen=True)
class Settings:
    """An SAE view: the --sae_* settings (named as the flags); images per batch, loader workers (None: the
    default); the training images' data folder and the store (the SAE cache); what to do with an unreadable val
    image ("error" or "skip"); images per row of the figure (--top_k); whether to scan every val image. The flags:
    ``utils/run/flags.py``'s ``sae_view`` (defaults: ``DEFAULTS``)."""
    sae_expansion: int = DEFAULTS["sae_expansion"]
    sae_k: int = DEFAULTS["sae_k"]
    sae_steps: int = DEFAULTS["sae_steps"]
    sae_positions_per_image: int = DEFAULTS["sae_positions_per_image"]
    sae_seed: int = DEFAULTS["sae_seed"]
    sae_lr: float = DEFAULTS["sae_lr"]
    sae_batch_size: int = DEFAULTS["sae_batch_size"]
    sae_train_images: int = DEFAULTS["sae_train_images"]
    batch_size: int = folders.DEFAULT_BATCH_SIZE
    num_workers: int = None
    data_dir: str = None
    store_dir: str = None
    unreadable: str = "error"
    top_k: int = 8
    all_val: bool = False

    def record(self):
        """The --sae_* settings and the image batch size (the sampling draws batch by batch): what the SAE's
        record holds."""
        return dict({k: getattr(self, k) for k in DEFAULTS}, batch_size=self.batch_size)


def check(settings, conv):
    """Refuse settings that cannot work with this layer, before anything runs or is written."""
    m = settings.sae_expansion * conv.in_channels
    if settings.sae_k > m:
        raise UserError(f"--sae_k {settings.sae_k} is larger than the dictionary: m = --sae_expansion "
                        f"{settings.sae_expansion} x {conv.in_channels} inputs = {m}")


def record_of(ctx, train_ds, settings):
    """What an SAE is made from (a dict; ``settings``: ``Settings.record()``) and the 16 hex digits of its
    sha256 that name the file."""
    from utils.model.loading import layer_geometry
    summary = folders.dataset_summary(train_ds)
    sample = spectrum_images(train_ds, CONTENT_IMAGES)
    meta = {"model": ctx.model_spec, "weights_sha256": ctx.weights_sha256, "layer": ctx.layer_path,
            "layer_geometry": layer_geometry(ctx.conv), "classes": summary["classes"],
            "images_per_class": summary["images_per_class"], "files_sha256": summary["files_sha256"],
            "content_sha256": files_sha256(train_ds.samples[i][0] for i in sample),
            "transform": getattr(ctx, "transform", folders.DEFAULT_TRANSFORM).describe(), "settings": settings,
            "sampling": "positions without replacement, probability proportional to ||x||", "version": VERSION}
    return meta, hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def collect_vectors(model, conv, ds, indices, settings, device):
    """One pass over images ``indices`` of ``ds`` up to the layer: --sae_positions_per_image sampled input vectors
    of each (``sae.sample_positions``). Returns (vectors (N * p, C_in) float32 on the CPU, images read)."""
    gen = torch.Generator().manual_seed(int(settings.sae_seed))
    out, n = [], 0
    plan = image_scan.ScanPlan(ds, settings.batch_size, device, default_workers(settings.num_workers), "skip")
    for batch in image_scan.scan(model, conv, plan, plan.batches(indices), desc="SAE: sampling the layer's input"):
        out.append(S.sample_positions(batch.x, settings.sae_positions_per_image, gen).cpu())
        n += len(batch.x)
    if not out:
        raise UserError("SAE: none of the training images could be read")
    return torch.cat(out), n


def _load(path, meta, n, m, k, device):
    """The SAE saved at ``path`` if its record is ``meta``: (sae on ``device``, info), else None."""
    if not os.path.isfile(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 -- unreadable: train anew and replace it
        return None
    if json.loads(saved["meta"]) != meta:
        return None
    sae = S.TopKSAE(n, m, k)
    sae.load_state_dict(saved["state_dict"])
    return sae.to(device).eval(), saved["info"]


def _train(vectors, m, settings):
    """Train the SAE on ``vectors`` (with a progress bar); returns (sae, losses, FVU on them, dead features)."""
    from tqdm import tqdm
    with tqdm(total=settings.sae_steps, desc="SAE training", unit="step", dynamic_ncols=True) as bar:
        sae, losses = S.train_sae(vectors, m, settings.sae_k, settings.sae_steps, settings.sae_batch_size,
                                  settings.sae_lr, settings.sae_seed, on_step=lambda _: bar.update())
    with torch.no_grad():
        active, parts = torch.zeros(m, device=vectors.device), []
        for v in vectors.split(8192):
            f = sae.encode(v)
            parts.append(sae.decode(f))
            active += (f > 0).sum(dim=0)
    return sae, losses, S.fraction_of_variance_unexplained(vectors, torch.cat(parts)), len(S.dead_features(active.cpu()))


def load_or_train(ctx, settings, device):
    """The SAE of these model, layer, training data and settings: reused from the store's SAE cache when its
    record matches, else trained and saved. Returns (sae on ``device``, info dict, path, reused)."""
    train_ds = folders.image_folder(settings.data_dir, "train", transform=folders.eval_transform(ctx.transform))
    meta, key = record_of(ctx, train_ds, settings.record())
    path = names.sae_cache(settings.store_dir, key)
    n, m = ctx.conv.in_channels, settings.sae_expansion * ctx.conv.in_channels
    for found in cache.candidates(path, settings.store_dir):  # the store's, else the user's cache folder's
        loaded = _load(found, meta, n, m, settings.sae_k, device)
        if loaded is not None:
            return loaded + (found, True)
    start = time.time()
    indices = (spectrum_images(train_ds, settings.sae_train_images) if settings.sae_train_images
               else list(range(len(train_ds))))
    vectors, n_images = collect_vectors(ctx.model.to(device), ctx.conv, train_ds, indices, settings, device)
    vectors = vectors.to(device)
    sae, losses, fvu, dead = _train(vectors, m, settings)
    info = {"train_images": n_images, "vectors": int(len(vectors)), "input_dim": n,
            "dictionary": m, "k": settings.sae_k, "final_loss": losses[-1],
            "loss_every_100_steps": losses[::100], "fvu_train": fvu, "dead_train": dead,
            "seconds": round(time.time() - start, 2), "device": str(device)}
    path = cache.write_path(path, settings.store_dir)  # a read-only store: the user's cache folder
    atomic.save_torch(path, {"meta": json.dumps(meta), "info": info,
                             "state_dict": {k: v.detach().cpu() for k, v in sae.state_dict().items()}})
    return sae, info, path, False


def _keep_top(best, sums, first, top):
    """Each feature's ``top`` largest activation sums so far: best (values (m, T), positions (m, T)) merged with a
    batch's sums (m, B) of the images at positions first .. first + B - 1."""
    ids = torch.arange(first, first + sums.shape[1]).expand(sums.shape[0], -1)
    v, j = torch.cat([best[0], sums], 1), torch.cat([best[1], ids], 1)
    keep = v.topk(min(top, v.shape[1]), dim=1)
    return keep.values, torch.gather(j, 1, keep.indices)


def scan(ctx, sae, channel, indices, settings):
    """On val images ``indices`` of ``ctx.dataset``: pos(a[c]) (N,), each feature's top --top_k images by its activation sum
    (values and positions in ``indices``, (m, T)), FVU of the reconstruction over all positions, and
    the count of positions where each feature fires (m,)."""
    conv = ctx.conv
    w = conv.weight[channel:channel + 1].detach()
    b = None if conv.bias is None else conv.bias[channel:channel + 1].detach()
    m = sae.W_dec.shape[1]
    pos_c, best = [], (torch.full((m, 0), -1.0), torch.zeros((m, 0), dtype=torch.long))
    err, s1, s2, count, seen = 0.0, 0, 0.0, 0, 0
    active = torch.zeros(m, dtype=torch.long)
    plan = image_scan.ScanPlan(ctx.dataset, settings.batch_size, ctx.device, default_workers(settings.num_workers),
                               settings.unreadable)
    sc = image_scan.scan(ctx.model, conv, plan, plan.batches(indices), desc="SAE view: val images")
    with torch.no_grad():
        for x in (batch.x for batch in sc):
            pos_c.append(positive_mass(filter_maps(x, conv, w, b))[:, 0].cpu())
            f = S.feature_maps(sae, x)
            err += float((x - S.reconstruction(sae, f)).double().pow(2).sum())
            xv = x.double().permute(0, 2, 3, 1).reshape(-1, x.shape[1])
            s1, s2, count = s1 + xv.sum(dim=0), s2 + float(xv.pow(2).sum()), count + len(xv)
            active += (f > 0).sum(dim=(0, 2, 3)).cpu()
            best = _keep_top(best, f.sum(dim=(2, 3)).T.cpu(), seen, settings.top_k)
            seen += len(x)
    if not pos_c:
        raise UserError(f"none of the {len(indices)} val images could be read")
    kept = np.asarray(sc.kept(indices))
    var = s2 - float((s1 * s1).sum()) / max(count, 1)
    return {"index": kept, "pos_channel": torch.cat(pos_c).numpy(), "feature_top_values": best[0].numpy(),
            "feature_top_images": kept[best[1].numpy()], "fvu": err / max(var, 1e-30), "active": active.numpy()}


def contributions_on(ctx, sae, channel, indices, settings):
    """On images ``indices`` of ``ctx.dataset``: pos(contribution_j) per image (N, m), pos(a[c]) (N,), pos of the constant term (N,) and the checks
    max |sum_j contribution_j + constant - conv(x_hat)[c]| and the channel map's FVU a[c] vs conv(x_hat)[c]."""
    conv = ctx.conv
    w_c = conv.weight[channel].detach()
    b_c = None if conv.bias is None else conv.bias[channel].detach()
    b_1 = None if b_c is None else b_c.reshape(1)
    pc, pa, pk, worst, errs, maps = [], [], [], 0.0, 0.0, []
    with torch.no_grad():
        plan = image_scan.ScanPlan(ctx.dataset, settings.batch_size, ctx.device, 0, "skip")
        for batch in image_scan.scan(ctx.model, conv, plan, plan.batches(indices)):
            x = batch.x
            f = S.feature_maps(sae, x)
            contrib = S.channel_contributions(f, conv, w_c, sae.W_dec)
            const = S.constant_term(conv, w_c, b_c, sae.b_dec, x.shape[-2:])
            a_c = filter_maps(x, conv, w_c[None], b_1)[:, 0]
            ah_c = filter_maps(S.reconstruction(sae, f), conv, w_c[None], b_1)[:, 0]
            worst = max(worst, float((contrib.sum(dim=1) + const - ah_c).abs().max()))
            errs += float((a_c - ah_c).double().pow(2).sum())
            maps.append(a_c.double().cpu())
            pc.append(positive_mass(contrib).cpu())
            pa.append(positive_mass(a_c[:, None])[:, 0].cpu())
            pk.append(positive_mass(const.expand(len(x), 1, -1, -1))[:, 0].cpu())
    allmaps = torch.cat(maps)
    return {"pos_contribution": torch.cat(pc).numpy(), "pos_channel": torch.cat(pa).numpy(),
            "pos_constant": torch.cat(pk).numpy(), "decomposition_max_error": worst,
            "channel_fvu": errs / max(float((allmaps - allmaps.mean()).pow(2).sum()), 1e-30)}


def _features(ds, sc, cb):
    """The listed features (those with the largest mean pos(contribution_j) > 0, at most LISTED), each with its
    share and top images; and each one's top images as dataset indices."""
    mean_contrib = cb["pos_contribution"].mean(axis=0)
    total = max(float(cb["pos_channel"].sum()), 1e-30)
    features, feature_images = [], {}
    for j in (int(j) for j in top_k(mean_contrib, LISTED) if mean_contrib[j] > 0):
        imgs = [int(i) for i, v in zip(sc["feature_top_images"][j], sc["feature_top_values"][j]) if v > 0]
        feature_images[j] = imgs
        features.append({"feature": j, "mean_pos_contribution": float(mean_contrib[j]),
                         "share": float(cb["pos_contribution"][:, j].sum() / total),
                         "top_images": [folders.relative_name(ds, i) for i in imgs],
                         "top_image_classes": [ds.classes[ds.targets[i]] for i in imgs],
                         "top_values": [float(v) for v in sc["feature_top_values"][j][:len(imgs)]]})
    return features, feature_images


def _figure(ctx, path, channel, rows, n_top, scope):
    """The contact sheet: rows of (label, dataset indices), the channel's top images first, then each listed
    feature's; ``n_top``: the channel's top images the shares are taken on."""
    from utils.report import plots
    ds = ctx.dataset
    rows = [(label, [(ds.samples[i][0], ds.classes[ds.targets[i]]) for i in imgs]) for label, imgs in rows]
    plots.contact_sheet(path, rows, title=f"{ctx.tag} {ctx.layer_path} channel {channel}: SAE features by share of "
                                          f"pos(channel) on its top {n_top} images ({scope}); each row its "
                                          f"top images", resize=ctx.transform.resize, crop_size=ctx.transform.crop)


def _print_view(record, channel, n_top, files):
    print(f"SAE: m = {record['dictionary']}, k = {record['k']}, FVU {record['fvu']:.3f} on {record['val_images']} "
          f"{record['scope']}, {record['dead_features']} dead features; channel {channel} on its top {n_top} images: "
          f"FVU of its map {record['channel_fvu_on_top_images']:.3f}")
    for ft in record["features"]:
        print(f"  feature {ft['feature']:>5}: share {ft['share']:6.1%}, mean pos contribution "
              f"{ft['mean_pos_contribution']:.4g}, top images: {', '.join(ft['top_image_classes'][:4])}")
    print(f"wrote {files['figure']} and {files['record']}")


def run_for_channel(ctx, settings, channel, classes, run_name, out_dir, trained=None):
    """Stage 4's --get_sae_view for one channel: the SAE (trained or reused), the features that drive the
    channel on its top val images (among those of ``classes``; None or ``settings.all_val``: all val images),
    the figure and ``results_disentanglement/{run}_sae_view.json``. trained: ``load_or_train``'s answer where
    the caller has it already (several jobs of one run), else None."""
    start = time.time()
    ds = ctx.dataset
    ctx.model.to(ctx.device)
    sae, info, path, reused = load_or_train(ctx, settings, ctx.device) if trained is None else trained
    print(f"SAE view: {'reusing' if reused else 'trained'} the SAE {path}")
    whole = settings.all_val or classes is None
    indices = list(range(len(ds))) if whole else folders.indices_of_classes(ds, classes)
    sc = scan(ctx, sae, channel, indices, settings)
    kept = sc["index"]
    top_images = [int(kept[i]) for i in top_k(sc["pos_channel"], TOP_OF_CHANNEL)]
    cb = contributions_on(ctx, sae, channel, top_images, settings)
    features, feature_images = _features(ds, sc, cb)
    dead = S.dead_features(sc["active"])
    scope = "all val images" if whole else "val images of the concepts"
    files = names.sae_view_files(out_dir, run_name)
    rows = [(f"channel {channel}", top_images[:settings.top_k])]
    rows += [(f"f{ft['feature']}: {ft['share']:.0%}", feature_images[ft["feature"]]) for ft in features]
    _figure(ctx, files["figure"], channel, rows, len(top_images), scope)
    record = {"model": ctx.model_spec, "layer": ctx.layer_path, "channel": channel, "sae": path, "sae_reused": reused,
              "settings": settings.record(), "training": info, "dictionary": sae.W_dec.shape[1], "k": settings.sae_k,
              "scope": scope, "val_images": int(len(kept)),
              "channel_top_images": [folders.relative_name(ds, i) for i in top_images],
              "fvu": sc["fvu"], "dead_features": len(dead), "dead_feature_ids": dead,
              "channel_fvu_on_top_images": cb["channel_fvu"], "decomposition_max_error": cb["decomposition_max_error"],
              "constant_term_share": float(cb["pos_constant"].sum() / max(float(cb["pos_channel"].sum()), 1e-30)),
              "contribution": "pos(conv(f_j, K_j)) = sum_{h,w} max(contribution_j, 0); share_j = sum over the channel's "
                              "top images of pos(contribution_j) / sum of pos(a[c])",
              "features": features, "figure": files["figure"], "seconds": round(time.time() - start, 2)}
    atomic.write_json(files["record"], record)
    _print_view(record, channel, len(top_images), files)
    return record
