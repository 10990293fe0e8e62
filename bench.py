"""The measuring side: sweeps and timings that import the technique scripts (which never import
this file, nor each other) and score samples with evaluate.py. Each writes OUT_DIR/NAME.txt and
OUT_DIR/NAME.json.

    python bench.py ddim-sweep --ckpt runs/ddpm/ckpt.pt           # S x eta, DDIM's Table 1 on MNIST
    python bench.py guidance-sweep --ckpt runs/conditional/ckpt.pt --sampling-steps 50   # w
    python bench.py guidance-sweep --ckpt runs/conditional/ckpt.pt --sampling-steps 50 \
        --classifier runs/conditional/classifier.pt      # and classifier guidance beside it
    python bench.py reconstructions --ckpt runs/latent/ckpt.pt    # FID of latent.py's autoencoder
    python bench.py latent-vs-pixel --ckpt runs/latent/ckpt.pt --pixel-ckpt runs/ddpm/ckpt.pt
    python bench.py restoration --ckpt checkpoints/ddpm_mnist.pt --samples 500   # restore.py
"""
import argparse, json, sys, time
from pathlib import Path

import torch

import conditional, ddim, ddpm, evaluate, latent, restore

DDIM_STEPS, DDIM_ETAS = (10, 20, 50, 100, 1000), (0.0, 1.0)  # DDIM Table 1's S and eta
GUIDANCE = (0.0, 0.5, 1.0, 2.0, 4.0)  # the w of the guidance table (Ho & Salimans Table 1)
CLASSIFIER_SCALES = (1.0, 2.0, 4.0, 8.0)  # the s of classifier guidance (Dhariwal & Nichol Fig. 3)

def load(script, path, device, scripts=None):
    """A checkpoint, its config (with the flags it fixes) and its alpha_bar, on device."""
    scripts = scripts or (script.SCRIPT,)
    ckpt = script.load_checkpoint(Path(path), scripts, keys=("image_shape", "ema"))
    config = ckpt["config"]
    betas64 = script.make_betas(config["schedule"], config["timesteps"])
    return ckpt, config, torch.cumprod(1 - betas64, 0).float().to(device)

def score(images, config, args, labels=None):
    """evaluate.py's metrics of uint8 NCHW images, against the test split of the model's data."""
    dataset, size = config["dataset"], config["image_size"]
    if dataset not in evaluate.DATASETS or size != evaluate.DATASETS[dataset][1][0]:
        raise evaluate.InputError(f"evaluate.py scores {', '.join(evaluate.DATASETS)} at their own "
                                  f"size; this model is of {dataset} at {size}")
    return evaluate.evaluate_images(images.permute(0, 2, 3, 1).numpy(), labels, config["dataset"],
                                    args.data_dir, args.cache_dir, args.device, args.seed)

def timed(fn, device):
    """fn() and its wall time in seconds, the GPU synchronised."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync(), (t0 := time.perf_counter())
    out = fn()
    sync()
    return out, time.perf_counter() - t0

def ddim_sweep(args, device):
    """For each eta and S: sample --samples images with ddim.py from a ddim.py or ddpm.py
    checkpoint, time them and score them (DDIM Table 1 on this model)."""
    ckpt, config, alpha_bar = load(ddim, args.ckpt, device, ("ddim", "ddpm"))
    shape, model = ckpt["image_shape"], ddim.build_model(config, ckpt["image_shape"][0])
    model.to(device).load_state_dict(ckpt["ema"])
    rows = []
    for eta in DDIM_ETAS:
        for S in [S for S in args.ddim_steps if S <= len(alpha_bar)]:
            taus = ddim.sampling_timesteps(len(alpha_bar), S, args.spacing)
            sample = lambda: ddim.generate(model, args.samples, shape, alpha_bar, taus, eta,
                                           args.seed, args.batch_size)
            (images, _), secs = timed(sample, device)
            rows.append({"S": S, "eta": eta, **metrics(score(images, config, args)),
                         "seconds": secs, "img_s": args.samples / secs})
            print(row_text(rows[-1]), flush=True)
    return rows

def guidance_sweep(args, device):
    """For each w: sample --samples images cycling through the classes with conditional.py, from
    the same noise and labels, time them and score them with their labels (Ho & Salimans
    Table 1); with --classifier, then for each s of --scales the same with classifier guidance.
    Both rows' s is the power of p(y | x_t) that the guided noise samples (s = 1 + w for CFG)."""
    ckpt, config, alpha_bar = load(conditional, args.ckpt, device)
    model = conditional.build_model(config, ckpt["image_shape"][0], len(ckpt["classes"]))
    model.to(device).load_state_dict(ckpt["ema"])
    labels, rows = conditional.cycle_labels(args.samples, len(ckpt["classes"])), []
    classifier = args.classifier and conditional.load_classifier(
        Path(args.classifier), ckpt["image_shape"], ckpt["classes"], config, device)
    runs = [("free", w, 1 + w) for w in args.ws]
    runs += [("classifier", None, s) for s in args.scales] if classifier else []
    for mode, w, s in runs:
        (images, _), secs = timed(lambda: conditional.generate(
            model, labels, s if w is None else w, ckpt["image_shape"], alpha_bar, args.seed,
            args.batch_size, args.sampling_steps, classifier=w is None and classifier), device)
        r = score(images, config, args, labels.numpy())
        rows.append({"guidance": mode, "w": w, "s": s, **metrics(r), "accuracy": r["accuracy"],
                     "seconds": secs, "img_s": args.samples / secs})
        print(row_text(rows[-1]), flush=True)
    return rows

