"""The measuring side: sweeps and timings that import the technique scripts (which never import
this file, nor each other) and score samples with evaluate.py. Each writes OUT_DIR/NAME.txt and
OUT_DIR/NAME.json.

    python bench.py ddim-sweep --ckpt runs/ddpm/ckpt.pt           # S x eta, DDIM's Table 1 on MNIST
    python bench.py samplers --ckpt runs/ddpm/ckpt.pt     # ddim.py's samplers at 5-50 evaluations
    python bench.py nll --ckpt checkpoints/ddpm_mnist.pt --samples 1000   # bits/dim, DDPM's Eq. 5
    python bench.py flow --ckpt runs/flow/ckpt.pt,runs/flow_uniform/ckpt.pt   # Euler, Heun: 5-100
    python bench.py guidance-sweep --ckpt runs/conditional/ckpt.pt --sampling-steps 50   # w
    python bench.py guidance-sweep --ckpt runs/conditional/ckpt.pt --sampling-steps 50 \\
        --classifier runs/conditional/classifier.pt      # and classifier guidance beside it
    python bench.py speckles --ckpt runs/conditional/ckpt.pt    # what speckles the samples
    python bench.py reconstructions --ckpt runs/latent/ckpt.pt    # FID of latent.py's autoencoder
    python bench.py latent-vs-pixel --ckpt runs/latent/ckpt.pt --pixel-ckpt runs/ddpm/ckpt.pt
    python bench.py restoration --ckpt checkpoints/ddpm_mnist.pt --samples 500   # restore.py
    python bench.py memory --device cpu     # sampling's peak memory, and the scripts' estimates
    python bench.py plots     # samples/*.json and the loss log drawn as curves (matplotlib)
"""
import argparse, csv, json, math, multiprocessing, os, platform, statistics, textwrap, time
from pathlib import Path

import torch

import conditional, ddim, ddpm, evaluate, flow, latent, restore

DDIM_STEPS, DDIM_ETAS = (10, 20, 50, 100, 1000), (0.0, 1.0)  # DDIM Table 1's S and eta
SAMPLERS = (("ddim", 0.0), ("ddim", 1.0), ("dpm++2m", None), ("pndm", None), ("sde", None))
EVALUATIONS = (5, 10, 20, 50)  # network evaluations per image: the samplers sweep's S
FLOW_EVALUATIONS = (5, 10, 20, 50, 100)  # the flow sweep's (Heun: 2N - 1 of them, at most these)
GUIDANCE = (0.0, 0.5, 1.0, 2.0, 4.0)  # the w of the guidance table (Ho & Salimans Table 1)
CLASSIFIER_SCALES = (1.0, 2.0, 4.0, 8.0)  # the s of classifier guidance (Dhariwal & Nichol Fig. 3)
OUT_DIR = "runs/bench"  # where a sweep writes, unless --out-dir
# The speckle sweep's runs, each one change to w = 1, S = 50, eta 0 with x_0 clipped
SPECKLE_RUNS = (("eta 0", {}), ("eta 0, x_0 not clipped", {"clip_x0": False}),
                ("eta 0, w = 0", {"w": 0.0}), ("eta 0, S = 200", {"steps": 200}),
                ("eta 0.2", {"eta": 0.2}), ("eta 0.5", {"eta": 0.5}), ("eta 1", {"eta": 1.0}))

def load(script, path, device, scripts=None):
    """A checkpoint, its config (with the flags it fixes) and its alpha_bar, on device."""
    scripts = scripts or (script.SCRIPT,)
    ckpt = script.load_checkpoint(Path(path), scripts, keys=("image_shape", "ema"))
    config = ckpt["config"]
    if config.get("train_classifier"):  # conditional.py --train-classifier's file
        raise ValueError(f"{path} is a classifier's file: pass it as --classifier")
    alpha_bar64 = script.make_schedule(config["schedule"], config["timesteps"])[1]
    return ckpt, config, alpha_bar64.float().to(device)

def score(images, config, args, labels=None):
    """evaluate.py's metrics of uint8 NCHW images, against the test split of the model's data."""
    return evaluate.evaluate_images(images.permute(0, 2, 3, 1).numpy(), labels, config["dataset"],
                                    args.data_dir, args.cache_dir, args.device, args.seed)

def check_scored(config):
    """Before any work: evaluate.py must know the model's dataset at its own size."""
    dataset, size = config["dataset"], config["image_size"]
    if dataset not in evaluate.DATASETS or size != evaluate.DATASETS[dataset][1][0]:
        raise evaluate.InputError(f"evaluate.py scores {', '.join(evaluate.DATASETS)} at their own "
                                  f"size; this model is of {dataset} at {size}")

