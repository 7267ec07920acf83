"""The encoder layer's program, memory map and memory images, generated from the one config.

:func:`build_program` lays out the accelerator's three memories for a :class:`LayerShape`
(``amem``: activation scratchpad, one word = one activation block; ``wmem``: weight matrices,
one word = one K-block of ``block_size`` weights with its exponent; ``vmem``: biases and
LayerNorm gamma / beta, one word = one vector block) and writes the op sequence the
controller of :class:`bct.hw.layer.LayerAccelerator` executes: per layer the Q / K / V
projections, per head the transposing re-block of V, the scores, the softmax and the context,
then the output projection, residual, LayerNorm, FFN1, GELU, FFN2, residual, LayerNorm.

Everything that depends only on the weights (the largest weight and bias exponent of each
matrix) is folded into the program; everything that depends on the activations (row scales,
the largest exponent of K and of the re-blocked V, masks from the sequence length) is computed
on chip.

:func:`write_images` writes one ``$readmemh`` file per ROM (``wmem.hex``, ``vmem.hex``: a header
comment with the config hash, width and depth, then one zero-padded word per line) and a
manifest (JSON, config hash, SHA-256 of every file); :func:`check_images` refuses a manifest
of another config or program, a file whose digest, header or length differs, before any
simulation starts.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bct.config import Config, ConfigError
from bct.model.blocks import BlockTensor
from bct.model.matmul import act_blocks

__all__ = [
    "LayerShape", "Region", "Program", "ImageError", "OPS", "build_program", "image_words",
    "write_images", "check_images", "read_image", "pack_word",
]

#: Op codes of the controller (``kind`` field).
OPS = {"end": 0, "mm": 1, "transpose": 2, "softmax": 3, "add": 4, "ln": 5, "gelu": 6}

#: Every layer stage the accelerator writes, in trace order (``layer{i}.<stage>``).
STAGES = ("q", "k", "v", "scores", "probs", "context", "attn_out", "attn_res", "attn_ln",
          "ffn1", "gelu", "ffn2", "ffn_res", "out")

_MATRICES = ("q_w", "k_w", "v_w", "o_w", "ffn1_w", "ffn2_w")
_VECTORS = ("q_b", "k_b", "v_b", "o_b", "attn_ln_g", "attn_ln_b", "ffn1_b", "ffn2_b",
            "out_ln_g", "out_ln_b")


class ImageError(ConfigError):
    """A memory image or its manifest cannot be used with this config / program."""


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


@dataclass(frozen=True)
class Region:
    """A tensor in a memory: ``rows`` rows of ``blocks`` words, word ``(r, j)`` at
    ``base + r * blocks + j``."""

    name: str
    memory: str
    base: int
    rows: int
    blocks: int

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
            "regions": {k: asdict(r) for k, r in self.regions.items()},
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
        layer's stages; every layer has its own ``out``)."""
        return self.regions[f"out{layer}" if stage == "out" else stage]


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
    B = cfg.block_size
    T, H, F, A, d, L = shape.seq, shape.hidden, shape.ffn, shape.heads, shape.head_dim, shape.layers
    nbH, nbF, nbT, nbd = H // B, F // B, T // B, d // B
    prog = Program(cfg, shape)

    def region(name, memory, rows, blocks):
        base = prog.depth.get(memory, 0)
        prog.regions[name] = Region(name, memory, base, rows, blocks)
        prog.depth[memory] = base + rows * blocks
        return prog.regions[name]

    x_in = region("x", "amem", T, nbH)
    for name, rows, blocks in (("q", T, nbH), ("k", T, nbH), ("v", T, nbH), ("vt", H, nbT),
                               ("scores", A * T, nbT), ("probs", A * T, nbT),
                               ("context", T, nbH), ("attn_out", T, nbH), ("attn_res", T, nbH),
                               ("attn_ln", T, nbH), ("ffn1", T, nbF), ("gelu", T, nbF),
                               ("ffn2", T, nbH), ("ffn_res", T, nbH)):
        region(name, "amem", rows, blocks)
    for i in range(L):
        region(f"out{i}", "amem", T, nbH)
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
        o.update(kw)
        prog.ops.append(o)

    def linear(i, x: Region, w: str, b: str, out: Region, note):
        wr, br = R[f"layer{i}.{w}"], R[f"layer{i}.{b}"]
        op("mm", a_base=x.base, a_stride=x.blocks, w_base=wr.base, v_base=br.base, bias=1,
           ewmax=ex(i, w, "w"), ebmax=ex(i, b, "b"), rows=T, nbk=x.blocks, ncols=wr.rows,
           out_base=out.base, out_stride=out.blocks, note=note)

    def rowop(kind, x: Region, out: Region, note, **kw):
        op(kind, a_base=x.base, a_stride=x.blocks, rows=x.rows, nbk=x.blocks,
           out_base=out.base, out_stride=out.blocks, note=note, **kw)

    x = x_in
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
        rowop("add", R["attn_out"], R["attn_res"], p + "attn_res", b_base=x.base, b_stride=nbH)
        rowop("ln", R["attn_res"], R["attn_ln"], p + "attn_ln",
              v_base=R[p + "attn_ln_g"].base, v2_base=R[p + "attn_ln_b"].base)
        linear(i, R["attn_ln"], "ffn1_w", "ffn1_b", R["ffn1"], p + "ffn1")
        rowop("gelu", R["ffn1"], R["gelu"], p + "gelu")
        linear(i, R["gelu"], "ffn2_w", "ffn2_b", R["ffn2"], p + "ffn2")
        rowop("add", R["ffn2"], R["ffn_res"], p + "ffn_res", b_base=R["attn_ln"].base,
              b_stride=nbH)
        out = R[f"out{i}"]
        rowop("ln", R["ffn_res"], out, p + "out",
              v_base=R[p + "out_ln_g"].base, v2_base=R[p + "out_ln_b"].base)
        x = out
    op("end", note="end")
    return prog


