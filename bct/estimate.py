"""Analytic estimates from the config: cycles per encoder layer, DSPs, LUTs and FFs.

``bct estimate`` prints them as JSON. The cycle model uses the RTL units' own timing
attributes (``MatmulArray.latency``, ``SoftmaxUnit.row_period``, ``LayerNormUnit.row_cycles``)
and the matmul array's tile schedule (docs/hardware.md, "Matmul array"): a run of ``T`` tiles of
reduction ``K`` on an ``R x C`` array takes ``K + (T - 1) * max(K, R + admit_gap) + latency +
R - 1`` cycles, exact (checked against simulation in ``tests/test_estimate.py``). The resource model
counts the matmul array's registers bit by bit and its LUTs with per-bit costs calibrated on
ECP5 (docs/synthesis.md gives the tolerances against the synthesis reports).
"""

from __future__ import annotations

import json
import math

from bct.config import Config

__all__ = ["MINILM", "matmul_run_cycles", "encoder_layer_cycles", "matmul_resources",
           "estimate", "register"]

#: Encoder dimensions of all-MiniLM-L6-v2 (the built-in model): hidden, heads, FFN width.
MINILM = {"hidden": 384, "heads": 12, "ffn": 1536}

#: DSP blocks per ``a x b``-bit signed multiply, by family: the widest operand pair one block
#: takes (``None``: no DSP blocks; every multiplier is LUTs).
DSP_WIDTH = {"ice40": (16, 16), "ecp5": (18, 18), "nexus": (18, 18), "xc7": (25, 18)}

#: LUT cost per bit of the matmul array's pieces, calibrated on ECP5 (LUT4 count of the
#: synthesised 2x2 and 8x8 arrays, Yosys 0.70; docs/synthesis.md).
LUT_PER_BIT = {
    "shift": 0.9,    # per bit per level of the two-stage barrel shifter
    "acc": 0.9,      # per accumulator bit (adder carry logic outside the carry cells)
    "drain": 0.9,    # per drain bit: load / shift-up multiplexer
    "prod": 0.9,     # per block-product bit: the first-beat multiplexer
    "chain": 0.9,    # per readout-chain bit: load / shift multiplexer
}

#: LUTs of a family relative to ECP5 for the same logic (iCE40 has no wide-multiplexer cells;
#: measured on the 2x2 array), and LUTs per operand-bit pair of a multiplier built from LUTs.
LUT_SCALE = {"ecp5": 1.0, "nexus": 1.0, "ice40": 1.85, "ice40-nodsp": 1.85, "xc7": 1.0}
MUL_LUT_PER_BIT2 = 2.8


def _timing(cfg: Config) -> tuple[int, int]:
    """``(latency, admit_gap)`` of :class:`bct.hw.matmul.MatmulArray` for ``cfg``."""
    from bct.hw.matmul import MatmulArray
    return MatmulArray.timing(cfg)


