import json
import re

import pytest

from bct.config import Config, ConfigError


def test_defaults_and_derived_widths():
    c = Config()
    assert c.weight_format.qmax == 127 and c.act_format.e_min == -128 and c.act_format.e_max == 127
    # |acc| <= (K_max * qa * qw + qv) * 2**G, one sign bit on top
    assert c.acc_bound == (4096 * 127 * 127 + 127) << 8
    assert c.acc_bits == c.acc_bound.bit_length() + 1 == 35
    assert c.block_product_bits == (32 * 127 * 127).bit_length() + 1


def test_weight_format_defaults_to_activation_block_and_exponent():
    c = Config(block_size=16)
    assert c.weight_format.block == 16 and c.weight_format.exp_bits == 8
    c = Config(weight_bits=4, weight_block_size=128, weight_exp_bits=6)
    assert c.weight_format.bits_per_value == 4 + 6 / 128 and c.act_format.block == 32
    assert 32 / c.weight_format.bits_per_value > 7.9


def test_weight_exp_search_defaults_to_max_and_is_hashed():
    assert Config().weight_exp_search == "max"
    c = Config(weight_exp_search="mse")
    assert c.hash != Config().hash and c.weight_format == Config().weight_format
    assert Config.from_dict(c.to_dict()).weight_exp_search == "mse"


def test_hash_is_stable_and_content_based():
    a, b = Config(), Config()
    assert a.hash == b.hash and len(a.hash) == 16
    assert Config(block_size=64).hash != a.hash
    assert Config.from_dict(json.loads(json.dumps(a.to_dict()))).hash == a.hash
    assert a.replace(weight_bits=4).weight_bits == 4


def test_check_hash_refuses_mismatch():
    a, b = Config(), Config(weight_bits=4)
    a.check_hash(a.hash)
    with pytest.raises(ConfigError, match=f"made for config {b.hash}, but the current config is {a.hash}"):
        a.check_hash(b.hash, "memory image")


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"block_size": 12}, "block_size must be a power of two, not 12"),
        ({"block_size": 4}, "block_size must be in 8..128, not 4"),
        ({"block_size": 256}, "block_size must be in 8..128, not 256"),
        ({"block_size": 32.0}, "block_size must be an int, not float"),
        ({"weight_bits": 1}, "weight_bits must be in 2..16, not 1"),
        ({"act_bits": 17}, "act_bits must be in 2..16, not 17"),
        ({"vector_bits": True}, "vector_bits must be an int, not bool"),
        ({"exp_bits": 11}, "exp_bits must be in 2..10, not 11"),
        ({"weight_block_size": 16}, "weight_block_size must be in 32..1024, not 16"),
        ({"weight_block_size": 96}, "weight_block_size must be a power of two, not 96"),
        ({"weight_exp_bits": 1}, "weight_exp_bits must be in 2..10, not 1"),
        ({"weight_exp_search": "min"}, "weight_exp_search must be 'max' or 'mse', not 'min'"),
        ({"weight_exp_search": None}, "weight_exp_search must be 'max' or 'mse', not None"),
        ({"acc_guard_bits": -1}, "acc_guard_bits must be in 0..16, not -1"),
        ({"max_reduction": 100}, "max_reduction 100 is not a multiple of block_size 32"),
        ({"gelu_segments": 48}, "gelu_segments must be a power of two, not 48"),
        ({"gelu_table_range": 3}, "gelu_table_range must be a power of two, not 3"),
        ({"gelu_segments": 1024, "gelu_frac": 4}, "gelu_segments 1024 is finer than the input grid"),
        ({"ln_frac": 16}, "ln_frac 16 must be below ln_sqrt_bits 16"),
        ({"ln_eps": -1.0}, r"ln_eps must be in \[0, 1\), not -1.0"),
        ({"clock_mhz": 0}, "clock_mhz must be in 1..2000, not 0"),
        ({"act_bits": 16, "weight_bits": 16, "acc_guard_bits": 16}, "the matmul accumulator needs 59 bits \\(> 53\\)"),
        ({"act_bits": 16}, "LayerNorm's N \\* sum\\(x\\*\\*2\\) needs"),
        ({"residual_bits": 7}, "residual_bits must be in 8..16, not 7"),
        ({"residual_bits": 17}, "residual_bits must be in 8..16, not 17"),
        ({"residual_bits": 13, "acc_guard_bits": 4}, "residual_bits must be in 8..12, not 13"),
        ({"residual_bits": 11, "act_bits": 12}, "residual_bits must be in 12..16, not 11"),
        ({"residual_bits": 16.0}, "residual_bits must be an int, not float"),
        ({"gelu_direct": 1}, "gelu_direct must be a bool, not int"),
    ],
)
def test_config_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        Config(**kw)


