"""Prepare builds in the calling process (cheap, no BCC) and run them in a worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from nfctl import progress
from nfctl.compiler.build import BuildRequest, BuildResult, build_hash
from nfctl.compiler.codegen import BuildPins, function_is_defined
from nfctl.compiler.diagnose import crash_diagnostic
from nfctl.compiler.sandbox import (
    ConfinementError,
    explain_worker_failure,
    worker_env,
    worker_prefix,
)
from nfctl.compiler.source_guard import SourceBundle, read_source
from nfctl.compiler.worker import BUILD_MARKER, BUILT_MARKER, CRASH_LOG_ENV, public_paths
from nfctl.diagnostics import Diagnostic
from nfctl.manifest.loader import LoadedManifest
from nfctl.manifest.model import Mode, NetworkFunction

WORKER_TIMEOUT_SECONDS = 300.0


@dataclass
class PreparedNF:
    manifest: LoadedManifest
    bundle: SourceBundle | None = None
    build_hash: str = ""
    diagnostics: list[Diagnostic] = field(default_factory=list)
    repo_root: Path | None = None  # resolved

    @property
    def ok(self) -> bool:
        return not self.diagnostics and self.bundle is not None

    @property
    def nf(self) -> NetworkFunction:
        assert self.manifest.nf is not None
        return self.manifest.nf

    @property
    def source_name(self) -> str:
        """The main C source as diagnostics name it."""
        return self.bundle.main_rel if self.bundle else "the source"


def prepare(manifest: LoadedManifest, repo_root: Path) -> PreparedNF:
    prepared = PreparedNF(manifest=manifest)
    if manifest.nf is None or manifest.source_path is None:
        prepared.diagnostics = list(manifest.diagnostics)
        return prepared
    nf = manifest.nf
    prepared.repo_root = repo_root.resolve()
    bundle = read_source(manifest.source_path, repo_root)
    prepared.bundle = bundle
    prepared.diagnostics = list(manifest.diagnostics) + list(bundle.diagnostics)
    if bundle.ok and not function_is_defined(bundle.main_text, nf.spec.program.function):
        prepared.diagnostics.append(
            Diagnostic(
                file=bundle.main_rel,
                message=(
                    f"function {nf.spec.program.function!r} (spec.program.function in "
                    f"{manifest.rel_path}) is not defined in this file"
                ),
            )
        )
    prepared.build_hash = build_hash(
        bundle,
        nf.spec.program.function,
        nf.spec.program.cflags,
        nf.spec.attach.hook,
        nf.spec.mode is Mode.MONITOR,
    )
    return prepared


def build_request(
    prepared: PreparedNF,
    *,
    install: bool = False,
    pins: BuildPins | None = None,
    prog_pin_path: str | None = None,
) -> BuildRequest:
    assert prepared.bundle is not None and prepared.repo_root is not None
    nf = prepared.nf
    bundle = prepared.bundle
    # The compiler sees the repository only as this snapshot: what the guard read, at the
    # paths clang will open (including in-repository aliases of headers).
    local_files = dict(bundle.local_files)
    local_files.update({alias: bundle.local_files[real] for alias, real in bundle.aliases.items()})
    return BuildRequest(
        nf=nf.name,
        hook=nf.spec.attach.hook.value,
        function=nf.spec.program.function,
        cflags=list(nf.spec.program.cflags),
        source_rel=bundle.main_rel,
        source_text=bundle.main_text,
        quote_dir=os.path.join(prepared.repo_root, os.path.dirname(bundle.main_rel)),
        build_hash=prepared.build_hash,
        repo_root=str(prepared.repo_root),
        local_files=local_files,
        install=install,
        pins=pins or BuildPins(),
        prog_pin_path=prog_pin_path,
        monitor=nf.spec.mode is Mode.MONITOR,
    )


def worker_command() -> list[str]:
    return [*worker_prefix(), sys.executable, "-m", "nfctl.compiler.worker"]


@dataclass
class _Worker:
    proc: subprocess.Popen[str]
    # What the compiler printed during the capture that was running when the worker died
    # (see nfctl.compiler.worker.captured_stderr); empty otherwise.
    crash_log: IO[bytes]

    def compiler_output(self) -> str:
        self.crash_log.seek(0)
        text = self.crash_log.read().decode("utf-8", errors="replace")
        self.crash_log.close()
        return text

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.crash_log.close()


class _Standby:
    """One pre-started worker that has already imported BCC and waits for its requests:
    it takes Python start-up and `import bcc` (~0.4 s) off the commit-to-kernel path.
    It is still a one-shot process: used once, then replaced in the background."""

    def __init__(self) -> None:
        self.enabled = False
        self._proc: _Worker | None = None
        self._lock = threading.Lock()

    def enable(self) -> None:
        self.enabled = True
        self.refill()

    def disable(self) -> None:
        self.enabled = False
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()

    def refill(self) -> None:
        with self._lock:
            if self.enabled and (self._proc is None or self._proc.proc.poll() is not None):
                try:
                    self._proc = _spawn_worker()
                except (OSError, ConfinementError):
                    self._proc = None

    def take(self) -> _Worker | None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None and proc.proc.poll() is not None:
            proc.kill()
            proc = None  # died while waiting (e.g. killed): start a fresh one instead
        return proc


standby = _Standby()


def _spawn_worker() -> _Worker:
    env = worker_env(dict(os.environ))
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    crash_log = tempfile.TemporaryFile()  # noqa: SIM115 (the _Worker owns and closes it)
    env[CRASH_LOG_ENV] = str(crash_log.fileno())
    try:
        proc = subprocess.Popen(
            worker_command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            pass_fds=(crash_log.fileno(),),
        )
    except BaseException:
        crash_log.close()
        raise
    return _Worker(proc, crash_log)


def run_worker(
    requests: list[BuildRequest], timeout: float = WORKER_TIMEOUT_SECONDS
) -> list[BuildResult]:
    """Run a batch in a worker process (the warm standby when enabled, else a fresh one).
    A crash or timeout fails every request with the reason; it never raises."""
    if not requests:
        return []
    payload = json.dumps([r.to_json() for r in requests])
    try:
        worker = standby.take() or _spawn_worker()
    except ConfinementError as exc:
        return _all_failed(requests, f"compiling refused: {exc}")
    except OSError as exc:
        return _all_failed(requests, f"cannot start the compile worker: {exc}")
    try:
        stdout, stderr = worker.proc.communicate(payload, timeout=timeout)
    except subprocess.TimeoutExpired:
        worker.kill()
        return _all_failed(requests, f"the compile worker timed out after {timeout:.0f}s")
    finally:
        threading.Thread(target=standby.refill, daemon=True).start()
    compiler_output = worker.compiler_output()
    proc = subprocess.CompletedProcess(worker.proc.args, worker.proc.returncode, stdout, stderr)
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = proc.stderr.strip()[-2000:]
        confinement = explain_worker_failure(proc.stderr)
        if confinement:
            return _all_failed(requests, f"compiling refused: {confinement}")
        crashed = _crashed_request(proc.stderr, len(requests))
        if crashed is not None:
            return _after_crash(requests, crashed, compiler_output, proc.returncode, timeout)
        hint = ""
        if "No module named 'bcc'" in proc.stderr:
            hint = " BCC is not importable: install python3-bpfcc and run `nfctl doctor`."
        return _all_failed(
            requests,
            f"the compile worker failed (exit {proc.returncode}).{hint}",
            detail=tail or None,
        )
    try:
        return [BuildResult.from_json(r) for r in json.loads(proc.stdout)]
    except (ValueError, KeyError, TypeError) as exc:
        return _all_failed(requests, f"unreadable answer from the compile worker: {exc}")


def _crashed_request(stderr: str, count: int) -> int | None:
    """The index of the request the worker had started and not finished when it died."""
    current: int | None = None
    for line in stderr.splitlines():
        if line.startswith(BUILD_MARKER) and line[len(BUILD_MARKER) :].isdigit():
            current = int(line[len(BUILD_MARKER) :])
        elif line.startswith(BUILT_MARKER):
            current = None
    return current if current is not None and current < count else None


def _after_crash(
    requests: list[BuildRequest], crashed: int, output: str, returncode: int, timeout: float
) -> list[BuildResult]:
    """The crashed request fails with the compiler's own message; the rest of the batch
    (whose answers died with the worker) is built again in a fresh worker."""
    req = requests[crashed]
    how = f"exit {returncode}"
    signum = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    if signum in signal.valid_signals():
        how = f"killed by {signal.Signals(signum).name}"
    failed = BuildResult(
        nf=req.nf,
        build_hash=req.build_hash,
        ok=False,
        diagnostics=[crash_diagnostic(req.nf, req.source_rel, how, output, public_paths(req))],
    )
    others = run_worker(requests[:crashed] + requests[crashed + 1 :], timeout)
    return [*others[:crashed], failed, *others[crashed:]]


def run_parallel(requests: list[BuildRequest], workers: int | None = None) -> list[BuildResult]:
    """Independent builds across one worker per CPU (results in request order)."""
    from concurrent.futures import ThreadPoolExecutor

    count = max(1, min(workers or os.cpu_count() or 1, len(requests)))
    progress.note(f"compiling {len(requests)} NF(s) in {count} worker(s) (BCC + verifier)")
    if count == 1:
        return _noted(run_worker(requests))
    batches = [requests[i::count] for i in range(count)]
    with ThreadPoolExecutor(max_workers=count) as pool:
        answers = list(pool.map(lambda batch: _noted(run_worker(batch)), batches))
    by_request: dict[int, BuildResult] = {}
    for batch, results in zip(batches, answers, strict=True):
        for request, result in zip(batch, results, strict=True):
            by_request[id(request)] = result
    return [by_request[id(r)] for r in requests]


def _noted(results: list[BuildResult]) -> list[BuildResult]:
    """Report a worker's builds the moment it answers (a worker answers per batch)."""
    for result in results:
        seconds = result.compile_seconds + result.load_seconds
        outcome = f"built ({seconds:.2f}s)" if result.ok else "failed to build"
        progress.note(f"{result.nf}: {outcome}")
    return results


def _all_failed(
    requests: list[BuildRequest], message: str, detail: str | None = None
) -> list[BuildResult]:
    return [
        BuildResult(
            nf=r.nf,
            build_hash=r.build_hash,
            ok=False,
            diagnostics=[Diagnostic(file=r.source_rel, message=message, detail=detail)],
        )
        for r in requests
    ]
