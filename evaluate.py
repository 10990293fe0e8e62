"""How good are the samples? FID, KID and precision/recall in a small classifier's feature space.

    python evaluate.py runs/ddpm/samples.npz --dataset mnist   # seconds once the cache is warm
    python evaluate.py samples.npz --dataset mnist --json            # one JSON object, for scripts

SAMPLES.npz holds `arr_0`, uint8 images NHWC or NHW (as `np.savez(path, images, labels)` writes),
and optionally `arr_1`, one integer class label per image. Inception weights are a poor feature
space for 28x28 digits (and need a network), so the features are the 128-d penultimate layer of a
small CNN that trains itself on the training split the first time (seeded) and is cached under
--cache-dir.
Every figure is measured against the test split, next to the "floor": the same metric for 10,000
real training images, i.e. the best a perfect generator can hope for at that sample count.
"""
import argparse, contextlib, hashlib, io, json, math, os, sys, time
from pathlib import Path

import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from tqdm import tqdm

# %% Config
VERSION = 1            # bump when the model, recipe or features change: old caches then retrain
FEATURE_DIM = 128      # width of the penultimate layer, the feature space of every metric
# FID fits a 128-d Gaussian: its sample covariance has rank <= N-1, so it needs N > 128 samples.
# That is a floor, not a recommendation: FID is biased upwards at small N, compare at equal N.
MIN_SAMPLES = FEATURE_DIM + 1
FLOOR_SAMPLES = 10_000  # real training images for the floor: the usual number of samples
BATCH_SIZE = 500        # feature batches: memory stays flat for any sample count
# name: (torchvision class, image shape HWC, training epochs, where the files go). Two epochs give
# 99.2% on MNIST in about a minute on two CPU cores; CIFAR-10's 15 are untested (meant for a GPU).
DATASETS = {
    "mnist": ("MNIST", (28, 28, 1), 2, "DATA_DIR/MNIST/raw/"),
    "fashion-mnist": ("FashionMNIST", (28, 28, 1), 2, "DATA_DIR/FashionMNIST/raw/"),
    "cifar10": ("CIFAR10", (32, 32, 3), 15, "DATA_DIR/cifar-10-batches-py/"),
}
NUM_CLASSES = 10

class InputError(ValueError):
    """A mistake in the user's input: main() turns it into one line and exit code 2."""

def log(*args):
    print(*args, file=sys.stderr, flush=True)  # stdout is for the results (and --json) only

# %% Metrics
def fid(feats_a, feats_b):
    """Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017,
    https://arxiv.org/abs/1706.08500): |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    S_a S_b is not symmetric, but it is similar to sqrt(S_a) S_b sqrt(S_a), which is symmetric PSD,
    so tr (S_a S_b)^(1/2) = sum sqrt(eig(sqrt(S_a) S_b sqrt(S_a))): two eigh calls, no scipy.sqrtm.
    """
    # numpy, not torch: torch's float64 eigh was ten times slower here on the CPU
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # unbiased, as pytorch-fid
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(w.clip(min=0))) @ v.T  # clip: round-off makes zero eigenvalues -1e-17
    tr_sqrt = np.sqrt(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt)

def mmd2_unbiased(x, y):
    """Unbiased MMD^2 (Gretton et al. 2012, Lemma 6) with KID's cubic polynomial kernel
    k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018, https://arxiv.org/abs/1801.01401)."""
    d, m, n = x.shape[1], len(x), len(y)
    k_xx, k_yy, k_xy = [(p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y))]
    # i != j in the within-set sums: the diagonal k(x_i, x_i) makes the naive estimate biased
    return float((k_xx.sum() - k_xx.trace()) / (m * (m - 1))
                 + (k_yy.sum() - k_yy.trace()) / (n * (n - 1)) - 2 * k_xy.mean())

