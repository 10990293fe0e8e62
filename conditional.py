"""Class-conditional DDPM with classifier-free guidance (Ho & Salimans 2021,
https://arxiv.org/abs/2207.12598) on MNIST in one file.

    python conditional.py --dataset mnist     # CPU defaults: about 15-20 min on 2 cores
    python conditional.py --sample-only --ckpt runs/conditional/ckpt.pt --labels 3,3,7 --guidance 2
    python conditional.py --sweep --ckpt runs/conditional/ckpt.pt --sampling-steps 50    # w in {0, .., 4}
    torchrun --nproc_per_node 2 conditional.py --dataset mnist    # data-parallel, one process per GPU

Training is DDPM's Alg. 1 with the class label as a second input, replaced by a learned null class
with probability p_uncond (their Alg. 1); sampling is DDPM's Alg. 2 or DDIM with the guided noise
prediction of their Eq. 6 (their Alg. 2). Outputs go to runs/conditional/.
"""
# %% Config
import argparse
import contextlib
import copy
import io
import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from tqdm import tqdm

SCRIPT = "conditional"
# Defaults per device. CUDA: a 6.1M-parameter U-Net that sees 2.56M images (43 epochs of
# MNIST). CPU (and mps): a 0.64M-parameter U-Net, narrow at full resolution where
# convolutions cost most, that gives recognisable digits in about 15-20 minutes on 2 cores.
# Sampling there runs at 0.5-0.8 img/s (1000 steps); batches of 256 were no faster per image than 64.
PRESETS = {
    "cuda": dict(steps=10000, batch_size=256, lr=1e-3, base_channels=64, channel_mult="1,2,2",
                 num_res_blocks=2, log_every=100, sample_every=2000, ckpt_every=2000, sample_batch_size=1000),
    "cpu": dict(steps=3000, batch_size=64, lr=1e-3, base_channels=16, channel_mult="1,2,4",
                num_res_blocks=1, log_every=10, sample_every=1500, ckpt_every=500, sample_batch_size=64),
}
# A checkpoint resumes only under the same values of these flags.
RUN_FLAGS = ("dataset", "image_size", "base_channels", "channel_mult", "num_res_blocks",
             "schedule", "timesteps", "p_uncond")
GUIDANCE_SWEEP = (0.0, 0.5, 1.0, 2.0, 4.0)  # the w of the guidance strip and of --sweep
GRID_COLUMNS = 10  # samples per class in a grid row; save_grid shows as many rows
MIN_EVAL_SAMPLES = 129  # evaluate.py needs more samples than its 128 feature dimensions


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line that says what to fix, not the whole usage block.
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(preset):
    d = PRESETS[preset]
    both = lambda k: f"(default: {PRESETS['cuda'][k]} on CUDA, {PRESETS['cpu'][k]} otherwise)"
    p = Parser(prog=f"{SCRIPT}.py", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", default="mnist",
      help="mnist, fashion-mnist, cifar10, or a folder with one sub-folder of images per class")
    a("--data-dir", default="data", help="where torchvision datasets live or are downloaded")
    a("--image-size", type=int, default=None,
      help="side of the square images (default: 28 for (fashion-)mnist, 32 for cifar10, 64 for a folder)")
    a("--out-dir", default=f"runs/{SCRIPT}", help="checkpoint, sample grids and GIFs go here")
    a("--steps", type=int, default=d["steps"], help=f"training steps {both('steps')}")
    a("--batch-size", type=int, default=d["batch_size"],
      help=f"images per step and per process {both('batch_size')}")
    a("--lr", type=float, default=d["lr"], help=f"AdamW learning rate {both('lr')}")
    a("--warmup", type=int, default=200, help="steps of linear learning-rate warm-up")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (DDPM uses 1)")
    a("--ema-decay", type=float, default=0.999, help="decay of the EMA of the weights used to sample")
    a("--base-channels", type=int, default=d["base_channels"],
      help=f"U-Net width at full resolution, a multiple of 8 {both('base_channels')}")
    a("--channel-mult", default=d["channel_mult"],
      help=f"width multiplier per U-Net level, halving the image between levels {both('channel_mult')}")
    a("--num-res-blocks", type=int, default=d["num_res_blocks"],
      help=f"residual blocks per U-Net level {both('num_res_blocks')}")
    a("--timesteps", type=int, default=1000, help="T, the number of diffusion steps")
    a("--schedule", choices=["linear", "cosine"], default="linear",
      help="linear betas 1e-4..0.02 (DDPM) or cosine alpha_bar (Nichol & Dhariwal 2021)")
    a("--sigma", choices=["posterior", "beta"], default="posterior",
      help="sampler variance: sigma_t^2 = beta_tilde_t (posterior, Eq. 7) or beta_t (Sec. 3.2)")
    a("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto",
      help="auto picks cuda, then mps, then cpu")
    a("--seed", type=int, default=0, help="seeds the weights, the batches and the samples")
    a("--compile", action="store_true", help="torch.compile the U-Net for training")
    a("--resume", action="store_true", help="continue training from --ckpt")
    a("--sample-only", action="store_true", help="only sample from --ckpt; no dataset needed")
    a("--ckpt", default=None, help="checkpoint to write, resume or sample from (default: OUT_DIR/ckpt.pt)")
    a("--p-uncond", type=float, default=0.1,
      help="probability of training on the null class instead of the label (the paper's p_uncond)")
    a("--guidance", type=float, default=1.0,
      help="guidance strength w >= 0 of Eq. 6 (1 gave the best FID on MNIST); 0 is the unguided conditional model")
    a("--labels", default=None,
      help="classes to sample, e.g. 3,3,7 (default: --num-samples images cycling through the classes)")
    a("--sampling-steps", type=int, default=None,
      help="sample with S deterministic DDIM steps (Song et al. 2021) instead of all T steps of DDPM")
    a("--sweep", action="store_true",
      help=f"sample --sweep-samples images from --ckpt for each w in {GUIDANCE_SWEEP}, score them with "
           "evaluate.py (FID, KID, precision, recall, accuracy) and time them; writes sweep.txt and sweep.json")
    a("--sweep-samples", type=int, default=1000, help="images per w of --sweep")
    a("--num-samples", type=int, default=100, help="images in the final grid (and in --npz)")
    a("--npz", default=None,
      help="also save the samples as uint8 NHWC under arr_0 and their labels under arr_1 in this .npz")
    a("--sample-batch-size", type=int, default=d["sample_batch_size"],
      help=f"images per sampling batch {both('sample_batch_size')}")
    a("--log-every", type=int, default=d["log_every"], help=f"steps between log updates {both('log_every')}")
    a("--sample-every", type=int, default=d["sample_every"],
      help=f"steps between sample grids, 0 for none {both('sample_every')}")
    a("--ckpt-every", type=int, default=d["ckpt_every"],
      help=f"steps between checkpoints {both('ckpt_every')}")
    return p


