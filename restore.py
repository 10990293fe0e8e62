"""Restoring images with a trained DDPM and no retraining, in one file: denoising (SDEdit, Meng et
al. 2022, https://arxiv.org/abs/2108.01073), inpainting (RePaint, Lugmayr et al. 2022,
https://arxiv.org/abs/2201.09865) and super-resolution (ILVR, Choi et al. 2021,
https://arxiv.org/abs/2108.02938).

    python restore.py                          # checkpoints/ddpm_mnist.pt on 10 MNIST test images
    python restore.py --tasks inpaint-left --num-images 100 --ckpt runs/ddpm/ckpt.pt

ddpm.py's unconditional model is a prior p(x_0). Each task runs its reverse process from what it
observes, and after every step makes x_s agree with the observation: nothing is trained. Why a
denoiser can do this is the score view: eps_theta(x_t, t) = -sqrt(1 - ab_t) grad log p_t(x_t)
(Song et al. 2021), so every step follows a learned score (see posterior_step). Outputs go to
runs/restore/, a grid per task: rows observed, restored, original. As a notebook, Run all restores.
"""
# %% Imports
import argparse, contextlib, io, math, os, re, signal, sys, tempfile, time
from pathlib import Path

import numpy as np, torch, torch.distributed as dist, torch.nn as nn, torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps
from tqdm import tqdm

SCRIPT = "restore"
# %% Noise schedule and forward process
# Code index t = 0..T-1 is the paper's t = 1..T. The schedule is built in float64 and cast to
# float32 once; the sampler's arithmetic stays in float32 even where the network runs in bf16.
def make_schedule(schedule, T):
    """beta_t, and alpha_bar_t = prod_{s <= t} alpha_s with alpha_t = 1 - beta_t (DDPM Eq. 4), in
    float64. alpha_t is what one step keeps of the signal, alpha_bar_t what is left of x_0 at t.
    DDPM's linear betas (Sec. 4) leave alpha_bar_T = 4e-5 at T = 1000: x_T is noise. The cosine
    schedule (Nichol & Dhariwal 2021, Eq. 17) sets alpha_bar_t itself, to fall slowly near both
    ends, where the linear one wastes its last steps on images that are noise already."""
    if schedule == "linear":
        scale = 1000 / T  # 1e-4..0.02 is tuned for T = 1000; scaling keeps alpha_bar_T near 0
        # For T < 50 the scaled betas would pass 1 (alpha_t < 0): clip them as the cosine ones are.
        betas = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64).clamp(max=0.999)
    else:
        s = 0.008  # small offset so that beta_1 is not vanishingly small (their Sec. 3.2)
        t = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)  # clipped as in the paper, near T
    alphas = 1 - betas
    return betas, torch.cumprod(alphas, 0)

def q_sample(x0, t, eps, alpha_bar):
    """Sample x_t ~ q(x_t | x_0) in closed form (Eq. 4): sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps."""
    ab = alpha_bar[t].view(-1, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps
# %% The network eps_theta
def timestep_embedding(t, dim):
    """Sinusoidal embedding of the step (Vaswani et al. 2017, Sec. 3.5), as in DDPM."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)

class ResBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and SiLU, the time embedding added in between. GroupNorm
    has 8 groups here: DDPM has 32, and 8 suit these narrower layers."""
    def __init__(self, c_in, c_out, t_dim):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
    def forward(self, x, t_emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time(t_emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))

class Attention(nn.Module):
    """Self-attention over the pixels of a feature map, with a residual connection (DDPM App. B
    puts it at the 16x16 level; here it sits at the lowest resolution)."""
    def __init__(self, ch, heads=4):
        super().__init__()
        self.norm = nn.GroupNorm(8, ch)
        self.attn = nn.MultiheadAttention(ch, heads, batch_first=True)
    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C): the pixels as a sequence
        h = self.attn(h, h, h, need_weights=False)[0]
        return x + h.transpose(1, 2).reshape(B, C, H, W)