def kid(feats_a, feats_b, num_blocks=10, seed=0):
    """Kernel Inception Distance (Binkowski et al. 2018) and its standard error.

    Both sets are shuffled (samples saved class by class would otherwise give one-class blocks) and
    cut into num_blocks disjoint blocks; block i of a is paired with block i of b. The blocks share
    no samples, so the num_blocks unbiased MMD^2 estimates are independent and identically
    distributed: kid is their mean (itself unbiased) and kid_std = std / sqrt(num_blocks) is the
    standard error of that mean: a kid within two or three kid_std of 0 is indistinguishable from 0.
    """
    a, b = (torch.as_tensor(f, dtype=torch.float64) for f in (feats_a, feats_b))
    g = torch.Generator().manual_seed(seed)
    blocks_a = a[torch.randperm(len(a), generator=g)].tensor_split(num_blocks)
    blocks_b = b[torch.randperm(len(b), generator=g)].tensor_split(num_blocks)
    est = torch.tensor([mmd2_unbiased(x, y) for x, y in zip(blocks_a, blocks_b)]).double()
    return float(est.mean()), float(est.std() / math.sqrt(num_blocks))

def kth_neighbour_radii(feats, k=3, chunk=2**24):
    """Distance from each point to its k-th nearest neighbour in the same set, itself excluded."""
    rows = max(1, chunk // len(feats))  # a rows x N block of distances at a time, never 50k x 50k
    # the point itself is at distance 0, so sorted position k is the k-th *other* neighbour
    return torch.cat([torch.cdist(feats[i:i + rows], feats).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(feats), rows)])

def precision_recall(real_feats, fake_feats, k=3, chunk=2**24):
    """Improved precision and recall (Kynkaanniemi et al. 2019, https://arxiv.org/abs/1904.06991,
    Eqs. 1-2). Each set's manifold is the union of balls reaching each point's k-th neighbour.
    precision = share of fakes inside the real manifold (are samples realistic?),
    recall = share of reals inside the fake manifold (are all modes covered?).
    The radii shrink as a set grows, so compare sets of equal size, as the paper does.
    """
    real = torch.as_tensor(real_feats, dtype=torch.float32)
    fake = torch.as_tensor(fake_feats, dtype=torch.float32)
    radii_real, radii_fake = (kth_neighbour_radii(f, k, chunk) for f in (real, fake))
    fake_in_real = torch.zeros(len(fake), dtype=torch.bool)
    real_in_fake = torch.zeros(len(real), dtype=torch.bool)
    rows = max(1, chunk // len(real))
    for i in range(0, len(fake), rows):  # one pass over the fake x real distances serves both
        dist = torch.cdist(fake[i:i + rows], real)
        fake_in_real[i:i + rows] = (dist <= radii_real).any(dim=1)  # Eq. 1: inside some real ball
        real_in_fake |= (dist <= radii_fake[i:i + rows, None]).any(dim=0)
    return float(fake_in_real.double().mean()), float(real_in_fake.double().mean())

def all_metrics(real_feats, fake_feats, seed=0):
    """FID, KID and precision/recall of fake_feats against real_feats, as one dict."""
    real_feats, fake_feats = torch.as_tensor(real_feats), torch.as_tensor(fake_feats)
    kid_value, kid_std = kid(real_feats, fake_feats, seed=seed)
    # precision/recall on equal-sized seeded subsets: the k-NN radii depend on the set size
    g = torch.Generator().manual_seed(seed)
    n = min(len(real_feats), len(fake_feats))
    real_sub = real_feats[torch.randperm(len(real_feats), generator=g)[:n]]
    fake_sub = fake_feats[torch.randperm(len(fake_feats), generator=g)[:n]]
    precision, recall = precision_recall(real_sub, fake_sub)
    return {"fid": fid(real_feats, fake_feats), "kid": kid_value, "kid_std": kid_std,
            "precision": precision, "recall": recall}

# %% Model
class Classifier(nn.Module):
    """conv32-pool-conv64-pool-fc128 (`body`: the features), then fc10 (`head`: the logits)."""

    def __init__(self, channels=1, size=28, feature_dim=FEATURE_DIM, num_classes=NUM_CLASSES):
        super().__init__()
        # BatchNorm: reaches 99% on MNIST in two epochs, and keeps every feature unit alive
        # (without it, 57 of the 128 feature ReLUs died). It is also why eval mode matters below.
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, feature_dim),
            nn.BatchNorm1d(feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x):
        return self.head(self.body(x))