def timed(fn, device):
    """fn() and its wall time in seconds, the GPU synchronised."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0

def ddim_sweep(args, device):
    """For each eta and S: sample --samples images with ddim.py from a ddim.py or ddpm.py
    checkpoint, time them and score them (DDIM Table 1 on this model)."""
    ckpt, config, alpha_bar = load(ddim, args.ckpt, device, ("ddim", "ddpm"))
    check_scored(config)
    T = len(alpha_bar)
    steps = args.ddim_steps or [S for S in DDIM_STEPS if S <= T]  # the defaults that fit T
    if max(steps) > T:
        raise ValueError(f"--ddim-steps {max(steps)} is more than the model's T = {T}")
    shape, model = ckpt["image_shape"], ddim.build_model(config, ckpt["image_shape"][0])
    model.to(device).load_state_dict(ckpt["ema"])
    rows = []
    for eta in DDIM_ETAS:
        for S in steps:
            taus = ddim.sampling_timesteps(T, S, args.spacing)
            def sample():
                return ddim.generate(model, args.samples, shape, alpha_bar, taus, eta, args.seed,
                                     args.sample_batch_size)
            (images, _), secs = timed(sample, device)
            rows.append({"S": S, "eta": eta, **metrics(score(images, config, args)),
                         "seconds": secs, "img_s": args.samples / secs})
            print(row_text(rows[-1]), flush=True)
    return rows

def sampler_sweep(args, device):
    """For each of ddim.py's samplers and each S of --ddim-steps (network evaluations per image):
    --samples images from the same x_T, timed and scored, and the RMSE (grey levels of 255) of the
    first --reference-samples of them against the ODE's x_0: DDIM eta = 0 with all T steps."""
    ckpt, config, alpha_bar = load(ddim, args.ckpt, device, ("ddim", "ddpm"))
    check_scored(config)
    T, shape = len(alpha_bar), ckpt["image_shape"]
    steps = args.ddim_steps or [S for S in EVALUATIONS if S <= T]
    bad = [S for S in steps if not 4 <= S <= T]
    if bad:
        raise ValueError(f"--ddim-steps {bad[0]}: the samplers take 4 to T = {T} (PNDM needs 4)")
    model = ddim.build_model(config, shape[0]).to(device)
    model.load_state_dict(ckpt["ema"])
    x_T = torch.randn((args.samples, *shape), generator=torch.Generator().manual_seed(args.seed))
    def run(sampler, eta, S, n):  # the first n of x_T, in batches, from S steps
        taus, out = ddim.sampling_timesteps(T, S, args.spacing), []
        gen = torch.Generator(device).manual_seed(args.seed)
        for x in x_T[:n].to(device).split(args.sample_batch_size):
            if sampler == "ddim":
                out.append(ddim.ddim_sample_loop(model, x, alpha_bar, taus, eta, gen)[0])
            else:
                out.append(ddim.solver_sample_loop(model, x, alpha_bar, taus, sampler, gen)[0])
        return torch.cat(out).clamp(-1, 1)
    n_ref = min(args.reference_samples, args.samples)
    reference = run("ddim", 0.0, T, n_ref) if n_ref else None
    rows = []
    for sampler, eta in SAMPLERS:
        for S in steps:
            x0, secs = timed(lambda: run(sampler, eta, S, args.samples), device)
            rmse = (x0[:n_ref] - reference).pow(2).mean().sqrt().item() * 127.5 if n_ref else None
            rows.append({"sampler": sampler, "eta": eta, "evaluations": S,
                         **metrics(score(ddim.to_uint8(x0), config, args)), "rmse": rmse,
                         "seconds": secs, "img_s": args.samples / secs})
            print(row_text(rows[-1]), flush=True)
    return rows

def flow_sweep(args, device):
    """For each flow.py checkpoint of --ckpt (comma-separated), Euler and Heun at each of
    --ddim-steps network evaluations (Heun's N steps make 2N - 1: the N that makes most, at most
    as many): --samples images from the same x_1, timed and scored."""
    rows = []
    for path in args.ckpt.split(","):
        ckpt = flow.load_checkpoint(Path(path), keys=("image_shape", "ema"))
        config, shape = ckpt["config"], ckpt["image_shape"]
        check_scored(config)
        model = flow.build_model(config, shape[0]).to(device)
        model.load_state_dict(ckpt["ema"])
        gen = torch.Generator().manual_seed(args.seed)
        batches = torch.randn((args.samples, *shape), generator=gen).to(device).split(
            args.sample_batch_size)  # x_1, the same for every row
        for sampler in flow.STEPS:
            for n in args.ddim_steps or FLOW_EVALUATIONS:
                steps = (n + 1) // 2 if sampler == "heun" else n
                def run():
                    x0 = [flow.sample_loop(model, x, steps, sampler)[0] for x in batches]
                    return torch.cat(x0)
                x0, secs = timed(run, device)
                rows.append({"ckpt": path, "t_sampling": config["t_sampling"],
                             "seed": config["seed"], "sampler": sampler,
                             "evaluations": flow.evaluations(sampler, steps),
                             **metrics(score(flow.to_uint8(x0), config, args)),
                             "seconds": secs, "img_s": args.samples / secs})
                print(row_text(rows[-1]), flush=True)
    return rows

def nll(args, device):
    """Bits per dimension of a ddpm.py model on the first --samples test images: DDPM's bound
    (Eq. 5) with all T terms, for sigma_t^2 = beta_tilde_t and = beta_t from the same network
    evaluations; the mean over the images, its standard error, and each term's mean (the plot's)."""
    ckpt, config, _ = load(ddpm, args.ckpt, device, ("ddpm", "ddim"))
    betas, alpha_bar = ddpm.make_schedule(config["schedule"], config["timesteps"])
    model = ddpm.build_model(config, ckpt["image_shape"][0]).to(device)
    model.load_state_dict(ckpt["ema"])
    images = restore.load_test_images(config["dataset"], args.data_dir, args.samples,
                                      ckpt["image_shape"])
    if len(images) < args.samples:
        raise ValueError(f"--samples {args.samples}: the test split of {config['dataset']} has "
                         f"{len(images)} images")
    if device.type == "mps":
        raise ValueError("nll computes in float64, which MPS lacks: pass --device cpu")
    gen = torch.Generator(device).manual_seed(args.seed)
    terms = {"posterior": [], "beta": []}
    def bound():
        for batch in images.split(args.sample_batch_size):
            x0 = batch.to(device).double() / 127.5 - 1
            for sigma, nats in ddpm.vlb_terms(model, x0, betas.to(device), alpha_bar.to(device),
                                              gen).items():
                terms[sigma].append(nats.cpu())
    _, secs = timed(bound, device)
    nats_per_bit_dim = math.log(2) * images[0].numel()  # nats per image over bits per dimension
    rows = []
    for sigma, parts in terms.items():
        bits = torch.cat(parts) / nats_per_bit_dim  # (images, T + 1): each term in bits/dim
        per_image = bits.sum(1)
        rows.append({"sigma": sigma, "images": len(images), "bits_per_dim": per_image.mean().item(),
                     "standard_error": per_image.std().item() / len(images) ** 0.5,
                     "seconds": secs, "terms": bits.mean(0).tolist()})
        print(row_text(rows[-1]), flush=True)
    return rows