def parse_args(argv=None):
    """Parse twice: the device decides which preset fills the defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default="auto")
    device = pre.parse_known_args(argv)[0].device
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    parser = build_parser("cuda" if cuda else "cpu")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "lr", "timesteps", "num_samples", "sample_batch_size",
                 "log_every", "ckpt_every", "base_channels", "num_res_blocks"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("warmup", "sample_every", "grad_clip"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if args.base_channels % 8:
        parser.error(f"--base-channels must be a multiple of 8 (GroupNorm uses 8 groups), got {args.base_channels}")
    if not 0 <= args.ema_decay < 1:
        parser.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    try:
        mult = [int(m) for m in args.channel_mult.split(",")]
        assert all(m > 0 for m in mult)
    except (ValueError, AssertionError):
        parser.error(f"--channel-mult must be positive integers like 1,2,2, got {args.channel_mult!r}")
    if args.image_size is not None:
        check_image_size(args.image_size, len(mult), parser)
    if Path(args.out_dir).is_file():  # checked now, not after hours of training
        parser.error(f"--out-dir {args.out_dir} is a file: pass a folder")
    if args.npz and Path(args.npz).is_dir():
        parser.error(f"--npz {args.npz} is a folder: pass a file name such as samples.npz")
    if not 0 <= args.p_uncond < 1:
        parser.error(f"--p-uncond must be in [0, 1), got {args.p_uncond}")
    if not args.guidance >= 0:
        parser.error(f"--guidance w must not be negative (w = 0 is the unguided conditional model), got {args.guidance}")
    if args.sampling_steps is not None and not 0 < args.sampling_steps <= args.timesteps:
        parser.error(f"--sampling-steps must be in 1..{args.timesteps} (--timesteps), got {args.sampling_steps}")
    if args.sweep and args.sweep_samples < MIN_EVAL_SAMPLES:
        parser.error(f"--sweep-samples {args.sweep_samples}: evaluate.py needs at least {MIN_EVAL_SAMPLES} per w")
    if args.labels is not None and not re.fullmatch(r"-?\d+(,-?\d+)*", args.labels):
        parser.error(f"--labels must be class numbers like 3,3,7, got {args.labels!r}")
    return args, parser


def check_image_size(size, levels, parser):
    factor = 2 ** (levels - 1)
    if size < factor or size % factor:
        parser.error(f"--image-size {size}: the U-Net halves it {levels - 1} times, so it must be a "
                     f"positive multiple of {factor} (28, 32 and 64 work with 3 levels)")


# %% Noise schedule
# Code index t = 0..T-1 is the paper's t = 1..T. Schedules are built in float64, then cast
# to float32 once; the sampler's update arithmetic stays in float32.

def make_betas(schedule, T):
    """beta_1..beta_T: DDPM's linear schedule (Sec. 4) or the cosine one (Nichol & Dhariwal 2021, Eq. 17)."""
    if schedule == "linear":
        scale = 1000 / T  # 1e-4..0.02 is tuned for T = 1000; scaling keeps alpha_bar_T near 0 for other T
        # For T < 50 the scaled betas would pass 1 (alpha_t < 0): clip them as the cosine ones are.
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64).clamp(max=0.999)
    s = 0.008  # small offset so that beta_1 is not vanishingly small (their Sec. 3.2)
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)  # clipped as in the paper, near t = T


def q_sample(x0, t, eps, alpha_bar):
    """Sample x_t ~ q(x_t | x_0) in closed form (DDPM Eq. 4): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    ab = alpha_bar[t].view(-1, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def q_posterior(x0, xt, t, betas, alpha_bar):
    """Mean and variance of q(x_{t-1} | x_t, x_0) (DDPM Eq. 6-7); the variance is beta_tilde_t."""
    ab = alpha_bar[t].view(-1, 1, 1, 1)
    ab_prev = torch.where(t > 0, alpha_bar[t - 1], torch.ones_like(alpha_bar[t])).view(-1, 1, 1, 1)
    beta = betas[t].view(-1, 1, 1, 1)
    mean = (ab_prev.sqrt() * beta / (1 - ab)) * x0 + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)) * xt
    return mean, beta * (1 - ab_prev) / (1 - ab)


# %% Model

def timestep_embedding(t, dim):
    """Sinusoidal embedding of the step (Transformer, Vaswani et al. 2017, Sec. 3.5), as in DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def group_norm(ch):
    return nn.GroupNorm(8, ch)  # DDPM has 32 groups; 8 suit these narrower layers


class ResBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and SiLU, the time embedding added in between."""

    def __init__(self, c_in, c_out, t_dim):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, c_out)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, t_emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(t_emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection
    (DDPM Appendix B puts it at the 16x16 level; here it sits at the lowest resolution)."""

    def __init__(self, ch, heads=4):
        super().__init__()
        self.norm, self.heads = group_norm(ch), heads
        self.qkv, self.out = nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, H*W, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    """eps_theta(x_t, t, c): the U-Net of DDPM (their Appendix B) in small. Residual blocks at each
    level, self-attention at the lowest resolution, skip connections from down to up path. The class
    c enters as a learned embedding added to the time embedding; index num_classes is the null
    class (no label), which makes the same network the unconditional model eps_theta(x_t, t)."""

    def __init__(self, channels=1, base=64, mult=(1, 2, 2), num_res_blocks=2, num_classes=10):
        super().__init__()
        self.base, t_dim = base, 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.class_emb = nn.Embedding(num_classes + 1, t_dim)  # the last row is the null class
        self.stem = nn.Conv2d(channels, base, 3, padding=1)
        self.down, skips, ch = nn.ModuleList(), [base], base
        for level, m in enumerate(mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, base * m, t_dim))
                ch = base * m
                skips.append(ch)
            if level < len(mult) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))  # halve H and W
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, t_dim), Attention(ch), ResBlock(ch, ch, t_dim)])
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(ch + skips.pop(), base * m, t_dim))
                ch = base * m
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(ch, ch, 3, padding=1)))
        self.head = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)  # start at eps_theta = 0, as DDPM's code does
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x, t, y):
        """y: class indices (B,), or weights (B, num_classes + 1) that blend the class embeddings."""
        c_emb = self.class_emb(y) if y.dim() == 1 else y @ self.class_emb.weight
        t_emb = F.silu(self.time_mlp(timestep_embedding(t, self.base)) + c_emb)
        run = lambda layer, h: layer(h, t_emb) if isinstance(layer, ResBlock) else layer(h)
        h = self.stem(x)
        skips = [h]
        for layer in self.down:
            h = run(layer, h)
            skips.append(h)
        for layer in self.mid:
            h = run(layer, h)
        for layer in self.up:
            h = run(layer, torch.cat([h, skips.pop()], 1) if isinstance(layer, ResBlock) else h)
        return self.head(h)


def build_model(config, channels, num_classes):
    mult = tuple(int(m) for m in config["channel_mult"].split(","))
    return UNet(channels, config["base_channels"], mult, config["num_res_blocks"], num_classes)


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, for every parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


# %% Data
# name: (torchvision class, native image size, where torchvision looks for the files)
DATASETS = {"mnist": ("MNIST", 28, "MNIST/raw/"), "fashion-mnist": ("FashionMNIST", 28, "FashionMNIST/raw/"),
            "cifar10": ("CIFAR10", 32, "cifar-10-batches-py/")}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def default_image_size(dataset):
    return DATASETS[dataset][1] if dataset in DATASETS else 64


def load_images(dataset, data_dir, image_size):
    """The whole training set as one uint8 tensor (N, C, H, W) at image_size x image_size, its labels
    (N,) and the class names. Raises FileNotFoundError or ValueError with a message meant for the user."""
    if dataset in DATASETS:
        cls = getattr(torchvision.datasets, DATASETS[dataset][0])
        try:
            ds = cls(data_dir, train=True, download=False)
        except RuntimeError:  # not on disk: try to download, quietly
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    ds = cls(data_dir, train=True, download=True)
            except Exception as e:
                raise FileNotFoundError(
                    f"{dataset} is not in {data_dir}/ and could not be downloaded ({type(e).__name__}): "
                    f"put its files in {Path(data_dir) / DATASETS[dataset][2]} or run once with a network") from None
        x = torch.as_tensor(ds.data)
        x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, H, W) or CIFAR's (N, H, W, C)
        if x.shape[-1] != image_size:
            x = F.interpolate(x.float(), size=(image_size, image_size), mode="bilinear", antialias=True)
            x = x.round().clamp(0, 255).to(torch.uint8)
        return x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long), list(ds.classes)
    folder = Path(dataset)
    if not folder.is_dir():
        if os.sep in dataset or "." in dataset or folder.exists():
            raise FileNotFoundError(f"--dataset {dataset}: no such folder")
        raise ValueError(f"unknown dataset {dataset!r}: use mnist, fashion-mnist, cifar10 or a folder of images")
    # One sub-folder per class, as torchvision's ImageFolder reads them; images are searched recursively.
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"--dataset {dataset}: no class sub-folders; put the images of each class in "
                         f"their own sub-folder ({dataset}/CLASS/*.png)")
    labelled = [(f, c) for c, name in enumerate(classes) for f in sorted((folder / name).rglob("*"))
                if f.suffix.lower() in IMAGE_SUFFIXES]
    files = [f for f, _ in labelled]
    if not files:
        raise FileNotFoundError(f"--dataset {dataset}: the folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    prep = torchvision.transforms.Compose([  # shorter side to image_size, then the central square
        torchvision.transforms.Resize(image_size), torchvision.transforms.CenterCrop(image_size),
        torchvision.transforms.PILToTensor()])
    images = []
    for f in tqdm(files, desc=f"reading {folder}", leave=False, disable=len(files) < 1000):
        try:
            images.append(prep(Image.open(f).convert("RGB")))
        except OSError as e:
            raise ValueError(f"cannot read image {f}: {e}") from None
    return torch.stack(images), torch.tensor([c for _, c in labelled]), classes


