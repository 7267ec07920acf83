"""Memory images of a block-format BERT: ``$readmemh`` hex files, a JSON manifest, a loader.

:func:`write_images` stores every tensor of a :class:`~bct.model.integer.QuantBert` in a few
on-chip memories; :func:`read_images` reads them back bit-exactly (``==`` on every mantissa and
exponent) and refuses images made for another config or damaged on disk. The layout is
described for the RTL in ``docs/images.md``; in short:

* One **mantissa word** is one block: ``block`` integers of ``bits`` bits, element ``i`` at bits
  ``[i*bits, (i+1)*bits)`` (LSB first, two's complement), packed by
  :func:`bct.sim.bits.pack_signed` (the mantissa field of :func:`bct.sim.bits.pack_block`).
* The block's shared exponent (``exp_bits`` bits, two's complement) is the word **at the same
  address** of a parallel exponent memory, so one address fetches a whole block.
* Tensors are grouped into memories by region and format (:data:`MEMORY_GROUPS`):
  ``embed_w`` (embedding tables), ``embed_v`` (embedding LayerNorm), ``layer{i}_w`` (the six
  weight matrices of layer ``i``), ``layer{i}_v`` (its biases and LayerNorm vectors),
  ``head_w`` / ``head_v`` (pooler and classifier). Group ``g`` is the pair of memories
  ``g_mant`` and ``g_exp``, one ``.hex`` file each.
* Inside a memory, tensors follow in model order (:meth:`QuantBert.tensors`), each from its
  ``base`` address; a tensor is row-major over its leading axes and cut into blocks along its
  last axis, so block ``j`` of row ``r`` is at ``base + r * blocks_per_row + j``.

Each hex file starts with one comment line naming the memory, its width, depth and the config
hash, then holds exactly ``depth`` lines of ``ceil(width / 4)`` hex digits. The manifest
(:data:`MANIFEST`) lists every memory (file, width, depth, SHA-256) and every tensor (memory,
base address, shape, block layout, exponent memory). The directory is written under a temporary
name and renamed into place, so a half-written image set is never visible.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bct.config import BlockFormat, Config, ConfigError
from bct.sim.bits import pack_signed, unpack_signed

__all__ = [
    "FORMAT",
    "ImageError",
    "MANIFEST",
    "MEMORY_GROUPS",
    "VERSION",
    "check_memory",
    "content_digest",
    "memory_group",
    "read_images",
    "read_manifest",
    "write_images",
]

#: Name of the manifest file in an image directory.
MANIFEST = "manifest.json"

#: ``format`` field of the manifest.
FORMAT = "bct-gen memory images"

#: Bump when the layout of the files changes.
VERSION = 1

#: The memory groups, in address-map order (``{i}`` is the layer index).
MEMORY_GROUPS = ("embed_w", "embed_v", "layer{i}_w", "layer{i}_v", "head_w", "head_v")

_HEADER = re.compile(
    r"// bct-gen memory image (?P<name>\w+): width (?P<width>\d+) bits, depth (?P<depth>\d+) "
    r"words, config (?P<hash>[0-9a-f]{16})"
)


class ImageError(ValueError):
    """An image directory, its manifest or one of its hex files is missing or damaged."""


def memory_group(name: str) -> str:
    """The memory group of a tensor (see :data:`MEMORY_GROUPS`).

    Parameters
    ----------
    name : str
        Stable tensor name (:func:`bct.model.checkpoint.named_parameters`), e.g. ``"layer3.q_w"``.

    Returns
    -------
    str
        ``embed_w``, ``embed_v``, ``layer{i}_w``, ``layer{i}_v``, ``head_w`` or ``head_v``.
    """
    region, _, field = name.partition(".")
    if region in ("pooler", "classifier"):
        region = "head"
    matrix = field in ("word", "position", "type", "w") or field.endswith("_w")
    return f"{region}_{'w' if matrix else 'v'}"


def _digits(width: int) -> int:
    return -(-width // 4)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fmt_dict(fmt: BlockFormat) -> dict:
    return {"bits": fmt.bits, "block": fmt.block, "exp_bits": fmt.exp_bits}


def _write_hex(path: Path, name: str, width: int, words, cfg_hash: str) -> None:
    n = _digits(width)
    header = f"// bct-gen memory image {name}: width {width} bits, depth {len(words)} words, config {cfg_hash}"
    with open(path, "w", encoding="ascii", newline="\n") as fh:
        fh.write(header + "\n")
        fh.write("".join(f"{w:0{n}x}\n" for w in words))


def _plan(qm) -> tuple[dict, dict]:
    """Memories and tensor placements of ``qm`` (no data yet)."""
    memories: dict = {}
    tensors: dict = {}
    for name, t in qm.tensors().items():
        group = memory_group(name)
        mem = memories.setdefault(group, {"fmt": t.fmt, "depth": 0, "tensors": []})
        if mem["fmt"] != t.fmt:
            raise ImageError(
                f"tensor {name} has format {t.fmt}, but memory {group} holds {mem['fmt']}"
            )
        blocks = int(t.exp.size)
        tensors[name] = {
            "memory": group,
            "mant_memory": f"{group}_mant",
            "exp_memory": f"{group}_exp",
            "base": mem["depth"],
            "blocks": blocks,
            "shape": list(t.shape),
            "blocks_per_row": int(t.exp.shape[-1]),
            **_fmt_dict(t.fmt),
        }
        mem["depth"] += blocks
        mem["tensors"].append(name)
    return memories, tensors


def _model_fields(qm) -> dict:
    """The scalar fields of ``qm`` (shape, labels, source) and its ``hidden_order`` (a list,
    left out while None), stored in the manifest."""
    out = {}
    for f in dataclasses.fields(qm):
        if f.name in ("cfg", "encoder") or f.name in _TOP:
            continue
        value = getattr(qm, f.name)
        if f.name == "hidden_order":
            if value is not None:
                out[f.name] = list(value)
            continue
        if not (value is None or isinstance(value, (bool, int, float, str))):
            raise ImageError(f"cannot store QuantBert field {f.name} of type {type(value).__name__}")
        out[f.name] = value
    return out


#: Top-level QuantBert tensors by stable name (the inverse of ``named_parameters``).
_TOP = {
    "word_emb": "embed.word",
    "pos_emb": "embed.position",
    "type_emb": "embed.type",
    "emb_ln_g": "embed.ln_g",
    "emb_ln_b": "embed.ln_b",
    "pooler_w": "pooler.w",
    "pooler_b": "pooler.b",
    "classifier_w": "classifier.w",
    "classifier_b": "classifier.b",
}


def write_images(qm, out: str | os.PathLike) -> Path:
    """Write the memory images and manifest of ``qm`` into the directory ``out``.

    Parameters
    ----------
    qm : bct.model.integer.QuantBert
        The block-format model (its ``cfg.hash`` is stamped into every file).
    out : str or os.PathLike
        Target directory. It is created; an existing image directory (one holding a
        :data:`MANIFEST`) is replaced, anything else that is not empty is refused.

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    ImageError
        If ``out`` is a file or a non-empty directory without a manifest.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ImageError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ImageError(f"{out} is not empty and holds no memory images; refusing to overwrite it")
    cfg = qm.cfg
    memories, tensors = _plan(qm)
    all_tensors = qm.tensors()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        mem_entries = {}
        for group, mem in memories.items():
            fmt = mem["fmt"]
            parts = [all_tensors[name] for name in mem["tensors"]]
            blocks = np.concatenate([t.mant.reshape(-1, fmt.block) for t in parts])
            exps = np.concatenate([t.exp.reshape(-1) for t in parts])
            for kind, width, words in (
                ("mant", fmt.block * fmt.bits, [pack_signed(b, fmt.bits) for b in blocks.tolist()]),
                ("exp", fmt.exp_bits, [pack_signed([e], fmt.exp_bits) for e in exps.tolist()]),
            ):
                name = f"{group}_{kind}"
                path = tmp / f"{name}.hex"
                _write_hex(path, name, width, words, cfg.hash)
                mem_entries[name] = {
                    "file": path.name,
                    "kind": "mantissa" if kind == "mant" else "exponent",
                    "group": group,
                    "width": width,
                    "depth": mem["depth"],
                    "digits": _digits(width),
                    "addr_bits": max(1, (mem["depth"] - 1).bit_length()),
                    **_fmt_dict(fmt),
                    "tensors": mem["tensors"],
                    "sha256": _sha256(path),
                }
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "config_hash": cfg.hash,
            "config": cfg.to_dict(),
            "layout": (
                "one mantissa word = one block, element i at bits [i*bits, (i+1)*bits), two's "
                "complement; its exponent is the word at the same address of the exponent memory; "
                "block j of row r of a tensor is at base + r * blocks_per_row + j"
            ),
            "model": _model_fields(qm),
            "memories": mem_entries,
            "tensors": tensors,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "images")
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(old / "images", out)
                raise
        else:
            os.replace(tmp, out)
    finally:
        for d in (tmp, old):
            if d is not None and d.exists():
                shutil.rmtree(d, ignore_errors=True)
    return out