def guidance_sweep(args, device):
    """For each w: sample --samples images cycling through the classes with conditional.py, from
    the same noise and labels, time them and score them with their labels (Ho & Salimans
    Table 1); with --classifier, then for each s of --scales the same with classifier guidance.
    Both rows' s is the power of p(y | x_t) that the guided noise samples (s = 1 + w for CFG)."""
    ckpt, config, alpha_bar = load(conditional, args.ckpt, device)
    check_scored(config)
    if args.sampling_steps > len(alpha_bar):
        raise ValueError(f"--sampling-steps {args.sampling_steps} is more than the model's T = "
                         f"{len(alpha_bar)}")
    if args.classifier and not Path(args.classifier).is_file():
        raise ValueError(f"--classifier {args.classifier}: no such file; train one with "
                         "conditional.py --train-classifier")
    classifier = None
    if args.classifier:
        classifier = conditional.load_classifier(Path(args.classifier), ckpt["image_shape"],
                                                 ckpt["classes"], config, device)
    runs = [("free", w, 1 + w) for w in args.ws]
    if classifier:
        runs += [("classifier", None, s) for s in args.scales]
    if not runs:
        raise ValueError("nothing to sweep: --ws '' needs a --classifier")
    model = conditional.build_model(config, ckpt["image_shape"][0], len(ckpt["classes"]))
    model.to(device).load_state_dict(ckpt["ema"])
    labels, rows = conditional.cycle_labels(args.samples, len(ckpt["classes"])), []
    for mode, w, s in runs:
        def sample():
            return conditional.generate(
                model, labels, s if w is None else w, ckpt["image_shape"], alpha_bar, args.seed,
                args.sample_batch_size, args.sampling_steps, args.eta,
                classifier=classifier if w is None else None)
        (images, _), secs = timed(sample, device)
        r = score(images, config, args, labels.numpy())
        rows.append({"guidance": mode, "w": w, "s": s, "S": args.sampling_steps, "eta": args.eta,
                     **metrics(r), "accuracy": r["accuracy"], "seconds": secs,
                     "img_s": args.samples / secs})
        print(row_text(rows[-1]), flush=True)
    return rows

def speckles(images, bright=64):
    """The isolated bright pixels of uint8 (N, 1, H, W) images, a mask: >= bright (a quarter of
    white: fainter grain is left out), with none of their 8 neighbours >= bright. MNIST's strokes
    are never one pixel wide."""
    on = (images >= bright).float()
    neighbours = torch.nn.functional.conv2d(on, torch.ones(1, 1, 3, 3), padding=1) - on
    return (on > 0) & (neighbours == 0)

def speckle_sweep(args, device):
    """conditional.py's samples at w = 1, DDIM S = 50, eta 0 (x_0 clipped), then with each
    candidate cause of speckles changed (SPECKLE_RUNS), from the same x_T and labels: the share of
    samples with a speckle (an isolated bright pixel), speckles per image, FID, accuracy; and the
    real test images' counts. speckles.png: a row per run, 0 to 9, each speckle marked red. One
    generator draws x_T, then each run's z in turn: the sweep reproduces as a whole."""
    ckpt, config, alpha_bar = load(conditional, args.ckpt, device)
    check_scored(config)
    classes, shape = len(ckpt["classes"]), ckpt["image_shape"]
    if shape[0] != 1:
        raise ValueError(f"speckles counts grey images; {args.ckpt} makes {shape[0]} channels")
    model = conditional.build_model(config, shape[0], classes)
    model.to(device).load_state_dict(ckpt["ema"])
    gen = torch.Generator(device).manual_seed(args.seed)
    labels = conditional.cycle_labels(args.samples, classes, device)
    x_T = torch.randn((args.samples, *shape), device=device, generator=gen)
    real = evaluate.load_dataset(config["dataset"], args.data_dir)[2][:args.samples]
    count = speckles(real.permute(0, 3, 1, 2)).flatten(1).sum(1).float()
    rows = [{"run": "test images", "speckled": (count > 0).float().mean().item(),
             "per_image": count.mean().item()}]
    picture = []
    for name, change in SPECKLE_RUNS:
        run = {"w": 1.0, "steps": 50, "eta": 0.0, "clip_x0": True} | change
        run["steps"] = min(run["steps"], len(alpha_bar))  # S is at most T
        taus = conditional.sampling_timesteps(len(alpha_bar), run["steps"])
        images = []
        for x, y in zip(x_T.split(args.sample_batch_size), labels.split(args.sample_batch_size)):
            def eps(x, t):  # classifier-free guidance's noise, as conditional.generate's
                return conditional.guided_eps(model, x, t, y, run["w"], classes)
            x = conditional.ddim_sample_loop(eps, x, alpha_bar, taus, run["eta"], gen,
                                             clip_x0=run["clip_x0"])[0]
            images.append(conditional.to_uint8(x))
        images = torch.cat(images)
        mask = speckles(images)
        count = mask.flatten(1).sum(1).float()
        r = score(images, config, args, labels.cpu().numpy())
        rows.append({"run": name, **run, "speckled": (count > 0).float().mean().item(),
                     "per_image": count.mean().item(), **metrics(r), "accuracy": r["accuracy"]})
        print(row_text(rows[-1]), flush=True)
        marked = images[:10].repeat(1, 3, 1, 1).permute(0, 2, 3, 1)  # 0 to 9, as RGB
        marked[mask[:10, 0]] = torch.tensor([255, 0, 0], dtype=torch.uint8)  # the speckles red
        marked = marked.permute(0, 3, 1, 2)  # 3x larger, or a one-pixel speck is hard to see:
        picture.append(marked.repeat_interleave(3, 2).repeat_interleave(3, 3))
    path = Path(args.out_dir or OUT_DIR) / "speckles.png"
    conditional.grid(torch.cat(picture), nrow=10).save(path)
    return rows

