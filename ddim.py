"""DDIM (Song et al. 2020, https://arxiv.org/abs/2010.02502) in one file.

    python ddim.py --dataset mnist                      # trains as ddpm.py: 12.2 min on 2 CPUs
    python ddim.py --sample-only --ckpt runs/ddpm/ckpt.pt --sampling-steps 50 --eta 0

Training is DDPM's Alg. 1, unchanged: DDIM samples ddpm.py's checkpoints too. Sampling is DDIM's
generalised step (Eq. 12) on S of the T steps; eta = 0 makes it deterministic, which also encodes
images to x_T and interpolates; --sampler dpm++2m, pndm or sde solve the same ODE to higher order,
or the reverse SDE. Outputs: runs/ddim/. As a notebook, Run all trains; main(["--steps", "300"]).
"""
# %% Imports
import argparse, contextlib, copy, hashlib, io, math, os, re, signal, sys, tempfile, time
from pathlib import Path

import numpy as np, torch, torch.distributed as dist, torch.nn as nn, torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps
from tqdm import tqdm

SCRIPT = "ddim"
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
# %% Training: Alg. 1
def loss_fn(model, x0, alpha_bar, gen):
    """Alg. 1 lines 3-5: t ~ Uniform({1..T}), eps ~ N(0, I), and L_simple (Eq. 14),
    || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2."""
    t = torch.randint(len(alpha_bar), (len(x0),), device=x0.device, generator=gen)
    eps = torch.randn(x0.shape, device=x0.device, generator=gen)
    return F.mse_loss(model(q_sample(x0, t, eps, alpha_bar), t).float(), eps)

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
# %% Sampling: DDIM (Eq. 12)
# DDIM writes alpha_t for what DDPM calls alpha_bar_t, the cumulative product: this code keeps
# DDPM's names, alpha_bar everywhere, as in the sections above.
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

@torch.no_grad()
def ddim_invert(model, x0, alpha_bar, timesteps):
    """Encode data to x_T by the deterministic sampler run forward (Sec. 4.3, Eq. 14 as an ODE):
    x_{tau_i} from x_{tau_{i-1}} with the noise predicted at tau_{i-1}. ddim_sample_loop with
    clip_x0=False runs the same Euler steps back, to x0 up to an error that falls as 1/S."""
    ts, x, zero = timesteps.tolist(), x0, torch.zeros((), device=x0.device)
    for i, t_next in enumerate(ts):
        t = torch.full((len(x),), ts[max(i - 1, 0)], device=x.device, dtype=torch.long)
        with torch.autocast("cuda", torch.bfloat16, enabled=x.device.type == "cuda"):
            eps_pred = model(x, t)
        ab = alpha_bar[ts[i - 1]] if i > 0 else torch.ones_like(alpha_bar[0])  # 1: the data
        x = ddim_step(x, eps_pred.float(), ab, alpha_bar[t_next], zero, zero, clip_x0=False)
    return x

def slerp(z0, z1, w):
    """Spherical interpolation between two noise tensors (Sec. 5.3): a straight line would pass
    through points of much smaller norm than a Gaussian x_T ever has."""
    theta = torch.arccos((z0 * z1).sum() / (z0.norm() * z1.norm()))
    return (torch.sin((1 - w) * theta) * z0 + torch.sin(w * theta) * z1) / torch.sin(theta)

# %% Sampling: more solvers of the same ODE, and the SDE
# DDIM at eta = 0 is Euler's method on the probability-flow ODE (Eq. 14), its error falling as 1/S;
# higher-order solvers need fewer steps. Alg. 2 discretises the reverse SDE (Song et al. 2021).
def predict_x0(xt, eps_pred, ab, clip_x0=True):
    """x_0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab) (Eq. 9), clipped to [-1, 1] as ddim_step does."""
    x0_pred = (xt - (1 - ab).sqrt() * eps_pred) / ab.sqrt()
    if clip_x0:
        x0_pred = x0_pred.clamp(-1, 1)
    return x0_pred

