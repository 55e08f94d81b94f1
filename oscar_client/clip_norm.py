"""Choose ``dp-clip-norm`` for ``tokens`` from public captions: how far they lie from the empty prompt.

Under ``tokens`` a DP release clips each caption's departure from the empty prompt's encoding,
``x - empty`` (``[77, H]`` as one vector), to norm C (``oscar_client.privacy``). C must be fixed without
looking at the private data, so measure departures on *public* captions of the same kind (captions of a
public image set of your domain, or the captioner's output on public images of your classes) through the
same text encoder::

    python -m oscar_client.clip_norm --encoder CompVis/stable-diffusion-v1-4 --captions public-captions.txt

It prints quantiles of the departure norms. Noise grows with C (sigma = z * 2C/n_pub) while captions longer
than C are shrunk to C: the median is the usual compromise (half the captions are clipped a little, none
carries more than its share). Never run it on the private captions: a C chosen from them leaks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from oscar_common.devices import resolve_device
from oscar_common.models.loading import load_diffusion_text_encoder
from oscar_common.models.text_encoding import encode_tokens

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def departure_norms(captions: Sequence[str], encoder_id: str, device: torch.device) -> np.ndarray:
    """L2 norm of each caption's ``tokens`` encoding minus the empty prompt's (the vector DP clips)."""
    if not captions:
        raise ValueError("no captions: give a file with one public caption per line")
    tokenizer, text_encoder = load_diffusion_text_encoder(encoder_id, device, torch.float32)
    states = encode_tokens(list(captions), tokenizer, text_encoder).numpy().astype(np.float64)
    empty = encode_tokens([""], tokenizer, text_encoder)[0].numpy().astype(np.float64)
    return np.linalg.norm((states - empty).reshape(len(captions), -1), axis=1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oscar_client.clip_norm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", required=True,
                        help="the run's diffusion-model (its text encoder encodes tokens uploads)")
    parser.add_argument("--captions", type=Path, required=True, help="public captions, one per line")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if not args.captions.is_file():
        parser.error(f"--captions {args.captions} is not a file")
    captions = [line.strip() for line in args.captions.read_text().splitlines() if line.strip()]
    norms = departure_norms(captions, args.encoder, resolve_device(args.device))
    print(f"departure norms of {len(norms)} public captions from the empty prompt ({args.encoder}):")
    for q in QUANTILES:
        print(f"  {int(q * 100):>3}%: {np.quantile(norms, q):.4g}")
    print(f"  max: {norms.max():.4g}")
    print(f"suggested: dp-clip-norm={np.median(norms):.4g} (the median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
