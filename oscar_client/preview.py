"""``oscar-preview``: see what the server will learn from your upload before you send it.

Run by a client on its own machine, with the node config its SuperNode uses::

    oscar-preview --node-config "data-dir='/data/clipart' dp-epsilon=4" --run-config run.toml

It builds exactly the upload the ClientApp would send (same code path, same differential-privacy noise),
decodes it the way the server does (``pooled``: prompt inversion against the same CLIP text encoder), and
writes ``<output-dir>/preview/``:

* ``preview.md``: per class, the prompt the server will decode, how close it gets (cosine), and the
  nearest of your own captions with its similarity: how near the server can get to your data;
* ``preview.png``: per class, your image whose caption is nearest, and, when Stable Diffusion is in the
  local model cache, a few images generated from the decoded prompt;
* ``preview.json``: the digest of the upload it shows. With ``require-preview-approval = true`` in the
  node config, the client uploads only when this digest matches what it is about to send.

Both ``preview.md`` and ``preview.json`` show the privacy ledger (``oscar_client.ledger``): this data's
earlier releases and their composed epsilon, before and after this upload. A preview is not a release: only
the upload is recorded.

The run settings come from ``--run-config`` (the TOML or ``key=value`` pairs the server runs with) or from
``--instruction``: a client that refused for want of a preview saved the server's instruction to
``<output-dir>/preview/instruction.json``, which is the default.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from io import BytesIO
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from oscar_client.policy import ClientPolicy
from oscar_client.upload import PreparedUpload, prepare_upload
from oscar_common.config import OscarConfig
from oscar_common.devices import resolve_device, resolve_dtype
from oscar_common.files import atomic_write_bytes, atomic_write_json
from oscar_common.logs import setup_logging
from oscar_common.models.inversion import invert_embeddings
from oscar_common.models.loading import (
    ModelNotFoundError,
    check_diffusion_pipeline_files,
    load_clip_text_encoder,
    load_diffusion_pipeline,
)
from oscar_common.node_settings import NodeSettings
from oscar_common.run_config import load_run_config
from oscar_common.wire import TrainInstruction

log = logging.getLogger("oscar.preview")
PREVIEW_DIR = "preview"


class PreviewRequired(RuntimeError):
    """The client requires an approved preview of this very upload, and there is none."""


def preview_dir(node: NodeSettings) -> Path:
    return node.output_dir / PREVIEW_DIR


def check_preview_approval(node: NodeSettings, instruction: TrainInstruction, digest: str) -> None:
    """Raise :class:`PreviewRequired` unless ``preview.json`` shows exactly this upload; then the server's
    instruction is saved next to it, so ``oscar-preview`` can run with no other arguments."""
    folder = preview_dir(node)
    shown = None
    try:
        shown = json.loads((folder / "preview.json").read_text()).get("upload_digest")
    except (OSError, ValueError):
        pass
    if shown == digest:
        log.info("client %s: the upload matches the approved preview in %s", node.name, folder)
        return
    atomic_write_json(folder / "instruction.json", _instruction_json(instruction))
    why = "there is no preview yet" if shown is None else "the preview shows other data or settings"
    raise PreviewRequired(
        f"require-preview-approval is on and {why}: on this client run `oscar-preview --node-config "
        f"\"data-dir='{node.data_dir}' ...\"` (the SuperNode's node config; the server's settings were saved to "
        f"{folder / 'instruction.json'}), read {folder / 'preview.md'}, then start the run again")


def build_preview(node: NodeSettings, instruction: TrainInstruction, policy: ClientPolicy, *,
                  inversion_tokens: int, inversion_steps: int, inversion_lr: float, prompt_template: str,
                  images_per_class: int, guidance_scale: float, num_inference_steps: int,
                  diffusion_model: str | None) -> dict[str, Any]:
    """Compute the upload, decode it, write preview.md / preview.png / preview.json; returns preview.json."""
    started = time.monotonic()
    prepared = prepare_upload(node, instruction, policy, keep_embeddings=True)
    upload, encoded = prepared.upload, prepared.encoded
    device = resolve_device(node.device)
    class_names = list(instruction.class_names)

    rows = []
    decoded = _decode(prepared, instruction, device, inversion_tokens, inversion_steps, inversion_lr)
    for row, (class_id, mean) in enumerate(zip(upload.class_ids.tolist(), upload.means)):
        own = np.flatnonzero(encoded.labels == class_id)
        sims = _cosines(encoded.embeddings[own], mean)
        best = int(own[int(np.argmax(sims))])
        text = decoded[row][0] if decoded else None
        rows.append({
            "class_id": class_id, "class_name": class_names[class_id],
            "decoded_prompt": text, "decoded_cosine": None if decoded is None else round(decoded[row][1], 4),
            "prompt": None if text is None else prompt_template.format(class_name=class_names[class_id].replace("_", " "),
                                                                     prompt=text),
            "nearest_caption": encoded.captions[best], "nearest_caption_similarity": round(float(sims.max()), 4),
            "nearest_image": str(encoded.paths[best]),
        })
    images = _generate(rows, diffusion_model, device, images_per_class, guidance_scale, num_inference_steps,
                       instruction.seed) if images_per_class > 0 else {}

    folder = preview_dir(node)
    result = {"client": node.name, "upload_digest": prepared.digest, "scheme": instruction.scheme,
              "differential_privacy": None if upload.dp is None else upload.dp.as_dict(),
              "privacy_ledger": prepared.local_summary["privacy_ledger"],
              "classes": rows, "generated_images": sum(len(v) for v in images.values()),
              "seconds": round(time.monotonic() - started, 1), "instruction": _instruction_json(instruction)}
    atomic_write_bytes(folder / "preview.md", _markdown(result).encode())
    atomic_write_bytes(folder / "preview.png", _picture(rows, images))
    atomic_write_json(folder / "preview.json", result)  # last: it is what approves the upload
    return result


def _decode(prepared: PreparedUpload, instruction: TrainInstruction, device: torch.device, tokens: int,
            steps: int, lr: float) -> list[tuple[str, float]] | None:
    """pooled: the server's prompt inversion, on the same CLIP; tokens: SD reads the means directly."""
    if instruction.scheme != "pooled":
        return None
    tokenizer, text_model = load_clip_text_encoder(instruction.encoder_id, device, torch.float32)
    targets = torch.from_numpy(prepared.upload.means.astype(np.float32))
    inverted = invert_embeddings(targets, tokenizer, text_model, num_tokens=tokens, steps=steps, lr=lr,
                                 seed=instruction.seed)
    return [(p.text, p.cosine) for p in inverted]