class UNet(nn.Module):
    """eps_theta(x_t, t): the U-Net of DDPM (their Appendix B) in small. Residual blocks at each
    level, self-attention at the lowest resolution, skip connections from down to up path."""
    def __init__(self, channels=1, base=64, mult=(1, 2, 2), num_res_blocks=2):
        super().__init__()
        self.base, t_dim = base, 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.stem = nn.Conv2d(channels, base, 3, padding=1)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        ch, skips = base, [base]  # skips: the channels of each output kept for the up path
        for level, m in enumerate(mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, base * m, t_dim))
                ch = base * m
                skips.append(ch)
            if level < len(mult) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))  # halve H and W
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, t_dim), Attention(ch), ResBlock(ch, ch, t_dim)])
        for level, m in reversed(list(enumerate(mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(ch + skips.pop(), base * m, t_dim))
                ch = base * m
            if level > 0:  # forward() doubles H and W first, to the size of the skip
                self.up.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.head = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, channels, 3, 1, 1))
        nn.init.zeros_(self.head[-1].weight)  # eps_theta = 0 at the start, as in DDPM's code
        nn.init.zeros_(self.head[-1].bias)
    def forward(self, x, t):
        t_emb = F.silu(self.time_mlp(timestep_embedding(t, self.base)))
        h = self.stem(x)
        skips = [h]
        for layer in self.down:  # residual blocks, and convolutions that halve H and W
            h = layer(h, t_emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        block1, attention, block2 = self.mid
        h = block2(attention(block1(h, t_emb)), t_emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):  # each takes the skip of its twin on the way down
                h = layer(torch.cat([h, skips.pop()], 1), t_emb)
            else:  # double H and W to the next skip's size first, so odd sizes (7 from 14) work
                h = layer(F.interpolate(h, size=skips[-1].shape[-2:]))
        return self.head(h)

def build_model(config, channels):
    mult = tuple(int(m) for m in config["channel_mult"].split(","))
    return UNet(channels, config["base_channels"], mult, config["num_res_blocks"])
# %% Restoring: the reverse process, told what is observed
@torch.no_grad()
def posterior_step(xt, eps_pred, ab, ab_prev, z, clip_x0=True):
    """x_s ~ q(x_s | x_t, x_0 = x0_pred) for any s < t: DDPM's Eq. 6-7 across the skipped steps
    (DDIM's Eq. 12 at eta = 1); between neighbours it is Alg. 2. ab_prev = 1 lands on x0_pred.
    The score view (Song et al. 2021): with eps_theta = -sqrt(1 - ab_t) grad log p_t(x_t), the
    x0_pred below is Tweedie's E[x_0 | x_t] = (x_t + (1 - ab_t) grad log p_t(x_t)) / sqrt(ab_t)."""
    x0_pred = (xt - (1 - ab).sqrt() * eps_pred) / ab.sqrt()
    if clip_x0:  # the data lie in [-1, 1], as in ddpm.py
        x0_pred = x0_pred.clamp(-1, 1)
    a = ab / ab_prev  # alpha over the jump from t to s
    mean = (ab_prev.sqrt() * (1 - a) * x0_pred + a.sqrt() * (1 - ab_prev) * xt) / (1 - ab)
    return mean + ((1 - ab_prev) / (1 - ab) * (1 - a)).sqrt() * z

@torch.no_grad()
def restore(model, x, ts, alpha_bar, observe, generator=None, resample=1, clip_x0=True):
    """From x = x_{ts[0]} down the decreasing steps ts to x_0, each a posterior_step followed by
    observe(x_s, s), which makes x_s agree with the observation (s = -1: x_0 itself). resample > 1
    is RePaint's resampling (their Alg. 1, jump length 1): each step but the last is taken
    resample times, x_t drawn again from q(x_t | x_s) (Eq. 2 across the jump) in between, so that
    the model harmonises what it generates with what is replaced."""
    for i, t in enumerate(tqdm(ts, "restoring", leave=False)):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        ab, ab_prev = alpha_bar[t], alpha_bar[s] if s >= 0 else torch.ones_like(alpha_bar[t])
        for r in range(resample if s >= 0 else 1):
            if r:  # back up one jump: x_t ~ q(x_t | x_s)
                noise = torch.randn(x.shape, device=x.device, generator=generator)
                x = (ab / ab_prev).sqrt() * x + (1 - ab / ab_prev).sqrt() * noise
            step = torch.full((len(x),), t, device=x.device, dtype=torch.long)
            with torch.autocast("cuda", torch.bfloat16, enabled=x.device.type == "cuda"):
                eps_pred = model(x, step)
            z = torch.randn(x.shape, device=x.device, generator=generator)
            x = observe(posterior_step(x, eps_pred.float(), ab, ab_prev, z, clip_x0), s)
    return x

def noise_level_step(sigma, alpha_bar):
    """SDEdit's start for y = x_0 + sigma n: sqrt(ab_t) y = sqrt(ab_t) x_0 + sqrt(ab_t) sigma n is
    distributed as x_t (Eq. 4) when ab_t sigma^2 = 1 - ab_t, i.e. (1 - ab_t) / ab_t = sigma^2. The
    step whose noise-to-signal sqrt((1 - ab_t) / ab_t) (DDIM's sigma, Sec. 4.3) is nearest."""
    return int((((1 - alpha_bar) / alpha_bar).sqrt() - sigma).abs().argmin())

def agree(project, y, alpha_bar, generator=None):
    """observe(x_s, s) of inpainting and super-resolution alike: the part of x_s that the
    observation fixes, project(x_s), replaced by that part of y_s ~ q(y_s | y) (Eq. 4; y itself at
    the end). Inpainting projects onto the known pixels (RePaint Eq. 8), super-resolution onto
    the low frequencies (ILVR Eq. 5 with phi_N = low_pass)."""
    def observe(x, s):
        y_s = y if s < 0 else q_sample(y, torch.full((len(y),), s, device=y.device), torch.randn(
            y.shape, device=y.device, generator=generator), alpha_bar)
        return x - project(x) + project(y_s)
    return observe

def low_pass(x, factor):
    """ILVR's phi_N: the mean of each factor x factor block, spread over the block. A projection
    (low_pass(low_pass(x)) = low_pass(x)), so agree() fixes the low frequencies exactly."""
    return F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="nearest")