# ------------------------------------------------------------------------------------------
# Memory images


def pack_word(mant, exp: int, bits: int, exp_bits: int) -> int:
    """One block as a memory word: mantissa ``i`` at bits ``[i*bits, (i+1)*bits)``, the
    exponent above them (the layout of :func:`bct.hw.layouts.block_layout`)."""
    from bct.sim.bits import pack_block
    return pack_block(mant, exp, bits, exp_bits)


def word_widths(cfg: Config) -> dict:
    """Bits per word of each memory."""
    B = cfg.block_size
    return {"amem": B * cfg.act_bits + cfg.exp_bits,
            "wmem": B * cfg.weight_bits + cfg.weight_format.exp_bits,
            "vmem": B * cfg.vector_bits + cfg.exp_bits}


def image_words(prog: Program, qm) -> dict:
    """The words of ``wmem`` and ``vmem`` for the weights of ``qm`` (every weight block of
    ``weight_block_size`` split into K-blocks of ``block_size`` carrying its exponent)."""
    cfg = prog.cfg
    B = cfg.block_size
    if qm.cfg != cfg:
        raise ImageError(f"weights were quantized for config {qm.cfg.hash}, not {cfg.hash}")
    words = {"wmem": [0] * prog.depth["wmem"], "vmem": [0] * prog.depth["vmem"]}
    wf, vf = cfg.weight_format, cfg.vector_format
    for i in range(prog.shape.layers):
        lw = qm.encoder[i]
        for name in _MATRICES:
            t: BlockTensor = getattr(lw, name)
            r = prog.regions[f"layer{i}.{name}"]
            mant, exp = act_blocks(t, B)
            if mant.shape[:2] != (r.rows, r.blocks):
                raise ImageError(f"layer{i}.{name} has shape {t.shape}, the program expects "
                                 f"{r.rows} x {r.blocks * B}")
            flat_m, flat_e = mant.reshape(-1, B).tolist(), exp.reshape(-1).tolist()
            words["wmem"][r.base:r.base + r.words] = [
                pack_word(mm, e, wf.bits, wf.exp_bits) for mm, e in zip(flat_m, flat_e)]
        for name in _VECTORS:
            t = getattr(lw, name)
            r = prog.regions[f"layer{i}.{name}"]
            if t.shape != (r.blocks * B,):
                raise ImageError(f"layer{i}.{name} has shape {t.shape}, the program expects "
                                 f"({r.blocks * B},)")
            words["vmem"][r.base:r.base + r.words] = [
                pack_word(mm, e, vf.bits, vf.exp_bits)
                for mm, e in zip(t.blocks.tolist(), t.exp.tolist())]
    return words


