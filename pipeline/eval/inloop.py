"""The Trainer's periodic evaluation of the EMA weights (config section `eval`).

    evaluator = InLoopEval(cfg, runtime)          # at start-up: checks the network file and shards
    ...
    evaluator.maybe_run(step, ema_model, monitor)  # after every optimizer step, on every rank

Every `eval.every_steps` steps every rank takes its share (`pipeline.eval.evaluate`); rank 0 writes
TensorBoard scalars (eval/fid, eval/kid, eval/kid_std, eval/bpd and eval/bpd_prior, _decoder,
_kl_q0.._kl_q3) and RUN_DIR/eval/step-NNNNNNNN.json (atomically). Its noise is keyed to the sample
index and drawn from its own generators, so the training RNG streams are untouched, and the same
step gives the same numbers after a resume. Its state is the last evaluated step (a checkpoint
registry part): a checkpoint written before an evaluation finished leads to that evaluation being
run again on resume (`maybe_run` at the resumed step), one written after it does not.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.atomic import write_text_atomic

_SCALARS = ("fid", "kid", "kid_std", "bpd")
_BPD_PARTS = ("prior", "decoder", "kl_q0", "kl_q1", "kl_q2", "kl_q3")


def result_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "eval" / f"step-{step:08d}.json"


class InLoopEval:
    """Evaluates every `cfg.eval.every_steps` steps (never when 0: then it does nothing at all)."""

    def __init__(self, cfg, runtime, diffusion=None):
        self.cfg, self.every_steps = cfg, cfg.eval.every_steps
        self.max_steps = cfg.train.max_steps
        self.run_dir = Path(cfg.run_dir)
        self.last_step = -1
        """The last step evaluated (-1: none), saved and restored with the checkpoint."""
        self.is_main = runtime.is_main
        self._diffusion = diffusion
        self.evaluation = None
        if self.every_steps <= 0:
            return
        # Only an enabled evaluation pays for these imports (scipy, the network loader).
        from pipeline.eval.evaluate import EvalOptions, Evaluation
        from pipeline.eval.network import verified_network
        from pipeline.eval.spread import Ranks

        e = cfg.eval
        self.opts = EvalOptions(metrics=list(e.metrics), num=e.num_samples, data=list(e.data_urls or cfg.data.urls),
                                sampler="ddim", steps=e.sample_steps, seed=e.seed, batch_size=e.batch_size,
                                network=e.network_path or None, cache_dir=self.run_dir / "eval")
        self.opts.check(has_model=True, timesteps=cfg.diffusion.timesteps)
        # Fail at start-up, not at the first evaluation: the network file and the shards.
        if set(self.opts.metrics) & {"fid", "kid"}:
            verified_network(self.opts.network)
        self.evaluation = Evaluation(self.opts, image_size=cfg.data.image_size, channels=cfg.data.channels,
                                     ranks=Ranks(runtime.rank, runtime.world_size), device=runtime.device,
                                     progress=False)
        self.evaluation.shards()

    @property
    def enabled(self) -> bool:
        return self.evaluation is not None

    def due(self, step: int) -> bool:
        """Every every_steps steps and at the last step (as checkpoints), once per step."""
        return (self.enabled and (step % self.every_steps == 0 or step == self.max_steps)
                and step > self.last_step)

    def maybe_run(self, step: int, ema_model, monitor=None) -> dict | None:
        """Evaluate `ema_model` if `step` is due (a collective then: every rank must call it)."""
        if not self.due(step):
            return None
        if self._diffusion is None:
            from pipeline.factory import build_diffusion

            self._diffusion = build_diffusion(self.cfg)
        from pipeline.eval.bpd import make_bpd_fn

        diffusion = self._diffusion.to(self.evaluation.device)
        bpd_fn = make_bpd_fn(ema_model, diffusion, self.cfg) if "bpd" in self.opts.metrics else None
        result = self.evaluation.run(ema_model, diffusion, bpd_fn,
                                     provenance={"step": step, "checkpoint": None, "weights": "EMA, in the loop"})
        self.last_step = step
        if self.is_main:
            path = result_path(self.run_dir, step)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(result, indent=1) + "\n")
            if monitor is not None:
                monitor.scalars(step, scalars(result))
        return result

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])

    def describe(self) -> str:
        return f"eval (last at step {self.last_step})" if self.last_step >= 0 else "eval (none yet)"


def scalars(result: dict) -> dict[str, float]:
    """TensorBoard tags of a result: eval/fid, eval/kid, eval/kid_std, eval/bpd, eval/bpd_<part>."""
    out = {f"eval/{k}": float(result[k]) for k in _SCALARS if result.get(k) is not None}
    for part in _BPD_PARTS:
        if part in result.get("bpd_breakdown", {}):
            out[f"eval/bpd_{part}"] = float(result["bpd_breakdown"][part])
    return out
