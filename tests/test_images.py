"""Tests of bct.model.images: bit-exact round trip, the documented layout, every refusal path,
atomic writes."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
import pytest

from bct.config import Config, ConfigError
from bct.model import images
from bct.model.checkpoint import BertWeights, LayerWeights
from bct.model.images import MANIFEST, ImageError, memory_group, read_images, read_manifest, write_images
from bct.model.integer import quantize, trace
from bct.sim.bits import pack_signed, unpack_signed

CONFIGS = [
    Config(),
    Config(block_size=16, weight_block_size=64, weight_bits=4, weight_exp_bits=6),
    Config(block_size=8, weight_bits=6, vector_bits=7, exp_bits=5),
]


def tiny_weights(seed=0, *, classifier=True, hidden=64, layers=2, heads=2, ffn=128):
    """A seeded random BERT of realistic value ranges, small enough for fast tests."""
    rng = np.random.default_rng(seed)

    def a(*shape, scale=0.05):
        return rng.normal(0.0, scale, shape)

    encoder = tuple(
        LayerWeights(
            q_w=a(hidden, hidden), q_b=a(hidden), k_w=a(hidden, hidden), k_b=a(hidden),
            v_w=a(hidden, hidden), v_b=a(hidden), o_w=a(hidden, hidden), o_b=a(hidden),
            attn_ln_g=1 + a(hidden), attn_ln_b=a(hidden),
            ffn1_w=a(hidden, ffn), ffn1_b=a(ffn), ffn2_w=a(ffn, hidden), ffn2_b=a(hidden),
            out_ln_g=1 + a(hidden), out_ln_b=a(hidden),
        )
        for _ in range(layers)
    )
    head = {}
    if classifier:
        head = dict(pooler_w=a(hidden, hidden), pooler_b=a(hidden), classifier_w=a(hidden, 2),
                    classifier_b=a(2), num_labels=2, problem_type="single_label_classification")
    return BertWeights(
        layers=layers, hidden=hidden, heads=heads, ffn=ffn, vocab=50, max_positions=64,
        type_vocab=2, layer_norm_eps=1e-12, word_emb=a(50, hidden), pos_emb=a(64, hidden),
        type_emb=a(2, hidden), emb_ln_g=1 + a(hidden), emb_ln_b=a(hidden), encoder=encoder,
        source="tiny", **head,
    )


def assert_same_model(a, b):
    ta, tb = a.tensors(), b.tensors()
    assert list(ta) == list(tb)
    for name in ta:
        assert ta[name] == tb[name], name  # BlockTensor ==: format, every mantissa, every exponent
    for f in dataclasses.fields(a):
        if f.name not in ("encoder",) and not hasattr(getattr(a, f.name), "mant"):
            assert getattr(a, f.name) == getattr(b, f.name), f.name


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    qm = quantize(tiny_weights(), CONFIGS[0])
    out = write_images(qm, tmp_path_factory.mktemp("img") / "images")
    return qm, out


@pytest.fixture
def copy(written, tmp_path):
    """A private copy of the written images, free to damage."""
    import shutil

    qm, out = written
    dst = tmp_path / "images"
    shutil.copytree(out, dst)
    return qm, dst


# ---------------------------------------------------------------------------------------------
# Round trip and layout


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "w4-b16-wb64-e6", "w6-v7-b8-e5"])
@pytest.mark.parametrize("classifier", [True, False])
def test_round_trip_is_bit_exact(tmp_path, cfg, classifier):
    qm = quantize(tiny_weights(classifier=classifier), cfg)
    out = write_images(qm, tmp_path / "img")
    back = read_images(out, cfg)
    assert_same_model(qm, back)
    assert back.cfg.hash == cfg.hash
    # The loaded model runs and traces the same integers at every stage.
    ids = np.array([[1, 7, 9, 3, 2, 0, 0, 0]])
    enc = (ids, np.zeros_like(ids), (ids > 0).astype(np.int64))
    ta, tb = trace(qm, enc), trace(back, enc)
    assert list(ta) == list(tb) and ("logits" in ta) == classifier
    for name, value in ta.items():
        if name == "logits":  # the accumulator (Fixed): value and scale
            assert all(np.array_equal(x, y) for x, y in zip(value, tb[name]))
        else:
            assert value == tb[name], name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img"]  # no temporary left


def test_manifest_and_files_follow_the_documented_layout(written):
    qm, out = written
    cfg = qm.cfg
    m = read_manifest(out)
    assert m["config_hash"] == cfg.hash and m["config"] == cfg.to_dict()
    groups = {"embed_w", "embed_v", "layer0_w", "layer0_v", "layer1_w", "layer1_v", "head_w", "head_v"}
    assert set(m["memories"]) == {f"{g}_{k}" for g in groups for k in ("mant", "exp")}
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST] + [f"{n}.hex" for n in m["memories"]])
    tensors = qm.tensors()
    assert list(m["tensors"]) == list(tensors)
    # Tensors are contiguous in model order inside their memory.
    next_base: dict = {}
    for name, t in m["tensors"].items():
        g = memory_group(name)
        assert t["memory"] == g and t["mant_memory"] == f"{g}_mant" and t["exp_memory"] == f"{g}_exp"
        assert t["base"] == next_base.get(g, 0)
        next_base[g] = t["base"] + t["blocks"]
        assert t["shape"] == list(tensors[name].shape)
        assert t["blocks"] == tensors[name].exp.size
        fmt = tensors[name].fmt
        assert (t["bits"], t["block"], t["exp_bits"]) == (fmt.bits, fmt.block, fmt.exp_bits)
    for name, mem in m["memories"].items():
        assert mem["depth"] == next_base[mem["group"]]
        lines = (out / mem["file"]).read_text().split("\n")
        assert lines[0] == (
            f"// bct-gen memory image {name}: width {mem['width']} bits, depth {mem['depth']} words, "
            f"config {cfg.hash}"
        )
        assert lines[-1] == "" and len(lines) == mem["depth"] + 2
        assert all(re.fullmatch(f"[0-9a-f]{{{-(-mem['width'] // 4)}}}", x) for x in lines[1:-1])
    assert m["memories"]["layer0_w_mant"]["width"] == cfg.weight_format.block * cfg.weight_bits
    assert m["memories"]["layer0_v_exp"]["width"] == cfg.exp_bits


def test_block_at_documented_address(written):
    """Block j of row r of a tensor is line base + r * blocks_per_row + j of both memories,
    mantissa i at bits [i*bits, (i+1)*bits) (LSB first), exponent in two's complement."""
    qm, out = written
    m = read_manifest(out)
    t = qm.tensors()["layer1.ffn2_w"]
    e = m["tensors"]["layer1.ffn2_w"]
    B = t.fmt.block
    mant_lines = (out / "layer1_w_mant.hex").read_text().split("\n")[1:]
    exp_lines = (out / "layer1_w_exp.hex").read_text().split("\n")[1:]
    for r, j in [(0, 0), (5, 3), (t.shape[0] - 1, e["blocks_per_row"] - 1)]:
        addr = e["base"] + r * e["blocks_per_row"] + j
        word = int(mant_lines[addr], 16)
        assert unpack_signed(word, t.fmt.bits, B) == t.mant[r, j * B:(j + 1) * B].tolist()
        assert word & ((1 << t.fmt.bits) - 1) == t.mant[r, j * B] & ((1 << t.fmt.bits) - 1)
        assert word == pack_signed(t.mant[r, j * B:(j + 1) * B].tolist(), t.fmt.bits)
        assert int(exp_lines[addr], 16) == t.exp[r, j] & ((1 << t.fmt.exp_bits) - 1)
    assert any(v < 0 for v in t.exp.ravel())  # the two's complement path is exercised


