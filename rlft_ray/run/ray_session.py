"""The Ray session of a run: joining a cluster or starting embedded Ray (early, lean), and stopping it.

:func:`init_ray` is the one way train and tune connect to a cluster or start embedded Ray;
:func:`start_ray_early` boots it on a background thread while the driver imports and checks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator

from rlft_ray.config import ResourcesConfig
from rlft_ray.run.resources import ResourceError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Seconds to wait for a named cluster's head to answer before failing.
CONNECT_TIMEOUT_S = 10.0


def cluster_address(address: str | None = None) -> str | None:
    """The cluster the user asked for: ``address``, else ``RAY_ADDRESS`` (set by
    ``ray job submit`` for its entrypoint, or by the user), else None: embedded Ray.

    A head left over from an earlier ``ray start`` is never joined unasked: without an
    address Ray would try the address it recorded for that head, and retry a dead one
    forever.
    """
    return address or os.environ.get("RAY_ADDRESS") or None


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail within ``timeout_s`` when the head at ``address`` (``host:port`` or
    ``ray://host:port``) does not accept a connection, instead of Ray's endless retries.

    ``auto`` is resolved to the address ``ray start`` recorded on this machine.

    Raises:
        ResourceError: Naming the address and the fix.
    """
    if address == "local":
        return
    target = address
    if address == "auto":
        from ray._private.services import find_bootstrap_address

        found = find_bootstrap_address(None)
        if not found:
            raise ResourceError(
                "address=auto: no Ray cluster was started on this machine (ray start --head); "
                "start one, or leave out --address / RAY_ADDRESS to run on embedded Ray"
            )
        target = str(found)
    host_port = target.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as exc:
        source = "RAY_ADDRESS" if address == os.environ.get("RAY_ADDRESS") else "--address"
        raise ResourceError(
            f"cannot reach the Ray cluster at {address} ({source}) within {timeout_s:g} s: "
            f"{type(exc).__name__}: {exc}. Start it (ray start --head), fix the address, or "
            "unset RAY_ADDRESS and leave out --address to run on embedded Ray"
        ) from exc


#: Set in this process's environment (which an embedded instance's processes inherit)
#: while a local Ray instance started here runs without its dashboard: Ray Train's
#: placement-group cleaner, which polls the dashboard's state API, is left out then.
NO_DASHBOARD_ENV = "RLFT_RAY_LOCAL_NO_DASHBOARD"

#: Ray Train's preemption watcher (spot nodes) and Prometheus metrics actors have
#: nothing to do on an embedded instance without a dashboard: each is one more process
#: to start on a laptop's cores.
_LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}

#: Bound on waiting for a local instance started by :func:`start_ray_early`.
LOCAL_START_TIMEOUT_S = 120.0


def init_ray(address: str | None = None, dashboard: bool = False) -> None:
    """Connect to the cluster the user asked for (``address`` / ``RAY_ADDRESS``: a
    cluster, ``ray job submit``), else start embedded Ray; nothing when Ray is already
    up in this process (or is being started by :func:`start_ray_early`: waits for it).

    Args:
        address: Ray address (``host:port``, ``ray://...``, ``auto`` or ``local``);
            default ``RAY_ADDRESS`` or a new local instance.
        dashboard: A local instance started here runs the dashboard on a free loopback
            port and tells every worker where it is. Tune needs it when a scheduler stops
            trials: a detached Ray Train actor frees a stopped trial's learners through the
            dashboard's state API, which it finds by address; that is ambiguous when several
            local Ray instances run on one machine, and a placement group left behind would
            starve every later trial of CPUs. Without it a local instance starts without
            the dashboard (about 1 s and a dozen processes less): its placement groups end
            with it, so Ray Train's cleaner is left out (:data:`NO_DASHBOARD_ENV`).

    Raises:
        ResourceError: The named cluster does not answer within ``CONNECT_TIMEOUT_S``,
            or a local instance does not start within ``LOCAL_START_TIMEOUT_S``.
    """
    if _EarlyStart.pending is not None:
        _EarlyStart.pending.wait()
    _init_ray(address, dashboard)