def reconstructions(args, device):
    """FID of the reconstructions of --samples training images by latent.py's autoencoder (the EMA
    in stage 2's checkpoint, or stage 1's ae.pt), against the floor of real images."""
    ckpt = latent.load_checkpoint(Path(args.ckpt), keys=("image_shape",))
    config, key = ckpt["config"], "ae" if ckpt.get("stage") == "diffusion" else "ema"
    ae = latent.Autoencoder(ckpt["image_shape"][0], config["ae_channels"],
                            config["latent_channels"])
    ae.load_state_dict(ckpt[key])
    data = latent.load_images(config["dataset"], args.data_dir, config["image_size"])[0]
    gen = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(data), generator=gen)[:args.samples]
    rebuild = lambda x: ae.decode(ae.encode(x.to(device).float() / 127.5 - 1)[0])  # posterior mean
    with torch.no_grad():
        ae.to(device)
        rec = torch.cat([latent.to_uint8(rebuild(data[i])) for i in idx.split(args.batch_size)])
    mse = ((rec.float() - data[idx].float()) / 255).pow(2).mean().item()
    r = score(rec, config, args)
    return [{"images": len(idx), "mse": mse, **metrics(r), "floor_fid": r["floor_fid"],
             "fid_over_floor": r["fid"] / r["floor_fid"]}]

def latent_vs_pixel(args, device, reps=5):
    """Time latent.py's two stages and ddpm.py's U-Net on this machine, each with the step counts
    and batch sizes of its checkpoint: reps training steps each (after one untimed), and their
    sampling passes (at --batch-size), extrapolated to whole runs and to --samples samples."""
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
            step()
            _, secs = timed(lambda: [step() for _ in range(reps)], device)
            rate = reps * batch / secs
            rows.append({"script": script.SCRIPT, "part": f"train {name}", "steps": steps,
                         "batch": batch, "img_s": rate, "minutes": steps * batch / rate / 60})
        S = latent.DDIM_STEPS if script is latent else config["timesteps"]  # each one's own sampler
        x = torch.randn((args.batch_size, *shape), device=device)
        t = torch.zeros(args.batch_size, dtype=torch.long, device=device)
        with torch.no_grad():
            unet(x, t)
            _, secs = timed(lambda: [unet(x, t) for _ in range(reps)], device)
        rate = reps * args.batch_size / secs / S
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
    model = restore.build_model(config, ckpt["image_shape"][0]).to(device)
    model.load_state_dict(ckpt["ema"])
    images = restore.load_test_images(config["dataset"], args.data_dir, args.samples,
                                      ckpt["image_shape"])
    clean = score(images, config, args)
    rows = [{"task": "none", "images": "clean", "psnr": None, **metrics(clean), "seconds": 0}]
    print(row_text(rows[-1]), flush=True)
    for task in args.tasks:
        (_, baseline, restored), secs = timed(lambda: restore.run_task(
            model.eval(), images, task, alpha_bar, args.sigma, args.scale, args.restore_steps,
            args.resample, args.seed, args.batch_size), device)
        for name, out in (("restored", restored), ("baseline", baseline)):
            rows.append({"task": task, "images": name, "psnr": restore.psnr(out, images),
                         **metrics(score(out, config, args)), "seconds": secs * (name != "baseline")})
            print(row_text(rows[-1]), flush=True)
    return rows