def _hex_text(cfg: Config, name: str, width: int, words: list) -> str:
    digits = -(-width // 4)
    lines = [f"// bct-gen config {cfg.hash} memory {name} width {width} depth {len(words)}"]
    lines += [format(w, f"0{digits}x") for w in words]
    return "\n".join(lines) + "\n"


def write_images(prog: Program, qm, out_dir) -> Path:
    """Write ``wmem.hex``, ``vmem.hex`` and ``manifest.json`` into ``out_dir`` (atomically, file
    by file, the manifest last); returns the manifest path."""
    out_dir = Path(out_dir)
    words = image_words(prog, qm)
    widths = word_widths(prog.cfg)
    files = {}
    for name in ("wmem", "vmem"):
        text = _hex_text(prog.cfg, name, widths[name], words[name])
        _atomic_write(out_dir / f"{name}.hex", text)
        files[name] = {"file": f"{name}.hex", "width": widths[name], "depth": len(words[name]),
                       "sha256": hashlib.sha256(text.encode()).hexdigest()}
    tensors = {k: asdict(r) for k, r in prog.regions.items() if r.memory != "amem"}
    manifest = {"config_hash": prog.cfg.hash, "program_layout": _layout_digest(prog),
                "source": getattr(qm, "source", ""), "memories": files, "tensors": tensors}
    return _atomic_write(out_dir / "manifest.json", json.dumps(manifest, indent=1))


def _layout_digest(prog: Program) -> str:
    data = json.dumps({"shape": asdict(prog.shape), "depth": prog.depth,
                       "regions": {k: asdict(r) for k, r in prog.regions.items()}},
                      sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def check_images(manifest_path, prog: Program) -> dict:
    """Validate the images of ``manifest_path`` for ``prog`` before a simulation.

    Returns
    -------
    dict
        ``{memory: absolute path of its hex file}``.

    Raises
    ------
    ImageError
        Naming the file and what differs: missing files, another config hash or memory
        layout, a SHA-256, header, width or word count that does not match.
    """
    manifest_path = Path(manifest_path)
    if not manifest_path.is_file():
        raise ImageError(f"memory image manifest {manifest_path} not found")
    try:
        man = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise ImageError(f"memory image manifest {manifest_path} is not valid JSON ({e})") from None
    prog.cfg.check_hash(man.get("config_hash", "?"), f"memory image {manifest_path}")
    if man.get("program_layout") != _layout_digest(prog):
        raise ImageError(f"memory images {manifest_path} were written for another memory layout "
                         f"({man.get('program_layout')}, the program's is {_layout_digest(prog)})")
    widths = word_widths(prog.cfg)
    paths = {}
    for name in ("wmem", "vmem"):
        info = man.get("memories", {}).get(name)
        if info is None:
            raise ImageError(f"memory image manifest {manifest_path} has no {name} entry")
        path = manifest_path.parent / info["file"]
        if not path.is_file():
            raise ImageError(f"memory image {path} not found")
        text = path.read_bytes()
        digest = hashlib.sha256(text).hexdigest()
        if digest != info["sha256"]:
            raise ImageError(f"memory image {path} is corrupted: SHA-256 {digest[:16]}..., the "
                             f"manifest says {info['sha256'][:16]}...")
        lines = text.decode().splitlines()
        want = (f"// bct-gen config {prog.cfg.hash} memory {name} width {widths[name]} "
                f"depth {prog.depth[name]}")
        if not lines or lines[0] != want:
            raise ImageError(f"memory image {path} header {lines[0] if lines else ''!r} does not "
                             f"match {want!r}")
        if len(lines) - 1 != prog.depth[name]:
            raise ImageError(f"memory image {path} has {len(lines) - 1} words, expected "
                             f"{prog.depth[name]}")
        paths[name] = str(path.resolve())
    return paths


def read_image(path) -> list[int]:
    """The words of a hex image (header skipped)."""
    return [int(line, 16) for line in Path(path).read_text().splitlines()
            if line and not line.startswith("//")]


def weights_digest(words: dict) -> str:
    """A digest of the image words (names the content-addressed image directory)."""
    h = hashlib.sha256()
    for name in sorted(words):
        h.update(name.encode())
        h.update(",".join(map(str, words[name])).encode())
    return h.hexdigest()[:16]
