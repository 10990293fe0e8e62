"""Class-conditional DDPM with classifier-free guidance (Ho & Salimans 2021,
https://arxiv.org/abs/2207.12598), and classifier guidance beside it (Dhariwal & Nichol 2021,
https://arxiv.org/abs/2105.05233), in one file.

    python conditional.py --dataset mnist                 # 13.5 min on 2 CPU cores
    python conditional.py --sample-only --ckpt runs/conditional/ckpt.pt --labels 3,3,7 --guidance 2
    python conditional.py --dataset mnist --train-classifier   # then --guidance-mode classifier

Training is DDPM's Alg. 1 with the class label as a second input, replaced by a learned null class
with probability p_uncond (their Alg. 1); sampling is DDPM's Alg. 2 or DDIM with the guided noise
of their Eq. 6 (their Alg. 2). Outputs go to runs/conditional/. As a notebook, Run all trains."""
# %% Imports
import argparse, contextlib, copy, hashlib, io, math, os, re, signal, sys, tempfile, time
from pathlib import Path

import numpy as np, torch, torch.distributed as dist, torch.nn as nn, torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps
from tqdm import tqdm

SCRIPT = "conditional"
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
    """eps_theta(x_t, t, c): the U-Net of DDPM (their Appendix B) in small. Residual blocks at each
    level, self-attention at the lowest resolution, skip connections from down to up path. The
    class c enters as a learned embedding added to the time embedding; index num_classes is the
    null class (no label), which makes the same network the unconditional eps_theta(x_t, t)."""
    def __init__(self, channels=1, base=64, mult=(1, 2, 2), num_res_blocks=2, num_classes=10):
        super().__init__()
        self.base, t_dim = base, 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.class_emb = nn.Embedding(num_classes + 1, t_dim)  # the last row is the null class
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
    def forward(self, x, t, y):  # y: class indices (B,), or weights (B, num_classes + 1), a blend
        c_emb = self.class_emb(y) if y.dim() == 1 else y @ self.class_emb.weight
        t_emb = F.silu(self.time_mlp(timestep_embedding(t, self.base)) + c_emb)
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

def build_model(config, channels, num_classes):
    mult = tuple(int(m) for m in config["channel_mult"].split(","))
    return UNet(channels, config["base_channels"], mult, config["num_res_blocks"], num_classes)

