"""InferencePool: the replicas of one run and the one choke point for model calls.

Every model call of every phase goes through `generate`, from many driver threads
at once. Adapters are versioned by name (`<run>-v<N>`), loaded on every replica;
the base model is always available as version None.

A replica that dies (its actor process is gone) is taken out of the router at once,
its requests are resent to live replicas (`inference.request_retries`), and a new
actor takes its place in the background with every adapter version loaded before it
gets traffic (`inference.replica_restarts`). A replica that does not answer an adapter
load, unload, sleep or wake in time is killed and replaced the same way (and the call
fails). Any other failure is the request's own and is raised, naming the replica and
the request.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

from bt_ray import storage
from bt_ray.config import RunConfig
from bt_ray.errors import AdapterError, EngineError, RequestError, plain
from bt_ray.inference import placement
from bt_ray.inference.engine import GenerationRequest, GenerationResult
from bt_ray.inference.replica import ReplicaActor
from bt_ray.inference.router import Router
from bt_ray.model import adapter_digest

logger = logging.getLogger(__name__)


@dataclass
class Usage:
    """What the pool served, per model version; phases diff two snapshots for their costs."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    truncated: int = 0  # answers cut at max_tokens
    by_version: dict[str, int] = field(default_factory=dict)

    def add(self, result: GenerationResult) -> None:
        self.requests += 1
        self.prompt_tokens += result.prompt_tokens
        self.cached_prompt_tokens += result.cached_prompt_tokens
        self.generated_tokens += result.completion_tokens
        self.truncated += result.finish_reason == "length"
        version = result.adapter or "base"
        self.by_version[version] = self.by_version.get(version, 0) + 1

    def since(self, earlier: "Usage") -> "Usage":
        return Usage(
            self.requests - earlier.requests,
            self.prompt_tokens - earlier.prompt_tokens,
            self.cached_prompt_tokens - earlier.cached_prompt_tokens,
            self.generated_tokens - earlier.generated_tokens,
            self.truncated - earlier.truncated,
            {k: v - earlier.by_version.get(k, 0) for k, v in self.by_version.items()
             if v - earlier.by_version.get(k, 0)},
        )

    def copy(self) -> "Usage":
        return Usage(self.requests, self.prompt_tokens, self.cached_prompt_tokens, self.generated_tokens,
                     self.truncated, dict(self.by_version))