def _cosines(embeddings: np.ndarray, target: np.ndarray) -> np.ndarray:
    flat = embeddings.reshape(len(embeddings), -1).astype(np.float64)
    goal = target.reshape(-1).astype(np.float64)
    return flat @ goal / (np.linalg.norm(flat, axis=1) * np.linalg.norm(goal) + 1e-12)


def _generate(rows: list[dict[str, Any]], model_id: str | None, device: torch.device, per_class: int,
              guidance_scale: float, steps: int, seed: int) -> dict[int, list[Image.Image]]:
    """A few images per class from the decoded prompts, if Stable Diffusion is in the local cache."""
    if not model_id or not all(r["prompt"] for r in rows):
        return {}
    try:
        check_diffusion_pipeline_files(model_id)
    except ModelNotFoundError as exc:
        log.info("no local Stable Diffusion (%s): the preview shows prompts, not images", str(exc).splitlines()[0])
        return {}
    # The server's default sampling (the instruction does not carry the scheduler: it is the server's choice).
    pipe = load_diffusion_pipeline(model_id, device, resolve_dtype("auto", device), scheduler=OscarConfig.scheduler)
    images = {}
    for row in rows:
        generator = torch.Generator("cpu").manual_seed(seed * 100_003 + row["class_id"])
        images[row["class_id"]] = pipe(prompt=[row["prompt"]] * per_class, guidance_scale=guidance_scale,
                                       num_inference_steps=steps, generator=generator).images
    return images


