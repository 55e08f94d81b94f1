"""Tiny random-weight stand-ins for the three frozen models, for the offline demo and the tests.

No weights can be downloaded on the machines this project is developed on, so the loading code in
:mod:`oscar_common.models.loading` is exercised on tiny models with the same classes, file layout and
tokenizers as the real checkpoints:

* ``Salesforce/blip-image-captioning-base``: BLIP captioner, 32x32 images, a hand-made BERT vocabulary;
* ``openai/clip-vit-base-patch32``: a full CLIP model whose text tower has ``projection_dim=512`` and the
  real CLIP BPE vocabulary (49408 tokens, from the ``open_clip_torch`` wheel), so pooled payloads have
  exactly the real shape;
* ``CompVis/stable-diffusion-v1-4``: a Stable Diffusion pipeline generating 32x32 images with SD 1.4's
  scheduler settings and the same CLIP tokenizer;
* ``Salesforce/blip2-flan-t5-xl`` (only through :func:`install_tiny_blip2`): a BLIP-2 with a tiny T5
  language model, a small unigram (T5-style) vocabulary and 4 query tokens.

They are built at run time (never committed) and written either into plain directories or into a
Hugging Face hub cache (``models--Org--Name/snapshots/<hash>/`` + ``refs/main``), where
``from_pretrained("Org/Name")`` finds them with ``HF_HUB_OFFLINE=1``: the same code path as the real
models. Their outputs are meaningless; only shapes, types and plumbing are real.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import (
    BertTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Tokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from oscar_common.models.clip_context import CLIP_CONTEXT_LENGTH
from oscar_common.models.loading import STAND_IN_MARKER  # the file that says "stand-in"; report.md reads it

log = logging.getLogger(__name__)

CAPTIONER_ID = "Salesforce/blip-image-captioning-base"
BLIP2_ID = "Salesforce/blip2-flan-t5-xl"  # the official OSCAR code's captioner (installed on request only)
CLIP_ID = "openai/clip-vit-base-patch32"
DIFFUSION_ID = "CompVis/stable-diffusion-v1-4"

STAND_IN_TEXT = "tiny random-weight stand-in built by oscar_demo.tiny (outputs are noise; accuracy is at chance)"
CLIP_PROJECTION_DIM = 512  # openai/clip-vit-base-patch32's, so pooled payloads are K x 512
TEXT_HIDDEN = 32  # hidden size of every tiny text tower (and the UNet's cross-attention dim)
BLIP_IMAGE_SIZE = 32
SD_IMAGE_SIZE = 32  # latent 16x16 with a 2-level VAE (scale factor 2): 30 images x 50 steps in seconds

# Plain English words for the tiny BLIP's BERT vocabulary (random weights make random captions; a real
# word list keeps them readable and exercises the same WordPiece tokenizer as bert-base-uncased).
_BLIP_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
_BLIP_WORDS = """
a an the of in on at with and or to from by for over under near next behind above below between
is are was be has have it its this that there here some many few one two three four five six seven
eight nine ten zero number digit drawing picture photo image painting sketch close up view black
white red green blue yellow orange purple pink brown gray grey dark light bright small large big
little tall short long round square flat old new young clean dirty wet dry hot cold soft hard
man woman person people boy girl child baby face hand head hair eye eyes smile group crowd
dog cat bird horse cow sheep pig duck fish bear lion tiger elephant monkey mouse rabbit snake frog
car truck bus train plane boat bike bicycle motorcycle road street city town building house home
room kitchen table chair bed sofa window door wall floor roof tree trees flower flowers grass field
forest mountain hill river lake sea ocean beach sand water sky cloud clouds sun moon star snow rain
food plate bowl cup glass bottle pizza cake apple banana orange bread sandwich fruit vegetable
book paper letter sign text word words line lines shape circle curve dot dots pattern texture
background foreground front side top bottom left right middle center corner edge
sitting standing walking running playing eating drinking holding looking flying swimming riding
lying wearing carrying jumping sleeping writing reading showing made shaped drawn written painted
wooden metal plastic stone brick glass leather cloth fabric paper cardboard
game ball toy computer phone screen keyboard clock lamp light camera television laptop
shirt hat dress coat shoes bag umbrella tie glasses jacket
very quite together alone each other another same different only just also
hand written handwritten blurry sharp simple empty full open closed
""".split()


def _blip_vocab() -> list[str]:
    words = list(dict.fromkeys(_BLIP_WORDS))  # de-duplicate, keep order
    return _BLIP_SPECIAL + words + list(".,!?'-:;")


# ----------------------------------------------------------------------------- tokenizers
def _open_clip_bpe_path() -> Path:
    """The real CLIP BPE merges file shipped in the ``open_clip_torch`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip_torch is needed for the CLIP BPE vocabulary: pip install open-clip-torch")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"CLIP BPE vocabulary not found at {path}")
    return path


def clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP BPE tokenizer (49408 tokens), built exactly as OpenAI's ``SimpleTokenizer`` does."""
    with gzip.open(_open_clip_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_tokens = list(bytes_to_unicode().values())
    vocab_list = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_CONTEXT_LENGTH)


def _clip_text_config(tokenizer: CLIPTokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_CONTEXT_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# ----------------------------------------------------------------------------- savers
def save_tiny_captioner(out_dir: Path, seed: int = 0) -> Path:
    """A tiny BLIP captioner + processor, loadable like Salesforce/blip-image-captioning-base."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    words = _blip_vocab()
    # vocab.txt as in bert-base-uncased; the tokenizer itself is saved as tokenizer.json.
    (out_dir / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    # BLIP's tokenizer is bert-base-uncased with [DEC] as bos: generate() starts from bos and stops at sep.
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, bos_token="[DEC]", model_max_length=512)
    image_processor = BlipImageProcessor(size={"height": BLIP_IMAGE_SIZE, "width": BLIP_IMAGE_SIZE})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)

    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            bos_token_id=tokenizer.bos_token_id,
            sep_token_id=tokenizer.sep_token_id,
            eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
            initializer_range=0.2,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=BLIP_IMAGE_SIZE,
            patch_size=8,
            initializer_range=0.2,
        ),
        projection_dim=32,
        image_text_hidden_size=32,
    )
    # initializer_range 0.2 instead of 0.02: with the default, random weights give every image the same
    # caption; larger weights make captions depend on the image, so class means differ as with a real BLIP.
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def save_tiny_blip2(out_dir: Path, seed: int = 0) -> Path:
    """A tiny BLIP-2 (ViT + Q-Former + T5 encoder-decoder) + processor, loadable like Salesforce/blip2-flan-t5-xl.

    As in the current hub checkpoints, the processor knows ``num_query_tokens`` and the config names the
    ``<image>`` token the processor adds, whose embeddings the Q-Former outputs replace.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # T5's layout: <pad>=0, </s>=1, <unk>=2, then "▁word" pieces (no extra_ids: they are for span corruption).
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + word, -float(rank)) for rank, word in enumerate(dict.fromkeys(_BLIP_WORDS), start=1)]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    image_processor = BlipImageProcessor(size={"height": BLIP_IMAGE_SIZE, "width": BLIP_IMAGE_SIZE})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=4)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 initializer_range=0.2)
    config = Blip2Config(
        vision_config=dict(**small, image_size=BLIP_IMAGE_SIZE, patch_size=8),
        qformer_config=dict(**small, vocab_size=64, encoder_hidden_size=32, max_position_embeddings=64),
        text_config=dict(model_type="t5", vocab_size=len(tokenizer), d_model=TEXT_HIDDEN, d_kv=8, d_ff=64,
                         num_layers=2, num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                         eos_token_id=1, pad_token_id=0, initializer_factor=5.0),
        num_query_tokens=processor.num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(processor.image_token.content),
        initializer_range=0.2,
    )
    # Larger random weights than the defaults, for the same reason as the tiny BLIP: image-dependent captions.
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def save_tiny_clip(out_dir: Path, seed: int = 0) -> Path:
    """A tiny full CLIP model (text + vision towers, projection 512) + processor with the real BPE vocab."""
    out_dir = Path(out_dir)
    tokenizer = clip_tokenizer()
    config = CLIPConfig(
        text_config=_clip_text_config(tokenizer),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=CLIP_PROJECTION_DIM,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(out_dir)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


def save_tiny_stable_diffusion(out_dir: Path, seed: int = 0) -> Path:
    """A tiny Stable Diffusion 1.x pipeline (32x32 images) in the diffusers folder layout."""
    out_dir = Path(out_dir)
    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_clip_text_config(tokenizer))).eval()
    unet = UNet2DConditionModel(
        sample_size=SD_IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(4, 8),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,
        norm_num_groups=2,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=SD_IMAGE_SIZE,
    )
    # SD 1.4's own scheduler config (scheduler/scheduler_config.json on the hub).
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    return out_dir


TINY_MODELS: dict[str, Callable[[Path, int], Path]] = {
    CAPTIONER_ID: save_tiny_captioner,
    CLIP_ID: save_tiny_clip,
    DIFFUSION_ID: save_tiny_stable_diffusion,
}


# ----------------------------------------------------------------------------- hub cache
def _repo_dir(cache_dir: Path, model_id: str) -> Path:
    return cache_dir / ("models--" + model_id.replace("/", "--"))


def installed_snapshot(cache_dir: Path, model_id: str) -> Path | None:
    """The snapshot ``refs/main`` points to in a hub cache, if it is there (real or tiny)."""
    repo = _repo_dir(Path(cache_dir), model_id)
    ref = repo / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = repo / "snapshots" / ref.read_text().strip()
    return snapshot if snapshot.is_dir() else None


def install_tiny_models(cache_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write the tiny models into a Hugging Face hub cache under their real ids; return id -> snapshot.

    Idempotent: a model whose ``refs/main`` already points to a snapshot (tiny or a real download) is left
    alone. Atomic: each snapshot is built in a temporary folder inside ``cache_dir``, renamed into place,
    and only then published by writing ``refs/main``, so a reader never sees half a model.
    """
    return install_models(Path(cache_dir), TINY_MODELS, seed)


def offline_hub_env(cache_dir: Path) -> dict[str, str]:
    """Environment for processes that must load their models from ``cache_dir`` alone: never the network."""
    return {"HF_HUB_CACHE": str(Path(cache_dir).resolve()), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


def install_tiny_blip2(cache_dir: Path, seed: int = 0) -> Path:
    """Write the tiny BLIP-2 into a hub cache as ``Salesforce/blip2-flan-t5-xl`` (as install_tiny_models)."""
    return install_models(Path(cache_dir), {BLIP2_ID: save_tiny_blip2}, seed)[BLIP2_ID]


def install_models(cache_dir: Path, models: dict[str, Callable[[Path, int], Path]], seed: int,
                   note: str = STAND_IN_TEXT) -> dict[str, Path]:
    """Write each ``save(folder, seed)`` result into the hub cache under its id (see :func:`install_tiny_models`);
    ``note`` is what the stand-in marker file says (reports quote it)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    snapshots: dict[str, Path] = {}
    for model_id, save in models.items():
        existing = installed_snapshot(cache_dir, model_id)
        if existing is not None:
            log.info("%s already in %s, skipped", model_id, existing)
            snapshots[model_id] = existing
            continue
        # A fake but stable commit hash: same seed, same snapshot path.
        revision = hashlib.sha1(f"oscar-tiny/{model_id}/seed={seed}".encode()).hexdigest()
        repo = _repo_dir(cache_dir, model_id)
        snapshot = repo / "snapshots" / revision
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-oscar-tiny-", dir=cache_dir))
        try:
            save(tmp / "snapshot", seed)
            # Read by oscar_common.models.loading.stand_in_note: reports say when their models were these stand-ins.
            (tmp / "snapshot" / STAND_IN_MARKER).write_text(note + "\n")
            snapshot.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(tmp / "snapshot", snapshot)
            except OSError:
                if not snapshot.is_dir():  # else a concurrent install got there first: same content
                    raise
            (repo / "refs").mkdir(exist_ok=True)
            (tmp / "main").write_text(revision)
            os.replace(tmp / "main", repo / "refs" / "main")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("installed %s at %s", model_id, snapshot)
        snapshots[model_id] = snapshot
    return snapshots


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Install tiny random-weight models under the real hub ids into a Hugging Face cache "
        "(use with HF_HUB_CACHE=DIR HF_HUB_OFFLINE=1). For tests and the offline demo only.")
    parser.add_argument("--cache-dir", type=Path, required=True, help="hub cache directory (HF_HUB_CACHE)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for model_id, snapshot in install_tiny_models(args.cache_dir, seed=args.seed).items():
        print(f"{model_id}\t{snapshot}")
    print(f"use: HF_HUB_CACHE={args.cache_dir.resolve()} HF_HUB_OFFLINE=1")


if __name__ == "__main__":
    main()
