"""Tests of `bct.hw.layer` / `bct.hw.program` / `bct.sim.layer`: the encoder-layer accelerator.

* the program and memory map (pure Python), the memory images and their refusals (before any
  simulation);
* one full encoder layer of all-MiniLM-L6-v2 on a real sentence (18 tokens, padded to one block
  of 32) on Verilator, every stage compared exactly with `bct.model.integer.trace` and the MAC
  utilisation over the layer checked (>= 80 %), and the on-chip mean pooling (``pool`` op) of
  its output == the model's ``mean_pool``; the pool engine alone on the Amaranth simulator;
* BCT_SLOW=1: all six layers in one program (the on-chip pool is then the model's sentence
  embedding), layer 0 at the ~7.9x config (4-bit weights in blocks of 128: four K-blocks per
  weight word), and a tampered model trace that must be reported with the first mismatch.
"""

import json
import os

import numpy as np
import pytest

from bct.config import Config, ConfigError
from bct.hw.program import OPS, STAGES, ImageError, LayerShape, build_program, check_images
from bct.model.checkpoint import BertWeights, Encoding, LayerWeights
from bct.model.integer import quantize
from bct.sim.layer import compare_words, simulate, stage_words

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCE = "The quick brown fox jumps over the lazy dog near the quiet river bank today."
SLOW = pytest.mark.skipif(os.environ.get("BCT_SLOW") != "1", reason="BCT_SLOW=1 runs it")


def _tiny(seed=0, hidden=64, heads=2, ffn=128, layers=1):
    """A random BERT small enough for fast image tests (weights (in, out) as in checkpoints)."""
    rng = np.random.default_rng(seed)

    def layer():
        d = {n: rng.standard_normal(s) * 0.15 for n, s in (
            ("q_w", (hidden, hidden)), ("k_w", (hidden, hidden)), ("v_w", (hidden, hidden)),
            ("o_w", (hidden, hidden)), ("ffn1_w", (hidden, ffn)), ("ffn2_w", (ffn, hidden)))}
        for n, k in (("q_b", hidden), ("k_b", hidden), ("v_b", hidden), ("o_b", hidden),
                     ("ffn1_b", ffn), ("ffn2_b", hidden), ("attn_ln_b", hidden),
                     ("out_ln_b", hidden)):
            d[n] = rng.standard_normal(k) * 0.1
        d["attn_ln_g"] = 1 + 0.1 * rng.standard_normal(hidden)
        d["out_ln_g"] = 1 + 0.1 * rng.standard_normal(hidden)
        return LayerWeights(**d)
    return BertWeights(
        layers=layers, hidden=hidden, heads=heads, ffn=ffn, vocab=100, max_positions=64,
        type_vocab=2, layer_norm_eps=1e-12, word_emb=rng.standard_normal((100, hidden)),
        pos_emb=rng.standard_normal((64, hidden)) * 0.3,
        type_emb=rng.standard_normal((2, hidden)) * 0.1, emb_ln_g=np.ones(hidden),
        emb_ln_b=np.zeros(hidden), encoder=tuple(layer() for _ in range(layers)))


@pytest.fixture(scope="module")
def tiny():
    cfg = Config()
    qm = quantize(_tiny(), cfg)
    return qm, build_program(cfg, LayerShape(64, 2, 128, 32), qm)


@pytest.fixture(scope="module")
def minilm():
    from bct.model.checkpoint import load_bert, load_tokenizer
    try:
        w, tok = load_bert(), load_tokenizer()
    except Exception as e:  # pragma: no cover - the package is a test dependency
        pytest.skip(f"all-MiniLM-L6-v2 not available: {e}")
    enc = tok.encode([SENTENCE], max_len=32)
    return quantize(w, Config()), enc


# ------------------------------------------------------------------------------------------
# Program and memory map


def test_program_minilm_layout():
    cfg = Config()
    prog = build_program(cfg, LayerShape(384, 12, 1536, 32, layers=2))
    kinds = [o["kind"] for o in prog.ops]
    # per layer: 3 projections, 12 V re-blocks, 12 x (scores, softmax, context), out proj,
    # add, LN, FFN1, GELU, FFN2, add, LN; then the pooling of the last layer's out, end
    assert len(prog.ops) == 2 * (3 + 12 + 36 + 8) + 2 and kinds[-2:] == ["pool", "end"]
    assert set(kinds) == set(OPS)
    pool, emb = prog.ops[-2], prog.regions["embedding"]
    assert (pool["a_base"], pool["a_stride"], pool["nbk"], pool["rows"], pool["out_base"]) == (
        prog.regions["out1"].base, 12, 12, 1, emb.base)
    assert (emb.rows, emb.blocks) == (1, 12)
    assert prog.depth["wmem"] == 2 * 55296 and prog.depth["vmem"] == 2 * (9 * 12 + 48)
    for mem in ("amem", "wmem", "vmem"):  # regions tile each memory without overlap
        spans = sorted((r.base, r.base + r.words) for r in prog.regions.values() if r.memory == mem)
        assert spans[0][0] == 0 and spans[-1][1] == prog.depth[mem]
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    j = prog.to_json()
    assert j["config_hash"] == cfg.hash and json.loads(json.dumps(j)) == j
    assert prog.stage_region(1, "out").name == "out1" and prog.stage_region(0, "q").name == "q"