def metrics(r):
    return {k: r[k] for k in ("fid", "kid", "kid_std", "precision", "recall")}

def row_text(r):
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())

SWEEPS = {"ddim-sweep": ddim_sweep, "guidance-sweep": guidance_sweep, "restoration": restoration,
          "reconstructions": reconstructions, "latent-vs-pixel": latent_vs_pixel}

def main(argv=None):
    p = argparse.ArgumentParser("bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: p.exit(2, f"bench.py: error: {message}\n")
    p.add_argument("sweep", choices=SWEEPS)
    p.add_argument("--ckpt", required=True, help="the checkpoint to measure")
    p.add_argument("--pixel-ckpt", help="latent-vs-pixel: a ddpm.py checkpoint")
    p.add_argument("--samples", type=int, default=1000, help="images per setting (FID: >= 129)")
    p.add_argument("--batch-size", type=int, default=250, help="images per sampling batch")
    p.add_argument("--sampling-steps", type=int, help="guidance-sweep: DDIM steps (default: DDPM)")
    p.add_argument("--ws", type=lambda v: [float(w) for w in v.split(",") if w], default=GUIDANCE,
                   help="guidance-sweep: CFG's w (default: 0,0.5,1,2,4; '' for none)")
    p.add_argument("--classifier", help="guidance-sweep: also classifier guidance by this classifier")
    p.add_argument("--scales", type=lambda v: [float(s) for s in v.split(",")],
                   default=CLASSIFIER_SCALES, help="guidance-sweep: the classifier's s (1,2,4,8)")
    p.add_argument("--ddim-steps", type=lambda v: [int(S) for S in v.split(",")],
                   default=DDIM_STEPS, help="ddim-sweep: the S, like 10,20 (default: 10,...,1000)")
    p.add_argument("--spacing", choices=("uniform", "quadratic"), default="uniform",
                   help="ddim-sweep: the spacing of its steps")
    p.add_argument("--tasks", type=lambda v: v.split(","), default=restore.TASKS,
                   help="restoration: restore.py's tasks (default: all)")
    p.add_argument("--sigma", type=float, default=0.5, help="restoration: the denoising noise std")
    p.add_argument("--scale", type=int, default=4, help="restoration: super-resolution factor")
    p.add_argument("--restore-steps", type=int, default=250, help="restoration: reverse steps")
    p.add_argument("--resample", type=int, default=1, help="restoration: RePaint's resamplings")
    p.add_argument("--seed", type=int, default=0, help="seeds samples, classifier, floor")
    p.add_argument("--data-dir", default="data", help="where evaluate.py finds the dataset")
    p.add_argument("--cache-dir", default="runs/evaluate", help="evaluate.py's classifier cache")
    p.add_argument("--out-dir", default="runs/bench", help="NAME.txt and NAME.json go here")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    args = p.parse_args(argv)
    try:
        if args.sweep == "latent-vs-pixel" and not args.pixel_ckpt:
            raise ValueError("latent-vs-pixel needs --pixel-ckpt, a ddpm.py checkpoint")
        if args.samples < evaluate.MIN_SAMPLES and args.sweep != "latent-vs-pixel":
            raise ValueError(f"--samples {args.samples}: evaluate.py needs at least "
                             f"{evaluate.MIN_SAMPLES}")
        device = ddpm.setup_device(args.device)
        args.device = device.type
        rows = SWEEPS[args.sweep](args, device)
    except (FileNotFoundError, ValueError) as e:  # evaluate.InputError is a ValueError
        p.error(str(e))
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    about = {"sweep": args.sweep, "ckpt": args.ckpt, "samples": args.samples,
             "device": f"{device}{gpu}"}
    (out / f"{args.sweep}.json").write_text(json.dumps(about | {"rows": rows}, indent=1))
    (out / f"{args.sweep}.txt").write_text("\n".join(map(row_text, rows)) + f"\n{args.samples} "
                                           f"samples per row, {device}{gpu}, {args.ckpt}\n")
    print(f"{args.sweep}: {out}/{args.sweep}.txt and .json")
    return rows

if __name__ == "__main__":
    main()
