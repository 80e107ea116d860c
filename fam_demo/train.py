"""Train the embedded demo model from scratch (seeded, resumable, CPU).

Stages, each cached in ``--workdir`` so an interrupted run resumes:
  1. data     render the procedural dataset (``--images`` items at ``--native-size``,
              default the shipped model's 128 px), in shards of 1,000;
  2. vae      train the AutoencoderKL on random crops (default native/2 px; L1 + MSE +
              small KL), checkpointed every ``--ckpt-every`` steps; skipped with
              ``--init-from`` (the VAE is fully convolutional: any image size);
  3. latents  encode the dataset (posterior means), set ``scaling_factor = 1/std``;
  4. unet     train UNet + both CLIP text encoders jointly (AdamW, warm-up then
              constant learning rate, epsilon prediction,
              min-SNR-5 weighting, 10% caption dropout to zero embeddings = what the
              SDXL pipeline feeds for an empty negative prompt, EMA weights,
              randomised SDXL size micro-conditioning so any target size is in
              distribution). Every ``--ckpt-every`` steps the EMA pipeline is saved
              to ``<workdir>/pipeline`` (usable while training goes on).
``--init-from DIR`` starts every component from the weights of a trained pipeline folder
with the same architecture (e.g. the 64 px model, fine-tuned at 128 px: progressive
resolution training, as SDXL itself was trained 256 -> 512 -> 1024 px).
At the end the fp16 pipeline folder is written to ``--out`` (default fam_demo/model,
which only a run at the shipped native size may overwrite) with ``training.json`` (settings, times)
and ``loss.csv`` (plotted by :mod:`fam_demo.loss_curves`).

Resumable at any moment: every file in the workdir is written atomically, a run killed
between checkpoints continues from the last one (the loss log is cut back to it), and
the random generators are part of the checkpoint, so a resumed run computes the same
steps as an uninterrupted one (bit for bit with the same thread count). ``--max-minutes``
or SIGTERM / SIGINT (e.g. ``timeout``) stop cleanly after the current step with a
checkpoint. The settings that shape the model must not change between invocations.

    python scripts/train_demo_model.py --workdir /tmp/fam-demo-run
    python scripts/train_demo_model.py --measure-step-seconds 5 --native-size 128   # time one step
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import shutil
import signal
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from fam import _io

from . import model as M
from .dataset import generate_dataset

# Settings that shape the data, the model or the random streams: a resumed run must use
# the values of the first invocation (the others, e.g. --threads or --max-minutes, may change).
FIXED_SETTINGS = ["seed", "init_from", "images", "native_size", "unet_channels", "layers_per_block",
                  "transformer_layers",
                  "vae_steps", "vae_batch", "vae_crop", "vae_lr", "vae_kl", "batch", "lr", "warmup", "ema",
                  "min_snr", "cond_drop"]


class Stop:
    """Asks the training loops to stop cleanly (with a checkpoint) after the current step:
    on SIGTERM / SIGINT once installed, or when ``max_minutes`` have passed."""

    def __init__(self, max_minutes: Optional[float] = None):
        self.deadline = time.time() + 60 * max_minutes if max_minutes else None
        self.signalled = False

    def install(self) -> dict:
        """Handle SIGTERM and SIGINT; returns the previous handlers for :meth:`restore`."""
        return {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def restore(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signalled = True
        _log(f"signal {signum}: stopping after this step with a checkpoint")

    def __call__(self) -> bool:
        return self.signalled or (self.deadline is not None and time.time() >= self.deadline)


class Stopped(Exception):
    """Raised after a clean early stop; the workdir holds a checkpoint to resume from."""


def _save_torch(obj, path: str) -> None:
    with _io.atomic_open(path, "wb") as f:
        torch.save(obj, f)


def _write_csv(path: str, header: List[str], rows) -> None:
    with _io.atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------- data

DATA_SHARD = 1000  # images rendered per resumable piece


def stage_data(args, stop: Stop) -> Dict[str, object]:
    """``{"captions": [...], "images": callable -> (N, S, S, 3) uint8}`` (images load on demand).
    Rendered in shards of :data:`DATA_SHARD` images, each saved atomically, so a stop loses
    at most the shard in progress."""
    path = os.path.join(args.workdir, "data.npz")
    if not os.path.exists(path):
        t0 = time.time()
        shards = []
        for start in range(0, args.images, DATA_SHARD):
            shard = os.path.join(args.workdir, f"data-{start:06d}.npz")
            if not os.path.exists(shard):
                images, captions = generate_dataset(min(DATA_SHARD, args.images - start), args.native_size,
                                                    seed=args.seed, start=start)
                with _io.atomic_open(shard, "wb") as f:
                    np.savez(f, images=images, captions=np.array(captions))
                _log(f"data: images {start}-{start + len(captions) - 1} rendered ({time.time() - t0:.0f}s)")
                if stop() and start + DATA_SHARD < args.images:
                    raise Stopped(f"data image {start + len(captions)}")
            shards.append(shard)
        parts = [np.load(s) for s in shards]
        with _io.atomic_open(path, "wb") as f:
            np.savez(f, images=np.concatenate([d["images"] for d in parts]),
                     captions=np.concatenate([d["captions"] for d in parts]))
        for shard in shards:
            os.remove(shard)
        _log(f"data: {args.images} images of {args.native_size} px in {path}")
    d = np.load(path)
    return {"images": lambda: d["images"], "captions": [str(c) for c in d["captions"]]}


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------- vae

def stage_vae(args, comps, data, stop: Stop) -> None:
    path = os.path.join(args.workdir, "vae.pt")
    state_path = os.path.join(args.workdir, "vae_state.pt")
    vae = comps["vae"]
    if os.path.exists(path):
        vae.load_state_dict(torch.load(path))
        return
    if args.init_from:  # the initial weights are the trained VAE
        with _io.atomic_open(os.path.join(args.workdir, "vae_time.json"), "w") as f:
            json.dump({"seconds": 0.0, "init_from": args.init_from}, f)
        _save_torch(vae.state_dict(), path)
        return
    g = torch.Generator().manual_seed(args.seed + 10)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    images = data["images"]()
    start, elapsed, rows = 0, 0.0, []
    if os.path.exists(state_path):
        st = torch.load(state_path, weights_only=False)
        vae.load_state_dict(st["vae"])
        opt.load_state_dict(st["opt"])
        g.set_state(st["gen"])
        start, elapsed, rows = st["step"], st["elapsed"], st["rows"]
        _log(f"vae: resumed at step {start}")
    t0 = time.time() - elapsed
    vae.train()
    for step in range(start, args.vae_steps):
        lr = args.vae_lr * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(images), (args.vae_batch,), generator=g).numpy()
        # Random crops: the VAE is fully convolutional, so crops teach it the same
        # mapping at a fraction of the cost.
        c = args.vae_crop
        off = torch.randint(0, args.native_size - c + 1, (args.vae_batch, 2), generator=g).numpy()
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
        done = step + 1
        if done < args.vae_steps and (done % args.ckpt_every == 0 or stop()):
            _save_torch({"vae": vae.state_dict(), "opt": opt.state_dict(), "gen": g.get_state(), "step": done,
                         "elapsed": time.time() - t0, "rows": rows}, state_path)
            if stop():
                raise Stopped(f"vae step {done}")
    vae.eval()
    _write_csv(os.path.join(args.workdir, "vae_loss.csv"), ["step", "l1", "mse", "kl_per_dim"], rows)
    with _io.atomic_open(os.path.join(args.workdir, "vae_time.json"), "w") as f:
        json.dump({"seconds": time.time() - t0}, f)
    _save_torch(vae.state_dict(), path)  # last: its presence marks the stage done
    if os.path.exists(state_path):
        os.remove(state_path)


@torch.no_grad()
def stage_latents(args, comps, data) -> torch.Tensor:
    path = os.path.join(args.workdir, "latents.pt")
    vae = comps["vae"]
    if not os.path.exists(path):
        images = data["images"]()
        chunks = []
        for i in range(0, len(images), 256):
            chunks.append(vae.encode(_to_tensor(images[i:i + 256])).latent_dist.mean)
        lat = torch.cat(chunks)
        _save_torch(lat, path)
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


def micro_sizes(native_size: int) -> torch.Tensor:
    """SDXL size conditioning values drawn in training: 1x to 4x the native size."""
    return torch.tensor([native_size * k for k in (1, 2, 3, 4)], dtype=torch.float32)


def _read_loss_rows(path: str, before: int) -> List[List[str]]:
    """Well-formed rows of a loss log with step < ``before`` (a run killed between two
    checkpoints has logged steps that the resumed run will compute again)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return [r for r in rows if len(r) == 5 and r[0].isdigit() and int(r[0]) < before]


