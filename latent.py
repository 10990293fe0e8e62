"""Latent diffusion (Rombach et al. 2022, https://arxiv.org/abs/2112.10752) on MNIST in one file.

    python latent.py --dataset mnist            # CPU defaults: both stages in about 38 min on 2 cores (measured)
    python latent.py --sample-only --ckpt runs/latent/ckpt.pt --num-samples 64
    python latent.py --dataset mnist --ae-ckpt runs/latent/ae.pt --out-dir runs/latent2   # reuse stage 1

Stage 1 trains a KL-regularised autoencoder whose latents are f = 4 times smaller per side (Sec. 3.1);
stage 2 is ddpm.py's diffusion (Alg. 1 to train, DDIM or Alg. 2 to sample) on those latents, scaled
to unit variance (Sec. 4.3.2). Samples are decoded to images. Outputs go to runs/latent/.
"""
# %% Config
import argparse
import contextlib
import copy
import io
import math
import os
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

SCRIPT = "latent"
DOWNSAMPLE = 4  # f of Rombach et al.: two stride-2 convolutions, 28x28 images to 7x7 latents
# The default sampler is DDIM, as Rombach et al. sample theirs: on MNIST 200 steps at eta 1 scored as well
# as DDPM's 1000 (FID 3.88 against 3.96, README) in a fifth of the time.
DDIM_STEPS = 200
# Defaults per device. Stage 2's U-Net has a single level: MNIST's 7x7 latents cannot be halved
# evenly (7 is odd), and at 7x7 the self-attention in its middle already sees every position, so
# more levels buy little. CPU: both stages together took 38.0 min of training on 2 cores.
PRESETS = {
    "cuda": dict(steps=10000, batch_size=256, lr=1e-3, base_channels=128, channel_mult="1",
                 num_res_blocks=2, ae_steps=5000, ae_batch_size=128, ae_channels=64, log_every=100,
                 sample_every=2000, ckpt_every=2000, sample_batch_size=1000),
    "cpu": dict(steps=10000, batch_size=128, lr=1e-3, base_channels=64, channel_mult="1",
                num_res_blocks=1, ae_steps=5000, ae_batch_size=64, ae_channels=32,
                log_every=10, sample_every=4000, ckpt_every=500, sample_batch_size=250),
}
# A checkpoint resumes only under the same values of these flags.
RUN_FLAGS = ("dataset", "image_size", "base_channels", "channel_mult", "num_res_blocks",
             "schedule", "timesteps", "ae_channels", "latent_channels")


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
      help="mnist, fashion-mnist, cifar10, or a folder of images (any size, searched recursively)")
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
    a("--latent-channels", type=int, default=4, help="C: stage 1 turns C_img x H x W images into C x H/4 x W/4 latents")
    a("--ae-channels", type=int, default=d["ae_channels"],
      help=f"autoencoder width at full resolution, a multiple of 8 {both('ae_channels')}")
    a("--ae-steps", type=int, default=d["ae_steps"], help=f"stage 1: autoencoder training steps {both('ae_steps')}")
    a("--ae-batch-size", type=int, default=d["ae_batch_size"],
      help=f"stage 1: images per step and per process {both('ae_batch_size')}")
    a("--kl-weight", type=float, default=1e-6,
      help="weight of the KL term in stage 1's loss (Rombach et al.'s KL-reg autoencoders use 1e-6)")
    a("--ae-ckpt", default=None, help="reuse this trained autoencoder (OUT_DIR/ae.pt of an earlier run): no stage 1")
    a("--fid-samples", type=int, default=10000,
      help="reconstructions scored by evaluate.py's FID after stage 1 (at least 129), 0 for none")
    a("--timesteps", type=int, default=1000, help="T, the number of diffusion steps")
    a("--schedule", choices=["linear", "cosine"], default="linear",
      help="linear betas 1e-4..0.02 (DDPM) or cosine alpha_bar (Nichol & Dhariwal 2021)")
    a("--sigma", choices=["posterior", "beta"], default="posterior",
      help="DDPM sampler's variance (--sampling-steps 0): sigma_t^2 = beta_tilde_t (posterior, Eq. 7) or beta_t")
    a("--sampling-steps", type=int, default=None,
      help=f"S > 0: sample with S DDIM steps (Song et al. 2021); 0: the T steps of DDPM's Alg. 2 "
           f"(default: {DDIM_STEPS}, or T if smaller)")
    a("--eta", type=float, default=1.0,
      help="DDIM's eta: 0 is deterministic, 1 adds DDPM's posterior noise (default: 1, which scores better here)")
    a("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto",
      help="auto picks cuda, then mps, then cpu")
    a("--seed", type=int, default=0, help="seeds the weights, the batches and the samples")
    a("--compile", action="store_true", help="torch.compile the U-Net for training")
    a("--resume", action="store_true",
      help="continue training from --ckpt; keep --ae-steps, stage 1's learning rate decays over them")
    a("--sample-only", action="store_true", help="only sample from --ckpt; no dataset needed")
    a("--ckpt", default=None, help="stage 2's checkpoint to write, resume or sample from (default: OUT_DIR/ckpt.pt); "
      "it holds the autoencoder too. Stage 1's goes to OUT_DIR/ae.pt")
    a("--num-samples", type=int, default=64, help="images in the final grid (and in --npz)")
    a("--npz", default=None, help="also save the samples as uint8 NHWC under arr_0 in this .npz")
    a("--compare-ckpt", default=None,
      help="a ddpm.py checkpoint (runs/ddpm/ckpt.pt): time its U-Net here and print its figures next to these")
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
                 "log_every", "ckpt_every", "base_channels", "num_res_blocks", "latent_channels", "ae_channels",
                 "ae_steps", "ae_batch_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("warmup", "sample_every", "grad_clip", "kl_weight", "eta", "fid_samples", "sampling_steps"):
        if (getattr(args, name) or 0) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    for name in ("base_channels", "ae_channels"):
        if getattr(args, name) % 8:
            parser.error(f"--{name.replace('_', '-')} must be a multiple of 8 (GroupNorm uses 8 groups), "
                         f"got {getattr(args, name)}")
    if 0 < args.fid_samples < 129:
        parser.error(f"--fid-samples must be 0 or at least 129 (FID fits 128-d features), got {args.fid_samples}")
    if (args.sampling_steps or 0) > args.timesteps:
        parser.error(f"--sampling-steps {args.sampling_steps} exceeds --timesteps {args.timesteps}")
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
    return args, parser