def reconstructions(args, device):
    """FID of the reconstructions of --samples training images by latent.py's autoencoder (the EMA
    in stage 2's checkpoint, or stage 1's ae.pt), against the floor of real images."""
    ckpt = latent.load_checkpoint(Path(args.ckpt), keys=("image_shape",))
    config, key = ckpt["config"], "ae" if ckpt.get("stage") == "diffusion" else "ema"
    check_scored(config)
    ae = latent.Autoencoder(ckpt["image_shape"][0], config["ae_channels"],
                            config["latent_channels"])
    ae.load_state_dict(ckpt[key])
    data = latent.load_images(config["dataset"], args.data_dir, config["image_size"])[0]
    gen = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(data), generator=gen)[:args.samples]
    rec = []
    with torch.no_grad():
        ae.to(device)
        for i in idx.split(args.sample_batch_size):
            x = data[i].to(device).float() / 127.5 - 1
            rec.append(latent.to_uint8(ae.decode(ae.encode(x)[0])))  # the posterior mean
    rec = torch.cat(rec)
    mse = ((rec.float() - data[idx].float()) / 255).pow(2).mean().item()
    r = score(rec, config, args)
    return [{"images": len(idx), "mse": mse, **metrics(r), "floor_fid": r["floor_fid"],
             "fid_over_floor": r["fid"] / r["floor_fid"]}]

def latent_vs_pixel(args, device, reps=5):
    """Time latent.py's two stages and ddpm.py's U-Net on this machine, each with the step counts
    and batch sizes of its checkpoint: reps training steps each (after one untimed), and their
    sampling passes (at --sample-batch-size), extrapolated to whole runs and --samples samples."""
    rows = []
    for script, path in ((latent, args.ckpt), (ddpm, args.pixel_ckpt)):
        ckpt = script.load_checkpoint(Path(path), keys=("image_shape",))
        config = ckpt["config"]
        shape = ckpt.get("latent_shape", ckpt["image_shape"])
        unet = script.build_model(config, shape[0]).to(device)
        stages = [("U-Net", unet, shape, config["steps"], config["batch_size"])]
        if script is latent:
            ae = latent.Autoencoder(ckpt["image_shape"][0], config["ae_channels"],
                                    config["latent_channels"]).to(device)
            stages.insert(0, ("autoencoder", ae, ckpt["image_shape"], config["ae_steps"],
                              config["ae_batch_size"]))
        for name, net, shp, steps, batch in stages:
            opt = torch.optim.AdamW(net.parameters())
            def step():
                x = torch.randn((batch, *shp), device=device)
                with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                    t = torch.randint(config["timesteps"], (batch,), device=device)
                    y = net(x, t) if net is unet else net.decode(net.encode(x)[0])
                opt.zero_grad()
                (y.float() - x).pow(2).mean().backward()
                opt.step()
            def steps_in_a_row():
                for _ in range(reps):
                    step()
            step()
            _, secs = timed(steps_in_a_row, device)
            rate = reps * batch / secs
            rows.append({"script": script.SCRIPT, "part": f"train {name}", "steps": steps,
                         "batch": batch, "img_s": rate, "minutes": steps * batch / rate / 60})
        S = latent.DDIM_STEPS if script is latent else config["timesteps"]  # each one's own sampler
        x = torch.randn((args.sample_batch_size, *shape), device=device)
        t = torch.zeros(args.sample_batch_size, dtype=torch.long, device=device)
        def passes():
            for _ in range(reps):
                unet(x, t)
        with torch.no_grad():
            unet(x, t)
            _, secs = timed(passes, device)
        rate = reps * args.sample_batch_size / secs / S
        rows.append({"script": script.SCRIPT, "part": f"sample, {S} passes", "img_s": rate,
                     "minutes": args.samples / rate / 60})
    for r in rows:
        print(f"{r['script']:7} {r['part']:22} {r['img_s']:10.1f} img/s {r['minutes']:8.1f} min")
    return rows

def restoration(args, device):
    """For each task of restore.py: the first --samples test images corrupted and restored with a
    ddpm.py checkpoint; PSNR against the clean images and evaluate.py's FID against the test
    split, of the restored images and of the task's naive baseline (and of the clean ones)."""
    ckpt, config, alpha_bar = load(restore, args.ckpt, device, ("ddpm", "ddim"))
    check_scored(config)
    C, H, W = ckpt["image_shape"]
    if "superres" in args.tasks and (H % args.scale or W % args.scale or args.scale < 2):
        raise ValueError(f"--scale {args.scale} does not divide the model's {H}x{W} images into "
                         f"blocks: pick a divisor of {H} and {W} above 1")
    if args.restore_steps > len(alpha_bar):
        raise ValueError(f"--restore-steps {args.restore_steps} is more than the model's T = "
                         f"{len(alpha_bar)}")
    model = restore.build_model(config, C).to(device)
    model.load_state_dict(ckpt["ema"])
    images = restore.load_test_images(config["dataset"], args.data_dir, args.samples,
                                      ckpt["image_shape"])
    clean = score(images, config, args)
    rows = [{"task": "none", "images": "clean", "psnr": None, **metrics(clean), "seconds": 0}]
    print(row_text(rows[-1]), flush=True)
    for task in args.tasks:
        def run():
            return restore.run_task(model.eval(), images, task, alpha_bar, args.noise_std,
                                    args.scale, args.restore_steps, args.resample, args.seed,
                                    args.sample_batch_size)
        (_, baseline, restored), secs = timed(run, device)
        for name, out in (("restored", restored), ("baseline", baseline)):
            rows.append({"task": task, "images": name, "psnr": restore.psnr(out, images),
                         **metrics(score(out, config, args)),
                         "seconds": secs if name == "restored" else 0})
            print(row_text(rows[-1]), flush=True)
    return rows