LOSS_HEADER = ["step", "loss", "loss_avg100", "lr", "elapsed_s"]


def stage_unet(args, comps, latents: torch.Tensor, captions: List[str], stop: Stop,
               on_step: Optional[Callable[[int], None]] = None) -> None:
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
    sizes = micro_sizes(args.native_size)
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
    kept = _read_loss_rows(loss_path, start)
    _write_csv(loss_path, LOSS_HEADER, kept)
    recent: List[float] = [float(r[1]) for r in kept[-100:]]
    t_start = time.time() - elapsed

    def checkpoint(done: int) -> None:
        _save_torch({"modules": [m.state_dict() for m in modules], "opt": opt.state_dict(),
                     "ema": ema.shadow, "gen": g.get_state(), "step": done,
                     "elapsed": time.time() - t_start}, state_path)
        ema.swap()
        save_pipeline(comps, os.path.join(args.workdir, "pipeline"))
        ema.swap()
        _log(f"checkpoint at step {done} -> {args.workdir}/pipeline")

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
        if on_step is not None:
            on_step(done)
        if done % 50 == 0:
            rate = (time.time() - t_start) / done
            _log(f"unet step {done}/{args.steps}: loss(avg100) {np.mean(recent):.4f} lr {lr:.2e} "
                 f"{rate:.2f}s/step, eta {(args.steps - done) * rate / 60:.0f} min")
        if done % args.ckpt_every == 0 or done == args.steps or stop():
            checkpoint(done)
            if stop() and done < args.steps:
                raise Stopped(f"unet step {done} of {args.steps}")
    ema.swap()  # leave the EMA weights in the modules
    for m in modules:
        m.eval()