def check_image_size(size, levels, parser):
    factor = DOWNSAMPLE * 2 ** (levels - 1)  # the autoencoder divides by f, the U-Net halves levels - 1 times
    if size < factor or size % factor:
        parser.error(f"--image-size {size}: the autoencoder divides it by {DOWNSAMPLE} and the U-Net halves it "
                     f"{levels - 1} times, so it must be a positive multiple of {factor} (28, 32 and 64 work "
                     f"with 1 level)")


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
    """eps_theta(x_t, t): the U-Net of DDPM (their Appendix B) in small. Residual blocks at each
    level, self-attention at the lowest resolution, skip connections from down to up path."""

    def __init__(self, channels=1, base=64, mult=(1, 2, 2), num_res_blocks=2):
        super().__init__()
        self.base, t_dim = base, 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
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

    def forward(self, x, t):
        t_emb = F.silu(self.time_mlp(timestep_embedding(t, self.base)))
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


def build_model(config, channels):
    mult = tuple(int(m) for m in config["channel_mult"].split(","))
    return UNet(channels, config["base_channels"], mult, config["num_res_blocks"])


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, for every parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def conv_block(c_in, c_out):
    return [group_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1)]


class Residual(nn.Module):
    """x + two conv_blocks: the U-Net's ResBlock without a time embedding. The autoencoder built of these
    reconstructs with an FID of 0.200 after its default 5,000 steps, where a plain stack of half its
    parameters reached 0.400 in as many (10,000 reconstructions, README)."""

    def __init__(self, ch):
        super().__init__()
        self.body = nn.Sequential(*conv_block(ch, ch), *conv_block(ch, ch))

    def forward(self, x):
        return x + self.body(x)


class Autoencoder(nn.Module):
    """Stage 1 (Rombach et al. Sec. 3.1 and App. G, KL-reg): the encoder maps x (C_img, H, W) to the
    mean and log-variance of a diagonal Gaussian q(z | x) over z (C, H/f, W/f), f = 4 from two stride-2
    convolutions; the decoder maps z back to x. Convolutions only: any H and W that f divides work."""

    def __init__(self, channels=1, base=32, latent_channels=4):
        super().__init__()
        b = base
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, b, 3, padding=1), Residual(b),
            nn.Conv2d(b, b, 3, stride=2, padding=1), *conv_block(b, 2 * b), Residual(2 * b),  # H/2
            nn.Conv2d(2 * b, 2 * b, 3, stride=2, padding=1), Residual(2 * b),  # H/4
            *conv_block(2 * b, 2 * latent_channels))  # mean and log-variance
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, 2 * b, 3, padding=1), Residual(2 * b), Residual(2 * b),
            nn.Upsample(scale_factor=2), *conv_block(2 * b, b), Residual(b),  # H/2
            nn.Upsample(scale_factor=2), Residual(b), *conv_block(b, channels))  # H

    def encode(self, x):
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)  # the clamp of the authors' DiagonalGaussianDistribution

    def decode(self, z):
        return self.decoder(z)


