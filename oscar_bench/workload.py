"""How much work each section does: the full benchmark, the tiny CPU run, and the full-size smoke run.

``full`` is what a GPU run measures; ``tiny`` runs the same code on the tiny models in seconds on a CPU;
``smoke`` builds the full-size architectures but does one minimal piece of each kind of work (64x64
images, 2 denoising steps, batch 1), to prove shapes and APIs on a CPU before GPU time is spent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Scale:
    mode: str
    # synthesis
    resolution: int  # 0: the diffusion model's native size
    steps: int  # 0: the run's num-inference-steps
    official_images: int  # timed official-style images (one per call)
    official_warmup: bool  # one untimed official-style image first
    project_batches: int  # timed full batches of the project's path, after one warm-up batch
    batch_size: int  # images per batch; 0: what the project's path chooses
    bare_pipeline: bool  # also time the bare pipeline call (no PNGs)
    # training
    train_images: int
    png_size: int
    train_image_size: int  # 0: the run's classifier-image-size
    train_epochs: int  # timed epochs after the first
    baseline_iterations: int
    baseline_batch: int  # the large-batch baseline (the other one uses the run's batch size)
    # inversion
    inversion_targets: int
    inversion_steps: int  # the short runs; the long one does twice as many
    # fidelity
    fidelity_images: int  # vision-tower passes on ready pixels (whole batches)
    fidelity_files: int  # PNG files (png_size) decoded, preprocessed and embedded as the stage does
    # client
    client_images: int  # at most; the client section cuts them to its time (whole batches)

    def to_dict(self) -> dict:
        return asdict(self)


SCALES = {
    # Timing windows long enough that one-off costs do not decide a ratio: 4 synthesis batches (the last
    # one's PNG drain inside the window), 2 x 2,048 training images.
    "full": Scale("full", resolution=0, steps=0, official_images=4, official_warmup=True, project_batches=4,
                  batch_size=0, bare_pipeline=True,
                  train_images=2048, png_size=512, train_image_size=0, train_epochs=2, baseline_iterations=30,
                  baseline_batch=256, inversion_targets=540, inversion_steps=20, fidelity_images=2048,
                  fidelity_files=256, client_images=2048),
    "tiny": Scale("tiny", resolution=0, steps=4, official_images=2, official_warmup=True, project_batches=1,
                  batch_size=0, bare_pipeline=True,
                  train_images=8, png_size=48, train_image_size=32, train_epochs=1, baseline_iterations=2,
                  baseline_batch=8, inversion_targets=12, inversion_steps=3, fidelity_images=8, fidelity_files=4,
                  client_images=4),
    "smoke": Scale("smoke", resolution=64, steps=2, official_images=1, official_warmup=False,
                   project_batches=1, batch_size=1, bare_pipeline=False,
                   train_images=6, png_size=64, train_image_size=64, train_epochs=1, baseline_iterations=1,
                   baseline_batch=4, inversion_targets=4, inversion_steps=3, fidelity_images=2, fidelity_files=2,
                   client_images=2),
}
