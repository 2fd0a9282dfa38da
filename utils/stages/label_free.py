"""Concepts without class labels (after PURE, Dreyer et al. 2024): cluster a channel's per-image ARVs.

The reference images of channel c are its top-N training images by summed activation
s_n = sum_{h,w} a_n[c,h,w] = sum_{k,i,j} W[c,k,i,j] P_n[k,i,j] + b[c] H' W' (closed form from the store's
patch sums P_n, no model pass). Their per-image ARVs r_n[k] = sum_{i,j} W[c,k,i,j] P_n[k,i,j] are
L1-normalised, r_n / sum_k |r_n[k]|, and clustered with k-means; each cluster is a concept, v_j = the mean
un-normalised ARV of its rows. A val image belongs to the concept whose centroid (in the L1-normalised
space) is nearest to its own normalised ARV.

The concepts file (``STORE/results_get_cosine_similarities/{model}_concepts_top{N}.json``) is
  {"fingerprint": {... the store's fingerprint ...}, "top_n": N, "k": "auto" or an int,
   "channels": {"<c>": {"channel": c, "k": k, "silhouette": s, "silhouette_by_k": {"2": s2, ...},
                        "sign": 1 or -1 (-1: a BatchNorm with a negative scale for c follows the layer,
                                         "top" = most negative s_n),
                        "top_rows": [store rows, strongest first],
                        "clusters": [{"rows": [store rows], "size": n,
                                      "centroid": [C_in floats, mean of the L1-normalised ARVs],
                                      "mean_arv": [C_in floats, v_j],
                                      "classes": {"class name": count, ...},
                                      "class_counts": [[class index, count], ...]}, ...]}}}

Added fields (beyond the schema above): per channel "summed_activations" (s_n of "top_rows", in order),
"purity" (fraction of the top-N images that belong to their cluster's most common class) and per
cluster "purity"; at the top level "model", "layer", "seed", "n_init", "ks", "batchnorm" and "sign_note".

The math of one channel is in utils/method/clustering.py.

How it runs (``discover``): one chunked pass over the patch sums scores every wanted channel at once
(a float32 matrix product per chunk, a running top-2N per channel); each channel's candidates are then
re-ranked exactly in float64 from their own rows, their ARVs computed, and k-means run on one thread
(scikit-learn on 100 points is dominated by per-call overhead, which threads only add to).
"""
import contextlib
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from utils.files import atomic, names, store
from utils.files.rows import chunks, gather_rows, read_rows
from utils.method.clustering import AUTO_KS, N_INIT, SEED, Clustering, TopImages, channel_record, exact_top_rows
from utils.method.similarities import DEFAULT_CHUNK_ROWS, SummedLayer, arv
from utils.model import loading
from utils.report import tables
from utils.errors import UserError
from utils.concepts import checks

POOL_FACTOR = 2     # the float32 screen keeps POOL_FACTOR * N rows per channel for the exact float64 ranking


# ---------------------------------------------------------------------------- summed activations, top rows

def candidate_rows(patch_sums, layer, pool, valid=None, chunk_rows=DEFAULT_CHUNK_ROWS, progress=False):
    """Running top-``pool`` rows of many channels at once by signed summed activation, one chunked pass.

    A float32 screen: each chunk's scores sign[c] * s[n, c] (one matrix product for all channels) are
    merged into the running top rows of each channel. ``exact_top_rows`` then ranks the candidates in
    float64, so the result does not depend on chunking or BLAS rounding unless float32's error exceeds
    the gap between the N-th and the pool-th score.
    patch_sums: (N, C_in, kh, kw) array-like (memory-mapped is fine, read with utils.files.rows.read_rows);
    layer: the ``SummedLayer`` of the channels wanted (weight (C, C_in, kh, kw); signs (C,) +1/-1 or None (+1);
    bias (C,) or None; positions; its affine is not read); valid: (N,) bool or None (False: row never chosen,
    e.g. unreadable images).
    Returns (C, pool) int64 store rows, best first; -1 where fewer than ``pool`` rows exist.
    """
    n = patch_sums.shape[0]
    W = torch.as_tensor(layer.weight).to(torch.float32).flatten(1)
    signs, bias = layer.signs, layer.bias
    sign = torch.ones(W.shape[0]) if signs is None else torch.as_tensor(signs).to(torch.float32)
    Ws = W * sign[:, None]
    shift = (torch.zeros(W.shape[0]) if bias is None else
             torch.as_tensor(bias).to(torch.float32) * layer.positions * sign)
    best = torch.full((W.shape[0], pool), -math.inf)
    rows = torch.full((W.shape[0], pool), -1, dtype=torch.int64)
    for lo, hi in tqdm(chunks(n, chunk_rows), desc="summed activations", disable=not progress, unit="chunk"):
        P = torch.from_numpy(np.array(read_rows(patch_sums, lo, hi), dtype=np.float32)).flatten(1)
        scores = torch.addmm(shift[:, None], Ws, P.T)  # (C, m)
        if valid is not None and not np.all(valid[lo:hi]):
            scores[:, ~torch.from_numpy(np.asarray(valid[lo:hi], dtype=bool))] = -math.inf
        top, at = scores.topk(min(pool, hi - lo), dim=1)  # the chunk's own best, then merged with the running ones
        best, idx = torch.cat([best, top], dim=1).topk(pool, dim=1)
        new = at.gather(1, (idx - pool).clamp_min(0)) + lo
        rows = torch.where(idx < pool, rows.gather(1, idx.clamp_max(pool - 1)), new)
    return torch.where(torch.isfinite(best), rows, torch.full_like(rows, -1))


