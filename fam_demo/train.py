"""Train the embedded demo model from scratch (seeded, resumable, CPU).

Stages, each cached in ``--workdir`` so an interrupted run resumes:
  1. data     render the procedural dataset (``--images`` items at 64x64);
  2. vae      train the AutoencoderKL on random 32x32 crops (L1 + MSE + small KL);
  3. latents  encode the dataset (posterior means), set ``scaling_factor = 1/std``;
  4. unet     train UNet + both CLIP text encoders jointly (AdamW, warm-up then
              constant learning rate, epsilon prediction,
              min-SNR-5 weighting, 10% caption dropout to zero embeddings = what the
              SDXL pipeline feeds for an empty negative prompt, EMA weights,
              randomised SDXL size micro-conditioning so any target size is in
              distribution). Every ``--ckpt-every`` steps the EMA pipeline is saved
              to ``<workdir>/pipeline`` (usable while training goes on).
At the end the fp16 pipeline folder is written to ``--out`` (default fam_demo/model)
with ``training.json`` (settings, times) and ``loss.csv``.

    python scripts/train_demo_model.py --workdir /tmp/fam-demo-run
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import shutil
import time
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from . import model as M
from .dataset import generate_dataset


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------- data

def stage_data(args) -> Dict[str, object]:
    path = os.path.join(args.workdir, "data.npz")
    if not os.path.exists(path):
        t0 = time.time()
        images, captions = generate_dataset(args.images, M.NATIVE_SIZE, seed=args.seed)
        np.savez(path, images=images, captions=np.array(captions))
        _log(f"data: rendered {len(captions)} images in {time.time() - t0:.0f}s")
    d = np.load(path)
    return {"images": d["images"], "captions": [str(c) for c in d["captions"]]}


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------- vae

def stage_vae(args, comps, data) -> None:
    path = os.path.join(args.workdir, "vae.pt")
    vae = comps["vae"]
    if os.path.exists(path):
        vae.load_state_dict(torch.load(path))
        return
    g = torch.Generator().manual_seed(args.seed + 10)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    images = data["images"]
    t0 = time.time()
    rows = []
    vae.train()
    for step in range(args.vae_steps):
        lr = args.vae_lr * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(images), (args.vae_batch,), generator=g).numpy()
        # Random crops: the VAE is fully convolutional, so crops teach it the same
        # mapping at a fraction of the cost.
        c = args.vae_crop
        off = torch.randint(0, M.NATIVE_SIZE - c + 1, (args.vae_batch, 2), generator=g).numpy()
        x = _to_tensor(np.stack([images[i, y:y + c, x0:x0 + c] for i, (y, x0) in zip(idx, off)]))
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / z[0].numel()
        loss = l1 + mse + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rows.append((step, l1.item(), mse.item(), kl.item()))
        if step % 50 == 0 or step == args.vae_steps - 1:
            _log(f"vae step {step}: l1 {l1.item():.4f} mse {mse.item():.5f} kl {kl.item():.3f} "
                 f"({time.time() - t0:.0f}s)")
    vae.eval()
    torch.save(vae.state_dict(), path)
    with open(os.path.join(args.workdir, "vae_loss.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "l1", "mse", "kl_per_dim"])
        w.writerows(rows)
    with open(os.path.join(args.workdir, "vae_time.json"), "w") as f:
        json.dump({"seconds": time.time() - t0}, f)


@torch.no_grad()
def stage_latents(args, comps, data) -> torch.Tensor:
    path = os.path.join(args.workdir, "latents.pt")
    vae = comps["vae"]
    if not os.path.exists(path):
        chunks = []
        for i in range(0, len(data["images"]), 256):
            chunks.append(vae.encode(_to_tensor(data["images"][i:i + 256])).latent_dist.mean)
        lat = torch.cat(chunks)
        torch.save(lat, path)
    lat = torch.load(path)
    scale = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scale)
    _log(f"latents: {tuple(lat.shape)}, std {lat.std():.3f}, scaling_factor {scale:.4f}")
    return lat * scale


# ---------------------------------------------------------------------------------- unet

class EMA:
    def __init__(self, params: List[torch.nn.Parameter], decay: float):
        self.params = params
        self.shadow = [p.detach().clone() for p in params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach(), alpha=1 - d)

    @torch.no_grad()
    def swap(self) -> None:
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def save_pipeline(comps, directory: str) -> None:
    """fp16 safetensors StableDiffusionXLPipeline folder."""
    from diffusers import StableDiffusionXLPipeline

    half = {k: (copy.deepcopy(v).to(torch.float16) if isinstance(v, torch.nn.Module) else v) for k, v in comps.items()}
    pipe = StableDiffusionXLPipeline(force_zeros_for_empty_prompt=True, **half)
    tmp = directory.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):  # keep the hand-written BPE files next to tokenizer.json
        M.write_tokenizer_files(os.path.join(tmp, sub))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def learning_rate(step: int, args) -> float:
    """Linear warm-up, constant, then a cosine decay to ``lr / 10`` over the last
    ``decay_steps`` steps. The rate is a function of the step alone, so a resumed run
    follows the same schedule as an uninterrupted one; with ``decay_steps == 0`` a run
    cut short still ends on a sensible model (the EMA does the averaging)."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup)
    decay_start = args.steps - args.decay_steps
    if args.decay_steps > 0 and step >= decay_start:
        progress = (step - decay_start) / args.decay_steps
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return lr