def dpmpp_2m_step(xt, eps_pred, ab, ab_prev, history, clip_x0=True):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2), in the data-prediction form for the VP schedule:
    with lambda = log(sqrt(ab) / sqrt(1 - ab)) and h = lambda_prev - lambda, one step is exact for
    an x_0 prediction that is linear in lambda; history keeps the last step's (h, x0_pred). First
    order on the first step and on the step to x_0 (lambda = inf), as k-diffusion does."""
    x0_pred = predict_x0(xt, eps_pred, ab, clip_x0)
    h = (ab_prev / (1 - ab_prev)).log() / 2 - (ab / (1 - ab)).log() / 2
    D = x0_pred
    if history and ab_prev < 1:  # D_i = (1 + 1 / 2r) x0_i - 1 / 2r x0_{i-1}, r = h_{i-1} / h_i
        h_last, x0_last = history[-1]
        r = h_last / h
        D = (1 + 1 / (2 * r)) * x0_pred - 1 / (2 * r) * x0_last
    history[:] = [(h, x0_pred)]  # the next step's h_{i-1} and x0_{i-1}
    # x_prev = (sigma_prev / sigma) x_t - alpha_prev (e^-h - 1) D; at ab_prev = 1 it is D itself
    return ((1 - ab_prev) / (1 - ab)).sqrt() * xt - ab_prev.sqrt() * torch.expm1(-h) * D

ADAMS_BASHFORTH = ((1,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12),  # 1- to 4-step formulas,
                   (55 / 24, -59 / 24, 37 / 24, -9 / 24))  # each newest first

def pndm_step(xt, eps_pred, ab, ab_prev, history, clip_x0=True):
    """PNDM (Liu et al. 2022, Eq. 11-12): Adams-Bashforth's eps' = (55 e_0 - 59 e_1 + 37 e_2 -
    9 e_3) / 24, e_k the eps of k steps before (in history), then DDIM's eta = 0 step (their
    "transfer" phi) with eps'. As iPNDM, the first three steps take the 1- to 3-step formulas."""
    history[:] = [eps_pred, *history[:3]]  # the last four eps, newest first
    coefficients = ADAMS_BASHFORTH[len(history) - 1]
    eps_prime = sum(c * e for c, e in zip(coefficients, history))
    zero = torch.zeros_like(ab)
    return ddim_step(xt, eps_prime, ab, ab_prev, zero, zero, clip_x0)

def sde_step(xt, eps_pred, ab, ab_prev, z, clip_x0=True):
    """Euler-Maruyama on the reverse VP SDE (Song et al. 2021, Eq. 6 with f = -beta x / 2 and g^2 =
    beta): dx = -beta (x / 2 + grad log p_t(x)) dt + sqrt(beta) dw, run backwards. Over a step the
    betas sum to B = log(ab_prev / ab); the score is -eps / sqrt(1 - ab), here from the clipped
    x_0: (sqrt(ab) x0_pred - x_t) / (1 - ab). Alg. 2 is the same equation, discretised otherwise."""
    x0_pred = predict_x0(xt, eps_pred, ab, clip_x0)
    score = (ab.sqrt() * x0_pred - xt) / (1 - ab)
    B = (ab_prev / ab).log()
    return xt + (xt / 2 + score) * B + B.sqrt() * z