# ---------------------------------------------------------------------------- many channels

@contextlib.contextmanager
def one_thread():
    """torch and the BLAS/OpenMP pools (scikit-learn's) on one thread for a block of tiny operations: on
    100 x 512 arrays threads only add waiting, much more so on a busy machine. Results do not change."""
    from threadpoolctl import threadpool_limits
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True, eq=False)
class TrainingRows:
    """The store's training images as the label-free concepts read them: patch_sums (N, C_in, kh, kw)
    array-like (memory-mapped is fine), labels (N,) ints (negative: row left out, ``Store.labels``) and
    class_names (the K class names the labels index)."""
    patch_sums: object
    labels: object
    class_names: list


def discover(store_rows, layer, channels, clustering=Clustering(), chunk_rows=DEFAULT_CHUNK_ROWS, progress=False,
             timings=None):
    """Label-free concepts of many channels from the store: one chunked pass, then per channel its top-N
    rows (exact float64 ranking), their per-image ARVs and the clustering.

    store_rows: ``TrainingRows`` (patch sums (N, C_in, kh, kw), labels (N,), class names); layer: the
    layer's ``SummedLayer`` (weight (C_out, C_in, kh, kw), bias (C_out,) or None, positions H' * W', signs
    (C_out,) +1/-1 or None); channels: list of channel indices; clustering: N (``top_n``), k, ks, seed.
    Returns {channel: channel_record(...)}.
    ``timings``: a dict to receive the wall and CPU seconds of the pass and of the per-channel part.
    """
    patch_sums, top_n = store_rows.patch_sums, clustering.top_n
    labels = np.asarray(store_rows.labels)
    valid = labels >= 0
    if top_n > int(valid.sum()):
        raise ValueError(f"top_n {top_n} exceeds the {int(valid.sum())} usable rows")
    mine = layer.channels(channels)
    W, b = mine.weight, mine.bias
    sg = torch.ones(len(channels)) if mine.signs is None else mine.signs.to(torch.float32)
    pool = min(POOL_FACTOR * top_n, int(valid.sum()))
    clock = [time.perf_counter(), time.process_time()]
    cand = candidate_rows(patch_sums, SummedLayer(W, b, layer.positions, signs=sg), pool, valid, chunk_rows,
                          progress)
    clock += [time.perf_counter(), time.process_time()]
    out = {}
    with one_thread():
        for i, c in enumerate(tqdm(channels, desc="clusters", disable=not progress, unit="ch")):
            rows = cand[i][cand[i] >= 0].numpy()
            P = gather_rows(patch_sums, rows)
            order, s = exact_top_rows(P, rows, W[i], top_n, int(sg[i]), None if b is None else b[i],
                                      layer.positions)
            top = rows[order.numpy()]
            arvs = arv(W[i], torch.from_numpy(P[order.numpy()]))
            out[int(c)] = channel_record(c, TopImages(top, s, arvs, labels[top]), store_rows.class_names,
                                         clustering, int(sg[i]))
    if timings is not None:
        clock += [time.perf_counter(), time.process_time()]
        timings.update(pass_s=clock[2] - clock[0], pass_cpu_s=clock[3] - clock[1],
                       per_channel_s=clock[4] - clock[2], per_channel_cpu_s=clock[5] - clock[3])
    return out


# ---------------------------------------------------------------------------- the stage: settings, run, concepts file

def parse_k(value):
    """--k: None for auto, else an int >= 2."""
    if str(value).lower() == "auto":
        return None
    try:
        k = int(value)
    except ValueError:
        raise UserError(f"--k {value}: give a number of concepts (2 or more) or auto")
    if k < 2:
        raise UserError(f"--k {k}: a channel is split into at least 2 concepts; give 2 or more, or auto")
    return k