def memory_probe(script, column, batch, queue):
    """In a fresh process: the growth of peak resident memory (Linux's VmHWM) over one sampling
    call of two steps at a batch, for a script's U-Net at its CUDA or CPU column of FLAGS."""
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    module = {"ddpm": ddpm, "conditional": conditional, "latent": latent}[script]
    config = {k: v[0][column] if type(v[0]) is tuple else v[0] for k, v in module.FLAGS.items()}
    shape, alpha_bar = [1, 28, 28], torch.tensor([0.99, 0.01])
    with torch.no_grad():
        if script == "latent":
            ae = latent.Autoencoder(1, config["ae_channels"], config["latent_channels"])
            model = latent.build_model(config, config["latent_channels"])
            z = torch.randn(batch, config["latent_channels"], 7, 7)
            before = status("VmRSS")
            z = latent.ddim_sample_loop(model, z, alpha_bar, torch.tensor([0, 1]), clip_x0=False)[0]
            latent.decode(ae, z, 1.0)
        elif script == "conditional":
            model = conditional.build_model(config, 1, 10)
            before = status("VmRSS")
            conditional.generate(model, torch.arange(batch) % 10, 1.0, shape, alpha_bar, 0, batch,
                                 2, 0.0)
        else:
            model = ddpm.build_model(config, 1)
            before = status("VmRSS")
            ddpm.p_sample_loop(model, (batch, *shape), torch.tensor([0.01, 0.5]), alpha_bar)
    estimate = ddpm.sampling_bytes(batch, shape, config["base_channels"])
    if script == "conditional":  # CFG doubles the batch
        estimate = conditional.sampling_bytes(2 * batch, shape, config["base_channels"])
    if script == "latent":
        estimate = latent.decoding_bytes(batch, shape, config["ae_channels"])
    queue.put({"script": script, "column": ("cuda", "cpu")[column], "batch": batch,
               "measured": status("VmHWM") - before, "estimate": estimate})

def memory(args, device):
    """memory_probe for each script, column and batch of 64, 256 and 1,000 (a CPU and Linux only):
    the measurements that the scripts' sampling_bytes and decoding_bytes are fitted to."""
    if device.type != "cpu" or not Path("/proc/self/status").exists():
        raise ValueError("memory measures a CPU's resident memory on Linux: pass --device cpu")
    spawn, rows = multiprocessing.get_context("spawn"), []
    for script in ("ddpm", "conditional", "latent"):
        for column in (0, 1):
            for batch in (64, 256, 1000):
                queue = spawn.Queue()
                child = spawn.Process(target=memory_probe, args=(script, column, batch, queue))
                child.start()
                row = queue.get()
                child.join()
                rows.append(row | {"ratio": row["measured"] / row["estimate"]})
                print(row_text(rows[-1]), flush=True)
    return rows

# ---- plots: the committed result files drawn as curves, with no checkpoint and no scoring ----

def figure(panels, title, caption):
    """Panels side by side, captioned below; a Figure draws with Agg: no pyplot, no window."""
    from matplotlib.figure import Figure  # only the plots need matplotlib
    fig = Figure(figsize=(6.4 * panels, 5.2), layout="constrained")
    fig.suptitle(title)
    fig.supxlabel(textwrap.fill(caption, 60 * panels), fontsize=8)  # wrapped to the figure
    return fig, fig.subplots(1, panels, squeeze=False)[0]

def legend(ax, ncols=1):  # above the panel, under the title, where it hides no data
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.02), ncols=ncols, fontsize=8)

def read_result(path):
    result = json.loads(path.read_text())
    return result, f"{result['samples']} samples per point; {result['hardware']}"

def plot_ddim(path):
    """(a) FID against S for each eta and model, and the reference samplers as lines."""
    result, caption = read_result(path)
    fig, (ax,) = figure(1, "DDIM on MNIST: FID against sampling steps", caption)
    models = list(dict.fromkeys(r["model"] for r in result["rows"]))  # in the file's order
    for i, model in enumerate(models):
        for eta, style in zip(DDIM_ETAS, ("-o", "--s")):
            rows = [r for r in result["rows"] if r["model"] == model and r["eta"] == eta]
            ax.plot([r["S"] for r in rows], [r["fid"] for r in rows], style, color=f"C{i}",
                    label=f"{model}, eta = {eta:g}")
    for ref in result.get("reference", []):
        ax.axhline(ref["fid"], color=f"C{models.index(ref['model'])}", linestyle=":",
                   label=f"{ref['model']}: {ref['sampler']}")
    steps = sorted({r["S"] for r in result["rows"]})
    ax.set_xscale("log")
    ax.set_xticks(steps, [str(S) for S in steps])
    ax.set_xlabel("S, sampling steps (network evaluations per image, log scale)")
    ax.set_ylabel("FID against the MNIST test split (lower is better)")
    legend(ax)
    return fig

