from bct.bench import BOUNDS, bench_units
from bct.config import Config


def test_units_within_bounds_default_and_4bit():
    for cfg in (Config(), Config(weight_bits=4, block_size=16)):
        r = bench_units(cfg, seed=1, shape=(16, 128, 64))
        assert r["config_hash"] == cfg.hash
        for name, bound in BOUNDS.items():
            assert r[f"{name}_bound"] == bound
            assert 0 < r[name] <= bound, name
        assert r["matmul_bit_exact"] is True
        assert r["matmul_max_abs_acc"] <= r["matmul_acc_bound"]
        assert r["matmul_int_gmacs"] > 0 and r["matmul_numpy_f32_gmacs"] > 0


def test_a_coarse_config_is_reported_as_missing_its_bound():
    r = bench_units(Config(gelu_frac=4, gelu_segments=4), seed=0, shape=(4, 32, 32))
    assert r["gelu_max_abs_error"] > BOUNDS["gelu_max_abs_error"]
    assert r["all_within_bounds"] is False
