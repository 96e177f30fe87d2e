"""How a search's Ray is started: what its workers import and who may talk to it.

- Ray puts the driver's working directory (and its script's folder) first on every worker's
  sys.path, so a stray `h2.py`, `search.py` or `data.py` next to the user's config would shadow
  the libraries a trial imports. The driver therefore starts or joins Ray from an empty folder of
  its own: that folder, not the launch directory, is what workers get.
- A local Ray (2.60) binds its gRPC services (GCS, raylet, workers, agents) to every interface
  and offers no setting to bind them to loopback only (`_node_ip_address="127.0.0.1"` is resolved
  back to the machine's address). What protects them is Ray's token authentication: a local
  search keeps it on (`RAY_AUTH_MODE=token`) and checks that it is on before any trial runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

AUTH_ENV = "RAY_AUTH_MODE"


def neutral_dir() -> str:
    """An empty folder owned by this user, the working directory Ray is started from."""
    path = os.path.join(tempfile.gettempdir(), f"lora-rank-search-ray-{os.getuid()}")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.stat(path)
        if info.st_uid == os.getuid() and not os.listdir(path) and not os.path.islink(path):
            return path
    except OSError:
        pass
    return tempfile.mkdtemp(prefix="lora-rank-search-ray-")


@contextlib.contextmanager
def isolated_ray_start(local: bool):
    """Wrap `ray.init`: start it from an empty folder (workers must not import from the launch
    directory); for a Ray started here (`local`), keep token authentication on and check it."""
    before_cwd = os.getcwd()
    before_auth = os.environ.get(AUTH_ENV)
    if local and before_auth is not None and before_auth.lower() != "token":
        # Unset, a new local Ray turns token authentication on itself (and generates the token).
        print(f"warning: {AUTH_ENV}: {before_auth!r} ignored: a local search's Ray services listen on every interface,"
              " so its token authentication stays on", file=sys.stderr)
        del os.environ[AUTH_ENV]
    # Turning it on, Ray logs "Set RAY_AUTH_MODE=disabled to opt out": not so for a local search.
    hint = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = hint.level
    if local:
        hint.setLevel(logging.ERROR)
    os.chdir(neutral_dir())
    try:
        yield
    finally:
        os.chdir(before_cwd)
        hint.setLevel(level)
    if local and not token_auth_enabled():
        import ray

        ray.shutdown()
        raise RuntimeError("Ray's token authentication is off for this local search, whose services listen on every interface")


def token_auth_enabled() -> bool:
    """True when the connected Ray requires its authentication token on every request."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:  # pragma: no cover - Ray before token authentication
        return False
    return bool(is_token_auth_enabled())


@contextlib.contextmanager
def environ(values: dict):
    """Set environment variables for the duration of the block."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