def plot_samplers(path):
    """(e) FID against network evaluations for each of ddim.py's samplers; references as lines."""
    result, caption = read_result(path)
    fig, (ax,) = figure(1, "ddim.py's samplers on MNIST: FID against network evaluations", caption)
    names = {"dpm++2m": "DPM-Solver++(2M)", "pndm": "PNDM", "sde": "SDE, Euler-Maruyama"}
    for sampler, eta in SAMPLERS:
        rows = [r for r in result["rows"] if r["sampler"] == sampler and r["eta"] == eta]
        label = f"DDIM, eta = {eta:g}" if sampler == "ddim" else names[sampler]
        ax.plot([r["evaluations"] for r in rows], [r["fid"] for r in rows], "-o", label=label)
    for ref, style in zip(result.get("reference", []), (":", "--")):
        ax.axhline(ref["fid"], color="k", linestyle=style, label=ref["sampler"])
    evaluations = sorted({r["evaluations"] for r in result["rows"]})
    ax.set_xscale("log")
    ax.set_xticks(evaluations, [str(n) for n in evaluations])
    ax.set_xticks([], minor=True)
    ax.set_yscale("log")  # the SDE's few-step FIDs lie far above the others'
    ticks = [v for v in (2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50, 100, 150) if v < ax.get_ylim()[1]]
    ax.set_yticks(ticks, [str(v) for v in ticks])
    ax.set_yticks([], minor=True)
    ax.set_xlabel("network evaluations per image (log scale)")
    ax.set_ylabel("FID against the MNIST test split (log scale, lower is better)")
    legend(ax, ncols=2)
    return fig

