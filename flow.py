"""Flow matching (Lipman et al. 2023, https://arxiv.org/abs/2210.02747) with the straight path of
rectified flow (Liu et al. 2022, https://arxiv.org/abs/2209.03003) in one file.

    python flow.py --dataset mnist                       # CPU defaults: 12 min on 2 cores
    python flow.py --sample-only --ckpt checkpoints/flow_mnist.pt --sampling-steps 10
    torchrun --nproc_per_node 2 flow.py --dataset mnist  # data-parallel, one process per GPU

The network is trained on the velocity eps - x_0 of the straight line from an image x_0 (t = 0) to
noise eps (t = 1); sampling integrates dx/dt = v_theta(x, t) back from t = 1 to 0, with Euler's or
Heun's method. Outputs go to runs/flow/. As a notebook (jupytext --to notebook flow.py), Run all
trains with the defaults; main(["--steps", "300"]) too. `diff ddpm.py flow.py` is the technique.
"""
# %% Imports
import argparse, contextlib, copy, hashlib, io, math, os, re, signal, sys, tempfile, time
from pathlib import Path

import numpy as np, torch, torch.distributed as dist, torch.nn as nn, torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps
from tqdm import tqdm

SCRIPT = "flow"
# %% The path from data to noise
# Time is a real number t in [0, 1], t = 0 the data and t = 1 the noise: there is no schedule of
# T steps. (DDPM's t = T is noise too; its x_t shrinks the image by sqrt(alpha_bar_t) as the
# noise grows, where this path trades one for the other in a straight line.)
def interpolate(x0, t, eps):
    """x_t = (1 - t) x_0 + t eps: rectified flow's path (Liu et al. 2022, Eq. 1), flow matching's
    optimal-transport path with sigma_min = 0 (Lipman et al. 2023, Eq. 20-22). Both run time the
    other way (their t is 1 - t here, their x_0 the noise); this is Esser et al. 2024's (Sec. 3)."""
    t = t.view(-1, 1, 1, 1)
    return (1 - t) * x0 + t * eps

def sample_t(n, how, generator, device):
    """The training times: logit-normal, the sigmoid of N(0, 1), which puts most of them mid-path,
    where the best velocity is least trivial (at t = 0 it is -x, at t = 1 x minus the data's mean;
    Esser et al. 2024, Sec. 3.1, first of 61 formulations in Sec. 5.1, Tab. 1); or uniform."""
    if how == "logit-normal":
        return torch.sigmoid(torch.randn(n, device=device, generator=generator))
    return torch.rand(n, device=device, generator=generator)

# The network is ddpm.py's U-Net, word for word (where its docstring says eps_theta, here it
# predicts v): its sinusoidal embedding has frequencies from 1 towards 1/10,000 radian per unit
# of time, made for DDPM's steps 0..999. Over t in [0, 1] even the fastest would turn at most one
# radian and the embedding would hardly change with t; over 1000 t they span the path as they
# span DDPM's 1,000 steps.
TIME_SCALE = 1000
# %% The network v_theta
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
# %% Training: the flow matching loss
def loss_fn(model, x0, t_sampling, gen):
    """Conditional flow matching (Lipman et al. 2023, Eq. 23; Liu et al. 2022, Eq. 1): t from
    sample_t, eps ~ N(0, I), and || (eps - x_0) - v_theta((1 - t) x_0 + t eps, t) ||^2. The
    target eps - x_0 is dx_t/dt along the path; its average over the x_0 and eps that pass
    through x_t is the velocity that carries N(0, I) to the data."""
    t = sample_t(len(x0), t_sampling, gen, x0.device)
    eps = torch.randn(x0.shape, device=x0.device, generator=gen)
    return F.mse_loss(model(interpolate(x0, t, eps), TIME_SCALE * t).float(), eps - x0)

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
# %% Sampling: Euler and Heun, from t = 1 to 0
@torch.no_grad()
def velocity(model, x, t):
    """v_theta(x, t) for a batch at one time t (a float), in x's dtype (bf16 on CUDA inside)."""
    t_batch = torch.full((len(x),), TIME_SCALE * t, device=x.device, dtype=x.dtype)
    with torch.autocast("cuda", torch.bfloat16, enabled=x.device.type == "cuda"):
        return model(x, t_batch).to(x.dtype)

def euler_step(model, x, t, t_next):
    """x_{t_next} = x_t + (t_next - t) v_theta(x_t, t): first order, one evaluation."""
    return x + (t_next - t) * velocity(model, x, t)

def heun_step(model, x, t, t_next):
    """Karras et al. 2022, Alg. 1 lines 4-8: Euler's step to x', then the trapezoid rule with the
    velocity there: second order, two evaluations. The step to t = 0 stays Euler's as in Alg. 1,
    which must (it divides by sigma = 0); here it saves an evaluation where logit-normal t seldom
    trained the network: N steps take 2N - 1."""
    v = velocity(model, x, t)
    x_euler = x + (t_next - t) * v
    if t_next == 0:
        return x_euler
    return x + (t_next - t) * (v + velocity(model, x_euler, t_next)) / 2

STEPS = {"euler": euler_step, "heun": heun_step}