@torch.no_grad()
def solver_sample_loop(model, x, alpha_bar, timesteps, sampler, generator=None, n_frames=0,
                       clip_x0=True):
    """ddim_sample_loop for the solvers above: one network evaluation at each of timesteps, from
    the last down; the SDE adds no noise on its step to x_0 (as Alg. 2 line 4)."""
    ts = timesteps.tolist()
    keep = torch.linspace(0, len(ts) - 1, n_frames).round().long().tolist() if n_frames else ()
    frames, history = [], []
    for i in tqdm(reversed(range(len(ts))), "sampling", len(ts), leave=False):
        t = torch.full((len(x),), ts[i], device=x.device, dtype=torch.long)
        with torch.autocast("cuda", torch.bfloat16, enabled=x.device.type == "cuda"):
            eps_pred = model(x, t).float()
        ab = alpha_bar[ts[i]]
        ab_prev = alpha_bar[ts[i - 1]] if i > 0 else torch.ones_like(ab)
        if sampler == "dpm++2m":
            x = dpmpp_2m_step(x, eps_pred, ab, ab_prev, history, clip_x0)
        elif sampler == "pndm":
            x = pndm_step(x, eps_pred, ab, ab_prev, history, clip_x0)
        else:
            z = torch.randn(x.shape, device=x.device, generator=generator)
            if i == 0:  # the step to x_0
                z = torch.zeros_like(z)
            x = sde_step(x, eps_pred, ab, ab_prev, z, clip_x0)
        if i in keep:
            frames.append(x[:64].clamp(-1, 1).cpu())
    return x, frames

def generate(model, n, shape, alpha_bar, timesteps, eta, seed, batch_size, n_frames=0,
             sampler="ddim"):
    """n samples as uint8 (n, C, H, W), drawn in batches; frames of the first batch for a GIF."""
    gen, out, frames = torch.Generator(alpha_bar.device).manual_seed(seed), [], []
    for start in range(0, n, batch_size):
        x = torch.randn((min(batch_size, n - start), *shape), device=gen.device, generator=gen)
        n_keep = 0 if start else n_frames
        if sampler == "ddim":
            x, f = ddim_sample_loop(model, x, alpha_bar, timesteps, eta, gen, n_keep)
        else:
            x, f = solver_sample_loop(model, x, alpha_bar, timesteps, sampler, gen, n_keep)
        out, frames = out + [to_uint8(x)], frames or f
    return torch.cat(out), frames
