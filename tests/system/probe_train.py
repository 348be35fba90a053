"""`ddpm-train` with one extra stateful part, registered from outside the Trainer: a per-rank
counter of the optimizer steps this rank has taken. Used by test_kill.py: if the registry did
not save and restore it, a killed and resumed run would count fewer steps than it trained."""
import sys

from pipeline.config import load_config
from pipeline.train.registry import Kind
from pipeline.train.trainer import Trainer, check_run_config


def main(argv):
    cfg = load_config(argv[0], argv[1:])
    check_run_config(__import__("pathlib").Path(cfg.run_dir), cfg, True)
    trainer = Trainer(cfg)
    counter = {"steps": 0}
    trainer.after_step.append(lambda t: counter.__setitem__("steps", counter["steps"] + 1))
    trainer.registry.register("probe", Kind.RANK, lambda: dict(counter),
                              lambda saved: counter.update(saved.mine), describe=lambda: f"probe ({counter['steps']})")
    try:
        trainer.run()
    finally:
        trainer.close()
    print(f"probe counted {counter['steps']} steps", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