def matmul_run_cycles(cfg: Config, tiles: int, K: int) -> int:
    """Cycles of ``tiles`` back-to-back tiles of reduction ``K`` on the array, from the first
    input beat to the last output row (output always ready, inputs never stalled).

    Parameters
    ----------
    cfg : Config
    tiles : int
        Number of tiles (``>= 1``).
    K : int
        Reduction length, padded up to a multiple of ``block_size``.

    Returns
    -------
    int
        ``K + (tiles - 1) * max(K, R + admit_gap) + latency + R - 1`` with ``latency`` and
        ``admit_gap`` of :class:`~bct.hw.matmul.MatmulArray` (exact: a tile's last beat is
        admitted only when the previous tile can drain).
    """
    if tiles < 1 or K < 1:
        raise ValueError(f"tiles and K must be positive, not {tiles}, {K}")
    R, B = cfg.array_rows, cfg.block_size
    Kp = -(-K // B) * B
    latency, gap = _timing(cfg)
    return Kp + (tiles - 1) * max(Kp, R + gap) + latency + R - 1


def _matmul(cfg: Config, M: int, K: int, N: int, count: int = 1) -> dict:
    R, C = cfg.array_rows, cfg.array_cols
    tiles = math.ceil(M / R) * math.ceil(N / C)
    return {"tiles": count * tiles, "macs": count * M * K * N,
            "cycles": count * matmul_run_cycles(cfg, tiles, K)}


def encoder_layer_cycles(cfg: Config, seq_len: int = 128, hidden: int = MINILM["hidden"],
                         heads: int = MINILM["heads"], ffn: int = MINILM["ffn"]) -> dict:
    """Analytic cycles of one BERT encoder layer on one matmul array and one of each unit.

    Every matmul is one run of back-to-back tiles (Q, K, V together as one ``3 * hidden``-wide
    projection; scores and context one run per head); the nonlinear units run at their
    steady-state rates: softmax ``row_period`` per row, GELU one block per cycle, LayerNorm
    ``max(hidden / B, row_cycles)`` per row, each plus its latency once.

    Parameters
    ----------
    cfg : Config
    seq_len, hidden, heads, ffn : int
        Sequence length and encoder dimensions (default all-MiniLM-L6-v2).

    Returns
    -------
    dict
        Flat: ``<op>_cycles`` / ``<op>_tiles`` per matmul, ``softmax_cycles``,
        ``gelu_cycles``, ``layernorm_cycles``, ``matmul_cycles`` (their sum),
        ``nonlinear_cycles``, ``layer_cycles`` (matmul array bound: the nonlinear units work on
        streams beside it), ``layer_cycles_serial`` (no overlap at all), ``macs``,
        ``mac_utilisation`` and ``layer_us`` at ``cfg.clock_mhz``.
    """
    from bct.hw.gelu import GeluUnit
    from bct.hw.layernorm import LayerNormUnit
    from bct.hw.softmax import SoftmaxUnit

    B = cfg.block_size
    for name, v in (("seq_len", seq_len), ("hidden", hidden), ("ffn", ffn)):
        if v % B:
            raise ValueError(f"{name} {v} is not a multiple of block_size {B}")
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
    dh = hidden // heads
    L = seq_len
    for k in (hidden, ffn, L):  # the reductions the accumulators must hold
        cfg.check_reduction(k)
    ops = {
        "qkv": _matmul(cfg, L, hidden, 3 * hidden),
        "scores": _matmul(cfg, L, dh, L, heads),
        "context": _matmul(cfg, L, L, dh, heads),
        "attn_out": _matmul(cfg, L, hidden, hidden),
        "ffn1": _matmul(cfg, L, hidden, ffn),
        "ffn2": _matmul(cfg, L, ffn, hidden),
    }
    out: dict = {"config_hash": cfg.hash, "seq_len": L, "hidden": hidden, "heads": heads,
                 "ffn": ffn, "array_rows": cfg.array_rows, "array_cols": cfg.array_cols,
                 "clock_mhz": cfg.clock_mhz}
    for name, o in ops.items():
        out[f"{name}_tiles"] = o["tiles"]
        out[f"{name}_cycles"] = o["cycles"]
    sm = SoftmaxUnit(cfg, L)
    sm._MustUse__silence = True  # only its timing attributes are used
    blocks = L // B
    out["softmax_cycles"] = heads * L * sm.row_period(blocks) + sm.latency(blocks)
    out["gelu_cycles"] = L * ffn // B + GeluUnit.latency
    ln = LayerNormUnit(cfg, hidden)
    ln._MustUse__silence = True
    out["layernorm_cycles"] = 2 * (L * max(ln.beats, ln.row_cycles) + ln.latency)
    out["matmul_cycles"] = sum(o["cycles"] for o in ops.values())
    out["nonlinear_cycles"] = out["softmax_cycles"] + out["gelu_cycles"] + out["layernorm_cycles"]
    out["layer_cycles"] = out["matmul_cycles"]
    out["layer_cycles_serial"] = out["matmul_cycles"] + out["nonlinear_cycles"]
    out["macs"] = sum(o["macs"] for o in ops.values())
    pes = cfg.array_rows * cfg.array_cols
    out["mac_utilisation"] = round(out["macs"] / (pes * out["matmul_cycles"]), 4)
    out["layer_us"] = round(out["layer_cycles"] / cfg.clock_mhz, 2)
    return out


def _dsps_per_mul(a: int, b: int, family: str) -> int:
    width = DSP_WIDTH.get(family)
    if width is None:
        return 0
    wa, wb = width
    a, b = max(a, b), min(a, b)
    return math.ceil(a / wa) * math.ceil(b / wb)


def matmul_resources(cfg: Config, family: str = "ecp5") -> dict:
    """DSP, FF and LUT estimates of :class:`bct.hw.matmul.MatmulArray` (unit only).

    Parameters
    ----------
    cfg : Config
    family : str
        ``ice40`` (UltraPlus: with DSPs), ``ice40-nodsp`` (HX: none), ``ecp5``, ``nexus``,
        ``xc7``.

    Returns
    -------
    dict
        ``dsp`` (one block per PE when the operands fit one), ``ff`` (every register bit of
        the design, the output FIFO excluded: it is LUT RAM), ``lut`` (per-bit costs of
        :data:`LUT_PER_BIT`), ``pes``, ``luts_per_mac``.
    """
    from bct.hw.matmul import MatmulArray

    R, C, G = cfg.array_rows, cfg.array_cols, cfg.acc_guard_bits
    pes = R * C
    a = cfg.act_format.bits
    op = max(cfg.weight_format.bits, cfg.act_format.bits)
    bp, acc = cfg.block_product_bits, cfg.acc_bits
    shift_max, bias_shift_max = MatmulArray.limits(cfg)
    sb, bsb = shift_max.bit_length(), bias_shift_max.bit_length()
    ub = (2 * shift_max).bit_length()
    W = bp + G + 1
    vb = cfg.vector_format.bits
    dsp = pes * _dsps_per_mul(a, op, family.removesuffix("-nodsp") if family != "ice40-nodsp"
                              else "none")
    # registers, stage by stage (hw/matmul.py)
    ff_in = R * (a + sb) + 1 + C * (op + sb) + 3 + (cfg.block_size - 1).bit_length()
    ff_in += R * sb + 1 + C * sb + 3  # stage 0: the shift fields and flags move on
    # per PE: its copies of the two operands, operands and product (inside the DSP block when
    # there is one), the product's fabric copy, its copy of the row's activation shift, block
    # product, readout chain (block product and activation shift), accumulator (a ring
    # register), drain register
    ff_mul = 2 * (a + op) + (0 if dsp else (a + op) + (a + op))
    ff_pe = ff_mul + sb + bp + bp + sb + acc + acc
    # per row segment and column (MatmulArray.segments): the column's weight shift (copy and
    # latch), the shifter's four stages, two copies of the coarse amount, the fine amount and
    # its two copies, the ring's clear flag
    segs = MatmulArray.segments(cfg)
    S = max(n for _, n in segs)
    ff_seg = 2 * sb + 4 * W + 2 * (ub - 3) + 3 + 2 * 3 + 1
    ff_ctl = 2 * ((R + C) * sb + 4) + 7
    # block-end delay lines (bl, fl, tl), the next-block-first flag, the ring windows
    ff_ctl += max(4, 2 + S) + 4 + (5 + S) + 1 + len({n for _, n in segs})
    # fan-out copies: five PE flags (a copy per row, then per PE), pop (per PE of the rows
    # that shift) and the drain control state it comes from with its copies of xfer, finish
    # and the returned credit (two per shifting row, each for half the row), the output
    # FIFO's write enable, addresses and level != 0 flag (per column), the bias holding
    # register's enable and load copies (per column, plus one for the row shifts)
    depth = MatmulArray.output_depth(cfg)  # output FIFO rows
    # full, bias_full, zero, one, row and its last-row flag, credits
    state = 5 + (R - 1).bit_length() + depth.bit_length()
    copies = 2 if C > 1 else 1  # per shifting row
    ff_ctl += (5 * (R + pes) + (R - 1) * (C + copies * (state + 3))
               + C * (2 + 2 * (depth - 1).bit_length()) + 2 * (C + 1) + 3)
    bt = vb + G + 2  # the stored bias (qb << G+1) - (qb < 0)
    ff_out = (C * (vb + bsb) + R * bsb                              # bias holding register
              + C * (bt + bsb) + R * bsb                            # bias registers
              + C * (acc + bt + (2 * bias_shift_max).bit_length())  # o1
              + C * (acc + bt + 3) + 2 * C * (acc + bt)             # o2, o3, o4
              + C * acc + 16)                                       # write data, control
    ff = ff_in + pes * ff_pe + len(segs) * C * ff_seg + ff_ctl + ff_out
    levels_coarse = max(ub - 3, 0)
    # per PE: the block product's first-beat multiplexer, the readout chain's load / shift
    # multiplexers, the drain's; per segment and column: the shifter, the ring's adder
    lut_pe = (LUT_PER_BIT["prod"] * bp + LUT_PER_BIT["chain"] * (bp + sb)
              + LUT_PER_BIT["drain"] * acc)
    lut_seg = LUT_PER_BIT["shift"] * W * (levels_coarse + 3) + LUT_PER_BIT["acc"] * acc
    mul_luts = 0 if dsp else MUL_LUT_PER_BIT2 * pes * a * op
    lut = LUT_SCALE[family] * (pes * lut_pe + len(segs) * C * lut_seg
                               + C * (vb + G) * bsb) + mul_luts
    if family.startswith("ice40"):  # no LUT RAM: the output FIFO is registers
        ff += depth * C * acc
    if family == "xc7":
        # Yosys packs the block product's accumulation into the DSP48E1 (PREG), and the
        # output stages' reset-less, enable-free row delay line (4 stages) into SRL16Es
        # (58 SRL16E for the 70 bit-lines of the 2x2: most of them)
        ff -= pes * bp + 4 * C * acc
    return {"pes": pes, "dsp": dsp, "ff": int(ff), "lut": int(round(lut)),
            "luts_per_mac": round(lut / pes, 1)}


def estimate(cfg: Config, family: str = "ecp5", seq_len: int = 128) -> dict:
    """Everything ``bct estimate`` prints: encoder layer cycles and matmul resources (flat)."""
    out = encoder_layer_cycles(cfg, seq_len)
    for k, v in matmul_resources(cfg, family).items():
        out[f"matmul_{k}"] = v
    out["family"] = family
    return out


def _cmd_estimate(args) -> int:
    from bct.cli import config_from_args

    cfg = config_from_args(args)
    print(json.dumps(estimate(cfg, args.family, args.seq_len), indent=1))
    return 0


def register(subparsers, add_config_options) -> None:
    """Add ``bct estimate`` (see :mod:`bct.cli`)."""
    p = subparsers.add_parser(
        "estimate", help="analytic cycles per encoder layer and matmul DSP/LUT/FF (JSON)")
    p.add_argument("--family", default="ecp5",
                   choices=["ice40", "ice40-nodsp", "ecp5", "nexus", "xc7"])
    p.add_argument("--seq-len", type=int, default=128, help="sequence length (default 128)")
    add_config_options(p)
    p.set_defaults(func=_cmd_estimate)