def to_input(images):
    """uint8 NHWC in [0, 255] -> float NCHW in [-1, 1], the scaling of the diffusion scripts."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1

@torch.no_grad()
def extract_features(model, images, device, batch_size=BATCH_SIZE):
    """Penultimate-layer features (N, 128) on the CPU, in fixed-size batches, with the model in
    eval mode (a network left in train mode is a classic way to break FID)."""
    model.eval()
    images = torch.as_tensor(images)
    return torch.cat([model.body(to_input(images[i:i + batch_size].to(device))).float().cpu()
                      for i in range(0, len(images), batch_size)])

@torch.no_grad()
def predict(model, feats, device):
    """Class predicted by the classifier's head for each feature vector."""
    return model.head(feats.to(device)).argmax(1).cpu()

# %% Data
def load_dataset(name, data_dir):
    """(train_images, train_labels, test_images, test_labels): uint8 NHWC and int64 tensors.
    Tries the files under data_dir first, then one download; an InputError says how to fix it."""
    import torchvision  # here, not at the top: `import evaluate` stays cheap for the scripts

    cls = getattr(torchvision.datasets, DATASETS[name][0])
    splits = []
    for train in (True, False):
        try:
            ds = cls(data_dir, train=train, download=False)
        except RuntimeError:  # torchvision's "Dataset not found": try the network once, quietly
            try:
                with contextlib.redirect_stdout(io.StringIO()), \
                        contextlib.redirect_stderr(io.StringIO()):
                    ds = cls(data_dir, train=train, download=True)
            except Exception:
                where = DATASETS[name][3].replace("DATA_DIR", str(data_dir))
                raise InputError(f"{name} is not under {data_dir} and could not be downloaded: "
                                 f"unpack its files into {where} or run once with a network")
        x = torch.as_tensor(np.asarray(ds.data))
        splits += [x if x.ndim == 4 else x[..., None], torch.as_tensor(ds.targets).long()]
    return tuple(splits)

def fingerprint(*tensors):
    """SHA-256 of the raw bytes: a cache trained on other data (or a new download) is noticed."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()

# %% Training
def train_classifier(images, labels, epochs, device, seed=0, batch_size=128, lr=1e-3):
    """A fixed, seeded recipe: Adam, learning rate decayed linearly to 0 over `epochs` epochs."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = Classifier(images.shape[3], images.shape[1]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(images) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    model.train()
    bar = tqdm(total=steps, desc="training classifier", file=sys.stderr)
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=g).split(batch_size):
            x, y = to_input(images[idx].to(device)), labels[idx].to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    bar.close()
    return model.eval()

