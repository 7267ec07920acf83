"""The encoder layer's program, memory map and memory images, generated from the one config.

:func:`build_program` lays out the accelerator's three memories for a :class:`LayerShape`
(``amem``: activation scratchpad, one word = one activation block with its exponent;
``wmem``: weight matrices, addressed in K-blocks of ``block_size`` weights; ``vmem``: biases and
LayerNorm gamma / beta, one vector block per address) and writes the op sequence the
controller of :class:`bct.hw.layer.LayerAccelerator` executes: per layer the Q / K / V
projections, per head the transposing re-block of V, the scores, the softmax and the context,
then the output projection, residual, LayerNorm, FFN1, GELU, FFN2, residual, LayerNorm; after
the last layer the sentence embedding (``pool``: masked mean over the valid tokens, one row of
``hidden / block_size`` blocks in the ``embedding`` region).

The wide residual path (``cfg.residual_bits``, ``bct.model.integer``): the residual stream is
kept in ``cfg.residual_format`` in regions marked :attr:`Region.residual` (``attn_res``,
``ffn_res``, ``embedding`` and the residual copies of the LayerNorm outputs, ``x_wide``,
``attn_ln_wide``, ``out{i}_wide``); an ``amem`` word is then wide enough for a residual block
(an activation block sits in its low bits) and the ops carry per-op format flags (``a_res`` /
``b_res``: operand A / B is in the residual format, ``o_res``: the output is, ``dual``: a
LayerNorm also writes its residual copy from ``out2_base``). Without it, regions, ops and
widths are exactly those of the activation-only accelerator.

``cfg.gelu_direct`` (``bct.model.nonlinear.gelu_acc``): FFN1 and GELU are one ``mm`` op flagged
``gd`` whose accumulator rows go through the GELU unit into the ``gelu`` region; there is no
``ffn1`` region and no ``gelu`` row op. Without it, ops carry no ``gd`` field.

Everything that depends only on the weights (the largest weight and bias exponent of each
matrix) is folded into the program; everything that depends on the activations (row scales,
the largest exponent of K and of the re-blocked V, masks from the sequence length) is computed
on chip.

The weight and vector memories are not a format of their own: they are the ``layer{i}_w`` and
``layer{i}_v`` memories of the ``bct quantize`` images (:mod:`bct.model.images`,
``docs/images.md``), mantissas and exponents in parallel ROMs, layer after layer.
:func:`check_images` checks an image directory against the program (config hash, every file's
header, size and SHA-256, every tensor's placement) before any simulation starts.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bct.config import Config, ConfigError
from bct.model.images import ImageError
from bct.model.matmul import act_blocks

__all__ = [
    "LayerShape", "Region", "Program", "ImageError", "OPS", "ROMS", "WIDE_STAGES",
    "build_program", "check_images", "layer_stages", "pack_word",
    "weight_ratio", "word_widths",
]

#: Op codes of the controller (``kind`` field).
OPS = {"end": 0, "mm": 1, "transpose": 2, "softmax": 3, "add": 4, "ln": 5, "gelu": 6,
       "pool": 7}

#: Every layer stage the accelerator writes, in trace order (``layer{i}.<stage>``).
STAGES = ("q", "k", "v", "scores", "probs", "context", "attn_out", "attn_res", "attn_ln",
          "ffn1", "gelu", "ffn2", "ffn_res", "out")

#: The residual copies of the LayerNorm outputs the wide residual path adds (``residual_bits``).
WIDE_STAGES = ("attn_ln_wide", "out_wide")

#: Per-op format flags of the wide residual path (only in its programs).
_WIDE_FIELDS = ("a_res", "b_res", "o_res", "dual", "out2_base")

_MATRICES = ("q_w", "k_w", "v_w", "o_w", "ffn1_w", "ffn2_w")
_VECTORS = ("q_b", "k_b", "v_b", "o_b", "attn_ln_g", "attn_ln_b", "ffn1_b", "ffn2_b",
            "out_ln_g", "out_ln_b")


@dataclass(frozen=True)
class LayerShape:
    """The model dimensions the accelerator is generated for.

    Parameters
    ----------
    hidden, heads, ffn : int
        Hidden width, attention heads, FFN width of the BERT.
    seq : int
        Tokens per sequence (padded); a multiple of ``block_size`` (one block: 32 at default).
    layers : int
        Encoder layers held in the weight memories and run by one program.
    """

    hidden: int
    heads: int
    ffn: int
    seq: int
    layers: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def check(self, cfg: Config) -> None:
        """Raise :class:`ConfigError` unless every dimension fits ``cfg``."""
        B, R, C = cfg.block_size, cfg.array_rows, cfg.array_cols
        for what, n in (("hidden size", self.hidden), ("FFN width", self.ffn),
                        ("head width", self.head_dim), ("sequence length", self.seq)):
            if n <= 0 or n % B:
                raise ConfigError(f"{what} {n} is not a multiple of the block size {B}")
        if self.hidden % self.heads:
            raise ConfigError(f"hidden size {self.hidden} is not a multiple of {self.heads} heads")
        if B % C:
            raise ConfigError(f"block_size {B} is not a multiple of array_cols {C}")
        if self.seq % R or self.head_dim % C:
            raise ConfigError(
                f"sequence length {self.seq} and head width {self.head_dim} must be multiples "
                f"of array_rows {R} / array_cols {C}")
        if self.layers < 1:
            raise ConfigError(f"layers must be at least 1, not {self.layers}")
        for n in (self.hidden, self.ffn, self.seq):
            cfg.check_reduction(n)


def layer_stages(cfg: Config) -> tuple:
    """The layer stages the accelerator writes for ``cfg``: :data:`STAGES`, plus
    :data:`WIDE_STAGES` on the wide residual path; with ``gelu_direct`` without ``ffn1`` (the
    FFN1 op hands its accumulator rows straight to the GELU unit; the model traces ``ffn1``
    only, no later stage reads it)."""
    stages = STAGES + (WIDE_STAGES if cfg.residual_bits is not None else ())
    return tuple(s for s in stages if not (cfg.gelu_direct and s == "ffn1"))


@dataclass(frozen=True)
class Region:
    """A tensor in a memory: ``rows`` rows of ``blocks`` words, word ``(r, j)`` at
    ``base + r * blocks + j``; ``residual``: its blocks are in ``cfg.residual_format`` (the wide
    residual path), else in the activation format (``amem``) or the image's."""

    name: str
    memory: str
    base: int
    rows: int
    blocks: int
    residual: bool = False

    @property
    def words(self) -> int:
        return self.rows * self.blocks


