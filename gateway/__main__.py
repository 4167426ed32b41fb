"""`python -m gateway`: the fal-compatible HTTP gateway on uvicorn (host, port, TLS from settings)."""

from __future__ import annotations

import logging

import uvicorn

from common.settings import GatewaySettings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from common.observability.redact import install_log_redaction

    install_log_redaction()  # no credential in any log line
    settings = GatewaySettings()
    tls = bool(settings.gateway_tls_cert)  # None is uvicorn's default: plain HTTP
    uvicorn.run(
        "gateway.app:app_from_environment",
        factory=True,
        host=settings.gateway_host,
        port=settings.gateway_port,
        workers=settings.gateway_workers,
        proxy_headers=False,
        timeout_keep_alive=75,
        log_level="info",
        access_log=False,
        ssl_certfile=settings.gateway_tls_cert if tls else None,
        ssl_keyfile=settings.gateway_tls_key if tls else None,
    )


if __name__ == "__main__":
    main()
