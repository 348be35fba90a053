"""Fault injection against one run directory: SIGKILLs, damaged checkpoints and second trainers at
random moments, then a check that the run still ends bit-identical to an uninterrupted one.

    python scripts/fault_soak.py --faults 12 --steps 100 --seed 3

Each round starts the trainer on the same run directory and, once it has made progress, injects one
fault chosen at random:
- kill: SIGKILL the trainer (it resumes from the newest complete checkpoint on the next start);
- second: start a second trainer on the same run directory while the first holds it: the second
  must exit 2 at once naming the holder, and the first must go on untouched (then it is killed);
- damage: SIGKILL, then flip a byte in a file of the newest checkpoint (sizes unchanged, so only
  the CRC-32 sees it): the next start must fall back to an older checkpoint with a warning, set the
  damaged one aside in checkpoints/corrupt/ and never delete a good one.
At the end the run is finished with the same command and its final checkpoint is compared, part
by part, with an uninterrupted run of the same config. Exit status 0 only if every check held.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kill_soak import (REPO, compare_checkpoints, kill, latest, run, start, train_command,  # noqa: E402
                       wait_for)

FAULTS = ("kill", "second", "damage")


def flip_a_byte(path: Path, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    data[rng.randrange(len(data))] ^= 0xFF
    path.write_bytes(bytes(data))


def soak(work: Path, faults: int, steps: int, seed: int, say=print) -> dict:
    sys.path.insert(0, str(REPO))
    from pipeline.ckpt.checkpointer import verify

    rng = random.Random(seed)
    overrides = [f"train.max_steps={steps}", "ckpt.every_steps=2", "ckpt.keep_last=3"]
    straight, target = work / "straight", work / "run"
    t0 = time.monotonic()
    if run(train_command(straight, *overrides), work / "logs/straight.log") != 0:
        raise RuntimeError(f"the uninterrupted run failed; log: {work / 'logs/straight.log'}")
    command = train_command(target, *overrides)
    counts = dict.fromkeys(FAULTS, 0)
    problems: list[str] = []
    damaged: list[str] = []
    for i in range(faults):
        fault = rng.choice(FAULTS)
        before = latest(target)
        log_path = work / f"logs/round-{i:03d}-{fault}.log"
        proc = start(command, log_path)
        try:
            progressed = wait_for(lambda: latest(target) not in (None, before), proc, timeout_s=300)
            if not progressed or latest(target) == f"step-{steps:08d}":
                say(f"round {i}: the run finished first; stopping (use more --steps)")
                break
            time.sleep(rng.uniform(0, 0.3))
            if fault == "second":
                second = subprocess.run(command[0], env=command[1], cwd=REPO, capture_output=True, text=True,
                                        timeout=120)
                if second.returncode != 2 or "in use by another trainer" not in second.stderr:
                    problems.append(f"round {i}: a second trainer was not refused (exit {second.returncode}): "
                                    f"{second.stderr.strip().splitlines()[-1:] }")
                if proc.poll() is not None:
                    problems.append(f"round {i}: the first trainer stopped when the second started; log {log_path}")
        finally:
            kill(proc)
        if fault == "damage":
            ckpt = target / "checkpoints" / latest(target)
            victim = rng.choice(sorted(p for p in ckpt.iterdir() if p.is_file() and p.name != "MANIFEST.json"))
            flip_a_byte(victim, rng)
            damaged.append(ckpt.name)
        counts[fault] += 1
        steps_dirs = sorted(p for p in (target / "checkpoints").glob("step-*"))
        bad = [p.name for p in steps_dirs if verify(p, content=True) is not None and p.name not in damaged[-1:]]
        if bad:
            problems.append(f"round {i}: checkpoints fail verification without having been damaged: {bad}")
        say(f"round {i}: {fault}; latest {latest(target)}; checkpoints {[p.name for p in steps_dirs]}")
    final_log = work / "logs/final.log"
    rc = run(command, final_log)
    final = f"step-{steps:08d}"
    diffs = compare_checkpoints(straight / "checkpoints" / final, target / "checkpoints" / final) if rc == 0 else []
    if rc != 0:
        problems.append(f"the final start failed (exit {rc}); log: {final_log}")
    problems += [f"final checkpoint differs: {d}" for d in diffs]
    corrupt = target / "checkpoints" / "corrupt"
    kept = sorted(p.name.split(".")[0] for p in corrupt.iterdir()) if corrupt.is_dir() else []
    # Every damaged checkpoint was set aside, none deleted (unless a later save of the same step
    # replaced it, which also sets it aside).
    lost = sorted(set(damaged) - set(kept))
    if lost:
        problems.append(f"damaged checkpoints neither kept aside nor found: {lost}")
    return {"faults": sum(counts.values()), **counts, "steps": steps, "final_identical": rc == 0 and not diffs,
            "set_aside": kept, "problems": problems, "seconds": round(time.monotonic() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faults", type=int, default=12, help="faults to inject (default 12)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of the run (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the faults and their moments (default 0)")
    parser.add_argument("--work", type=Path, help="working directory (default: a new temporary one)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="fault-soak-"))
    print(f"working in {work}", flush=True)
    summary = soak(work, args.faults, args.steps, args.seed, say=lambda s: print(s, flush=True))
    print(json.dumps(summary))
    return 0 if not summary["problems"] and summary["final_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