class InferencePool:
    def __init__(self, config: RunConfig, model_dir: str, run_name: str):
        self.config = config
        self.model_dir = model_dir
        self.run_name = run_name
        self.replicas: dict[str, object] = {}  # live replica id -> actor
        self.adapters: dict[str, str] = {}  # version name -> adapter dir, in load order
        self.adapter_digests: dict[str, str | None] = {}  # version name -> its weights' digest (model.adapter_digest)
        self.usage = Usage()
        self.restarts: list[dict] = []  # one entry per replaced replica: who, why, when
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a replica joined or a replacement failed
        self._adapters_lock = threading.Lock()  # adapter loads and replica replacements, one at a time
        self._replacing: set[str] = set()  # replica ids whose replacement is starting
        self._failures: list[str] = []  # why replicas are missing: failed replacements, restarts used up
        self._closed = False  # shut down: a replacement that starts late is killed
        self._spawning = 0  # replacements whose engines are starting (on the replicas' GPUs)
        self._engines_may_start = True  # False from sleep() to wake(): Θ may be training on those GPUs
        self._ids = itertools.count()
        self._slots = itertools.count(config.inference.replicas)  # actor names of replacements
        self.router: Router | None = None
        self.group = None  # the replicas' placement group
        self.asleep = False
        self._start_timeout_s = 600.0  # an engine's start, first or as a replacement (start())

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 600.0) -> None:
        """Place the replicas (placement.timeout_s), then wait up to `timeout_s` for their engines to load."""
        inf = self.config.inference
        self._start_timeout_s = timeout_s
        bundles = placement.replica_bundles(self.config)
        self.group = placement.reserve(bundles, f"{self.run_name}/replicas", self.config.placement.timeout_s,
                                       f"{inf.replicas} inference replica(s) (placement.mode="
                                       f"{self.config.placement.mode})")
        actors = {}
        try:
            for i in range(inf.replicas):
                actors[f"replica-{i}"] = self._spawn(f"replica-{i}", i)
            health = self._wait_started(actors, timeout_s)
        except BaseException:  # nothing of a failed start stays held: its actors and placement group go
            self._abandon(actors)
            raise
        self.replicas.update(actors)
        self.router = Router(list(self.replicas))
        logger.info("inference pool ready: %d replica(s), engine=%s, placement=%s", len(health), inf.engine,
                    self.config.placement.mode)

    def _wait_started(self, actors: dict, timeout_s: float) -> list[dict]:
        """The replicas' health once every engine has loaded; a replica whose start raised is named with its cause."""
        import ray

        refs = {replica_id: actor.health.remote() for replica_id, actor in actors.items()}
        try:
            return placement.wait_ready(list(refs.values()), "inference replicas", timeout_s)
        except ray.exceptions.RayError as exc:
            failed = next((rid for rid, ref in refs.items() if _raises(ref)), "a replica")
            inf = self.config.inference
            raise EngineError(f"inference {failed} of {self.run_name!r} failed to start (engine={inf.engine}, "
                              f"model {self.model_dir}): {_cause(exc)}. Check model.name (a checkpoint directory "
                              f"with config.json, tokenizer and weights) and inference.engine") from exc

    def _abandon(self, actors: dict) -> None:
        import ray

        for actor in actors.values():
            ray.kill(actor)
        if self.group is not None:
            placement.release(self.group)
            self.group = None

    def shutdown(self) -> None:
        import ray

        with self._lock:
            actors, self.replicas = list(self.replicas.values()), {}
            self._closed = True
            self._failures.append("the pool was shut down")
            self._changed.notify_all()
        for actor in actors:
            ray.kill(actor)
        if self.group is not None:
            placement.release(self.group)
            self.group = None

    def _spawn(self, replica_id: str, index: int):
        """The actor for `replica_id` (actor name slot `index`), in that replica's placement-group bundle."""
        import ray

        inf = self.config.inference
        bundle = int(replica_id.rsplit("-", 1)[1])  # replica-k keeps bundle k, also when replaced
        options = placement.replica_options(self.config, self.run_name, index, self.group, bundle)
        return ray.remote(ReplicaActor).options(**options).remote(
            replica_id, inf.engine, self.model_dir, inf, self.config.model.dtype)

    def sleep(self) -> None:
        """Every replica frees its GPU memory (placement timeshare, during Θ); requests fail until wake().
        A replacement whose engine is starting finishes and sleeps with the others; one needed later waits
        for wake() before it starts an engine, so nothing loads onto the GPUs while Θ trains there."""
        with self._lock:
            self._engines_may_start = False
            while self._spawning and not self._closed:
                self._changed.wait()
        with self._adapters_lock:  # a replacement started meanwhile sleeps too
            self._on_every_replica("sleep", lambda actor: actor.sleep.remote())
            self.asleep = True

    def wake(self) -> None:
        """Every replica takes its GPU memory back. One that fails to wake (or gives no answer) is killed and
        replaced, not an error: the others serve meanwhile, and its replacement starts awake with every
        adapter version (or is named in the pool's failures if it cannot start either)."""
        try:
            with self._adapters_lock:
                self._on_every_replica("wake", lambda actor: actor.wake.remote(), replace_failed=True)
        finally:
            self.asleep = False
            with self._lock:
                self._engines_may_start = True
                self._changed.notify_all()

    def _on_every_replica(self, what: str, call, error: type[Exception] = EngineError, undo=None,
                          replace_failed: bool = False) -> int:
        """`call(actor)` on every live replica, waiting for all (inference.request_timeout_s in all). A replica
        that died is replaced (its replacement joins with every adapter version, asleep if the pool is) instead
        of failing the call. One that gives no answer in time fails the call and is killed and replaced too:
        its state is unknown (a late load would leave a version there). Any failure raises `error` naming each
        replica that failed and why, once all have answered; with `undo(actor)`, the replicas where the call
        succeeded are first put back (an adapter loaded on some replicas only is unloaded again; a replica where
        that fails is killed and replaced). Callers hold `_adapters_lock`. With `replace_failed`, a replica that
        fails is killed and replaced instead (logged)."""
        from ray.exceptions import GetTimeoutError, RayActorError

        with self._lock:
            refs = {rid: (actor, call(actor)) for rid, actor in self.replicas.items()}
        succeeded, failed = [], {}
        for rid, exc in self._answers(refs).items():
            actor = refs[rid][0]
            if exc is None:
                succeeded.append((rid, actor))
            elif isinstance(exc, RayActorError):
                self._replace(rid, actor, exc)
            else:
                hung = isinstance(exc, GetTimeoutError)
                if hung:
                    exc = ReplicaHung(f"no answer in inference.request_timeout_s="
                                      f"{self.config.inference.request_timeout_s:g}s; killed and replaced, its "
                                      "state being unknown")
                if hung or replace_failed:
                    self._kill_and_replace(rid, actor, exc)
                if replace_failed:
                    logger.error("%s failed to %s (%s); replaced", rid, what, _cause(exc))
                else:
                    failed[rid] = exc
        if failed:
            why = "; ".join(f"{rid}: {_cause(exc)}" for rid, exc in failed.items())
            undone = self._undo(succeeded, undo) if undo is not None and succeeded else ""
            raise error(f"{len(failed)} of {len(refs)} replica(s) failed to {what}: {why}{undone}") \
                from next(iter(failed.values()))
        logger.info("%d replica(s): %s", len(refs), what)
        return len(refs)

    def _undo(self, done: list[tuple[str, object]], undo) -> str:
        """Put back the replicas where a call succeeded that failed elsewhere; say how that went. One that cannot
        be put back (fails, gives no answer or died) is killed and replaced: the replacement loads only the
        versions the pool holds, so a failed version is left on no replica."""
        refs, left = {rid: (actor, undo(actor)) for rid, actor in done}, []
        for rid, exc in self._answers(refs).items():
            if exc is not None:  # reported with the error being raised, not instead of it
                logger.error("%s could not be put back (%s); killed and replaced", rid, _cause(exc))
                self._kill_and_replace(rid, refs[rid][0], exc)
                left.append(rid)
        names = ", ".join(rid for rid, _ in done)
        return (f" (undone on {names}, where it had succeeded)" if not left else
                f" (undone on {len(done) - len(left)} of {len(done)} replica(s) where it had succeeded; "
                f"{', '.join(left)} could not be put back: killed and replaced, see the log)")

    def _answers(self, refs: dict[str, tuple[object, object]]) -> dict[str, BaseException | None]:
        """Each replica's outcome of one call (replica id -> (actor, ref)): None when it succeeded, else its
        error, GetTimeoutError for no answer. All share one deadline, inference.request_timeout_s."""
        import ray

        if refs:
            ray.wait([ref for _, ref in refs.values()], num_returns=len(refs),
                     timeout=self.config.inference.request_timeout_s)
        outcomes = {}
        for rid, (_, ref) in refs.items():
            try:
                ray.get(ref, timeout=0)
                outcomes[rid] = None
            except Exception as exc:
                outcomes[rid] = exc
        return outcomes

    # ------------------------------------------------------------ calls

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Send one request to the least-loaded live replica and wait for its answer (thread-safe).

        If that replica dies, the request goes to another one (it is counted once, when answered).
        """
        if self.asleep:
            raise EngineError("the inference pool is asleep (placement.mode=timeshare frees the replicas' GPUs "
                              "while Θ trains); requests are served again after wake()")
        if request.adapter is not None and request.adapter not in self.adapters:
            raise AdapterError(f"model version {request.adapter!r} is not loaded in the pool; "
                               f"loaded: {', '.join(self.adapters) or 'none (base only)'}")
        request = _with_id(request, request.request_id or f"req-{next(self._ids)}")
        died: list[str] = []
        while True:
            replica_id, actor = self._pick(request, died)
            try:
                result = self._call(replica_id, actor, request)
            except ReplicaDied as exc:
                died.append(f"{replica_id}: {_cause(exc.cause)}")
                if len(died) > self.config.inference.request_retries:
                    raise EngineError(
                        f"request {request.request_id} (model version {request.adapter or 'base'}) lost its replica "
                        f"{len(died)} times, more than inference.request_retries="
                        f"{self.config.inference.request_retries}: {'; '.join(died)}") from exc.cause
                logger.warning("%s died serving request %s; resending it to a live replica", replica_id,
                               request.request_id)
                continue
            with self._lock:
                self.usage.add(result)
            return result

    def _call(self, replica_id: str, actor, request: GenerationRequest) -> GenerationResult:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        timeout = self.config.inference.request_timeout_s
        try:
            ref = actor.generate.remote(request)
            progress = None
            while True:  # a replica busy with a long queue is waited for; one that stopped moving is not
                try:
                    return ray.get(ref, timeout=timeout if progress is None else min(timeout, 60.0))
                except GetTimeoutError:
                    now = _progress(actor, timeout)
                    if now is None or now == progress:
                        raise ReplicaHung(
                            f"{replica_id} gave no answer to request {request.request_id} in "
                            f"inference.request_timeout_s={timeout:g}s and its work counters stood still "
                            f"({now or 'health did not answer'}); it looks hung") from None
                    logger.warning("request %s: no answer from %s in %.0fs, but it is still working (%s); waiting",
                                   request.request_id, replica_id, timeout, now)
                    progress = now
        except RayActorError as exc:
            self._replace(replica_id, actor, exc)
            raise ReplicaDied(exc) from exc
        except ReplicaHung:
            raise
        except Exception as exc:
            cause = getattr(exc, "cause", None) or exc  # Ray's RayTaskError carries the replica's exception
            what = (f"request {request.request_id} (model version {request.adapter or 'base'}, "
                    f"{len(request.messages)} messages): {type(cause).__name__}: {cause}")
            if isinstance(cause, RequestError):  # this request only: its example fails, the phase goes on
                raise RequestError(f"{replica_id} refused {what}") from exc
            raise EngineError(f"{replica_id} failed {what}") from exc
        finally:
            self.router.done(replica_id)

    def _pick(self, request: GenerationRequest, died: list[str]):
        """A live replica for `request`, waiting for a replacement while none is live."""
        deadline = time.monotonic() + self.config.inference.request_timeout_s
        with self._lock:
            while True:
                if self.replicas:
                    replica_id = self.router.pick(prefix_key(request))
                    return replica_id, self.replicas[replica_id]
                if not self._replacing or time.monotonic() > deadline:
                    why = "; ".join(self._failures + died) or "no replica was started"
                    raise EngineError(f"no live inference replica for request {request.request_id}: {why}")
                self._changed.wait(timeout=1.0)

    def usage_snapshot(self) -> Usage:
        with self._lock:
            return self.usage.copy()

    # ------------------------------------------------------------ adapters

    def load_adapter(self, name: str, path: str) -> None:
        """Load a new adapter version on every replica; a name is never reused (stale caches)."""
        if name in self.adapters:
            raise AdapterError(f"adapter version {name!r} is already loaded; each fine-tune gets a new name")
        digest = None if storage.is_uri(path) else adapter_digest(path)
        path = storage.shared_path(path)  # a URI output_dir: replicas on any node get the uploaded copy
        with self._adapters_lock:  # a replacement started meanwhile loads it too
            # a version is on every replica or on none: one that failed somewhere is unloaded where it loaded
            self._on_every_replica(f"load adapter {name!r} from {path}",
                                   lambda actor: actor.load_adapter.remote(name, path), AdapterError,
                                   undo=lambda actor: actor.unload_adapter.remote(name))
            self.adapters[name], self.adapter_digests[name] = path, digest

    def unload_adapter(self, name: str) -> None:
        with self._adapters_lock:
            self.adapters.pop(name, None)
            self.adapter_digests.pop(name, None)
            self._on_every_replica(f"unload adapter {name!r}", lambda actor: actor.unload_adapter.remote(name),
                                   AdapterError)

    def health(self) -> list[dict]:
        import ray

        with self._lock:
            actors = list(self.replicas.values())
        return ray.get([actor.health.remote() for actor in actors])

    # ------------------------------------------------------------ replica deaths

    def _replace(self, replica_id: str, actor, cause: BaseException) -> None:
        """Take a dead replica out of the router and start its replacement (once per death, any thread)."""
        with self._lock:
            if self.replicas.get(replica_id) is not actor:
                return  # already replaced, or being replaced
            del self.replicas[replica_id]
            self.router.remove(replica_id)
            self.restarts.append({"replica": replica_id, "cause": _cause(cause), "at": time.time()})
            if len(self.restarts) > self.config.inference.replica_restarts:
                why = (f"{replica_id} died ({_cause(cause)}) and {len(self.restarts) - 1} replica(s) were replaced "
                       f"already, the most inference.replica_restarts="
                       f"{self.config.inference.replica_restarts} allows")
                logger.error("%s; %d replica(s) left", why, len(self.replicas))
                self._failures.append(why)
                self._changed.notify_all()
                return
            logger.warning("%s died (%s); %d live replica(s) serve while a new one starts",
                           replica_id, _cause(cause), len(self.replicas))
            self._replacing.add(replica_id)
        threading.Thread(target=self._start_replacement, args=(replica_id,), name=f"replace-{replica_id}",
                         daemon=True).start()

    def _kill_and_replace(self, replica_id: str, actor, cause: BaseException) -> None:
        """A replica that stopped answering: killed, then replaced as a dead one is."""
        import ray

        ray.kill(actor, no_restart=True)
        self._replace(replica_id, actor, cause)

    def _start_replacement(self, replica_id: str) -> None:
        import ray

        with self._lock:  # not while the replicas sleep for Θ (see sleep())
            while not self._engines_may_start and not self._closed:
                self._changed.wait()
            if self._closed:
                self._replacing.discard(replica_id)
                self._changed.notify_all()
                return
            self._spawning += 1
        timeout, actor = self.config.inference.request_timeout_s, None
        try:
            index = next(self._slots)
            actor = self._spawn(replica_id, index)
            placement.wait_ready([actor.health.remote()], f"replacement for {replica_id}", self._start_timeout_s)
            with self._adapters_lock:  # every version loaded before it gets traffic
                for name, path in self.adapters.items():
                    ray.get(actor.load_adapter.remote(name, path), timeout=timeout)
                if self.asleep:  # placement timeshare, during Θ: free the GPU like the others
                    ray.get(actor.sleep.remote(), timeout=timeout)
                with self._lock:
                    if self._closed:
                        ray.kill(actor)
                        return
                    self.replicas[replica_id] = actor
                    self.router.add(replica_id)
            logger.info("%s replaced (actor %s/replica-%d) with %d adapter version(s)", replica_id,
                        self.run_name, index, len(self.adapters))
        except Exception as exc:
            logger.exception("could not replace %s", replica_id)
            if actor is not None:  # it would hold its CPUs/GPU otherwise
                ray.kill(actor, no_restart=True)
            with self._lock:
                self._failures.append(f"replacing {replica_id} failed: {type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._replacing.discard(replica_id)
                self._spawning -= 1
                self._changed.notify_all()


def _progress(actor, timeout: float) -> dict | None:
    """A replica's work counters (prefills, decode steps, requests finished), or None if it does not answer.
    A hung replica's counters stand still; a busy one's move even while a given request waits in its queue."""
    import ray

    try:
        health = ray.get(actor.health.remote(), timeout=min(timeout, 30.0))
    except Exception:
        return None
    return {key: health[key] for key in ("batches", "decode_steps", "requests", "served") if key in health}


class ReplicaHung(EngineError):
    """A replica stopped answering (raised here, not by the replica)."""


class ReplicaDied(Exception):
    """The replica's actor is gone; the request may go to another replica."""

    def __init__(self, cause: BaseException):
        super().__init__(_cause(cause))
        self.cause = cause


def _cause(exc: BaseException) -> str:
    """Type and message: Ray's actor errors say why the actor died (exit type, OOM killer, node) only in str().
    Of a remote traceback, its first line (which actor) and its last (the error raised)."""
    lines = [line for line in plain(str(exc)).strip().splitlines() if line.strip()]
    text = " ... ".join(lines if len(lines) <= 2 else [lines[0], lines[-1].strip()])
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _raises(ref) -> bool:
    import ray

    try:
        ray.get(ref, timeout=0)
    except ray.exceptions.GetTimeoutError:
        return False
    except ray.exceptions.RayError:
        return True
    return False


def prefix_key(request: GenerationRequest) -> str | None:
    """Requests with the same adapter and the same messages but the last share a prompt prefix."""
    if len(request.messages) < 2:
        return None
    digest = hashlib.sha1(repr((request.adapter, request.messages[:-1])).encode()).hexdigest()
    return digest[:16]


def _with_id(request: GenerationRequest, request_id: str) -> GenerationRequest:
    if request.request_id == request_id:
        return request
    return GenerationRequest(request.messages, request.sampling, request.adapter, request_id)