def stage_unet(args, comps, latents: torch.Tensor, captions: List[str]) -> None:
    unet, te1, te2 = comps["unet"], comps["text_encoder"], comps["text_encoder_2"]
    modules = [unet, te1, te2]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema = EMA(params, args.ema)
    ids1 = M.tokenize(comps["tokenizer"], captions)
    ids2 = M.tokenize(comps["tokenizer_2"], captions)
    betas = torch.linspace(M.SCHEDULER_CONFIG["beta_start"] ** 0.5, M.SCHEDULER_CONFIG["beta_end"] ** 0.5,
                           M.SCHEDULER_CONFIG["num_train_timesteps"], dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0).float()
    snr = abar / (1 - abar)
    sizes = torch.tensor([64, 128, 192, 256], dtype=torch.float32)
    g = torch.Generator().manual_seed(args.seed + 20)
    state_path = os.path.join(args.workdir, "state.pt")
    loss_path = os.path.join(args.workdir, "loss.csv")
    start, elapsed = 0, 0.0
    if os.path.exists(state_path):
        st = torch.load(state_path, weights_only=False)
        for m, sd in zip(modules, st["modules"]):
            m.load_state_dict(sd)
        opt.load_state_dict(st["opt"])
        ema.shadow = st["ema"]
        g.set_state(st["gen"])
        start, elapsed = st["step"], st["elapsed"]
        _log(f"unet: resumed at step {start}")
    else:
        with open(loss_path, "w", newline="") as f:
            csv.writer(f).writerow(["step", "loss", "loss_avg100", "lr", "elapsed_s"])
    recent: List[float] = []
    t_start = time.time() - elapsed
    for m in modules:
        m.train()
    B = args.batch
    for step in range(start, args.steps):
        lr = learning_rate(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(latents), (B,), generator=g)
        x0 = latents[idx]
        t = torch.randint(0, len(abar), (B,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = abar[t].view(B, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        emb, pooled = M.encode_text(te1, te2, ids1[idx], ids2[idx])
        keep = (torch.rand(B, generator=g) >= args.cond_drop).float()
        emb = emb * keep.view(B, 1, 1)
        pooled = pooled * keep.view(B, 1)
        hw = sizes[torch.randint(0, len(sizes), (B, 2), generator=g)]
        tids = torch.cat([hw, torch.zeros(B, 2), hw], dim=1)
        pred = unet(xt, t, emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": tids}).sample
        w = torch.clamp(snr[t], max=args.min_snr) / snr[t]
        loss = ((pred - noise) ** 2).mean(dim=(1, 2, 3)).mul(w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        recent = (recent + [loss.item()])[-100:]
        with open(loss_path, "a", newline="") as f:
            csv.writer(f).writerow([step, f"{loss.item():.5f}", f"{np.mean(recent):.5f}", f"{lr:.6f}",
                                    f"{time.time() - t_start:.1f}"])
        done = step + 1
        if done % 50 == 0:
            rate = (time.time() - t_start) / done
            _log(f"unet step {done}/{args.steps}: loss(avg100) {np.mean(recent):.4f} lr {lr:.2e} "
                 f"{rate:.2f}s/step, eta {(args.steps - done) * rate / 60:.0f} min")
        if done % args.ckpt_every == 0 or done == args.steps:
            torch.save({"modules": [m.state_dict() for m in modules], "opt": opt.state_dict(),
                        "ema": ema.shadow, "gen": g.get_state(), "step": done,
                        "elapsed": time.time() - t_start}, state_path + ".tmp")
            os.replace(state_path + ".tmp", state_path)
            ema.swap()
            save_pipeline(comps, os.path.join(args.workdir, "pipeline"))
            ema.swap()
            _log(f"checkpoint at step {done} -> {args.workdir}/pipeline")
    ema.swap()  # leave the EMA weights in the modules
    for m in modules:
        m.eval()


# ---------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/fam-demo-run")
    p.add_argument("--out", default=M.MODEL_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=16000)
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-crop", type=int, default=32, help="random square crops for VAE training")
    p.add_argument("--vae-lr", type=float, default=1.5e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--decay-steps", type=int, default=0,
                   help="cosine-decay the learning rate to lr/10 over the last N steps")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--min-snr", type=float, default=5.0)
    p.add_argument("--cond-drop", type=float, default=0.1)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is ~2x faster than 2 on a shared, loaded 2-core machine")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    tok_dir = os.path.join(args.workdir, "tokenizer")
    M.write_tokenizer_files(tok_dir)
    comps = M.make_components(tok_dir, seed=args.seed)
    t0 = time.time()
    data = stage_data(args)
    stage_vae(args, comps, data)
    latents = stage_latents(args, comps, data)
    stage_unet(args, comps, latents, data["captions"])
    save_pipeline(comps, args.out)
    shutil.copy(os.path.join(args.workdir, "loss.csv"), os.path.join(args.out, "loss.csv"))
    info = {"settings": vars(args), "seconds_this_invocation": time.time() - t0,
            "unet_params": sum(p.numel() for p in comps["unet"].parameters()),
            "vae_params": sum(p.numel() for p in comps["vae"].parameters()),
            "text_encoder_params": sum(p.numel() for p in comps["text_encoder"].parameters()),
            "text_encoder_2_params": sum(p.numel() for p in comps["text_encoder_2"].parameters()),
            "size_bytes": M.model_size_bytes(args.out)}
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(info, f, indent=1)
    _log(f"saved {args.out} ({info['size_bytes'] / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
