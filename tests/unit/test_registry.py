"""The checkpoint registry: every registered part round-trips, reads happen before any apply, and
a checkpoint without a part is refused unless the part is optional."""
import pytest
import torch

from pipeline.ckpt.checkpointer import Checkpointer
from pipeline.errors import CheckpointError
from pipeline.train.registry import CheckpointRegistry, Kind


class Parts:
    """One value of every kind, and a registry over them."""

    def __init__(self, seed):
        g = torch.Generator().manual_seed(seed)
        self.weights = {"w": torch.randn(3, 4, generator=g)}
        self.obj = {"m": torch.randn(5, generator=g), "n": seed}
        self.counter = seed
        self.rank_value = {"pos": seed * 10}
        self.collective_seen = None
        self.registry = reg = CheckpointRegistry()
        reg.register("net", Kind.TENSORS, lambda: self.weights, lambda v: setattr(self, "weights", v))
        reg.register("opt", Kind.OBJECT, lambda: self.obj, lambda v: setattr(self, "obj", v))
        reg.register("counter", Kind.JSON, lambda: self.counter, lambda v: setattr(self, "counter", v),
                     describe=lambda: f"counter {self.counter}")
        reg.register("pos", Kind.RANK, lambda: self.rank_value, lambda rs: setattr(self, "rank_value", rs.mine))
        reg.register("engine", Kind.COLLECTIVE, lambda: lambda tmp: (tmp / "engine").mkdir() or
                     (tmp / "engine" / "part.bin").write_bytes(b"x" * seed),
                     lambda ckpt: setattr(self, "collective_seen", (ckpt / "engine" / "part.bin").read_bytes()))


def _checkpointer(tmp_path):
    return Checkpointer(tmp_path, keep_last=3, rank=0, world_size=1, barrier=lambda: None)


def test_every_kind_round_trips_and_the_log_line_comes_from_the_registry(tmp_path):
    saved = Parts(seed=3)
    ckpt = saved.registry.save(_checkpointer(tmp_path), step=7)
    fresh = Parts(seed=5)
    text = fresh.registry.load(ckpt, rank=0, world_size=1)
    assert torch.equal(fresh.weights["w"], saved.weights["w"])
    assert torch.equal(fresh.obj["m"], saved.obj["m"]) and fresh.obj["n"] == 3
    assert fresh.counter == 3 and fresh.rank_value == {"pos": 30}
    assert fresh.collective_seen == b"xxx"
    assert text == "net, opt, counter 3, pos, engine"


def test_nothing_is_applied_when_one_part_cannot_be_read(tmp_path):
    ckpt = Parts(seed=3).registry.save(_checkpointer(tmp_path), step=1)
    (ckpt / "opt.pt").write_bytes(b"not a torch file")
    fresh = Parts(seed=5)
    before = fresh.weights["w"].clone()
    with pytest.raises(Exception):
        fresh.registry.load(ckpt, rank=0, world_size=1)
    assert torch.equal(fresh.weights["w"], before) and fresh.counter == 5


def test_a_part_the_checkpoint_lacks_is_refused_unless_optional(tmp_path):
    ckpt = Parts(seed=3).registry.save(_checkpointer(tmp_path), step=1)
    fresh = Parts(seed=5)
    value = []
    fresh.registry.register("added_later", Kind.JSON, lambda: 1, value.append)
    with pytest.raises(CheckpointError, match="no 'added_later'"):
        fresh.registry.load(ckpt, rank=0, world_size=1)
    fresh = Parts(seed=5)
    fresh.registry.register("added_later", Kind.JSON, lambda: 1, value.append, optional=True)
    fresh.registry.load(ckpt, rank=0, world_size=1)
    assert value == [] and fresh.counter == 3


def test_registering_a_name_twice_is_an_error():
    reg = CheckpointRegistry()
    reg.register("a", Kind.JSON, lambda: 1, lambda v: None)
    with pytest.raises(ValueError, match="twice"):
        reg.register("a", Kind.JSON, lambda: 1, lambda v: None)


def test_after_a_change_of_world_size_a_rank_part_gets_every_saved_rank(tmp_path):
    # Two ranks' files, written as a 2-process run would (rank files are per rank).
    parts = [Parts(seed=1), Parts(seed=2)]
    ck = _checkpointer(tmp_path)
    ckpt = parts[0].registry.save(ck, step=4)
    import json

    from pipeline.ckpt import checkpointer as ck_io
    torch.save({"pos": {"pos": 20}}, ckpt / ck_io.rank_file(1))
    state = json.loads((ckpt / "train_state.json").read_text())
    (ckpt / "train_state.json").write_text(json.dumps({**state, "world_size": 2}))
    got = []
    fresh = CheckpointRegistry()
    fresh.register("pos", Kind.RANK, lambda: None, lambda rs: got.append((rs.mine, rs.every_rank())))
    fresh.load(ckpt, rank=0, world_size=1)
    assert got == [(None, [{"pos": 10}, {"pos": 20}])]
