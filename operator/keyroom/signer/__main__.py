"""``python -m keyroom.signer``: run the signer service (configuration from the environment)."""
from __future__ import annotations

import logging
import sys

from aiohttp import web

from keyroom.signer.service import Signer, SignerConfig

READY_MESSAGE = "keyroom signer listening"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s [%(levelname)s] %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        config = SignerConfig.from_environment()
        signer = Signer(config)
        context = signer.ssl_context()
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.getLogger("keyroom.signer").info("%s on https://%s:%d", READY_MESSAGE, config.host, config.port)
    web.run_app(signer.application(), host=config.host, port=config.port, ssl_context=context,
                print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