def _init_ray(address: str | None, dashboard: bool, preload: str | None = None) -> None:
    import ray

    # Faster Ray Train controller polling: the default 2 s adds seconds to short runs.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    if ray.is_initialized():
        return
    kwargs: dict = {"logging_level": logging.WARNING, "configure_logging": True}
    target = cluster_address(address)
    if target is None:
        target = "local"  # never a stale head recorded by an earlier `ray start`
        if dashboard:
            os.environ.pop(NO_DASHBOARD_ENV, None)
            port = _free_port()
            kwargs.update(
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=port,
                runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
            )
        else:
            kwargs["include_dashboard"] = False
            if preload:  # Ray's first workers import it while the driver is busy
                kwargs["_system_config"] = {"preload_python_modules": [preload]}
            os.environ[NO_DASHBOARD_ENV] = "1"
            for key, value in _LOCAL_TRAIN_ENV.items():
                os.environ.setdefault(key, value)
    else:
        check_reachable(target)
    if target == "local":  # our own instance: its token auth is no news to the user
        logging.getLogger(_AUTH_LOGGER).addFilter(_no_local_auth_notice)
    with _lean_local_head() if target == "local" and not dashboard else contextlib.nullcontext():
        ray.init(address=target, **kwargs)
    _STARTED_HERE[0] = target == "local"


@contextlib.contextmanager
def _lean_local_head() -> Iterator[None]:
    """Without the dashboard a local instance still starts Ray's API server (the job and
    state APIs) and the autoscaler monitor (``ray status``, scaling a cluster), and
    ``ray.init`` waits for the API server to come up: about 1 s of every start on 2 cores,
    and two processes, none of which a local run uses. Both are skipped while the instance
    starts; the node then reports no dashboard URL, as when that server fails to start.
    (Private Ray methods: if either moved, both start as before.)"""
    try:
        from ray._private.node import Node

        saved = {name: getattr(Node, name) for name in ("start_api_server", "start_monitor")}
    except (ImportError, AttributeError):
        yield
        return
    for name in saved:
        setattr(Node, name, lambda self, **kwargs: None)
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(Node, name, method)


#: Whether this process started the Ray instance it is connected to (:func:`embedded_here`).
_STARTED_HERE = [False]


def embedded_here() -> bool:
    """Whether Ray is an instance this process started (a local run on one machine),
    not a cluster it connected to."""
    import ray

    return _STARTED_HERE[0] and ray.is_initialized()


def learner_in_driver_wanted(res: ResourcesConfig) -> bool:
    """Whether ``res`` lets the learner run in the driver (``resources.learner_in_driver``
    with one CPU learner); the run also needs an embedded instance, no Ray Dataset and no
    Tune trial around it (:mod:`rlft_ray.run.attempts` decides)."""
    return res.learner_in_driver and res.num_learners == 1 and not res.use_gpu


def start_ray_early(
    address: str | None = None, res: ResourcesConfig | None = None, preload: str | None = None
) -> None:
    """Start a local Ray instance in the background while the caller imports and checks
    its input (the ``train`` and ``quickstart`` commands); :func:`init_ray` then waits for it. Nothing when
    ``address`` / ``RAY_ADDRESS`` names a cluster (connecting is checked where it is
    used) or Ray is up. :func:`shutdown_ray` stops it whether or not it was used.

    Args:
        address: The command's ``--address``.
        res: The run's resources (default: the defaults). Unless its learner will run in
            the driver, Ray Train's autoscaling coordinator starts with the instance.
        preload: The module of the run's rollout actors. With the learner in the driver
            they are the instance's only workers, so the worker processes Ray starts with
            it import the module (torch, transformers: seconds on 2 cores) on the core the
            driver leaves free, before the actors are created in them.
    """
    import ray

    if cluster_address(address) is None and not ray.is_initialized() and not _EarlyStart.pending:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            # What ray.init installs on the main thread: SIGTERM exits through atexit's
            # ray.shutdown, which stops the instance's agents too.
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        _EarlyStart.stopped.clear()
        in_driver = learner_in_driver_wanted(res or ResourcesConfig())
        _EarlyStart.pending = _EarlyStart(not in_driver, preload if in_driver else None)