TASKS = ("denoise", "inpaint-center", "inpaint-left", "inpaint-random", "superres")
BASELINES = {"denoise": "the noisy image", "superres": "bilinear upsampling",
             "inpaint": "the hole filled by the mean of the known pixels"}
def make_mask(kind, x0, generator=None):
    """1 where a pixel is known: the centre square of half the side missing, the left half
    missing, or 75% of the pixels missing at random (a mask per image)."""
    m, (H, W) = torch.ones_like(x0[:, :1]), x0.shape[-2:]
    if kind == "center":
        m[..., H // 4:H - H // 4, W // 4:W - W // 4] = 0
    if kind == "left":
        m[..., :W // 2] = 0
    if kind == "random":
        m = (torch.rand(m.shape, device=m.device, generator=generator) < 0.25)
    return m.float()

def corrupt(task, x0, alpha_bar, sigma, scale, generator=None):
    """For clean x0 in [-1, 1]: (what is observed as a picture, the naive baseline, observe, the
    step to start from and x there). Denoising observes everything, through the noise."""
    T, noise = len(alpha_bar), torch.randn(x0.shape, device=x0.device, generator=generator)
    if task == "denoise":
        y, t = x0 + sigma * noise, noise_level_step(sigma, alpha_bar)
        return y, y, lambda x, s: x, t, alpha_bar[t].sqrt() * y
    if task == "superres":  # observed: the means of scale x scale blocks, a 7x7 image from 28x28
        up = lambda mode: F.interpolate(F.avg_pool2d(x0, scale), scale_factor=scale, mode=mode)
        y = up("nearest")  # the low-resolution image at full size: its own low_pass
        return y, up("bilinear"), agree(lambda x: low_pass(x, scale), y, alpha_bar, generator), \
            T - 1, noise
    m = make_mask(task.split("-")[1], x0, generator)  # inpainting
    fill = (m * x0).sum((1, 2, 3), keepdim=True) / (m.sum((1, 2, 3), keepdim=True) * x0.shape[1])
    y = m * x0 + (1 - m) * fill
    return y, y, agree(lambda x: m * x, m * x0, alpha_bar, generator), T - 1, noise

def run_task(model, images, task, alpha_bar, sigma=0.5, scale=4, steps=250, resample=1, seed=0,
             batch_size=100):
    """uint8 (N, C, H, W) clean images -> uint8 (observed, naive baseline, restored): corrupt, then
    restore on `steps` steps evenly spread over the T (fewer below SDEdit's start)."""
    gen, T, out = torch.Generator(alpha_bar.device).manual_seed(seed), len(alpha_bar), []
    grid_steps = torch.linspace(0, T - 1, steps).round().long().flip(0).tolist()
    for batch in images.split(batch_size):
        x0 = batch.to(alpha_bar.device).float() / 127.5 - 1
        shown, baseline, observe, t0, x = corrupt(task, x0, alpha_bar, sigma, scale, gen)
        ts = [t0] + [t for t in grid_steps if t < t0]
        restored = restore(model, x, ts, alpha_bar, observe, gen, resample)
        out.append([to_uint8(v) for v in (shown, baseline, restored)])
    return [torch.cat(v) for v in zip(*out)]

def psnr(a, b):
    """Peak signal-to-noise ratio in dB of uint8 images, averaged over the images."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return (10 * torch.log10(255 ** 2 / mse)).mean().item()
# %% Data
DATASETS = {"mnist": ("MNIST", 28, "MNIST/raw"), "cifar10": ("CIFAR10", 32, "cifar-10-batches-py"),
            "fashion-mnist": ("FashionMNIST", 28, "FashionMNIST/raw")}  # class, side, files
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
def load_test_images(dataset, data_dir, n, shape):
    """The first n test images of a torchvision dataset, or of a folder's images (sorted), as uint8
    (n, C, H, W) in the model's shape."""
    if dataset in DATASETS:
        name, _, where = DATASETS[dataset]
        try:  # torchvision downloads only what is not on disk; quietly, as offline it fails
            with contextlib.redirect_stdout(io.StringIO()):  # its messages go to stdout
                x = getattr(torchvision.datasets, name)(data_dir, train=False, download=True).data
        except Exception as e:
            raise FileNotFoundError(f"{dataset} is not in {data_dir} and could not be downloaded "
                                    f"({type(e).__name__}): put its files in {data_dir}/{where}")
        x = torch.as_tensor(x[:n])
        x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, H, W) or (N, H, W, C)
    elif not Path(dataset).is_dir():
        raise ValueError(f"--images {dataset}: neither a dataset ({', '.join(DATASETS)}) nor a "
                         "folder of images")
    else:
        files = [f for f in sorted(Path(dataset).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
        files = [f for f in files if f.is_file()][:n]
        if not files:
            raise ValueError(f"--images {dataset}: the folder holds no images of {IMAGE_SUFFIXES}")
        x = torch.as_tensor(np.stack([ImageOps.fit(read_image(f), shape[1:]) for f in files]))
        x = x.permute(0, 3, 1, 2)
    x = x.float().mean(1, keepdim=True) if shape[0] == 1 else x.float().expand(-1, shape[0], -1, -1)
    return F.interpolate(x, shape[1:], mode="bilinear", antialias=True).round().clamp(0, 255).byte()
def read_image(path):  # as RGB; 16-bit ones scaled to 8 bits (convert() would clip them to white)
    try:
        with Image.open(path) as img:
            if img.mode == "F":
                raise OSError("a float image has no agreed range; save 8 or 16 bit")
            if img.mode.startswith("I"):  # "I;16", "I;16B", or "I" as some readers give 16 bits
                img = Image.fromarray((np.asarray(img) / 257).clip(0, 255).astype(np.uint8))
            return img.convert("RGB")
    except (OSError, Image.DecompressionBombError) as e:  # a bomb: too many pixels to decode
        raise ValueError(f"cannot read image {path}: {e}") from None
# %% Pictures
def to_uint8(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
def grid(images, nrow=8):  # a uint8 (N, C, H, W) batch as one picture, nrow x nrow at most
    g = torchvision.utils.make_grid(images[:nrow * nrow], nrow=nrow, pad_value=255)
    return Image.fromarray(g.permute(1, 2, 0).squeeze(-1).numpy())
# %% Checkpoints
def load_checkpoint(path, scripts=(SCRIPT,), keys=("step", "image_shape", "ema"), resume=False):
    """A checkpoint dict, read without executing code from the file (weights_only=True)."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train one, or pass --ckpt PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {path}, it is corrupt or truncated ({type(e).__name__})")
    found = ckpt.get("script") if isinstance(ckpt, dict) else None
    if found not in scripts:
        raise ValueError(f"{path} is not a checkpoint of {' or '.join(s + '.py' for s in scripts)} "
                         f"(it says {found!r})")
    if resume and "opt" not in ckpt:  # checkpoints/ holds such ones: the EMA weights and config
        raise ValueError(f"{path} holds no optimizer state (a slim checkpoint, for sampling only)")
    needed = {"config", *keys, "model", "opt"} if resume else {"config", *keys}
    if needed - ckpt.keys():
        raise ValueError(f"{path} lacks {', '.join(sorted(needed - ckpt.keys()))}: it is damaged")
    shape = ckpt.get("image_shape", [1, 1, 1])
    if len(shape) != 3 or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(f"{path}: its image_shape {shape} is not (C, H, W): it is damaged")
    for key in ("ema", "model", "ae"):  # the networks' weights, wherever a checkpoint has them
        weights = ckpt.get(key, {})
        if not isinstance(weights, dict):
            raise ValueError(f"{path}: its {key} is not a state dict: it is damaged")
        for name, weight in weights.items():
            if not (weight.is_floating_point() and weight.isfinite().all()):
                raise ValueError(f"{path}: its weight {key}.{name} is not finite floats: damaged")
    return ckpt
def claim_outputs(out_dir, *files):
    """Before any work: each output's folder must take files, and out_dir is locked against a
    second run (a POSIX lock of this process, freed by the kernel when it ends, killed or not)."""
    try:
        for folder in (out_dir, *(Path(f).parent for f in files if f)):
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()  # read-only storage fails now, not later
        for f in files:
            if f and Path(f).is_dir():
                raise IsADirectoryError(0, "", f)
        lock = open(out_dir / ".lock", "w")
    except OSError as e:  # read-only storage, a file where a folder should be, or the reverse
        raise ValueError(f"cannot write {e.filename}: {e.strerror or 'it is a folder'}") from None
    if os.name == "posix":  # Windows has no fcntl, and so no lock
        import fcntl
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # NB: refuse at once, never wait
        except OSError:
            raise ValueError(f"{out_dir} is in use by another run: wait, or use another --out-dir")
    return lock
# %% Configuration and command line
def valid(kind, ok=lambda v: v > 0, what="positive"):
    """An argparse type= refusing what ok() does not take, and nan, inf or 1e39 (inf in float32)."""
    def parse(text):
        value = kind(text)
        if kind is float and math.isfinite(value) and abs(value) > torch.finfo(torch.float32).max:
            raise argparse.ArgumentTypeError(f"must fit float32 (at most 3.4e38), got {text}")
        if kind is float and not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the kind of a bad text: "invalid int value"
    return parse
POSITIVE = valid(int)
COUNT = valid(int, lambda v: v >= 0, "non-negative")
REAL = valid(float)
WIDTH = valid(int, lambda v: v > 0 and v % 8 == 0, "a positive multiple of 8 (GroupNorm: 8 groups)")
MULT = valid(str, lambda s: re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*", s), "positive integers, like 1,2")
FLAGS = {  # flag: (default, type or choices, help)
    "ckpt": ("checkpoints/ddpm_mnist.pt", str, "a checkpoint of ddpm.py (or ddim.py)"),
    "tasks": (",".join(TASKS), valid(str, lambda s: set(s.split(",")) <= set(TASKS),
              f"some of {','.join(TASKS)}"), "what to restore, comma-separated"),
    "noise_std": (0.5, REAL, "denoise: the noise's std, [-1, 1] scale (0.5: 64 of 255 levels)"),
    "scale": (4, POSITIVE, "superres: the factor per side (4: 7x7 to 28x28)"),
    "restore_steps": (None, POSITIVE, "reverse steps, spread evenly over the model's T (None: 250, "
                      "or T if fewer)"),
    "resample": (1, POSITIVE, "inpainting and superres: RePaint's resamplings per step (1: none)"),
    "images": (None, str, "a dataset or image folder (default: the checkpoint's, test split)"),
    "num_images": (10, POSITIVE, "images to restore per task"),
    "data_dir": ("data", str, "where torchvision datasets live or are downloaded"),
    "out_dir": (f"runs/{SCRIPT}", str, "a grid per task goes here"),
    "sample_batch_size": (100, POSITIVE, "images restored per batch"),
    "seed": (0, valid(int, lambda v: 0 <= v < 2**31, "in 0..2^31-1"), "seeds masks and noise"),
    "device": ("auto", ("auto", "cuda", "mps", "cpu"), "auto picks cuda, then mps, then cpu"),
}
def build_parser():  # a flag left out stays None until fill_flags gives it its default
    p = argparse.ArgumentParser(f"{SCRIPT}.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message}\n")  # one line, no usage
    for name, (default, kind, help) in FLAGS.items():
        shown = f"{default[0]} on CUDA, {default[1]} else" if type(default) is tuple else default
        how = {"type": kind}
        if type(kind) is tuple:
            how = {"choices": kind}
        if kind is None:  # a switch: --flag, or --flag/--no-flag where the default is a pair
            how = {"action": "store_true" if default is False else argparse.BooleanOptionalAction}
        p.add_argument("--" + name.replace("_", "-"), help=f"{help} (default: {shown})", **how)
    return p
# %% Main
def setup_device(name):  # cuda, then mps, then cpu, unless named; under torchrun, the group too
    found = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    found["cpu"] = True
    if name == "auto":
        name = next(d for d in found if found[d])
    if not found[name]:
        raise ValueError(f"--device {name}: no {name} device is visible; use cpu")
    device = torch.device(name, int(os.environ.get("LOCAL_RANK", 0)) if name == "cuda" else None)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # torchrun: a process per GPU (gloo on CPUs)
        if name == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if name == "cuda" else "gloo")
    return device
def save_png(picture, path):  # a temporary file, renamed: no write leaves a broken file
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.png")
    picture.save(tmp)
    os.replace(tmp, path)
def main(argv=None):  # restore test images with a ddpm.py model; returns {task: (PSNR, baseline's)}
    parser = build_parser()  # in a notebook sys.argv is the kernel's: Run all takes the defaults
    args = parser.parse_args([] if argv is None and "ipykernel" in sys.modules else argv)
    for name, (default, *_) in FLAGS.items():  # a flag left out takes its default
        if getattr(args, name) is None:
            setattr(args, name, default)
    try:  # each mistake of the user's ends here, in one line, before any work
        device = setup_device(args.device)
        tasks, out = args.tasks.split(","), Path(args.out_dir)
        ckpt = load_checkpoint(Path(args.ckpt), ("ddpm", "ddim"), keys=("image_shape", "ema"))
        config, shape = ckpt["config"], ckpt["image_shape"]
        C, H, W = shape
        if "superres" in tasks and (H % args.scale or W % args.scale or args.scale < 2):
            raise ValueError(f"--scale {args.scale} does not divide the model's {H}x{W} images "
                             f"into blocks: pick a divisor of {H} and {W} above 1")
        if any(t.startswith("inpaint") for t in tasks) and min(H, W) < 4:
            raise ValueError(f"the masks need images of at least 4x4, the model's are {H}x{W}")
        T = config["timesteps"]
        steps = args.restore_steps or min(250, T)
        if steps > T:
            raise ValueError(f"--restore-steps {steps} is more than the model's T = {T}")
        alpha_bar64 = make_schedule(config["schedule"], T)[1]  # [0]: the betas
        lock = claim_outputs(out, *(out / f"{task}.png" for task in tasks))  # held until the end
        images = load_test_images(args.images or config["dataset"], args.data_dir, args.num_images,
                                  shape)
        model = build_model(config, C).to(device)
        model.load_state_dict(ckpt["ema"])
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    except (KeyError, RuntimeError, TypeError):  # damaged, or edited by hand
        parser.error(f"{args.ckpt}: its weights do not fit its own config; it is damaged")
    alpha_bar, results = alpha_bar64.float().to(device), {}
    def on_sigterm(signum, frame):  # stop as Ctrl-C does
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        for task in tasks:
            t0 = time.time()
            shown, baseline, restored = run_task(model.eval(), images, task, alpha_bar,
                                                 args.noise_std, args.scale, steps, args.resample,
                                                 args.seed, args.sample_batch_size)
            n, path = min(10, len(images)), out / f"{task}.png"  # rows of up to 10 images
            rows = torch.cat([shown[:n], restored[:n], images[:n]])  # observed, restored, original
            picture = torchvision.utils.make_grid(rows, nrow=n, pad_value=255).permute(1, 2, 0)
            save_png(Image.fromarray(picture.squeeze(-1).numpy()), path)
            results[task] = psnr(restored, images), psnr(baseline, images)
            print(f"{task}: PSNR {results[task][0]:.2f} dB restored, {results[task][1]:.2f} dB for "
                  f"{BASELINES[task.split('-')[0]]}; {len(images)} images in "
                  f"{time.time() - t0:.1f} s, {path}")
    except KeyboardInterrupt:
        sys.exit(f"{SCRIPT}.py: stopped; the grids of the tasks that finished are in {out}")
    finally:
        signal.signal(signal.SIGTERM, previous)
    return results
if __name__ == "__main__":
    main()
