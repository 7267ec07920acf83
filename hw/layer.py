"""One BERT encoder layer on chip: the units, on-chip memories and a program-driven controller.

:class:`LayerAccelerator` holds

* ``amem``: the activation scratchpad (one word = one activation block: ``B`` mantissas and the
  exponent), two read ports and one write port; every stage of the layer is written to its own
  region (:mod:`bct.hw.program` lays them out);
* ``wmem`` / ``vmem``: weight and vector ROMs, each a mantissa and an exponent ROM initialised
  with ``$readmemh`` from the ``bct quantize`` images (``layer{i}_w_*`` / ``layer{i}_v_*``, one
  layer after the other, :func:`bct.hw.program.check_images`, :func:`rom_verilog`); the
  controller addresses weights in K-blocks of ``block_size`` (a weight word of
  ``weight_block_size`` holds several);
* the :class:`~bct.hw.matmul.MatmulArray` with its operand feeders (double-buffered
  de-blockers: ``R`` activation words and ``C`` operand words per K-block, ``B`` beats out),
  the bias beat and an output gather that re-blocks ``B / C`` tiles of a row into one block;
* a transposing re-blocker for ``V`` (``reblock_transposed``), the
  :class:`~bct.hw.softmax.SoftmaxUnit`, the :class:`~bct.hw.gelu.GeluUnit`, the
  :class:`~bct.hw.layernorm.LayerNormUnit` (identity gamma / beta, the affine with gamma / beta
  read from ``vmem`` is a thin wrapper here), a residual adder, the pool engine (the
  sentence embedding, ``bct.model.integer.mean_pool`` of the last layer's output: exponent
  scan, aligned sum per block, ``B`` restoring dividers by the token count) and one shared
  :class:`~bct.hw.blockify.Blockifier` in front of the write port;
* the controller: it fetches ops from a program ROM (:func:`bct.hw.program.build_program`) and
  runs one op at a time; an op ends when its last output block is written.

On the wide residual path (``cfg.residual_bits``) an ``amem`` word holds a residual-format
block, the residual adds and LayerNorm inputs align as ``bct.model.integer.residual_add`` (by
each block's top bit), the blockifier picks the output format per block, each LayerNorm writes
its output twice (activation copy, residual copy ``..._wide``) and the pool reads the residual
copy (per-op flags from :func:`bct.hw.program.build_program`). With ``cfg.gelu_direct`` an
``mm`` op flagged ``gd`` (FFN1) hands each output block's accumulator lanes and row scale to
the GELU unit (its accumulator input: ``fixed_to_frac`` to ``gelu_frac``) instead of the
blockifier, and the unit's blocks are written to the ``gelu`` region (``gelu_acc``).

Everything that depends on the activations is computed on chip: the row scales of every matmul
(a scan of the row exponents before the op), the largest exponent of ``K`` and ``V`` (the
second operand of the attention matmuls), the masks (from ``seq_len``); only weight-only
constants (the largest exponent of each weight matrix and bias) come with the program.

Ports: ``start`` (pulse), ``seq_len`` (valid tokens, sampled at ``start``), ``busy``, ``done``,
``op_index``, ``cycles`` and ``mac_beats`` (cycles since ``start`` and array beats: the MAC
utilisation is ``mac_beats / cycles``), ``load_*`` (write one activation word while idle) and
``dbg_addr`` / ``dbg_data`` / ``dbg_cycle`` (read a word while idle, one cycle latency, with the
cycle at which it was written).
"""

from __future__ import annotations

from amaranth import Array, Cat, ClockSignal, Const, Instance, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from bct.config import Config, ConfigError
from bct.hw.blockify import Blockifier, round_shift_saturate, shift_code
from bct.hw.gelu import GeluUnit
from bct.hw.layernorm import LayerNormUnit
from bct.hw.matmul import MatmulArray
from bct.hw.program import OPS, Program, weight_ratio, word_widths
from bct.hw.softmax import SoftmaxUnit
from bct.model.blocks import encode
from bct.model.fixed import round_shift_int

__all__ = ["LayerAccelerator", "identity_affine", "rom_verilog"]

def rom_verilog(images: dict, widths: dict) -> str:
    """The image ROMs' Verilog: one module ``bct_rom_<rom>`` per ROM of
    :data:`bct.hw.program.ROMS`, loading each layer's ``bct quantize`` hex file with
    ``$readmemh(file, mem, first, last)`` at start-up; one synchronous read port with enable.

    Parameters
    ----------
    images : dict
        :func:`bct.hw.program.check_images` of the image directory.
    widths : dict
        :func:`bct.hw.program.word_widths`.
    """
    out = ["// bct-gen image ROMs: contents from the bct quantize $readmemh files\n"]
    for rom, parts in images.items():
        depth = sum(n for _, _, n in parts)
        loads = "".join(f'    $readmemh("{path}", mem, {first}, {first + n - 1});\n'
                        for path, first, n in parts)
        out.append(f"""\
module bct_rom_{rom} (
  input wire clk,
  input wire en,
  input wire [{max(1, (depth - 1).bit_length()) - 1}:0] addr,
  output reg [{widths[rom] - 1}:0] data
);
  reg [{widths[rom] - 1}:0] mem [0:{depth - 1}];
  initial begin
{loads}    data = {widths[rom]}'d0;
  end
  always @(posedge clk) if (en) data <= mem[addr];
endmodule
""")
    return "\n".join(out)


def _exp_width(cfg: Config) -> int:
    """Signed width of the controller's exponent arithmetic (row maxima, row scales, shifts):
    a sum of two exponents minus the guard bits needs ``exp_bits + 2`` bits; two more spare."""
    return max(f.exp_bits for f in (cfg.act_format, cfg.weight_format, cfg.vector_format)) + 4

_CYCLE_BITS = 32


def identity_affine(cfg, width):
    """Gamma / beta that make :class:`LayerNormUnit` output the standardised ``y`` itself:
    ``gamma = 2**(ln_frac - ln_out_frac)`` is ``q = 2**(vector_bits - 2)`` with the gamma
    shift ``vector_bits - 2`` (exact), ``beta = 0``. The real gamma / beta are applied by the
    wrapper in :class:`LayerAccelerator` (read from ``vmem``)."""
    import numpy as np
    g = encode(np.full(width, 2.0 ** (cfg.ln_frac - cfg.ln_out_frac)), cfg.vector_format)
    b = encode(np.zeros(width), cfg.vector_format)
    q = 1 << (cfg.vector_bits - 2)
    if not (g.mant == q).all():
        raise ConfigError("cannot encode the identity LayerNorm gamma in the vector format")
    lim = (1 << (cfg.ln_out_bits - 1)) - 1
    if (int((width ** 0.5) * (1 << cfg.ln_frac)) + 1) > lim:
        raise ConfigError(f"LayerNorm output width {cfg.ln_out_bits} bits cannot hold the "
                          f"standardised row of width {width}")
    return g, b


def _min_shift_table(fmt):
    """``sh(a)``: the smallest shift with ``round_shift(a, sh) <= qmax`` for ``0 < a <= qmax``
    (the exponent offset of an already-encoded element, used by the V re-blocker)."""
    out = [0]
    for a in range(1, fmt.qmax + 1):
        out.append(next(s for s in range(-fmt.bits - 1, 2) if round_shift_int(a, s) <= fmt.qmax))
    return out


def _step(m, counters, enable):
    """Advance nested counters (innermost first: ``(signal, limit)``) when ``enable``; returns
    the carry out of the outermost one (all wrapped)."""
    carry = enable
    for sig, lim in counters:
        last = sig == lim - 1
        with m.If(carry):
            m.d.sync += sig.eq(Mux(last, 0, sig + 1))
        carry = carry & last
    return carry