def build_autoencoder(config, channels):
    return Autoencoder(channels, config["ae_channels"], config["latent_channels"])


# %% Data
# name: (torchvision class, native image size, where torchvision looks for the files)
DATASETS = {"mnist": ("MNIST", 28, "MNIST/raw/"), "fashion-mnist": ("FashionMNIST", 28, "FashionMNIST/raw/"),
            "cifar10": ("CIFAR10", 32, "cifar-10-batches-py/")}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def default_image_size(dataset):
    return DATASETS[dataset][1] if dataset in DATASETS else 64


def load_images(dataset, data_dir, image_size):
    """The whole training set as one uint8 tensor (N, C, H, W) at image_size x image_size.
    Raises FileNotFoundError or ValueError with a message meant for the user."""
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
        return x.contiguous()
    folder = Path(dataset)
    if not folder.is_dir():
        if os.sep in dataset or "." in dataset or folder.exists():
            raise FileNotFoundError(f"--dataset {dataset}: no such folder")
        raise ValueError(f"unknown dataset {dataset!r}: use mnist, fashion-mnist, cifar10 or a folder of images")
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
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
    return torch.stack(images)


def get_batch(data, batch_size, generator):
    """A random batch from the uint8 tensor on the device, scaled to [-1, 1] (DDPM Sec. 3.3)."""
    idx = torch.randint(len(data), (batch_size,), device=data.device, generator=generator)
    return data[idx].float() / 127.5 - 1


@torch.no_grad()
def encode_all(ae, data, batch_size):
    """Mean and standard deviation of q(z | x) for every image of the uint8 data, in batches."""
    means, stds = [], []
    for i in range(0, len(data), batch_size):
        mean, logvar = ae.encode(data[i:i + batch_size].float() / 127.5 - 1)
        means.append(mean)
        stds.append((0.5 * logvar).exp())
    return torch.cat(means), torch.cat(stds)


def latent_scale(mean, std, generator):
    """1 / std of z ~ q(z | x) over the data: Rombach et al. rescale z by it (Sec. 4.3.2, App. G; they
    estimate it on the first batch, here on all). Why it matters: the schedule assumes data of about unit
    variance. x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps has the signal-to-noise ratio
    alpha_bar_t Var(x_0) / (1 - alpha_bar_t), so latents of std 10 would keep 100x the SNR at every t
    (x_T would still show the data, which sampling from N(0, I) then lacks) and latents of std 0.1 would
    drown in noise early. Unlike pixels, latents have no fixed range: their scale is whatever stage 1
    learned, since the tiny KL weight hardly pins it. So it is measured, and kept in the checkpoint."""
    z = mean + std * torch.randn(mean.shape, device=mean.device, generator=generator)
    return 1 / z.std().item()


def get_latent_batch(mean, std, scale, batch_size, generator):
    """Stage 2's data: z_0 = scale * z with z ~ q(z | x) for a random batch of images (as the authors'
    code, which samples the posterior rather than taking its mean)."""
    idx = torch.randint(len(mean), (batch_size,), device=mean.device, generator=generator)
    eps = torch.randn((batch_size, *mean.shape[1:]), device=mean.device, generator=generator)
    return scale * (mean[idx] + std[idx] * eps)


# %% Training

def ae_loss(ae, x, eps, kl_weight):
    """Stage 1: reconstruction plus kl_weight * KL(q(z | x) || N(0, I)), each summed over its image or latent
    and averaged over the batch, as the authors' code does. They use L1 plus a perceptual and a GAN loss
    with a KL weight of 1e-6; with L1 alone the reconstruction sum is smaller, so the same 1e-6 weighs the
    KL a little more, still far under 1% of the loss. The KL only has to keep the latents bounded and the
    posterior a little noisy, so that the decoder tolerates the small errors of stage 2's samples."""
    mean, logvar = ae.encode(x)
    z = mean + (0.5 * logvar).exp() * eps  # reparameterisation: z ~ q(z | x)
    rec = (ae.decode(z).float() - x).abs().flatten(1).sum(1)
    kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).flatten(1).sum(1)
    return (rec + kl_weight * kl).mean()