def _markdown(result: dict[str, Any]) -> str:
    dp = result["differential_privacy"]
    lines = [f"# What the server will see from {result['client']}", "",
             f"Scheme `{result['scheme']}`; " + (f"differential privacy with epsilon {dp['epsilon']:g}, delta "
                                                 f"{dp['delta']:g} (noise sigma {dp['sigma']:.4g})" if dp else
                                                 "no differential privacy: the means are exact"), "",
             _ledger_line(result["privacy_ledger"]), "",
             f"Upload digest `{result['upload_digest']}` (the upload is approved only while it matches).", "",
             "| class | decoded prompt | cosine | your nearest caption | similarity |", "|---|---|---:|---|---:|"]
    for r in result["classes"]:
        decoded = r["decoded_prompt"] if r["decoded_prompt"] is not None else "(tokens: no text is decoded)"
        cosine = "—" if r["decoded_cosine"] is None else f"{r['decoded_cosine']:.3f}"
        lines.append(f"| {r['class_name']} | {_md(decoded)} | {cosine} | {_md(r['nearest_caption'])} | "
                     f"{r['nearest_caption_similarity']:.3f} |")
    lines += ["", "A cosine near 1 means the server's decoded prompt says what your captions say; the nearest "
              "caption shows which of your images the upload is closest to (preview.png shows it).", ""]
    return "\n".join(lines)


def _ledger_line(ledger: dict[str, Any]) -> str:
    budget = f", budget {ledger['budget']:g}" if ledger["budget"] else ", no dp-budget set"
    return (f"Privacy ledger (`{ledger['ledger']}`): {ledger['releases_before']} earlier releases of this data, "
            f"composed epsilon {_epsilon(ledger['epsilon_before'])}; this upload is {ledger['this_release']} and "
            f"makes it {_epsilon(ledger['epsilon_after'])} (at delta {ledger['delta']:g}{budget}).")


def _epsilon(value: float | str) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _picture(rows: list[dict[str, Any]], images: dict[int, list[Image.Image]], cell: int = 128) -> bytes:
    columns = 1 + max((len(v) for v in images.values()), default=0)
    label_h = 30
    canvas = Image.new("RGB", (cell * columns, (cell + label_h) * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        y = i * (cell + label_h)
        draw.text((4, y + 2), f"{row['class_name']}: {row['decoded_prompt'] or ''}"[:60], fill="black")
        draw.text((4, y + 15), f"nearest caption: {row['nearest_caption']}"[:60], fill="gray")
        try:
            with Image.open(row["nearest_image"]) as own:
                canvas.paste(own.convert("RGB").resize((cell, cell)), (0, y + label_h))
        except OSError:
            pass
        for j, image in enumerate(images.get(row["class_id"], [])):
            canvas.paste(image.convert("RGB").resize((cell, cell)), ((j + 1) * cell, y + label_h))
    buffer = BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def _instruction_json(instruction: TrainInstruction) -> dict[str, Any]:
    return {key: value for key, value in instruction.to_record().items()}


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oscar-preview", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--node-config", required=True, help="the SuperNode's --node-config string")
    parser.add_argument("--run-config", nargs="*", default=None,
                        help="the server's run config: TOML files and/or key=value pairs (else --instruction)")
    parser.add_argument("--instruction", type=Path, default=None,
                        help="a saved train instruction (default: <output-dir>/preview/instruction.json)")
    parser.add_argument("--images-per-class", type=int, default=2,
                        help="images to generate per class when Stable Diffusion is in the local cache (0: none)")
    args = parser.parse_args(argv)
    setup_logging()
    from flwr.common.config import parse_config_args

    node_config = parse_config_args([args.node_config])
    node = NodeSettings.from_context(node_config, {})
    cfg = OscarConfig.from_run_config(load_run_config(args.run_config or []))
    if args.run_config is not None:
        instruction = cfg.train_instruction()
    else:
        path = args.instruction or preview_dir(node) / "instruction.json"
        if not path.is_file():
            parser.error(f"no --run-config and no saved instruction at {path}: pass the server's run config")
        instruction = TrainInstruction.from_record(json.loads(path.read_text()))
    if not instruction.class_names:
        parser.error("the run config has no class-names")
    result = build_preview(node, instruction, ClientPolicy.from_node_config(node_config),
                           inversion_tokens=cfg.inversion_tokens, inversion_steps=cfg.inversion_steps,
                           inversion_lr=cfg.inversion_lr, prompt_template=cfg.prompt_template,
                           images_per_class=args.images_per_class, guidance_scale=cfg.guidance_scale,
                           num_inference_steps=cfg.num_inference_steps, diffusion_model=cfg.diffusion_model)
    folder = preview_dir(node)
    print(f"preview of {len(result['classes'])} classes for {node.name} in {result['seconds']}s:")
    for name in ("preview.md", "preview.png", "preview.json"):
        print(f"  {folder / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