def _lanes(view):
    """The ``B``-lane array field of a unit's stream payload (units name it ``value`` or
    ``data``)."""
    name = next(n for n, f in view.shape() if isinstance(f.shape, data.ArrayLayout))
    return getattr(view, name)


def _sig(m, value, shape, name):
    """``value`` as one named combinational signal (computed once, shared by its users)."""
    sig = Signal(shape, name=name)
    m.d.comb += sig.eq(value)
    return sig


def _clamp(v, lo, hi):
    return Mux(v < lo, lo, Mux(v > hi, hi, v))


def _max(a, b):
    return Mux(a > b, a, b)


class LayerAccelerator(wiring.Component):
    """Encoder layers of a BERT on one matmul array, bit-exact with :mod:`bct.model.integer`.

    Parameters
    ----------
    prog : Program
        From :func:`bct.hw.program.build_program` (memory map, ops, config).
    images : dict
        The checked ``bct quantize`` images (:func:`bct.hw.program.check_images`): their
        paths go into the ROMs' Verilog (:meth:`rom_verilog`), not into the accelerator's.

    Attributes
    ----------
    latency_ops : int
        Number of ops of the program (``op_index`` runs ``0 .. latency_ops``).
    """

    def __init__(self, prog: Program, images: dict):
        cfg = prog.cfg
        self.prog, self.cfg, self.images = prog, cfg, images
        sh = prog.shape
        B = cfg.block_size
        self.T, self.H, self.F = sh.seq, sh.hidden, sh.ffn
        self.widths = word_widths(cfg)
        self.depth = dict(prog.depth)
        self.abits = max(1, (self.depth["amem"] - 1).bit_length())
        self.nops = len(prog.ops)
        self.max_blocks = max(sh.hidden, sh.ffn, sh.seq) // B
        self.max_cols = max(sh.hidden, sh.ffn, sh.seq)
        self.wide = cfg.residual_bits is not None  # the wide residual path
        wide_fields = {"a_res": 1, "b_res": 1, "o_res": 1, "dual": 1,
                       "out2_base": unsigned(self.abits)} if self.wide else {}
        if cfg.gelu_direct:  # an mm op whose accumulator rows go through the GELU unit
            wide_fields["gd"] = 1
        self.op_layout = data.StructLayout({
            "kind": unsigned(3),
            "a_base": unsigned(self.abits), "a_stride": unsigned(8),
            "b_base": unsigned(self.abits), "b_stride": unsigned(8),
            "w_base": unsigned(max(1, (self.depth["wmem"] - 1).bit_length())),
            "v_base": unsigned(max(1, (self.depth["vmem"] - 1).bit_length())),
            "v2_base": unsigned(max(1, (self.depth["vmem"] - 1).bit_length())),
            "w_src": 1, "bias": 1, "mask": 1,
            "ewmax": signed(10), "ebmax": signed(10),
            "rows": unsigned(16), "nbk": unsigned(8), "ncols": unsigned(16),
            "out_base": unsigned(self.abits), "out_stride": unsigned(8),
            **wide_fields,
        })
        super().__init__({
            "start": In(1),
            "seq_len": In(range(sh.seq + 1)),
            "busy": Out(1),
            "done": Out(1),
            "op_index": Out(range(self.nops + 1)),
            "cycles": Out(_CYCLE_BITS),
            "mac_beats": Out(_CYCLE_BITS),
            "load_en": In(1),
            "load_addr": In(self.abits),
            "load_data": In(self.widths["amem"]),
            "dbg_addr": In(self.abits),
            "dbg_data": Out(self.widths["amem"]),
            "dbg_cycle": Out(_CYCLE_BITS),
        })

    def rom_verilog(self) -> str:
        """The Verilog of the image ROMs this accelerator instantiates (:func:`rom_verilog`)."""
        return rom_verilog(self.images, self.widths)

    def program_init(self) -> list[int]:
        fields = set(self.op_layout.members)
        words = []
        for o in self.prog.ops:
            d = {k: (OPS[v] if k == "kind" else v) for k, v in o.items() if k in fields}
            words.append(self.op_layout.const(d).as_value().value)
        return words

    # ------------------------------------------------------------------------------------
    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        B = cfg.block_size
        af, wf, vf = cfg.act_format, cfg.weight_format, cfg.vector_format
        AW = self.widths["amem"]
        alay = data.StructLayout({"mant": data.ArrayLayout(signed(af.bits), B),
                                  "exp": signed(af.exp_bits)})
        wlay = data.StructLayout({"mant": data.ArrayLayout(signed(wf.bits), B),
                                  "exp": signed(wf.exp_bits)})
        vlay = data.StructLayout({"mant": data.ArrayLayout(signed(vf.bits), B),
                                  "exp": signed(vf.exp_bits)})
        KIND = OPS

        # ---------------- memories
        m.submodules.amem = amem = Memory(shape=unsigned(AW), depth=self.depth["amem"], init=[])
        ra, rb, wp = amem.read_port(), amem.read_port(), amem.write_port()
        m.submodules.cmem = cmem = Memory(shape=unsigned(_CYCLE_BITS), depth=self.depth["amem"],
                                          init=[])
        rc, wc = cmem.read_port(), cmem.write_port()
        words_a, words_b = Signal(alay), Signal(alay)
        m.d.comb += [words_a.eq(ra.data), words_b.eq(rb.data)]

        # ROMs from the images; weights addressed in K-blocks: word = addr >> log2(ratio), the
        # K-block inside it = the low bits, registered like the ROM's read data
        ratio = weight_ratio(cfg)
        sub_bits = ratio.bit_length() - 1
        w_addr = Signal(range(self.depth["wmem"]))
        v_addr = Signal(range(self.depth["vmem"]))
        rom = {}
        for name, addr in (("w_mant", w_addr[sub_bits:]), ("w_exp", w_addr[sub_bits:]),
                           ("v_mant", v_addr), ("v_exp", v_addr)):
            rom[name] = Signal(self.widths[name], name=f"{name}_data")
            m.submodules[name] = Instance(
                f"bct_rom_{name}", i_clk=ClockSignal(), i_en=Const(1), i_addr=addr,
                o_data=rom[name])
        w_mant = rom["w_mant"]
        if sub_bits:
            w_sub = Signal(sub_bits)
            m.d.sync += w_sub.eq(w_addr[:sub_bits])
            w_mant = w_mant.word_select(w_sub, B * wf.bits)
        w_data = Cat(w_mant, rom["w_exp"])
        v_data = Cat(rom["v_mant"], rom["v_exp"])
        word_w, word_v = Signal(wlay), Signal(vlay)
        m.d.comb += [word_w.eq(w_data), word_v.eq(v_data)]

        # every input is registered at the boundary (keeps the simulator's input-driven
        # combinational evaluation tiny)
        start, seq_in = Signal(), Signal.like(self.seq_len)
        load_en, load_addr, load_data = Signal(), Signal.like(self.load_addr), Signal(AW)
        dbg_addr = Signal.like(self.dbg_addr)
        m.d.sync += [start.eq(self.start), seq_in.eq(self.seq_len), load_en.eq(self.load_en),
                     load_addr.eq(self.load_addr), load_data.eq(self.load_data),
                     dbg_addr.eq(self.dbg_addr)]

        init = self.program_init()
        m.submodules.prog = pmem = Memory(shape=unsigned(len(Cat(Signal(self.op_layout)))),
                                          depth=len(init), init=init)
        prp = pmem.read_port()

        # ---------------- controller
        op = Signal(self.op_layout)
        pc = Signal(range(self.nops + 1))
        go = Signal()
        finished = Signal()
        seq_len = Signal.like(self.seq_len)
        cycles = Signal(_CYCLE_BITS)
        macs = Signal(_CYCLE_BITS)
        wcount = Signal(24)
        expected = Signal(24)
        running = Signal()
        kind = op.kind
        m.d.comb += [self.cycles.eq(cycles), self.mac_beats.eq(macs), self.op_index.eq(pc),
                     prp.addr.eq(pc)]
        with m.FSM(name="ctrl"):
            with m.State("IDLE"):
                with m.If(start):
                    m.d.sync += [pc.eq(0), cycles.eq(0), macs.eq(0), self.done.eq(0),
                                 seq_len.eq(seq_in), self.busy.eq(1)]
                    m.next = "FETCH"
            with m.State("FETCH"):
                m.d.sync += cycles.eq(cycles + 1)
                m.next = "DECODE"
            with m.State("DECODE"):
                m.d.sync += [cycles.eq(cycles + 1), op.eq(prp.data)]
                m.next = "LAUNCH"
            with m.State("LAUNCH"):
                m.d.sync += [cycles.eq(cycles + 1), wcount.eq(0)]
                with m.Switch(kind):
                    with m.Case(KIND["mm"]):
                        m.d.sync += expected.eq(op.rows * (op.ncols >> (B.bit_length() - 1)))
                    with m.Case(KIND["transpose"]):
                        m.d.sync += expected.eq(B)
                    with m.Default():
                        if self.wide:  # a LayerNorm writing its residual copy: two per block
                            m.d.sync += expected.eq(Mux(op.dual, 2, 1) * op.rows * op.nbk)
                        else:
                            m.d.sync += expected.eq(op.rows * op.nbk)
                with m.If(kind == KIND["end"]):
                    m.d.sync += [self.done.eq(1), self.busy.eq(0)]
                    m.next = "IDLE"
                with m.Else():
                    m.d.comb += go.eq(1)
                    m.next = "RUN"
            with m.State("RUN"):
                m.d.sync += cycles.eq(cycles + 1)
                m.d.comb += [running.eq(1), finished.eq(wcount == expected)]
                with m.If(finished):
                    m.d.sync += pc.eq(pc + 1)
                    m.next = "FETCH"

        is_kind = {k: running & (kind == v) for k, v in KIND.items()}
        start_kind = {k: go & (kind == v) for k, v in KIND.items()}

        # ---------------- shared blockifier and write port
        wide = max(cfg.acc_bits, cfg.add_bits, cfg.ln_out_bits, cfg.softmax_out_frac + 2)
        # on the wide path the output format (activation / residual) is chosen per block
        m.submodules.blk = blk = Blockifier(cfg, wide, _exp_width(cfg), af,
                                            wide=cfg.residual_format if self.wide else None)
        gd = cfg.gelu_direct
        # with gelu_direct the FFN1 blocks' addresses also wait out the GELU unit's 6 stages
        m.submodules.afifo = afifo = SyncFIFO(width=self.abits, depth=8 if gd else 4)
        bk_valid = Signal()
        bk_value = Signal(data.ArrayLayout(signed(wide), B))
        bk_scale = Signal(signed(_exp_width(cfg)))
        bk_addr = Signal(self.abits)
        bk_ready = Signal()
        m.d.comb += [
            bk_ready.eq(blk.i.ready & afifo.w_rdy),
            blk.i.valid.eq(bk_valid & afifo.w_rdy),
            blk.i.payload.value.eq(bk_value), blk.i.payload.scale.eq(bk_scale),
            afifo.w_en.eq(bk_valid & bk_ready), afifo.w_data.eq(bk_addr),
            blk.o.ready.eq(1),
            afifo.r_en.eq(blk.o.valid),
        ]
        bk_wide = None
        blk_word = blk.o.payload
        if self.wide:  # residual-format block: the whole word; activation: the low bits
            bk_wide = Signal()
            bo = blk.o.payload
            m.d.comb += blk.i.payload.wide.eq(bk_wide)
            blk_word = Mux(bo.wide, Cat(bo.mant.as_value(), bo.exp),
                           Cat(*(bo.mant[k][:af.bits] for k in range(B)), bo.exp))
        # write port sources: blockifier, GELU unit, V re-blocker, load port
        m.submodules.gelu = gelu = GeluUnit(
            cfg, acc=(cfg.acc_bits, _exp_width(cfg)) if gd else None)
        tr_we = Signal()
        tr_addr = Signal(self.abits)
        tr_word = Signal(alay)
        g_addr = Signal(self.abits)
        if gd:
            # gelu_direct: an mm op flagged gd hands each output block (accumulator lanes and
            # the row scale, before any blockifier) to the GELU unit instead of the blockifier;
            # its address waits in the same FIFO
            m.d.comb += [gelu.i.payload.scale.eq(bk_scale), gelu.o.ready.eq(1)]
            m.d.comb += [gelu.i.payload.value[k].eq(bk_value[k]) for k in range(B)]
            with m.If(op.gd):
                m.d.comb += [bk_ready.eq(gelu.i.ready & afifo.w_rdy),
                             gelu.i.valid.eq(bk_valid & afifo.w_rdy), blk.i.valid.eq(0),
                             afifo.r_en.eq(gelu.o.valid)]
            g_write, g_addr_sel = is_kind["mm"] & op.gd, afifo.r_data
        else:
            g_write, g_addr_sel = is_kind["gelu"], g_addr
        with m.If(g_write):
            m.d.comb += [wp.en.eq(gelu.o.valid), wp.addr.eq(g_addr_sel),
                         wp.data.eq(gelu.o.payload)]
        with m.Elif(is_kind["transpose"]):
            m.d.comb += [wp.en.eq(tr_we), wp.addr.eq(tr_addr), wp.data.eq(tr_word)]
        with m.Elif(self.busy):
            m.d.comb += [wp.en.eq(blk.o.valid), wp.addr.eq(afifo.r_data),
                         wp.data.eq(blk_word)]
        with m.Else():
            m.d.comb += [wp.en.eq(load_en), wp.addr.eq(load_addr), wp.data.eq(load_data)]
        m.d.comb += [wc.en.eq(wp.en), wc.addr.eq(wp.addr), wc.data.eq(cycles)]
        with m.If(running & wp.en):
            m.d.sync += wcount.eq(wcount + 1)
        # debug read (idle): port A and the cycle memory
        m.d.comb += [self.dbg_data.eq(ra.data), self.dbg_cycle.eq(rc.data),
                     rc.addr.eq(dbg_addr)]
        with m.If(~self.busy):
            m.d.comb += ra.addr.eq(dbg_addr)

        self._matmul(m, op, go, start_kind["mm"], is_kind["mm"], ra, rb, words_a, words_b,
                     word_w, word_v, w_addr, v_addr, bk_valid, bk_value, bk_scale, bk_addr,
                     bk_ready, seq_len, macs)
        self._transpose(m, op, start_kind["transpose"], is_kind["transpose"], ra, words_a,
                        tr_we, tr_addr, tr_word)
        self._rows(m, op, go, is_kind, start_kind, ra, rb, words_a, words_b, word_v, v_addr,
                   gelu, g_addr, bk_valid, bk_value, bk_scale, bk_addr, bk_ready, seq_len,
                   bk_wide)
        self._pool(m, op, start_kind["pool"], is_kind["pool"], ra, words_a, bk_valid, bk_value,
                   bk_scale, bk_addr, bk_ready, seq_len, bk_wide)
        return m

    # ------------------------------------------------------------------------------------
    def _matmul(self, m, op, go, start, active, ra, rb, wa, wb, ww, wv, w_addr, v_addr,
                bk_valid, bk_value, bk_scale, bk_addr, bk_ready, seq_len, macs):
        cfg = self.cfg
        B, R, C, G = cfg.block_size, cfg.array_rows, cfg.array_cols, cfg.acc_guard_bits
        T, NB, NC = self.T, self.max_blocks, self.max_cols
        af = cfg.act_format
        m.submodules.array = arr = MatmulArray(cfg)
        smax, bmax = arr.shift_max, arr.bias_shift_max
        opb = max(cfg.weight_format.bits, af.bits)
        EB = _exp_width(cfg)

        phase = Signal(range(4))  # 0 idle, 1 scan, 2 scales, 3 run
        rowmax = [Signal(signed(EB), name=f"rowmax{t}") for t in range(T)]
        scale = [Signal(signed(EB), name=f"scale{t}") for t in range(T)]
        scale_a = Array(scale)
        ewrt = Signal(signed(EB))
        ew = Signal(signed(EB))
        with m.If(start):
            m.d.sync += phase.eq(1)

        # ---- scan: row maxima of x's exponents (port A), max exponent of an activation w (B)
        sx_m, sx_j = Signal(range(T + 1)), Signal(range(NB + 1))
        sw_n, sw_j = Signal(range(NC + 1)), Signal(range(NB + 1))
        sx_busy, sw_busy, sx_v, sw_v = Signal(), Signal(), Signal(), Signal()
        sx_m_d, sx_j_d, sw_first = Signal.like(sx_m), Signal.like(sx_j), Signal()
        with m.If(start):
            m.d.sync += [sx_m.eq(0), sx_j.eq(0), sw_n.eq(0), sw_j.eq(0), sx_busy.eq(1),
                         sw_busy.eq(op.w_src), sw_first.eq(1)]
        scanning = active & (phase == 1)
        with m.If(scanning):
            m.d.comb += [ra.addr.eq(op.a_base + sx_m * op.a_stride + sx_j),
                         rb.addr.eq(op.b_base + sw_n * op.b_stride + sw_j)]
            m.d.sync += [sx_v.eq(sx_busy), sx_m_d.eq(sx_m), sx_j_d.eq(sx_j), sw_v.eq(sw_busy)]
            with m.If(_step(m, [(sx_j, op.nbk), (sx_m, op.rows)], sx_busy)):
                m.d.sync += sx_busy.eq(0)
            with m.If(_step(m, [(sw_j, op.nbk), (sw_n, op.ncols)], sw_busy)):
                m.d.sync += sw_busy.eq(0)
            with m.If(sx_v):
                for t in range(T):
                    with m.If(sx_m_d == t):
                        m.d.sync += rowmax[t].eq(Mux(sx_j_d == 0, wa.exp, _max(rowmax[t], wa.exp)))
            with m.If(sw_v):
                m.d.sync += [ewrt.eq(Mux(sw_first, wb.exp, _max(ewrt, wb.exp))), sw_first.eq(0)]
            with m.If(~sx_busy & ~sw_busy & ~sx_v & ~sw_v):
                m.d.sync += phase.eq(2)
        # ---- scales
        ew_now = Mux(op.w_src, ewrt, op.ewmax)
        with m.If(active & (phase == 2)):
            m.d.sync += [phase.eq(3), ew.eq(ew_now)]
            for t in range(T):
                top = rowmax[t] + ew_now
                m.d.sync += scale[t].eq(Mux(op.bias, _max(top, op.ebmax), top) - G)
        run = active & (phase == 3)
        run_start = Signal()
        m.d.comb += run_start.eq(active & (phase == 2))

        # ---- operand feeders
        def feeder(lanes, lane_bits, name):
            ist = {k: Signal(range(lim + 1), name=f"{name}_{k}") for k, lim in
                   (("l", lanes), ("j", NB), ("nt", NC // C), ("mt", T // R))}
            busy = Signal(name=f"{name}_busy")
            issued, cnt = Signal(range(lanes + 1)), Signal(range(lanes + 1))
            fbuf = [Signal(B * lane_bits, name=f"{name}_f{k}") for k in range(lanes)]
            fsh = [Signal(range(smax + 1), name=f"{name}_fs{k}") for k in range(lanes)]
            flast = Signal()
            sbuf = [Signal(B * lane_bits, name=f"{name}_s{k}") for k in range(lanes)]
            ssh = [Signal(range(smax + 1), name=f"{name}_ss{k}") for k in range(lanes)]
            svalid, slast = Signal(name=f"{name}_svalid"), Signal()
            sk = Signal(range(B))
            rv, rl, rrow, rlastj = Signal(), Signal(range(lanes)), Signal(range(NC + 1)), Signal()
            with m.If(run_start):
                m.d.sync += [busy.eq(1), issued.eq(0), cnt.eq(0), svalid.eq(0), sk.eq(0)]
                m.d.sync += [s.eq(0) for s in ist.values()]
            issue = Signal(name=f"{name}_issue")
            m.d.comb += issue.eq(run & busy & (issued < lanes))
            m.d.sync += rv.eq(issue)
            with m.If(issue):
                m.d.sync += [issued.eq(issued + 1), rl.eq(ist["l"]),
                             rlastj.eq(ist["j"] == op.nbk - 1)]
                done = _step(m, [(ist["l"], lanes), (ist["j"], op.nbk),
                                 (ist["nt"], op.ncols // C), (ist["mt"], op.rows // R)], 1)
                with m.If(done):
                    m.d.sync += busy.eq(0)
            take = Signal(name=f"{name}_take")
            free = ~svalid | (take & (sk == B - 1))
            return dict(ist=ist, issue=issue, rv=rv, rl=rl, rrow=rrow, rlastj=rlastj,
                        fbuf=fbuf, fsh=fsh, flast=flast, cnt=cnt, issued=issued, sbuf=sbuf,
                        ssh=ssh, svalid=svalid, slast=slast, sk=sk, take=take, free=free,
                        lane_bits=lane_bits, lanes=lanes)

        def land_and_stream(f, mant_bits, shift_of):
            lanes, lb = f["lanes"], f["lane_bits"]
            with m.If(f["rv"]):
                for k in range(lanes):
                    with m.If(f["rl"] == k):
                        m.d.sync += [f["fbuf"][k].eq(mant_bits), f["fsh"][k].eq(shift_of)]
                m.d.sync += [f["cnt"].eq(f["cnt"] + 1), f["flast"].eq(f["rlastj"])]
            with m.If(f["take"]):
                m.d.sync += f["sk"].eq(f["sk"] + 1)
                m.d.sync += [s.eq(s >> lb) for s in f["sbuf"]]
                with m.If(f["sk"] == B - 1):
                    m.d.sync += f["svalid"].eq(0)
            with m.If(run & (f["cnt"] == lanes) & f["free"]):
                m.d.sync += [f["svalid"].eq(1), f["sk"].eq(0), f["slast"].eq(f["flast"]),
                             f["issued"].eq(0), f["cnt"].eq(0)]
                m.d.sync += [s.eq(x) for s, x in zip(f["sbuf"], f["fbuf"])]
                m.d.sync += [s.eq(x) for s, x in zip(f["ssh"], f["fsh"])]

        fa = feeder(R, af.bits, "fa")
        fw = feeder(C, opb, "fw")
        ia, iw = fa["ist"], fw["ist"]
        arow = ia["mt"] * R + ia["l"]
        with m.If(fa["issue"]):
            m.d.comb += ra.addr.eq(op.a_base + arow * op.a_stride + ia["j"])
            m.d.sync += fa["rrow"].eq(arow)
        wrow = iw["nt"] * C + iw["l"]
        with m.If(fw["issue"]):
            m.d.comb += [rb.addr.eq(op.b_base + wrow * op.b_stride + iw["j"]),
                         w_addr.eq(op.w_base + wrow * op.nbk + iw["j"])]
        a_shift = _sig(m, scale_a[fa["rrow"]] - wa.exp - ew + G, signed(EB + 2), "a_shift")
        land_and_stream(fa, wa.mant.as_value(), _clamp(a_shift, 0, smax))
        # the second operand: weights (wmem) or activations (amem port B), as operand lanes
        wsel = Signal(data.ArrayLayout(signed(opb), B))
        wexp = Signal(signed(EB))
        with m.If(op.w_src):
            m.d.comb += [wsel[k].eq(wb.mant[k]) for k in range(B)]
            m.d.comb += wexp.eq(wb.exp)
        with m.Else():
            m.d.comb += [wsel[k].eq(ww.mant[k]) for k in range(B)]
            m.d.comb += wexp.eq(ww.exp)
        land_and_stream(fw, wsel.as_value(), _clamp(_sig(m, ew - wexp, signed(EB + 1), "w_shift"),
                                                    0, smax))

        ap, wpay = arr.act.payload, arr.weight.payload
        m.d.comb += [arr.act.valid.eq(fa["svalid"] & run), arr.weight.valid.eq(fw["svalid"] & run),
                     fa["take"].eq(arr.act.valid & arr.act.ready),
                     fw["take"].eq(arr.weight.valid & arr.weight.ready),
                     ap.last.eq(fa["slast"] & (fa["sk"] == B - 1))]
        for k in range(R):
            m.d.comb += [ap.x[k].eq(fa["sbuf"][k][:af.bits]), ap.shift[k].eq(fa["ssh"][k])]
        for k in range(C):
            m.d.comb += [wpay.w[k].eq(fw["sbuf"][k][:opb]), wpay.shift[k].eq(fw["ssh"][k])]
        with m.If(fa["take"]):
            m.d.sync += macs.eq(macs + 1)

        # ---- bias beat, one per tile
        b_nt, b_mt = Signal(range(NC // C + 1)), Signal(range(T // R + 1))
        b_busy, b_pend, b_valid = Signal(), Signal(), Signal()
        b_off, b_mtd = Signal(range(B)), Signal.like(b_mt)
        with m.If(run_start):
            m.d.sync += [b_nt.eq(0), b_mt.eq(0), b_busy.eq(1), b_pend.eq(0), b_valid.eq(0)]
        b_issue = run & b_busy & ~b_pend & ~b_valid
        with m.If(b_issue):
            m.d.comb += v_addr.eq(op.v_base + ((b_nt * C) >> (B.bit_length() - 1)))
            m.d.sync += [b_pend.eq(1), b_off.eq((b_nt * C)[:B.bit_length() - 1] if B > 1 else 0),
                         b_mtd.eq(b_mt)]
            with m.If(_step(m, [(b_nt, op.ncols // C), (b_mt, op.rows // R)], 1)):
                m.d.sync += b_busy.eq(0)
        bp = arr.bias.payload
        b_word = Signal(bp.shape())
        with m.If(b_pend):
            m.d.sync += [b_pend.eq(0), b_valid.eq(1)]
            lanes = Array([wv.mant[k] for k in range(B)])
            bcs = _sig(m, op.ebmax - wv.exp, signed(EB), "bcs")
            for c in range(C):
                m.d.sync += [b_word.b[c].eq(Mux(op.bias, lanes[b_off + c], 0)),
                             b_word.col_shift[c].eq(Mux(op.bias, _clamp(bcs, 0, bmax), 0))]
            for r in range(R):
                rs = _sig(m, scale_a[b_mtd * R + r] - op.ebmax + G, signed(EB + 2), f"brs{r}")
                m.d.sync += b_word.row_shift[r].eq(Mux(op.bias, _clamp(rs, 0, bmax), 0))
        with m.If(arr.bias.valid & arr.bias.ready):
            m.d.sync += b_valid.eq(0)
        m.d.comb += [arr.bias.valid.eq(b_valid & run), bp.eq(b_word)]

        # ---- output gather: B / C tiles of a row make one block
        per = B // C
        o_r, o_ct = Signal(range(R)), Signal(range(per))
        o_nbo, o_mt = Signal(range(NB + 1)), Signal(range(T // R + 1))
        with m.If(run_start):
            m.d.sync += [o_r.eq(0), o_ct.eq(0), o_nbo.eq(0), o_mt.eq(0)]
        gbuf = [[Signal(signed(cfg.acc_bits), name=f"g{r}_{k}") for k in range(B - C)]
                for r in range(R)]
        out = arr.out
        last_ct = o_ct == per - 1
        o_take = Signal()
        m.d.comb += o_take.eq(out.valid & out.ready)
        with m.If(run & ~last_ct):
            m.d.comb += out.ready.eq(1)
        with m.If(run & last_ct):
            m.d.comb += [bk_valid.eq(out.valid), out.ready.eq(bk_ready)]
        with m.If(o_take & ~last_ct):
            for r in range(R):
                for ct in range(per - 1):
                    with m.If((o_r == r) & (o_ct == ct)):
                        m.d.sync += [gbuf[r][ct * C + c].eq(out.payload[c]) for c in range(C)]
        grow = Array([Cat(*gbuf[r]) for r in range(R)])[o_r] if per > 1 else None
        orow = o_mt * R + o_r
        with m.If(active):
            for k in range(B):
                v = (grow.word_select(k, cfg.acc_bits).as_signed() if k < B - C
                     else out.payload[k - (B - C)])
                masked = op.mask & ((o_nbo * B + k) >= seq_len)
                m.d.comb += bk_value[k].eq(Mux(masked, 0, v))
            m.d.comb += [bk_scale.eq(scale_a[orow]),
                         bk_addr.eq(op.out_base + orow * op.out_stride + o_nbo)]
        with m.If(o_take):
            with m.If(o_r == R - 1):
                m.d.sync += o_r.eq(0)
                with m.If(last_ct):
                    m.d.sync += o_ct.eq(0)
                    with m.If(o_nbo == (op.ncols >> (B.bit_length() - 1)) - 1):
                        m.d.sync += [o_nbo.eq(0), o_mt.eq(o_mt + 1)]
                    with m.Else():
                        m.d.sync += o_nbo.eq(o_nbo + 1)
                with m.Else():
                    m.d.sync += o_ct.eq(o_ct + 1)
            with m.Else():
                m.d.sync += o_r.eq(o_r + 1)

    # ------------------------------------------------------------------------------------
    def _transpose(self, m, op, start, active, ra, wa, we, waddr, word):
        """``reblock_transposed`` of one ``B x B`` tile of V: ``B`` token words in, ``B`` dim
        words out (blocked along tokens)."""
        cfg = self.cfg
        af = cfg.act_format
        B = cfg.block_size
        EB = _exp_width(cfg)
        # sh(a) = bitlen(a) - bitlen(qmax) for 0 < a <= qmax (checked against the definition)
        qb = af.qmax.bit_length()
        table = _min_shift_table(af)
        assert all(table[a] == a.bit_length() - qb for a in range(1, af.qmax + 1))
        phase = Signal(range(3))
        t, t_d, tv = Signal(range(B + 1)), Signal(range(B)), Signal()
        tm = [Signal(B * af.bits, name=f"tm{k}") for k in range(B)]
        sx = [Signal(signed(af.exp_bits), name=f"tsx{k}") for k in range(B)]
        emax = [Signal(signed(EB), name=f"temax{k}") for k in range(B)]
        i = Signal(range(B + 1))
        with m.If(start):
            m.d.sync += [phase.eq(1), t.eq(0), i.eq(0)]
        loading = active & (phase == 1)
        with m.If(loading):
            m.d.comb += ra.addr.eq(op.a_base + t * op.a_stride)
            m.d.sync += [tv.eq(t < B), t_d.eq(t)]
            with m.If(t < B):
                m.d.sync += t.eq(t + 1)
            with m.If(tv):
                for k in range(B):
                    with m.If(t_d == k):
                        m.d.sync += [tm[k].eq(wa.mant.as_value()), sx[k].eq(wa.exp)]
                for lane in range(B):
                    v = wa.mant[lane]
                    mag = _sig(m, Mux(v < 0, -v, v)[:qb], unsigned(qb), f"tmag{lane}")
                    msh = Signal(signed(qb.bit_length() + 1), name=f"tmsh{lane}")
                    for bit in range(qb):
                        with m.If(mag[bit]):
                            m.d.comb += msh.eq(bit + 1 - qb)
                    cand = _sig(m, Mux(v == 0, af.e_min, wa.exp + msh), signed(EB),
                                f"tcand{lane}")
                    m.d.sync += emax[lane].eq(Mux(t_d == 0, cand, _max(emax[lane], cand)))
                with m.If(t_d == B - 1):
                    m.d.sync += phase.eq(2)
        emitting = active & (phase == 2) & (i < B)
        e_i = _clamp(emax[0], af.e_min, af.e_max)
        m.d.comb += [we.eq(emitting), waddr.eq(op.out_base + i * op.out_stride),
                     word.exp.eq(e_i)]
        ml, mr = af.qmax.bit_length(), af.bits + 1
        for k in range(B):
            code = shift_code(m, e_i - sx[k], ml, mr)
            q = round_shift_saturate(m, tm[k][:af.bits].as_signed(), code, ml, af.qmax)
            m.d.comb += word.mant[k].eq(q)
        with m.If(emitting):
            m.d.sync += i.eq(i + 1)
            m.d.sync += [s.eq(s >> af.bits) for s in tm]
            m.d.sync += [emax[k].eq(emax[k + 1]) for k in range(B - 1)]

    # ------------------------------------------------------------------------------------
    def _rows(self, m, op, go, is_kind, start_kind, ra, rb, wa, wb, wv, v_addr, gelu, g_addr,
              bk_valid, bk_value, bk_scale, bk_addr, bk_ready, seq_len, bk_wide=None):
        """Row-streaming ops: softmax, GELU, residual add, LayerNorm (two passes per row:
        exponent scan, then the aligned values).

        On the wide residual path (``bk_wide``: the blockifier's per-block format select) the
        residual add and LayerNorm's input are ``bct.model.integer.residual_add``: an operand
        flagged ``a_res`` / ``b_res`` is read as a residual-format block, the scan takes each
        block's top bit ``e + (bits - act_bits)``, the alignment keeps ``residual_guard_bits``
        above a residual block at the top; the sum is written in the residual format
        (``o_res``), and a LayerNorm flagged ``dual`` hands each output block to the
        blockifier twice: the activation copy to ``out_base``, the residual copy to
        ``out2_base``."""
        cfg = self.cfg
        B, G = cfg.block_size, cfg.acc_guard_bits
        af, vf = cfg.act_format, cfg.vector_format
        T, NB = self.T, self.max_blocks
        EB = _exp_width(cfg)
        AW = self.widths["amem"]
        rowop = is_kind["softmax"] | is_kind["gelu"] | is_kind["add"] | is_kind["ln"]
        two = is_kind["add"] | is_kind["ln"]

        # ---- LayerNorm gamma / beta preload
        nbh = self.H // B
        gam = [Signal(data.ArrayLayout(signed(vf.bits), B), name=f"gam{k}") for k in range(nbh)]
        bet = [Signal(data.ArrayLayout(signed(vf.bits), B), name=f"bet{k}") for k in range(nbh)]
        gex = [Signal(signed(vf.exp_bits), name=f"gex{k}") for k in range(nbh)]
        bex = [Signal(signed(vf.exp_bits), name=f"bex{k}") for k in range(nbh)]
        pl, pl_d, pl_v = Signal(range(2 * nbh + 1)), Signal(range(2 * nbh + 1)), Signal()
        with m.If(go):
            m.d.sync += pl.eq(0)
        pre_busy = is_kind["ln"] & (pl < 2 * nbh)
        pre_done = Signal()
        m.d.comb += pre_done.eq(~is_kind["ln"] | ((pl == 2 * nbh) & ~pl_v))
        with m.If(is_kind["ln"]):
            m.d.comb += v_addr.eq(Mux(pl < nbh, op.v_base + pl, op.v2_base + pl - nbh))
            m.d.sync += [pl_v.eq(pre_busy), pl_d.eq(pl)]
            with m.If(pre_busy):
                m.d.sync += pl.eq(pl + 1)
            with m.If(pl_v):
                for k in range(nbh):
                    with m.If(pl_d == k):
                        m.d.sync += [gam[k].eq(wv.mant), gex[k].eq(wv.exp)]
                    with m.If(pl_d == nbh + k):
                        m.d.sync += [bet[k].eq(wv.mant), bex[k].eq(wv.exp)]

        # ---- reader: (row, pass, block) -> FIFO of (word A, word B, meta)
        depth = 4
        meta = data.StructLayout({"pass1": 1, "first": 1, "last": 1, "j": range(NB + 1)})
        m.submodules.rfifo = rf = SyncFIFO(width=2 * AW + len(Cat(Signal(meta))), depth=depth)
        r_row, r_pass, r_j = Signal(range(T * 64 + 1)), Signal(), Signal(range(NB + 1))
        r_busy, r_v = Signal(), Signal()
        r_meta, r_meta_d = Signal(meta), Signal(meta)
        with m.If(go):
            m.d.sync += [r_row.eq(0), r_pass.eq(0), r_j.eq(0), r_busy.eq(1), r_v.eq(0)]
        issue = rowop & r_busy & pre_done & ((rf.level + r_v) < depth)
        with m.If(issue):
            m.d.comb += [ra.addr.eq(op.a_base + r_row * op.a_stride + r_j),
                         rb.addr.eq(op.b_base + r_row * op.b_stride + r_j)]
            m.d.comb += [r_meta.pass1.eq(r_pass | ~two), r_meta.first.eq(r_j == 0),
                         r_meta.last.eq(r_j == op.nbk - 1), r_meta.j.eq(r_j)]
            with m.If(r_j == op.nbk - 1):
                m.d.sync += r_j.eq(0)
                with m.If(two & ~r_pass):
                    m.d.sync += r_pass.eq(1)
                with m.Else():
                    m.d.sync += r_pass.eq(0)
                    with m.If(r_row == op.rows - 1):
                        m.d.sync += r_busy.eq(0)
                    m.d.sync += r_row.eq(r_row + 1)
            with m.Else():
                m.d.sync += r_j.eq(r_j + 1)
        m.d.sync += [r_v.eq(issue), r_meta_d.eq(r_meta)]
        m.d.comb += [rf.w_en.eq(r_v), rf.w_data.eq(Cat(ra.data, rb.data, r_meta_d))]
        alay = data.StructLayout({"mant": data.ArrayLayout(signed(af.bits), B),
                                  "exp": signed(af.exp_bits)})
        xa, xb, xm = Signal(alay), Signal(alay), Signal(meta)
        m.d.comb += [xa.eq(rf.r_data[:AW]), xb.eq(rf.r_data[AW:2 * AW]), xm.eq(rf.r_data[2 * AW:])]
        if self.wide:  # the same words read as residual-format blocks
            rfmt = cfg.residual_format
            rlay = data.StructLayout({"mant": data.ArrayLayout(signed(rfmt.bits), B),
                                      "exp": signed(rfmt.exp_bits)})
            xa_r, xb_r = Signal(rlay, name="xa_res"), Signal(rlay, name="xb_res")
            m.d.comb += [xa_r.eq(rf.r_data[:AW]), xb_r.eq(rf.r_data[AW:2 * AW])]

        # output counters (row, block) for softmax / GELU / LayerNorm outputs and the adder
        o_row, o_j = Signal(range(T * 64 + 1)), Signal(range(NB + 1))
        with m.If(go):
            m.d.sync += [o_row.eq(0), o_j.eq(0)]
        o_adv = Signal()
        with m.If(o_adv):
            with m.If(o_j == op.nbk - 1):
                m.d.sync += [o_j.eq(0), o_row.eq(o_row + 1)]
            with m.Else():
                m.d.sync += o_j.eq(o_j + 1)
        o_addr = op.out_base + o_row * op.out_stride + o_j

        # ---- softmax
        m.submodules.softmax = sm = SoftmaxUnit(cfg, max_len=T)
        with m.If(is_kind["softmax"]):
            m.d.comb += [sm.i.valid.eq(rf.r_rdy), rf.r_en.eq(sm.i.ready),
                         sm.i.payload.block.eq(xa), sm.i.payload.last.eq(xm.last)]
            # the key mask: lane k of block j is key j*B + k (block j counted on the reader side)
            m.d.comb += [sm.i.payload.mask[k].eq((xm.j * B + k) < seq_len) for k in range(B)]
            m.d.comb += [bk_valid.eq(sm.o.valid), sm.o.ready.eq(bk_ready),
                         bk_scale.eq(-cfg.softmax_out_frac), bk_addr.eq(o_addr),
                         o_adv.eq(sm.o.valid & bk_ready)]
            m.d.comb += [bk_value[k].eq(sm.o.payload.p[k]) for k in range(B)]

        # ---- GELU (with gelu_direct the FFN1 mm op feeds the unit instead, see elaborate)
        if not cfg.gelu_direct:
            with m.If(is_kind["gelu"]):
                m.d.comb += [gelu.i.valid.eq(rf.r_rdy), rf.r_en.eq(gelu.i.ready),
                             gelu.i.payload.eq(xa), gelu.o.ready.eq(1), g_addr.eq(o_addr),
                             o_adv.eq(gelu.o.valid)]

        # ---- residual add and LayerNorm input: pass 0 scans the exponents, pass 1 aligns
        rmax = Signal(signed(EB))
        if self.wide:
            # each operand as R-bit lanes, its exponent and its top bit e + (bits - act_bits)
            def operand(x, xr, res, name):
                lanes = [_sig(m, Mux(res, xr.mant[k], x.mant[k]), signed(rfmt.bits),
                              f"{name}_lane{k}") for k in range(B)]
                e = _sig(m, Mux(res, xr.exp, x.exp), signed(rfmt.exp_bits), f"{name}_exp")
                top = _sig(m, e + Mux(res, rfmt.bits - af.bits, 0), signed(EB), f"{name}_top")
                return lanes, e, top
            oa, ob = operand(xa, xa_r, op.a_res, "ra"), operand(xb, xb_r, op.b_res, "rb")
            escan = Mux(is_kind["add"], _max(oa[2], ob[2]), oa[2])
        else:
            escan = Mux(is_kind["add"], _max(xa.exp, xb.exp), xa.exp)
        with m.If(two & rf.r_rdy & ~xm.pass1):
            m.d.comb += rf.r_en.eq(1)
            m.d.sync += rmax.eq(Mux(xm.first, escan, _max(rmax, escan)))
        rscale = rmax - G
        if self.wide:
            # shifts >= -G for an activation term and >= -residual_guard_bits for a residual
            # one (the scale is below every top bit by G): one left clamp G is exact, and the
            # saturation bound is the larger of the two terms' bounds (never reached)
            ml, mr = G, rfmt.bits + 1
            lim = max(af.qmax << G, rfmt.qmax << cfg.residual_guard_bits)

            def aligned(o):
                lanes, e, _ = o
                code = shift_code(m, rscale - e, ml, mr)
                return [round_shift_saturate(m, lanes[k], code, ml, lim) for k in range(B)]
            va, vb = aligned(oa), aligned(ob)
        else:
            ml, mr = G, af.bits + 1
            lim = af.qmax << G

            def aligned(x):
                code = shift_code(m, rscale - x.exp, ml, mr)
                return [round_shift_saturate(m, x.mant[k], code, ml, lim) for k in range(B)]
            va, vb = aligned(xa), aligned(xb)
        with m.If(is_kind["add"] & xm.pass1):
            m.d.comb += [bk_valid.eq(rf.r_rdy), rf.r_en.eq(bk_ready), bk_scale.eq(rscale),
                         bk_addr.eq(o_addr), o_adv.eq(rf.r_rdy & bk_ready)]
            m.d.comb += [bk_value[k].eq(va[k] + vb[k]) for k in range(B)]
            if self.wide:
                m.d.comb += bk_wide.eq(op.o_res)

        gi, go_ = identity_affine(cfg, self.H)
        m.submodules.ln = ln = LayerNormUnit(cfg, self.H, gi, go_)
        with m.If(is_kind["ln"] & xm.pass1):
            m.d.comb += [ln.i.valid.eq(rf.r_rdy), rf.r_en.eq(ln.i.ready),
                         ln.i.payload.scale.eq(rscale), ln.i.payload.last.eq(xm.last)]
            m.d.comb += [_lanes(ln.i.payload)[k].eq(va[k]) for k in range(B)]
        # affine with gamma / beta from vmem (layernorm_affine), then the blockifier
        lo_lim = (1 << (cfg.ln_out_bits - 1)) - 1
        floor_ = cfg.ln_out_bits + 1
        vlanes = data.ArrayLayout(signed(vf.bits), B)
        g_sel = _sig(m, Array(gam)[o_j], vlanes, "ln_gamma")
        b_sel = _sig(m, Array(bet)[o_j], vlanes, "ln_beta")
        ge = _sig(m, Array(gex)[o_j], signed(vf.exp_bits), "ln_gexp")
        be = _sig(m, Array(bex)[o_j], signed(vf.exp_bits), "ln_bexp")
        gcode = shift_code(m, cfg.ln_frac - cfg.ln_out_frac - ge, floor_,
                           cfg.ln_out_bits + vf.bits + 1)
        bcode = shift_code(m, -(be + cfg.ln_out_frac), floor_, vf.bits + 1)
        with m.If(is_kind["ln"]):
            m.d.comb += [bk_valid.eq(ln.o.valid), ln.o.ready.eq(bk_ready),
                         bk_scale.eq(-cfg.ln_out_frac), bk_addr.eq(o_addr),
                         o_adv.eq(ln.o.valid & bk_ready)]
            for k in range(B):
                prod = Signal(signed(cfg.ln_out_bits + vf.bits), name=f"lnp{k}")
                m.d.comb += prod.eq(_lanes(ln.o.payload)[k] * g_sel[k])
                gk = round_shift_saturate(m, prod, gcode, floor_, lo_lim)
                bk = round_shift_saturate(m, b_sel[k], bcode, floor_, 2 * lo_lim)
                m.d.comb += bk_value[k].eq(_clamp(gk + bk, -lo_lim, lo_lim))
            if self.wide:  # dual: the same block again, to the residual copy
                second = Signal(name="ln_second")
                with m.If(op.dual):
                    m.d.comb += [ln.o.ready.eq(bk_ready & second), bk_wide.eq(second),
                                 o_adv.eq(ln.o.valid & bk_ready & second)]
                    with m.If(second):
                        m.d.comb += bk_addr.eq(op.out2_base + o_row * op.out_stride + o_j)
                    with m.If(ln.o.valid & bk_ready):
                        m.d.sync += second.eq(~second)

    # ------------------------------------------------------------------------------------
    def _pool(self, m, op, start, active, ra, wa, bk_valid, bk_value, bk_scale, bk_addr,
              bk_ready, seq_len, bk_wide=None):
        """The sentence embedding (``bct.model.integer.mean_pool``): the masked mean over the
        ``seq_len`` valid tokens of ``op.nbk`` blocks per row, one output row (on the wide
        residual path, ``bk_wide``: of residual-format blocks when ``op.a_res``, written in the
        residual format when ``op.o_res``).

        Four phases: scan the largest exponent of the valid rows (port A, one word a cycle);
        per output block, sum the valid tokens' blocks aligned to that exponent minus the guard
        bits (the residual adder's rounding shifters), divide the ``B`` sums by the token
        count (``B`` restoring dividers, one quotient bit a cycle, then the RHAZ correction
        ``2 * remainder >= count`` of :func:`bct.model.fixed.round_div`), hand the block to the
        shared blockifier with the scale."""
        cfg = self.cfg
        B, G = cfg.block_size, cfg.acc_guard_bits
        af = cfg.act_format
        T, NB = self.T, self.max_blocks
        EB = _exp_width(cfg)
        if bk_wide is not None:  # the operand's blocks as activation or residual format
            rfmt = cfg.residual_format
            wr = Signal(data.StructLayout({"mant": data.ArrayLayout(signed(rfmt.bits), B),
                                           "exp": signed(rfmt.exp_bits)}), name="pl_wres")
            m.d.comb += wr.eq(ra.data)
            lanes = [_sig(m, Mux(op.a_res, wr.mant[k], wa.mant[k]), signed(rfmt.bits),
                          f"pl_lane{k}") for k in range(B)]
            wexp = _sig(m, Mux(op.a_res, wr.exp, wa.exp), signed(rfmt.exp_bits), "pl_exp")
            lane_bits = rfmt.bits
        else:
            lanes, wexp, lane_bits = [wa.mant[k] for k in range(B)], wa.exp, af.bits
        qmax = (1 << (lane_bits - 1)) - 1
        lim = qmax << G                           # |aligned term| <= qmax * 2**G
        NW = (lim * T).bit_length()               # magnitude bits of a sum over <= T tokens
        DW = T.bit_length()                       # the count, 1 .. T
        wide = len(bk_value[0])
        if lim.bit_length() + 1 > wide:
            raise ConfigError(f"the blockifier's {wide}-bit lanes cannot hold a pooled value "
                              f"of {lim.bit_length() + 1} bits")
        phase = Signal(range(5), name="pl_phase")  # 0 idle, 1 scan, 2 sum, 3 divide, 4 emit
        t, j = Signal(range(T + 1), name="pl_t"), Signal(range(NB + 1), name="pl_j")
        rv, rfirst, rlast = Signal(name="pl_rv"), Signal(name="pl_rfirst"), Signal(name="pl_rlast")
        emax = Signal(signed(EB), name="pl_emax")
        ntok = Signal(range(T + 1), name="pl_ntok")  # rows read: max(seq_len, 1)
        none = Signal(name="pl_none")                 # seq_len == 0: every term masked
        acc = [Signal(signed(NW + 1), name=f"pl_acc{k}") for k in range(B)]
        neg = Signal(B, name="pl_neg")
        rem = [Signal(DW + 1, name=f"pl_rem{k}") for k in range(B)]
        step = Signal(range(NW + 1), name="pl_step")
        with m.If(start):
            m.d.sync += [phase.eq(1), t.eq(0), j.eq(0), rv.eq(0),
                         ntok.eq(Mux(seq_len == 0, 1, seq_len)), none.eq(seq_len == 0)]
        last_t = t == ntok - 1
        # ---- reads (scan: every valid word, tokens outer; sum: block j's tokens)
        issue = Signal(name="pl_issue")
        m.d.comb += issue.eq(active & ((phase == 1) | (phase == 2)) & (t < ntok))
        m.d.sync += rv.eq(issue)
        with m.If(issue):
            m.d.comb += ra.addr.eq(op.a_base + t * op.a_stride + j)
            first = (t == 0) & ((phase == 2) | (j == 0))
            m.d.sync += rfirst.eq(first)
            with m.If(phase == 1):
                lastj = j == op.nbk - 1
                m.d.sync += [j.eq(Mux(lastj, 0, j + 1)), rlast.eq(lastj & last_t)]
                with m.If(lastj):
                    m.d.sync += t.eq(Mux(last_t, ntok, t + 1))
            with m.Else():
                m.d.sync += [rlast.eq(last_t), t.eq(Mux(last_t, ntok, t + 1))]
        with m.If(active & (phase == 1) & rv):
            m.d.sync += emax.eq(Mux(rfirst, wexp, _max(emax, wexp)))
            with m.If(rlast):
                m.d.sync += [phase.eq(2), t.eq(0), j.eq(0)]
        # ---- aligned sum over the tokens of block j (scale = emax - G, as mean_pool)
        rscale = _sig(m, emax - G, signed(EB), "pl_scale")
        code = shift_code(m, _sig(m, rscale - wexp, signed(EB + 1), "pl_shift"), G, lane_bits + 1)
        with m.If(active & (phase == 2) & rv):
            for k in range(B):
                term = round_shift_saturate(m, lanes[k], code, G, lim)
                term = Mux(none, 0, term)
                m.d.sync += acc[k].eq(Mux(rfirst, term, acc[k] + term))
            with m.If(rlast):
                m.d.sync += [phase.eq(3), step.eq(0)]
        # ---- division by the count: sign and magnitude, one quotient bit a cycle
        with m.If(active & (phase == 3)):
            with m.If(step == 0):
                m.d.sync += neg.eq(Cat(*(a < 0 for a in acc)))
                m.d.sync += [a.eq(Mux(a < 0, -a, a)) for a in acc]
                m.d.sync += [r.eq(0) for r in rem]
                m.d.sync += step.eq(1)
            with m.Else():
                for k in range(B):
                    mag = acc[k].as_unsigned()[:NW]
                    r2 = _sig(m, Cat(mag[NW - 1], rem[k]), unsigned(DW + 2), f"pl_r2_{k}")
                    ge = r2 >= ntok
                    m.d.sync += [rem[k].eq(Mux(ge, r2 - ntok, r2)),
                                 acc[k].eq(Cat(ge, mag[:NW - 1]))]
                m.d.sync += step.eq(step + 1)
                with m.If(step == NW):
                    m.d.sync += phase.eq(4)
        # ---- round half away from zero, restore the sign, blockify at the scale
        with m.If(active & (phase == 4)):
            for k in range(B):
                q = _sig(m, acc[k].as_unsigned()[:NW] + (Cat(0, rem[k]) >= ntok),
                         unsigned(NW + 1), f"pl_q{k}")
                m.d.comb += bk_value[k].eq(Mux(neg[k], -q, q))
            m.d.comb += [bk_valid.eq(1), bk_scale.eq(rscale), bk_addr.eq(op.out_base + j)]
            if bk_wide is not None:
                m.d.comb += bk_wide.eq(op.o_res)
            with m.If(bk_ready):
                with m.If(j == op.nbk - 1):
                    m.d.sync += phase.eq(0)
                with m.Else():
                    m.d.sync += [j.eq(j + 1), t.eq(0), phase.eq(2)]