# %% Data
DATASETS = {"mnist": ("MNIST", 28, "MNIST/raw"), "cifar10": ("CIFAR10", 32, "cifar-10-batches-py"),
            "fashion-mnist": ("FashionMNIST", 28, "FashionMNIST/raw")}  # class, side, files
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
def load_images(dataset, data_dir, size, download=True):
    """The training set as uint8 (N, C, size, size); for a folder, its image count and name hash."""
    if dataset in DATASETS:
        name, _, where = DATASETS[dataset]
        try:  # torchvision downloads only what is not on disk; quietly, as offline it fails
            with contextlib.redirect_stdout(io.StringIO()):  # its messages go to stdout
                x = getattr(torchvision.datasets, name)(data_dir, download=download).data
        except Exception as e:
            how = "could not be downloaded" if download else "is not downloaded here"
            raise FileNotFoundError(f"{dataset} is not in {data_dir} and {how} "
                                    f"({type(e).__name__}): put its files in {data_dir}/{where}")
        x = torch.as_tensor(x)[:, None] if x.ndim == 3 else torch.as_tensor(x).permute(0, 3, 1, 2)
        check_memory(len(x) * x.shape[1] * size ** 2, f"{dataset} at --image-size {size}")
        resized = []
        for chunk in x.split(1000):  # a thousand at a time: the float copies stay small
            chunk = F.interpolate(chunk.float(), size, mode="bilinear", antialias=True)
            resized.append(chunk.round().clamp(0, 255).byte())
        return torch.cat(resized), None
    if not Path(dataset).is_dir():  # a name that is no dataset, or a path that is not there
        raise ValueError(f"--dataset {dataset}: no such folder" if os.sep in dataset else
                         f"unknown dataset {dataset!r}: use {', '.join(DATASETS)} or a folder")
    files = [f for f in sorted(Path(dataset).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    files = [f for f in files if f.is_file()]
    if not files:
        raise ValueError(f"--dataset {dataset}: the folder holds no images of {IMAGE_SUFFIXES}")
    check_memory(len(files) * 3 * size ** 2, f"{len(files)} images at --image-size {size}")
    names = "".join(f"{f.relative_to(dataset)}:{f.stat().st_size};" for f in files).encode()
    images = [ImageOps.fit(read_image(f), (size, size)) for f in tqdm(files, delay=2)]
    images = torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2)  # the central square, resized
    return images, f"{len(files)} images, {hashlib.sha1(names).hexdigest()[:16]}"
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
def get_batch(data, batch_size, generator):
    """A random batch from the uint8 tensor on the device, scaled to [-1, 1] (DDPM Sec. 3.3)."""
    idx = torch.randint(len(data), (batch_size,), device=data.device, generator=generator)
    return data[idx].float() / 127.5 - 1
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
def write_samples(model, n, shape, alpha_bar, args, data=None, name="samples"):
    """NAME.png: n samples; the final ones also reverse.gif, --npz, interpolation and, given real
    images, inversion."""
    taus = sampling_timesteps(len(alpha_bar), args.sampling_steps, args.spacing)
    t0, out = time.time(), Path(args.out_dir)
    images, frames = generate(model, n, shape, alpha_bar, taus, args.eta, args.seed,
                              args.sample_batch_size, 40, args.sampler)
    grid(images).save(out / f"{name}.png")
    if name != "samples":
        return
    gif = [grid(to_uint8(f)) for f in frames]
    gif[0].save(out / "reverse.gif", save_all=True, append_images=gif[1:],
                duration=[80] * len(gif[1:]) + [2000])
    if args.npz:
        np.savez(args.npz, arr_0=images.permute(0, 2, 3, 1).numpy())
    secs = time.time() - t0
    how = f"DDIM, eta {args.eta:g}" if args.sampler == "ddim" else args.sampler
    print(f"sampled {n} images in {secs:.1f} s ({n / secs:.1f} img/s; {how}, {len(taus)} steps, "
          f"{len(taus)} network evaluations an image): {out}/samples.png, reverse.gif "
          f"{args.npz or ''}")
    save_interpolation(model, shape, alpha_bar, taus, args.seed, out)
    print(f"interpolation: {out}/interpolation.png (slerp between two x_T, eta 0)")
    if data is not None:
        rmse, std = save_inversion(model, data, alpha_bar, taus, out / "inversion.png")
        print(f"inversion: 16 real images to x_T (std {std:.2f}) and back, {len(taus)} steps each "
              f"way: RMSE {rmse:.2f} grey levels of 255; {out}/inversion.png")
def save_inversion(model, data, alpha_bar, timesteps, path, n=16, seed=0):
    """Encode n real images to x_T with ddim_invert and decode them back (eta = 0, Sec. 5.4): rows
    of originals above their reconstructions. Returns the RMSE in grey levels and the std of x_T."""
    x0 = get_batch(data, n, torch.Generator(data.device).manual_seed(seed))
    xT = ddim_invert(model, x0, alpha_bar, timesteps)
    rec = ddim_sample_loop(model, xT, alpha_bar, timesteps, clip_x0=False)[0]  # clipped: no inverse
    original, rec = to_uint8(x0), to_uint8(rec)
    rows = torch.stack([original.view(-1, 8, *x0.shape[1:]), rec.view(-1, 8, *x0.shape[1:])], 1)
    grid(rows.flatten(0, 2)).save(path)  # each row of 8 originals over their reconstructions
    return (original.float() - rec.float()).pow(2).mean().sqrt().item(), xT.std().item()
def save_interpolation(model, shape, alpha_bar, timesteps, seed, out_dir, rows=4, cols=10):
    """interpolation.png: rows decoded with eta 0 from slerp(z0, z1, w), w in [0, 1] (Sec. 5.3)."""
    z = torch.randn((2, rows, *shape), generator=torch.Generator().manual_seed(seed))
    x = [slerp(z[0, r], z[1, r], w) for r in range(rows) for w in torch.linspace(0, 1, cols)]
    x0, _ = ddim_sample_loop(model, torch.stack(x).to(alpha_bar.device), alpha_bar, timesteps)
    grid(to_uint8(x0), nrow=cols).save(Path(out_dir, "interpolation.png"))
# %% Checkpoints
def save_checkpoint(path, state):  # a temporary file, renamed: no write leaves a broken file
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
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
# flag: (default, type or choices, help). A pair is (CUDA, CPU or mps): on CUDA a 6.1M-parameter
# U-Net that sees 2.56M images; on a CPU a 0.64M-parameter one, narrow at full resolution where
# convolutions cost most, with the recipe of the README's CPU ablation (more updates, lr decay).
FLAGS = {
    "dataset": ("mnist", lambda s: str(Path(s)), "mnist, fashion-mnist, cifar10 or a folder"),
    "image_size": (None, POSITIVE, "image side (default: 28 (fashion-)mnist, 32 cifar10, 64)"),
    "base_channels": ((64, 16), WIDTH, "U-Net width at full resolution"),
    "channel_mult": (("1,2,2", "1,2,4"), MULT, "width per U-Net level, each halving H and W"),
    "num_res_blocks": ((2, 1), POSITIVE, "residual blocks per U-Net level"),
    "schedule": ("linear", ("linear", "cosine"), "betas 1e-4..0.02 (DDPM) or cosine (Nichol 2021)"),
    "timesteps": (1000, valid(int, lambda v: v >= 2, "at least 2"), "T, the diffusion steps"),
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
    "resume": (False, None, "continue training from --ckpt"),
    "sample_only": (False, None, "only sample from --ckpt (ddim.py's or ddpm.py's)"),
    "num_samples": (64, POSITIVE, "images in the final grid and in --npz"),
    "npz": (None, lambda s: s.removesuffix(".npz") + ".npz", "also save them, uint8 NHWC"),
    "sample_batch_size": ((1000, 64), POSITIVE, "images per sampling batch"),
    "sampling_steps": (50, POSITIVE, "S, the steps of the sampler's time grid, 1 to T (left "
                       "out: T where the default is more; S = T with --eta 1 is DDPM's Alg. 2)"),
    "eta": (0.0, valid(float, lambda v: 0 <= v <= 1, "in [0, 1]"), "the sampler's noise (DDIM "
            "Eq. 16): 0 deterministic, 1 DDPM's posterior variance"),
    "sampler": ("ddim", ("ddim", "dpm++2m", "pndm", "sde"), "DDIM (Eq. 12; --eta is its), the "
                "ODE's DPM-Solver++(2M) or PNDM, or the reverse SDE by Euler-Maruyama"),
    "spacing": ("uniform", ("uniform", "quadratic"), "the S steps: even, or denser near the data"),
    "device": ("auto", ("auto", "cuda", "mps", "cpu"), "auto picks cuda, then mps, then cpu"),
}
# The flags that a checkpoint fixes: its network, schedule and data. Sampling takes their values.
RUN_FLAGS = ("dataset", "image_size", "base_channels", "channel_mult", "num_res_blocks", "schedule",
             "timesteps")
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
def main(argv=None):  # train, then sample (with --sample-only, only sample); returns the EMA
    parser = build_parser()  # in a notebook sys.argv is the kernel's: Run all takes the defaults
    args = parser.parse_args([] if argv is None and "ipykernel" in sys.modules else argv)
    try:  # each mistake of the user's ends here, in one line, before any work
        device = setup_device(args.device or "auto")
        ckpt_path = Path(args.ckpt or Path(args.out_dir or FLAGS["out_dir"][0], "ckpt.pt"))
        # Sampling takes ddpm.py's checkpoints too (the same training); resuming one would take it.
        scripts = (SCRIPT, "ddpm") if args.sample_only else (SCRIPT,)
        ckpt = None
        if args.sample_only or args.resume:
            ckpt = load_checkpoint(ckpt_path, scripts, resume=args.resume)
        elif ckpt_path.exists():
            raise ValueError(f"{ckpt_path} exists: pass --resume to go on, or a new --out-dir")
        asked_steps, asked_eta = args.sampling_steps, args.eta  # None when left out
        fill_flags(args, device, ckpt["config"] if ckpt else None, ckpt_path)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        alpha_bar64 = make_schedule(args.schedule, args.timesteps)[1]  # [0]: the betas
        if asked_steps is None:  # the default, or T if that is fewer
            args.sampling_steps = min(args.sampling_steps, args.timesteps)
        if args.sampling_steps > args.timesteps:
            raise ValueError(f"--sampling-steps {args.sampling_steps} is more than the model's T = "
                             f"{args.timesteps} training steps: pick S from 1 to {args.timesteps}")
        if asked_eta is not None and args.sampler != "ddim":
            raise ValueError(f"--eta is DDIM's noise: --sampler {args.sampler} takes no --eta")
        if args.sampler == "pndm" and args.sampling_steps < 4:
            raise ValueError(f"--sampler pndm needs --sampling-steps 4 or more (its formula takes "
                             f"4 steps' eps), not {args.sampling_steps}: or use dpm++2m")
        if rank == 0:
            lock = claim_outputs(Path(args.out_dir), ckpt_path, args.npz)  # held until the end
        data, found = None, None  # no images are needed to sample
        if not args.sample_only:
            data, found = load_images(args.dataset, args.data_dir, args.image_size)
        if ckpt and not args.sample_only and ckpt.get("fingerprint") != found:
            raise ValueError(f"{ckpt_path} was trained on other images: {ckpt.get('fingerprint')}")
        shape = ckpt["image_shape"] if args.sample_only else list(data.shape[1:])
        check_memory(sampling_bytes(args.sample_batch_size, shape, args.base_channels),
                     f"a sampling batch of {args.sample_batch_size} (--sample-batch-size)", device)
        torch.manual_seed(args.seed)
        model = build_model(vars(args), shape[0]).to(device)
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
    if args.sample_only:  # real images for the inversion figure if they are on disk; none needed
        try:
            data = load_images(args.dataset, args.data_dir, args.image_size, download=False)[0]
            data = data.to(device)
        except (FileNotFoundError, ValueError) as e:
            print(f"no inversion figure: {e}")
        write_samples(ema, args.num_samples, shape, alpha_bar, args, data)
        return ema
    data = data.to(device)  # the whole set lives on the device
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        note = "" if device.type == "cuda" else " (no CUDA GPU: the small defaults, see --help)"
        print(f"{args.dataset}: {len(data)} images {tuple(shape)}; a U-Net of {params} parameters; "
              f"batch {args.batch_size} x {world} process(es) on {device}{note}")
        gen = torch.Generator(device).manual_seed(args.seed)
        save_forward(get_batch(data, 8, gen), alpha_bar, gen, Path(args.out_dir, "forward.png"))
    def loss(net, gen):  # Alg. 1 on a random batch of the data
        return loss_fn(net, get_batch(data, args.batch_size, gen), alpha_bar, gen)
    def preview(step):  # a grid every --sample-every steps
        write_samples(ema, 64, shape, alpha_bar, args, data, f"samples_{step:06d}")
    extra = {"config": vars(args), "image_shape": shape, "fingerprint": found}
    start = ckpt["step"] if ckpt else 0
    if train(model, ema, opt, loss, args, start, ckpt_path, extra, preview):
        sys.exit(130)  # stopped by a signal: the usual exit status after Ctrl-C
    if rank == 0:
        write_samples(ema, args.num_samples, shape, alpha_bar, args, data)
    if world > 1:
        dist.destroy_process_group()
    return ema
if __name__ == "__main__":
    main()