def test_check_reduction():
    c = Config()
    c.check_reduction(384)
    with pytest.raises(ConfigError, match="reduction length 100 is not a multiple of block_size 32"):
        c.check_reduction(100)
    with pytest.raises(ConfigError, match="LayerNorm width 8192 exceeds max_reduction 4096"):
        c.check_reduction(8192, "LayerNorm width")


def test_unknown_field_refused():
    with pytest.raises(ConfigError, match="unknown config field"):
        Config.from_dict({"blocksize": 32})


def test_frozen():
    with pytest.raises(Exception):
        Config().block_size = 64


#: Hashes printed by ``bct config`` before ``residual_bits`` existed (they must never change).
OLD_HASHES = [
    ({}, "66131dc4cd7c04ea"),
    ({"block_size": 8, "weight_block_size": 8, "vector_bits": 16, "ln_out_frac": 12,
      "gelu_frac": 12}, "179ef5a9e4e89599"),
    ({"weight_bits": 4, "weight_block_size": 128, "weight_exp_bits": 6,
      "weight_exp_search": "mse"}, "8804f70186d61d11"),
]


@pytest.mark.parametrize("kw, digest", OLD_HASHES)
def test_new_field_at_its_default_keeps_existing_hashes(kw, digest):
    c = Config(**kw)
    assert c.hash == digest
    assert "residual_bits" not in c.to_dict() and "gelu_direct" not in c.to_dict()
    assert Config.from_dict(c.to_dict()) == c


def test_residual_bits_is_hashed_when_set():
    c = Config(residual_bits=16)
    assert c.to_dict()["residual_bits"] == 16 and c.hash not in {d for _, d in OLD_HASHES}
    assert Config.from_dict(json.loads(json.dumps(c.to_dict()))).hash == c.hash
    assert Config(residual_bits=8).hash not in (c.hash, Config().hash)


def test_residual_format_and_guard_bits():
    c = Config()
    assert c.residual_format == c.act_format and c.residual_guard_bits == c.acc_guard_bits == 8
    w = Config(residual_bits=16)
    assert w.residual_format.bits == 16 and w.residual_format.block == 32
    assert w.residual_guard_bits == 0 and w.add_bound == c.add_bound
    for kw in ({"residual_bits": 12}, {"residual_bits": 16}, {"residual_bits": 10, "acc_guard_bits": 2}):
        w = Config(**kw)
        qa, qr, g = w.act_format.qmax, w.residual_format.qmax, w.residual_guard_bits
        # an aligned residual row (one activation + one residual term) fits LayerNorm's input
        assert w.residual_guard_bits == w.acc_guard_bits - (w.residual_bits - 8)
        assert (qa + qr) << g <= w.add_bound


def test_gelu_direct_is_hashed_when_set():
    c = Config(gelu_direct=True)
    assert c.to_dict()["gelu_direct"] is True and c.hash != Config().hash
    assert Config.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert Config(gelu_direct=True, residual_bits=16).hash not in (c.hash, Config(residual_bits=16).hash)


def test_weight_equalize_is_hashed_when_set():
    base = Config(weight_bits=4, weight_block_size=128, weight_exp_bits=6, weight_exp_search="mse")
    assert base.weight_equalize is None and "weight_equalize" not in base.to_dict()
    assert base.hash == "8804f70186d61d11"  # the 7.90x config of docs/evaluation.md, unchanged
    hashes = {base.hash}
    for v in ("qk_scale", "ffn_perm", "qk_scale+ffn_perm", "hidden_perm", "hidden_perm+qk_scale+ffn_perm"):
        c = base.replace(weight_equalize=v)
        assert c.to_dict()["weight_equalize"] == v and c.weight_format == base.weight_format
        assert Config.from_dict(json.loads(json.dumps(c.to_dict()))).hash == c.hash
        hashes.add(c.hash)
    assert len(hashes) == 6


@pytest.mark.parametrize("value", ["", "ffn_perm+qk_scale", "qk_scale+qk_scale", "qk_scale+hidden_perm",
                                   "hadamard", 1])
def test_weight_equalize_refuses_unknown_or_unordered_names(value):
    msg = ("weight_equalize must be None or names from hidden_perm, qk_scale, ffn_perm joined by '+' "
           f"(each once, in that order), not {value!r}")
    with pytest.raises(ConfigError, match=re.escape(msg)):
        Config(weight_equalize=value)