def get_batch(data, labels, batch_size, generator):
    """A random batch from the uint8 tensor on the device, scaled to [-1, 1] (DDPM Sec. 3.3), and its labels."""
    idx = torch.randint(len(data), (batch_size,), device=data.device, generator=generator)
    return data[idx].float() / 127.5 - 1, labels[idx]


# %% Training

def drop_labels(y, p_uncond, null_class, generator):
    """Each label independently replaced by the null class with probability p_uncond (Ho & Salimans
    Alg. 1 line 3): one network learns both eps(x, c) and the unconditional eps(x, null)."""
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p_uncond
    return torch.where(drop, torch.full_like(y, null_class), y)


def loss_fn(model, x0, t, y, eps, alpha_bar):
    """L_simple (DDPM Eq. 14, Alg. 1 line 5): || eps - eps_theta(sqrt(ab) x_0 + sqrt(1 - ab) eps, t, c) ||^2."""
    return F.mse_loss(model(q_sample(x0, t, eps, alpha_bar), t, y).float(), eps)


def save_checkpoint(path, state):
    """Write to a temporary file, then rename it: an interrupted write never leaves a broken file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, scripts=(SCRIPT,)):
    """A checkpoint dict, read without executing code from the file (weights_only=True).
    Raises FileNotFoundError or ValueError with a message meant for the user."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train one first, or pass --ckpt PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}, it is corrupt or truncated ({type(e).__name__}): "
                         f"use another --ckpt") from None
    if not isinstance(ckpt, dict) or ckpt.get("script") not in scripts:
        found = ckpt.get("script") if isinstance(ckpt, dict) else None
        raise ValueError(f"{path} is not a checkpoint of {' or '.join(s + '.py' for s in scripts)} "
                         f"(it says {found!r}): pass one written by this script")
    missing = {"config", "step", "image_shape", "classes", "num_classes", "model", "ema", "opt"} - ckpt.keys()
    if missing:
        raise ValueError(f"{path} lacks {', '.join(sorted(missing))}: it is damaged, use another --ckpt")
    return ckpt