@pytest.mark.parametrize("shape, message", [
    (LayerShape(384, 12, 1536, 20), "sequence length 20 is not a multiple of the block size 32"),
    (LayerShape(400, 10, 1536, 32), "hidden size 400 is not a multiple of the block size 32"),
    (LayerShape(384, 12, 1536, 32, layers=0), "layers must be at least 1, not 0"),
])
def test_program_refuses_shapes(shape, message):
    with pytest.raises(ConfigError, match=message):
        build_program(Config(), shape)


@pytest.mark.parametrize("residual_bits", [None, 16])
def test_program_gelu_direct_layout(residual_bits):
    """``gelu_direct`` (alone and with the wide residual path): FFN1 and GELU are one ``mm``
    op flagged ``gd`` writing the ``gelu`` region from the accumulator (no ``ffn1`` region, no
    ``gelu`` row op, ``ffn1`` not among the stages the accelerator writes); every other op and
    region is the program's without the switch."""
    from bct.hw.program import layer_stages
    shape = LayerShape(384, 12, 1536, 32, layers=2)
    base_cfg = Config(residual_bits=residual_bits)
    cfg = Config(residual_bits=residual_bits, gelu_direct=True)
    prog, base = build_program(cfg, shape), build_program(base_cfg, shape)
    assert "ffn1" not in prog.regions and "ffn1" not in layer_stages(cfg)
    assert layer_stages(cfg) == tuple(s for s in layer_stages(base_cfg) if s != "ffn1")
    assert "gelu" not in [o["kind"] for o in prog.ops]
    ops = {o["note"]: o for o in prog.ops}
    for i in range(2):
        f = ops[f"layer{i}.ffn1_gelu"]
        assert f["gd"] == 1 and f["kind"] == "mm" and f["bias"] == 1
        assert (f["a_base"], f["out_base"], f["out_stride"], f["ncols"]) == (
            prog.regions["attn_ln"].base, prog.regions["gelu"].base, 48, 1536)
        assert ops[f"layer{i}.ffn2"]["a_base"] == prog.regions["gelu"].base
    assert sum(o["gd"] for o in prog.ops) == 2 and len(prog.ops) == len(base.ops) - 2
    spans = sorted((r.base, r.base + r.words) for r in prog.regions.values() if r.memory == "amem")
    assert spans[0][0] == 0 and spans[-1][1] == prog.depth["amem"]
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert prog.depth["amem"] == base.depth["amem"] - 32 * 48
    assert all("gd" not in o for o in base.ops)


def test_program_default_unchanged_by_the_wide_path():
    """The activation-only program, word widths and JSON are those from before the wide
    residual path (digests measured before it existed): no residual regions, no flag fields."""
    from bct.hw.program import word_widths
    prog = build_program(Config(), LayerShape(384, 12, 1536, 32, layers=6))
    assert prog.digest == "7c2dfbd20028aee3"
    assert build_program(Config(weight_block_size=64), LayerShape(64, 2, 128, 32, 2)).digest == (
        "561d8e1770e0cb48")
    assert word_widths(Config()) == {"amem": 264, "w_mant": 256, "w_exp": 8, "v_mant": 256,
                                     "v_exp": 8}
    j = prog.to_json()
    assert all("residual" not in r for r in j["regions"].values())
    assert all("a_res" not in o and "out2_base" not in o for o in j["ops"])


def test_program_wide_residual_layout():
    """``residual_bits``: the residual stream's regions are marked residual, an amem word holds
    a 16-bit block, and the residual adds / LayerNorms / pool read and write them as
    ``bct.model.integer.forward`` does (attention residual: the previous LayerNorm's residual
    copy; FFN residual: attn_ln_wide; pool: the last out_wide)."""
    from bct.hw.program import WIDE_STAGES, layer_stages, word_widths
    cfg = Config(residual_bits=16)
    prog = build_program(cfg, LayerShape(384, 12, 1536, 32, layers=2))
    R = prog.regions
    assert word_widths(cfg)["amem"] == 32 * 16 + 8
    assert layer_stages(cfg) == STAGES + WIDE_STAGES and layer_stages(Config()) == STAGES
    res = {n for n, r in R.items() if r.residual}
    assert res == {"x_wide", "attn_res", "attn_ln_wide", "ffn_res", "embedding", "out0_wide",
                   "out1_wide"}
    assert prog.region_format("ffn_res") == cfg.residual_format
    assert prog.region_format("out1") == cfg.act_format
    assert prog.stage_region(1, "out_wide").name == "out1_wide"
    spans = sorted((r.base, r.base + r.words) for r in R.values() if r.memory == "amem")
    assert spans[0][0] == 0 and spans[-1][1] == prog.depth["amem"]
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    ops = {o["note"]: o for o in prog.ops}
    for i, xr in ((0, "x_wide"), (1, "out0_wide")):
        add, ln = ops[f"layer{i}.attn_res"], ops[f"layer{i}.attn_ln"]
        assert (add["a_base"], add["b_base"], add["out_base"]) == (
            R["attn_out"].base, R[xr].base, R["attn_res"].base)
        assert (add["a_res"], add["b_res"], add["o_res"], add["dual"]) == (0, 1, 1, 0)
        assert (ln["a_base"], ln["a_res"], ln["dual"], ln["out_base"], ln["out2_base"]) == (
            R["attn_res"].base, 1, 1, R["attn_ln"].base, R["attn_ln_wide"].base)
        f, out = ops[f"layer{i}.ffn_res"], ops[f"layer{i}.out"]
        assert (f["a_base"], f["b_base"], f["b_res"], f["o_res"]) == (
            R["ffn2"].base, R["attn_ln_wide"].base, 1, 1)
        assert (out["out_base"], out["out2_base"], out["dual"]) == (
            R[f"out{i}"].base, R[f"out{i}_wide"].base, 1)
        assert ops[f"layer{i}.q"]["a_base"] == (R["x"] if i == 0 else R["out0"]).base
    pool = ops["embedding"]
    assert (pool["a_base"], pool["a_res"], pool["o_res"]) == (R["out1_wide"].base, 1, 1)
    j = prog.to_json()
    assert j["regions"]["ffn_res"]["residual"] and "residual" not in j["regions"]["q"]
    assert json.loads(json.dumps(j)) == j and j["config_hash"] == cfg.hash


