"""`m3db serve PATH --ray --replicas N`: the server's replicas on Ray Serve (bindings/ray/replicas.py),
on a local Ray instance started here or the cluster --ray-address (or RAY_ADDRESS) names, until
SIGINT or SIGTERM; then the deployment is taken down (and a local instance stopped).

Read-only: --write is refused (one writer per database; run `m3db serve PATH --write` for writes),
and so are --kb and --keys (replicas serve one knowledge base behind one key).
"""

import dataclasses
import os
import signal
import threading

from ..errors import DependencyError, InvalidInputError
from .models import load_model, say

# the Serve application's name (one m3db deployment per Ray cluster's Serve, at route "/")
APP = "m3db"


@dataclasses.dataclass(frozen=True)
class CommandLineModel:
    """The model --model and --adapter name, loaded on each replica and fitted to its database's
    spec (a recipe: it travels to the replicas, the model does not)."""

    model: str | None
    adapter: str | None

    def __call__(self, spec):
        from .serve import fit_to_spec

        model, embedder = load_model(self.model, self.adapter)
        return fit_to_spec(model, spec), embedder


def serve_replicas(args, *, api_key, limits) -> None:
    if args.write:
        raise InvalidInputError(
            "--ray serves read-only replicas (a database has one writer): drop --write, and serve writes with "
            "one `m3db serve PATH --write` of their own"
        )
    if args.kb or args.keys:
        raise InvalidInputError("--ray serves one knowledge base behind one key (--api-key): drop --kb and --keys")
    if args.path is None:
        raise InvalidInputError("m3db serve --ray needs PATH (a database or package)")
    if not isinstance(args.replicas, int) or args.replicas < 1:
        raise InvalidInputError(f"--replicas {args.replicas}: expected a positive integer")
    try:
        import ray
        from ray import serve

        from ..bindings.ray.replicas import replicas
    except ImportError as e:
        raise DependencyError(f"m3db serve --ray needs Ray Serve ({e}): pip install 'm3db[ray]'") from e
    adapter = getattr(args, "adapter", None)
    load_model(None, adapter)  # --adapter without --model fails here, not on every replica
    models = CommandLineModel(args.model, adapter) if args.model else None
    application = replicas(
        [args.path, *args.more],
        replicas=args.replicas,
        models=models,
        name=args.name,
        api_key=api_key,
        limits=limits,
        precision=args.precision,
        public_metrics=args.public_metrics,
        cpus_per_replica=0,  # torch's threads do the work: Ray's CPU count would only stop replicas from starting
    )
    address = args.ray_address or os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, log_to_driver=False, include_dashboard=False if address is None else None)
    stopped = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stopped.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        say(f"starting {args.replicas} replicas on Ray Serve (each loads the model)")
        serve.run(application, name=APP, route_prefix="/")
        shown = f"[{args.host}]" if ":" in args.host else args.host
        say(f"serving {args.path} at http://{shown}:{args.port}/v1 ({args.replicas} replicas on Ray Serve; read-only)")
        stopped.wait()
        say("stopping the replicas")
    finally:
        try:
            serve.delete(APP)
            if address is None:
                serve.shutdown()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            ray.shutdown()
    say("stopped")