def get_classifier(dataset="mnist", data_dir="data", cache_dir="runs/evaluate", device="cpu",
                   seed=0):
    """Load the cached classifier for this dataset, or train one and cache it.

    Returns a dict: model (eval mode), test_accuracy, ref_feats (features of the test split, the
    reference set), floor (all_metrics of FLOOR_SAMPLES seeded training images), trained (bool).
    The cache is retrained, saying why, if its version, dataset, seed or data fingerprint differ.
    """
    train_x, train_y, test_x, test_y = load_dataset(dataset, data_dir)
    data_hash = fingerprint(train_x, train_y, test_x, test_y)
    path = Path(cache_dir) / f"classifier_{dataset}.pt"
    expected = {"version": VERSION, "dataset": dataset, "seed": seed, "fingerprint": data_hash}
    if path.exists():
        try:
            cache = torch.load(path, map_location="cpu", weights_only=True)
            stale = [f"{k} {cache.get(k)!r} != {v!r}" for k, v in expected.items()
                     if cache.get(k) != v]
        except Exception as e:  # a truncated or foreign file: retrain rather than fail
            cache, stale = None, [f"unreadable ({type(e).__name__})"]
        if not stale:
            model = Classifier(train_x.shape[3], train_x.shape[1])
            model.load_state_dict(cache["model"])
            return {"model": model.to(device).eval(), "test_accuracy": cache["test_accuracy"],
                    "ref_feats": cache["ref_feats"], "floor": cache["floor"], "trained": False}
        log(f"retraining the classifier: cache {path} is stale ({'; '.join(stale)})")
    else:
        log(f"training the {dataset} classifier once (no cache at {path})")

    start = time.time()
    model = train_classifier(train_x, train_y, DATASETS[dataset][2], device, seed)
    train_secs = time.time() - start
    ref_feats = extract_features(model, test_x, device)
    test_accuracy = float((predict(model, ref_feats, device) == test_y).double().mean())
    g = torch.Generator().manual_seed(seed)
    floor_idx = torch.randperm(len(train_x), generator=g)[:FLOOR_SAMPLES]
    floor = all_metrics(ref_feats, extract_features(model, train_x[floor_idx], device), seed)
    floor["num_samples"] = len(floor_idx)
    log(f"classifier: test accuracy {test_accuracy:.4f}, trained in {train_secs:.0f} s; "
        f"floor FID {floor['fid']:.3f} ({len(floor_idx)} training images)")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({**expected, "model": model.state_dict(), "test_accuracy": test_accuracy,
                "ref_feats": ref_feats, "floor": floor}, tmp)
    os.replace(tmp, path)  # atomic: an interrupted run never leaves half a cache behind
    return {"model": model, "test_accuracy": test_accuracy, "ref_feats": ref_feats, "floor": floor,
            "trained": True}

# %% Evaluation
def check_samples(images, labels, dataset):
    """Validate user samples: uint8 NHWC (or NHW) of the dataset's shape, enough of them, labels
    integers in range, one per image. Returns (images NHWC, labels or None); raises InputError."""
    shape = DATASETS[dataset][1]
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise InputError(f"arr_0 has dtype {images.dtype}; expected uint8 images with values 0-255")
    if images.ndim == 3:
        images = images[..., None]  # NHW: one channel
    if images.ndim != 4 or images.shape[1:] != shape:
        raise InputError(f"arr_0 has shape {images.shape}; {dataset} needs images of "
                         f"{shape[0]}x{shape[1]}x{shape[2]} as (N, H, W, C)"
                         + (" or (N, H, W)" if shape[2] == 1 else ""))
    if len(images) < MIN_SAMPLES:
        raise InputError(f"arr_0 has {len(images)} images; the metrics need at least {MIN_SAMPLES} "
                         f"(more than the {FEATURE_DIM} feature dimensions); 10,000 is usual")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"arr_1 has dtype {labels.dtype}; expected integer class labels")
        if labels.shape != (len(images),):
            raise InputError(f"arr_1 has shape {labels.shape}; expected one label per image, "
                             f"({len(images)},)")
        if labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise InputError(f"arr_1 has labels from {labels.min()} to {labels.max()}; "
                             f"expected 0 to {NUM_CLASSES - 1}")
        labels = labels.astype(np.int64)
    return images, labels

