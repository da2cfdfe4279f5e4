"""``python -m services.gateway``"""

from services.gateway.app import SERVICE, main
from services.gateway.settings import GatewaySettings
from shared.service import run

if __name__ == "__main__":
    run(SERVICE, GatewaySettings, main, ops_server=False)
