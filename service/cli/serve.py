"""``ircnn serve``: the REST service under uvicorn."""

from __future__ import annotations

from service.cli.common import CliError


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="the REST service: /v1/detect, /v1/classify, /v1/models, /metrics, web page",
                       description="Serve the HTTP API with uvicorn: POST /v1/detect and /v1/classify (an image as "
                       "multipart field 'image' or as the raw body), GET /v1/models, /healthz, /readyz and /metrics, "
                       "the web page at / and interactive API docs at /docs. Every IRCNN_* setting (the settings table of "
                       "the serving docs) is read from the environment; these flags override them. SIGTERM "
                       "or Ctrl-C stops taking connections, finishes the requests in flight, then exits 0.")
    p.add_argument("--host", help="address to listen on (default IRCNN_HOST or 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help="default IRCNN_PORT or 8000")
    p.add_argument("--model", help="bundle directory (default IRCNN_MODEL, else torchvision's ImageNet GoogLeNet)")
    p.add_argument("--graceful-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="longest wait for in-flight requests at shutdown (default 30)")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    import os
    import signal

    from detector.config import MAKE_BUNDLE
    from service.settings import Settings

    # the settings first (IRCNN_* and the flags, checked), and what would stop the service before uvicorn, torch and
    # the app load
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("model", args.model)) if v is not None}
    settings = Settings(**overrides)
    model = settings.model
    if model and not os.path.isfile(os.path.join(model, "model.json")):
        what = "does not exist" if not os.path.exists(model) else "is not a model bundle (no model.json)"
        raise CliError(f"--model {model} {what}; {MAKE_BUNDLE}")
    if settings.device != "cpu":  # a GPU this machine lacks: said here, not as a start-up traceback
        from detector.devices import check_device

        try:
            check_device(settings.device)
        except ValueError as e:
            raise CliError(f"IRCNN_DEVICE={settings.device}: {e}") from None
    if model and settings.precision == "int8" and not os.path.isdir(os.path.join(model, "int8")):
        raise CliError(f"IRCNN_PRECISION=int8 needs the bundle's int8 models, and {model} has none: make them with "
                       f"`ircnn model quantize {model} --images DIR` (a few dozen of your own photos), or serve "
                       "fp32 (unset IRCNN_PRECISION)")

    import uvicorn

    from detector.bundle.format import read_manifest
    from service.app import create_app, server_options

    if model is not None:
        read_manifest(model)  # model.json read and checked, with its own message
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                            timeout_graceful_shutdown=args.graceful_timeout, log_level=args.log_level,
                            **server_options(settings))
    server = uvicorn.Server(config)
    # uvicorn finishes the requests in flight on SIGTERM, then re-raises the signal to the handler installed
    # before it ran; the default one would end the process "killed by SIGTERM". A completed graceful shutdown is
    # a clean exit (status 0, what supervisors and `docker stop` expect), so that re-raise does nothing here.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    if not server.started:
        raise CliError("the service did not start (see the log above)")
    return 0