def loss_fn(model, x0, t, eps, alpha_bar):
    """L_simple (DDPM Eq. 14, Alg. 1 line 5): || eps - eps_theta(sqrt(ab) x_0 + sqrt(1 - ab) eps, t) ||^2."""
    return F.mse_loss(model(q_sample(x0, t, eps, alpha_bar), t).float(), eps)


def learning_rate(step, lr, warmup, decay_steps=None):
    """Linear warm-up over warmup steps (DDPM warms up over 5000), then constant as in DDPM, or with
    decay_steps a cosine decay that reaches 0 after the last of them. Stage 1 decays (its figures in the
    README were measured so). Stage 2 does not: with a decay over 6,000 steps its samples scored FID 6.92
    against 6.28 at a constant rate (1,000 samples, DDIM 50 steps, eta 1), though its loss was lower."""
    decay = 0.5 * (1 + math.cos(math.pi * (step - 1) / decay_steps)) if decay_steps else 1.0
    return lr * min(1.0, step / max(1, warmup)) * decay


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
    missing = {"config", "step", "image_shape", "model", "ema", "opt"} - ckpt.keys()
    if missing:
        raise ValueError(f"{path} lacks {', '.join(sorted(missing))}: it is damaged, use another --ckpt")
    return ckpt


def train(args, model, ema, opt, batch_loss, steps, batch_size, start_step, ckpt_path, extra, rank, world,
          preview=None, decay=False):
    """Either stage, repeated: draw a batch and take a gradient step on batch_loss(net, generator); update
    the EMA. Stage 1: ae_loss. Stage 2: Alg. 1, L_simple on the scaled latents. extra goes in the checkpoint;
    decay: the learning rate falls to 0 over steps (learning_rate)."""
    device = next(model.parameters()).device
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    net = torch.compile(net) if args.compile else net
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    gen = torch.Generator(device)
    stop = []  # a Ctrl-C sets this; the loop then checkpoints at the next log step and exits
    previous_handler = signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    bar = tqdm(total=steps, initial=start_step, disable=rank != 0, unit="step", dynamic_ncols=True,
               desc=extra["stage"])
    losses, t_log, t_start, step = [], time.perf_counter(), time.perf_counter(), start_step
    try:
        for step in range(start_step + 1, steps + 1):  # step counts completed updates, 1-based
            # Each step seeds its own generator from (seed, step, rank): a resumed run draws the very
            # batches and noise an uninterrupted one would, so the checkpoint needs no RNG state.
            gen.manual_seed((args.seed << 32) + step * world + rank)
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, args.lr, args.warmup, steps if decay else None)
            with autocast:
                loss = batch_loss(net, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            # Early on the average would be dominated by the random initial weights, so the decay
            # ramps up as (1 + n) / (10 + n), as in tf.train.ExponentialMovingAverage.
            ema_update(ema, model, min(args.ema_decay, step / (step + 9)))
            losses.append(loss.detach())
            bar.update()
            if step % args.log_every and step != steps:
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
            img_s = len(interval) * batch_size * world / (now - t_log)
            bar.set_postfix(loss=f"{interval.mean():.4f}", img_s=f"{img_s:.0f}")
            if rank == 0 and (step % args.ckpt_every == 0 or step == steps or flags[0]):
                save_checkpoint(ckpt_path, {
                    "script": SCRIPT, "config": vars(args), "step": step, **extra,
                    "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict()})
            if rank == 0 and preview and args.sample_every and step % args.sample_every == 0 and step != steps:
                preview(step)
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


@torch.no_grad()
def decode(ae, z, scale):
    """Latents of stage 2 to images: undo the scaling, then the decoder."""
    return ae.decode(z / scale).float()


def sampler_steps(args, T, default=DDIM_STEPS):
    """S, the DDIM steps to sample with (0: DDPM's T steps): --sampling-steps, else default or T if smaller."""
    return min(default, T) if args.sampling_steps is None else args.sampling_steps


def generate(model, ae, scale, n, latent_shape, betas, alpha_bar, args, batch_size, n_frames=0, progress=True):
    """n samples as uint8 (n, C, H, W): latents drawn in batches by DDIM or, with --sampling-steps 0, DDPM
    (Alg. 2), then decoded; for a GIF, the first batch's x_t decoded at n_frames steps."""
    gen = torch.Generator(betas.device).manual_seed(args.seed)
    T, S = len(betas), sampler_steps(args, len(betas))
    visited = sampling_timesteps(T, S).tolist()[::-1] if S else list(reversed(range(T)))
    model.eval()
    out, frames = [], []
    for start in range(0, n, batch_size):
        shape = (min(batch_size, n - start), *latent_shape)
        keep = {visited[i] for i in torch.linspace(0, len(visited) - 1, max(n_frames - 1, 0)).round().long()}
        seen = []

        # The samplers' own frames are clamped to the data range [-1, 1] of pixels, which latents of unit
        # std exceed: record the x_t each model call sees instead. The same reason turns clip_x0 off.
        def eps_model(x, t):
            if start == 0 and int(t[0]) in keep:
                seen.append(x.float())
            return model(x, t)

        desc = f"sampling {start // batch_size + 1}/{math.ceil(n / batch_size)}" if progress else None
        if S:
            z, _ = ddim_sample_loop(eps_model, torch.randn(shape, device=betas.device, generator=gen), alpha_bar,
                                    sampling_timesteps(T, S), args.eta, gen, clip_x0=False, desc=desc)
        else:
            z, _ = p_sample_loop(eps_model, shape, betas, alpha_bar, args.sigma, gen, clip_x0=False, desc=desc)
        out.append(to_uint8(decode(ae, z, scale)))
        if start == 0 and n_frames:
            frames = [decode(ae, x, scale).cpu() for x in seen + [z]]
    model.train()
    return torch.cat(out), frames


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


def write_samples(model, ae, scale, n, latent_shape, args, betas, alpha_bar, out_dir):
    """The final outputs: a grid, a GIF of the reverse process and, with --npz, the samples. Returns seconds."""
    t0 = time.perf_counter()
    images, frames = generate(model, ae, scale, n, latent_shape, betas, alpha_bar, args, args.sample_batch_size,
                              n_frames=40)
    if betas.device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    save_grid(images, out_dir / "samples.png")
    save_gif(frames, out_dir / "reverse.gif")
    if args.npz:
        Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.npz, arr_0=images.permute(0, 2, 3, 1).numpy())  # uint8 NHWC, as FID tools read
    where = f"{out_dir}/samples.png, {out_dir}/reverse.gif" + (f", {args.npz}" if args.npz else "")
    S = sampler_steps(args, len(betas))
    steps = f"{S} DDIM (eta {args.eta:g})" if S else f"{len(betas)} DDPM"
    print(f"sampled {n} images in {secs:.1f} s ({n / secs:.1f} img/s, {steps} steps, decoded): {where}")
    return secs


@torch.no_grad()
def evaluate_autoencoder(ae, data, args, out_dir):
    """Stage 1's report: MSE and PSNR of the reconstructions of up to max(1000, --fid-samples) training
    images (pixels in [0, 1], after rounding to uint8), a grid of originals against reconstructions, and
    with --fid-samples, their FID through evaluate.py against the floor of real images."""
    gen = torch.Generator(data.device).manual_seed(args.seed)
    idx = torch.randperm(len(data), device=data.device, generator=gen)[:max(1000, args.fid_samples)]
    ae.eval()
    recon = torch.cat([to_uint8(ae.decode(ae.encode(data[i].float() / 127.5 - 1)[0]))
                       for i in idx.split(args.sample_batch_size)])
    ae.train()
    mse = ((recon.float() - data[idx].cpu().float()) / 255).pow(2).mean().item()
    pairs = torch.stack([data[idx[:32]].cpu().view(4, 8, *data.shape[1:]), recon[:32].view(4, 8, *data.shape[1:])], 1)
    save_grid(pairs.flatten(0, 2), out_dir / "reconstructions.png")  # rows: originals, their reconstructions
    line = f"autoencoder: reconstruction MSE {mse:.5f}, PSNR {10 * math.log10(1 / max(mse, 1e-12)):.2f} dB " \
           f"on {len(idx)} training images; {out_dir}/reconstructions.png"
    if args.fid_samples:
        try:
            import evaluate  # here, not at the top: the script runs without evaluate.py
            r = evaluate.evaluate_images(recon[:args.fid_samples].permute(0, 2, 3, 1).numpy(), dataset=args.dataset,
                                         data_dir=args.data_dir, device=str(data.device), seed=args.seed)
            line += (f"; FID of {r['num_samples']} reconstructions {r['fid']:.3f}, real-data floor "
                     f"{r['floor_fid']:.3f} at {r['floor_num_samples']} ({r['fid'] / r['floor_fid']:.1f}x)")
        except (ImportError, ValueError) as e:  # no evaluate.py, or data it does not know
            line += f"; no FID ({type(e).__name__}: {e})"
    print(line)


def time_pixel_ddpm(ckpt, device, reps=5):
    """ddpm.py's U-Net, built from its checkpoint's config and timed here: reps training steps at its batch
    size and reps denoising passes at its sampling batch size (network only, each after one untimed
    warm-up), extrapolated to its whole run (steps read from the checkpoint) and to T passes per sample."""
    config, shape, T = ckpt["config"], ckpt["image_shape"], ckpt["config"]["timesteps"]
    model = build_model(config, shape[0]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"])
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def seconds(fn, batch):
        x, t = torch.randn((batch, *shape), device=device), torch.randint(T, (batch,), device=device)
        fn(x, t)
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn(x, t)
        sync()
        return (time.perf_counter() - t0) / reps

    def train_step(x, t):
        with autocast:
            loss = F.mse_loss(model(x, t).float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sample_pass(x, t):
        with torch.no_grad(), autocast:
            model(x, t)

    b, sb = config["batch_size"], config["sample_batch_size"]
    train_img_s, sample_img_s = b / seconds(train_step, b), sb / (seconds(sample_pass, sb) * T)
    return {"steps": ckpt["step"], "batch": b, "train_img_s": train_img_s, "train_s": ckpt["step"] * b / train_img_s,
            "sample_img_s": sample_img_s, "T": T,
            "timed": f"{reps} training steps of batch {b} and {reps} of {T} sampling passes at batch {sb}"}


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


def load_stage(path, stage, parser, scripts=(SCRIPT,)):
    """load_checkpoint, turning its errors and a checkpoint of the other stage into one line."""
    try:
        ckpt = load_checkpoint(path, scripts)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    if stage and ckpt.get("stage") != stage:
        parser.error(f"{path} holds the {ckpt.get('stage')} stage, not the {stage}: pass "
                     f"{'--ae-ckpt OUT_DIR/ae.pt' if stage == 'autoencoder' else '--ckpt OUT_DIR/ckpt.pt'}")
    missing = {"diffusion": {"ae", "ae_config", "latent_shape", "scale_factor"},
               "autoencoder": {"downsample_factor"}}.get(stage, set()) - ckpt.keys()
    if missing:
        parser.error(f"{path} lacks {', '.join(sorted(missing))}: it is damaged, use another checkpoint")
    return ckpt


def main(argv=None):
    """Train both stages (or with --sample-only, sample); returns the EMA U-Net."""
    args, parser = parse_args(argv)
    device, rank, world = setup_device(args, parser)
    out_dir = Path(args.out_dir)
    ckpt_path = Path(args.ckpt) if args.ckpt else out_dir / "ckpt.pt"
    ae_path = Path(args.ae_ckpt) if args.ae_ckpt else out_dir / "ae.pt"
    ckpt = ae_ckpt = None
    if args.sample_only or (args.resume and (ckpt_path.exists() or not ae_path.exists())):
        ckpt = load_stage(ckpt_path, "diffusion", parser)
    elif ckpt_path.exists():
        parser.error(f"{ckpt_path} exists: pass --resume to continue it, or a new --out-dir to start afresh")
    if not args.sample_only and (args.ae_ckpt or not ckpt and args.resume):
        ae_ckpt = load_stage(ae_path, "autoencoder", parser)
        f, c = ae_ckpt.get("downsample_factor"), ae_ckpt["config"].get("latent_channels")
        if (f, c) != (DOWNSAMPLE, args.latent_channels):
            parser.error(f"{ae_path} has f = {f} and C = {c}; this run needs f = {DOWNSAMPLE} and C = "
                         f"{args.latent_channels}: pass --latent-channels {c} or another --ae-ckpt")
    elif not (args.sample_only or args.resume) and ae_path.exists():
        parser.error(f"{ae_path} exists: pass --resume to continue it, or a new --out-dir to start afresh")
    if args.resume:
        resumed = ckpt or ae_ckpt
        for flag in RUN_FLAGS if not args.ae_ckpt or ckpt else ("dataset", "image_size"):
            if resumed["config"].get(flag) != getattr(args, flag):
                parser.error(f"{ckpt_path if ckpt else ae_path} was trained with --{flag.replace('_', '-')} "
                             f"{resumed['config'].get(flag)}, not {getattr(args, flag)}: pass the same value to resume it")
    pixel = load_stage(Path(args.compare_ckpt), None, parser, ("ddpm",)) if args.compare_ckpt else None
    config = ckpt["config"] if args.sample_only else vars(args)
    check_image_size(config["image_size"] or default_image_size(config["dataset"]),
                     len(config["channel_mult"].split(",")), parser)
    if (args.sampling_steps or 0) > config["timesteps"]:  # a checkpoint's T, not the --timesteps default
        parser.error(f"--sampling-steps {args.sampling_steps} is more than the model's T = {config['timesteps']} "
                     f"training steps: pick S from 1 to {config['timesteps']}")
    betas64 = make_betas(config["schedule"], config["timesteps"])
    betas, alpha_bar = betas64.float().to(device), torch.cumprod(1 - betas64, 0).float().to(device)

    if args.sample_only:
        try:
            model = build_model(config, ckpt["latent_shape"][0]).to(device)
            ae = build_autoencoder(ckpt["ae_config"], ckpt["image_shape"][0]).to(device)
            model.load_state_dict(ckpt["ema"])
            ae.load_state_dict(ckpt["ae"])
        except (KeyError, RuntimeError):
            parser.error(f"{ckpt_path}: its weights do not fit this latent.py's models (damaged, or written by an "
                         f"older version): use another --ckpt")
        out_dir.mkdir(parents=True, exist_ok=True)
        write_samples(model, ae.eval(), ckpt["scale_factor"], args.num_samples, ckpt["latent_shape"], args, betas,
                      alpha_bar, out_dir)
        return model

    size = args.image_size or default_image_size(args.dataset)
    try:
        data = load_images(args.dataset, args.data_dir, size).to(device)  # the whole set, on the device
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    for path, c in ((ckpt_path, ckpt), (ae_path, ae_ckpt)):
        if c and list(data.shape[1:]) != c["image_shape"]:
            parser.error(f"{path} was trained on {c['image_shape']} images, this data is {list(data.shape[1:])}")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if device.type != "cuda":
            print(f"no CUDA GPU: training on {device.type} with the small defaults (see --help for both sets)")
    timing = {}

    # Stage 1: the autoencoder, unless reused (--ae-ckpt) or done (a stage 2 checkpoint holds it).
    torch.manual_seed(args.seed)
    ae_config = ckpt["ae_config"] if ckpt else ae_ckpt["config"] if args.ae_ckpt else vars(args)
    ae = build_autoencoder(ae_config, data.shape[1]).to(device)
    ae_ema = copy.deepcopy(ae).requires_grad_(False)
    ae_opt = torch.optim.AdamW(ae.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    start = 0
    try:
        if ckpt:
            ae_ema.load_state_dict(ckpt["ae"])
        elif ae_ckpt:
            ae.load_state_dict(ae_ckpt["model"])
            ae_ema.load_state_dict(ae_ckpt["ema"])
            ae_opt.load_state_dict(ae_ckpt["opt"])
            start = ae_ckpt["step"]
    except (KeyError, RuntimeError, ValueError):
        parser.error(f"{ckpt_path if ckpt else ae_path}: its autoencoder does not fit this latent.py's (damaged, or "
                     f"written by an older version): train a new one in a new --out-dir")
    if not ckpt:
        if not args.ae_ckpt and start < args.ae_steps:
            if rank == 0:
                print(f"stage 1, {args.dataset}: {len(data)} images {tuple(data.shape[1:])} on {device}; autoencoder "
                      f"of {sum(p.numel() for p in ae.parameters()) / 1e6:.2f}M parameters, f = {DOWNSAMPLE}, "
                      f"C = {args.latent_channels}; steps {start}..{args.ae_steps}, batch {args.ae_batch_size} x {world}")

            def stage1_loss(net, gen):
                x = get_batch(data, args.ae_batch_size, gen)
                eps = torch.randn((len(x), args.latent_channels, size // DOWNSAMPLE, size // DOWNSAMPLE),
                                  device=device, generator=gen)
                return ae_loss(net, x, eps, args.kl_weight)

            extra = {"stage": "autoencoder", "image_shape": list(data.shape[1:]), "downsample_factor": DOWNSAMPLE}
            step, wall, interrupted = train(args, ae, ae_ema, ae_opt, stage1_loss, args.ae_steps, args.ae_batch_size,
                                            start, ae_path, extra, rank, world, decay=True)
            timing["stage 1 (autoencoder)"] = (step - start, args.ae_batch_size * world, wall)
            end_stage(1, step, start, wall, ae_path, interrupted, rank)
        if rank == 0:
            evaluate_autoencoder(ae_ema, data, args, out_dir)
    ae_ema.eval()

    # Stage 2: diffusion on the latents of the whole set, encoded once, scaled to unit std.
    t0 = time.perf_counter()
    lat_mean, lat_std = encode_all(ae_ema, data, args.sample_batch_size)
    encode_s = time.perf_counter() - t0
    scale = ckpt["scale_factor"] if ckpt else latent_scale(lat_mean, lat_std, torch.Generator(device).manual_seed(args.seed))
    latent_shape = list(lat_mean.shape[1:])
    torch.manual_seed(args.seed)
    model = build_model(config, latent_shape[0]).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    start = 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
    if rank == 0:
        print(f"stage 2: latents {tuple(latent_shape)}, scale factor {scale:.4f} (1 / std on the data); U-Net of "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
              f"steps {start}..{args.steps}, batch {args.batch_size} x {world} process(es)")

    def stage2_loss(net, gen):
        z0 = get_latent_batch(lat_mean, lat_std, scale, args.batch_size, gen)
        t = torch.randint(len(betas), (args.batch_size,), device=device, generator=gen)
        eps = torch.randn(z0.shape, device=device, generator=gen)
        return loss_fn(net, z0, t, eps, alpha_bar)

    def preview(step):
        images, _ = generate(ema, ae_ema, scale, min(64, args.num_samples), latent_shape, betas, alpha_bar, args,
                             args.sample_batch_size, progress=False)
        save_grid(images, out_dir / f"samples_{step:06d}.png")

    extra = {"stage": "diffusion", "image_shape": list(data.shape[1:]), "latent_shape": latent_shape,
             "scale_factor": scale, "ae": ae_ema.state_dict(), "ae_config": {
                 k: ae_config[k] for k in ("ae_channels", "latent_channels")}, "downsample_factor": DOWNSAMPLE}
    step, wall, interrupted = train(args, model, ema, opt, stage2_loss, args.steps, args.batch_size, start, ckpt_path,
                                    extra, rank, world, preview)
    timing["stage 2 (latent diffusion, with encoding the data once)"] = (step - start, args.batch_size * world,
                                                                        wall + encode_s)
    end_stage(2, step, start, wall, ckpt_path, interrupted, rank)
    if rank == 0:
        secs = write_samples(ema, ae_ema, scale, args.num_samples, latent_shape, args, betas, alpha_bar, out_dir)
        print_timing(timing, args.num_samples, secs, time_pixel_ddpm(pixel, device) if pixel else None)
    if world > 1:
        dist.destroy_process_group()
    return ema


def end_stage(number, step, start, wall, path, interrupted, rank):
    """A stage's summary line; after a Ctrl-C (its checkpoint saved by train) exit with the usual status, 130."""
    if rank == 0:
        print(f"{'stopped' if interrupted else 'trained'} stage {number} at step {step}: {step - start} steps in "
              f"{wall / 60:.1f} min; checkpoint {path}")
    if interrupted:
        sys.exit(130)


def print_timing(timing, n, sample_secs, pixel):
    """Wall time and img/s of each stage run in this process and of sampling; with --compare-ckpt, ddpm.py's."""
    print("timing (wall clock, this process):")
    total = 0
    for name, (steps, batch, wall) in timing.items():
        print(f"  {name}: {steps} steps of batch {batch} in {wall / 60:.1f} min, {steps * batch / max(wall, 1e-9):.0f} img/s")
        total += wall
    rate = n / sample_secs
    print(f"  sampling: {n} images in {sample_secs:.1f} s, {rate:.2f} img/s; 10,000 at that rate: {1e4 / rate / 60:.1f} min")
    print(f"  both stages + 10,000 samples: {(total + 1e4 / rate) / 60:.1f} min")
    if pixel:
        p_total = pixel["train_s"] + 1e4 / pixel["sample_img_s"]
        print(f"pixel-space ddpm.py (read from its checkpoint: {pixel['steps']} steps of batch {pixel['batch']}, "
              f"T = {pixel['T']}; timed here: {pixel['timed']}, extrapolated):")
        print(f"  training: {pixel['train_s'] / 60:.1f} min, {pixel['train_img_s']:.0f} img/s; sampling: "
              f"{pixel['sample_img_s']:.2f} img/s, 10,000 in {1e4 / pixel['sample_img_s'] / 60:.1f} min; "
              f"total {p_total / 60:.1f} min, {p_total / (total + 1e4 / rate):.1f}x this run's")


if __name__ == "__main__":
    main()