def test_stage_words_layout(tiny):
    qm, prog = tiny
    ids = np.arange(1, 21)[None]
    from bct.model.integer import trace
    st = trace(qm, Encoding(ids, np.zeros_like(ids), np.ones_like(ids)))
    words = stage_words(prog, st["layer0.scores"], "heads")
    t = st["layer0.scores"]
    assert len(words) == prog.regions["scores"].words
    # head 1, row 3, block 0 is word (1 * 32 + 3) * 1 + 0
    from bct.sim.bits import unpack_block
    mant, exp = unpack_block(words[35], 8, 8, 32)
    assert mant == t.mant[0, 1, 3].tolist() and exp == t.exp[0, 1, 3, 0]


def test_compare_words_names_first_mismatch():
    from bct.sim.bits import pack_block
    a = [pack_block([1] * 32, 0, 8, 8), pack_block([2] * 32, -3, 8, 8)]
    b = [a[0], pack_block([2] * 5 + [7] + [2] * 26, -3, 8, 8)]
    assert compare_words("s", a, a, [5, 6], 8, 8, 32, 1) is None
    msg = compare_words("layer0.q", a, b, [5, 6], 8, 8, 32, 1)
    assert msg == ("layer0.q: first mismatch at word 1 (row 1, block 0), element 5 (lane 5): "
                   "rtl 7, model 2; written at cycle 6")
    c = [a[0], pack_block([2] * 32, -2, 8, 8)]
    assert "exponent: rtl -2, model -3" in compare_words("x", a, c, None, 8, 8, 32, 1)


# ------------------------------------------------------------------------------------------
# Memory images: written, read back, refused when they do not match


def _rom_words(roms, name):
    """The words of one ROM as the Verilog loads them (every layer's file at its offset)."""
    words = []
    for path, first, n in roms[name]:
        assert first == len(words)
        body = [int(x, 16) for x in open(path).read().splitlines() if not x.startswith("//")]
        assert len(body) == n
        words += body
    return words