def read_manifest(directory: str | os.PathLike) -> dict:
    """Read and check the manifest of an image directory (format and version only).

    Raises
    ------
    ImageError
        Missing or unreadable manifest, or one of another format or version.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ImageError(f"{directory} holds no memory images: {path} does not exist")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ImageError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ImageError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ImageError(
            f"{path} has layout version {manifest.get('version')!r}; this loader reads version {VERSION}"
        )
    for key in ("config_hash", "config", "model", "memories", "tensors"):
        if key not in manifest:
            raise ImageError(f"{path} lacks the field {key!r}")
    return manifest


def _read_hex(path: Path, name: str, entry: dict, cfg: Config) -> list[int]:
    """Check one hex file against its manifest entry and the config; return its words."""
    if not path.is_file():
        raise ImageError(f"memory image {name}: file {path} does not exist")
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageError(f"memory image {path}: cannot read it as ASCII text ({exc})") from exc
    lines = text.split("\n")
    m = _HEADER.fullmatch(lines[0])
    if m is None or m["name"] != name:
        raise ImageError(f"memory image {path}: missing or malformed header line (expected the {name} header)")
    cfg.check_hash(m["hash"], f"memory image {path}")
    width, depth = int(m["width"]), int(m["depth"])
    if width != entry["width"]:
        raise ImageError(f"memory image {path}: width {width} bits, but the manifest says {entry['width']}")
    if depth != entry["depth"]:
        raise ImageError(f"memory image {path}: depth {depth} words, but the manifest says {entry['depth']}")
    body = lines[1:]
    if body and body[-1] == "":
        body.pop()
    if len(body) != depth:
        what = "truncated" if len(body) < depth else "too long"
        raise ImageError(f"memory image {path}: {what}: {len(body)} words, header says {depth}")
    n = _digits(width)
    word = re.compile(f"[0-9a-fA-F]{{{n}}}")
    for i, line in enumerate(body):
        if not word.fullmatch(line):
            raise ImageError(
                f"memory image {path}, line {i + 2}: {line[:40]!r} is not a word of {n} hex digits"
            )
    words = [int(line, 16) for line in body]
    top = 1 << width
    for i, w in enumerate(words):
        if w >= top:
            raise ImageError(f"memory image {path}, line {i + 2}: word exceeds {width} bits")
    if _sha256(path) != entry.get("sha256"):
        raise ImageError(f"memory image {path}: content differs from the manifest (SHA-256 mismatch)")
    return words


def check_memory(directory: str | os.PathLike, name: str, entry: dict, cfg: Config) -> Path:
    """Check one memory's hex file against its manifest entry and ``cfg``, without decoding
    the model (what a loader of the images into RTL memories needs).

    Parameters
    ----------
    directory : str or os.PathLike
        The image directory.
    name : str
        Memory name, e.g. ``"layer0_w_mant"``.
    entry : dict
        Its ``memories`` entry of the manifest (:func:`read_manifest`).
    cfg : Config
        The current config; a file stamped with another hash is refused.

    Returns
    -------
    pathlib.Path
        The checked file.

    Raises
    ------
    ImageError, bct.config.ConfigError
        As :func:`read_images` for that file.
    """
    path = Path(directory) / entry["file"]
    _read_hex(path, name, entry, cfg)
    return path


def content_digest(qm) -> str:
    """16 hex digits naming the content of ``qm``: its config hash and every tensor's
    mantissas and exponents (equal models, equal digests; for content-addressed image
    directories)."""
    h = hashlib.sha256(qm.cfg.hash.encode())
    if qm.hidden_order is not None:
        h.update(np.asarray(qm.hidden_order, dtype=np.int64).tobytes())
    for name, t in qm.tensors().items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(t.mant, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(t.exp, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def read_images(directory: str | os.PathLike, cfg: Config | None = None):
    """Load the :class:`~bct.model.integer.QuantBert` stored by :func:`write_images`.

    Parameters
    ----------
    directory : str or os.PathLike
        An image directory.
    cfg : Config, optional
        The current config; images made for another one are refused. None takes the config
        recorded in the manifest (checked against its hash).

    Returns
    -------
    bct.model.integer.QuantBert
        Equal, mantissa for mantissa and exponent for exponent, to the model that was written.

    Raises
    ------
    bct.config.ConfigError
        The manifest or a hex file was made for another config.
    ImageError
        Missing files; a header, width, depth, digit or content that does not match; a tensor
        placement outside its memory; a mantissa outside the symmetric range.
    """
    from bct.model.blocks import BlockTensor
    from bct.model.integer import QuantBert, QuantLayer

    directory = Path(directory)
    manifest = read_manifest(directory)
    stored = Config.from_dict(manifest["config"])
    if stored.hash != manifest["config_hash"]:
        raise ImageError(
            f"{directory / MANIFEST}: its config hashes to {stored.hash}, not {manifest['config_hash']}"
        )
    if cfg is None:
        cfg = stored
    cfg.check_hash(manifest["config_hash"], f"memory images in {directory}")

    words: dict = {}
    for name, entry in manifest["memories"].items():
        words[name] = _read_hex(directory / entry["file"], name, entry, cfg)

    tensors = {}
    for name, t in manifest["tensors"].items():
        fmt = BlockFormat(t["bits"], t["block"], t["exp_bits"])
        lo, hi = t["base"], t["base"] + t["blocks"]
        for mem_name in (t["mant_memory"], t["exp_memory"]):
            if mem_name not in words:
                raise ImageError(f"tensor {name}: memory {mem_name} is not in the manifest")
            if hi > len(words[mem_name]):
                raise ImageError(f"tensor {name}: blocks {lo}..{hi - 1} lie outside memory {mem_name}")
        mant = np.array(
            [unpack_signed(w, fmt.bits, fmt.block) for w in words[t["mant_memory"]][lo:hi]], dtype=np.int64
        )
        exp = np.array([unpack_signed(w, fmt.exp_bits, 1)[0] for w in words[t["exp_memory"]][lo:hi]], dtype=np.int64)
        shape = tuple(t["shape"])
        try:
            bt = BlockTensor(mant.reshape(shape), exp.reshape(shape[:-1] + (t["blocks_per_row"],)), fmt)
            bt.check()
        except (ValueError, ConfigError) as exc:
            raise ImageError(f"tensor {name} in {directory}: {exc}") from exc
        tensors[name] = bt

    model = dict(manifest["model"])
    if isinstance(model.get("hidden_order"), list):
        model["hidden_order"] = tuple(model["hidden_order"])
    try:
        layers = tuple(
            QuantLayer(**{f.name: tensors.pop(f"layer{i}.{f.name}") for f in dataclasses.fields(QuantLayer)})
            for i in range(model["layers"])
        )
        top = {attr: tensors.pop(key) for attr, key in _TOP.items() if key in tensors}
    except KeyError as exc:
        raise ImageError(f"{directory / MANIFEST} lacks the tensor {exc.args[0]}") from None
    if tensors:
        raise ImageError(f"{directory / MANIFEST} has unknown tensors: {', '.join(sorted(tensors))}")
    try:
        return QuantBert(cfg=cfg, encoder=layers, **top, **model)
    except (TypeError, ValueError) as exc:
        raise ImageError(f"{directory / MANIFEST}: model fields do not fit QuantBert ({exc})") from exc
