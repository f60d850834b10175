"""Unit tests of the slice overlay (newest wins) against a byte-level model."""
import random

from jfscache.layout import block_key, resolve, slice_block_keys
from jfscache.meta.engine import Slice


def render(segs, size):
    """Bytes a reader would see: each slice id's bytes are (id, offset-in-slice) tags."""
    out = [None] * size
    for g in segs:
        for x in range(g.start, g.end):
            out[x] = (g.sid, g.soff + x - g.start) if g.sid else 0
    return out


def model(slices, size):
    out = [None] * size
    for s in slices:
        for x in range(s.pos, s.pos + s.len):
            out[x] = (s.id, s.off + x - s.pos) if s.id else 0
    return out


def test_newest_wins_random():
    rng = random.Random(7)
    for _ in range(300):
        size = 64
        slices = []
        for i in range(rng.randint(1, 12)):
            pos = rng.randrange(size)
            ln = rng.randint(0, size - pos)
            sid = 0 if rng.random() < 0.2 else i + 1
            slices.append(Slice(pos, sid, ln + 5, rng.randint(0, 5), ln))
        segs = resolve(slices)
        assert render(segs, size) == model(slices, size)
        assert all(a.end <= b.start for a, b in zip(segs, segs[1:]))


def test_slice_pack_roundtrip():
    s = Slice(123, 2**40 + 5, 64 << 20, 7, 99)
    assert Slice.unpack(s.pack()) == s


def test_block_keys():
    assert block_key("vol", 1234567, 2, 4096) == "vol/chunks/1/1234/1234567_2_4096"
    keys = slice_block_keys("v", 5, (4 << 20) * 2 + 10, 4 << 20)
    assert keys == ["v/chunks/0/0/5_0_4194304", "v/chunks/0/0/5_1_4194304", "v/chunks/0/0/5_2_10"]