def test_memory_group_names():
    assert memory_group("embed.word") == "embed_w"
    assert memory_group("embed.position") == "embed_w"
    assert memory_group("embed.ln_g") == "embed_v"
    assert memory_group("layer11.ffn1_w") == "layer11_w"
    assert memory_group("layer3.attn_ln_b") == "layer3_v"
    assert memory_group("pooler.w") == "head_w"
    assert memory_group("classifier.b") == "head_v"


def test_none_config_takes_the_manifests(written):
    qm, out = written
    assert_same_model(qm, read_images(out))


# ---------------------------------------------------------------------------------------------
# Refusals


def test_other_config_is_refused(written):
    qm, out = written
    other = Config(block_size=16)
    with pytest.raises(ConfigError) as e:
        read_images(out, other)
    assert str(e.value) == (
        f"memory images in {out} was made for config {qm.cfg.hash}, but the current config is "
        f"{other.hash}; regenerate it with the current config"
    )


def _edit_lines(path, fn):
    lines = path.read_text().split("\n")
    path.write_text("\n".join(fn(lines)))


def test_hex_file_of_another_config_is_refused(copy):
    qm, out = copy
    other = Config(block_size=16).hash
    _edit_lines(out / "layer0_w_exp.hex", lambda ls: [ls[0].replace(qm.cfg.hash, other)] + ls[1:])
    with pytest.raises(ConfigError) as e:
        read_images(out, qm.cfg)
    assert str(e.value).startswith(f"memory image {out / 'layer0_w_exp.hex'} was made for config {other}")