@pytest.mark.parametrize("wbs, layers", [(None, 1), (64, 2)])
def test_images_feed_the_roms(tmp_path, wbs, layers):
    """The `bct quantize` images, loaded into the ROMs as `rom_verilog` does, hold every weight
    K-block (and vector block) where the program addresses it: K-block `a` of the weights is
    K-block `a % ratio` of word `a // ratio`."""
    from bct.hw.layer import rom_verilog
    from bct.hw.program import weight_ratio, word_widths
    from bct.model.images import write_images
    from bct.sim.bits import unpack_signed
    cfg = Config(weight_block_size=wbs)
    qm = quantize(_tiny(layers=layers), cfg)
    prog = build_program(cfg, LayerShape(64, 2, 128, 32, layers), qm)
    roms = check_images(write_images(qm, tmp_path / "img"), prog)
    r, B, wf, vf = weight_ratio(cfg), cfg.block_size, cfg.weight_format, cfg.vector_format
    assert r == (wbs or 32) // 32
    words = {name: _rom_words(roms, name) for name in roms}
    assert len(words["w_mant"]) * r == prog.depth["wmem"] and len(words["v_exp"]) == prog.depth["vmem"]
    for i in range(layers):
        for name in ("q_w", "ffn1_w", "ffn2_w"):
            reg = prog.regions[f"layer{i}.{name}"]
            t = getattr(qm.encoder[i], name)  # (out, in), one exponent per weight block
            for n, j in ((0, 0), (reg.rows - 1, reg.blocks - 1), (reg.rows // 2, 1)):
                a = reg.base + n * reg.blocks + j
                word = words["w_mant"][a // r] >> ((a % r) * B * wf.bits)
                assert unpack_signed(word, wf.bits, B) == t.mant[n, j * B:(j + 1) * B].tolist()
                assert unpack_signed(words["w_exp"][a // r], wf.exp_bits, 1) == [t.exp[n, j * B // wf.block]]
        t, reg = qm.encoder[i].ffn1_b, prog.regions[f"layer{i}.ffn1_b"]
        for j in range(reg.blocks):
            assert unpack_signed(words["v_mant"][reg.base + j], vf.bits, B) == t.mant[j * B:(j + 1) * B].tolist()
            assert unpack_signed(words["v_exp"][reg.base + j], vf.exp_bits, 1) == [t.exp[j]]
    text = rom_verilog(roms, word_widths(cfg))
    path, first, n = roms["w_mant"][-1]
    assert f'$readmemh("{path}", mem, {first}, {first + n - 1});' in text
    assert f"reg [{32 * r * 8 - 1}:0] mem [0:{prog.depth['wmem'] // r - 1}];" in text


def test_images_refused(tiny, tmp_path):
    from bct.model.images import write_images
    qm, prog = tiny
    d = write_images(qm, tmp_path / "img")
    # one flipped digit: the digest differs
    path = d / "layer0_v_mant.hex"
    good = path.read_text()
    lines = good.splitlines()
    lines[3] = ("1" if lines[3][0] != "1" else "2") + lines[3][1:]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ImageError, match=r"layer0_v_mant.hex: content differs from the manifest"):
        check_images(d, prog)
    path.write_text(good)
    check_images(d, prog)
    # a truncated exponent file
    e = d / "layer0_w_exp.hex"
    keep = e.read_text()
    e.write_text("\n".join(keep.splitlines()[:-1]) + "\n")
    with pytest.raises(ImageError, match="layer0_w_exp.hex: truncated"):
        check_images(d, prog)
    e.write_text(keep)
    # another config's manifest
    man = d / "manifest.json"
    m = json.loads(man.read_text())
    man.write_text(json.dumps({**m, "config_hash": "0123456789abcdef"}))
    with pytest.raises(ConfigError, match="was made for config 0123456789abcdef"):
        check_images(d, prog)
    man.write_text(json.dumps(m))
    # a program for two layers, images of one
    with pytest.raises(ImageError, match="have no memory layer1_w_mant"):
        check_images(d, build_program(qm.cfg, LayerShape(64, 2, 128, 32, 2)))
    with pytest.raises(ConfigError, match="the program runs 2 layers, the model has 1"):
        build_program(qm.cfg, LayerShape(64, 2, 128, 32, 2), qm)
    # a program for another model shape
    with pytest.raises(ImageError, match="the accelerator's w_mant ROM takes"):
        check_images(d, build_program(qm.cfg, LayerShape(64, 2, 256, 32), None))
    # tensors placed differently (a manifest with two tensors swapped)
    t = m["tensors"]
    t["layer0.q_w"]["base"], t["layer0.k_w"]["base"] = t["layer0.k_w"]["base"], t["layer0.q_w"]["base"]
    man.write_text(json.dumps(m))
    with pytest.raises(ImageError, match="place layer0.q_w at blocks 128..255 of layer0_w"):
        check_images(d, prog)
    with pytest.raises(ImageError, match="holds no memory images"):
        check_images(tmp_path / "missing", prog)


def test_prepare_checks_mask_and_embedding(tiny, tmp_path):
    """The accelerator masks by seq_len: a mask with a hole is refused; with every layer on
    chip the expected pool is the trace's own sentence embedding (a tampered one is refused)."""
    from bct.model.blocks import BlockTensor
    from bct.model.integer import trace
    from bct.sim import layer as sim_layer
    qm, _ = tiny
    ids = np.arange(1, 21)[None]
    enc = Encoding(ids, np.zeros_like(ids), np.ones_like(ids))
    st = dict(trace(qm, enc))
    p = sim_layer.prepare(qm, enc, work_dir=tmp_path / "w", image_root=tmp_path / "img", trace=st)
    data = json.loads((tmp_path / "w" / "data.json").read_text())
    emb = p["prog"].regions["embedding"]
    assert data["expected"]["embedding"] == {
        "base": emb.base, "words": stage_words(p["prog"], st["embedding"], "rows")}
    assert data["blocks_per_row"]["embedding"] == emb.blocks == 2
    t = st["embedding"]
    st["embedding"] = BlockTensor(t.mant, t.exp + 1, t.fmt)
    with pytest.raises(ValueError, match="the trace's embedding is not mean_pool"):
        sim_layer.prepare(qm, enc, work_dir=tmp_path / "w", image_root=tmp_path / "img", trace=st)
    holed = np.ones_like(ids)
    holed[0, 5] = 0
    with pytest.raises(ValueError, match="attention mask of leading valid tokens"):
        sim_layer.prepare(qm, Encoding(ids, np.zeros_like(ids), holed), work_dir=tmp_path / "w",
                          image_root=tmp_path / "img")


def test_simulation_refuses_bad_images(tiny, tmp_path, monkeypatch):
    """A corrupted image in the image cache stops `simulate` before any build."""
    qm, _ = tiny
    ids = np.arange(1, 21)[None]
    enc = Encoding(ids, np.zeros_like(ids), np.ones_like(ids))
    from bct.sim import layer as sim_layer
    p = sim_layer.prepare(qm, enc, work_dir=tmp_path / "w", image_root=tmp_path / "images")
    img = next((tmp_path / "images").iterdir()) / "layer0_w_mant.hex"
    img.write_text(img.read_text().replace("0", "1", 5))
    built = []
    monkeypatch.setattr("bct.sim.runner.build_verilog", lambda *a, **k: built.append(a))
    with pytest.raises(ImageError, match="layer0_w_mant"):
        simulate(qm, enc, work_dir=tmp_path / "w", base_dir=tmp_path)
    assert not built and p["prog"].depth["amem"] > 0


# ------------------------------------------------------------------------------------------
# The pool engine alone (Amaranth simulator): LayerAccelerator._pool and the blockifier


def _run_pool(seq_len, seed, H=64, T=32, cfg=None):
    """Run the ``pool`` op of a one-layer program on random blocks (varied exponents, one
    all-zero block) held in ``out0`` (on the wide residual path: residual-format blocks in
    ``out0_wide``); returns the blocks written, their addresses, the cycles from the op's
    start to the last block, and the model's ``mean_pool``."""
    from amaranth import Module, Signal, signed, unsigned
    from amaranth.lib import data
    from amaranth.lib.memory import Memory
    from amaranth.sim import Simulator

    from bct.hw.blockify import Blockifier
    from bct.hw.layer import LayerAccelerator, _exp_width
    from bct.hw.program import pack_word
    from bct.model.blocks import encode
    from bct.model.integer import mean_pool
    from bct.sim.bits import unpack_block

    cfg = cfg or Config()
    wide_path = cfg.residual_bits is not None
    B, af = cfg.block_size, cfg.act_format
    xf = cfg.residual_format  # == af unless wide_path
    prog = build_program(cfg, LayerShape(H, 2, 128, T))
    acc = LayerAccelerator(prog, {})
    acc._MustUse__silence = True  # only its _pool engine is elaborated here
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, T, H)) * 2.0 ** rng.integers(-5, 5, (1, T, H // B)).repeat(B, -1)
    x[0, 3, :B] = 0
    xt = encode(x, xf)
    want = mean_pool(xt, (np.arange(T) < seq_len)[None], cfg)
    src, words = prog.regions["out0_wide" if wide_path else "out0"], [0] * prog.depth["amem"]
    for t in range(T):
        for j in range(H // B):
            words[src.base + t * src.blocks + j] = pack_word(
                xt.blocks[0, t, j].tolist(), int(xt.exp[0, t, j]), xf.bits, xf.exp_bits)
    m = Module()
    m.submodules.amem = amem = Memory(shape=unsigned(acc.widths["amem"]), depth=len(words),
                                      init=words)
    ra = amem.read_port()
    wa = Signal(data.StructLayout({"mant": data.ArrayLayout(signed(af.bits), B),
                                   "exp": signed(af.exp_bits)}))
    op = Signal(acc.op_layout)
    pool = next(o for o in prog.ops if o["kind"] == "pool")
    m.d.comb += [wa.eq(ra.data), op.eq(acc.op_layout.const(
        {k: (OPS[v] if k == "kind" else v) for k, v in pool.items() if k in acc.op_layout.members}))]
    wide = max(cfg.acc_bits, cfg.add_bits, cfg.ln_out_bits, cfg.softmax_out_frac + 2)
    m.submodules.blk = blk = Blockifier(cfg, wide, _exp_width(cfg), af,
                                        wide=xf if wide_path else None)
    bk_wide = Signal() if wide_path else None
    if wide_path:
        m.d.comb += blk.i.payload.wide.eq(bk_wide)
    start, active, sl = Signal(), Signal(), Signal(range(T + 1))
    bk_valid, bk_value = Signal(), Signal(data.ArrayLayout(signed(wide), B))
    bk_scale, bk_addr, bk_ready = Signal(signed(_exp_width(cfg))), Signal(acc.abits), Signal()
    m.d.comb += [bk_ready.eq(blk.i.ready), blk.i.valid.eq(bk_valid), blk.o.ready.eq(1),
                 blk.i.payload.value.eq(bk_value), blk.i.payload.scale.eq(bk_scale)]
    acc._pool(m, op, start, active, ra, wa, bk_valid, bk_value, bk_scale, bk_addr, bk_ready, sl,
              bk_wide)
    out, addrs, cycles = [], [], []

    async def bench(ctx):
        ctx.set(sl, seq_len)
        ctx.set(start, 1)
        await ctx.tick()
        ctx.set(start, 0)
        ctx.set(active, 1)
        for c in range(5000):
            if ctx.get(bk_valid) and ctx.get(bk_ready):
                addrs.append(ctx.get(bk_addr))
            if ctx.get(blk.o.valid):
                out.append(unpack_block(ctx.get(blk.o.payload.as_value()), xf.bits,
                                        xf.exp_bits, B))
                if len(out) == H // B:
                    cycles.append(c + 1)
                    return
            await ctx.tick()

    sim = Simulator(m)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return out, addrs, cycles, want, prog


@pytest.mark.parametrize("seq_len, seed", [(20, 0), (32, 1), (1, 2), (0, 3)])
def test_pool_engine_matches_mean_pool(seq_len, seed):
    """The pool op (exponent scan, aligned sum, B dividers with RHAZ, blockifier) writes
    exactly `mean_pool` of the valid tokens (none valid: zeros) to the embedding region."""
    out, addrs, cycles, want, prog = _run_pool(seq_len, seed)
    base = prog.regions["embedding"].base
    assert addrs == [base, base + 1]
    assert [(list(mm), e) for mm, e in out] == [
        (want.blocks[0, j].tolist(), int(want.exp[0, j])) for j in range(2)]
    assert cycles and cycles[0] < 2 * (max(seq_len, 1) * 3 + 30)


@pytest.mark.parametrize("seq_len, seed", [(20, 4), (1, 5), (0, 6)])
def test_pool_engine_wide_residual(seq_len, seed):
    """On the wide residual path the pool reads residual-format (16-bit) blocks of
    ``out0_wide`` and writes ``mean_pool`` in the residual format."""
    cfg = Config(residual_bits=16)
    out, addrs, cycles, want, prog = _run_pool(seq_len, seed, cfg=cfg)
    assert want.fmt == cfg.residual_format
    assert seq_len == 0 or np.abs(want.mant).max() > 127  # beyond the activation format
    base = prog.regions["embedding"].base
    assert addrs == [base, base + 1]
    assert [(list(mm), e) for mm, e in out] == [
        (want.blocks[0, j].tolist(), int(want.exp[0, j])) for j in range(2)]


# ------------------------------------------------------------------------------------------
# Co-simulation


def test_one_layer_real_sentence(minilm, tmp_path):
    """Layer 0 of all-MiniLM-L6-v2 on a real 18-token sentence: every stage == the model."""
    qm, enc = minilm
    assert enc.attention_mask.sum() >= 16
    r = simulate(qm, enc, layers=1, work_dir=tmp_path)
    assert r["bit_exact"] and not r["mismatches"], r["mismatches"]
    assert set(r["stages"]) == {f"layer0.{s}" for s in STAGES} | {"layer0.vt", "embedding"}
    assert all(r["stages"].values())
    # the pool op (the last before end) costs well under 0.2 % of the layer
    pool = next(o["start_cycle"] for o in r["ops"] if o["op"] == "embedding")
    assert 0 < r["cycles"] - pool < 0.002 * r["cycles"], (pool, r["cycles"])
    # every MAC of the layer: 32 x (4 * 384 * 384 + 2 * 384 * 1536 + 2 * 12 * 32 * 32) / 64 PEs
    assert r["mac_beats"] == 32 * (4 * 384 * 384 + 2 * 384 * 1536 + 24 * 32 * 32) // 64
    assert r["utilisation"] >= 0.8, r["utilisation"]
    assert [o["op"] for o in r["ops"]][:3] == ["layer0.q", "layer0.k", "layer0.v"]


#: The wide residual path on a small accelerator: residual blocks of 16 bits, blocks of 8, a
#: 4 x 4 array (the block-8 config that lifts the sentence-embedding cosine, at a tiny size).
WIDE = Config(block_size=8, residual_bits=16, array_rows=4, array_cols=4)


@pytest.mark.parametrize("cfg", [
    pytest.param(WIDE, id="r16"),
    # residual_guard_bits 4: residual blocks at the top of a row are shifted left
    pytest.param(Config(block_size=8, residual_bits=12, array_rows=4, array_cols=4), id="r12",
                 marks=[pytest.mark.slow, SLOW]),
])
def test_two_layers_wide_residual_path(cfg, tmp_path):
    """Two layers of a tiny random BERT with ``residual_bits=16`` (blocks of 8, 4 x 4 array),
    12 valid tokens of 16: every stage == the model's trace, each in its own format: the
    residual sums (``attn_res``, ``ffn_res``) and the LayerNorms' residual copies
    (``attn_ln_wide``, each layer's ``out_wide``; layer 1's residual adds read layer 0's) in
    16-bit blocks, the activation copies in 8-bit blocks, the pool (of ``out_wide``) == the
    model's sentence embedding. BCT_SLOW=1: the same with ``residual_bits=12``."""
    from bct.hw.program import WIDE_STAGES, word_widths
    from bct.model.integer import trace
    R = cfg.residual_bits
    qm = quantize(_tiny(hidden=32, heads=2, ffn=64, layers=2), cfg)
    ids = np.arange(1, 13)[None]
    enc = Encoding(ids, np.zeros_like(ids), np.ones_like(ids))
    st = trace(qm, enc)
    assert st["layer1.out_wide"].fmt == cfg.residual_format and word_widths(cfg)["amem"] == 8 * R + 8
    r = simulate(qm, enc, layers=2, work_dir=tmp_path / "w", trace=st)
    assert r["bit_exact"] and not r["mismatches"], r["mismatches"]
    assert set(r["stages"]) == ({f"layer1.{s}" for s in STAGES + WIDE_STAGES}
                                | {"layer0.out", "layer0.out_wide", "layer1.vt", "embedding"})
    assert all(r["stages"].values())
    data = json.loads((tmp_path / "w" / "data.json").read_text())
    assert data["fmts"]["layer1.ffn_res"] == data["fmts"]["embedding"] == [R, 8, 8]
    assert data["fmts"]["layer1.out"] == data["fmts"]["layer1.q"] == [8, 8, 8]
    # every MAC of the two layers on the 16 PEs: 16 x (4 * 32 * 32 + 2 * 32 * 64 + 2 * 2 * 16 * 16)
    assert r["mac_beats"] == 2 * 16 * (4 * 32 * 32 + 2 * 32 * 64 + 4 * 16 * 16) // 16


@pytest.mark.parametrize("cfg", [
    pytest.param(Config(block_size=8, array_rows=4, array_cols=4, gelu_direct=True), id="gd"),
    pytest.param(Config(block_size=8, residual_bits=16, array_rows=4, array_cols=4,
                        gelu_direct=True), id="gd-r16"),
])
def test_two_layers_gelu_direct(cfg, tmp_path):
    """``gelu_direct``: two layers of a tiny random BERT (blocks of 8, 4 x 4 array), 12 valid
    tokens of 16; FFN1's accumulator rows go through the GELU unit (``gelu_acc``): every stage
    the accelerator writes (all of the trace's but ``ffn1``, which the model traces only), each
    layer's output and the pool == the trace; the trace's ``gelu`` is not GELU of its ``ffn1``
    blocks (so the direct path is what is checked)."""
    from bct.hw.program import layer_stages
    from bct.model.integer import trace
    from bct.model.nonlinear import gelu
    qm = quantize(_tiny(hidden=32, heads=2, ffn=64, layers=2), cfg)
    ids = np.arange(1, 13)[None]
    enc = Encoding(ids, np.zeros_like(ids), np.ones_like(ids))
    st = trace(qm, enc)
    assert (gelu(st["layer1.ffn1"], cfg).mant != st["layer1.gelu"].mant).any()
    r = simulate(qm, enc, layers=2, work_dir=tmp_path / "w", trace=st)
    assert r["bit_exact"] and not r["mismatches"], r["mismatches"]
    outs = ("out", "out_wide") if cfg.residual_bits else ("out",)
    assert set(r["stages"]) == ({f"layer1.{s}" for s in layer_stages(cfg)} | {
        f"layer0.{s}" for s in outs} | {"layer1.vt", "embedding"})
    assert "layer1.gelu" in r["stages"] and "layer1.ffn1" not in r["stages"]
    assert all(r["stages"].values())
    assert r["mac_beats"] == 2 * 16 * (4 * 32 * 32 + 2 * 32 * 64 + 4 * 16 * 16) // 16


@pytest.mark.slow
@SLOW
def test_six_layers_real_sentence(minilm, tmp_path):
    """All six layers in one program; each layer's output and every stage of the last layer
    == the model; the on-chip pool (``embedding``) == the model's sentence embedding (the
    trace's ``embedding`` stage, which `prepare` checks is the expected pool)."""
    from bct.model.integer import trace
    from bct.sim.layer import pooled
    qm, enc = minilm
    st = trace(qm, enc)
    r = simulate(qm, enc, layers=6, work_dir=tmp_path, trace=st)
    assert r["bit_exact"] and all(r["stages"].values()), r["mismatches"]
    assert {f"layer{i}.out" for i in range(6)} | {"embedding"} <= set(r["stages"])
    e = pooled(build_program(qm.cfg, LayerShape(384, 12, 1536, 32, 6)), st, 5,
               int(enc.attention_mask.sum()))
    assert (e.mant == st["embedding"].mant).all() and (e.exp == st["embedding"].exp).all()
    assert r["utilisation"] >= 0.8


@pytest.mark.slow
@SLOW
def test_one_layer_w4_weight_words(tmp_path):
    """Layer 0 of all-MiniLM-L6-v2 at the ~7.9x config (4-bit weights in blocks of 128, 6-bit
    exponents): a weight word holds four K-blocks, selected a cycle after the ROM read; every
    stage and the pool == the model."""
    from bct.hw.program import weight_ratio
    from bct.model.checkpoint import load_bert, load_tokenizer
    cfg = Config(weight_bits=4, weight_block_size=128, weight_exp_bits=6)
    assert weight_ratio(cfg) == 4
    try:
        w, tok = load_bert(), load_tokenizer()
    except Exception as e:  # pragma: no cover - the package is a test dependency
        pytest.skip(f"all-MiniLM-L6-v2 not available: {e}")
    qm, enc = quantize(w, cfg), tok.encode([SENTENCE], max_len=32)
    r = simulate(qm, enc, layers=1, work_dir=tmp_path)
    assert r["bit_exact"] and not r["mismatches"], r["mismatches"]
    assert set(r["stages"]) == {f"layer0.{s}" for s in STAGES} | {"layer0.vt", "embedding"}
    assert r["mac_beats"] == 32 * (4 * 384 * 384 + 2 * 384 * 1536 + 24 * 32 * 32) // 64


def _minilm_at(cfg):
    from bct.model.checkpoint import load_bert, load_tokenizer
    try:
        w, tok = load_bert(), load_tokenizer()
    except Exception as e:  # pragma: no cover - the package is a test dependency
        pytest.skip(f"all-MiniLM-L6-v2 not available: {e}")
    return quantize(w, cfg), tok.encode([SENTENCE], max_len=32)


@pytest.mark.slow
@SLOW
def test_one_layer_wide_residual_minilm(tmp_path):
    """Layer 0 of all-MiniLM-L6-v2 with ``residual_bits=16`` (the config that closes the MRPC
    target): every stage incl. the 16-bit residual sums and LayerNorm copies, and the pool of
    ``out_wide``, == the model; the same array beats as the default config."""
    from bct.hw.program import WIDE_STAGES
    qm, enc = _minilm_at(Config(residual_bits=16))
    r = simulate(qm, enc, layers=1, work_dir=tmp_path)
    assert r["bit_exact"] and not r["mismatches"], r["mismatches"]
    assert set(r["stages"]) == ({f"layer0.{s}" for s in STAGES + WIDE_STAGES}
                                | {"layer0.vt", "embedding"})
    assert r["mac_beats"] == 32 * (4 * 384 * 384 + 2 * 384 * 1536 + 24 * 32 * 32) // 64


@pytest.mark.slow
@SLOW
def test_six_layers_wide_residual_block8(tmp_path):
    """All six layers of all-MiniLM-L6-v2 at the block-8 wide config of docs/arithmetic.md
    section 10 (``block_size=8 weight_block_size=8 vector_bits=16 ln_out_frac=12
    gelu_frac=12 residual_bits=16``): each layer's output and residual copy, every stage of
    the last layer and the on-chip pool == the model's sentence embedding."""
    from bct.model.integer import trace
    cfg = Config(block_size=8, weight_block_size=8, vector_bits=16, ln_out_frac=12,
                 gelu_frac=12, residual_bits=16)
    qm, enc = _minilm_at(cfg)
    st = trace(qm, enc)
    r = simulate(qm, enc, layers=6, work_dir=tmp_path, trace=st)
    assert r["bit_exact"] and all(r["stages"].values()), r["mismatches"]
    assert {f"layer{i}.{s}" for i in range(6) for s in ("out", "out_wide")} | {
        "embedding"} <= set(r["stages"])


@pytest.mark.slow
@SLOW
def test_six_layers_gelu_direct_block8(tmp_path):
    """All six layers of all-MiniLM-L6-v2 at the block-8 wide config with ``gelu_direct``
    (docs/arithmetic.md section 10, embedding cosine 0.99956): every stage the accelerator
    writes, each layer's output and residual copy and the on-chip pool == the model."""
    from bct.hw.program import layer_stages
    from bct.model.integer import trace
    cfg = Config(block_size=8, weight_block_size=8, vector_bits=16, ln_out_frac=12,
                 gelu_frac=12, residual_bits=16, gelu_direct=True)
    qm, enc = _minilm_at(cfg)
    st = trace(qm, enc)
    r = simulate(qm, enc, layers=6, work_dir=tmp_path, trace=st)
    assert r["bit_exact"] and all(r["stages"].values()), r["mismatches"]
    assert {f"layer{i}.{s}" for i in range(6) for s in ("out", "out_wide")} | {
        f"layer5.{s}" for s in layer_stages(cfg)} | {"embedding"} <= set(r["stages"])
    assert "layer5.ffn1" not in r["stages"]


@pytest.mark.slow
@SLOW
@pytest.mark.parametrize("preset", ["w8-wide", "w8-wide-b8"])
def test_six_layers_preset(preset, tmp_path):
    """All six layers of all-MiniLM-L6-v2 at a preset of ``bct.config.PRESETS`` (wide residual
    path, ``gelu_direct``, hidden channels permuted by ``hidden_perm``): every stage the
    accelerator writes, each layer's output and the on-chip pool == the model; the pool, put back
    in the checkpoint's channel order with the images' ``hidden_order``, is the model's
    sentence embedding."""
    from bct.config import PRESETS
    from bct.hw.program import layer_stages
    from bct.model.integer import forward, trace
    cfg = Config(**PRESETS[preset])
    qm, enc = _minilm_at(cfg)
    assert qm.hidden_order is not None
    st = trace(qm, enc)
    r = simulate(qm, enc, layers=6, work_dir=tmp_path, trace=st)
    assert r["bit_exact"] and all(r["stages"].values()), r["mismatches"]
    assert {f"layer{i}.{s}" for i in range(6) for s in ("out", "out_wide")} | {
        f"layer5.{s}" for s in layer_stages(cfg)} | {"embedding"} <= set(r["stages"])
    pool = st["embedding"].decode()[0]  # == the accelerator's pool (compared above)
    emb = np.empty_like(pool)
    emb[list(qm.hidden_order)] = pool
    assert np.array_equal(emb, forward(qm, enc).embedding[0])


@pytest.mark.slow
@SLOW
def test_tampered_trace_is_reported(minilm, tmp_path):
    """A model trace with one changed element: the run fails naming the word, lane, both
    values and the write cycle."""
    from bct.model.blocks import BlockTensor
    from bct.model.integer import trace
    from bct.sim import SimulationFailure
    qm, enc = minilm
    st = dict(trace(qm, enc))
    t = st["layer0.ffn1"]
    mant = t.mant.copy()
    mant[0, 2, 40] = mant[0, 2, 40] + (1 if mant[0, 2, 40] < 0 else -1)
    st["layer0.ffn1"] = BlockTensor(mant, t.exp, t.fmt)
    with pytest.raises(SimulationFailure, match=r"layer0.ffn1: first mismatch at word 97 "
                                                r"\(row 2, block 1\), element 40 \(lane 8\)"):
        simulate(qm, enc, layers=1, work_dir=tmp_path, trace=st)