def parse_channels(values, ctx):
    """--channels: sorted distinct channel indices, each checked against the layer (None: all channels)."""
    if values is None:
        return list(range(ctx.conv.out_channels))
    out = set()
    for v in values:
        for part in str(v).replace(",", " ").split():
            try:
                c = int(part)
            except ValueError:
                raise UserError(f"--channels: '{part}' is not a channel index")
            checks.check_channel(ctx, c, "--channels")
            out.add(c)
    if not out:
        raise UserError("--channels: give at least one channel index")
    return sorted(out)


@dataclass(frozen=True)
class Settings:
    """The label-free run's settings: the store, the channels asked for (as given: checked against the layer
    by ``parse_channels``), N, k (None: auto; the flag's text is read by ``parse_k``) and the rows read at a time
    (the flags: ``utils/run/flags.py``'s ``label_free``)."""
    store_dir: str
    channels: tuple = None
    top_n: int = 100
    k: int = None
    chunk_rows: int = DEFAULT_CHUNK_ROWS


def check_top_n(top_n, k, labels):
    """Refuse a --top_n the store cannot give (UserError); say how many rows are left out. labels: (N,)."""
    usable = int((labels >= 0).sum())
    if usable < len(labels):
        print(f"{len(labels) - usable} unreadable training images recorded by stage 1 are never chosen")
    need = 3 if k is None else k + 1  # the silhouette needs more images than clusters
    if not need <= top_n <= usable:
        raise UserError(f"--top_n {top_n}: give {need} to {usable} (the store has {usable} usable "
                            f"training images; {'--k auto' if k is None else f'--k {k}'} needs at least {need})")


def run(ctx, s):
    """--label_free: concepts of each channel without class labels, from the store of ``ctx`` only; printed and
    written into the concepts file (merged with an earlier run's other channels)."""
    channels = parse_channels(s.channels, ctx)
    st = store.Store.open(ctx.spec.store_folder, ctx.fingerprint)  # the folder context.setup found
    labels = st.labels()
    check_top_n(s.top_n, s.k, labels)
    signs, positions, bn = loading.layer_signs_and_positions(ctx.model, ctx.conv, loading.blank(ctx.transform.crop))
    bias = None if ctx.conv.bias is None else ctx.conv.bias.detach()
    recs = discover(TrainingRows(st.array("patch_sums"), labels, st.manifest["classes"]),
                    SummedLayer(ctx.conv.weight.detach(), bias, positions, signs=signs), channels,
                    Clustering(s.top_n, s.k), chunk_rows=s.chunk_rows, progress=True)
    note = tables.sign_note([c for c in channels if recs[c]["sign"] < 0], channels, bn)
    for c in channels:
        print("\n".join(tables.describe_channel(recs[c])))
    print(note)
    path = names.concepts_file(s.store_dir, ctx.name, s.top_n)
    doc = {"fingerprint": ctx.fingerprint, "top_n": s.top_n, "k": "auto" if s.k is None else s.k,
           "model": ctx.model_spec, "layer": ctx.layer_path, "seed": SEED, "n_init": N_INIT,
           "ks": list(AUTO_KS) if s.k is None else [s.k], "batchnorm": bn, "sign_note": note, "channels": {}}
    kept = earlier_channels(path, doc, ctx.fingerprint, recs)
    doc["channels"].update(kept)
    doc["channels"].update({str(c): recs[c] for c in channels})
    doc["channels"] = dict(sorted(doc["channels"].items(), key=lambda kv: int(kv[0])))
    atomic.write_json(path, doc, indent=1 if len(doc["channels"]) <= 64 else None)
    print(f"wrote {path} ({len(channels)} channels" + (f", and {len(kept)} kept from an earlier run" if kept else "")
          + ")")


def earlier_channels(path, doc, fingerprint, recs):
    """{"<c>": entry} of the concepts file at ``path`` that an earlier run with the same store and settings
    (``doc``'s top_n, k, seed, n_init, layer) wrote, for the channels not in ``recs``; {} for none, another
    store or settings, or an unreadable file."""
    if not os.path.isfile(path):
        return {}
    try:
        old = atomic.read_json(path)
    except ValueError:
        return {}
    same = all(old.get(key) == doc[key] for key in ("top_n", "k", "seed", "n_init", "layer")) and \
        isinstance(old.get("fingerprint"), dict) and \
        not store.describe_mismatch(old["fingerprint"], fingerprint, store.MATCH_KEYS)
    if not same:
        return {}
    return {key: v for key, v in old.get("channels", {}).items() if int(key) not in recs}
