"""``python -m services.router``"""

from services.router.app import SERVICE, main
from services.router.settings import RouterSettings
from shared.service import run

if __name__ == "__main__":
    run(SERVICE, RouterSettings, main)
