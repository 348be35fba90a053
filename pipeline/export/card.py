"""The model card (README.md in an export): what someone looking at a shared model wants to know.

Data (the shard patterns of `data.urls`, images seen), optimizer steps, the evaluation numbers
`ddpm-eval` wrote for this checkpoint (RUN_DIR/eval/step-NNNNNNNN.json, when present), a sample
grid (samples.png), the resolved config, and the license of the demo data when the run trained on
it. Hugging Face Hub metadata goes in the YAML front matter, so the Hub shows the card as it
shows diffusers' own.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import to_yaml

METRICS = ("fid", "kid", "bpd")
_DEMO_NOTICE = "# Demo data: a Fashion-MNIST subset"  # the first line of data/demo/NOTICE.md
DEMO_LICENSE = ("The demo data is a 2,000-image subset of the Fashion-MNIST training split "
                "(Xiao, Rasul and Vollgraf 2017, https://github.com/zalandoresearch/fashion-mnist), "
                "Copyright 2017 Zalando SE, under the MIT (Expat) license; see data/demo/NOTICE.md "
                "of ddpm-pipeline.")


def is_demo_data(urls: list[str], cwd: Path | None = None) -> bool:
    """Whether every entry of `data.urls` is in a directory holding the demo data's NOTICE.md
    (data/demo/ of this repository): a relative entry is taken from `cwd` (default: the current
    directory, where ddpm-train usually ran)."""
    from braceexpand import braceexpand

    def demo_dir(path: Path) -> bool:
        notice = (path if path.is_dir() else path.parent) / "NOTICE.md"
        try:
            return notice.read_text(encoding="utf-8").startswith(_DEMO_NOTICE)
        except OSError:
            return False

    names = [u for pattern in urls for u in braceexpand(str(pattern))]
    return bool(names) and all(demo_dir(Path(cwd or ".") / n) for n in names)


def eval_results(run_dir: Path, step: int) -> dict[str, Any] | None:
    """The `ddpm-eval` result for checkpoint `step` (RUN_DIR/eval/step-NNNNNNNN.json), or None."""
    path = run_dir / "eval" / f"step-{step:08d}.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def _metric_rows(result: dict[str, Any]) -> list[tuple[str, Any]]:
    """(metric, value) for FID, KID and bpd, wherever the result JSON keeps them."""
    rows = []
    for where in (result, result.get("metrics"), result.get("results")):
        if not isinstance(where, dict):
            continue
        for name in METRICS:
            value = where.get(name)
            if isinstance(value, dict):  # e.g. {"value": ..., "std": ...}
                value = value.get("value", value.get("mean"))
            if isinstance(value, (int, float)) and name not in dict(rows):
                rows.append((name, value))
    return rows


def model_card(cfg, *, ckpt: Path, train_state: dict[str, Any], run_dir: Path, fmt: str,
               has_samples: bool, samples_note: str) -> str:
    """The README.md text of an export in format `fmt` ('native' or 'diffusers')."""
    d = cfg.data
    step = int(train_state.get("step", 0))
    images_seen = train_state.get("images_seen")
    demo = is_demo_data(list(d.urls))
    T = cfg.diffusion.timesteps
    world = train_state.get("world_size", "?")
    lines = ["---"]
    if fmt == "diffusers":
        lines += ["library_name: diffusers", "pipeline_tag: unconditional-image-generation",
                  "tags:", "- ddpm", "- unconditional-image-generation", "- diffusers:DDPMPipeline"]
    else:
        lines += ["tags:", "- ddpm", "- unconditional-image-generation"]
    # no `license:` key: the weights' license is the owner's to choose; the data's is stated below
    lines += ["---", "",
              f"# DDPM, {d.image_size}x{d.image_size}, {d.channels} channel{'s' if d.channels > 1 else ''}",
              "",
              f"A denoising diffusion model (Ho et al. 2020) trained with ddpm-pipeline: the EMA weights "
              f"(decay {cfg.ema.decay}) of checkpoint `{ckpt.name}` of run `{run_dir.name}`.",
              "", "## Training", "",
              f"- optimizer steps: {step:,}",
              f"- images seen: {images_seen:,}" if isinstance(images_seen, int) else "- images seen: unknown",
              f"- global batch: {cfg.train.micro_batch_size} per device x {cfg.train.grad_accum_steps} "
              f"accumulation x {world} device{'' if world == 1 else 's'}",
              f"- diffusion: T = {T}, {cfg.diffusion.beta_schedule} betas",
              "", "## Data", "",
              "Shards (`data.urls`):", ""]
    lines += [f"- `{u}`" for u in d.urls]
    lines += ["", DEMO_LICENSE if demo else "The data's license is the data owner's; it is not "
              "recorded in the run.", "", "## Evaluation", ""]
    result = eval_results(run_dir, step)
    rows = _metric_rows(result) if result else []
    if rows:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {name.upper() if name != 'bpd' else 'bits/dim'} | {value:.4g} |" for name, value in rows]
        details = {k: result[k] for k in ("num", "num_samples", "sampler", "steps", "seed", "reference")
                   if k in result}
        if details:
            lines += ["", "Measured by `ddpm-eval` with " + ", ".join(f"{k} {v}" for k, v in details.items())
                      + f" (`eval/step-{step:08d}.json` of the run)."]
    else:
        lines.append(f"No `ddpm-eval` result for step {step} (`eval/step-{step:08d}.json`) was found.")
    lines += ["", "## Samples", ""]
    lines += (["![samples](samples.png)", "", samples_note] if has_samples else [samples_note])
    lines += ["", "## Use", ""]
    if fmt == "diffusers":
        lines += ["```python", "from diffusers import DDPMPipeline, DDIMPipeline", "",
                  'pipe = DDPMPipeline.from_pretrained("THIS_FOLDER")',
                  f"images = pipe(batch_size=16, num_inference_steps={T}).images  # all T steps, as trained",
                  "",
                  'ddim = DDIMPipeline.from_pretrained("THIS_FOLDER")',
                  "images = ddim(batch_size=16, num_inference_steps=50, eta=0.0,",
                  "              use_clipped_model_output=True).images  # the DDIM update ddpm-sample uses",
                  "```", "",
                  "With the same generator, `DDPMPipeline` reproduces `ddpm-sample --sampler ddpm` "
                  "(within 1e-4 in float32). `DDIMPipeline` spaces its K steps from 0 by T // K "
                  "(diffusers' `leading`), `ddpm-sample --steps K` evenly from T-1 to 0, so the two agree "
                  "exactly at K = T and sample the same model at other K."]
    else:
        lines += ["```", "ddpm-sample THIS_FOLDER --num 64 --out grid.png", "```", "",
                  "`ema.safetensors` and `model.safetensors` load into `pipeline.models.unet.UNet."
                  "from_config` with `config.yaml`."]
    lines += ["", "## Config", "", "The run's resolved config:", "", "```yaml", to_yaml(cfg).rstrip(), "```", ""]
    return "\n".join(lines)


def write_card(out_dir: Path, cfg, *, ckpt: Path, run_dir: Path, fmt: str, ema: dict,
               card_samples: int) -> list[Path]:
    """README.md and samples.png into `out_dir`. The grid is the run's own for this step
    (RUN_DIR/samples/step-NNNNNNNN.png) when the trainer drew one, else `card_samples` images
    drawn here from the EMA weights (DDIM, 50 steps or T if fewer, seed 0); 0 draws none."""
    from pipeline.atomic import write_bytes_atomic, write_text_atomic
    from pipeline.ckpt.checkpointer import read_train_state

    state = read_train_state(ckpt)
    step = int(state.get("step", 0))
    grid = run_dir / "samples" / f"step-{step:08d}.png"
    written, has_samples = [], True
    if grid.is_file():
        write_bytes_atomic(out_dir / "samples.png", grid.read_bytes())
        note = f"The trainer's sample grid at step {step} (`samples/step-{step:08d}.png` of the run)."
    elif card_samples > 0:
        steps = min(50, cfg.diffusion.timesteps)
        _draw_grid(out_dir / "samples.png", cfg, ema, card_samples, steps)
        note = (f"{card_samples} samples from the EMA weights: `ddpm-sample --sampler ddim --steps {steps} "
                f"--seed 0`, drawn at export.")
    else:
        note, has_samples = "No sample grid (exported with --card-samples 0).", False
    if has_samples:
        written.append(out_dir / "samples.png")
    text = model_card(cfg, ckpt=ckpt, train_state=state, run_dir=run_dir, fmt=fmt,
                      has_samples=has_samples, samples_note=note)
    write_text_atomic(out_dir / "README.md", text)
    return written + [out_dir / "README.md"]


def _draw_grid(path: Path, cfg, ema: dict, num: int, steps: int) -> None:
    import tempfile

    import torch

    from pipeline.diffusion.sampling import sample_images
    from pipeline.factory import build_diffusion, build_model
    from pipeline.monitor import make_grid, save_png

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg)
    model.load_state_dict(ema)
    images = sample_images(model.eval().to(device), build_diffusion(cfg).to(device), num, cfg.data.channels,
                           cfg.data.image_size, sampler="ddim", steps=steps, seed=0, device=device)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # atomic: rename into place
        part = Path(tmp) / path.name
        save_png(part, make_grid(images))
        part.replace(path)