def load_samples(path):
    """(arr_0, arr_1 or None) from an .npz file; raises InputError for anything unreadable."""
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    try:
        npz = np.load(path, allow_pickle=False)  # no pickles: an .npz must not run code
    except Exception as e:  # not a zip, truncated, ...
        raise InputError(f"cannot read {path} as .npz ({type(e).__name__}: {e})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise InputError(f"{path} holds one .npy array, not an .npz archive: save with np.savez")
    with npz:
        if "arr_0" not in npz.files:
            raise InputError(f"{path} has no arr_0 (it holds {', '.join(npz.files) or 'nothing'}); "
                             "save with np.savez(path, images) or np.savez(path, images, labels)")
        try:
            return npz["arr_0"], npz["arr_1"] if "arr_1" in npz.files else None
        except Exception as e:  # object arrays, corrupt members
            raise InputError(f"cannot read the arrays of {path} ({type(e).__name__}: {e})")

def evaluate_images(images, labels=None, dataset="mnist", data_dir="data",
                    cache_dir="runs/evaluate", device=None, seed=0):
    """All metrics for uint8 images (N, H, W, C) or (N, H, W), optionally with class labels.

    Returns a dict: fid, kid, kid_std, precision, recall (samples vs the test split), the same with
    a floor_ prefix (real training images vs the test split), classifier_accuracy (on the test
    split), num_samples, class_counts (classifier's predicted classes) and, with labels, accuracy
    (share of samples classified as their label) and class_accuracy (the same per label).
    """
    images, labels = check_samples(images, labels, dataset)
    device = torch.device(device or pick_device("auto"))
    clf = get_classifier(dataset, data_dir, cache_dir, device, seed)
    feats = extract_features(clf["model"], torch.from_numpy(images), device)
    pred = predict(clf["model"], feats, device)
    result = all_metrics(clf["ref_feats"], feats, seed)
    result |= {f"floor_{k}": v for k, v in clf["floor"].items()}
    result |= {"classifier_accuracy": clf["test_accuracy"], "num_samples": len(images),
               "class_counts": torch.bincount(pred, minlength=NUM_CLASSES).tolist()}
    if labels is not None:
        hit, lab = (pred.numpy() == labels), labels
        result["accuracy"] = float(hit.mean())
        result["class_accuracy"] = [float(hit[lab == c].mean()) if (lab == c).any() else None
                                    for c in range(NUM_CLASSES)]
    return result

# %% Main
def pick_device(name):
    """'auto' means cuda, then mps, then cpu; a forced device must exist."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
                 "cpu": True}
    if name == "auto":
        return next(d for d, ok in available.items() if ok)
    if not available[name]:
        raise InputError(f"--device {name}: no {name} device is available here")
    return name

def build_parser():
    p = argparse.ArgumentParser("evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message}\n")  # one line, not the usage
    p.add_argument("samples", metavar="SAMPLES.npz", help="arr_0: uint8 images NHWC or NHW; "
                   "optional arr_1: integer class labels, one per image")
    p.add_argument("--dataset", required=True, choices=list(DATASETS), help="what they imitate")
    p.add_argument("--data-dir", default="data", help="where torchvision finds (or downloads) it")
    p.add_argument("--cache-dir", default="runs/evaluate", help="where the classifier is cached")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                   help="auto: cuda, then mps, then cpu")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the classifier's training, the floor's images and KID's blocks "
                   "(a new seed retrains the cached classifier)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p

def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    start = time.time()
    try:
        device = pick_device(args.device)
        images, labels = check_samples(*load_samples(args.samples), args.dataset)  # before training
        r = evaluate_images(images, labels, args.dataset, args.data_dir, args.cache_dir, device,
                            args.seed)
    except InputError as e:
        parser.error(str(e))
    log(f"evaluated in {time.time() - start:.1f} s")
    if args.json:
        print(json.dumps(r))
        return r
    print(f"{args.samples}: {r['num_samples']} samples vs the {args.dataset} test split "
          f"(classifier test accuracy {r['classifier_accuracy']:.4f})")
    print(f"FID        {r['fid']:10.3f}   floor {r['floor_fid']:.3f} "
          f"({r['floor_num_samples']} real training images), FID/floor "
          f"{r['fid'] / r['floor_fid']:.1f}")
    print(f"KID        {r['kid']:10.5f} +- {r['kid_std']:.5f}   floor {r['floor_kid']:.5f} "
          f"+- {r['floor_kid_std']:.5f}")
    print(f"precision  {r['precision']:10.3f}   floor {r['floor_precision']:.3f}")
    print(f"recall     {r['recall']:10.3f}   floor {r['floor_recall']:.3f}")
    print("predicted  " + " ".join(f"{c}:{n}" for c, n in enumerate(r["class_counts"])))
    if labels is not None:
        print(f"accuracy   {r['accuracy']:10.4f}   (classified as their label; per label: "
              + " ".join(f"{c}:{a:.2f}" for c, a in enumerate(r["class_accuracy"])
                         if a is not None) + ")")
    return r


if __name__ == "__main__":
    main()