def train(args, model, ema, opt, data, labels, classes, betas, alpha_bar, start_step, ckpt_path, rank, world):
    """Alg. 1, repeated: sample x_0, c, t, eps; drop c; take a gradient step on L_simple; update the EMA."""
    device = data.device
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    net = torch.compile(net) if args.compile else net
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    gen = torch.Generator(device)
    stop = []  # a Ctrl-C sets this; the loop then checkpoints at the next log step and exits
    previous_handler = signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    bar = tqdm(total=args.steps, initial=start_step, disable=rank != 0, unit="step", dynamic_ncols=True)
    losses, t_log, t_start, step = [], time.perf_counter(), time.perf_counter(), start_step
    try:
        for step in range(start_step + 1, args.steps + 1):  # step counts completed updates, 1-based
            # Each step seeds its own generator from (seed, step, rank): a resumed run draws the very
            # batches and noise an uninterrupted one would, so the checkpoint needs no RNG state.
            gen.manual_seed((args.seed << 32) + step * world + rank)
            x0, y = get_batch(data, labels, args.batch_size, gen)
            t = torch.randint(len(betas), (args.batch_size,), device=device, generator=gen)
            eps = torch.randn(x0.shape, device=device, generator=gen)
            y = drop_labels(y, args.p_uncond, len(classes), gen)
            for group in opt.param_groups:  # linear warm-up (DDPM warms up over 5000 steps)
                group["lr"] = args.lr * min(1.0, step / max(1, args.warmup))
            with autocast:
                loss = loss_fn(net, x0, t, y, eps, alpha_bar)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            # Early on the average would be dominated by the random initial weights, so the decay
            # ramps up as (1 + n) / (10 + n), as in tf.train.ExponentialMovingAverage.
            ema_update(ema, model, min(args.ema_decay, step / (step + 9)))
            losses.append(loss.detach())
            bar.update()
            if step % args.log_every and step != args.steps:
                continue
            # Log step: the one place the loop waits for the GPU. Nothing is saved unless the
            # losses of the interval and the weights are finite.
            interval = torch.stack(losses).cpu()
            finite = torch.isfinite(interval)
            weights_ok = torch.stack([p.isfinite().all() for p in model.parameters()]).all().item()
            flags = torch.tensor([float(bool(stop)), float(not (finite.all() and weights_ok))], device=device)
            if world > 1:  # every replica must stop at the same step
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            if flags[1]:
                bad = step - len(interval) + 1 + int((~finite).nonzero()[0]) if not finite.all() else step
                sys.exit(f"{SCRIPT}.py: the loss became non-finite at step {bad}; stopped. The last good "
                         f"checkpoint ({ckpt_path}) is kept: resume it with a lower --lr.")
            now = time.perf_counter()
            img_s = len(interval) * args.batch_size * world / (now - t_log)
            bar.set_postfix(loss=f"{interval.mean():.4f}", img_s=f"{img_s:.0f}")
            if rank == 0 and (step % args.ckpt_every == 0 or step == args.steps or flags[0]):
                save_checkpoint(ckpt_path, {
                    "script": SCRIPT, "config": vars(args), "step": step, "image_shape": list(data.shape[1:]),
                    "classes": classes, "num_classes": len(classes),
                    "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict()})
            if rank == 0 and args.sample_every and step % args.sample_every == 0 and step != args.steps:
                y = cycle_labels(min(64, args.num_samples), len(classes), device)
                images, _ = generate(ema, y, args.guidance, data.shape[1:], betas, alpha_bar, args.sigma, args.seed,
                                     args.sample_batch_size, args.sampling_steps, progress=False)
                save_grid(class_grid(images, y.cpu()), Path(args.out_dir) / f"samples_{step:06d}.png", GRID_COLUMNS)
            losses, t_log = [], time.perf_counter()  # img/s counts training, not the saving above
            if flags[0]:
                break
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous_handler)
    wall = time.perf_counter() - t_start
    return step, wall, bool(stop)


# %% Sampling

@torch.no_grad()
def p_sample_step(xt, t, eps_pred, z, betas, alpha_bar, sigma="posterior", clip_x0=True):
    """One step of DDPM Alg. 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z, with mu_theta the posterior
    mean (Eq. 7) at x_0 predicted from eps (Eq. 4 inverted). Unclipped, this mean is Eq. 11:
    1 / sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_pred)."""
    ab = alpha_bar[t].view(-1, 1, 1, 1)
    x0_pred = (xt - (1 - ab).sqrt() * eps_pred) / ab.sqrt()
    if clip_x0:  # the data lie in [-1, 1]; DDPM's released code clips here too
        x0_pred = x0_pred.clamp(-1, 1)
    mean, var = q_posterior(x0_pred, xt, t, betas, alpha_bar)
    if sigma == "beta":  # sigma_t^2 = beta_t: the other choice of Sec. 3.2, about as good
        var = betas[t].view(-1, 1, 1, 1)
    not_last = (t > 0).float().view(-1, 1, 1, 1)  # Alg. 2 line 4: no noise at the last step
    return mean + not_last * var.sqrt() * z


@torch.no_grad()
def p_sample_loop(model, shape, betas, alpha_bar, sigma="posterior", generator=None, n_frames=0, clip_x0=True,
                  desc=None):
    """DDPM Alg. 2: x_T ~ N(0, I), then T steps down to x_0. Returns x_0 and n_frames x_t along the way;
    with desc, a progress bar of that name."""
    device = betas.device
    x = torch.randn(shape, device=device, generator=generator)
    keep = set(torch.linspace(0, len(betas) - 1, n_frames).round().long().tolist()) if n_frames else set()
    frames = []
    for i in tqdm(reversed(range(len(betas))), desc=desc, total=len(betas), disable=desc is None, leave=False):
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            eps_pred = model(x, t)
        z = torch.randn(shape, device=device, generator=generator)
        x = p_sample_step(x, t, eps_pred.float(), z, betas, alpha_bar, sigma, clip_x0)
        if i in keep:
            frames.append(x.clamp(-1, 1).cpu())
    return x, frames


def sampling_timesteps(T, S, spacing="uniform"):
    """tau_1 < ... < tau_S: the sub-sequence of the T training steps that DDIM visits (Sec. 4.2),
    as code indices ending at T - 1, so sampling starts from the noisiest step. Uniform spacing puts
    tau_i near i T / S, quadratic near (i / S)^2 T, denser close to the data (their App. D.2)."""
    i = torch.arange(1, S + 1, dtype=torch.float64)
    frac = i / S if spacing == "uniform" else (i / S) ** 2
    tau = (frac * T).round().long() - 1
    return torch.maximum(tau, i.long() - 1)  # quadratic spacing would repeat steps near 0: keep them apart


def ddim_sigma(ab, ab_prev, eta):
    """sigma(eta) of DDIM Eq. 16: eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev). eta = 1 is DDPM's
    posterior standard deviation (sqrt(beta_tilde_t) for consecutive steps), eta = 0 a deterministic sampler."""
    return eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()


@torch.no_grad()
def ddim_step(xt, eps_pred, ab, ab_prev, sigma, z, clip_x0=True):
    """DDIM Eq. 12, from a step with alpha_bar = ab to one with ab_prev (1 for the data itself):
    x_prev = sqrt(ab_prev) x0_pred + sqrt(1 - ab_prev - sigma^2) eps_pred + sigma z.
    Beware: DDIM's alpha_t is DDPM's alpha_bar_t; this code uses DDPM's names throughout."""
    x0_pred = (xt - (1 - ab).sqrt() * eps_pred) / ab.sqrt()  # the "predicted x_0" of Eq. 12 (Eq. 9)
    if clip_x0:  # as in ddpm.py; the noise is then the one that this clipped x_0 implies
        x0_pred = x0_pred.clamp(-1, 1)
        eps_pred = (xt - ab.sqrt() * x0_pred) / (1 - ab).sqrt()
    return ab_prev.sqrt() * x0_pred + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps_pred + sigma * z


@torch.no_grad()
def ddim_sample_loop(model, x, alpha_bar, timesteps, eta=0.0, generator=None, n_frames=0, clip_x0=True,
                     desc=None):
    """DDIM sampling: from x = x_{tau_S} (pure noise to sample) down the sub-sequence `timesteps` to x_0,
    one Eq. 12 step each. Returns x_0 and n_frames x_tau along the way; with desc, a progress bar."""
    ts = timesteps.tolist()
    keep = set(torch.linspace(0, len(ts) - 1, n_frames).round().long().tolist()) if n_frames else set()
    frames = []
    for i in tqdm(reversed(range(len(ts))), desc=desc, total=len(ts), disable=desc is None, leave=False):
        t = torch.full((len(x),), ts[i], device=x.device, dtype=torch.long)
        with torch.autocast("cuda", torch.bfloat16, enabled=x.device.type == "cuda"):
            eps_pred = model(x, t)
        ab = alpha_bar[ts[i]]
        ab_prev = alpha_bar[ts[i - 1]] if i > 0 else torch.ones_like(ab)  # the last step lands on x_0
        z = torch.randn(x.shape, device=x.device, generator=generator)
        x = ddim_step(x, eps_pred.float(), ab, ab_prev, ddim_sigma(ab, ab_prev, eta), z, clip_x0)
        if i in keep:
            frames.append(x.clamp(-1, 1).cpu())
    return x, frames


def guided_eps(model, x, t, y, w, null_class):
    """Classifier-free guidance (Ho & Salimans Eq. 6): eps~ = (1 + w) eps(x_t, c) - w eps(x_t, null).
    Other libraries (GLIDE, diffusers' guidance_scale) write eps~ = eps_u + s (eps_c - eps_u): the same
    formula with s = 1 + w, so their s = 1 is w = 0 (no guidance) and s = 3 is w = 2. The conditional and
    unconditional predictions come from one forward pass over the doubled batch [x, x] with [c, null].
    y: class indices (B,), or class-embedding weights (B, num_classes + 1) for blends."""
    if y.dim() == 1:
        null = torch.full_like(y, null_class)
    else:
        null = F.one_hot(torch.full_like(y[:, 0], null_class, dtype=torch.long), y.shape[1]).to(y.dtype)
    eps_c, eps_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float().chunk(2)
    return (1 + w) * eps_c - w * eps_u


def generate(model, labels, w, image_shape, betas, alpha_bar, sigma, seed, batch_size, sampling_steps=None,
             n_frames=0, progress=True):
    """Samples of the given labels (class indices or embedding weights) as uint8 (n, C, H, W), guided with
    strength w, drawn in batches by DDPM's Alg. 2 or, with sampling_steps, deterministic DDIM (eta = 0);
    frames of the first batch for a GIF. One seed gives the same noise whatever w and the labels are."""
    device, n = betas.device, len(labels)
    gen = torch.Generator(device).manual_seed(seed)
    null_class = model.class_emb.num_embeddings - 1
    model.eval()
    out, frames = [], []
    for start in range(0, n, batch_size):
        desc = f"sampling {start // batch_size + 1}/{math.ceil(n / batch_size)}" if progress else None
        y = labels[start:start + batch_size].to(device)
        eps_model = lambda x, t: guided_eps(model, x, t, y, w, null_class)  # the sampler's model(x, t)
        shape, keep = (len(y), *image_shape), n_frames if start == 0 else 0
        if sampling_steps:
            x = torch.randn(shape, device=device, generator=gen)
            tau = sampling_timesteps(len(betas), sampling_steps)
            x, f = ddim_sample_loop(eps_model, x, alpha_bar, tau, 0.0, gen, keep, desc=desc)
        else:
            x, f = p_sample_loop(eps_model, shape, betas, alpha_bar, sigma, gen, keep, desc=desc)
        out.append(to_uint8(x))
        frames = frames or f
    model.train()
    return torch.cat(out), frames


def cycle_labels(n, num_classes, device="cpu"):
    """0, 1, .., num_classes - 1, 0, 1, ..: n labels with every class equally often."""
    return torch.arange(n, device=device) % num_classes


def blend_labels(pairs, lam, num_classes):
    """Class-embedding weights (len(pairs), num_classes + 1): 1 - lam of class a plus lam of class b."""
    a, b = torch.tensor(pairs).T
    y = torch.zeros(len(pairs), num_classes + 1)
    y[torch.arange(len(pairs)), a] = 1 - lam
    y[torch.arange(len(pairs)), b] += lam
    return y


def class_grid(images, labels, ncol=GRID_COLUMNS):
    """Up to ncol samples of each class present, one row per class (save_grid shows ncol rows), padded white."""
    rows = []
    for c in labels.unique()[:ncol]:
        row = images[labels == c][:ncol]
        rows += [row, torch.full((ncol - len(row), *row.shape[1:]), 255, dtype=torch.uint8)]
    return torch.cat(rows)


def to_uint8(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def save_grid(images, path, nrow=8):
    """A uint8 (N, C, H, W) batch as one PNG grid."""
    grid = torchvision.utils.make_grid(images[:nrow * nrow], nrow=nrow, pad_value=255)
    Image.fromarray(grid.permute(1, 2, 0).squeeze(-1).numpy()).save(path)


def save_gif(frames, path, nrow=8):
    """The reverse process x_T .. x_0 as an animated GIF, holding the last frame."""
    grids = [torchvision.utils.make_grid(to_uint8(f[:nrow * nrow]), nrow=nrow, pad_value=255) for f in frames]
    pics = [Image.fromarray(g.permute(1, 2, 0).squeeze(-1).numpy()) for g in grids]
    pics[0].save(path, save_all=True, append_images=pics[1:], duration=[80] * (len(pics) - 1) + [2000], loop=0)


def save_forward_strip(data, labels, alpha_bar, path, n=8, cols=10, seed=0):
    """Rows of real images noised by q(x_t | x_0) at cols evenly spaced t, from x_0 to x_T."""
    gen = torch.Generator(data.device).manual_seed(seed)
    x0, _ = get_batch(data, labels, n, gen)
    ts = torch.linspace(0, len(alpha_bar) - 1, cols).round().long().to(data.device)
    eps = torch.randn(x0.shape, device=data.device, generator=gen)
    xt = [q_sample(x0, t.repeat(n), eps, alpha_bar) for t in ts]
    save_grid(to_uint8(torch.stack(xt, 1).flatten(0, 1)), path, nrow=cols)


def write_samples(model, labels, image_shape, betas, alpha_bar, args, out_dir):
    """The final outputs: a grid with one row per class, a GIF of the reverse process, the guidance strip
    (one row per w in GUIDANCE_SWEEP, the same noise in each column), the class-mixing grid and, with
    --npz, the samples and their labels."""
    sample = lambda y, w, **kw: generate(model, y, w, image_shape, betas, alpha_bar, args.sigma, args.seed,
                                         args.sample_batch_size, args.sampling_steps, **kw)
    t0 = time.perf_counter()
    images, frames = sample(labels, args.guidance, n_frames=40)
    if betas.device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    save_grid(class_grid(images, labels), out_dir / "samples.png", nrow=GRID_COLUMNS)
    save_gif(frames, out_dir / "reverse.gif")
    num_classes = model.class_emb.num_embeddings - 1
    strip = [sample(cycle_labels(GRID_COLUMNS, num_classes), w, progress=False)[0] for w in GUIDANCE_SWEEP]
    save_grid(torch.cat(strip), out_dir / "guidance.png", nrow=GRID_COLUMNS)
    # Class mixing: row i blends the embedding of class a_i into that of class b_i, left to right, from one
    # noise per row; half-way the network sees an embedding it was never trained on (hybrid digits).
    pairs = [(c, (c + num_classes // 2) % num_classes) for c in range(min(num_classes // 2, GRID_COLUMNS))]
    if pairs:
        mix = [sample(blend_labels(pairs, lam, num_classes), args.guidance, progress=False)[0]
               for lam in torch.linspace(0, 1, GRID_COLUMNS).tolist()]
        save_grid(torch.stack(mix, 1).flatten(0, 1), out_dir / "mixing.png", nrow=GRID_COLUMNS)
    if args.npz:
        Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.npz, arr_0=images.permute(0, 2, 3, 1).numpy(), arr_1=labels.numpy())  # uint8 NHWC, labels
    where = f"{out_dir}/samples.png, reverse.gif, guidance.png" + (", mixing.png" if pairs else "")
    where += f", {args.npz}" if args.npz else ""
    print(f"sampled {len(labels)} images in {secs:.1f} s ({len(labels) / secs:.1f} img/s, "
          f"{sampler_name(args.sampling_steps, len(betas))}, w = {args.guidance:g}): {where}")


def sampler_name(sampling_steps, T):
    return f"DDIM {sampling_steps} steps" if sampling_steps else f"DDPM {T} steps"


def sweep(model, n, image_shape, betas, alpha_bar, args, dataset, out_dir):
    """FID, KID, precision, recall and label accuracy (evaluate.py) of n samples for each w in
    GUIDANCE_SWEEP, from the same noise and labels, as in Ho & Salimans Table 1. Printed and saved
    to OUT_DIR/sweep.txt and sweep.json."""
    import evaluate  # imported here: only --sweep needs evaluate.py

    labels, rows = cycle_labels(n, model.class_emb.num_embeddings - 1), []
    for w in GUIDANCE_SWEEP:
        t0 = time.perf_counter()
        images, _ = generate(model, labels, w, image_shape, betas, alpha_bar, args.sigma, args.seed,
                             args.sample_batch_size, args.sampling_steps, progress=False)
        if betas.device.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        r = evaluate.evaluate_images(images.permute(0, 2, 3, 1).numpy(), labels.numpy(), dataset,
                                     args.data_dir, device=betas.device.type)
        rows.append({"w": w, "s": 1 + w, **{k: r[k] for k in ("fid", "kid", "kid_std", "precision", "recall",
                     "accuracy")}, "seconds": secs, "img_s": n / secs})
        print(f"w = {w:g}: FID {r['fid']:.2f}, accuracy {r['accuracy']:.4f} ({secs:.0f} s)", flush=True)
    head = (f"{n} samples per w, {sampler_name(args.sampling_steps, len(betas))}, against the {dataset} test split "
            f"(FID of {r['floor_num_samples']} real training images: {r['floor_fid']:.2f})")
    lines = [head, "", "| w | s = 1 + w | FID | KID | precision | recall | accuracy | sampling s | img/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['w']:g} | {r['s']:g} | {r['fid']:.2f} | {r['kid']:.4f} | {r['precision']:.3f} | "
              f"{r['recall']:.3f} | {r['accuracy']:.4f} | {r['seconds']:.0f} | {r['img_s']:.2f} |" for r in rows]
    (out_dir / "sweep.txt").write_text("\n".join(lines) + "\n")
    gpu = f" ({torch.cuda.get_device_name(betas.device)})" if betas.device.type == "cuda" else ""
    (out_dir / "sweep.json").write_text(json.dumps({"samples_per_w": n, "sampler": sampler_name(
        args.sampling_steps, len(betas)), "dataset": dataset, "device": f"{betas.device}{gpu}", "rows": rows}, indent=1))
    print("\n".join(lines) + f"\nsaved {out_dir}/sweep.txt and sweep.json")
    return rows


# %% Main

def setup_device(args, parser):
    """The device (cuda, then mps, then cpu) and, under torchrun, the process group."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    kind = args.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible; use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        parser.error("--device mps: MPS is not available; use --device cpu")
    device = torch.device(kind, int(os.environ.get("LOCAL_RANK", 0))) if kind == "cuda" else torch.device(kind)
    if world > 1:
        if kind == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device, rank, world


def sample_labels(args, num_classes, parser):
    """The classes to sample: --labels, else --num-samples labels cycling through all classes."""
    if args.labels is None:
        return cycle_labels(args.num_samples, num_classes)
    labels = torch.tensor([int(c) for c in args.labels.split(",")])
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        parser.error(f"--labels: class {bad[0].item()} is out of range; this model has classes 0..{num_classes - 1}")
    return labels


def main(argv=None):
    """Train (or with --sample-only, sample); returns the EMA model."""
    args, parser = parse_args(argv)
    device, rank, world = setup_device(args, parser)
    out_dir = Path(args.out_dir)
    ckpt_path = Path(args.ckpt) if args.ckpt else out_dir / "ckpt.pt"
    ckpt, sampling = None, args.sample_only or args.sweep
    if sampling or args.resume:
        try:
            ckpt = load_checkpoint(ckpt_path)
        except (FileNotFoundError, ValueError) as e:
            parser.error(str(e))
    elif ckpt_path.exists():
        parser.error(f"{ckpt_path} exists: pass --resume to continue it, or a new --out-dir to start afresh")
    if args.resume:
        for flag in RUN_FLAGS:
            if ckpt["config"].get(flag) != getattr(args, flag):
                parser.error(f"{ckpt_path} was trained with --{flag.replace('_', '-')} {ckpt['config'].get(flag)}, "
                             f"not {getattr(args, flag)}: pass the same value to resume it")
    config = ckpt["config"] if sampling else vars(args)
    check_image_size(config["image_size"] or default_image_size(config["dataset"]),
                     len(config["channel_mult"].split(",")), parser)
    if (args.sampling_steps or 0) > config["timesteps"]:  # a checkpoint's T, not the --timesteps default
        parser.error(f"--sampling-steps {args.sampling_steps} is more than the model's T = {config['timesteps']} "
                     f"training steps: pick S from 1 to {config['timesteps']}")
    native = DATASETS[config["dataset"]][1] if config["dataset"] in DATASETS else None
    if args.sweep and (native is None or config["image_size"] not in (None, native)):
        parser.error(f"--sweep scores samples with evaluate.py, which knows {', '.join(DATASETS)} at their "
                     f"own image size; this model is of {config['dataset']} at {config['image_size']}")
    betas64 = make_betas(config["schedule"], config["timesteps"])
    betas, alpha_bar = betas64.float().to(device), torch.cumprod(1 - betas64, 0).float().to(device)

    if sampling:
        model = build_model(config, ckpt["image_shape"][0], ckpt["num_classes"]).to(device)
        try:
            model.load_state_dict(ckpt["ema"])
        except (KeyError, RuntimeError):
            parser.error(f"{ckpt_path}: its weights do not fit its own config; it is damaged, use another --ckpt")
        labels = sample_labels(args, ckpt["num_classes"], parser)
        out_dir.mkdir(parents=True, exist_ok=True)
        if args.sweep:
            sweep(model, args.sweep_samples, ckpt["image_shape"], betas, alpha_bar, args, config["dataset"], out_dir)
        else:
            write_samples(model, labels, ckpt["image_shape"], betas, alpha_bar, args, out_dir)
        return model

    size = args.image_size or default_image_size(args.dataset)
    try:
        data, labels, classes = load_images(args.dataset, args.data_dir, size)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    data, labels = data.to(device), labels.to(device)  # the whole set, on the device
    if ckpt and list(data.shape[1:]) != ckpt["image_shape"]:
        parser.error(f"{ckpt_path} was trained on {ckpt['image_shape']} images, this data is {list(data.shape[1:])}")
    if ckpt and classes != ckpt["classes"]:
        parser.error(f"{ckpt_path} was trained on the classes {ckpt['classes']}, this data has {classes}")
    sample_labels(args, len(classes), parser)  # checked now, not after training
    torch.manual_seed(args.seed)
    model = build_model(config, data.shape[1], len(classes)).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    start = 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if device.type != "cuda":
            print(f"no CUDA GPU: training on {device.type} with the small defaults (see --help for both sets)")
        print(f"{args.dataset}: {len(data)} images {tuple(data.shape[1:])}, {len(classes)} classes, on {device}; "
              f"U-Net of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
              f"steps {start}..{args.steps}, batch {args.batch_size} x {world} process(es)")
        save_forward_strip(data, labels, alpha_bar, out_dir / "forward.png", seed=args.seed)
    step, wall, interrupted = train(args, model, ema, opt, data, labels, classes, betas, alpha_bar, start, ckpt_path,
                                    rank, world)
    if rank == 0:
        n_img = (step - start) * args.batch_size * world
        print(f"{'stopped' if interrupted else 'trained'} at step {step}: {step - start} steps in "
              f"{wall / 60:.1f} min, {n_img / max(wall, 1e-9):.0f} img/s; checkpoint {ckpt_path}")
    if interrupted:
        sys.exit(130)  # the usual exit status after Ctrl-C
    if rank == 0:
        write_samples(ema, sample_labels(args, len(classes), parser), data.shape[1:], betas, alpha_bar, args, out_dir)
    if world > 1:
        dist.destroy_process_group()
    return ema


if __name__ == "__main__":
    main()