# ---------------------------------------------------------------------------------- main

def _ints(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/fam-demo-run")
    p.add_argument("--out", default=None,
                   help=f"final pipeline folder (default: fam_demo/model for a {M.NATIVE_SIZE} px run; "
                        "required otherwise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--native-size", type=int, default=M.NATIVE_SIZE,
                   help=f"training image size in px (default {M.NATIVE_SIZE})")
    p.add_argument("--unet-channels", type=_ints, default=list(M.UNET_CHANNELS), metavar="C1,C2,C3",
                   help="UNet block widths, multiples of 16 (default 32,64,128)")
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--transformer-layers", type=_ints, default=[1, 1, 2], metavar="T1,T2,T3")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="start every component from this trained pipeline folder (same architecture); "
                        "the VAE is then not trained")
    p.add_argument("--images", type=int, default=16000)
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-crop", type=int, default=None, help="random square crops for VAE training (native/2)")
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
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop cleanly with a checkpoint after this many minutes (run again to continue)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is ~2x faster than 2 on a shared, loaded 2-core machine")
    p.add_argument("--measure-step-seconds", type=int, default=0, metavar="N",
                   help="only time N UNet training steps (after one warm-up) on random latents and exit")
    args = p.parse_args(argv)
    if args.vae_crop is None:
        args.vae_crop = args.native_size // 2
    try:
        M.unet_config(args.native_size, args.unet_channels, args.layers_per_block, args.transformer_layers)
    except ValueError as error:
        p.error(str(error))
    if args.init_from is not None:
        if not os.path.exists(os.path.join(args.init_from, "model_index.json")):
            p.error(f"--init-from {args.init_from}: not a pipeline folder (no model_index.json)")
        args.init_from = os.path.abspath(args.init_from)
    if not 0 < args.vae_crop <= args.native_size:
        p.error(f"--vae-crop {args.vae_crop}: expected 1 to --native-size ({args.native_size})")
    if args.out is None:
        if args.native_size != M.NATIVE_SIZE:
            p.error(f"--out is required for a {args.native_size} px run (the shipped model is {M.NATIVE_SIZE} px)")
        args.out = M.MODEL_DIR
    return args


def components(args, tok_dir: str) -> Dict[str, object]:
    comps = M.make_components(tok_dir, seed=args.seed, vae=M.vae_config(args.native_size),
                              unet=M.unet_config(args.native_size, args.unet_channels, args.layers_per_block,
                                                 args.transformer_layers))
    if args.init_from:
        trained = M.load_pipeline(path=args.init_from)
        for name in ("vae", "text_encoder", "text_encoder_2", "unet"):
            try:
                comps[name].load_state_dict(getattr(trained, name).state_dict())
            except RuntimeError as error:
                raise SystemExit(f"train_demo_model: --init-from {args.init_from}: its {name} does not match "
                                 f"this run's architecture ({str(error).splitlines()[0]})") from None
    return comps