def shutdown_ray() -> None:
    """Stop (or disconnect from) Ray, including an instance :func:`start_ray_early` is
    still starting (bounded wait)."""
    import ray

    if _EarlyStart.pending is not None:
        # a start that failed or timed out has nothing to stop; its error is not this call's
        with contextlib.suppress(Exception):
            _EarlyStart.pending.wait()
    if ray.is_initialized():
        _kill_autoscaler_monitor()
        ray.shutdown()
    _STARTED_HERE[0] = False
    os.environ.pop(NO_DASHBOARD_ENV, None)
    _EarlyStart.stopped.set()  # a parked start thread may go: its processes are gone


def _start_train_coordinator() -> None:
    """Start Ray Train's autoscaling-coordinator actor with the instance. Every Ray Train
    run asks it for resources first and waits while its process boots (about 1 s on 2
    cores); started here, it boots while the driver checks the task. It lives in a private
    Ray module: skipped if that moved (Ray Train then starts it as before)."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        get_or_create_autoscaling_coordinator()
    except Exception as exc:  # an optimisation only
        logging.getLogger(__name__).debug("coordinator not started early: %r", exc)


def _kill_autoscaler_monitor() -> None:
    """A local instance's autoscaler monitor outlives SIGTERM, so ``ray.shutdown`` waits its
    full second for it before killing it; one machine has nothing to autoscale, so it is
    killed first. (Private Ray attributes: skipped if they moved; nothing for a cluster,
    whose processes this driver does not own.)"""
    try:
        from ray._private import ray_constants
        from ray._private.worker import _global_node as node

        for info in node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node else []:
            info.process.kill()
            info.process.wait(timeout=5)
    except Exception as exc:  # an optimisation only
        logging.getLogger(__name__).debug("autoscaler monitor not stopped early: %r", exc)


#: The logger of Ray's notice that a new local instance uses (or does not use) token auth.
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def _no_local_auth_notice(record: logging.LogRecord) -> bool:
    """Drop Ray's "Token authentication is enabled/disabled for this Ray cluster" notice,
    printed on every start of the embedded instance a local run owns (the instance runs
    with Ray's default either way; ``RAY_AUTH_MODE`` still chooses)."""
    return not record.getMessage().startswith("Token authentication is")


def _no_sigterm_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("SIGTERM handler is not set")


class _EarlyStart:
    """``ray.init`` on a thread that stays alive while Ray is up: an embedded instance's
    head processes die with the *thread* that started them (Ray sets
    ``PR_SET_PDEATHSIG`` on them, which Linux ties to the parent thread)."""

    pending: _EarlyStart | None = None
    stopped = threading.Event()

    def __init__(self, train_workers: bool, preload: str | None) -> None:
        self.train_workers, self.preload = train_workers, preload
        self.error: BaseException | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._run, name="rlft-ray-start", daemon=True).start()

    def _run(self) -> None:
        # ray.init says it skips its SIGTERM handler off the main thread; set above.
        logging.getLogger("ray._private.worker").addFilter(_no_sigterm_warning)
        try:
            _init_ray(None, dashboard=False, preload=self.preload)
        except BaseException as exc:  # re-raised where the run waits for Ray
            self.error = exc
            return
        finally:
            self.ready.set()
        if self.train_workers:
            _start_train_coordinator()
        # Parked until shutdown_ray has stopped the instance: leaving while the head's
        # processes run would kill them before they stop their agents.
        self.stopped.wait()

    def wait(self) -> None:
        """Until the instance is up; re-raises its start's error.

        Raises:
            ResourceError: Not up within ``LOCAL_START_TIMEOUT_S``.
        """
        if not self.ready.wait(LOCAL_START_TIMEOUT_S):
            raise ResourceError(f"local Ray did not start within {LOCAL_START_TIMEOUT_S:.0f} s")
        _EarlyStart.pending = None
        if self.error is not None:
            raise self.error