@dataclass
class Program:
    """Memory map and op sequence of one accelerator build (see :func:`build_program`)."""

    cfg: Config
    shape: LayerShape
    regions: dict = field(default_factory=dict)
    depth: dict = field(default_factory=dict)
    ops: list = field(default_factory=list)
    weights_digest: str = ""

    def to_json(self) -> dict:
        """The program as JSON-serialisable data, stamped with the config hash."""
        return {
            "config_hash": self.cfg.hash,
            "shape": asdict(self.shape),
            "depth": self.depth,
            "regions": {k: _region_json(r) for k, r in self.regions.items()},
            "ops": self.ops,
            "weights_digest": self.weights_digest,
        }

    def write(self, path) -> Path:
        """Write :meth:`to_json` atomically to ``path``."""
        return _atomic_write(Path(path), json.dumps(self.to_json(), indent=1))

    @property
    def digest(self) -> str:
        """SHA-256 (16 hex digits) of the program JSON."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def stage_region(self, layer: int, stage: str) -> Region:
        """The region holding ``layer{layer}.{stage}`` (shared scratch regions hold the last
        layer's stages; every layer has its own ``out`` and ``out_wide``)."""
        if stage in ("out", "out_wide"):
            return self.regions[f"out{layer}" + stage[3:]]
        return self.regions[stage]

    def region_format(self, name: str):
        """The block format of the ``amem`` region ``name``."""
        return self.cfg.residual_format if self.regions[name].residual else self.cfg.act_format


def _region_json(r: Region) -> dict:
    d = asdict(r)
    if not r.residual:  # activation-only programs keep their JSON (and digest)
        del d["residual"]
    return d


def _atomic_write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def build_program(cfg: Config, shape: LayerShape, qm=None) -> Program:
    """Memory map and op sequence of ``shape.layers`` encoder layers.

    Parameters
    ----------
    cfg : Config
    shape : LayerShape
    qm : bct.model.integer.QuantBert, optional
        The weights: their largest exponents (weights only) are folded into the ops. Without
        it the program has the layout but zero constants (for layout checks only).

    Returns
    -------
    Program
    """
    shape.check(cfg)
    if qm is not None and len(qm.encoder) < shape.layers:
        raise ConfigError(f"the program runs {shape.layers} layers, the model has {len(qm.encoder)}")
    B = cfg.block_size
    T, H, F, A, d, L = shape.seq, shape.hidden, shape.ffn, shape.heads, shape.head_dim, shape.layers
    nbH, nbF, nbT, nbd = H // B, F // B, T // B, d // B
    prog = Program(cfg, shape)
    wide = cfg.residual_bits is not None
    gd = cfg.gelu_direct  # FFN1 -> GELU in one op: no ffn1 region
    # the residual stream's regions on the wide path (residual format)
    res = {"x_wide", "attn_res", "attn_ln_wide", "ffn_res", "embedding"} if wide else set()
    res |= {f"out{i}_wide" for i in range(L)} if wide else set()

    def region(name, memory, rows, blocks):
        base = prog.depth.get(memory, 0)
        prog.regions[name] = Region(name, memory, base, rows, blocks, name in res)
        prog.depth[memory] = base + rows * blocks
        return prog.regions[name]

    x_in = region("x", "amem", T, nbH)
    for name, rows, blocks in (("q", T, nbH), ("k", T, nbH), ("v", T, nbH), ("vt", H, nbT),
                               ("scores", A * T, nbT), ("probs", A * T, nbT),
                               ("context", T, nbH), ("attn_out", T, nbH), ("attn_res", T, nbH),
                               ("attn_ln", T, nbH), ("ffn1", T, nbF), ("gelu", T, nbF),
                               ("ffn2", T, nbH), ("ffn_res", T, nbH)):
        if not (gd and name == "ffn1"):
            region(name, "amem", rows, blocks)
    for i in range(L):
        region(f"out{i}", "amem", T, nbH)
    region("embedding", "amem", 1, nbH)
    if wide:  # the residual copies: of the embedding LayerNorm (loaded) and of each LayerNorm
        for name in ["x_wide", "attn_ln_wide"] + [f"out{i}_wide" for i in range(L)]:
            region(name, "amem", T, nbH)
    for i in range(L):
        for name in _MATRICES:
            n, k = {"ffn1_w": (F, nbH), "ffn2_w": (H, nbF)}.get(name, (H, nbH))
            region(f"layer{i}.{name}", "wmem", n, k)
        for name in _VECTORS:
            region(f"layer{i}.{name}", "vmem", 1, nbF if name == "ffn1_b" else nbH)

    R = prog.regions

    def ex(i, name, what):
        if qm is None:
            return 0
        t = getattr(qm.encoder[i], name)
        return int(act_blocks(t, B)[1].max()) if what == "w" else int(t.exp.max())

    def op(kind, **kw):
        o = {"kind": kind, "a_base": 0, "a_stride": 0, "b_base": 0, "b_stride": 0, "w_base": 0,
             "v_base": 0, "v2_base": 0, "w_src": 0, "bias": 0, "mask": 0, "ewmax": 0,
             "ebmax": 0, "rows": 0, "nbk": 0, "ncols": 0, "out_base": 0, "out_stride": 0,
             "note": ""}
        if wide:
            o.update(dict.fromkeys(_WIDE_FIELDS, 0))
        if gd:
            o["gd"] = 0
        o.update(kw)
        prog.ops.append(o)

    def linear(i, x: Region, w: str, b: str, out: Region, note, **kw):
        wr, br = R[f"layer{i}.{w}"], R[f"layer{i}.{b}"]
        op("mm", a_base=x.base, a_stride=x.blocks, w_base=wr.base, v_base=br.base, bias=1,
           ewmax=ex(i, w, "w"), ebmax=ex(i, b, "b"), rows=T, nbk=x.blocks, ncols=wr.rows,
           out_base=out.base, out_stride=out.blocks, note=note, **kw)

    def rowop(kind, x: Region, out: Region, note, **kw):
        op(kind, a_base=x.base, a_stride=x.blocks, rows=x.rows, nbk=x.blocks,
           out_base=out.base, out_stride=out.blocks, note=note, **kw)

    x = x_in
    xr = R["x_wide"] if wide else x_in  # the residual copy of the layer input
    # the wide path's per-op flags: residual operand / output, LayerNorm's residual copy
    add_f = dict(b_res=1, o_res=1) if wide else {}

    def ln_f(copy):
        return dict(a_res=1, dual=1, out2_base=R[copy].base) if wide else {}

    for i in range(L):
        p = f"layer{i}."
        for s, w, b in (("q", "q_w", "q_b"), ("k", "k_w", "k_b"), ("v", "v_w", "v_b")):
            linear(i, x, w, b, R[s], p + s)
        for hb in range(H // B):  # V re-blocked along tokens, B dims x B tokens per op
            for tb in range(nbT):
                op("transpose", a_base=R["v"].base + tb * B * nbH + hb, a_stride=nbH,
                   out_base=R["vt"].base + hb * B * nbT + tb, out_stride=nbT, rows=B,
                   note=p + f"vt[{hb},{tb}]")
        for h in range(A):
            sc = R["scores"].base + h * T * nbT
            op("mm", a_base=R["q"].base + h * nbd, a_stride=nbH, b_base=R["k"].base + h * nbd,
               b_stride=nbH, w_src=1, mask=1, rows=T, nbk=nbd, ncols=T, out_base=sc,
               out_stride=nbT, note=p + f"scores[{h}]")
        for h in range(A):
            sc, pr = R["scores"].base + h * T * nbT, R["probs"].base + h * T * nbT
            op("softmax", a_base=sc, a_stride=nbT, rows=T, nbk=nbT, out_base=pr,
               out_stride=nbT, note=p + f"probs[{h}]")
        for h in range(A):
            op("mm", a_base=R["probs"].base + h * T * nbT, a_stride=nbT,
               b_base=R["vt"].base + h * d * nbT, b_stride=nbT, w_src=1, rows=T, nbk=nbT,
               ncols=d, out_base=R["context"].base + h * nbd, out_stride=nbH,
               note=p + f"context[{h}]")
        linear(i, R["context"], "o_w", "o_b", R["attn_out"], p + "attn_out")
        rowop("add", R["attn_out"], R["attn_res"], p + "attn_res", b_base=xr.base, b_stride=nbH,
              **add_f)
        rowop("ln", R["attn_res"], R["attn_ln"], p + "attn_ln",
              v_base=R[p + "attn_ln_g"].base, v2_base=R[p + "attn_ln_b"].base,
              **ln_f("attn_ln_wide"))
        hr = R["attn_ln_wide"] if wide else R["attn_ln"]
        if gd:  # gelu_direct: FFN1's accumulator rows through the GELU unit (gelu_acc)
            linear(i, R["attn_ln"], "ffn1_w", "ffn1_b", R["gelu"], p + "ffn1_gelu", gd=1)
        else:
            linear(i, R["attn_ln"], "ffn1_w", "ffn1_b", R["ffn1"], p + "ffn1")
            rowop("gelu", R["ffn1"], R["gelu"], p + "gelu")
        linear(i, R["gelu"], "ffn2_w", "ffn2_b", R["ffn2"], p + "ffn2")
        rowop("add", R["ffn2"], R["ffn_res"], p + "ffn_res", b_base=hr.base, b_stride=nbH,
              **add_f)
        out = R[f"out{i}"]
        rowop("ln", R["ffn_res"], out, p + "out",
              v_base=R[p + "out_ln_g"].base, v2_base=R[p + "out_ln_b"].base,
              **ln_f(f"out{i}_wide"))
        x, xr = out, (R[f"out{i}_wide"] if wide else out)
    # the sentence model's head: masked mean of the last hidden state over the valid tokens
    # (seq_len), re-encoded to its format (bct.model.integer.mean_pool; on the wide path the
    # residual copy, in the residual format)
    op("pool", a_base=xr.base, a_stride=nbH, rows=1, nbk=nbH, out_base=R["embedding"].base,
       out_stride=nbH, note="embedding", **(dict(a_res=1, o_res=1) if wide else {}))
    op("end", note="end")
    return prog


# ------------------------------------------------------------------------------------------
# Memory images: the accelerator's ROMs are initialised from the `bct quantize` images


def pack_word(mant, exp: int, bits: int, exp_bits: int) -> int:
    """One block as a scratchpad word: mantissa ``i`` at bits ``[i*bits, (i+1)*bits)``, the
    exponent above them (the layout of :func:`bct.hw.layouts.block_layout`)."""
    from bct.sim.bits import pack_block
    return pack_block(mant, exp, bits, exp_bits)


def word_widths(cfg: Config) -> dict:
    """Bits per word of the scratchpad (``amem``: a whole activation block with its exponent;
    on the wide residual path a whole residual-format block, an activation block in its low
    bits) and of the four image ROMs (``w_mant`` / ``w_exp``: one weight block of
    ``weight_block_size`` and its exponent; ``v_mant`` / ``v_exp``: one vector block)."""
    wf, vf = cfg.weight_format, cfg.vector_format
    bits = max(cfg.act_bits, cfg.residual_format.bits)
    return {"amem": cfg.block_size * bits + cfg.exp_bits,
            "w_mant": wf.block * wf.bits, "w_exp": wf.exp_bits,
            "v_mant": vf.block * vf.bits, "v_exp": vf.exp_bits}


def weight_ratio(cfg: Config) -> int:
    """K-blocks of ``block_size`` per weight block (1 at default, a power of two)."""
    return cfg.weight_format.block // cfg.block_size


#: The ROMs and the image memory group each one is loaded from, per layer.
ROMS = {"w_mant": ("w", "mant"), "w_exp": ("w", "exp"), "v_mant": ("v", "mant"),
        "v_exp": ("v", "exp")}


def check_images(directory, prog: Program) -> dict:
    """Check the ``bct quantize`` images in ``directory`` against ``prog`` before a simulation.

    The accelerator's weight ROMs hold the ``layer{i}_w`` memories of the images one after
    the other (layer ``i`` from word ``i * depth``), its vector ROMs the ``layer{i}_v``
    memories; the program addresses them in K-blocks of ``block_size`` (a weight word holds
    :func:`weight_ratio` of them). Every file the ROMs load is checked (header, config hash,
    width, depth, digits, SHA-256: :func:`bct.model.images.check_memory`) and every tensor's
    placement must be the one the program was generated for.

    Returns
    -------
    dict
        ``{rom: [(absolute path, first word, words), ...]}`` for the ROMs of :data:`ROMS`,
        one entry per layer.

    Raises
    ------
    ImageError
        Naming the file and what differs: missing files or tensors, another memory layout, a
        SHA-256, header, width or word count that does not match.
    bct.config.ConfigError
        Images made for another config.
    """
    from bct.model import images as img

    directory = Path(directory)
    man = img.read_manifest(directory)
    cfg = prog.cfg
    cfg.check_hash(man["config_hash"], f"memory images in {directory}")
    r = weight_ratio(cfg)
    widths = word_widths(cfg)
    per_layer = {"w": prog.depth["wmem"] // (r * prog.shape.layers),
                 "v": prog.depth["vmem"] // prog.shape.layers}
    out = {rom: [] for rom in ROMS}
    for i in range(prog.shape.layers):
        for rom, (g, kind) in ROMS.items():
            name = f"layer{i}_{g}_{kind}"
            entry = man["memories"].get(name)
            if entry is None:
                raise ImageError(f"memory images in {directory} have no memory {name} "
                                 f"(the program runs {prog.shape.layers} layers)")
            if entry["width"] != widths[rom] or entry["depth"] != per_layer[g]:
                raise ImageError(
                    f"memory image {name} in {directory} is {entry['width']} bits x "
                    f"{entry['depth']} words; the accelerator's {rom} ROM takes "
                    f"{widths[rom]} bits x {per_layer[g]} words per layer")
            img.check_memory(directory, name, entry, cfg)
            out[rom].append((str((directory / entry["file"]).resolve()), i * per_layer[g],
                             per_layer[g]))
        for names, g, ratio in ((_MATRICES, "w", r), (_VECTORS, "v", 1)):
            for t in names:
                key = f"layer{i}.{t}"
                info = man["tensors"].get(key)
                if info is None:
                    raise ImageError(f"memory images in {directory} have no tensor {key}")
                reg = prog.regions[key]
                got = ((i * per_layer[g] + info["base"]) * ratio, info["blocks"] * ratio)
                if info["memory"] != f"layer{i}_{g}" or got != (reg.base, reg.words):
                    raise ImageError(
                        f"memory images in {directory} place {key} at blocks {got[0]}.."
                        f"{got[0] + got[1] - 1} of {info['memory']}; the program expects "
                        f"{reg.base}..{reg.base + reg.words - 1} (another memory layout)")
    return out