def measure_step_seconds(args, comps) -> Dict[str, float]:
    """Wall and CPU (this process, all threads) seconds per UNet + text-encoder training
    step (forward, backward, AdamW, EMA) at the run's latent size and batch, on random
    latents and the grammar's captions; the first step is a warm-up. On a shared, loaded
    machine both are inflated (the CPU time too: OpenMP threads spin while they wait), so
    compare configurations measured side by side, and read docs/demo.md's caveats."""
    from .dataset import all_captions

    n = args.native_size // M.VAE_FACTOR
    args = copy.copy(args)
    args.steps = args.measure_step_seconds + 1
    args.ckpt_every = args.steps + 1
    args.workdir = os.path.join(args.workdir, "measure")
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    g = torch.Generator().manual_seed(args.seed)
    latents = torch.randn((256, 4, n, n), generator=g)
    marks = []
    stage_unet(args, comps, latents, all_captions()[:256], Stop(),
               on_step=lambda done: marks.append((time.perf_counter(), time.process_time())))
    steps = len(marks) - 1
    params = sum(p.numel() for p in comps["unet"].parameters())
    other = sum(p.numel() for k in ("vae", "text_encoder", "text_encoder_2") for p in comps[k].parameters())
    return {"wall_s_per_step": (marks[-1][0] - marks[0][0]) / steps,
            "cpu_s_per_step": (marks[-1][1] - marks[0][1]) / steps, "steps": steps,
            "unet_params": params, "fp16_mb_all": 2 * (params + other) / 1e6,
            "latent": n, "batch": args.batch, "threads": torch.get_num_threads(),
            "load_avg_1min": os.getloadavg()[0]}


def _invocations(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.workdir, exist_ok=True)
    tok_dir = os.path.join(args.workdir, "tokenizer")
    M.write_tokenizer_files(tok_dir)
    comps = components(args, tok_dir)
    if args.measure_step_seconds:
        res = measure_step_seconds(args, comps)
        print(json.dumps(res))
        return 0
    args_path = os.path.join(args.workdir, "args.json")
    if os.path.exists(args_path):
        with open(args_path) as f:
            first = json.load(f)
        changed = [k for k in FIXED_SETTINGS if first.get(k) != getattr(args, k)]
        if changed:
            raise SystemExit(f"train_demo_model: {args.workdir} was started with other "
                             + ", ".join(f"--{k.replace('_', '-')} {first.get(k)}" for k in changed)
                             + "; use those or a new --workdir")
    else:
        with _io.atomic_open(args_path, "w") as f:
            json.dump(vars(args), f, indent=1)
    stop = Stop(args.max_minutes)
    previous_handlers = stop.install()
    t0 = time.time()
    state_path = os.path.join(args.workdir, "state.pt")
    first_step = torch.load(state_path, weights_only=False)["step"] if os.path.exists(state_path) else 0
    inv_path = os.path.join(args.workdir, "invocations.json")
    record = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "threads": args.threads,
              "unet_steps": [first_step, first_step]}
    try:
        data = stage_data(args, stop)
        stage_vae(args, comps, data, stop)
        latents = stage_latents(args, comps, data)
        stage_unet(args, comps, latents, data["captions"], stop)
    except Stopped as where:
        _log(f"stopped cleanly at {where}; run the same command to continue")
        return 0
    finally:
        Stop.restore(previous_handlers)
        if os.path.exists(state_path):
            record["unet_steps"][1] = torch.load(state_path, weights_only=False)["step"]
        record["seconds"] = round(time.time() - t0, 1)
        with _io.atomic_open(inv_path, "w") as f:
            json.dump(_invocations(inv_path) + [record], f, indent=1)
    save_pipeline(comps, args.out)
    shutil.copy(os.path.join(args.workdir, "loss.csv"), os.path.join(args.out, "loss.csv"))
    info = {"settings": vars(args), "seconds_this_invocation": time.time() - t0,
            "unet_params": sum(p.numel() for p in comps["unet"].parameters()),
            "vae_params": sum(p.numel() for p in comps["vae"].parameters()),
            "text_encoder_params": sum(p.numel() for p in comps["text_encoder"].parameters()),
            "text_encoder_2_params": sum(p.numel() for p in comps["text_encoder_2"].parameters()),
            "invocations": _invocations(inv_path),
            "size_bytes": M.model_size_bytes(args.out)}
    init_info = os.path.join(args.init_from or "", "training.json")
    if args.init_from and os.path.exists(init_info):  # the earlier stage's record travels with the model
        with open(init_info) as f:
            info["init_from_training"] = json.load(f)
    with _io.atomic_open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(info, f, indent=1)
    _log(f"saved {args.out} ({info['size_bytes'] / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
