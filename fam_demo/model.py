"""The embedded demo model: architecture, tokenizer files, text encoding, loading.

A tiny text-to-image latent diffusion model of SDXL's family, trained from
scratch on :mod:`fam_demo.dataset` by :mod:`fam_demo.train` and shipped as a
StableDiffusionXLPipeline folder in ``fam_demo/model/`` (fp16 safetensors,
loaded as fp32 on the CPU).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Dict, List, Tuple

import torch

from .dataset import vocabulary_words

MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")

NATIVE_SIZE = 128  # pixels; the VAE downsamples by 4 -> 32x32 latents, 8x8 tokens in up_blocks.0
VAE_FACTOR = 4
MAX_TOKENS = 16  # tokenizer model_max_length == text encoders' max_position_embeddings
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

UNET_CHANNELS = (32, 64, 128)  # the shipped model's block_out_channels
HEAD_DIM = 16
TEXT_HIDDEN = 64
TEXT_PROJECTION = 64
TIME_EMBED = 16


def vae_config(native_size: int = NATIVE_SIZE) -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=native_size,
        mid_block_add_attention=False,  # fully convolutional: decodes any size the same way
    )


def unet_config(native_size: int = NATIVE_SIZE, channels=UNET_CHANNELS, layers_per_block: int = 1,
                transformer_layers=(1, 1, 2)) -> dict:
    """SDXL's layout at any size: no attention at the top level, cross-attention in the
    two lower levels, ``up_blocks.0`` the lowest-resolution cross-attention block
    (native_size / 16 tokens a side: 4 x 4 at 64 px, 8 x 8 at 128 px), ``text_time``
    added conditioning. ``channels`` are the three levels' widths (multiples of 16)."""
    channels = tuple(int(c) for c in channels)
    if native_size % (4 * VAE_FACTOR) or native_size < 16:
        raise ValueError(f"native_size {native_size}: expected a multiple of {4 * VAE_FACTOR}")
    if len(channels) != 3 or any(c <= 0 or c % HEAD_DIM for c in channels):
        raise ValueError(f"channels {channels}: expected three positive multiples of {HEAD_DIM}")
    return dict(
        sample_size=native_size // VAE_FACTOR,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        transformer_layers_per_block=tuple(transformer_layers),
        attention_head_dim=tuple(c // HEAD_DIM for c in channels),  # diffusers' name; these are head counts
        cross_attention_dim=2 * TEXT_HIDDEN,  # both encoders' penultimate states, concatenated
        norm_num_groups=16,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + TEXT_PROJECTION,
    )


VAE_CONFIG = vae_config()
UNET_CONFIG = unet_config()

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=1,
)


# ------------------------------------------------------------------------------ tokenizer

def train_bpe(words: List[str]) -> Tuple[List[Tuple[str, str]], List[str]]:
    """Byte-pair merges (deterministic: most frequent pair, ties lexicographic) until every
    word is one token. Returns (merges, vocabulary tokens in id order)."""
    segs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    base = sorted({c for w in words for c in w} | {c + "</w>" for w in words for c in w})
    merges: List[Tuple[str, str]] = []
    merged_tokens: List[str] = []
    while True:
        pairs = Counter()
        for s in segs.values():
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += 1
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged_tokens.append(best[0] + best[1])
        for w, s in segs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segs[w] = out
    vocab = base + [t for t in dict.fromkeys(merged_tokens) if t not in base] + [BOS, EOS]
    return merges, vocab


def write_tokenizer_files(directory: str) -> Dict[str, int]:
    """Write vocab.json + merges.txt for our grammar into ``directory``; returns the vocab."""
    merges, tokens = train_bpe(vocabulary_words())
    vocab = {t: i for i, t in enumerate(tokens)}
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f, indent=0, sort_keys=False)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return vocab


def make_tokenizer(directory: str):
    from transformers import CLIPTokenizer

    with open(os.path.join(directory, "vocab.json")) as f:
        vocab = json.load(f)
    with open(os.path.join(directory, "merges.txt")) as f:
        merges = [tuple(line.split(" ")) for line in f.read().splitlines()[1:] if line]
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=MAX_TOKENS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
    )


# ----------------------------------------------------------------------------- components

def make_components(tokenizer_dir: str, seed: int = 0, vae: dict | None = None,
                    unet: dict | None = None) -> Dict[str, object]:
    """Freshly initialised (seeded) pipeline components; ``vae`` / ``unet`` are configs
    (default: the shipped model's, :data:`VAE_CONFIG` and :data:`UNET_CONFIG`)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = make_tokenizer(tokenizer_dir)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    bos_id = tokenizer.convert_tokens_to_ids(BOS)
    text_cfg = dict(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        projection_dim=TEXT_PROJECTION,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(**(vae or VAE_CONFIG))
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
    torch.manual_seed(seed + 3)
    unet = UNet2DConditionModel(**(unet or UNET_CONFIG))
    return dict(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=make_tokenizer(tokenizer_dir),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
    )


def tokenize(tokenizer, prompts: List[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_text(text_encoder, text_encoder_2, ids_1: torch.Tensor, ids_2: torch.Tensor):
    """Exactly what StableDiffusionXLPipeline.encode_prompt computes (clip_skip=None):
    penultimate hidden states of both encoders concatenated, pooled = encoder 2's
    projected EOS state. Differentiable (used in training)."""
    h1 = text_encoder(ids_1, output_hidden_states=True).hidden_states[-2]
    out2 = text_encoder_2(ids_2, output_hidden_states=True)
    return torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2.text_embeds


def time_ids(batch: int, original: Tuple[int, int], target: Tuple[int, int]) -> torch.Tensor:
    """SDXL micro-conditioning (original_size, crop top-left, target_size)."""
    return torch.tensor([[*original, 0, 0, *target]], dtype=torch.float32).repeat(batch, 1)


def model_size_bytes(path: str = MODEL_DIR) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def load_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, path: str = MODEL_DIR):
    """The embedded StableDiffusionXLPipeline, loaded offline (weights are stored in fp16)."""
    from diffusers import StableDiffusionXLPipeline

    if not os.path.exists(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"no demo model at {path}; train one with scripts/train_demo_model.py")
    pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
