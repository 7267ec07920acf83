"""The one configuration object of BCT-Gen.

:class:`Config` is the single source of truth for the block format, the integer kernels, the
fixed-point nonlinear units and (later) the hardware array. Everything derived from it (accumulator
widths, value ranges, constants, memory-image layouts) is computed here or in
:mod:`bct.model.constants`, never typed twice. Its :attr:`Config.hash` is stamped into every
artefact (RTL, memory images, reports) so that a mismatch can be refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from functools import cached_property

__all__ = ["Config", "ConfigError", "BlockFormat"]

#: Bump when the meaning of a field (not just its value) changes: it is part of the hash.
SCHEMA_VERSION = 1

#: Most operands of one fixed-point addition (the embedding sum: word + position + token type).
MAX_ADD_TERMS = 3

#: The values of ``Config.weight_exp_search`` (the choices of ``bct.model.blocks.encode``).
WEIGHT_EXP_SEARCHES = ("max", "mse")

#: The data-free, function-preserving weight transforms ``Config.weight_equalize`` may name
#: (``bct.model.equalize``), in the order they are applied.
WEIGHT_EQUALIZE_TRANSFORMS = ("hidden_perm", "qk_scale", "ffn_perm")

#: Widest accumulator the software fast path keeps exact (float64 holds every integer below 2**53).
EXACT_FLOAT_BITS = 53

#: Fields added after schema 1: :meth:`Config.to_dict` (hence :attr:`Config.hash`) leaves each
#: out while it equals its default, so every config that does not use them keeps its hash.
OPTIONAL_FIELDS = ("residual_bits", "gelu_direct", "weight_equalize")


#: The wide residual path with the data-free hidden-channel permutation: every matmul operand
#: still 8-bit blocks (docs/arithmetic.md section 10, docs/evaluation.md).
_WIDE = {"residual_bits": 16, "gelu_direct": True, "vector_bits": 16, "ln_out_frac": 12,
         "gelu_frac": 12, "weight_equalize": "hidden_perm"}

#: Named configs (``bct ... --preset NAME``): Config fields over the defaults; ``--config`` and
#: ``--set`` override them. Measured in docs/evaluation.md.
PRESETS = {
    # W8A8, blocks of 32 (3.88x): the defaults.
    "default": {},
    # W8A8, blocks of 32, wide residual path + hidden_perm (3.87x whole model).
    "w8-wide": dict(_WIDE),
    # W8A8, activation blocks of 8, weight blocks of 16 with 5-bit exponents (3.84x): the
    # sentence-embedding fidelity config.
    "w8-wide-b8": {**_WIDE, "block_size": 8, "weight_block_size": 16, "weight_exp_bits": 5},
    # 4-bit weights in blocks of 128 with 6-bit exponents chosen by squared error (7.90x).
    "w4": {"weight_bits": 4, "weight_block_size": 128, "weight_exp_bits": 6,
           "weight_exp_search": "mse", "weight_equalize": "qk_scale+ffn_perm"},
}


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent."""


