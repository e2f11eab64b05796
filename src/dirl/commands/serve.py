"""``dirl serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key-env DIRL_API_KEY] [--no-updates]``.

Every :class:`~dirl.serve.ServeConfig` field can also be set from a YAML
recipe (``--config``) or a ``key=value`` override (``max_n=32``); the flags win.
The server refuses to start without an update key unless ``--no-updates``.
"""

from __future__ import annotations

import ipaddress
import os
import sys

from dirl import config as config_lib
from dirl.commands import add_config_arguments

# flag attribute -> ServeConfig field (flags left unset keep the config's value)
FLAGS = {"model": "model", "host": "host", "port": "port", "api_key_env": "api_key_env",
         "max_batch": "max_batch", "served_model_name": "served_model_name"}


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--model", help="checkpoint directory to serve")
    parser.add_argument("--host", help="bind address (default 127.0.0.1: loopback only)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--api-key-env", dest="api_key_env",
                        help="environment variable holding the /update_weights key (default DIRL_API_KEY)")
    parser.add_argument("--no-updates", dest="no_updates", action="store_true",
                        help="disable /update_weights (403); no key needed")
    parser.add_argument("--max-batch", dest="max_batch", type=int, help="rows (prompts x n) per engine call")
    parser.add_argument("--served-model-name", dest="served_model_name", help="model id in the API")


def resolve_config(args):
    from dirl.serve import ServeConfig

    flags = [f"{field}={getattr(args, attr)}" for attr, field in FLAGS.items()
             if getattr(args, attr, None) is not None]
    if getattr(args, "no_updates", False):
        flags.append("allow_updates=false")
    return config_lib.load(ServeConfig, args.config, [*args.overrides, *flags])  # the flags win


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> None:
    """Refuse a port another process holds, before the model loads (uvicorn would log a
    traceback-like error and exit 1 after the load)."""
    import socket

    from dirl.errors import UserError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as err:
        raise UserError(f"--host {host!r}: cannot resolve it ({err})") from None
    with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(infos[0][4])
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}; is another server "
                            "running there? pick another --port") from None


def run(args) -> int:
    cfg = resolve_config(args)
    if not cfg.model:
        print("dirl serve: --model DIR is required", file=sys.stderr)
        return 2
    api_key = cfg.api_key or os.environ.get(cfg.api_key_env, "")
    if cfg.allow_updates and not api_key:
        print(f"dirl serve: refusing to start: weight updates need a key; set ${cfg.api_key_env} "
              f"(or pass --no-updates to serve without /update_weights)", file=sys.stderr)
        return 2
    from dirl.runtime import resolve_device

    device = resolve_device(cfg.device)
    check_port(cfg.host, cfg.port)  # errors first: a refused start prints one line
    if not is_loopback(cfg.host):
        print(f"dirl serve: warning: binding {cfg.host} exposes the server beyond this machine "
              f"(completions are {'authenticated' if cfg.auth_completions else 'NOT authenticated'})",
              file=sys.stderr)
    import torch
    import uvicorn

    from dirl.model.checkpoint import load_pretrained
    from dirl.serve.app import create_app
    from dirl.serve.guard import guarded_protocol

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    model, tokenizer = load_pretrained(cfg.model, dtype=cfg.param_dtype or None, device=device)
    app = create_app(model.eval(), tokenizer, cfg, api_key or None)
    state = app.state.dirl
    print(f"dirl serve: {state.name} on http://{cfg.host}:{cfg.port} "
          f"(weight updates {'on' if cfg.allow_updates else 'off'})", flush=True)
    # The batcher thread's Python code hands the GIL back within 1 ms (not 5): /health and the
    # event loop stay responsive while the heaviest request decodes.
    sys.setswitchinterval(0.001)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                http=guarded_protocol(cfg.max_connections, cfg.header_timeout_s, cfg.body_timeout_s))
    return 0
