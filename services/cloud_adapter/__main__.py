"""``python -m services.cloud_adapter``"""

from contextlib import AsyncExitStack

from shared.nats import broker
from shared.ops import Readiness
from shared.service import attach_broker, run
from shared.settings import ServiceSettings

SERVICE = "cloud-adapter"


async def main(settings: ServiceSettings, readiness: Readiness, stack: AsyncExitStack) -> None:
    """Connect to NATS so readiness reflects the connection; no handlers yet."""
    await attach_broker(broker(settings, SERVICE), settings, SERVICE, readiness, stack)


if __name__ == "__main__":
    run(SERVICE, ServiceSettings, main)