def plot_flow(path):
    """(g) FID against network evaluations: flow.py's samplers and training times (seed 0), and
    ddim.py's on the 12-minute ddpm.py model from samplers_cpu.json beside it, with Alg. 2's."""
    result, caption = read_result(path)
    fig, (ax,) = figure(1, "flow.py and ddpm.py on MNIST: FID against network evaluations", caption)
    for how, style in (("logit-normal", "-o"), ("uniform", "--s")):
        for i, sampler in enumerate(flow.STEPS):
            rows = [r for r in result["rows"]
                    if (r["t_sampling"], r["sampler"], r["seed"]) == (how, sampler, 0)]
            ax.plot([r["evaluations"] for r in rows], [r["fid"] for r in rows], style,
                    color=f"C{i}", label=f"flow.py, {sampler}, {how} t")
    ddpm_result = read_result(path.with_name("samplers_cpu.json"))[0]
    for i, (sampler, eta, name) in enumerate((("ddim", 1.0, "DDIM eta = 1"),
                                              ("dpm++2m", None, "DPM-Solver++(2M)"))):
        rows = [r for r in ddpm_result["rows"] if r["sampler"] == sampler and r["eta"] == eta]
        ax.plot([r["evaluations"] for r in rows], [r["fid"] for r in rows], ":^",
                color=f"C{i + 2}", label=f"ddpm.py's 12-minute model, {name}")
    alg2 = ddpm_result["reference"][0]
    ax.axhline(alg2["fid"], color="k", linestyle=":", label=alg2["sampler"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([5, 10, 20, 50, 100], ["5", "10", "20", "50", "100"])
    ax.set_yticks([3, 4, 5, 6, 8, 10], ["3", "4", "5", "6", "8", "10"])
    ax.minorticks_off()
    ax.set_xlabel("network evaluations per image (log scale)")
    ax.set_ylabel("FID against the MNIST test split (log scale, lower is better)")
    legend(ax, ncols=2)
    return fig

def plot_minutes(path):
    """(h) FID against training minutes on 2 CPU cores, one run per point (its cosine decay ending
    where it stops; rows in the order of minutes), each sampler a line; images seen on top."""
    result, caption = read_result(path)
    fig, (ax,) = figure(1, "ddpm.py and flow.py on MNIST: what each CPU minute buys", caption)
    for sampler in dict.fromkeys(r["sampler"] for r in result["rows"]):  # in the file's order
        rows = [r for r in result["rows"] if r["sampler"] == sampler]
        ax.plot([r["minutes"] for r in rows], [r["fid"] for r in rows], "-o", label=sampler)
    ax.axhline(result["floor_fid"], color="k", linestyle=":", label="1,000 real images")
    ax.set(xscale="log", yscale="log", xlabel="training minutes on 2 CPU cores (log scale)",
           ylabel="FID of 1,000 samples (log scale, lower is better)")
    minutes = sorted({r["minutes"] for r in result["rows"]})
    ax.set_xticks(minutes, [f"{m:.0f}" for m in minutes], minor=False)
    ax.set_yticks([0.5, 1, 2, 3, 4, 6], ["0.5", "1", "2", "3", "4", "6"])
    ax.minorticks_off()
    rate = result["rows"][0]["images_seen"] / result["rows"][0]["minutes"]  # images per minute
    top = ax.secondary_xaxis("top", functions=(lambda m: m * rate, lambda n: n / rate))
    top.set_xticks([m * rate for m in minutes], [f"{m * rate / 1000:.0f}k" for m in minutes])
    top.set_xlabel(f"images seen (at {rate / 60:.0f} img/s)")
    top.minorticks_off()
    ax.legend(loc="upper right", fontsize=8)
    return fig

def plot_nll(path):
    """(f) Each term of the bound against t, in bits per dimension: where the bits go."""
    result, caption = read_result(path)
    fig, (ax,) = figure(1, "ddpm.py's bound on MNIST: its terms against t", caption)
    for r, style in zip(result["rows"], ("-", "--")):
        name = {"posterior": "sigma_t^2 = beta_tilde_t", "beta": "sigma_t^2 = beta_t"}[r["sigma"]]
        terms = r["terms"][:-1]  # L_0 .. L_{T-1}; L_T, the prior's, is in the label
        ax.plot(range(1, len(terms) + 1), terms, style, label=f"{name}: {r['bits_per_dim']:.3f} "
                f"bits/dim in all (L_T {r['terms'][-1]:.1e})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("t (log scale): L_0 at t = 1, L_{t-1} at t")
    ax.set_ylabel("the term's mean, bits per dimension (log scale)")
    legend(ax)
    return fig

def plot_guidance(path):
    """(b) FID and class accuracy against guidance strength, both guidances on one axis: s, the
    power of p(y | x_t) the guided noise samples, which is 1 + w for CFG."""
    result, caption = read_result(path)
    fig, axes = figure(2, "Guidance on MNIST: CFG against classifier guidance", caption)
    runs = (("free", "-o", "classifier-free guidance (CFG), w = s - 1"),
            ("classifier", "--s", "classifier guidance"))
    for mode, style, label in runs:
        rows = [r for r in result["rows"] if r["guidance"] == mode]
        for ax, key in zip(axes, ("fid", "accuracy")):
            ax.plot([r["s"] for r in rows], [r[key] for r in rows], style, label=label)
    axes[0].set_ylabel("FID against the MNIST test split (lower is better)")
    axes[1].set_ylabel("class accuracy (fraction of samples classified as their label)")
    strengths = sorted({r["s"] for r in result["rows"]})
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(strengths, [f"{s:g}" for s in strengths])
        ax.set_xlabel("guidance strength s, the power of p(y | x_t) (log scale; for CFG s = 1 + w)")
    legend(axes[0])
    return fig

def plot_loss(path):
    """(c) The training loop's log.csv: loss against steps. A CSV names no machine, so the caption
    takes it from a JSON beside it (the same name, .json) where there is one."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    hardware = "hardware not recorded"
    if path.with_suffix(".json").is_file():
        hardware = json.loads(path.with_suffix(".json").read_text())["hardware"]
    img_s = statistics.median(float(r["img_s"]) for r in rows)
    caption = f"{path.name}: {len(rows)} log lines, median {img_s:.0f} img/s; {hardware}"
    fig, (ax,) = figure(1, "ddpm.py: training loss against steps", caption)
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter("{x:g}")  # plain numbers, not powers of ten
    ax.yaxis.set_minor_formatter("{x:g}")
    ax.set_xlabel("training step (one batch each)")
    ax.set_ylabel("loss: mean squared error of eps_theta (log scale)")
    return fig

def plot_restoration(path):
    """(d) PSNR and FID per task, of the naive baseline on what is observed and of the restored."""
    result, caption = read_result(path)
    fig, axes = figure(2, "restore.py on MNIST: observed against restored", caption)
    rows = [r for r in result["rows"] if r["images"] != "clean"]
    # bench.py's rows have no resample; the README's extra row of RePaint's resampling has 3
    tasks = list(dict.fromkeys((r["task"], r.get("resample", 1)) for r in rows))
    bars = (("baseline", "observed (naive baseline)"), ("restored", "restored"))
    for n, (images, label) in enumerate(bars):
        found = {(r["task"], r.get("resample", 1)): r for r in rows if r["images"] == images}
        for ax, key in zip(axes, ("psnr", "fid")):
            x = [i - 0.2 + 0.4 * n for i in range(len(tasks))]
            drawn = ax.bar(x, [found[t][key] for t in tasks], width=0.4, label=label)
            ax.bar_label(drawn, fmt="%.3g", fontsize=7)
    for r in result["rows"]:
        if r["images"] == "clean":
            axes[1].axhline(r["fid"], color="k", linestyle=":", label="clean images (the floor)")
    axes[0].set_ylabel("PSNR against the clean images (dB)\nhigher is better")
    axes[1].set_ylabel("FID against the MNIST test split (log scale)\nlower is better")
    axes[1].set_yscale("log")
    axes[1].yaxis.set_major_formatter("{x:g}")
    names = [task if resample == 1 else f"{task}\nresample {resample}" for task, resample in tasks]
    for ax in axes:
        ax.set_xticks(range(len(tasks)), names, rotation=20, ha="right", fontsize=8)
        ax.set_xlabel("task")
        ax.margins(y=0.1)
    legend(axes[1], ncols=3)
    return fig

# Each plot: its picture, the function that draws it, and the result file it reads.
PLOTS = {"plot_ddim_fid.png": (plot_ddim, "ddim_sweep_cpu.json"),
         "plot_samplers.png": (plot_samplers, "samplers_cpu.json"),
         "plot_nll_terms.png": (plot_nll, "nll_cpu.json"),
         "plot_flow.png": (plot_flow, "flow_cpu.json"),
         "plot_minutes.png": (plot_minutes, "ddpm_minutes_cpu.json"),
         "plot_guidance.png": (plot_guidance, "guidance_sweep_cpu.json"),
         "plot_training_loss.png": (plot_loss, "ddpm_mnist_cpu_log.csv"),
         "plot_restoration.png": (plot_restoration, "restoration_cpu.json")}

def plots(results, out):
    """Each of PLOTS from its file in results to out, written whole (a temporary file, renamed);
    one line for each skipped because its file is missing."""
    out.mkdir(parents=True, exist_ok=True)
    for name, (draw, source) in PLOTS.items():
        path = results / source
        if not path.is_file():
            print(f"plots: skipped {name}: no {path}")
            continue
        try:
            fig = draw(path)
        except (KeyError, ValueError) as e:  # a hand-written file's mistake, in one line
            raise ValueError(f"{path}: cannot draw {name}: {type(e).__name__} {e}")
        tmp = out / f"{name}.{os.getpid()}.tmp"
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out / name)
        print(f"plots: {out / name}")

def metrics(r):
    return {k: r[k] for k in ("fid", "kid", "kid_std", "precision", "recall")}

def row_text(r):  # a list (the nll's terms) is left to the JSON
    fields = [(k, v) for k, v in r.items() if not isinstance(v, list)]
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields)

SWEEPS = {"ddim-sweep": ddim_sweep, "samplers": sampler_sweep, "nll": nll, "flow": flow_sweep,
          "guidance-sweep": guidance_sweep, "speckles": speckle_sweep, "restoration": restoration,
          "reconstructions": reconstructions, "latent-vs-pixel": latent_vs_pixel, "memory": memory}

def listed(kind, choices=None):
    """An argparse type= for a comma-separated list, each item checked by kind (a validator of the
    scripts') or one of choices; '' is the empty list."""
    def parse(text):
        items = [item for item in text.split(",") if item]
        if choices:
            bad = [item for item in items if item not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"{bad[0]} is not one of {','.join(choices)}")
            return items
        return [kind(item) for item in items]
    return parse

def write_atomically(path, text):  # a temporary file, renamed: no write leaves a broken file
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

def build_parser():
    p = argparse.ArgumentParser("bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: p.exit(2, f"bench.py: error: {message}\n")  # one line, no usage
    positive, scale = ddpm.POSITIVE, ddpm.valid(float, lambda v: v >= 0, "non-negative")
    p.add_argument("sweep", choices=[*SWEEPS, "plots"])
    p.add_argument("--ckpt", help="the checkpoint to measure (all sweeps but memory)")
    p.add_argument("--pixel-ckpt", help="latent-vs-pixel: a ddpm.py checkpoint")
    p.add_argument("--samples", type=positive, default=1000,
                   help="images per setting (FID: >= 129)")
    p.add_argument("--sample-batch-size", type=positive, default=250,
                   help="images per sampling batch")
    p.add_argument("--sampling-steps", type=positive, default=50,
                   help="guidance-sweep: S, the steps of the sampler's time grid (default: 50)")
    p.add_argument("--eta", type=ddpm.valid(float, lambda v: 0 <= v <= 1, "in [0, 1]"),
                   default=conditional.FLAGS["eta"][0],
                   help="guidance-sweep: the sampler's noise (default: conditional.py's)")
    p.add_argument("--ws", type=listed(scale), default=GUIDANCE,
                   help="guidance-sweep: CFG's w (default: 0,0.5,1,2,4; '' for none)")
    p.add_argument("--classifier", help="guidance-sweep: also classifier guidance by this one")
    p.add_argument("--scales", type=listed(scale), default=CLASSIFIER_SCALES,
                   help="guidance-sweep: the classifier's s (default: 1,2,4,8)")
    p.add_argument("--ddim-steps", type=listed(positive),
                   help="ddim-sweep: the S, like 10,20 (default: those of 10,20,50,100,1000 <= T); "
                   "samplers: the network evaluations (default: 5,10,20,50); flow: those "
                   "(default: 5,10,20,50,100)")
    p.add_argument("--spacing", choices=("uniform", "quadratic"), default="uniform",
                   help="ddim-sweep and samplers: the spacing of the steps")
    p.add_argument("--reference-samples", type=ddpm.COUNT, default=100,
                   help="samplers: images of the 1,000-step ODE solution for the RMSE (0: none)")
    p.add_argument("--tasks", type=listed(None, restore.TASKS), default=list(restore.TASKS),
                   help="restoration: restore.py's tasks (default: all)")
    p.add_argument("--noise-std", type=ddpm.REAL, default=0.5,
                   help="restoration: the std of the denoising task's noise")
    p.add_argument("--scale", type=positive, default=4, help="restoration: super-resolution factor")
    p.add_argument("--restore-steps", type=positive, default=250,
                   help="restoration: reverse steps")
    p.add_argument("--resample", type=positive, default=1,
                   help="restoration: RePaint's resamplings")
    p.add_argument("--seed", type=ddpm.FLAGS["seed"][1], default=0,
                   help="seeds samples, classifier, floor")
    p.add_argument("--data-dir", default="data", help="where evaluate.py finds the dataset")
    p.add_argument("--cache-dir", default="runs/evaluate", help="evaluate.py's classifier cache")
    p.add_argument("--out-dir", help="NAME.txt and NAME.json go here (default: runs/bench; "
                   "plots: samples, their PNGs)")
    p.add_argument("--results-dir", default="samples", help="plots: where the result files are")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    return p

def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sweep == "plots":  # pictures of results measured before: no checkpoint, no scoring
        try:
            return plots(Path(args.results_dir), Path(args.out_dir or "samples"))
        except ValueError as e:
            parser.error(str(e))
    out = Path(args.out_dir or OUT_DIR)
    try:  # each mistake ends here in one line: before any work, or found before the sweep's work
        if args.sweep != "memory" and not args.ckpt:
            raise ValueError(f"{args.sweep} needs --ckpt, the checkpoint to measure")
        if args.sweep == "latent-vs-pixel" and not args.pixel_ckpt:
            raise ValueError("latent-vs-pixel needs --pixel-ckpt, a ddpm.py checkpoint")
        if args.sweep == "nll" and args.samples < 2:
            raise ValueError(f"--samples {args.samples}: a standard error needs 2 images or more")
        if args.samples < evaluate.MIN_SAMPLES and args.sweep not in ("latent-vs-pixel", "memory",
                                                                       "nll"):
            raise ValueError(f"--samples {args.samples}: evaluate.py needs at least "
                             f"{evaluate.MIN_SAMPLES}")
        if args.sweep == "restoration" and not args.tasks:
            raise ValueError("--tasks '': name at least one task")
        device = ddpm.setup_device(args.device)
        args.device = device.type
        json_path, txt_path = out / f"{args.sweep}.json", out / f"{args.sweep}.txt"
        lock = ddpm.claim_outputs(out, json_path, txt_path)  # held until the end
        rows = SWEEPS[args.sweep](args, device)
    except (FileNotFoundError, ValueError) as e:  # evaluate.InputError is a ValueError
        parser.error(str(e))
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    about = {"sweep": args.sweep, "ckpt": args.ckpt, "samples": args.samples,
             "device": f"{device}{gpu}", "hardware": f"{device}{gpu}, {os.cpu_count()} CPU cores "
             f"({platform.machine()}), PyTorch {torch.__version__}"}  # the plots' captions
    write_atomically(json_path, json.dumps(about | {"rows": rows}, indent=1))
    text = "\n".join(map(row_text, rows))
    footer = f"{args.samples} samples per row, {device}{gpu}, {args.ckpt}"
    write_atomically(txt_path, f"{text}\n{footer}\n")
    print(f"{args.sweep}: {txt_path} and .json")
    return rows

if __name__ == "__main__":
    main()