def _header(ls, **kw):
    h = ls[0]
    for k, v in kw.items():
        h = re.sub(rf"{k} \d+", f"{k} {v}", h)
    return [h] + ls[1:]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda ls: _header(ls, width=99), "width 99 bits, but the manifest says 256"),
        (lambda ls: _header(ls, depth=7), "depth 7 words, but the manifest says 4"),
        (lambda ls: ls[:-2] + [""], "truncated: 3 words, header says 4"),
        (lambda ls: ls[:-1] + [ls[1], ""], "too long: 5 words, header says 4"),
        (lambda ls: ls[:3] + ["g" + ls[3][1:]] + ls[4:], "line 4: 'g"),
        (lambda ls: ls[:3] + [ls[3][1:]] + ls[4:], "is not a word of 64 hex digits"),
        (lambda ls: ls[:3] + [" " + ls[3][1:]] + ls[4:], "is not a word of 64 hex digits"),
        (lambda ls: ls[:2] + [("1" if ls[2][0] != "1" else "2") + ls[2][1:]] + ls[3:], "content differs from the manifest"),
        (lambda ls: ["// some other header"] + ls[1:], "missing or malformed header line"),
        (lambda ls: ls[1:], "missing or malformed header line"),
    ],
    ids=["width", "depth", "truncated", "too-long", "non-hex", "short-word", "space", "bit-flip",
         "bad-header", "no-header"],
)
def test_damaged_mantissa_file_is_refused(copy, edit, message):
    qm, out = copy
    path = out / "embed_v_mant.hex"  # depth 4 (2 vectors of 64 in blocks of 32), width 256
    _edit_lines(path, edit)
    with pytest.raises(ImageError) as e:
        read_images(out, qm.cfg)
    assert str(e.value).startswith(f"memory image {path}")
    assert message in str(e.value)


def test_word_wider_than_memory_is_refused(tmp_path):
    cfg = CONFIGS[1]  # 6-bit weight exponents: 2 hex digits, at most 0x3f
    out = write_images(quantize(tiny_weights(), cfg), tmp_path / "img")
    path = out / "layer0_w_exp.hex"
    _edit_lines(path, lambda ls: ls[:1] + ["ff"] + ls[2:])
    with pytest.raises(ImageError) as e:
        read_images(out, cfg)
    assert str(e.value) == f"memory image {path}, line 2: word exceeds 6 bits"


def test_mantissa_outside_symmetric_range_is_refused(copy):
    qm, out = copy
    path = out / "embed_v_mant.hex"
    _edit_lines(path, lambda ls: ls[:1] + ["80" * 32] + ls[2:])  # 32 x -128 (qmax is 127)
    m = json.loads((out / MANIFEST).read_text())
    m["memories"]["embed_v_mant"]["sha256"] = images._sha256(path)
    (out / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ImageError) as e:
        read_images(out, qm.cfg)
    assert str(e.value) == f"tensor embed.ln_g in {out}: mantissa outside [-127, 127]"


def test_missing_files_are_refused(copy, tmp_path):
    qm, out = copy
    (out / "head_v_exp.hex").unlink()
    with pytest.raises(ImageError) as e:
        read_images(out, qm.cfg)
    assert str(e.value) == f"memory image head_v_exp: file {out / 'head_v_exp.hex'} does not exist"
    (out / MANIFEST).unlink()
    with pytest.raises(ImageError) as e:
        read_images(out, qm.cfg)
    assert str(e.value) == f"{out} holds no memory images: {out / MANIFEST} does not exist"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: "{not json", "cannot read"),
        (lambda m: json.dumps([1, 2]), "is not a bct-gen memory images manifest"),
        (lambda m: json.dumps({**m, "version": 99}), "has layout version 99; this loader reads version 1"),
        (lambda m: json.dumps({k: v for k, v in m.items() if k != "tensors"}), "lacks the field 'tensors'"),
        (lambda m: json.dumps({**m, "config": {**m["config"], "block_size": 16}}), "its config hashes to"),
        (lambda m: json.dumps({**m, "tensors": {k: v for k, v in m["tensors"].items() if k != "layer1.o_b"}}),
         "lacks the tensor layer1.o_b"),
        (lambda m: json.dumps({**m, "tensors": {**m["tensors"], "layer0.q_w": {**m["tensors"]["layer0.q_w"],
                                                                                "base": 10**6}}}),
         "tensor layer0.q_w: blocks 1000000..1000127 lie outside memory layer0_w_mant"),
    ],
    ids=["json", "format", "version", "field", "config", "tensor", "base"],
)
def test_damaged_manifest_is_refused(copy, edit, message):
    qm, out = copy
    m = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(edit(m))
    with pytest.raises(ImageError) as e:
        read_images(out, qm.cfg)
    assert message in str(e.value)