@dataclass(frozen=True)
class BlockFormat:
    """The storage format of one kind of tensor: ``bits``-bit symmetric integers, ``block``
    consecutive elements along the reduction axis sharing one ``exp_bits``-bit signed
    power-of-two exponent.

    Parameters
    ----------
    bits : int
        Width of each stored integer (two's complement, symmetric range).
    block : int
        Number of consecutive elements sharing one exponent.
    exp_bits : int
        Width of the shared signed exponent.
    """

    bits: int
    block: int
    exp_bits: int

    @property
    def qmax(self) -> int:
        """Largest stored magnitude, ``2**(bits-1) - 1`` (the range is symmetric)."""
        return (1 << (self.bits - 1)) - 1

    @property
    def e_min(self) -> int:
        """Smallest exponent; also the exponent of an all-zero block."""
        return -(1 << (self.exp_bits - 1))

    @property
    def e_max(self) -> int:
        """Largest exponent."""
        return (1 << (self.exp_bits - 1)) - 1

    @property
    def bits_per_value(self) -> float:
        """Storage cost per element including the amortised shared exponent."""
        return self.bits + self.exp_bits / self.block


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_int(name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be in {lo}..{hi}, not {value}")


@dataclass(frozen=True)
class Config:
    """Every parameter of the BCT arithmetic and hardware, validated on construction.

    Parameters
    ----------
    block_size : int
        Elements per block along the reduction axis of activations and vectors (power of two,
        8..128); the K-block of the matmul array.
    weight_block_size : int or None
        Elements per block of weight matrices and embedding tables: a multiple of
        ``block_size`` up to 1024 (larger weight blocks amortise their exponent); ``None`` means
        ``block_size``.
    weight_bits, act_bits : int
        Integer width of weight / activation blocks (2..16).
    vector_bits : int
        Integer width of the block-format vectors (biases, LayerNorm gamma and beta).
    residual_bits : int or None
        The wide residual path: integer width of the residual stream's blocks (the embedding
        sum, each residual sum and the copy of each LayerNorm output that is added to the next
        residual), ``act_bits..min(16, act_bits + acc_guard_bits)``. LayerNorm reads these
        blocks aligned with :attr:`residual_guard_bits`, and its output's copy that feeds the
        next matmuls is still rounded to ``act_bits``: matmul operands stay narrow.
        ``None`` (default): the residual stream is in the activation format.
    exp_bits : int
        Width of the shared exponents of activations and vectors (signed; 2..10).
    weight_exp_bits : int or None
        Width of the weights' shared exponents; ``None`` means ``exp_bits``.
    weight_exp_search : str
        How the shared exponent of each weight block (weight matrices and embedding tables) is
        chosen when a checkpoint is encoded: ``"max"``, the smallest exponent at which the
        block's largest magnitude does not saturate; ``"mse"``, the one of smallest squared
        error among that exponent and the two below it (clipping the largest elements for a
        finer step). See docs/arithmetic.md.
    weight_equalize : str or None
        Data-free transforms applied to the float checkpoint before its weights are encoded
        (exact in real arithmetic, so the float network is unchanged; see
        ``bct.model.equalize``): names of :data:`WEIGHT_EQUALIZE_TRANSFORMS` joined by ``+``,
        each at most once and in that order, e.g. ``"qk_scale+ffn_perm"``. ``None``
        (default): the checkpoint is encoded as loaded. ``hidden_perm`` reorders the hidden
        channels (the stored model carries the order and returns its sentence embedding in the
        checkpoint's order).
    acc_guard_bits : int
        Fractional guard bits kept below the largest block product when per-block partial sums
        are aligned into the matmul accumulator (see docs/arithmetic.md).
    max_reduction : int
        Longest reduction (K of a matmul, length of a LayerNorm row) the accumulators are sized
        for; a multiple of ``block_size``.
    gelu_frac, gelu_int_bits : int
        Fixed-point fraction / integer bits of the GELU unit's input and output.
    gelu_direct : bool
        GELU reads the FFN1 matmul's accumulator directly (rounded to ``gelu_frac``) instead of
        its activation blocks; default ``False``. Independent of ``residual_bits``; with both,
        no non-matmul input is rounded to ``act_bits``.
    gelu_segments, gelu_table_range : int
        The GELU correction table: ``gelu_segments`` linear segments over ``[0, gelu_table_range)``
        (both powers of two).
    softmax_frac, softmax_int_bits : int
        Fixed-point fraction / integer bits of the scores entering the softmax unit; the
        ``2**-softmax_frac`` fractional part of ``log2(e) * (x - max)`` indexes a direct LUT.
    softmax_exp_frac : int
        Fraction bits of the exponentials (``2**t`` for ``t <= 0``).
    softmax_out_frac : int
        Fraction bits of the output probabilities.
    softmax_recip_bits : int
        Extra precision bits of the row reciprocal.
    ln_sqrt_bits : int
        Width the variance is normalised to before the integer square root (its root has this
        many bits).
    ln_frac : int
        Fraction bits of the standardised value ``(x - mean) / std``.
    ln_out_frac, ln_out_int_bits : int
        Fixed-point fraction / integer bits of the LayerNorm output (after gamma and beta).
    ln_eps : float
        The LayerNorm epsilon (a model constant, folded into an integer at build time).
    array_rows, array_cols : int
        Shape of the processing-element array.
    clock_mhz : float
        Target clock for constraints and latency estimates.
    """

    block_size: int = 32
    weight_block_size: int | None = None
    weight_bits: int = 8
    act_bits: int = 8
    vector_bits: int = 8
    residual_bits: int | None = None
    exp_bits: int = 8
    weight_exp_bits: int | None = None
    weight_exp_search: str = "max"
    weight_equalize: str | None = None
    acc_guard_bits: int = 8
    max_reduction: int = 4096
    gelu_frac: int = 8
    gelu_int_bits: int = 8
    gelu_direct: bool = False
    gelu_segments: int = 64
    gelu_table_range: int = 4
    softmax_frac: int = 8
    softmax_int_bits: int = 8
    softmax_exp_frac: int = 15
    softmax_out_frac: int = 15
    softmax_recip_bits: int = 8
    ln_sqrt_bits: int = 16
    ln_frac: int = 10
    ln_out_frac: int = 8
    ln_out_int_bits: int = 10
    ln_eps: float = 1e-12
    array_rows: int = 8
    array_cols: int = 8
    clock_mhz: float = 100.0

    def __post_init__(self):
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool):
            raise ConfigError(f"block_size must be an int, not {type(self.block_size).__name__}")
        if not _is_pow2(self.block_size):
            raise ConfigError(f"block_size must be a power of two, not {self.block_size}")
        _check_int("block_size", self.block_size, 8, 128)
        for name in ("weight_bits", "act_bits", "vector_bits"):
            _check_int(name, getattr(self, name), 2, 16)
        _check_int("exp_bits", self.exp_bits, 2, 10)
        if self.weight_block_size is not None:
            _check_int("weight_block_size", self.weight_block_size, self.block_size, 1024)
            if not _is_pow2(self.weight_block_size):
                raise ConfigError(
                    f"weight_block_size must be a power of two, not {self.weight_block_size}"
                )
        if self.weight_exp_bits is not None:
            _check_int("weight_exp_bits", self.weight_exp_bits, 2, 10)
        if self.weight_exp_search not in WEIGHT_EXP_SEARCHES:
            raise ConfigError(
                f"weight_exp_search must be 'max' or 'mse', not {self.weight_exp_search!r}"
            )
        if self.weight_equalize is not None:
            names = self.weight_equalize.split("+") if isinstance(self.weight_equalize, str) else ()
            if not names or [n for n in WEIGHT_EQUALIZE_TRANSFORMS if n in names] != names:
                raise ConfigError(
                    "weight_equalize must be None or names from "
                    f"{', '.join(WEIGHT_EQUALIZE_TRANSFORMS)} joined by '+' (each once, in that "
                    f"order), not {self.weight_equalize!r}"
                )
        _check_int("acc_guard_bits", self.acc_guard_bits, 0, 16)
        if self.residual_bits is not None:  # its aligned sums must stay within add_bound
            _check_int("residual_bits", self.residual_bits, self.act_bits,
                       min(16, self.act_bits + self.acc_guard_bits))
        _check_int("max_reduction", self.max_reduction, self.block_size, 1 << 16)
        if self.max_reduction % self.block_size:
            raise ConfigError(
                f"max_reduction {self.max_reduction} is not a multiple of block_size {self.block_size}"
            )
        _check_int("gelu_frac", self.gelu_frac, 4, 16)
        _check_int("gelu_int_bits", self.gelu_int_bits, 3, 16)
        if not isinstance(self.gelu_direct, bool):
            raise ConfigError(f"gelu_direct must be a bool, not {type(self.gelu_direct).__name__}")
        _check_int("gelu_segments", self.gelu_segments, 4, 1024)
        _check_int("gelu_table_range", self.gelu_table_range, 1, 16)
        for name in ("gelu_segments", "gelu_table_range"):
            if not _is_pow2(getattr(self, name)):
                raise ConfigError(f"{name} must be a power of two, not {getattr(self, name)}")
        if self.gelu_segments > self.gelu_table_range << self.gelu_frac:
            raise ConfigError(
                f"gelu_segments {self.gelu_segments} is finer than the input grid "
                f"({self.gelu_table_range} * 2**gelu_frac = {self.gelu_table_range << self.gelu_frac})"
            )
        _check_int("softmax_frac", self.softmax_frac, 2, 12)
        _check_int("softmax_int_bits", self.softmax_int_bits, 2, 12)
        _check_int("softmax_exp_frac", self.softmax_exp_frac, 4, 24)
        _check_int("softmax_out_frac", self.softmax_out_frac, 4, 24)
        _check_int("softmax_recip_bits", self.softmax_recip_bits, 0, 16)
        _check_int("ln_sqrt_bits", self.ln_sqrt_bits, 4, 24)
        _check_int("ln_frac", self.ln_frac, 2, 20)
        _check_int("ln_out_frac", self.ln_out_frac, 2, 20)
        _check_int("ln_out_int_bits", self.ln_out_int_bits, 2, 20)
        if self.ln_frac >= self.ln_sqrt_bits:
            raise ConfigError(
                f"ln_frac {self.ln_frac} must be below ln_sqrt_bits {self.ln_sqrt_bits}"
            )
        if isinstance(self.ln_eps, bool) or not isinstance(self.ln_eps, (int, float)):
            raise ConfigError(f"ln_eps must be a number, not {type(self.ln_eps).__name__}")
        if not 0 <= self.ln_eps < 1:
            raise ConfigError(f"ln_eps must be in [0, 1), not {self.ln_eps}")
        _check_int("array_rows", self.array_rows, 1, 64)
        _check_int("array_cols", self.array_cols, 1, 64)
        if isinstance(self.clock_mhz, bool) or not isinstance(self.clock_mhz, (int, float)):
            raise ConfigError(f"clock_mhz must be a number, not {type(self.clock_mhz).__name__}")
        if not 1 <= self.clock_mhz <= 2000:
            raise ConfigError(f"clock_mhz must be in 1..2000, not {self.clock_mhz}")
        if self.acc_bits > EXACT_FLOAT_BITS:
            raise ConfigError(
                f"the matmul accumulator needs {self.acc_bits} bits (> {EXACT_FLOAT_BITS}); "
                "reduce max_reduction, acc_guard_bits or the operand widths"
            )
        if self.ln_sum_sq_bits > 62:
            raise ConfigError(
                f"LayerNorm's N * sum(x**2) needs {self.ln_sum_sq_bits} bits (> 62); "
                "reduce max_reduction, acc_guard_bits or act_bits"
            )

    # ----------------------------------------------------------------------------------------
    # Formats
    @property
    def weight_format(self) -> BlockFormat:
        """Block format of weight matrices and embedding tables."""
        return BlockFormat(
            self.weight_bits,
            self.weight_block_size or self.block_size,
            self.weight_exp_bits or self.exp_bits,
        )

    @property
    def act_format(self) -> BlockFormat:
        """Block format of every intermediate result (activations)."""
        return BlockFormat(self.act_bits, self.block_size, self.exp_bits)

    @property
    def vector_format(self) -> BlockFormat:
        """Block format of biases and LayerNorm gamma / beta."""
        return BlockFormat(self.vector_bits, self.block_size, self.exp_bits)

    @property
    def residual_format(self) -> BlockFormat:
        """Block format of the residual stream: ``residual_bits`` wide, or the activation
        format when ``residual_bits`` is ``None``."""
        return BlockFormat(self.residual_bits or self.act_bits, self.block_size, self.exp_bits)

    # ----------------------------------------------------------------------------------------
    # Derived widths (the proofs are in docs/arithmetic.md)
    @property
    def operand_qmax(self) -> int:
        """Largest magnitude of a matmul's second operand: a weight, or an activation (the K of
        ``Q K^T`` and the V of ``P V``)."""
        return max(self.weight_format.qmax, self.act_format.qmax)

    @property
    def block_product_bits(self) -> int:
        """Signed width of one block's integer dot product: ``|p| <= B * qmax_a * qmax_op``."""
        return (self.block_size * self.act_format.qmax * self.operand_qmax).bit_length() + 1

    @property
    def acc_bound(self) -> int:
        """Largest accumulator magnitude: ``(K_max * qa * qop + qv) * 2**G`` (see docs)."""
        qa, qv = self.act_format.qmax, self.vector_format.qmax
        return (self.max_reduction * qa * self.operand_qmax + qv) << self.acc_guard_bits

    @property
    def acc_bits(self) -> int:
        """Signed width of the matmul accumulator; it can never wrap (see docs)."""
        return self.acc_bound.bit_length() + 1

    @property
    def add_bound(self) -> int:
        """Largest magnitude of a sum of up to :data:`MAX_ADD_TERMS` aligned activations (or
        embedding rows, stored in the weight format)."""
        return (MAX_ADD_TERMS * self.operand_qmax) << self.acc_guard_bits

    @property
    def residual_guard_bits(self) -> int:
        """Guard bits a residual-format block at the top of its row keeps when the row is
        aligned (the residual sums, LayerNorm's input; ``bct.model.integer.residual_add``):
        ``acc_guard_bits - (residual_bits - act_bits)``, so an aligned residual row is no
        wider than an aligned activation row and every sum stays within :attr:`add_bound`
        (``acc_guard_bits`` without the wide path)."""
        return self.acc_guard_bits - (self.residual_format.bits - self.act_bits)

    @property
    def add_bits(self) -> int:
        """Signed width of a residual / embedding sum (see :attr:`add_bound`)."""
        return self.add_bound.bit_length() + 1

    @property
    def ln_sum_sq_bits(self) -> int:
        """Unsigned width of ``N * sum(x**2)`` in LayerNorm for inputs of :attr:`add_bits`."""
        return (self.max_reduction**2 * self.add_bound**2).bit_length()

    @property
    def gelu_bits(self) -> int:
        """Signed width of the GELU unit's fixed-point input and output."""
        return self.gelu_int_bits + self.gelu_frac + 1

    @property
    def softmax_bits(self) -> int:
        """Signed width of the softmax unit's fixed-point scores."""
        return self.softmax_int_bits + self.softmax_frac + 1

    @property
    def ln_out_bits(self) -> int:
        """Signed width of the LayerNorm unit's fixed-point output."""
        return self.ln_out_int_bits + self.ln_out_frac + 1

    # ----------------------------------------------------------------------------------------
    # Checks used by the kernels
    def check_reduction(self, length: int, what: str = "reduction length") -> None:
        """Raise :class:`ConfigError` unless ``length`` can be reduced under this config."""
        if length % self.block_size:
            raise ConfigError(
                f"{what} {length} is not a multiple of block_size {self.block_size}"
            )
        if length > self.max_reduction:
            raise ConfigError(f"{what} {length} exceeds max_reduction {self.max_reduction}")

    # ----------------------------------------------------------------------------------------
    # Identity
    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON-serialisable); a field of :data:`OPTIONAL_FIELDS`
        is left out while it equals its default."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.init and not (f.name in OPTIONAL_FIELDS and getattr(self, f.name) == f.default)
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "Config":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @cached_property
    def hash(self) -> str:
        """Stable 16-hex-digit content hash of every field and the schema version.

        It is the sha256 of :meth:`to_dict` plus ``SCHEMA_VERSION`` as sorted compact JSON.
        Rule for new fields: a field added after schema 1 goes into :data:`OPTIONAL_FIELDS`
        with a default that means the old behaviour, so it is left out of the hash at that
        default and every existing config (and artefact) keeps its hash; set to anything else,
        it is hashed like every other field.
        """
        blob = json.dumps(
            {"schema": SCHEMA_VERSION, **self.to_dict()}, sort_keys=True, separators=(",", ":")
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def check_hash(self, other: str, what: str = "artefact") -> None:
        """Refuse an artefact stamped with another configuration's hash."""
        if other != self.hash:
            raise ConfigError(
                f"{what} was made for config {other}, but the current config is {self.hash}; "
                "regenerate it with the current config"
            )