class Classifier(nn.Module):
    """p_phi(y | x_t, t) (Dhariwal & Nichol 2021, Sec. 4.1): residual blocks told t, pooled."""
    def __init__(self, channels, num_classes, base=32, mult=(1, 2, 2)):
        super().__init__()
        self.base, t_dim, ch = base, 4 * base, [base] + [base * m for m in mult]
        self.time_mlp = nn.Sequential(nn.Linear(base, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.stem = nn.Conv2d(channels, base, 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(a, b, t_dim) for a, b in zip(ch, ch[1:]))
        self.head = nn.Sequential(nn.GroupNorm(8, ch[-1]), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(ch[-1], num_classes))
    def forward(self, x, t):  # logits (B, num_classes); H and W halve before every block but one
        t_emb = F.silu(self.time_mlp(timestep_embedding(t, self.base)))
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            h = block(F.avg_pool2d(h, 2) if i else h, t_emb)
        return self.head(h)
# %% Training: Alg. 1
def drop_labels(y, p_uncond, null_class, generator):
    """Each label independently replaced by the null class with probability p_uncond (Ho & Salimans
    Alg. 1 line 3): one network learns both eps(x, c) and the unconditional eps(x, null)."""
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p_uncond
    return torch.where(drop, torch.full_like(y, null_class), y)

def loss_fn(model, x0, y, alpha_bar, gen):
    """Alg. 1 lines 3-5 with the (possibly dropped) label c: t ~ Uniform({1..T}), eps ~ N(0, I),
    L_simple = || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t, c) ||^2."""
    t = torch.randint(len(alpha_bar), (len(x0),), device=x0.device, generator=gen)
    eps = torch.randn(x0.shape, device=x0.device, generator=gen)
    return F.mse_loss(model(q_sample(x0, t, eps, alpha_bar), t, y).float(), eps)

def classifier_loss(classifier, x0, y, alpha_bar, gen):
    """Cross-entropy on x_t ~ q(x_t | x_0), t ~ Uniform({1..T}): the images guidance shows it."""
    t = torch.randint(len(alpha_bar), (len(x0),), device=x0.device, generator=gen)
    eps = torch.randn(x0.shape, device=x0.device, generator=gen)
    return F.cross_entropy(classifier(q_sample(x0, t, eps, alpha_bar), t).float(), y)
@torch.no_grad()
def classifier_accuracy(classifier, images, labels, alpha_bar, seed):
    """{the paper's t: accuracy} on uint8 images noised to t = 1, T/4, T/2 and 3T/4."""
    x0 = images.float() / 127.5 - 1
    gen, acc = torch.Generator(images.device).manual_seed(seed), {}
    for i in range(4):
        t = torch.full((len(x0),), i * len(alpha_bar) // 4, device=x0.device)
        xt = q_sample(x0, t, torch.randn(x0.shape, device=x0.device, generator=gen), alpha_bar)
        acc[int(t[0]) + 1] = (classifier(xt, t).argmax(1) == labels).float().mean().item()
    return acc

@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, for every parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)

def get_lr(step, args):
    """A linear warm-up over --warmup steps (DDPM's: 5000), then with --lr-decay a cosine to 0."""
    lr = args.lr * min(1, step / max(1, args.warmup))
    if args.lr_decay:
        lr *= 0.5 + 0.5 * math.cos(math.pi * (step - 1) / args.steps)
    return lr

def train(model, ema, opt, batch_loss, args, start, path, extra, preview=None):
    """Alg. 1, repeated: a gradient step on batch_loss(net, generator), then the EMA. Logs a line
    of log.csv every --log-every steps; saves extra and the state dicts every --ckpt-every steps,
    at the end and on Ctrl-C or SIGTERM; returns whether a signal stopped the run."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device, t0, step, losses = next(model.parameters()).device, time.time(), start, []
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if args.compile:
        net = torch.compile(net)
    gen, stopping = torch.Generator(device), False
    log = path.with_name("log.csv" if path.name == "ckpt.pt" else f"{path.stem}_log.csv")
    if rank == 0 and (start == 0 or not log.exists()):  # resumed, the run's log goes on
        log.write_text("step,loss,lr,img_s\n")
    t_log = time.time()
    def on_signal(signum, frame):  # Ctrl-C or SIGTERM: save after this step and stop
        nonlocal stopping
        if stopping:  # a second one stops at once
            sys.exit(f"{SCRIPT}.py: stopped at once")
        stopping = True
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(range(start + 1, args.steps + 1), initial=start, total=args.steps, disable=rank > 0,
               unit="img", unit_scale=args.batch_size * world)  # counts steps, shows images
    try:
        for step in bar:  # step counts completed updates, from 1
            # Seeded by (seed, step, rank): resumed, a run draws what it would have drawn anyway.
            gen.manual_seed((args.seed << 32) + step * world + rank)
            for group in opt.param_groups:
                group["lr"] = get_lr(step, args)
            with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                loss = batch_loss(net, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            # The decay ramps up as (1 + n) / (10 + n), so that the random start fades fast.
            ema_update(ema, model, min(args.ema_decay, step / (step + 9)))
            losses.append(loss.detach())
            # One process answers a signal at once; under torchrun they agree at a log step.
            if step % args.log_every and step < args.steps and not (stopping and world == 1):
                continue
            # The log step, the one place the loop waits for the GPU: nothing non-finite is saved.
            interval, losses = torch.stack(losses).float().cpu(), []
            finite = interval.isfinite()
            ok = finite.all() and all(p.isfinite().all() for p in model.parameters())
            flags = torch.tensor([stopping, not ok], dtype=torch.float32, device=device)
            if world > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # all stop at the same step
            if flags[1]:
                sys.exit(non_finite_message(finite, step, path))
            bar.set_postfix(loss=f"{interval.mean():.4f}")
            if rank == 0:  # a line per log step, to plot: python bench.py plots
                rate = len(interval) * args.batch_size * world / (time.time() - t_log)
                with open(log, "a") as f:
                    f.write(f"{step},{interval.mean():.6f},{get_lr(step, args):.6g},{rate:.1f}\n")
                t_log = time.time()
            if rank == 0 and (step % args.ckpt_every == 0 or step == args.steps or flags[0]):
                state = {"script": SCRIPT, "step": step, "model": model.state_dict(), **extra}
                save_checkpoint(path, state | {"ema": ema.state_dict(), "opt": opt.state_dict()})
            if rank == 0 and preview and args.sample_every and step % args.sample_every == 0:
                preview(step)
            if flags[0]:
                break
    finally:
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if rank == 0:
        print(f"{'stopped' if stopping else 'trained'} at step {step}: {step - start} steps in "
              f"{(time.time() - t0) / 60:.1f} min; checkpoint {path}")
    return stopping

def non_finite_message(finite, step, path):
    """Why a run stops: the interval's first non-finite loss, or, with none, a non-finite weight."""
    first = step - len(finite) + 1
    what = f"the loss became non-finite at step {first + int(finite.int().argmin())}"
    if finite.all():
        what = f"a weight became non-finite between steps {first} and {step}"
    keep = f"The last good checkpoint ({path}) is kept: resume it with a lower --lr."
    if not path.exists():
        keep = "No checkpoint was saved: start with a lower --lr."
    return f"{SCRIPT}.py: {what}; stopped. {keep}"
# %% Sampling: DDPM's Alg. 2 or DDIM, guided
def sampling_timesteps(T, S, spacing="uniform"):
    """tau_1 < ... < tau_S: the sub-sequence of the T training steps that DDIM visits (Sec. 4.2),
    as code indices ending at T - 1. Uniform spacing puts tau_i near i T / S, quadratic near
    (i / S)^2 T, denser close to the data (their App. D.2)."""
    i = torch.arange(1, S + 1, dtype=torch.float64)
    tau = ((i / S if spacing == "uniform" else (i / S) ** 2) * T).round().long() - 1
    return torch.maximum(tau, i.long() - 1)  # quadratic spacing would repeat steps near 0

def ddim_sigma(ab, ab_prev, eta):
    """sigma(eta) of Eq. 16: eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev). eta = 1 is
    DDPM's posterior std (sqrt(beta_tilde_t) between neighbours), eta = 0 a deterministic step."""
    return eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()

@torch.no_grad()
def ddim_step(xt, eps_pred, ab, ab_prev, sigma, z, clip_x0=True):
    """Eq. 12, from a step with alpha_bar = ab to one with ab_prev (1 for the data itself):
    x_prev = sqrt(ab_prev) x0_pred + sqrt(1 - ab_prev - sigma^2) eps_pred + sigma z."""
    x0_pred = (xt - (1 - ab).sqrt() * eps_pred) / ab.sqrt()  # the "predicted x_0" of Eq. 12 (Eq. 9)
    if clip_x0:  # as in ddpm.py; the noise is then the one that this clipped x_0 implies
        x0_pred = x0_pred.clamp(-1, 1)
        eps_pred = (xt - ab.sqrt() * x0_pred) / (1 - ab).sqrt()
    direction = (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps_pred  # "pointing to x_t"
    return ab_prev.sqrt() * x0_pred + direction + sigma * z

@torch.no_grad()
def ddim_sample_loop(model, x, alpha_bar, timesteps, eta=0.0, generator=None, n_frames=0,
                     clip_x0=True):
    """From x = x_{tau_S} (pure noise, to sample) down the sub-sequence timesteps to x_0, one
    Eq. 12 step each. Returns x_0 and n_frames x_tau along the way, of the first 64 images."""
    ts = timesteps.tolist()
    keep = torch.linspace(0, len(ts) - 1, n_frames).round().long().tolist() if n_frames else ()
    frames = []
    for i in tqdm(reversed(range(len(ts))), "sampling", len(ts), leave=False):
        t = torch.full((len(x),), ts[i], device=x.device, dtype=torch.long)
        with torch.autocast("cuda", torch.bfloat16, enabled=x.device.type == "cuda"):
            eps_pred = model(x, t)
        ab = alpha_bar[ts[i]]
        ab_prev = alpha_bar[ts[i - 1]] if i > 0 else torch.ones_like(ab)  # the last lands on x_0
        z = torch.randn(x.shape, device=x.device, generator=generator)
        x = ddim_step(x, eps_pred.float(), ab, ab_prev, ddim_sigma(ab, ab_prev, eta), z, clip_x0)
        if i in keep:
            frames.append(x[:64].clamp(-1, 1).cpu())
    return x, frames

def guided_eps(model, x, t, y, w, null_class):
    """Classifier-free guidance (Eq. 6): eps~ = (1 + w) eps(x_t, c) - w eps(x_t, null). Libraries
    that write eps_u + s (eps_c - eps_u) (GLIDE, diffusers' guidance_scale) mean s = 1 + w: their
    s = 1 is w = 0, no guidance. Both predictions come from one pass over the batch [x, x] with
    [c, null]. y: class indices (B,), or class-embedding weights (B, num_classes + 1) of blends."""
    null = torch.full_like(y, null_class) if y.dim() == 1 else F.one_hot(
        torch.full_like(y[:, 0], null_class, dtype=torch.long), y.shape[1]).to(y.dtype)
    eps_c, eps_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
    return (1 + w) * eps_c.float() - w * eps_u.float()

def classifier_guided_eps(eps, classifier, x, t, y, s, alpha_bar):
    """Classifier guidance (Dhariwal & Nichol Sec. 4.2, Eq. 14): eps^ = eps(x_t) - s sqrt(1 - ab_t)
    grad_x log p_phi(y | x_t, t), by autograd (a backward pass a step). As eps = -sqrt(1 - ab_t)
    grad log p(x_t) (Eq. 11), eps^ is the noise of p(x_t) p_phi(y|x_t)^s: DDIM with it is their
    Alg. 2; DDPM's Alg. 2 with it is their Alg. 1 (mean + s Sigma grad) but for 1/sqrt(alpha_t)."""
    with torch.enable_grad():  # log_softmax of the logits; a sum: each image its own gradient
        x = x.detach().requires_grad_()
        log_p = classifier(x, t).to(eps.dtype).log_softmax(1).gather(1, y[:, None]).sum()
        grad = torch.autograd.grad(log_p, x)[0]
    return eps - s * (1 - alpha_bar[t]).sqrt().view(-1, *[1] * (x.dim() - 1)) * grad

def generate(model, labels, w, shape, alpha_bar, seed, batch_size, steps, eta, n_frames=0,
             classifier=None):
    """Samples of the labels (class indices or embedding weights) as uint8 (n, C, H, W), guided
    with strength w (or a classifier's s), in batches, by DDIM's Eq. 12 on S = steps of the T
    steps with noise eta (S = T and eta = 1 is DDPM's Alg. 2: ddim.py's tests check it); and
    frames of the first batch for a GIF. A seed: the same noise whatever w and labels."""
    gen = torch.Generator(alpha_bar.device).manual_seed(seed)
    null_class, taus = model.class_emb.num_embeddings - 1, sampling_timesteps(len(alpha_bar), steps)
    out, frames = [], []
    for start in range(0, len(labels), batch_size):
        y = labels[start:start + batch_size].to(alpha_bar.device)
        def eps(x, t):  # the guided noise, which the sampler takes for model(x, t)
            if classifier:  # the null class's prediction, pushed by the classifier's gradient
                null = torch.full_like(y, null_class)
                return classifier_guided_eps(model(x, t, null).float(), classifier, x, t, y, w,
                                             alpha_bar)
            return guided_eps(model, x, t, y, w, null_class)
        x = torch.randn((len(y), *shape), device=gen.device, generator=gen)
        n = n_frames if start == 0 else 0  # the GIF shows the first batch
        x, f = ddim_sample_loop(eps, x, alpha_bar, taus, eta, gen, n)
        out.append(to_uint8(x))
        if start == 0:
            frames = f
    return torch.cat(out), frames

def cycle_labels(n, num_classes, device="cpu"):
    """0, 1, .., num_classes - 1, 0, 1, ..: n labels with every class equally often."""
    return torch.arange(n, device=device) % num_classes

def blend_labels(pairs, lam, num_classes):
    """Class-embedding weights (len(pairs), num_classes + 1): 1 - lam of class a plus lam of b."""
    a, b = torch.tensor(pairs).T
    y = torch.zeros(len(pairs), num_classes + 1)
    y[torch.arange(len(pairs)), a] = 1 - lam
    y[torch.arange(len(pairs)), b] += lam
    return y
# %% Data
DATASETS = {"mnist": ("MNIST", 28, "MNIST/raw"), "cifar10": ("CIFAR10", 32, "cifar-10-batches-py"),
            "fashion-mnist": ("FashionMNIST", 28, "FashionMNIST/raw")}  # class, side, files
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
def load_images(dataset, data_dir, size, download=True):
    """The training set as uint8 (N, C, size, size), its labels, the class names and, for a folder
    (a sub-folder per class), its image count and name hash."""
    if dataset in DATASETS:
        name, _, where = DATASETS[dataset]
        try:  # torchvision downloads only what is not on disk; quietly, as offline it fails
            with contextlib.redirect_stdout(io.StringIO()):  # its messages go to stdout
                ds = getattr(torchvision.datasets, name)(data_dir, download=download)
        except Exception as e:
            how = "could not be downloaded" if download else "is not downloaded here"
            raise FileNotFoundError(f"{dataset} is not in {data_dir} and {how} "
                                    f"({type(e).__name__}): put its files in {data_dir}/{where}")
        x = torch.as_tensor(ds.data)
        x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, H, W) or (N, H, W, C)
        check_memory(len(x) * x.shape[1] * size ** 2, f"{dataset} at --image-size {size}")
        resized = []
        for chunk in x.split(1000):  # a thousand at a time: the float copies stay small
            chunk = F.interpolate(chunk.float(), size, mode="bilinear", antialias=True)
            resized.append(chunk.round().clamp(0, 255).byte())
        return torch.cat(resized), torch.as_tensor(ds.targets), list(ds.classes), None
    if not Path(dataset).is_dir():  # a name that is no dataset, or a path that is not there
        raise ValueError(f"--dataset {dataset}: no such folder" if os.sep in dataset else
                         f"unknown dataset {dataset!r}: use {', '.join(DATASETS)} or a folder")
    classes = sorted(d.name for d in Path(dataset).iterdir() if d.is_dir() and d.name[0] != ".")
    if not classes:
        raise ValueError(f"--dataset {dataset}: no class sub-folders; put each class's images in "
                         f"their own sub-folder ({dataset}/CLASS/*.png)")
    files = {c: [f for f in sorted(Path(dataset, c).rglob("*")) if f.is_file()
                 and f.suffix.lower() in IMAGE_SUFFIXES] for c in classes}
    for c in classes:  # a class with no images would never be seen
        if not files[c]:
            raise ValueError(f"--dataset {dataset}: the class folder {c} holds no images "
                             f"({' '.join(IMAGE_SUFFIXES)}): fill it or remove it")
    labels, files = zip(*[(k, f) for k, c in enumerate(classes) for f in files[c]])
    check_memory(len(files) * 3 * size ** 2, f"{len(files)} images at --image-size {size}")
    names = "".join(f"{f.relative_to(dataset)}:{f.stat().st_size};" for f in files).encode()
    images = [ImageOps.fit(read_image(f), (size, size)) for f in tqdm(files, delay=2)]
    images = torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2)  # the central square, resized
    found = f"{len(files)} images, {hashlib.sha1(names).hexdigest()[:16]}"
    return images, torch.tensor(labels), classes, found
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
def get_batch(data, labels, batch_size, generator):
    """A random batch from the uint8 tensor on the device, scaled to [-1, 1] (DDPM Sec. 3.3), with
    its labels."""
    idx = torch.randint(len(data), (batch_size,), device=data.device, generator=generator)
    return data[idx].float() / 127.5 - 1, labels[idx]
def check_memory(nbytes, what, device=torch.device("cpu")):
    """Refuse, before allocating, more than a CUDA GPU's free memory or half of this machine's."""
    if device.type == "cuda":
        limit, where = torch.cuda.mem_get_info(device)[0], "free on the GPU"
    elif hasattr(os, "sysconf"):  # Windows has no sysconf: nothing is checked there
        limit, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2, "half the RAM"
    else:
        return
    if nbytes > limit:
        raise ValueError(f"{what} needs {nbytes / 1e9:.1f} GB, over {limit / 1e9:.1f} GB ({where})")
def sampling_bytes(batch, shape, width):
    """Peak memory of a sampling step: 60 bytes per pixel and channel of the first level, plus 3 MB
    per channel (fitted to widths 16 and 64, batches 64-1,000, on a CPU: samples/README.md)."""
    return batch * math.prod(shape) * width * 60 + width * 3_000_000
# %% Pictures
def to_uint8(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
def grid(images, nrow=8):  # a uint8 (N, C, H, W) batch as one picture, nrow x nrow at most
    g = torchvision.utils.make_grid(images[:nrow * nrow], nrow=nrow, pad_value=255)
    return Image.fromarray(g.permute(1, 2, 0).squeeze(-1).numpy())
def save_forward(x0, alpha_bar, generator, path):
    """forward.png: a row per image of x0, x_t ~ q(x_t | x_0) at 10 steps from t = 1 to T."""
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    ts = torch.linspace(0, len(alpha_bar) - 1, 10).long().to(x0.device)
    xt = torch.stack([q_sample(x0, t.repeat(len(x0)), eps, alpha_bar) for t in ts], 1)
    grid(to_uint8(xt.flatten(0, 1)), nrow=10).save(path)
def class_grid(images, labels, ncol=10):  # a row of up to ncol samples per class, padded white
    rows = []
    for c in labels.unique()[:ncol]:
        row = images[labels == c][:ncol]
        rows += [row, torch.full((ncol - len(row), *row.shape[1:]), 255, dtype=torch.uint8)]
    return torch.cat(rows)
def write_samples(model, labels, shape, alpha_bar, args, name="samples", classifier=None):
    """NAME.png: samples of the labels, a row per class; the final ones also reverse.gif,
    guidance.png (a row per w, or s, of GUIDANCE_STRIP, the same noise in each column),
    mixing.png (not with a classifier) and --npz (uint8 NHWC, the labels as arr_1)."""
    def sample(y, w, n_frames=0):
        return generate(model, y, w, shape, alpha_bar, args.seed, args.sample_batch_size,
                        args.sampling_steps, args.eta, n_frames, classifier)
    t0, classes, out = time.time(), model.class_emb.num_embeddings - 1, Path(args.out_dir)
    images, frames = sample(labels, args.guidance, 40)
    grid(class_grid(images, labels), nrow=10).save(out / f"{name}.png")
    if name != "samples":
        return
    secs, gif = time.time() - t0, [grid(to_uint8(f)) for f in frames]
    gif[0].save(out / "reverse.gif", save_all=True, append_images=gif[1:],
                duration=[80] * len(gif[1:]) + [2000])
    strip = [sample(cycle_labels(10, classes), w)[0] for w in GUIDANCE_STRIP[args.guidance_mode]]
    grid(torch.cat(strip), nrow=10).save(out / "guidance.png")
    written = "samples.png, reverse.gif, guidance.png"
    if not classifier:
        # Class mixing: row i blends the embedding of class a_i into that of b_i, left to right,
        # from one noise per row; half-way the network sees an embedding it never saw (hybrids).
        pairs = [(c, (c + classes // 2) % classes) for c in range(min(classes // 2, 10))]
        mix = [sample(blend_labels(pairs, lam, classes), args.guidance)[0]
               for lam in torch.linspace(0, 1, 10).tolist()]
        grid(torch.stack(mix, 1).flatten(0, 1), nrow=10).save(out / "mixing.png")
        written += ", mixing.png"
    if args.npz:
        np.savez(args.npz, arr_0=images.permute(0, 2, 3, 1).numpy(), arr_1=labels.numpy())
        written += f", {args.npz}"
    S = args.sampling_steps  # CFG runs the U-Net twice a step, on one doubled batch
    evals = f"{S} U-Net and {S} classifier" if classifier else f"{2 * S} U-Net"
    print(f"sampled {len(labels)} images in {secs:.1f} s ({len(labels) / secs:.1f} img/s; "
          f"{S} steps, eta {args.eta:g}, {evals} evaluations an image; "
          f"{'s' if classifier else 'w'} = {args.guidance:g}): {out}/{written}")
# %% Checkpoints
def save_checkpoint(path, state):  # a temporary file, renamed: no write leaves a broken file
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
def load_checkpoint(path, scripts=(SCRIPT,), keys=("step", "image_shape", "classes", "ema"),
                    resume=False):
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
def load_classifier(path, shape, classes, config, device):  # for --guidance-mode classifier
    if not path.is_file():
        raise ValueError(f"--guidance-mode classifier: no classifier at {path}; train one with "
                         "--train-classifier, or pass --classifier PATH")
    ckpt = load_checkpoint(path)
    mine = [ckpt["image_shape"], ckpt["classes"], ckpt["config"]["schedule"],
            ckpt["config"]["timesteps"]]
    theirs = [shape, classes, config["schedule"], config["timesteps"]]
    if not ckpt["config"].get("train_classifier") or mine != theirs:
        raise ValueError(f"{path} is no classifier of these images and noise (--train-classifier)")
    classifier = Classifier(shape[0], len(classes)).to(device)
    classifier.load_state_dict(ckpt["ema"])
    return classifier.requires_grad_(False).eval()
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
# flag: (default, type or choices, help). A pair is (CUDA, CPU or mps): on CUDA a 6.1M-parameter
# U-Net that sees 2.56M images (43 epochs of MNIST); on a CPU a 0.64M-parameter one, narrow at full
# resolution where convolutions cost most (sampling batches of 256 were no faster than 64 there).
FLAGS = {
    "dataset": ("mnist", lambda s: str(Path(s)), "mnist, fashion-mnist, cifar10 or a folder with a "
                "sub-folder of images per class"),
    "image_size": (None, POSITIVE, "image side (default: 28 (fashion-)mnist, 32 cifar10, 64)"),
    "base_channels": ((64, 16), WIDTH, "U-Net width at full resolution"),
    "channel_mult": (("1,2,2", "1,2,4"), MULT, "width per U-Net level, each halving H and W"),
    "num_res_blocks": ((2, 1), POSITIVE, "residual blocks per U-Net level"),
    "schedule": ("linear", ("linear", "cosine"), "betas 1e-4..0.02 (DDPM) or cosine (Nichol 2021)"),
    "timesteps": (1000, valid(int, lambda v: v >= 2, "at least 2"), "T, the diffusion steps"),
    "p_uncond": (0.1, valid(float, lambda v: 0 <= v < 1, "in [0, 1)"), "probability of training on "
                 "the null class instead of the label (the paper's p_uncond)"),
    "data_dir": ("data", str, "where torchvision datasets live or are downloaded"),
    "out_dir": (f"runs/{SCRIPT}", str, "checkpoint, sample grids and GIFs go here"),
    "ckpt": (None, str, "checkpoint to write, resume or sample (default: OUT_DIR/ckpt.pt)"),
    "steps": ((10000, 4500), POSITIVE, "training steps"), "lr": ((1e-3, 2e-3), REAL, "AdamW's"),
    "batch_size": ((256, 32), POSITIVE, "images per step and per process"),
    "warmup": (200, COUNT, "steps of lr warm-up"), "lr_decay": ((False, True), None, "cosine to 0"),
    "grad_clip": (1.0, valid(float, lambda v: v >= 0, "non-negative"), "gradient norm clip"),
    "ema_decay": ((0.999, 0.995), valid(float, lambda v: 0 <= v < 1, "in [0, 1)"), "EMA decay"),
    "seed": (0, valid(int, lambda v: 0 <= v < 2**31, "in 0..2^31-1"), "seeds weights, data, noise"),
    "log_every": ((100, 10), POSITIVE, "steps per log"), "compile": (False, None, "torch.compile"),
    "ckpt_every": ((2000, 500), POSITIVE, "steps between checkpoints"),
    "sample_every": ((2000, 0), COUNT, "steps between sample grids, 0 for none"),
    "resume": (False, None, "continue from --ckpt"), "sample_only": (False, None, "only sample"),
    "num_samples": (100, POSITIVE, "images in the final grid and in --npz"),
    "guidance": (None, valid(float, lambda v: v >= 0, "non-negative (w = 0: the conditional model, "
                 "unguided)"), "guidance strength: w of Eq. 6 (if left out, 1: 99% right on "
                 "MNIST), or with --guidance-mode classifier s (if left out, 16: its best FID)"),
    "guidance_mode": ("free", ("free", "classifier"), "classifier-free (Eq. 6), or classifier "
                      "guidance (Dhariwal & Nichol 2021) of the null class by --classifier"),
    "classifier": (None, str, "noise-aware classifier (default: OUT_DIR/classifier.pt)"),
    "train_classifier": (False, None, "train --classifier on noised images, not the diffusion"),
    "labels": (None, valid(str, lambda s: re.fullmatch(r"\d+(,\d+)*", s), "classes like 3,3,7"),
               "classes to sample (default: --num-samples images cycling through the classes)"),
    "sampling_steps": (50, POSITIVE, "S, the steps of the sampler's time grid, 1 to T (left "
                       "out: T where the default is more; S = T with --eta 1 is DDPM's Alg. 2)"),
    # eta 0.5, not 0: eta 0 keeps specks of the x_0 that eps_theta predicts early on, eta 0.5
    # drops most at the same FID (samples/README.md, conditional.py: "Speckles")
    "eta": (0.5, valid(float, lambda v: 0 <= v <= 1, "in [0, 1]"), "the sampler's noise (DDIM "
            "Eq. 16): 0 deterministic, 1 DDPM's posterior variance"),
    "npz": (None, lambda s: s.removesuffix(".npz") + ".npz", "also save them, uint8 NHWC, "
            "and their labels as arr_1"),
    "sample_batch_size": ((1000, 64), POSITIVE, "images per sampling batch"),
    "device": ("auto", ("auto", "cuda", "mps", "cpu"), "auto picks cuda, then mps, then cpu"),
}
# The flags that a checkpoint fixes: its network, schedule and data. Sampling takes their values.
RUN_FLAGS = ("dataset", "image_size", "base_channels", "channel_mult", "num_res_blocks", "schedule",
             "timesteps", "p_uncond")
GUIDANCE = {"free": 1.0, "classifier": 16.0}  # --guidance left out: w, or s (README's table)
GUIDANCE_STRIP = {"free": (0.0, 0.5, 1.0, 2.0, 4.0), "classifier": (0.0, 4.0, 8.0, 16.0, 32.0)}
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
def fill_flags(args, device, saved=None, path=None, run_flags=RUN_FLAGS):
    """Flags left out take the checkpoint's values (run_flags), else their defaults on this device
    (so does one that the checkpoint predates); a model flag unlike the saved one is refused."""
    for name, (default, *_) in FLAGS.items():
        fixed = saved is not None and name in run_flags and name in saved
        value = saved[name] if fixed else default
        if fixed and getattr(args, name) not in (None, value):
            raise ValueError(f"{path} was trained with --{name.replace('_', '-')} {value}, not "
                             f"{getattr(args, name)}: leave the flag out, or pass the same value")
        if type(value) is tuple:  # (CUDA, CPU or mps)
            value = value[device.type != "cuda"]
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.image_size = args.image_size or DATASETS.get(args.dataset, (0, 64))[1]
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
def sample_labels(args, num_classes):  # --labels, else --num-samples cycling through the classes
    if args.labels is None:
        return cycle_labels(args.num_samples, num_classes)
    labels = [int(c) for c in args.labels.split(",")]
    if max(labels) >= num_classes:
        raise ValueError(f"--labels: class {max(labels)} is out of range; this model has classes "
                         f"0..{num_classes - 1}")
    return torch.tensor(labels)
def main(argv=None):  # train, then sample (with --sample-only, only sample); returns the EMA
    parser = build_parser()  # in a notebook sys.argv is the kernel's: Run all takes the defaults
    args = parser.parse_args([] if argv is None and "ipykernel" in sys.modules else argv)
    try:  # each mistake of the user's ends here, in one line, before any work
        device = setup_device(args.device or "auto")
        out_dir, trains_classifier = Path(args.out_dir or f"runs/{SCRIPT}"), args.train_classifier
        classifier_path = Path(args.classifier or out_dir / "classifier.pt")
        ckpt_path = classifier_path if trains_classifier else Path(args.ckpt or out_dir / "ckpt.pt")
        if trains_classifier and args.sample_only:
            raise ValueError("--train-classifier trains: leave out --sample-only")
        ckpt = None
        if args.sample_only or args.resume:
            ckpt = load_checkpoint(ckpt_path, resume=args.resume)
        elif ckpt_path.exists():
            raise ValueError(f"{ckpt_path} exists: pass --resume to go on, or a new --out-dir")
        if ckpt and bool(ckpt["config"].get("train_classifier")) != trains_classifier:
            what = "not a classifier's file" if trains_classifier else "a classifier's file"
            raise ValueError(f"{ckpt_path} is {what}")
        asked_steps = args.sampling_steps  # None when left out
        fill_flags(args, device, ckpt["config"] if ckpt else None, ckpt_path)
        if args.guidance is None:
            args.guidance = GUIDANCE[args.guidance_mode]
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        alpha_bar64 = make_schedule(args.schedule, args.timesteps)[1]  # [0]: the betas
        if asked_steps is None:  # the default, or T if that is fewer
            args.sampling_steps = min(args.sampling_steps, args.timesteps)
        if args.sampling_steps > args.timesteps and not trains_classifier:
            raise ValueError(f"--sampling-steps {args.sampling_steps} is more than the model's T = "
                             f"{args.timesteps} training steps: pick S from 1 to {args.timesteps}")
        if rank == 0:
            lock = claim_outputs(Path(args.out_dir), ckpt_path, args.npz)  # held until the end
        if args.sample_only:  # no images are needed to sample
            data, labels, classes, found = None, None, ckpt["classes"], None
        else:
            data, labels, classes, found = load_images(args.dataset, args.data_dir, args.image_size)
        if ckpt and not args.sample_only and (ckpt["classes"], ckpt.get("fingerprint")) != (
                classes, found):
            raise ValueError(f"{ckpt_path} was trained on other images: the classes "
                             f"{ckpt['classes']}, {ckpt.get('fingerprint') or 'torchvision data'}")
        wanted = sample_labels(args, len(classes))  # checked now, not after training
        shape = ckpt["image_shape"] if args.sample_only else list(data.shape[1:])
        check_memory(sampling_bytes(2 * args.sample_batch_size, shape, args.base_channels),
                     f"a sampling batch of {args.sample_batch_size} (--sample-batch-size; CFG "
                     "doubles it)", device)
        torch.manual_seed(args.seed)
        if trains_classifier:
            model = Classifier(shape[0], len(classes)).to(device)
        else:
            model = build_model(vars(args), shape[0], len(classes)).to(device)
        guide = None
        if args.guidance_mode == "classifier" and not trains_classifier:
            guide = load_classifier(classifier_path, shape, classes, vars(args), device)
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), args.lr, fused=device.type == "cuda")
        modules = {"ema": ema} if args.sample_only else {"ema": ema, "model": model, "opt": opt}
        if ckpt:
            for key, module in modules.items():
                module.load_state_dict(ckpt[key])
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    except (KeyError, RuntimeError, TypeError, ZeroDivisionError):  # damaged, or edited by hand
        parser.error(f"{ckpt_path}: its weights do not fit its own config; it is damaged")
    alpha_bar = alpha_bar64.float().to(device)
    if args.sample_only:
        write_samples(ema, wanted, shape, alpha_bar, args, "samples", guide)
        return ema
    data, labels = data.to(device), labels.to(device)
    start = ckpt["step"] if ckpt else 0
    if trains_classifier:  # held-out images to measure it on
        keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
        n = min(1000, len(data) // 10)
        held = data[keep[:n]], labels[keep[:n]]
        data, labels = data[keep[n:]], labels[keep[n:]]
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        what = "classifier" if trains_classifier else "U-Net"
        note = "" if device.type == "cuda" else " (no CUDA GPU: the small defaults, see --help)"
        print(f"{args.dataset}: {len(data)} images {tuple(shape)} in {len(classes)} classes; a "
              f"{what} of {params} parameters; batch {args.batch_size} x {world} process(es) on "
              f"{device}{note}")
        gen = torch.Generator(device).manual_seed(args.seed)
        x0 = get_batch(data, labels, 8, gen)[0]
        save_forward(x0, alpha_bar, gen, Path(args.out_dir, "forward.png"))
    def loss(net, gen):  # Alg. 1 of Ho & Salimans: draw (x_0, c), drop c, then DDPM's step
        x0, y = get_batch(data, labels, args.batch_size, gen)
        if trains_classifier:
            return classifier_loss(net, x0, y, alpha_bar, gen)
        return loss_fn(net, x0, drop_labels(y, args.p_uncond, len(classes), gen), alpha_bar, gen)
    def preview(step):  # a grid every --sample-every steps
        write_samples(ema, cycle_labels(64, len(classes)), shape, alpha_bar, args,
                      f"samples_{step:06d}", guide)
    extra = {"config": vars(args), "image_shape": shape, "classes": classes, "fingerprint": found}
    if train(model, ema, opt, loss, args, start, ckpt_path, extra,
             None if trains_classifier else preview):
        sys.exit(130)  # stopped by a signal: the usual exit status after Ctrl-C
    if rank == 0 and trains_classifier:
        acc = classifier_accuracy(ema, *held, alpha_bar, args.seed)
        accuracies = ", ".join(f"t = {t}: {a:.3f}" for t, a in acc.items())
        print(f"classifier accuracy on {len(held[0])} held-out images: {accuracies}")
    elif rank == 0:
        write_samples(ema, wanted, shape, alpha_bar, args, "samples", guide)
    if world > 1:
        dist.destroy_process_group()
    return ema
if __name__ == "__main__":
    main()
