"""The ``bct`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys

from bct import __version__
from bct.config import PRESETS, Config, ConfigError

__all__ = ["main"]

#: Subcommands that live in their own modules. Each module defines
#: ``register(subparsers, add_config_options)`` which adds its parser and sets
#: ``func``; heavy imports belong inside the command function, so ``bct --help``
#: stays fast.
_COMMAND_MODULES: tuple = ("bct.commands", "bct.generate", "bct.synth", "bct.estimate",
                           "bct.demo")


def _parse_value(field: dataclasses.Field, text: str):
    if "None" in str(field.type) and text.lower() == "none":
        return None
    if str(field.type).startswith("int"):
        return int(text)
    if field.type in ("float", float):
        return float(text)
    if field.type in ("bool", bool):
        if text.lower() not in ("true", "false"):
            raise ValueError(text)
        return text.lower() == "true"
    return text


def config_from_args(args: argparse.Namespace) -> Config:
    """Build the :class:`Config` from ``--preset NAME``, ``--config FILE`` and ``--set KEY=VALUE``
    options (later ones override earlier ones)."""
    values: dict = {}
    preset = getattr(args, "preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    if args.config:
        with open(args.config) as f:
            values.update(json.load(f))
    fields = {f.name: f for f in dataclasses.fields(Config) if f.init}
    for item in args.set or ():
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set takes KEY=VALUE, not {item!r}")
        if key not in fields:
            raise ConfigError(f"unknown config field: {key}")
        try:
            values[key] = _parse_value(fields[key], text)
        except ValueError:
            raise ConfigError(f"{key}: cannot parse {text!r} as {fields[key].type}") from None
    return Config.from_dict(values)


def _shape(text: str) -> tuple:
    try:
        m, k, n = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected M,K,N, not {text!r}") from None
    return m, k, n


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", metavar="NAME",
                   help=f"named config ({', '.join(PRESETS)}); --config / --set override it")
    p.add_argument("--config", metavar="FILE", help="JSON file of Config fields")
    p.add_argument(
        "--set", metavar="KEY=VALUE", action="append", help="override one Config field (repeatable)"
    )


def _print_units(r: dict) -> None:
    print(f"BCT numeric core, config {r['config_hash']}")
    for key in ("gelu", "softmax", "layernorm"):
        e, b = r[f"{key}_max_abs_error"], r[f"{key}_max_abs_error_bound"]
        print(f"  {key:<10} max abs error {e:.6f}  (bound {b:.6f})  {'ok' if e <= b else 'MISSED'}")
    e, b = r["encode_max_error_steps"], r["encode_max_error_steps_bound"]
    print(f"  encode     max error {e:.6f} steps (bound {b})  {'ok' if e <= b else 'MISSED'}")
    print(
        f"  matmul {r['matmul_shape']}: bit-exact vs Python ints: {'yes' if r['matmul_bit_exact'] else 'NO'}; "
        f"{r['matmul_int_gmacs']:.2f} GMAC/s integer vs {r['matmul_numpy_f32_gmacs']:.2f} GMAC/s numpy float32 "
        f"(accumulator {r['matmul_acc_bits']} bits)"
    )


def _cmd_bench(args) -> int:
    from bct.bench import bench_sim_command, bench_units

    cfg = config_from_args(args)
    if args.suite == "sim":
        return bench_sim_command(cfg, args.seed, as_json=args.json, quick=args.quick,
                                 units=args.unit)
    result = bench_units(cfg, seed=args.seed, shape=args.shape)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_units(result)
    return 0 if result["all_within_bounds"] else 1


def _cmd_config(args) -> int:
    cfg = config_from_args(args)
    print(json.dumps({"hash": cfg.hash, **cfg.to_dict()}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the tests and the docs)."""
    parser = argparse.ArgumentParser(
        prog="bct",
        description="BCT-Gen: blockwise-compressed BERT, integer model, RTL and co-simulation.",
    )
    parser.add_argument("--version", action="version", version=f"bct-gen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("bench", help="benchmarks that print figures (JSON with --json)")
    p.add_argument("suite", choices=["units", "sim"],
                   help="units: numeric core accuracy and speed; sim: RTL units on Verilator")
    _add_config_options(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--shape", type=_shape, default=(128, 384, 1536), metavar="M,K,N",
        help="matmul problem (M x K) @ (K x N) (default 128,384,1536)",
    )
    p.add_argument("--quick", action="store_true", help="sim: fewer beats per unit")
    p.add_argument("--unit", action="append", help="sim: only this unit (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("config", help="print the validated configuration and its hash")
    _add_config_options(p)
    p.set_defaults(func=_cmd_config)

    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub, _add_config_options)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``bct`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"bct: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