# ---------------------------------------------------------------------------------------------
# Atomic writes


def test_overwrite_replaces_an_image_directory_only(written, tmp_path):
    qm, _ = written
    out = write_images(qm, tmp_path / "img")
    qm2 = quantize(tiny_weights(seed=1), qm.cfg)
    write_images(qm2, out)
    assert_same_model(qm2, read_images(out, qm.cfg))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img"]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(ImageError) as e:
        write_images(qm, other)
    assert str(e.value) == f"{other} is not empty and holds no memory images; refusing to overwrite it"
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    with pytest.raises(ImageError) as e:
        write_images(qm, other / "notes.txt")
    assert str(e.value) == f"{other / 'notes.txt'} exists and is not a directory"


def test_failed_write_leaves_nothing_half_written(written, tmp_path, monkeypatch):
    qm, _ = written
    calls = []

    def failing(path, *args):
        calls.append(path)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(path, *args)

    real = images._write_hex
    monkeypatch.setattr(images, "_write_hex", failing)
    with pytest.raises(OSError, match="disk full"):
        write_images(qm, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    # Over an existing image set: the old one stays intact.
    monkeypatch.setattr(images, "_write_hex", real)
    out = write_images(qm, tmp_path / "old")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(images, "_write_hex", failing)
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        write_images(quantize(tiny_weights(seed=1), qm.cfg), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


# ---------------------------------------------------------------------------------------------
# The real checkpoint (slow tier: writes and reads 47 MB of hex)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("BCT_SLOW"), reason="slow tier: set BCT_SLOW=1")
def test_real_minilm_round_trip(tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bct.model.checkpoint import load_bert

    qm = quantize(load_bert(), Config())
    out = write_images(qm, tmp_path / "minilm")
    assert_same_model(qm, read_images(out, Config()))
    m = read_manifest(out)
    assert m["memories"]["embed_w_mant"]["depth"] == (30522 + 512 + 2) * 384 // 32


def test_content_digest_names_the_content():
    """Equal models have equal digests; one mantissa, one exponent or the config changes it."""
    from bct.model.blocks import BlockTensor
    cfg = Config()
    qm = quantize(tiny_weights(), cfg)
    d = images.content_digest(qm)
    assert d == images.content_digest(quantize(tiny_weights(), cfg)) and len(d) == 16
    assert d != images.content_digest(quantize(tiny_weights(), Config(acc_guard_bits=7)))
    lw = qm.encoder[1]
    for field in ("mant", "exp"):
        t = lw.ffn2_w
        mant, exp = t.mant.copy(), t.exp.copy()
        (mant if field == "mant" else exp)[3, 1] += 1
        other = dataclasses.replace(qm, encoder=(qm.encoder[0], dataclasses.replace(
            lw, ffn2_w=BlockTensor(mant, exp, t.fmt))))
        assert images.content_digest(other) != d, field


def test_hidden_order_round_trips_and_is_checked(tmp_path):
    """``hidden_perm``: the channel order is stored in the manifest (left out without it), read
    back, part of the content digest, and a manifest whose order is no permutation is refused."""
    cfg = Config(weight_equalize="hidden_perm")
    qm = quantize(tiny_weights(), cfg)
    assert qm.hidden_order is not None and sorted(qm.hidden_order) == list(range(64))
    assert qm.hidden_order != tuple(range(64))
    out = write_images(qm, tmp_path / "img")
    assert read_manifest(out)["model"]["hidden_order"] == list(qm.hidden_order)
    back = read_images(out, cfg)
    assert_same_model(qm, back)  # hidden_order included (a tuple again)
    unordered = dataclasses.replace(qm, hidden_order=None)
    assert images.content_digest(unordered) != images.content_digest(qm)
    plain = write_images(quantize(tiny_weights(), Config()), tmp_path / "plain")
    assert "hidden_order" not in read_manifest(plain)["model"]
    m = json.loads((out / MANIFEST).read_text())
    m["model"]["hidden_order"] = [0] * 64
    (out / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ImageError, match="hidden_order is not a permutation of the 64 hidden channels"):
        read_images(out, cfg)