def sample_loop(model, x, steps, sampler="heun", n_frames=0):
    """dx/dt = v_theta(x, t) from x at t = 1 (x_1 ~ N(0, I)) to t = 0 in `steps` equal steps of t,
    as minRF samples; returns x_0 and up to n_frames x_t of 64 images, from x_1 to x_0."""
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    keep = torch.linspace(1, steps, n_frames - 1).round().long().tolist() if n_frames else ()
    frames = [x[:64].clamp(-1, 1).cpu()] if n_frames else []  # the GIF starts from the noise
    for i in tqdm(range(steps), "sampling", leave=False):
        x = STEPS[sampler](model, x, ts[i], ts[i + 1])
        if i + 1 in keep:
            frames.append(x[:64].clamp(-1, 1).cpu())
    return x, frames

def evaluations(sampler, steps):  # network evaluations per image
    return 2 * steps - 1 if sampler == "heun" else steps
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
def save_forward(x0, generator, path):
    """forward.png: a row per image, x_t on the straight path at 10 t from 0 (x_0) to 1 (eps)."""
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    ts = torch.linspace(0, 1, 10, device=x0.device)
    xt = torch.stack([interpolate(x0, t.repeat(len(x0)), eps) for t in ts], 1)
    grid(to_uint8(xt.flatten(0, 1)), nrow=10).save(path)
def write_samples(model, n, shape, args, name="samples", device="cpu"):
    """NAME.png: n samples of --sampler; the final ones also reverse.gif and --npz (uint8 NHWC)."""
    gen = torch.Generator(device).manual_seed(args.seed)
    t0, images, frames = time.time(), [], []
    for start in range(0, n, args.sample_batch_size):
        x1 = torch.randn((min(args.sample_batch_size, n - start), *shape), device=device,
                         generator=gen)
        n_frames = 40 if start == 0 else 0  # the GIF shows the first batch
        x, f = sample_loop(model, x1, args.sampling_steps, args.sampler, n_frames)
        images.append(to_uint8(x))
        if start == 0:
            frames = f
    images = torch.cat(images)
    grid(images).save(Path(args.out_dir, f"{name}.png"))
    if name != "samples":
        return
    gif = [grid(to_uint8(f)) for f in frames]
    gif[0].save(Path(args.out_dir, "reverse.gif"), save_all=True, append_images=gif[1:],
                duration=[80] * len(gif[1:]) + [2000])
    if args.npz:
        np.savez(args.npz, arr_0=images.permute(0, 2, 3, 1).numpy())
    secs, evals = time.time() - t0, evaluations(args.sampler, args.sampling_steps)
    print(f"sampled {n} images in {secs:.1f} s ({n / secs:.1f} img/s; {args.sampler}, "
          f"{args.sampling_steps} steps, {evals} network evaluations an image): "
          f"{args.out_dir}/samples.png, reverse.gif {args.npz or ''}")
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
    "t_sampling": ("logit-normal", ("logit-normal", "uniform"), "sigmoid(N(0, 1)) or U(0, 1)"),
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
    "num_samples": (64, POSITIVE, "images in the final grid and in --npz"),
    "npz": (None, lambda s: s.removesuffix(".npz") + ".npz", "also save them, uint8 NHWC"),
    "sample_batch_size": ((1000, 64), POSITIVE, "images per sampling batch"),
    "sampler": ("heun", tuple(STEPS), "Euler's method or Heun's (Karras et al. 2022, Alg. 1)"),
    "sampling_steps": (10, POSITIVE, "steps, t = 1 to 0 (Heun: 2 evaluations each but the last)"),
    "device": ("auto", ("auto", "cuda", "mps", "cpu"), "auto picks cuda, then mps, then cpu"),
}
# The flags that a checkpoint fixes: its network, training times and data. Sampling takes them.
RUN_FLAGS = ("dataset", "image_size", "base_channels", "channel_mult", "num_res_blocks",
             "t_sampling")
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
        ckpt = None
        if args.sample_only or args.resume:
            ckpt = load_checkpoint(ckpt_path, resume=args.resume)
        elif ckpt_path.exists():
            raise ValueError(f"{ckpt_path} exists: pass --resume to go on, or a new --out-dir")
        fill_flags(args, device, ckpt["config"] if ckpt else None, ckpt_path)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
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
    if args.sample_only:
        write_samples(ema, args.num_samples, shape, args, device=device)
        return ema
    data = data.to(device)  # the whole set lives on the device
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        note = "" if device.type == "cuda" else " (no CUDA GPU: the small defaults, see --help)"
        print(f"{args.dataset}: {len(data)} images {tuple(shape)}; a U-Net of {params} parameters; "
              f"batch {args.batch_size} x {world} process(es) on {device}{note}")
        gen = torch.Generator(device).manual_seed(args.seed)
        save_forward(get_batch(data, 8, gen), gen, Path(args.out_dir, "forward.png"))
    def loss(net, gen):  # the flow matching loss on a random batch of the data
        return loss_fn(net, get_batch(data, args.batch_size, gen), args.t_sampling, gen)
    def preview(step):  # a grid every --sample-every steps
        write_samples(ema, 64, shape, args, f"samples_{step:06d}", device)
    extra = {"config": vars(args), "image_shape": shape, "fingerprint": found}
    start = ckpt["step"] if ckpt else 0
    if train(model, ema, opt, loss, args, start, ckpt_path, extra, preview):
        sys.exit(130)  # stopped by a signal: the usual exit status after Ctrl-C
    if rank == 0:
        write_samples(ema, args.num_samples, shape, args, device=device)
    if world > 1:
        dist.destroy_process_group()
    return ema
if __name__ == "__main__":
    main()
